"""Architecture description of a decoder-only transformer.

One frozen dataclass covers the Llama family (Llama, Mistral, Qwen2: RMSNorm, RoPE, SwiGLU,
grouped-query attention) and GPT-2 (LayerNorm, learned positions, GELU MLP, biases). It is
hashable, so it can be a static argument of `jax.jit`.
"""

import dataclasses
from typing import Literal

import jax.numpy as jnp

from rlhf_jax.errors import InputError

ATTENTION_IMPLEMENTATIONS = ('dense', 'chunked', 'splash', 'cudnn', 'auto')
# Fields a checkpoint's config.json does not hold and a run's config.model sets: how the
# architecture is computed and stored, and the LoRA adapters trained on it.
RUN_FIELDS = ('dtype', 'param_dtype', 'remat', 'attention', 'scan_layers', 'lora_rank',
              'lora_alpha', 'lora_targets', 'quantize_base')
# The projections LoRA can adapt (attention's q, k, v, o; the MLP's gate, up, down).
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
# The run fields of a frozen or merged model: no adapters, nor an NF4 base (which only adapters
# train over).
NO_ADAPTERS = {'lora_rank': 0, 'quantize_base': ''}
# What a block keeps for the backward pass (`rlhf_jax.models.transformer.REMAT_POLICIES`).
REMAT_POLICIES = ('none', 'full', 'minimal', 'save_qkv_proj')


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
  # Recompute a block's activations in the backward pass: 'none' keeps them all, 'full' keeps
  # only the block's input, 'minimal' also every weight matmul's output, 'save_qkv_proj' also
  # the q, k, v projections. True and False read as 'full' and 'none'.
  remat: str = 'none'
  # Blocks stored stacked on a leading 'layers' axis and run by `jax.lax.scan`: one block is
  # compiled, whatever the depth.
  scan_layers: bool = False
  # Qwen3: RMSNorm over each head's queries and keys before RoPE.
  qk_norm: bool = False
  # LoRA (Hu et al. 2021, `rlhf_jax.models.lora`): rank r > 0 adds W + (α / r)·A·B to each
  # `lora_targets` projection and trains only A and B (and a scalar or value head, in full); 0:
  # no adapters.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  # QLoRA (Dettmers et al. 2023, `rlhf_jax.models.quantization`): 'nf4' stores the frozen
  # kernels of every block projection in 4-bit NormalFloat with float32 scales per 64 weights;
  # '': in param_dtype. Needs lora_rank > 0 (a quantized base is never trained).
  quantize_base: str = ''
  # How attention is computed (`rlhf_jax.models.attention`); 'chunked' holds no [T, S] scores,
  # 'splash' is TPU's Pallas kernel, 'cudnn' NVIDIA's fused kernel, 'auto' splash on TPU, cudnn
  # on CUDA GPUs, else chunked for long sequences and dense for short ones.
  attention: Literal['dense', 'chunked', 'splash', 'cudnn', 'auto'] = 'auto'

  def __post_init__(self):
    if isinstance(self.remat, bool):
      object.__setattr__(self, 'remat', 'full' if self.remat else 'none')
    if self.remat not in REMAT_POLICIES:
      raise InputError(f'config.model.remat={self.remat!r}; choose one of {REMAT_POLICIES}.')
    object.__setattr__(self, 'lora_targets', tuple(self.lora_targets))
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown or self.lora_rank < 0 or (self.lora_rank and not self.lora_targets):
      raise InputError(f'config.model.lora_targets={self.lora_targets!r}, lora_rank='
                       f'{self.lora_rank}: targets are among {LORA_TARGETS} (one at least '
                       'with a rank > 0), the rank >= 0.')
    if self.quantize_base not in ('', 'nf4') or (self.quantize_base and not self.lora_rank):
      raise InputError(f'config.model.quantize_base={self.quantize_base!r}: "nf4" (QLoRA, with '
                       f'config.model.lora_rank > 0; it is {self.lora_rank}) or "".')
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
    """Number of base parameters (no LoRA adapters); `embeddings=False` leaves out
    token/position tables."""
    d, hd, f = self.d_model, self.resolved_head_dim, self.d_ff
    attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
    attn += (self.n_heads + 2 * self.n_kv_heads) * hd if self.qkv_bias else 0
    attn += d if self.out_bias else 0
    attn += 2 * hd if self.qk_norm else 0
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

  def flops_per_token(self, seq_len: int, *, forward_only: bool = False) -> float:
    """Training FLOPs per token, forward + backward (PaLM, Chowdhery 2022, appendix B).

    The forward pass is 2·N for the matmuls with the non-embedding parameters N (the LM head
    included) plus 4·L·T·H·Dh for attention scores and weighted values (no discount for
    causal masking). The backward pass takes twice the forward for the activations' gradients
    and 2·N more for the weights' (6·N + 12·L·T·H·Dh in all), except for a LoRA model, whose
    base weights get no gradient (4·N + 12·L·T·H·Dh; the adapters' own FLOPs are left out).
    """
    n = self.num_params(embeddings=False)
    if self.head == 'lm' and self.tie_embeddings:
      n += self.d_model * self.vocab_size
    forward = 2 * n + 4 * self.n_layers * seq_len * self.n_heads * self.resolved_head_dim
    if forward_only:
      return forward
    return 3 * forward - (2 * n if self.lora_rank else 0)
