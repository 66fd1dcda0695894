"""Architecture description of a decoder-only transformer.

One frozen dataclass covers the Llama family (Llama, Mistral, Qwen2: RMSNorm, RoPE, SwiGLU,
grouped-query attention) and GPT-2 (LayerNorm, learned positions, GELU MLP, biases). It is
hashable, so it can be a static argument of `jax.jit`.
"""

import dataclasses
from typing import Literal

import jax.numpy as jnp

from rlhf_jax.errors import InputError

ATTENTION_IMPLEMENTATIONS = ('dense', 'chunked', 'auto')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of `Transformer`. Field names follow the shapes they set."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int | None = None  # Defaults to d_model // n_heads.
  # Family switches.
  norm: Literal['rms', 'layer'] = 'rms'
  norm_eps: float = 1e-6
  position: Literal['rope', 'learned'] = 'rope'
  rope_theta: float = 10_000.0
  # Llama-3 style RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor,
  # original_max_position); None for plain RoPE.
  rope_llama3_scaling: tuple[float, float, float, int] | None = None
  max_position: int = 2048  # Size of the learned position table (GPT-2).
  mlp: Literal['swiglu', 'gelu'] = 'swiglu'
  qkv_bias: bool = False  # Qwen2: bias on q, k, v projections.
  out_bias: bool = False  # GPT-2: bias on attention output and every MLP projection.
  tie_embeddings: bool = False
  sliding_window: int | None = None  # Mistral: keys further back than this are masked.
  # Head: 'lm' gives next-token logits [B, T, V]; 'scalar' gives one value per token [B, T]
  # (reward model / value model).
  head: Literal['lm', 'scalar'] = 'lm'
  # Numerics: parameters are stored in `param_dtype` (the f32 master weights) and cast to
  # `dtype` for the matmuls; norms, softmax and logits are computed in float32.
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: bool = False  # Recompute each block's activations in the backward pass.
  # How attention is computed (`rlhf_jax.models.attention`); 'chunked' holds no [T, S] scores.
  attention: Literal['dense', 'chunked', 'auto'] = 'dense'

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise InputError(f'config.model.attention={self.attention!r}; choose one of '
                       f'{ATTENTION_IMPLEMENTATIONS}.')
    if self.n_heads % self.n_kv_heads:
      raise InputError(
          f'n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}.')

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  def num_params(self, *, embeddings: bool = True) -> int:
    """Number of parameters; `embeddings=False` leaves out token/position tables."""
    d, hd, f = self.d_model, self.resolved_head_dim, self.d_ff
    attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
    attn += (self.n_heads + 2 * self.n_kv_heads) * hd if self.qkv_bias else 0
    attn += d if self.out_bias else 0
    mlp = d * f * (3 if self.mlp == 'swiglu' else 2)
    mlp += (f + d) if self.out_bias else 0
    norm = d * (2 if self.norm == 'layer' else 1)
    block = attn + mlp + 2 * norm
    total = self.n_layers * block + norm
    if self.head == 'lm' and not self.tie_embeddings:
      total += d * self.vocab_size
    elif self.head == 'scalar':
      total += d
    if embeddings:
      total += self.vocab_size * d
      total += self.max_position * d if self.position == 'learned' else 0
    return total

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (PaLM, Chowdhery 2022, appendix B).

    6·N for the matmuls with the non-embedding parameters N (the LM head included), plus
    12·L·T·H·Dh for attention scores and weighted values (no discount for causal masking).
    """
    n = self.num_params(embeddings=False)
    if self.head == 'lm' and self.tie_embeddings:
      n += self.d_model * self.vocab_size
    return 6 * n + 12 * self.n_layers * seq_len * self.n_heads * self.resolved_head_dim
