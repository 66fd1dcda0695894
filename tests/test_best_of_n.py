"""Best-of-n: the KL formula, the choice among the first n answers, and the curves over n."""

import math

import numpy as np
import pytest

from rlhf_jax.evals.best_of_n import best_of_n, curve, kl_best_of_n


def test_kl_best_of_n_by_hand():
  assert kl_best_of_n(1) == 0.0
  assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
  assert kl_best_of_n(16) == pytest.approx(math.log(16) - 15 / 16)


def test_best_of_n_chooses_among_the_first_n():
  proxy = np.array([[0.1, 0.9, 0.5, 2.0],
                    [3.0, 0.2, 0.1, 0.0]])
  np.testing.assert_array_equal(best_of_n(proxy, 1), [0, 0])
  np.testing.assert_array_equal(best_of_n(proxy, 2), [1, 0])
  np.testing.assert_array_equal(best_of_n(proxy, 4), [3, 0])
  with pytest.raises(ValueError, match='n=8'):
    best_of_n(proxy, 8)


def test_curve_reports_the_chosen_answers_rewards():
  proxy = np.array([[0.1, 0.9, 0.5, 2.0], [3.0, 0.2, 0.1, 0.0]])
  gold = np.array([[1.0, 0.0, 0.5, 0.25], [0.5, 1.0, 1.0, 1.0]])
  records = curve(proxy, gold, [1, 2, 4])
  assert [r['n'] for r in records] == [1, 2, 4]
  # n=1: answers 0 and 0; n=2: 1 and 0; n=4: 3 and 0.
  assert [r['gold_reward'] for r in records] == pytest.approx([0.75, 0.25, 0.375])
  assert [r['proxy_reward'] for r in records] == pytest.approx([1.55, 1.95, 2.5])
  assert records[2]['d'] == pytest.approx(math.sqrt(kl_best_of_n(4)))


def test_with_the_gold_as_proxy_the_gold_never_falls():
  """The best of the first n is the best of a growing set: no overoptimization without a
  proxy that differs from the gold."""
  gold = np.random.default_rng(0).random((200, 16))
  rewards = [r['gold_reward'] for r in curve(gold, gold, [1, 2, 4, 8, 16])]
  assert all(b >= a for a, b in zip(rewards, rewards[1:]))
  assert rewards[-1] > rewards[0] + 0.3  # E[max of 16 uniforms] = 16/17.
