"""Flax NNX decoder-only transformers and their HF checkpoint bridge."""

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import KVCache, Transformer
from rlhf_jax.models.hf import (config_from_hf, load_hf, read_hf_config, save_first_layers,
                                 save_hf)
