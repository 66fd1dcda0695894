"""Building blocks of the transformer: parameters with logical axes, norms, RoPE, masks.

Every parameter is an `nnx.Param` whose metadata `logical_axes` names its dimensions
(`vocab`, `embed`, `heads`, `kv_heads`, `mlp`, or None). `rlhf_jax.parallel` maps those names
to mesh axes with the rules table of the config; nothing here knows about meshes.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models import quantization
from rlhf_jax.models.config import ModelConfig

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype,
          kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  return kind(init(rngs.params(), shape, dtype), logical_axes=axes)


class LoRAParam(nnx.Param):
  """A factor of a LoRA adapter: what a LoRA run trains (`rlhf_jax.models.lora`)."""


class HeadParam(nnx.Param):
  """A parameter of a scalar output layer (a reward or value model's head, a value head on a
  policy): new to fine-tuning, so a LoRA run trains it in full, as PEFT's modules_to_save."""


class Dense(nnx.Module):
  """y = x·W (+ b), W stored [in, out] in `param_dtype` and used in the compute dtype.

  With `lora_rank` r > 0 (Hu et al. 2021): y = x·W + (α / r)·(x·A)·B (+ b), A [in, r] drawn
  N(0, 1/in), B [r, out] zero (so the adapted layer starts as the base one), both float32.
  `kind`: the type of W and b (`HeadParam` for a scalar head). `quantized`: W frozen in NF4
  (QLoRA), kept as `kernel_codes` and `kernel_scales` (`quantization`), no `kernel`.
  """

  def __init__(self, d_in: int, d_out: int, axes: Axes, *, bias: bool, cfg: ModelConfig,
               rngs: nnx.Rngs, lora_rank: int = 0, kind: type[nnx.Param] = nnx.Param,
               quantized: bool = False):
    if quantized:
      codes, scales = quantization.quantize(nnx.initializers.normal(0.02)(
          rngs.params(), (d_in, d_out), jnp.float32))
      self.kernel_codes = nnx.Param(codes, logical_axes=axes)
      self.kernel_scales = nnx.Param(scales, logical_axes=axes)
    else:
      self.kernel = param(rngs, nnx.initializers.normal(0.02), (d_in, d_out), axes,
                          cfg.param_dtype, kind)
    self.bias = (param(rngs, nnx.initializers.zeros, (d_out,), axes[1:], cfg.param_dtype, kind)
                 if bias else None)
    self.lora_a = (LoRAParam(nnx.initializers.normal(d_in ** -0.5)(
        rngs.params(), (d_in, lora_rank), jnp.float32), logical_axes=(axes[0], None))
                   if lora_rank else None)
    self.lora_b = (LoRAParam(jnp.zeros((lora_rank, d_out), jnp.float32),
                             logical_axes=(None, axes[1])) if lora_rank else None)
    self.lora_scale = cfg.lora_alpha / lora_rank if lora_rank else 0.0
    self.dtype = cfg.compute_dtype

  def __call__(self, x):
    x = x.astype(self.dtype)
    return self.adapt(x, jnp.dot(x, self.weight()))

  def adapt(self, x, y):
    """The base output y = x·W plus the adapter's (α / r)·(x·A)·B and the bias."""
    if self.lora_a is not None:
      down = jnp.dot(x, self.lora_a[...].astype(self.dtype))
      y = y + self.lora_scale * jnp.dot(down, self.lora_b[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def weight(self):
    """W in the compute dtype (an NF4 kernel dequantized)."""
    if hasattr(self, 'kernel_codes'):
      return quantization.dequantize(self.kernel_codes[...], self.kernel_scales[...],
                                     self.dtype)
    return self.kernel[...].astype(self.dtype)


def shared_input_projections(x, denses: Sequence[Dense]) -> list[jax.Array]:
  """[dense(x) for dense in denses] (projections of one input to one width, like SwiGLU's gate
  and up), their base matmuls done as one over the kernels stacked [in, k, out].

  The same products and gradients, but XLA:CPU compiles the weight gradients of k matmuls of
  one input (jnp.dot's, contracting batch and sequence) into copies of the output gradients
  transposed; one matmul whose dW = xᵀ·dy is a 2-D matmul of x and dy flattened to [tokens,
  features] needs none (`_stacked_matmul`). Forward and backward at the `small` shape, 8 × 512
  tokens, on this project's CPU: stacking took the RM step from 9.05 s to 7.61 s, the
  flattened dW the SFT step from 4.30 s to 3.77 s. Single projections gain nothing from the
  flattened dW at that shape and lose at the playground's, so they keep jnp.dot.
  """
  x = x.astype(denses[0].dtype)
  kernels_ixkxo = jnp.stack([d.weight() for d in denses], 1)
  outputs_Xxkxo = _stacked_matmul(x, kernels_ixkxo.reshape(x.shape[-1], -1)).reshape(
      *x.shape[:-1], *kernels_ixkxo.shape[1:])
  return [d.adapt(x, outputs_Xxkxo[..., i, :]) for i, d in enumerate(denses)]


@jax.custom_vjp
def _stacked_matmul(x_Xxi, kernel_ixo):
  """x·W [..., out] with jnp.dot's gradients: dx = dy·Wᵀ, dW = xᵀ·dy over every token."""
  return jnp.dot(x_Xxi, kernel_ixo)


def _stacked_matmul_fwd(x_Xxi, kernel_ixo):
  return jnp.dot(x_Xxi, kernel_ixo), (x_Xxi, kernel_ixo)


def _stacked_matmul_bwd(residuals, dy_Xxo):
  x_Xxi, kernel_ixo = residuals
  x_Nxi, dy_Nxo = x_Xxi.reshape(-1, x_Xxi.shape[-1]), dy_Xxo.reshape(-1, dy_Xxo.shape[-1])
  return jnp.dot(dy_Xxo, kernel_ixo.T), jnp.dot(x_Nxi.T, dy_Nxo).astype(kernel_ixo.dtype)


_stacked_matmul.defvjp(_stacked_matmul_fwd, _stacked_matmul_bwd)


class Norm(nnx.Module):
  """RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba 2016) over the last axis (`dim`, default
  d_model), computed in float32.

  rms:   y = x / sqrt(mean(x²) + eps) · w
  layer: y = (x − mean(x)) / sqrt(var(x) + eps) · w + b
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dim: int | None = None):
    d = dim or cfg.d_model
    self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, cfg.compute_dtype
    self.scale = param(rngs, nnx.initializers.ones, (d,), ('norm',), cfg.param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (d,), ('norm',), cfg.param_dtype)
                 if cfg.norm == 'layer' else None)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    if self.kind == 'layer':
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    y = x * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> jax.Array:
  """θ_i = theta^(−2i/Dh) (Su 2021), with Llama 3's frequency-dependent scaling if set."""
  hd = cfg.resolved_head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  if cfg.rope_llama3_scaling is None:
    return inv_freq
  factor, low_freq_factor, high_freq_factor, original_max = cfg.rope_llama3_scaling
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = original_max / low_freq_factor
  high_freq_wavelen = original_max / high_freq_factor
  smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array):
  """Rotates feature pairs (i, i + Dh/2) by angle position·θ_i (the HF 'rotate_half' layout)."""
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  cos, sin = jnp.cos(angles_BxTxH2)[:, :, None], jnp.sin(angles_BxTxH2)[:, :, None]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxNxH.dtype)


def make_attention_mask(query_pos_BxT, key_pos_BxS, key_valid_BxS, *, query_segment_BxT=None,
                   key_segment_BxS=None, sliding_window=None) -> jax.Array:
  """Boolean [B, 1, T, S]: query t may attend key s.

  Causality is decided on positions within each sequence, so it holds for left padding, right
  padding, packed segments and a KV cache alike. A padding query may see no key at all; the
  softmax then spreads uniformly (no NaN) and its output is ignored downstream.
  """
  q, k = query_pos_BxT[:, :, None], key_pos_BxS[:, None, :]
  mask = (k <= q) & key_valid_BxS[:, None, :]
  if query_segment_BxT is not None:
    mask &= query_segment_BxT[:, :, None] == key_segment_BxS[:, None, :]
  if sliding_window is not None:
    mask &= q - k < sliding_window
  return mask[:, None]


def positions_from_mask(attention_mask_BxT: jax.Array) -> jax.Array:
  """Position of each token among the real tokens of its row (0 for leading padding)."""
  return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)
