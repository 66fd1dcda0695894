"""PPO machinery against NumPy loops, hand arithmetic, Monte-Carlo KL and the papers' limits."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.errors import InputError
from rlhf_jax.losses import (adaptive_kl_coef, aggregate_tokens, gae, group_advantages,
                             kl_penalty, leave_one_out_advantages, ppo_policy_loss,
                             ppo_value_loss, token_rewards, whiten)

LENGTHS = [6, 1, 3, 0, 4]  # Ragged right-padded rows, one of them empty.


def ragged_batch(seed, t=6):
  rng = np.random.default_rng(seed)
  mask = (np.arange(t)[None] < np.array(LENGTHS)[:, None]).astype(np.float32)
  rewards, values = rng.normal(size=(2, len(LENGTHS), t)).astype(np.float32)
  return rewards, values, mask


def numpy_gae(rewards, values, lengths, gamma, lam):
  """Schulman et al. 2016, Eq. 16: the usual backwards loop, row by row, V = 0 past the end."""
  adv = np.zeros_like(rewards, dtype=np.float64)
  for b, length in enumerate(lengths):
    last = 0.0
    for t in reversed(range(length)):
      next_value = values[b, t + 1] if t + 1 < length else 0.0
      last = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * last
      adv[b, t] = last
  return adv


@pytest.mark.parametrize('gamma, lam', [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_numpy_loop_on_ragged_rows(gamma, lam):
  rewards, values, mask = ragged_batch(0)
  adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
  expected = numpy_gae(rewards, values, LENGTHS, gamma, lam)
  np.testing.assert_allclose(adv, expected, atol=1e-5)
  np.testing.assert_allclose(returns, (expected + values) * mask, atol=1e-5)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
  rewards, values, mask = ragged_batch(1)
  adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
  reward_to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, (reward_to_go - values) * mask, atol=1e-5)
  np.testing.assert_allclose(returns, reward_to_go * mask, atol=1e-5)


def test_gae_ignores_padding_contents_and_width():
  rewards, values, mask = ragged_batch(2)
  adv, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
  # Garbage in the pads, plus three extra pad columns of garbage.
  noise = np.random.default_rng(3).normal(100, 50, size=(2, len(LENGTHS), 9))
  padded_mask = np.pad(mask, ((0, 0), (0, 3)))
  padded = [np.where(padded_mask, np.pad(x, ((0, 0), (0, 3))), n)
            for x, n in zip((rewards, values), noise)]
  padded_adv, padded_returns = gae(*padded, padded_mask, gamma=0.99, lam=0.95)
  np.testing.assert_allclose(padded_adv[:, :6], adv, atol=1e-6)
  np.testing.assert_allclose(padded_returns[:, :6], returns, atol=1e-6)
  np.testing.assert_array_equal(padded_adv * (1 - padded_mask), 0.0)
  np.testing.assert_array_equal(padded_returns * (1 - padded_mask), 0.0)


def test_gae_skips_left_padding_and_holes():
  rewards, values, _ = ragged_batch(4, t=3)
  adv, _ = gae(rewards, values, np.ones_like(rewards), gamma=0.9, lam=0.8)
  # The same three tokens at positions 1, 3, 4 of five, with garbage elsewhere.
  holey_mask = np.array([[0, 1, 0, 1, 1]] * len(LENGTHS), np.float32)
  holey = []
  for x in (rewards, values):
    h = np.full((len(LENGTHS), 5), 77.0, np.float32)
    h[:, [1, 3, 4]] = x
    holey.append(h)
  holey_adv, _ = gae(*holey, holey_mask, gamma=0.9, lam=0.8)
  np.testing.assert_allclose(holey_adv[:, [1, 3, 4]], adv, atol=1e-6)
  np.testing.assert_array_equal(holey_adv[:, [0, 2]], 0.0)


def test_kl_estimators_hand_values():
  # π = 0.5, π_ref = 0.25 (r = 0.5) and π = 0.2, π_ref = 0.6 (r = 3).
  logp, ref = jnp.log(jnp.array([[0.5, 0.2]])), jnp.log(jnp.array([[0.25, 0.6]]))
  np.testing.assert_allclose(kl_penalty(logp, ref), [[math.log(2), -math.log(3)]], rtol=1e-6)
  np.testing.assert_allclose(kl_penalty(logp, ref, estimator='k2'),
                             [[0.5 * math.log(2) ** 2, 0.5 * math.log(3) ** 2]], rtol=1e-6)
  np.testing.assert_allclose(kl_penalty(logp, ref, estimator='k3'),
                             [[-0.5 + math.log(2), 2 - math.log(3)]], rtol=1e-5)
  with pytest.raises(ValueError, match="estimator='k4'"):
    kl_penalty(logp, ref, estimator='k4')


def test_k3_is_nonnegative():
  grid = jnp.linspace(-20.0, 0.0, 101)
  logp, ref = jnp.meshgrid(grid, grid)
  assert jnp.all(kl_penalty(logp, ref, estimator='k3') >= 0)


def test_k1_and_k3_are_unbiased_monte_carlo():
  pi, pi_ref = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
  true_kl = np.sum(pi * np.log(pi / pi_ref))  # ≈ 0.275
  tokens = np.random.default_rng(0).choice(3, size=200_000, p=pi)
  logp, ref = np.log(pi)[tokens][None], np.log(pi_ref)[tokens][None]
  k1, k3 = (np.asarray(kl_penalty(logp, ref, estimator=e)) for e in ('k1', 'k3'))
  # Standard errors ≈ 0.0016 (k1) and 0.0005 (k3).
  assert k1.mean() == pytest.approx(true_kl, abs=0.01)
  assert k3.mean() == pytest.approx(true_kl, abs=0.01)
  assert k3.var() < k1.var()


def test_token_rewards_hand_example():
  kl = jnp.array([[0.1, 0.2, 0.3, 9.0], [1.0, -1.0, 9.0, 9.0], [0.5, 0.5, 0.5, 0.5]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
  rewards = token_rewards(jnp.array([2.0, -1.0, 7.0]), kl, mask, kl_coef=0.5)
  np.testing.assert_allclose(rewards, [[-0.05, -0.1, 2 - 0.15, 0.0],
                                       [-0.5, -1.0 + 0.5, 0.0, 0.0],
                                       [0.0, 0.0, 0.0, 0.0]], rtol=1e-6)


def test_whiten_hand_example():
  # Masked entries 1, 5, 3, 3: mean 3, population variance (4 + 4 + 0 + 0) / 4 = 2.
  x = jnp.array([[1.0, 5.0, 99.0], [3.0, 3.0, -7.0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 0]])
  s = math.sqrt(2)
  np.testing.assert_allclose(whiten(x, mask), [[-s, s, 0], [0, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(whiten(x, mask, shift_mean=False),
                             [[3 - s, 3 + s, 0], [3, 3, 0]], rtol=1e-6)


def test_whiten_moments_on_masked_entries():
  rewards, _, mask = ragged_batch(5)
  x = 3 * rewards + 2
  real = mask.astype(bool)
  white = np.asarray(whiten(x, mask))
  assert white[real].mean() == pytest.approx(0.0, abs=1e-6)
  assert white[real].std() == pytest.approx(1.0, rel=1e-5)
  np.testing.assert_array_equal(white[~real], 0.0)
  kept = np.asarray(whiten(x, mask, shift_mean=False))
  assert kept[real].mean() == pytest.approx(x[real].mean(), rel=1e-5)
  assert kept[real].std() == pytest.approx(1.0, rel=1e-5)


# ε = 0.2. Token by token: ratio ρ, advantage A, max(−Aρ, −A clip(ρ)):
#   ρ = 1.5, A = 1:  max(−1.5, −1.2) = −1.2  clipped
#   ρ = 0.5, A = −1: max(0.5, 0.8)   = 0.8   clipped
#   ρ = 0.5, A = 2:  max(−1, −1.6)   = −1    not clipped (pessimistic bound)
#   ρ = 1.1, A = −2: max(2.2, 2.2)   = 2.2   inside the range
#   masked garbage.
RATIOS = jnp.array([[1.5, 0.5, 0.5, 1.1, 50.0]])
POLICY = dict(logprobs_BxT=jnp.log(RATIOS) - 3.0, old_logprobs_BxT=jnp.full((1, 5), -3.0),
              advantages_BxT=jnp.array([[1.0, -1.0, 2.0, -2.0, 100.0]]),
              mask_BxT=jnp.array([[1, 1, 1, 1, 0]]))


def test_policy_loss_hand_computed():
  loss, metrics = ppo_policy_loss(**POLICY, clip_eps=0.2)
  assert loss == pytest.approx((-1.2 + 0.8 - 1 + 2.2) / 4, rel=1e-5)
  assert metrics['loss/policy'] == loss
  assert metrics['policy/clipfrac'] == 0.5
  approxkl = sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 0.5, 1.1)) / 4
  assert metrics['policy/approxkl'] == pytest.approx(approxkl, rel=1e-5)


def test_token_aggregations_hand_computed():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [99.0, 99.0, 99.0]])  # 99: masked.
  mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  assert aggregate_tokens(x, mask, 'token_mean') == pytest.approx(10 / 4)
  assert aggregate_tokens(x, mask, 'sequence_mean') == pytest.approx((2 + 4 + 0) / 3)
  assert aggregate_tokens(x, mask, 'max_length') == pytest.approx(10 / 9)
  with pytest.raises(InputError, match="'seq_mean'; choose one of token_mean"):
    aggregate_tokens(x, mask, 'seq_mean')


def test_clip_higher_lets_a_positive_advantage_ratio_grow_to_one_plus_eps_high():
  """ρ = 1.25, A = 1: clipped at 1.2 with ε = 0.2, free under ε_high = 0.28 (so its gradient
  is −Aρ / 2); ρ = 0.7, A = −1: the lower clip 0.8 holds either way."""
  ratios, old = jnp.array([[1.25, 0.7]]), jnp.zeros((1, 2))
  args = (jnp.array([[1.0, -1.0]]), jnp.ones((1, 2)))
  loss_fn = lambda logp, **kw: ppo_policy_loss(logp, old, *args, clip_eps=0.2, **kw)[0]
  assert loss_fn(jnp.log(ratios)) == pytest.approx((-1.2 + 0.8) / 2, rel=1e-6)
  assert loss_fn(jnp.log(ratios), clip_eps_high=0.28) == pytest.approx((-1.25 + 0.8) / 2,
                                                                        rel=1e-6)
  np.testing.assert_allclose(jax.grad(loss_fn)(jnp.log(ratios), clip_eps_high=0.28),
                             [[-1.25 / 2, 0.0]], rtol=1e-6)


@pytest.mark.parametrize('aggregation, expected', [
    ('token_mean', -(0.5 - 2 + 3 + 1 + 4) / 5),
    ('sequence_mean', -((0.5 - 2 + 3) / 3 + (1 + 4) / 2) / 2),
    ('max_length', -(0.5 - 2 + 3 + 1 + 4) / 6)])
def test_policy_loss_at_ratio_one_under_each_aggregation(aggregation, expected):
  logp = jnp.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, -9.0]])
  adv = jnp.array([[0.5, -2.0, 3.0], [1.0, 4.0, 7.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  loss, _ = ppo_policy_loss(logp, logp, adv, mask, clip_eps=0.2, aggregation=aggregation)
  assert loss == pytest.approx(expected, rel=1e-6)


def test_policy_gradient_is_zero_on_clipped_tokens():
  loss_fn = lambda logp: ppo_policy_loss(**{**POLICY, 'logprobs_BxT': logp}, clip_eps=0.2)[0]
  grad = jax.grad(loss_fn)(POLICY['logprobs_BxT'])
  # d(−Aρ)/d log π = −Aρ, over 4 tokens: −2 · 0.5 / 4 and 2 · 1.1 / 4.
  np.testing.assert_allclose(grad, [[0.0, 0.0, -0.25, 0.55, 0.0]], rtol=1e-5)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
  logp = jnp.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, -9.0]])
  adv = jnp.array([[0.5, -2.0, 3.0], [1.0, 4.0, 7.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  loss_fn = lambda lp: ppo_policy_loss(lp, logp, adv, mask, clip_eps=0.2)
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logp)
  assert loss == pytest.approx(-(0.5 - 2 + 3 + 1 + 4) / 5, rel=1e-6)
  assert metrics['policy/clipfrac'] == 0.0 and metrics['policy/approxkl'] == 0.0
  np.testing.assert_allclose(grad, -adv * mask / 5, rtol=1e-6)


def test_value_loss_hand_computed():
  # ε = 0.2. V = 1, V_old = 0.5: clipped V = 0.7.
  #   R = 2: max(1, 1.69) = 1.69 clipped;  R = 0: max(1, 0.49) = 1;  V = 0.1, V_old = 0, R = 1:
  #   inside the range, 0.81; the fourth token is masked.
  values = jnp.array([[1.0, 1.0, 0.1, 30.0]])
  old, returns = jnp.array([[0.5, 0.5, 0.0, 0.0]]), jnp.array([[2.0, 0.0, 1.0, -30.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  loss_fn = lambda v: ppo_value_loss(v, old, returns, mask, clip_eps=0.2)
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(values)
  assert loss == pytest.approx(0.5 * (1.69 + 1 + 0.81) / 3, rel=1e-6)
  assert metrics['loss/value'] == loss
  assert metrics['value/clipfrac'] == pytest.approx(1 / 3)
  # ½ d(V − R)²/dV / 3 = (V − R) / 3 where unclipped; 0 on the clipped token.
  np.testing.assert_allclose(grad, [[0.0, 1 / 3, -0.9 / 3, 0.0]], rtol=1e-5)


def test_group_advantages_hand_examples():
  scores = jnp.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
  # Group 1: mean 2, sample std 1; group 2 has no spread, so all its advantages are 0.
  np.testing.assert_allclose(group_advantages(scores, eps=1e-4),
                             [[-1 / 1.0001, 0, 1 / 1.0001], [0, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(group_advantages(scores, normalize_std=False),
                             [[-1, 0, 1], [0, 0, 0]])
  # Mean 2, sample std √8.
  np.testing.assert_allclose(group_advantages(jnp.array([[0.0, 4.0]]), eps=0.0),
                             [[-2 / math.sqrt(8), 2 / math.sqrt(8)]], rtol=1e-6)


def test_leave_one_out_advantages():
  # Baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3.
  np.testing.assert_allclose(leave_one_out_advantages(jnp.array([[1.0, 2.0, 3.0, 6.0]])),
                             [[1 - 11 / 3, 2 - 10 / 3, 0, 4]], rtol=1e-6)
  scores = np.random.default_rng(6).normal(size=(3, 5)).astype(np.float32)
  expected = [[s[i] - np.mean(np.delete(s, i)) for i in range(5)] for s in scores]
  np.testing.assert_allclose(leave_one_out_advantages(scores), expected, atol=1e-6)


@pytest.mark.parametrize('observed, factor', [
    (6.0, 1.0),                  # On target: unchanged.
    (6.6, 1 + 0.1 * 0.0512),     # 10% above: error 0.1, n_steps / horizon = 512 / 10000.
    (5.4, 1 - 0.1 * 0.0512),     # 10% below.
    (12.0, 1 + 0.2 * 0.0512),    # Error 1 clipped to 0.2.
    (0.0, 1 - 0.2 * 0.0512),     # Error −1 clipped to −0.2.
])
def test_adaptive_kl_coef(observed, factor):
  new = adaptive_kl_coef(0.1, observed, target=6.0, horizon=10_000, n_steps=512)
  assert new == pytest.approx(0.1 * factor, rel=1e-6)


def test_jit_matches_eager():
  rewards, values, mask = ragged_batch(7)
  calls = [
      (functools.partial(gae, gamma=0.99, lam=0.95), (rewards, values, mask)),
      (functools.partial(kl_penalty, estimator='k3'), (rewards, values)),
      (functools.partial(token_rewards, kl_coef=0.1), (rewards[:, 0], values, mask)),
      (whiten, (rewards, mask)),
      (functools.partial(ppo_policy_loss, clip_eps=0.2), (rewards, values, values, mask)),
      (functools.partial(ppo_value_loss, clip_eps=0.2), (rewards, values, values, mask)),
      (group_advantages, (rewards,)),
      (leave_one_out_advantages, (rewards,)),
      (functools.partial(adaptive_kl_coef, target=6.0, horizon=1e4, n_steps=64), (0.1, 7.0)),
  ]
  for fn, args in calls:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.jit(fn)(*args), fn(*args))


def test_errors_name_the_argument():
  ones = jnp.ones((2, 3))
  with pytest.raises(ValueError, match='values_BxT has shape'):
    gae(ones, jnp.ones((2, 4)), ones, gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match='logprobs_BxT has shape'):
    ppo_policy_loss(jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.ones(3), clip_eps=0.2)
  with pytest.raises(ValueError, match='scores_B has shape'):
    token_rewards(jnp.ones(3), ones, ones, kl_coef=0.1)
  with pytest.raises(ValueError, match='scores_NxG has shape'):
    leave_one_out_advantages(jnp.ones((4, 1)))
