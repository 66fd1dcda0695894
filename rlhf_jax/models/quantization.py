"""4-bit NormalFloat (NF4) weights, the frozen base of QLoRA (Dettmers et al. 2023).

A kernel W [..., in, out] is cut into blocks of `BLOCK` consecutive input rows per output
column; each block keeps its absolute maximum s (the scale) and each weight the index of the
NF4 level nearest to w / s:
  codes = argmin_k |w / s − q_k|   (uint4),   W ≈ q[codes] · s.
The 16 levels q_k are quantiles of N(0, 1) scaled to [−1, 1], with an exact zero: 8 positive
ones Φ⁻¹ of linspace(δ, 1/2, 9) without its last point and 7 negative ones of linspace(δ, 1/2,
8), δ = 0.9677083 (the paper's appendix E; bitsandbytes' `create_normal_map`). Codes keep the
kernel's shape, so its logical axes shard them; scales are [..., in / BLOCK, out]. Scales are
stored in float32 (the paper's double quantization of the scales is not done: 0.5 bits a
weight more).
"""

import statistics

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
_OFFSET = 0.9677083


def nf4_levels() -> np.ndarray:
  """The 16 NF4 levels in increasing order, from −1 to 1."""
  normal = statistics.NormalDist()
  positive = [normal.inv_cdf(p) for p in np.linspace(_OFFSET, 0.5, 9)[:-1]]
  negative = [-normal.inv_cdf(p) for p in np.linspace(_OFFSET, 0.5, 8)[:-1]]
  levels = np.sort(np.array(positive + [0.0] + negative))
  return (levels / np.abs(levels).max()).astype(np.float32)


def scales_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of a kernel's block scales: [..., in / BLOCK, out]."""
  *lead, d_in, d_out = shape
  return (*lead, -(-d_in // BLOCK), d_out)


def quantize(kernel) -> tuple[jax.Array, jax.Array]:
  """(uint4 codes of the kernel's shape, float32 block scales) of a [..., in, out] kernel.
  Traceable: under `jax.jit` with the kernel's sharding each device quantizes its shard. An
  input size that is not a multiple of BLOCK gets a last, shorter block."""
  kernel = jnp.asarray(kernel, jnp.float32)
  *lead, d_in, d_out = kernel.shape
  padded = -(-d_in // BLOCK) * BLOCK
  blocks = jnp.pad(kernel, [(0, 0)] * len(lead) + [(0, padded - d_in), (0, 0)]).reshape(
      *lead, padded // BLOCK, BLOCK, d_out)
  scales = jnp.abs(blocks).max(axis=-2)
  normalised = blocks / jnp.where(scales == 0, 1.0, scales)[..., None, :]
  levels = nf4_levels()
  midpoints = jnp.asarray((levels[1:] + levels[:-1]) / 2)
  codes = jnp.searchsorted(midpoints, normalised).reshape(*lead, padded, d_out)[..., :d_in, :]
  return codes.astype(jnp.uint4), scales


def dequantize(codes, scales, dtype):
  """W ≈ q[codes] · s in `dtype`: the kernel that the matmul uses (inside the jitted step)."""
  d_in = codes.shape[-2]
  values = jnp.asarray(nf4_levels(), dtype)[codes.astype(jnp.int32)]
  per_row = jnp.repeat(scales.astype(dtype), BLOCK, axis=-2)[..., :d_in, :]
  return values * per_row
