"""Best-of-n: the KL formula, the unbiased estimate of the chosen answer's rewards, and the curves
over n."""

import itertools
import math

import numpy as np
import pytest

from rlhf_jax.evals.best_of_n import best_of_n_weights, curve, expected_rewards, kl_best_of_n


def test_kl_best_of_n_by_hand():
  assert kl_best_of_n(1) == 0.0
  assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
  assert kl_best_of_n(16) == pytest.approx(math.log(16) - 15 / 16)


def brute_force_expected_rewards(proxy_NxK, gold_NxK, n):
  """E over every n-subset of each prompt's answers of the proxy's choice's rewards (argmax:
  ties to the earlier answer)."""
  proxy_N, gold_N = [], []
  for proxy_K, gold_K in zip(proxy_NxK, gold_NxK):
    chosen = [subset[int(np.argmax(proxy_K[list(subset)]))]
              for subset in itertools.combinations(range(len(proxy_K)), n)]
    proxy_N.append(np.mean(proxy_K[chosen]))
    gold_N.append(np.mean(gold_K[chosen]))
  return np.array(proxy_N), np.array(gold_N)


@pytest.mark.parametrize('n', [1, 2, 3, 5, 6])
def test_expected_rewards_equal_the_mean_over_every_subset_of_n(n):
  rng = np.random.default_rng(n)
  proxy = rng.integers(0, 3, (5, 6)).astype(float)  # Many ties: they go to the earlier answer.
  gold = rng.random((5, 6))
  expected = brute_force_expected_rewards(proxy, gold, n)
  np.testing.assert_allclose(expected_rewards(proxy, gold, n), expected, rtol=1e-12)
  np.testing.assert_allclose(best_of_n_weights(proxy, n).sum(1), 1.0)


def test_best_of_n_weights_by_hand_and_bad_n():
  # Ranks 0, 2, 1, 3 among K = 4; n = 2: C(r, 1) / C(4, 2) = r / 6.
  np.testing.assert_allclose(best_of_n_weights(np.array([[0.1, 0.9, 0.5, 2.0]]), 2),
                             [[0, 2 / 6, 1 / 6, 3 / 6]])
  with pytest.raises(ValueError, match='n=8'):
    best_of_n_weights(np.zeros((1, 4)), 8)


def test_curve_reports_the_expected_rewards_of_the_choice():
  proxy = np.array([[0.1, 0.9, 0.5, 2.0], [3.0, 0.2, 0.1, 0.0]])
  gold = np.array([[1.0, 0.0, 0.5, 0.25], [0.5, 1.0, 1.0, 1.0]])
  records = curve(proxy, gold, [1, 2, 4])
  assert [r['n'] for r in records] == [1, 2, 4]
  # n = 1: every answer alike; n = 4: answers 3 and 0; n = 2: row 0 gold (0·1 + 2·0 + 1·0.5 +
  # 3·0.25)/6, row 1 (3·0.5 + 2·1 + 1·1 + 0·1)/6.
  assert [r['gold_reward'] for r in records] == pytest.approx(
      [(0.4375 + 0.875) / 2, (1.25 / 6 + 4.5 / 6) / 2, 0.375])
  assert records[0]['proxy_reward'] == pytest.approx((3.5 / 4 + 3.3 / 4) / 2)
  assert records[2]['proxy_reward'] == pytest.approx(2.5)
  assert records[2]['d'] == pytest.approx(math.sqrt(kl_best_of_n(4)))


def test_with_the_gold_as_proxy_the_gold_never_falls():
  """The expected best of n grows with n: no overoptimization without a proxy that differs from
  the gold."""
  gold = np.random.default_rng(0).random((200, 16))
  rewards = [r['gold_reward'] for r in curve(gold, gold, [1, 2, 4, 8, 16])]
  assert all(b >= a for a, b in zip(rewards, rewards[1:]))
  assert rewards[-1] > rewards[0] + 0.3  # E[max of 16 uniforms] = 16/17.
