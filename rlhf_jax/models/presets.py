"""Named model sizes. The Llama/Qwen/GPT-2 presets copy the published architectures (their HF
config.json); the pod-scale ones (8B and up) also stack their layers for `jax.lax.scan`."""

from rlhf_jax.errors import InputError
from rlhf_jax.models.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Runs in seconds on one CPU core: unit tests and smoke runs.
    'tiny': ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=192, max_position=512),
    # ~1M parameters over the playground tokenizer's 512 tokens: CPU pipelines in minutes.
    'playground': ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                              d_ff=384, max_position=512),
    # A larger random model for the playground's teacher gold reward (rlhf_jax.rewards.gold).
    'playground-teacher': ModelConfig(vocab_size=512, d_model=192, n_layers=6, n_heads=6,
                                      n_kv_heads=2, d_ff=512, max_position=512),
    # ~20M parameters: the CPU benchmark and minute-scale CPU experiments.
    'small': ModelConfig(vocab_size=8192, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2,
                         d_ff=1024, max_position=1024),
    'gpt2': ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=3072, norm='layer', norm_eps=1e-5, position='learned',
                        max_position=1024, mlp='gelu', qkv_bias=True, out_bias=True,
                        tie_embeddings=True),
    'qwen2-0.5b': ModelConfig(vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                              n_kv_heads=2, d_ff=4864, norm_eps=1e-6, rope_theta=1_000_000.0,
                              qkv_bias=True, tie_embeddings=True, max_position=32768),
    'llama-1b': ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                            n_kv_heads=8, d_ff=8192, head_dim=64, norm_eps=1e-5,
                            rope_theta=500_000.0, rope_llama3_scaling=(32.0, 1.0, 4.0, 8192),
                            tie_embeddings=True, max_position=131072),
    # Llama 3.1 8B and 70B (meta-llama/Llama-3.1-8B, -70B).
    'llama3-8b': ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                             n_kv_heads=8, d_ff=14336, norm_eps=1e-5, rope_theta=500_000.0,
                             rope_llama3_scaling=(8.0, 1.0, 4.0, 8192), max_position=131072,
                             scan_layers=True),
    'llama3-70b': ModelConfig(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
                              n_kv_heads=8, d_ff=28672, norm_eps=1e-5, rope_theta=500_000.0,
                              rope_llama3_scaling=(8.0, 1.0, 4.0, 8192), max_position=131072,
                              scan_layers=True),
    # Qwen/Qwen2.5-7B and Qwen/Qwen3-8B.
    'qwen2.5-7b': ModelConfig(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                              n_kv_heads=4, d_ff=18944, norm_eps=1e-6, rope_theta=1_000_000.0,
                              qkv_bias=True, max_position=131072, scan_layers=True),
    'qwen3-8b': ModelConfig(vocab_size=151936, d_model=4096, n_layers=36, n_heads=32,
                            n_kv_heads=8, d_ff=12288, head_dim=128, norm_eps=1e-6,
                            rope_theta=1_000_000.0, qk_norm=True, max_position=40960,
                            scan_layers=True),
}


def get_preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise InputError(f'Unknown model preset {name!r}; choose from {sorted(PRESETS)}.')
  return PRESETS[name]
