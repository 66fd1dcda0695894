"""Incremental decoding, padding and packing give the logits of one full forward pass.

Every test works on the same [3, 10] token batch so the jitted shapes compile few times.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import ModelConfig, Transformer

TOL = 1e-5
PROMPT, TOTAL = 6, 10
LLAMA = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
GPT2 = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128,
                   norm='layer', norm_eps=1e-5, position='learned', max_position=32,
                   mlp='gelu', qkv_bias=True, out_bias=True, tie_embeddings=True)
CONFIGS = {'llama': LLAMA, 'gpt2': GPT2, 'sliding': LLAMA.replace(sliding_window=3),
           'scanned': LLAMA.replace(scan_layers=True), 'qk_norm': LLAMA.replace(qk_norm=True)}


@functools.cache
def random_model(cfg: ModelConfig) -> Transformer:
  """Every parameter ~ N(0, 0.2²), norm scales around 1 (filled from numpy: nothing to compile)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  draw = lambda path, v: jnp.asarray((path[-1] == 'scale') + 0.2 * rng.standard_normal(v.shape),
                                     v.dtype)
  flat = [(path, v.replace(draw(path, v))) for path, v in nnx.to_flat_state(abstract)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@nnx.jit
def forward(model, tokens, mask=None, positions=None, segment_ids=None):
  return model(tokens, attention_mask=mask, positions=positions, segment_ids=segment_ids)


@nnx.jit
def step(model, tokens, cache, mask):
  return model.step(tokens, cache, attention_mask=mask)


def batch():
  """Tokens [3, TOTAL] whose prompts (the first PROMPT) have 2, 0 and 5 padding tokens."""
  tokens = np.random.default_rng(0).integers(1, 64, size=(3, TOTAL))
  mask = np.ones_like(tokens)
  for row, pad in enumerate((2, 0, 5)):
    mask[row, :pad] = 0
  return jnp.asarray(tokens * mask), jnp.asarray(mask)


def assert_close(a, b, mask=None):
  a, b = np.asarray(a), np.asarray(b)
  if mask is not None:
    a, b = a[np.asarray(mask, bool)], b[np.asarray(mask, bool)]
  np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize('name', ['llama', 'gpt2', 'sliding', 'scanned', 'qk_norm'])
def test_prefill_then_decode_matches_full_forward(name):
  model = random_model(CONFIGS[name])
  tokens, mask = batch()
  full = forward(model, tokens, mask)
  out, cache = step(model, tokens[:, :PROMPT], model.init_cache(3, TOTAL), mask[:, :PROMPT])
  assert_close(out, full[:, :PROMPT], mask[:, :PROMPT])
  for t in range(PROMPT, TOTAL):
    out, cache = step(model, tokens[:, t:t + 1], cache, mask[:, t:t + 1])
    assert_close(out[:, 0], full[:, t])


@pytest.mark.parametrize('name', ['llama', 'gpt2', 'sliding', 'scanned'])
def test_chunked_prefill_matches_one_prefill(name):
  """The first chunk is all padding for the last row and part padding for the first."""
  model = random_model(CONFIGS[name])
  tokens, mask = batch()
  tokens, mask = tokens[:, :PROMPT], mask[:, :PROMPT]
  one, _ = step(model, tokens, model.init_cache(3, TOTAL), mask)
  half = PROMPT // 2
  first, cache = step(model, tokens[:, :half], model.init_cache(3, TOTAL), mask[:, :half])
  second, _ = step(model, tokens[:, half:], cache, mask[:, half:])
  assert_close(jnp.concatenate([first, second], axis=1), one, mask)


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_right_padding_matches_unpadded(name):
  model = random_model(CONFIGS[name])
  tokens, _ = batch()
  mask = jnp.asarray(np.arange(TOTAL) < np.array([[TOTAL], [PROMPT], [PROMPT]]))
  padded = forward(model, tokens * mask, mask)
  assert_close(padded[1:, :PROMPT], forward(model, tokens[1:, :PROMPT]))


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_packed_segments_match_separate_runs(name):
  model = random_model(CONFIGS[name])
  tokens, _ = batch()
  half = TOTAL // 2
  segment_ids = jnp.repeat(jnp.array([[1, 2]]), half, axis=1)
  positions = jnp.tile(jnp.arange(half), 2)[None]
  packed = forward(model, tokens[:1], positions=positions, segment_ids=segment_ids)
  separate = forward(model, tokens[0].reshape(2, half))
  assert_close(packed[0].reshape(2, half, -1), separate)
