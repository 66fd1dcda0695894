"""Shared loss ops and the SFT loss, against hand-computed values and dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import masked_mean, sft_loss, token_kl, token_logprobs


def test_masked_mean_hand_computed():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  mask = jnp.array([[1, 1, 0], [0, 0, 1]], bool)
  assert masked_mean(x, mask) == pytest.approx((1 + 2 + 6) / 3)
  np.testing.assert_allclose(masked_mean(x, mask, axis=-1), [1.5, 6.0])
  assert masked_mean(x, jnp.zeros_like(mask)) == 0.0  # No entries: 0, not NaN.


@pytest.mark.parametrize('chunk_size', [1, 3, 4, 16])
def test_token_logprobs_equal_dense_log_softmax(chunk_size):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(k1, (2, 7, 8))
  unembed = jax.random.normal(k2, (8, 11))
  targets = jax.random.randint(k3, (2, 7), 0, 11)

  def dense(hidden, unembed):
    logps = jax.nn.log_softmax(hidden @ unembed, axis=-1)
    return jnp.take_along_axis(logps, targets[..., None], -1)[..., 0]

  chunked = lambda h, w: token_logprobs(h, w, targets, chunk_size=chunk_size)
  np.testing.assert_allclose(chunked(hidden, unembed), dense(hidden, unembed), atol=1e-5)
  grads = jax.grad(lambda h, w: chunked(h, w).sum(), argnums=(0, 1))(hidden, unembed)
  dense_grads = jax.grad(lambda h, w: dense(h, w).sum(), argnums=(0, 1))(hidden, unembed)
  for g, dg in zip(grads, dense_grads):
    np.testing.assert_allclose(g, dg, atol=1e-5)


@pytest.mark.parametrize('chunk_size', [1, 3, 16])
def test_token_kl_equals_the_dense_kl_of_the_two_softmaxes(chunk_size):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  hidden, reference_hidden = jax.random.normal(k1, (2, 7, 8)), jax.random.normal(k2, (2, 7, 6))
  unembed, reference_unembed = jax.random.normal(k3, (8, 11)), jax.random.normal(k4, (6, 11))
  p = np.asarray(jax.nn.softmax(hidden @ unembed), np.float64)
  q = np.asarray(jax.nn.softmax(reference_hidden @ reference_unembed), np.float64)
  dense = (p * (np.log(p) - np.log(q))).sum(-1)
  kl = token_kl(hidden, unembed, reference_hidden, reference_unembed, chunk_size=chunk_size)
  assert kl.shape == (2, 7)
  np.testing.assert_allclose(kl, dense, rtol=1e-4, atol=1e-5)
  assert (dense > 0).all()
  np.testing.assert_allclose(token_kl(hidden, unembed, hidden, unembed, chunk_size=chunk_size),
                             0.0, atol=1e-6)


def test_sft_loss_token_and_sequence_normalisation():
  logps = jnp.log(jnp.array([[0.5, 0.25, 0.9], [0.1, 0.8, 0.2]]))
  mask = jnp.array([[0, 1, 1], [1, 0, 0]])
  # Token: every masked token weighs 1/3.
  token_loss, metrics = sft_loss(logps, mask, normalize='token')
  expected = -(np.log(0.25) + np.log(0.9) + np.log(0.1)) / 3
  assert token_loss == pytest.approx(expected, rel=1e-6)
  assert metrics['target_tokens'] == 3
  # Sequence: mean over rows of each row's mean.
  seq_loss, _ = sft_loss(logps, mask, normalize='sequence')
  expected = -((np.log(0.25) + np.log(0.9)) / 2 + np.log(0.1)) / 2
  assert seq_loss == pytest.approx(expected, rel=1e-6)


def test_sft_loss_gradient_is_minus_mask_over_count():
  logps = jnp.log(jnp.array([[0.5, 0.25, 0.9]]))
  mask = jnp.array([[0, 1, 1]])
  grad = jax.grad(lambda lp: sft_loss(lp, mask)[0])(logps)
  np.testing.assert_allclose(grad, [[0.0, -0.5, -0.5]])


def test_sft_loss_rejects_unknown_normalisation():
  with pytest.raises(ValueError, match='normalize'):
    sft_loss(jnp.zeros((1, 2)), jnp.ones((1, 2)), normalize='batch')
