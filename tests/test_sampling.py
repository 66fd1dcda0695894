"""Sampling with the KV cache against full forward passes (no cache) of the same sequences.

One left-padded [3, 6] prompt batch and 8 new tokens: every full forward runs on the same
[3, 14] shape (columns not yet generated are masked out), so each function compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

from rlhf_jax.sampling import make_sampler, top_k_mask, top_p_mask, truncated_logits
from test_kv_cache import LLAMA, forward, random_model

PROMPT, NEW, PAD, EOS = 6, 8, 0, 1
NO_EOS = -1  # For the reference only: a token id that is never emitted.


def prompts():
  """Tokens [3, PROMPT] with 2, 0 and 5 leading padding tokens, and their bool mask."""
  mask = np.arange(PROMPT) >= np.array([[2], [0], [5]])
  tokens = np.random.default_rng(0).integers(2, 64, size=mask.shape) * mask
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


@functools.cache
def sampler(**options):
  return make_sampler(nnx.graphdef(random_model(LLAMA)), max_new_tokens=NEW, pad_id=PAD,
                      **{'eos_id': EOS, **options})


def generate(seed=0, **options):
  model = random_model(LLAMA)
  out = sampler(**options)(nnx.state(model), *prompts(), jax.random.key(seed))
  return jax.tree.map(np.asarray, out)


def full_forward_logits(tokens_BxN, mask_BxN):
  """Logits [B, NEW, V] of one full forward that predict each generated token from its past."""
  prompt, prompt_mask = prompts()
  tokens = jnp.concatenate([prompt, jnp.asarray(tokens_BxN, jnp.int32)], axis=1)
  mask = jnp.concatenate([prompt_mask, jnp.asarray(mask_BxN, bool)], axis=1)
  return np.asarray(forward(random_model(LLAMA), tokens, mask))[:, PROMPT - 1:-1]


def greedy_reference(eos_id):
  """Step by step: argmax of a full forward over the growing sequence, pad after EOS."""
  tokens, mask = np.full((3, NEW), PAD), np.zeros((3, NEW), bool)
  done = np.zeros(3, bool)
  for i in range(NEW):
    token = np.where(done, PAD, full_forward_logits(tokens, mask)[:, i].argmax(-1))
    tokens[:, i], mask[:, i] = token, ~done
    done |= token == eos_id
  return tokens, mask


def at_tokens(x_BxNxV, out):
  return np.take_along_axis(x_BxNxV, out.tokens_BxN[..., None], axis=-1)[..., 0]


def assert_well_formed(out, eos_id=EOS):
  """Each row: tokens up to and including the first EOS under the mask, then padding."""
  for tokens, mask, length in zip(out.tokens_BxN, out.mask_BxN, out.lengths_B):
    eos_at = np.flatnonzero(tokens == eos_id)
    assert length == (eos_at[0] + 1 if eos_at.size else NEW)
    np.testing.assert_array_equal(mask, np.arange(NEW) < length)
    assert np.all(tokens[length:] == PAD)
  assert np.all(out.logprobs_BxN[~out.mask_BxN] == 0)


def assert_logprobs_at_temperature(out, temperature):
  logits = full_forward_logits(out.tokens_BxN, out.mask_BxN)
  logps = at_tokens(log_softmax(logits.astype(np.float64) / temperature, axis=-1), out)
  np.testing.assert_allclose(out.logprobs_BxN[out.mask_BxN], logps[out.mask_BxN], atol=1e-4)


def test_greedy_matches_stepwise_argmax_of_full_forwards():
  out = generate(temperature=0.0)
  tokens, mask = greedy_reference(EOS)
  np.testing.assert_array_equal(out.tokens_BxN, tokens)
  np.testing.assert_array_equal(out.mask_BxN, mask)
  assert_well_formed(out)
  assert_logprobs_at_temperature(out, 1.0)  # Greedy reports the model's own log-probs.


def test_eos_ends_each_row_and_pads_the_rest():
  free_run, _ = greedy_reference(NO_EOS)
  eos_id = int(free_run[0, 2])  # Row 0 stops after at most 3 tokens.
  out = generate(temperature=0.0, eos_id=eos_id)
  tokens, mask = greedy_reference(eos_id)
  np.testing.assert_array_equal(out.tokens_BxN, tokens)
  np.testing.assert_array_equal(out.mask_BxN, mask)
  assert out.lengths_B[0] <= 3 and out.lengths_B.max() > 3
  assert_well_formed(out, eos_id)


def test_logprobs_are_tempered_log_softmax_of_sampled_tokens():
  out = generate(temperature=0.7)
  assert_well_formed(out)
  assert_logprobs_at_temperature(out, 0.7)


def test_same_key_same_tokens_other_key_other_tokens():
  first, again, other = (generate(seed, temperature=0.7) for seed in (0, 0, 1))
  np.testing.assert_array_equal(first.tokens_BxN, again.tokens_BxN)
  np.testing.assert_array_equal(first.logprobs_BxN, again.logprobs_BxN)
  assert np.any(first.tokens_BxN != other.tokens_BxN)


def test_tiny_temperature_is_greedy():
  greedy, cold = generate(temperature=0.0), generate(temperature=1e-4)
  np.testing.assert_array_equal(cold.tokens_BxN, greedy.tokens_BxN)
  np.testing.assert_array_equal(cold.mask_BxN, greedy.mask_BxN)


def test_top_k_only_emits_the_k_most_likely():
  k = 3
  out = generate(temperature=2.0, top_k=k)
  logits = full_forward_logits(out.tokens_BxN, out.mask_BxN)
  chosen = at_tokens(logits, out)
  rank = (logits > chosen[..., None]).sum(-1)  # How many tokens are more likely.
  assert np.all(rank[out.mask_BxN] < k)
  assert np.any(rank[out.mask_BxN] > 0)  # It samples, not just takes the argmax.
  assert_logprobs_at_temperature(out, 2.0)  # Before truncation.


def test_top_p_only_emits_the_nucleus():
  p = 0.5
  out = generate(temperature=2.0, top_p=p)
  logits = full_forward_logits(out.tokens_BxN, out.mask_BxN)
  probs = np.exp(log_softmax(logits.astype(np.float64) / 2.0, axis=-1))
  chosen = at_tokens(probs, out)
  mass_above = np.where(probs > chosen[..., None], probs, 0).sum(-1)
  assert np.all(mass_above[out.mask_BxN] < p)
  assert np.any(mass_above[out.mask_BxN] > 0)
  assert_logprobs_at_temperature(out, 2.0)


def test_top_k_mask_hand_made():
  logits = jnp.array([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 1.0, 2.0]])
  np.testing.assert_array_equal(top_k_mask(logits, 2), [[0, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(top_k_mask(logits, 1), [[0, 1, 0, 0], [1, 1, 0, 0]])  # Ties.
  assert top_k_mask(logits, 10).all()


def test_top_p_mask_hand_made():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.3]]))
  np.testing.assert_array_equal(top_p_mask(logits, 0.01), [[1, 0, 0]])
  np.testing.assert_array_equal(top_p_mask(logits, 0.45), [[1, 0, 0]])
  np.testing.assert_array_equal(top_p_mask(logits, 0.6), [[1, 0, 1]])
  np.testing.assert_array_equal(top_p_mask(logits, 0.85), [[1, 1, 1]])
  np.testing.assert_array_equal(top_p_mask(logits + 7.0, 0.6), [[1, 0, 1]])  # Unnormalised.


def test_truncated_logits_takes_the_nucleus_after_top_k():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
  # Alone, p = 0.5 needs 0.4 + 0.3; after top-2 the first token has 4/7 ≥ 0.5 of the mass.
  keeps = lambda **kw: np.isfinite(truncated_logits(logits, **kw))
  np.testing.assert_array_equal(keeps(top_p=0.5), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(keeps(top_k=2, top_p=0.5), [[1, 0, 0, 0]])
  np.testing.assert_array_equal(keeps(), [[1, 1, 1, 1]])


@pytest.mark.parametrize('option, value', [('max_new_tokens', 0), ('temperature', -1.0),
                                           ('top_k', -1), ('top_p', 0.0), ('top_p', 1.5)])
def test_rejects_bad_options(option, value):
  options = {'max_new_tokens': 4, 'eos_id': EOS, 'pad_id': PAD, option: value}
  with pytest.raises(ValueError, match=option):
    make_sampler(nnx.graphdef(random_model(LLAMA)), **options)
