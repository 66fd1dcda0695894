"""Every attention implementation equals 'dense', forward and backward, on padded, packed and
sliding-window batches; 'chunked' never holds a [T, S] block of scores; 'cudnn' lowers to
cuDNN's fused kernels when compiled for CUDA."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo  # Patched: lowering for CUDA on a CPU.
from ml_collections import config_flags

from rlhf_jax.config import configs_dir, to_model_config
from rlhf_jax.errors import InputError
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.models import attention
from rlhf_jax.models.attention import (AttentionMask, attend, chunked_attention,
                                       cudnn_attention, splash_attention)
from rlhf_jax.models.layers import positions_from_mask

TOL = 1e-5
BATCH, LENGTH, HEADS, HEAD_DIM = 3, 37, 4, 8


def by_position(valid, **kw) -> AttentionMask:
  """Self-attention over the real tokens of `valid` [B, T], at their ranks."""
  return AttentionMask(positions_from_mask(valid), positions_from_mask(valid), valid, **kw)


def left_padding():
  """Rows with 5, 0 and all 37 tokens of padding (the last attends no key)."""
  valid = np.arange(LENGTH) >= np.array([[5], [0], [LENGTH]])
  positions = positions_from_mask(jnp.asarray(valid))
  return AttentionMask(positions, positions, jnp.asarray(valid))


def right_padding(sliding_window=None):
  valid = jnp.asarray(np.arange(LENGTH) < np.array([[30], [LENGTH], [12]]))
  positions = positions_from_mask(valid)
  return AttentionMask(positions, positions, valid, sliding_window=sliding_window)


def packed():
  """Segments of 12, 15 and 7 tokens in every row, then 3 of padding (segment 0)."""
  lengths = (12, 15, 7)
  segments_T = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [[0] * 3])
  positions_T = np.concatenate([np.arange(n) for n in lengths] + [[0] * 3])
  segments = jnp.asarray(np.broadcast_to(segments_T, (BATCH, LENGTH)))
  positions = jnp.asarray(np.broadcast_to(positions_T, (BATCH, LENGTH)))
  return AttentionMask(positions, positions, segments > 0, query_segments_BxT=segments,
                       key_segments_BxS=segments)


CASES = {  # name: (mask, key/value heads, q_block, kv_block)
    'left_padding': (left_padding, 2, 8, 8),
    'right_padding': (right_padding, 2, 8, 16),
    'packed': (packed, 2, 16, 8),
    'sliding_window': (lambda: right_padding(sliding_window=5), 2, 8, 8),
    'multi_head_one_block': (left_padding, HEADS, 512, 512),
    'multi_query_odd_blocks': (packed, 1, 5, 7),
}


def qkv(kv_heads, length=LENGTH, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM):
  rng = np.random.default_rng(0)
  draw = lambda n: jnp.asarray(rng.standard_normal((batch, length, n, head_dim)), jnp.float32)
  return draw(heads), draw(kv_heads), draw(kv_heads)


def on_real_tokens(functions: dict, mask: AttentionMask, q, k, v) -> dict:
  """name: (output on real tokens (0 on padding), its gradients for q, k and v under a random
  loss of the real tokens' outputs) for each attention function of (q, k, v). The outputs of
  padding are unused, and the implementations need not agree on them."""
  real = mask.key_valid_BxS[:, :, None, None]
  cotangent = jnp.where(real, jnp.asarray(
      np.random.default_rng(1).standard_normal(q.shape), jnp.float32), 0)
  results = {}
  for name, fn in functions.items():
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    results[name] = (jnp.where(real, out, 0), *vjp(cotangent))
  return results


@pytest.mark.parametrize('case', list(CASES))
def test_chunked_equals_dense_with_its_gradients(case):
  make_mask, kv_heads, q_block, kv_block = CASES[case]
  mask, (q, k, v) = make_mask(), qkv(kv_heads)
  results = on_real_tokens({
      'dense': lambda q, k, v: attend(q, k, v, mask, implementation='dense'),
      'chunked': lambda q, k, v: chunked_attention(q, k, v, mask, q_block=q_block,
                                                   kv_block=kv_block)}, mask, q, k, v)
  for expected, got in zip(results['dense'], results['chunked']):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


SPLASH_LENGTH = 256  # Splash attention tiles span multiples of 128 tokens.


def splash_cases():
  """name: (mask, key/value heads) over SPLASH_LENGTH tokens: left and right padding, packed
  segments with padding, a sliding window."""
  n = SPLASH_LENGTH
  left = jnp.asarray(np.arange(n) >= np.array([[5], [0], [200]]))
  right = jnp.asarray(np.arange(n) < np.array([[130], [n], [12]]))
  lengths = (100, 120, 20)
  segments = jnp.asarray(np.broadcast_to(np.concatenate(
      [np.full(k, i + 1) for i, k in enumerate(lengths)] + [[0] * (n - sum(lengths))]), (3, n)))
  segment_positions = jnp.asarray(np.broadcast_to(np.concatenate(
      [np.arange(k) for k in lengths] + [[0] * (n - sum(lengths))]), (3, n)))
  return {
      'left_padding': (by_position(left), 2),
      'right_padding_multi_query': (by_position(right), 1),
      'packed': (AttentionMask(segment_positions, segment_positions, segments > 0,
                               query_segments_BxT=segments, key_segments_BxS=segments), 2),
      'sliding_window': (by_position(right, sliding_window=5), HEADS),
  }


@pytest.mark.parametrize('case', list(splash_cases()))
def test_splash_equals_dense_with_its_gradients(case):
  """TPU splash attention run by Pallas's interpreter: the outputs of real tokens, and the
  gradients of any loss of them, are dense attention's."""
  mask, kv_heads = splash_cases()[case]
  q, k, v = qkv(kv_heads, length=SPLASH_LENGTH)
  results = on_real_tokens({
      'dense': lambda q, k, v: attend(q, k, v, mask, implementation='dense'),
      'splash': lambda q, k, v: splash_attention(q, k, v, mask, interpret=True)}, mask, q, k, v)
  for expected, got in zip(results['dense'], results['splash']):
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_splash_needs_whole_tiles():
  mask, kv_heads = splash_cases()['left_padding']
  q, k, v = qkv(kv_heads, length=SPLASH_LENGTH - 1)
  mask = jax.tree.map(lambda x: x[:, 1:], mask)
  with pytest.raises(InputError, match='multiple of 128'):
    splash_attention(q, k, v, mask, interpret=True)


def test_chunked_self_attention_skips_the_key_blocks_after_each_query_block():
  """Causal by index, a query block never reads the key blocks after it: with NaN values in the
  last key block, the outputs of the blocks before it stay finite (0 · NaN would not), and
  equal dense attention's on clean values. Seen through a KV cache, every block is read."""
  length, block = 64, 16
  q, k, v = qkv(2, length=length, batch=1)
  poisoned_v = v.at[:, -block:].set(jnp.nan)
  valid = jnp.ones((1, length), jnp.bool_)
  positions = positions_from_mask(valid)

  def chunked(self_attention):
    mask = AttentionMask(positions, positions, valid, self_attention=self_attention)
    return np.asarray(chunked_attention(q, k, poisoned_v, mask, q_block=block,
                                        kv_block=block))

  dense = attend(q, k, v, by_position(valid), implementation='dense')
  np.testing.assert_allclose(chunked(True)[:, :-block], dense[:, :-block], atol=TOL, rtol=0)
  assert np.isnan(chunked(False)[:, :-block]).all()


def test_auto_is_chunked_in_small_blocks_for_long_self_attention_on_cpu():
  q, k, v = qkv(2, length=attention.CHUNKED_FROM, batch=1)
  long_mask, short_mask = (by_position(jnp.ones((1, n), jnp.bool_))
                           for n in (attention.CHUNKED_FROM, attention.CHUNKED_FROM - 1))
  chunked = chunked_attention(q, k, v, long_mask, q_block=attention.CPU_BLOCK,
                              kv_block=attention.CPU_BLOCK)
  np.testing.assert_array_equal(attend(q, k, v, long_mask, implementation='auto'), chunked)
  short = [x[:, :-1] for x in (q, k, v)]
  np.testing.assert_array_equal(attend(*short, short_mask, implementation='auto'),
                                attend(*short, short_mask, implementation='dense'))


def test_chunked_never_holds_a_length_by_length_block_of_scores():
  """Backward pass included: dense attention's temporaries hold the [B, N, T, S] float32 scores;
  chunked's stay under one byte per (query, key) pair, so not even a boolean [T, S] mask."""
  length, heads, block = 4096, 2, 256
  q, k, v = qkv(1, length=length, batch=1, heads=heads, head_dim=16)
  valid = jnp.ones((1, length), jnp.bool_)
  positions = positions_from_mask(valid)

  def temp_bytes(attention_fn):
    def loss(q, k, v, positions, valid):
      return jnp.sum(attention_fn(q, k, v, AttentionMask(positions, positions, valid)) ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = grads.lower(q, k, v, positions, valid).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  dense = functools.partial(attend, implementation='dense')
  chunked = functools.partial(chunked_attention, q_block=block, kv_block=block)
  assert temp_bytes(dense) > heads * length * length * 4
  assert temp_bytes(chunked) < length * length


def test_transformer_logits_and_gradients_equal_dense_on_a_padded_batch():
  """Longer than one default block (512): two query and two key blocks per row."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  length = 600
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 64, size=(2, length)))
  mask = jnp.asarray(np.arange(length) >= np.array([[0], [77]]))

  def logits_and_grads(attention):
    graphdef, params = nnx.split(Transformer(cfg.replace(attention=attention),
                                             rngs=nnx.Rngs(0)))
    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens, attention_mask=mask)
      return jnp.sum(jnp.where(mask[..., None], logits, 0) ** 2), logits
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  dense_grads, dense_logits = logits_and_grads('dense')
  grads, logits = logits_and_grads('chunked')
  np.testing.assert_allclose(logits, dense_logits, atol=TOL, rtol=0)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


def test_kv_cache_prefill_and_decode_equal_dense():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                    sliding_window=4)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, size=(2, 7)))
  mask = jnp.asarray(np.arange(7) >= np.array([[0], [3]]))

  @nnx.jit(static_argnums=0)
  def prefill_and_decode(attention):
    model = Transformer(cfg.replace(attention=attention), rngs=nnx.Rngs(0))
    prefill, cache = model.step(tokens[:, :6], model.init_cache(2, 9), attention_mask=mask[:, :6])
    decode, _ = model.step(tokens[:, 6:], cache, attention_mask=mask[:, 6:])
    return prefill, decode

  for got, expected in zip(prefill_and_decode('chunked'), prefill_and_decode('dense')):
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def model_config_from_command_line(*overrides):
  """config.model of `python -m rlhf_jax.main --config=configs/sft.py:tiny <overrides>`."""
  argv = ['main', f'--config={configs_dir() / "sft.py"}:tiny', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return to_model_config(flag_values.config.model)


def test_the_command_line_sets_attention_and_a_bad_value_names_the_key():
  assert model_config_from_command_line().attention == 'auto'
  assert model_config_from_command_line('--config.model.attention=chunked').attention == 'chunked'
  with pytest.raises(InputError, match=r"config\.model\.attention='flash'; choose one of"):
    model_config_from_command_line('--config.model.attention=flash')


@pytest.mark.parametrize('case', list(splash_cases()))
def test_the_cudnn_call_equals_dense_with_its_gradients(case):
  """The call 'cudnn' makes (causal by index, dense attention's mask as a bias), run by JAX's
  XLA reference of that call: what cuDNN's kernel is specified to compute."""
  mask, kv_heads = splash_cases()[case]
  q, k, v = qkv(kv_heads, length=SPLASH_LENGTH)
  results = on_real_tokens({
      'dense': lambda q, k, v: attend(q, k, v, mask, implementation='dense'),
      'cudnn': lambda q, k, v: cudnn_attention(q, k, v, mask, implementation='xla')},
      mask, q, k, v)
  for expected, got in zip(results['dense'], results['cudnn']):
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize('overrides', [dict(dtype='bfloat16'), dict(dtype='float32'),
                                       dict(dtype='bfloat16', scan_layers=True, remat='full')])
def test_auto_on_cuda_lowers_a_training_step_to_cudnn_flash_attention(monkeypatch, overrides):
  """The gradient of a 2-layer model's loss, lowered for CUDA: in bfloat16 each layer runs
  cuDNN's fused attention forward and backward (causal, with the mask as a bias), scanned and
  rematerialized too, and nothing holds [B, N, T, T] scores; float32, which cuDNN does not
  take, stays dense."""
  # JAX's cuDNN rules ask the installed cuDNN's version: here none, so say 9.10.
  monkeypatch.setattr(fused_attention_stablehlo, 'check_cudnn_version', lambda: 91000)
  batch, length, heads = 2, 64, 4
  cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=heads, n_kv_heads=2,
                    d_ff=64, **overrides)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((batch, length), jnp.int32)
  mask = jnp.asarray(np.arange(length) >= np.array([[0], [9]]))

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens, attention_mask=mask)
    return jnp.sum(logits.astype(jnp.float32) ** 2)

  with attention.compiling_for('cuda'):
    hlo = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=('cuda',)).as_text()
  calls = re.findall(r'custom_call @(__cudnn\$fmha\w+)', hlo)
  # Scores of every head, [B, N, T, T] or grouped as [B, K, N / K, T, T], in a float type.
  scores = re.compile(rf'tensor<{batch}x(?:{heads}|2x{heads // 2})x{length}x{length}x(?:f32|bf16)>')
  if cfg.dtype == 'float32':
    assert not calls and scores.search(hlo)
    return
  forward, backward = '__cudnn$fmhaScaleBiasSoftmax', '__cudnn$fmhaScaleBiasSoftmaxBackward'
  if cfg.scan_layers:  # One block's program (its forward twice: rematerialized).
    assert set(calls) == {forward, backward}
  else:
    assert sorted(calls) == [forward] * cfg.n_layers + [backward] * cfg.n_layers
    assert hlo.count(r'\22mask_type\22: \22CAUSAL\22') == 2 * cfg.n_layers
  assert not scores.search(hlo)


def test_auto_picks_an_implementation_for_each_platform():
  valid = jnp.ones((1, 256), jnp.bool_)
  mask = by_position(valid)
  through_cache = AttentionMask(mask.query_positions_BxT, mask.key_positions_BxS, valid,
                                self_attention=False)
  queries = lambda length=256, head_dim=64, dtype=jnp.bfloat16: jnp.zeros(
      (1, length, 4, head_dim), dtype)
  pick = lambda q, platform, mask=mask: attention._auto(q, mask, platform)[0]
  options = lambda q, platform: attention._auto(q, mask, platform)[1]
  assert pick(queries(), 'cuda') == 'cudnn'
  for unsupported in (queries(dtype=jnp.float32), queries(head_dim=12), queries(head_dim=256)):
    assert pick(unsupported, 'cuda') == 'chunked'  # Long: no kernel, but no [T, S] scores.
  assert pick(queries(length=255), 'cuda') == 'dense'  # Odd for cuDNN, short for chunked.
  assert pick(queries(), 'cuda', through_cache) == 'dense'
  assert pick(queries(), 'rocm') == 'chunked' and options(queries(), 'rocm') == {}
  assert pick(queries(), 'tpu') == 'splash' and pick(queries(length=200), 'tpu') == 'dense'
  assert pick(queries(length=300), 'tpu') == 'chunked'  # Not whole splash tiles.
  assert pick(queries(), 'cpu') == 'chunked' and pick(queries(length=255), 'cpu') == 'dense'
  assert options(queries(), 'cpu') == {'q_block': attention.CPU_BLOCK,
                                       'kv_block': attention.CPU_BLOCK}


def test_cudnn_names_what_it_needs():
  mask, kv_heads = splash_cases()['left_padding']
  q, k, v = qkv(kv_heads, length=SPLASH_LENGTH)
  with pytest.raises(InputError, match=r"attention='cudnn' needs an NVIDIA GPU"):
    attend(q, k, v, mask, implementation='cudnn')
  with pytest.raises(InputError, match=r'bfloat16 or float16 \(config\.model\.dtype\)'):
    cudnn_attention(q, k, v, mask)
