"""Decoder-only transformer in Flax NNX: Llama / Mistral / Qwen2 and GPT-2 from one config.

    x = embed(tokens) (+ pos_embed(positions))
    for each block:  x += attn(norm_1(x));  x += mlp(norm_2(x))      (pre-norm)
    h = norm_f(x)
    head: logits = h·W_vocab (LM)   or   value = h·w (scalar: reward / value model)

Padding is described by `attention_mask` [B, T] (1 = real token, left or right padding) and
positions default to the rank of each real token in its row, so a padded batch gives each
sequence the logits it would get alone. `segment_ids` keep packed examples apart.
Incremental decoding goes through `KVCache`: `init_cache`, then `step` for the prompt (prefill)
and again for each new token; both compile once under `jax.jit`.

With `scan_layers` the blocks are one `Block` whose parameters carry a leading 'layers' axis
(n_layers), run by `jax.lax.scan`: XLA compiles one block, not n_layers copies. `remat` picks
what each block keeps for the backward pass (`REMAT_POLICIES`, MaxText's names).
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from rlhf_jax.errors import InputError
from rlhf_jax.models.attention import AttentionMask, attend
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import (Dense, HeadParam, Norm, apply_rope, param,
                                    positions_from_mask, rope_inverse_frequencies,
                                    shared_input_projections)
from rlhf_jax.parallel import constrain


_RESIDUAL_AXES = ('activation_batch', 'activation_length', 'activation_embed')
_Q_AXES = ('activation_batch', 'activation_length', 'activation_heads', None)
_KV_AXES = ('activation_batch', 'activation_length', 'activation_kv_heads', None)
_MLP_AXES = ('activation_batch', 'activation_length', 'activation_mlp')
_LOGITS_AXES = ('activation_batch', 'activation_length', 'activation_vocab')

# config.remat → what `jax.checkpoint` keeps of a block for the backward pass ('none': no
# checkpoint, everything kept). 'minimal' keeps the outputs of the weight matmuls, not those
# of attention's batched score and value matmuls.
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_qkv_proj': jax.checkpoint_policies.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj'),
}


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for S slots, filled left to right.

  `end` is the next free slot (the same for all rows: prompts are left-padded); a row's
  positions continue from its number of valid slots. S must cover prompt + generated tokens.
  """
  # Per layer [B, S, K, Dh]; with scan_layers one array [n_layers, B, S, K, Dh].
  keys: tuple[jax.Array, ...] | jax.Array
  values: tuple[jax.Array, ...] | jax.Array
  key_positions_BxS: jax.Array
  key_valid_BxS: jax.Array
  end: jax.Array  # int32 scalar.

  def write(self, positions_BxT, valid_BxT) -> 'KVCache':
    """Marks the next T slots as holding tokens at these positions."""
    start = (0, self.end)
    return self.replace(
        key_positions_BxS=jax.lax.dynamic_update_slice(
            self.key_positions_BxS, positions_BxT.astype(jnp.int32), start),
        key_valid_BxS=jax.lax.dynamic_update_slice(self.key_valid_BxS, valid_BxT, start))


def _projection(name: str, d_in: int, d_out: int, axes, *, bias: bool, cfg: ModelConfig,
                rngs: nnx.Rngs) -> Dense:
  """The projection `name` ('q', ..., 'down'), with a LoRA adapter if cfg targets it, its
  kernel in NF4 with cfg.quantize_base."""
  lora_rank = cfg.lora_rank if name in cfg.lora_targets else 0
  return Dense(d_in, d_out, axes, bias=bias, cfg=cfg, rngs=rngs, lora_rank=lora_rank,
               quantized=bool(cfg.quantize_base))


class Attention(nnx.Module):
  """Multi-head attention with grouped-query keys/values (Ainslie 2023) and RoPE (Su 2021)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, hd = cfg.d_model, cfg.resolved_head_dim
    self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
    dense = functools.partial(_projection, cfg=cfg, rngs=rngs)
    self.q = dense('q', d, cfg.n_heads * hd, ('embed', 'heads'), bias=cfg.qkv_bias)
    self.k = dense('k', d, cfg.n_kv_heads * hd, ('embed', 'kv_heads'), bias=cfg.qkv_bias)
    self.v = dense('v', d, cfg.n_kv_heads * hd, ('embed', 'kv_heads'), bias=cfg.qkv_bias)
    self.o = dense('o', cfg.n_heads * hd, d, ('heads', 'embed'), bias=cfg.out_bias)
    self.q_norm = Norm(cfg, rngs, dim=hd) if cfg.qk_norm else None
    self.k_norm = Norm(cfg, rngs, dim=hd) if cfg.qk_norm else None
    self.cfg = cfg

  def __call__(self, x_BxTxD, positions_BxT, mask: AttentionMask, kv_cache=None,
               cache_end=None):
    b, t, _ = x_BxTxD.shape
    project = lambda dense, heads, name, axes: constrain(
        checkpoint_name(dense(x_BxTxD), name).reshape(b, t, heads, self.head_dim), axes)
    q = project(self.q, self.n_heads, 'query_proj', _Q_AXES)
    k = project(self.k, self.n_kv_heads, 'key_proj', _KV_AXES)
    v = project(self.v, self.n_kv_heads, 'value_proj', _KV_AXES)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.cfg.position == 'rope':
      inv_freq = rope_inverse_frequencies(self.cfg)
      q = apply_rope(q, positions_BxT, inv_freq)
      k = apply_rope(k, positions_BxT, inv_freq)
    if kv_cache is not None:
      cached_k, cached_v = kv_cache
      start = (0, cache_end, 0, 0)
      k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), start)
      v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), start)
      kv_cache = (k, v)
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                 implementation=self.cfg.attention)
    return self.o(out.reshape(b, t, -1)), kv_cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) · up(x)) (Shazeer 2020), or GPT-2's down(gelu(up(x)))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    dense = functools.partial(_projection, cfg=cfg, rngs=rngs, bias=cfg.out_bias)
    self.gate = dense('gate', d, f, ('embed', 'mlp')) if cfg.mlp == 'swiglu' else None
    self.up = dense('up', d, f, ('embed', 'mlp'))
    self.down = dense('down', f, d, ('mlp', 'embed'))

  def __call__(self, x):
    if self.gate is not None:
      gate, up = shared_input_projections(x, (self.gate, self.up))
      hidden = jax.nn.silu(gate) * up
    else:
      hidden = jax.nn.gelu(self.up(x), approximate=True)
    return self.down(constrain(hidden, _MLP_AXES))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = Norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, mask, kv_cache=None, cache_end=None):
    attn_out, kv_cache = self.attn(self.attn_norm(x), positions, mask, kv_cache, cache_end)
    x = x + attn_out
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, _RESIDUAL_AXES), kv_cache


class Transformer(nnx.Module):
  """The model: `model(tokens, attention_mask=mask)` → logits [B, T, V] or values [B, T]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt, d = cfg.param_dtype, cfg.d_model
    self.embed = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, d),
                       ('vocab', 'embed'), pdt)
    self.pos_embed = (param(rngs, nnx.initializers.normal(0.01), (cfg.max_position, d),
                            (None, 'embed'), pdt) if cfg.position == 'learned' else None)
    self.blocks = (stacked_blocks(cfg, rngs) if cfg.scan_layers else
                   nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)]))
    self.final_norm = Norm(cfg, rngs)
    if cfg.head == 'scalar':
      self.head = Dense(d, 1, ('embed', None), bias=False, cfg=cfg, rngs=rngs, kind=HeadParam)
    elif not cfg.tie_embeddings:
      self.head = Dense(d, cfg.vocab_size, ('embed', 'vocab'), bias=False, cfg=cfg, rngs=rngs)
    else:
      self.head = None

  def __call__(self, tokens_BxT, *, attention_mask=None, positions=None, segment_ids=None):
    hidden, _ = self.hidden_states(tokens_BxT, attention_mask=attention_mask,
                                   positions=positions, segment_ids=segment_ids)
    return self.apply_head(hidden)

  def hidden_states(self, tokens_BxT, *, attention_mask=None, positions=None,
                    segment_ids=None, cache: KVCache | None = None):
    """Final-norm hidden states [B, T, D] (and the updated cache when one is given)."""
    cfg = self.cfg
    if attention_mask is None:
      attention_mask = jnp.ones(tokens_BxT.shape, jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    if positions is None:
      positions = positions_from_mask(attention_mask)
      if cache is not None:
        positions += cache.key_valid_BxS.sum(-1, dtype=jnp.int32)[:, None]
    if cache is None:
      mask = AttentionMask(positions, positions, attention_mask, query_segments_BxT=segment_ids,
                           key_segments_BxS=segment_ids, sliding_window=cfg.sliding_window)
    else:
      if segment_ids is not None:
        raise InputError('segment_ids (packing) cannot be combined with a KV cache.')
      cache = cache.write(positions, attention_mask)
      mask = AttentionMask(positions, cache.key_positions_BxS, cache.key_valid_BxS,
                           sliding_window=cfg.sliding_window, self_attention=False)

    # Tables gathered over `fsdp` first, so the lookups give batch-sharded rows.
    table = constrain(self.embed[...], ('vocab', None))
    x = jnp.take(table, tokens_BxT, axis=0).astype(cfg.compute_dtype)
    if self.pos_embed is not None:
      table = constrain(self.pos_embed[...], (None, None))
      x = x + jnp.take(table, positions, axis=0).astype(cfg.compute_dtype)
    x = constrain(x, _RESIDUAL_AXES)

    cache_end = None if cache is None else cache.end

    def block_fn(graphdef):
      """(block parameters, x, layer's kv) → (x, kv), rematerialised as config.remat says."""
      def run(params, x, kv):
        return nnx.merge(graphdef, params)(x, positions, mask, kv, cache_end)
      if cfg.remat == 'none':
        return run
      return jax.checkpoint(run, policy=REMAT_POLICIES[cfg.remat],
                            prevent_cse=not cfg.scan_layers)

    if cfg.scan_layers:
      run_block = block_fn(nnx.graphdef(self.blocks))
      kv = None if cache is None else (cache.keys, cache.values)
      x, kv = jax.lax.scan(lambda x, layer: run_block(layer[0], x, layer[1]), x,
                           (nnx.state(self.blocks), kv))
    else:
      kv_per_layer = []
      for i, block in enumerate(self.blocks):
        graphdef, params = nnx.split(block)
        x, layer_kv = block_fn(graphdef)(
            params, x, None if cache is None else (cache.keys[i], cache.values[i]))
        kv_per_layer.append(layer_kv)
      kv = None if cache is None else tuple(zip(*kv_per_layer))
    if cache is not None:
      cache = cache.replace(keys=kv[0], values=kv[1], end=cache.end + tokens_BxT.shape[1])
    return self.final_norm(x), cache

  def apply_head(self, hidden_BxTxD):
    """LM: float32 logits [B, T, V]. Scalar: float32 values [B, T]. (Or without T.)"""
    if self.cfg.head == 'scalar':
      return self.head(hidden_BxTxD)[..., 0].astype(jnp.float32)
    logits = jnp.dot(hidden_BxTxD, self.unembedding().astype(hidden_BxTxD.dtype),
                     preferred_element_type=jnp.float32)
    # [B, T, V], or [B, V] for the sampler's last position.
    return constrain(logits, (*_LOGITS_AXES[:logits.ndim - 1], _LOGITS_AXES[-1]))

  def unembedding(self) -> jax.Array:
    """The [D, V] matrix that maps hidden states to logits (for chunked log-probs)."""
    if self.cfg.head != 'lm':
      raise InputError('unembedding() needs an LM head (config.head == "lm").')
    return self.embed[...].T if self.head is None else self.head.kernel[...]

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    cfg = self.cfg
    shape = (batch_size, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    dtype = dtype or cfg.compute_dtype
    if cfg.scan_layers:
      zeros = lambda: jnp.zeros((cfg.n_layers, *shape), dtype)
    else:
      zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(keys=zeros(), values=zeros(),
                   key_positions_BxS=jnp.zeros((batch_size, max_len), jnp.int32),
                   key_valid_BxS=jnp.zeros((batch_size, max_len), jnp.bool_),
                   end=jnp.zeros((), jnp.int32))

  def step(self, tokens_BxT, cache: KVCache, *, attention_mask=None):
    """Feeds T more tokens (a left-padded prompt, or one sampled token): (output, cache)."""
    hidden, cache = self.hidden_states(tokens_BxT, attention_mask=attention_mask, cache=cache)
    return self.apply_head(hidden), cache


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """n_layers blocks as one `Block` whose parameters are stacked on a leading 'layers' axis
  (each layer initialised from its own key)."""
  keys = jax.random.split(rngs.params(), cfg.n_layers)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
  stacked = jax.vmap(lambda key: nnx.state(Block(cfg, nnx.Rngs(params=key))))(keys)
  stacked = jax.tree.map(
      lambda v: v.replace(logical_axes=('layers', *v.get_metadata()['logical_axes'])),
      stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)
