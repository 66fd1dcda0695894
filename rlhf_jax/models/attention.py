"""Attention behind `config.model.attention`; every implementation computes

    out_t = Σ_s softmax_s(q_t·k_s / √Dh) v_s      over the keys s that query t may attend.

- 'dense': `jax.nn.dot_product_attention` with a boolean [B, 1, T, S] mask.
- 'chunked': FlashAttention's tiling in plain JAX (Dao et al. 2022): queries in blocks, keys and
  values in blocks, an online softmax across key blocks (Milakov & Gimelshein 2018) and a
  backward pass that recomputes each block's probabilities from the saved row maxima and
  denominators. At most one [B, H, q_block, kv_block] block of scores exists at a time, forward
  or backward; its mask is built from positions, validity and segments, never cut from a
  [T, S] mask. In self-attention a query block skips the key blocks after its last query.
- 'splash': TPU splash attention (Pallas; `jax.experimental.pallas.ops.tpu.splash_attention`)
  for self-attention over a whole sequence: causal by index, with padding and packing as
  segment ids (and a local mask for a sliding window), each example's heads in one kernel,
  under `shard_map` over the batch on a mesh. A KV cache's steps fall back to 'dense'.
- 'cudnn': cuDNN's fused flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention(...,
  implementation='cudnn')`) for self-attention over a whole sequence: causal by index, with
  padding, segments and the window as an additive [B, 1, T, T] mask. A KV cache's steps fall
  back to 'dense'.
- 'auto' (the default): 'splash' on TPU (for sequences of a multiple of 128 tokens), 'cudnn' on
  CUDA GPUs (where its shapes and dtypes allow); where neither applies, 'chunked' for
  self-attention over 256 tokens or more (in small blocks on CPU), 'dense' below.

A query that may attend no key (a row of padding) gets the mean of the values it is shown: its
masked scores are dense attention's large negative number, not −∞. Finite, and unused; as
chunked and splash skip blocks that dense attention shows it, such outputs differ between them.
"""

import contextlib
import contextvars
import functools
import math
from typing import NamedTuple

import flax.struct
import jax
import jax.extend.backend
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel, splash_attention_mask as splash_mask)

from rlhf_jax.errors import InputError
from rlhf_jax.models.layers import make_attention_mask
from rlhf_jax.parallel import DEFAULT_RULES, logical_to_spec

# jax.nn.dot_product_attention's score for a masked key: −0.7 · float32 max.
_MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)


@flax.struct.dataclass
class AttentionMask:
  """Who may attend whom, kept per position: query t sees key s when `make_attention_mask`
  says so (causal by position, real key, same segment, within the sliding window)."""
  query_positions_BxT: jax.Array
  key_positions_BxS: jax.Array
  key_valid_BxS: jax.Array
  query_segments_BxT: jax.Array | None = None
  key_segments_BxS: jax.Array | None = None
  sliding_window: int | None = flax.struct.field(pytree_node=False, default=None)
  # Queries and keys are the same tokens (no KV cache): what splash attention computes.
  self_attention: bool = flax.struct.field(pytree_node=False, default=True)

  def dense(self) -> jax.Array:
    """Boolean [B, 1, T, S]."""
    return make_attention_mask(self.query_positions_BxT, self.key_positions_BxS,
                               self.key_valid_BxS, query_segment_BxT=self.query_segments_BxT,
                               key_segment_BxS=self.key_segments_BxS,
                               sliding_window=self.sliding_window)


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: AttentionMask, *,
           implementation: str) -> jax.Array:
  """[B, T, N, H] attention output; N query heads share each of the K key/value heads."""
  options = {}
  if implementation == 'auto':
    implementation, options = _auto(q_BxTxNxH, mask, current_platform())
  if implementation == 'splash' and mask.self_attention:
    return splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if implementation == 'cudnn' and mask.self_attention:
    if (platform := current_platform()) != 'cuda':
      raise InputError("config.model.attention='cudnn' needs an NVIDIA GPU (install "
                       f"jax[cuda12]); JAX runs on {platform}.")
    return cudnn_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
  if implementation == 'chunked':
    return chunked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, **options)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask.dense())


# 'auto' without a kernel: self-attention over at least CHUNKED_FROM tokens is 'chunked', on CPU
# in blocks of CPU_BLOCK (cache-sized, and each query block skips the key blocks after it).
# Forward and backward of the `small` shape's attention on this project's 2-core CPU
# (`python benchmarks/attention_speed.py`): dense 353 ms, chunked in blocks of 64 227 ms, of
# 512 369 ms; below 256 tokens the gain is smaller than chunked's longer compilation. On
# accelerators chunked (in its default blocks) is chosen for its memory, which stays linear
# in T, not for speed (unmeasured there).
CPU_BLOCK, CHUNKED_FROM = 64, 256


_TARGET_PLATFORM = contextvars.ContextVar('attention_target_platform', default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within it, 'auto' chooses for `platform` ('tpu', 'cuda', …), not for this machine: for
  programs compiled ahead of time for other hardware (`rlhf_jax.aot`)."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def current_platform() -> str:
  """'cpu', 'tpu', 'cuda' or 'rocm' (JAX's backend 'gpu' is either of the last two), or the
  platform being compiled for (`compiling_for`)."""
  if target := _TARGET_PLATFORM.get():
    return target
  backend = jax.default_backend()
  if backend == 'gpu':
    return 'cuda' if 'cuda' in jax.extend.backend.get_backend().platform_version else 'rocm'
  return backend


def _auto(q_BxTxNxH, mask: AttentionMask, platform: str) -> tuple[str, dict]:
  """(implementation, its options) for these queries on this platform: 'splash' on TPU
  (sequences of whole tiles), 'cudnn' on CUDA (where `cudnn_unsupported` finds nothing);
  otherwise 'chunked' for long self-attention (in CPU_BLOCK blocks on CPU), 'dense' below."""
  t = q_BxTxNxH.shape[1]
  if not mask.self_attention:
    return 'dense', {}
  if platform == 'tpu' and t % SPLASH_BLOCK == 0:
    return 'splash', {}
  if platform == 'cuda' and not cudnn_unsupported(q_BxTxNxH):
    return 'cudnn', {}
  if t >= CHUNKED_FROM:
    return 'chunked', {'q_block': CPU_BLOCK, 'kv_block': CPU_BLOCK} if platform == 'cpu' else {}
  return 'dense', {}


SPLASH_BLOCK = 128  # Splash attention's tiles span a multiple of 128 tokens.


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask: AttentionMask, *,
                     interpret: bool = False) -> jax.Array:
  """Self-attention [B, T, N, H] by TPU splash attention (`interpret`: Pallas's interpreter,
  on any backend, for tests).

  Causality by index equals causality by position within a segment, since positions grow
  with the index there. A sliding window is by index too: the same as dense's by position
  where no padding lies between a segment's tokens (every layout this project builds).
  Padding becomes a segment of its own (-1): no real token sees it, and each padding query
  sees at least itself (its output is unused).
  """
  b, t, n, h = q_BxTxNxH.shape
  if t % SPLASH_BLOCK:
    raise InputError(f"config.model.attention='splash' needs sequences of a multiple of "
                     f'{SPLASH_BLOCK} tokens (config.train.seq_len); got {t}.')
  segments = (mask.query_segments_BxT if mask.query_segments_BxT is not None
              else jnp.ones((b, t), jnp.int32))
  segments = jnp.where(mask.key_valid_BxS, segments, -1).astype(jnp.int32)
  kernel = _splash_kernel(t, n, mask.sliding_window, interpret)
  scale = 1 / math.sqrt(h)

  def per_example(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT):
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, heads, T, H].
    out = jax.vmap(kernel)(heads_first(q_BxTxNxH * scale).astype(q_BxTxNxH.dtype),
                           heads_first(k_BxTxKxH), heads_first(v_BxTxKxH),
                           splash_kernel.SegmentIds(q=segments_BxT, kv=segments_BxT))
    return jnp.swapaxes(out, 1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return per_example(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments)
  # The kernel is one Pallas call a device: each device runs its rows (heads gathered).
  batch = logical_to_spec(('activation_batch',), (b,), mesh, DEFAULT_RULES)[0]
  rows = jax.P(batch)
  return jax.shard_map(per_example, in_specs=(rows, rows, rows, rows), out_specs=rows,
                       check_vma=False)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments)


def _splash_kernel(t: int, n: int, sliding_window: int | None, interpret: bool):
  """The splash kernel of one example's n heads over t tokens: causal, or local."""
  if sliding_window is None:
    one_head = splash_mask.CausalMask((t, t))
  else:  # Keys at most sliding_window − 1 back, none ahead.
    one_head = splash_mask.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0)
  block = min(512, t) if t % min(512, t) == 0 else SPLASH_BLOCK
  sizes = splash_kernel.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash_kernel.make_splash_mha(splash_mask.MultiHeadMask([one_head] * n),
                                       block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                       interpret=interpret)


def cudnn_unsupported(q_BxTxNxH) -> str:
  """Why cuDNN's flash attention cannot train on these queries ('' when it can): it takes
  bfloat16 or float16, heads of a multiple of 8 up to 128 dimensions (256 from Hopper on, not
  counted on here), and, with a mask, an even number of tokens."""
  _, t, _, h = q_BxTxNxH.shape
  if q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
    return f'bfloat16 or float16 (config.model.dtype), not {q_BxTxNxH.dtype}'
  if h % 8 or h > 128:
    return f'heads of a multiple of 8 up to 128 dimensions, not {h}'
  if t % 2:
    return f'an even number of tokens (config.train.seq_len), not {t}'
  return ''


def cudnn_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask: AttentionMask, *,
                    implementation: str = 'cudnn') -> jax.Array:
  """Self-attention [B, T, N, H] by cuDNN's fused flash attention (Dao 2023's algorithm,
  NVIDIA's kernel; `implementation='xla'`: JAX's reference for the same call, on any backend,
  for tests).

  cuDNN's own mask forms (causal by index, right padding as lengths, a window back by index)
  cannot say left padding or packing. So the call is causal by index, which lets the kernel
  skip the tiles above the diagonal, and also takes dense attention's [B, 1, T, T] mask, which
  cuDNN adds to the scores as a bias: exact for every layout, at the cost of reading one
  [T, T] bias a row (not a head), and in the backward pass of writing its gradient (JAX's
  cuDNN rule always returns it; unused). The window is in that mask, so no tile is skipped for
  it.
  """
  reason = cudnn_unsupported(q_BxTxNxH)
  if reason and implementation == 'cudnn':
    raise InputError(f"config.model.attention='cudnn' needs {reason}.")
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask.dense(),
                                      is_causal=True, implementation=implementation)


class _QueryBlocks(NamedTuple):
  positions: jax.Array  # [T / q_block, B, q_block].
  segments: jax.Array | None


class _KeyBlocks(NamedTuple):
  positions: jax.Array  # [S / kv_block, B, kv_block].
  valid: jax.Array
  segments: jax.Array | None
  in_range: jax.Array  # False for the keys added to fill the last block.


def chunked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: AttentionMask, *,
                      q_block: int = 512, kv_block: int = 512) -> jax.Array:
  """Dense attention's output [B, T, N, H], one [B, N, q_block, kv_block] block of scores at a
  time.

  Blocks are clipped to T and S, which need not be multiples of them: the last blocks are
  filled with queries whose outputs are dropped and keys no query attends. Grouped-query heads
  share keys and values without copies: the N = K·G query heads are reshaped into K groups of G.
  In self-attention, causal by index as splash's, a query block skips the key blocks that
  start after its last query (about half of them): a query of padding then sees fewer keys
  than dense attention gives it, so its (unused) output differs; every real query's is the same.
  """
  b, t, n, h = q_BxTxNxH.shape
  kv_heads, s = k_BxSxKxH.shape[2], k_BxSxKxH.shape[1]
  q_block, kv_block = min(q_block, t), min(kv_block, s)
  query_blocks = functools.partial(_blocks, block=q_block)
  key_blocks = functools.partial(_blocks, block=kv_block)
  queries = _QueryBlocks(query_blocks(mask.query_positions_BxT),
                         query_blocks(mask.query_segments_BxT))
  keys = _KeyBlocks(key_blocks(mask.key_positions_BxS), key_blocks(mask.key_valid_BxS),
                    key_blocks(mask.key_segments_BxS),
                    key_blocks(jnp.ones(mask.key_valid_BxS.shape, jnp.bool_)))
  n_key_blocks = -(-s // kv_block)
  seen = tuple(min(n_key_blocks, ((i + 1) * q_block - 1) // kv_block + 1) if mask.self_attention
               else n_key_blocks for i in range(-(-t // q_block)))
  q_blocks = query_blocks(q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h))
  out_blocks = _flash_attention(_Tiling(mask.sliding_window, seen), q_blocks,
                                key_blocks(k_BxSxKxH), key_blocks(v_BxSxKxH), queries, keys)
  return jnp.moveaxis(out_blocks, 0, 1).reshape(b, -1, n, h)[:, :t]


class _Tiling(NamedTuple):
  """What the blocks' loops need to know statically: the sliding window, and how many key
  blocks (from the first) each query block sees."""
  sliding_window: int | None
  key_blocks_seen: tuple[int, ...]


def _blocks(x_BxL, *, block: int):
  """[B, L, ...] → [⌈L / block⌉, B, block, ...], the last block filled with zeros (False)."""
  if x_BxL is None:
    return None
  fill = -x_BxL.shape[1] % block
  x = jnp.pad(x_BxL, [(0, 0), (0, fill)] + [(0, 0)] * (x_BxL.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _block_scores(q_BxQxKxGxH, k_BxCxKxH, queries, keys, sliding_window):
  """Scores q·k / √H [B, K, G, Q, C] in float32 (masked: `_MASKED_SCORE`) and the mask."""
  scores = jnp.einsum('bqkgh,bckh->bkgqc', q_BxQxKxGxH, k_BxCxKxH,
                      preferred_element_type=jnp.float32)
  scores *= 1 / math.sqrt(q_BxQxKxGxH.shape[-1])
  may_attend = make_attention_mask(queries.positions, keys.positions, keys.valid,
                                   query_segment_BxT=queries.segments,
                                   key_segment_BxS=keys.segments,
                                   sliding_window=sliding_window)[:, :, None]
  return jnp.where(may_attend, scores, _MASKED_SCORE), may_attend


def _probabilities(scores, keys, row_max):
  """exp(score − row max), 0 for the keys that only fill the last block."""
  return jnp.where(keys.in_range[:, None, None, None], jnp.exp(scores - row_max[..., None]), 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_attention(tiling: _Tiling, q_blocks, k_blocks, v_blocks, queries, keys):
  """Output blocks [T / q_block, B, q_block, K, G, H] of blocked queries, keys and values."""
  return _flash_forward(tiling, q_blocks, k_blocks, v_blocks, queries, keys)[0]


def _block(j, *blocks):
  """Block j (an index, traced or not) of each [L / block, ...] argument."""
  return jax.tree.map(lambda x: x[j], blocks)


def _flash_forward(tiling: _Tiling, q_blocks, k_blocks, v_blocks, queries, keys):
  """For each query block, an online softmax over the key blocks it sees (Milakov &
  Gimelshein 2018):

      m' = max(m, max_c s_c),  l' = l·e^(m − m') + Σ_c e^(s_c − m'),
      acc' = acc·e^(m − m') + Σ_c e^(s_c − m') v_c,   out = acc / l.

  Returns the output blocks and each row's final m and l (the backward pass's statistics).
  """
  def one_query_block(_, query_block):
    q, query, seen = query_block
    b, q_len, kv_heads, groups, h = q.shape

    def one_key_block(j, carry):
      row_max, denominator, acc = carry
      k, v, key = _block(j, k_blocks, v_blocks, keys)
      scores, _ = _block_scores(q, k, query, key, tiling.sliding_window)
      new_max = jnp.maximum(row_max, scores.max(-1))
      probs = _probabilities(scores, key, new_max)
      rescale = jnp.exp(row_max - new_max)
      denominator = denominator * rescale + probs.sum(-1)
      acc = acc * rescale[..., None] + jnp.einsum(
          'bkgqc,bckh->bkgqh', probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
      return new_max, denominator, acc

    stats_shape = (b, kv_heads, groups, q_len)
    init = (jnp.full(stats_shape, _MASKED_SCORE, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(stats_shape + (h,), jnp.float32))
    row_max, denominator, acc = jax.lax.fori_loop(0, seen, one_key_block, init)
    out = jnp.einsum('bkgqh->bqkgh', acc / denominator[..., None]).astype(q.dtype)
    return None, (out, row_max, denominator)

  return jax.lax.scan(one_query_block, None,
                      (q_blocks, queries, jnp.asarray(tiling.key_blocks_seen)))[1]


def _flash_attention_fwd(tiling: _Tiling, q_blocks, k_blocks, v_blocks, queries, keys):
  out, row_max, denominator = _flash_forward(tiling, q_blocks, k_blocks, v_blocks, queries,
                                             keys)
  return out, (q_blocks, k_blocks, v_blocks, queries, keys, out, row_max, denominator)


def _flash_attention_bwd(tiling: _Tiling, residuals, dout_blocks):
  """FlashAttention-2's backward pass (Dao 2023), block by block, with P recomputed:

      P = e^(s − m) / l,  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),
      dQ = dS K / √H,  dK = dSᵀ Q / √H   (dS = 0 where the mask forbids).
  """
  q_blocks, k_blocks, v_blocks, queries, keys, out_blocks, max_blocks, denom_blocks = residuals
  scale = 1 / math.sqrt(q_blocks.shape[-1])

  def one_query_block(dk_dv, query_block):
    q, query, out, dout, row_max, denominator, seen = query_block
    dout_dot_out = jnp.einsum('bqkgh,bqkgh->bkgq', dout, out,
                              preferred_element_type=jnp.float32)

    def one_key_block(j, carry):
      dq, dk, dv = carry
      k, v, key = _block(j, k_blocks, v_blocks, keys)
      scores, may_attend = _block_scores(q, k, query, key, tiling.sliding_window)
      probs = _probabilities(scores, key, row_max) / denominator[..., None]
      dv = dv.at[j].add(jnp.einsum('bkgqc,bqkgh->bckh', probs, dout,
                                   preferred_element_type=jnp.float32))
      dprobs = jnp.einsum('bqkgh,bckh->bkgqc', dout, v, preferred_element_type=jnp.float32)
      dscores = jnp.where(may_attend, probs * (dprobs - dout_dot_out[..., None]), 0) * scale
      dq = dq + jnp.einsum('bkgqc,bckh->bqkgh', dscores, k, preferred_element_type=jnp.float32)
      dk = dk.at[j].add(jnp.einsum('bkgqc,bqkgh->bckh', dscores, q,
                                   preferred_element_type=jnp.float32))
      return dq, dk, dv

    dq, *dk_dv = jax.lax.fori_loop(0, seen, one_key_block,
                                   (jnp.zeros(q.shape, jnp.float32), *dk_dv))
    return tuple(dk_dv), dq

  zeros = jnp.zeros(k_blocks.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(
      one_query_block, (zeros, zeros),
      (q_blocks, queries, out_blocks, dout_blocks, max_blocks, denom_blocks,
       jnp.asarray(tiling.key_blocks_seen)))
  return (dq.astype(q_blocks.dtype), dk.astype(k_blocks.dtype), dv.astype(v_blocks.dtype),
          None, None)


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)
