"""Autoregressive sampling from LM-head transformers with the KV cache."""

from rlhf_jax.sampling.sampler import (SampleOutput, make_sampler, sample, top_k_mask,
                                       top_p_mask, truncated_logits)
