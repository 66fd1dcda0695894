"""The exact best-of-n distribution, KL and win rate of a discrete answer distribution, against
brute-force enumeration of the n draws, by hand, and in the continuous limit."""

import itertools
import math

import numpy as np
import pytest

from rlhf_jax.evals.best_of_n import kl_best_of_n
from rlhf_jax.evals.bon_kl import (best_of_n_distribution, empirical_distribution,
                                   kl_best_of_n_exact, kl_best_of_n_from_samples,
                                   win_rate_best_of_n)


def brute_force_choices(probs, rewards, n):
  """Every n-tuple of answers drawn with replacement: (its probability Π p, {answer: chance that
  BoN picks it}), the argmax by reward breaking ties uniformly among the tuple's draws."""
  for draws in itertools.product(range(len(probs)), repeat=n):
    best = max(rewards[d] for d in draws)
    winners = [d for d in draws if rewards[d] == best]
    picks = {}
    for d in winners:
      picks[d] = picks.get(d, 0.0) + 1 / len(winners)
    yield math.prod(probs[d] for d in draws), picks


def brute_force_bon(probs, rewards, n):
  bon_M = np.zeros(len(probs))
  for weight, picks in brute_force_choices(probs, rewards, n):
    for d, chance in picks.items():
      bon_M[d] += weight * chance
  return bon_M


def brute_force_win_rate(probs, rewards, n):
  """E over the n draws of BoN and one more draw y' of 1(r(y) > r(y')) + ½ 1(r(y) = r(y'))."""
  win = 0.0
  for weight, picks in brute_force_choices(probs, rewards, n):
    for d, chance in picks.items():
      for other, p_other in enumerate(probs):
        score = 1.0 if rewards[d] > rewards[other] else 0.5 if rewards[d] == rewards[other] else 0
        win += weight * chance * p_other * score
  return win


def random_distribution(rng, m, ties):
  """Dirichlet probabilities; rewards from {0, 1} (ties) or all distinct."""
  probs = rng.dirichlet(np.ones(m))
  rewards = rng.integers(0, 2, m).astype(float) if ties else rng.permutation(m).astype(float)
  return probs, rewards


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('m', [1, 2, 3, 4, 5])
def test_distribution_and_kl_match_brute_force(m, ties):
  rng = np.random.default_rng(10 * m + ties)
  for n in range(1, 6):
    probs, rewards = random_distribution(rng, m, ties)
    bon = brute_force_bon(probs, rewards, n)
    np.testing.assert_allclose(best_of_n_distribution(probs, rewards, n), bon, rtol=1e-10,
                               atol=1e-14)
    assert kl_best_of_n_exact(probs, rewards, n) == pytest.approx(
        np.sum(bon * np.log(bon / probs)), rel=1e-9, abs=1e-13)


def test_ties_split_in_proportion_and_zero_probabilities():
  # Answers 0 and 2 tie at the top (mass 0.5), answer 3 has probability 0, n = 2:
  # π_bon(top block) = 1 − 0.5² = 0.75, split 0.2 : 0.3; π_bon(answer 1) = 0.5² = 0.25.
  probs = np.array([0.2, 0.5, 0.3, 0.0])
  rewards = np.array([1.0, 0.0, 1.0, 0.5])
  np.testing.assert_allclose(best_of_n_distribution(probs, rewards, 2), [0.3, 0.25, 0.45, 0.0])
  np.testing.assert_allclose(best_of_n_distribution(probs, rewards, 2),
                             brute_force_bon(probs, rewards, 2), atol=1e-15)
  # Ratios π_bon / p: 1.5 on the top block, 0.5 on answer 1.
  assert kl_best_of_n_exact(probs, rewards, 2) == pytest.approx(
      0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def test_by_hand_two_equiprobable_answers():
  # p = (0.5, 0.5), r = (0, 1), n = 2: π_bon = (0.5², 1 − 0.5²) = (0.25, 0.75),
  # KL = 0.25 log(0.25 / 0.5) + 0.75 log(0.75 / 0.5) = 0.25 log 0.5 + 0.75 log 1.5 ≈ 0.1308.
  probs, rewards = [0.5, 0.5], [0.0, 1.0]
  np.testing.assert_allclose(best_of_n_distribution(probs, rewards, 2), [0.25, 0.75])
  assert kl_best_of_n_exact(probs, rewards, 2) == pytest.approx(
      0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)
  # Win rate: 0.25 (0 + ½·0.5) + 0.75 (0.5 + ½·0.5) = 0.625 = 2/3 − 2·0.5³/6 < 2/3.
  assert win_rate_best_of_n(probs, rewards, 2) == pytest.approx(0.625, rel=1e-12)


def test_kl_is_zero_for_one_draw_or_one_answer():
  rng = np.random.default_rng(0)
  for ties in (False, True):
    probs, rewards = random_distribution(rng, 7, ties)
    assert kl_best_of_n_exact(probs, rewards, 1) == pytest.approx(0.0, abs=1e-14)
  for n in (1, 2, 16, 1000):
    assert kl_best_of_n_exact([1.0], [0.3], n) == 0.0
    # All answers tied: BoN cannot tell them apart.
    assert kl_best_of_n_exact(probs, np.ones(7), n) == pytest.approx(0.0, abs=1e-14)


def test_kl_never_exceeds_the_formula_and_is_strictly_below_it_when_discrete():
  rng = np.random.default_rng(1)
  for _ in range(200):
    m = int(rng.integers(1, 30))
    probs, rewards = random_distribution(rng, m, ties=bool(rng.integers(2)))
    for n in (1, 2, 3, 8, 64):
      kl = kl_best_of_n_exact(probs, rewards, n)
      assert 0 <= kl + 1e-14
      assert kl <= kl_best_of_n(n) + 1e-12
  # Distinct rewards still fall short, as answers repeat: p = (0.5, 0.5), n = 2 gives
  # ≈ 0.1308 < log 2 − ½ ≈ 0.1931.
  assert kl_best_of_n_exact([0.5, 0.5], [0.0, 1.0], 2) < kl_best_of_n(2) - 0.06


def test_kl_approaches_the_formula_for_many_equiprobable_answers():
  m, n = 2000, 4
  rewards = np.random.default_rng(2).permutation(m).astype(float)
  kl = kl_best_of_n_exact(np.full(m, 1 / m), rewards, n)
  assert kl < kl_best_of_n(n)
  assert kl == pytest.approx(kl_best_of_n(n), abs=1e-2)


@pytest.mark.parametrize('ties', [False, True])
def test_win_rate_matches_brute_force(ties):
  rng = np.random.default_rng(3 + ties)
  for m, n in itertools.product(range(1, 5), range(1, 5)):
    probs, rewards = random_distribution(rng, m, ties)
    assert win_rate_best_of_n(probs, rewards, n) == pytest.approx(
        brute_force_win_rate(probs, rewards, n), rel=1e-10)


def block_cdfs(probs, rewards):
  """F_B⁻ and F_B of each block of equal reward, ascending."""
  mass_B = np.array([probs[rewards == r].sum() for r in np.unique(rewards)])
  cdf_B = np.cumsum(mass_B)
  return cdf_B - mass_B, cdf_B


def test_win_rate_is_n_over_n_plus_1_less_the_trapezoid_deficit():
  """W = n/(n+1) − Σ_B δ_n, 0 < δ_n ≤ n(n − 1) q_B³/12 (equality at n = 2); W = ½ at n = 1."""
  rng = np.random.default_rng(5)
  for _ in range(50):
    probs, rewards = random_distribution(rng, int(rng.integers(1, 12)), bool(rng.integers(2)))
    below_B, cdf_B = block_cdfs(probs, rewards)
    assert win_rate_best_of_n(probs, rewards, 1) == pytest.approx(0.5, rel=1e-12)
    assert win_rate_best_of_n(probs, rewards, 2) == pytest.approx(
        2 / 3 - np.sum((cdf_B - below_B)**3) / 6, rel=1e-12)
    for n in (2, 3, 7, 32):
      deficit_B = (n * (cdf_B**(n + 1) - below_B**(n + 1)) / (n + 1) -
                   (cdf_B**n - below_B**n) * (cdf_B + below_B) / 2)
      # -1e-15: rounding near F = 0.
      assert np.all(deficit_B > -1e-15) and deficit_B.sum() > 0
      assert np.all(deficit_B <= n * (n - 1) * (cdf_B - below_B)**3 / 12 + 1e-15)
      win = win_rate_best_of_n(probs, rewards, n)
      assert win == pytest.approx(n / (n + 1) - deficit_B.sum(), rel=1e-12)
      assert win < n / (n + 1)


def test_win_rate_approaches_n_over_n_plus_1_in_the_continuous_limit():
  m = 2000
  rewards = np.random.default_rng(6).permutation(m).astype(float)
  for n in (2, 4, 16):
    win = win_rate_best_of_n(np.full(m, 1 / m), rewards, n)
    assert n / (n + 1) - 1e-6 < win < n / (n + 1)
  # n = 2: the deficit is m · (1/m)³ / 6 exactly.
  assert win_rate_best_of_n(np.full(m, 1 / m), rewards, 2) == pytest.approx(
      2 / 3 - 1 / (6 * m**2), rel=1e-12)


def test_empirical_distribution_merges_repeated_answers():
  probs, rewards = empirical_distribution(['a', 'b', 'a', 'c', 'a', 'b'],
                                          [1.0, 2.0, 1.0, 0.5, 1.0, 2.0])
  np.testing.assert_allclose(probs, [3 / 6, 2 / 6, 1 / 6])
  np.testing.assert_array_equal(rewards, [1.0, 2.0, 0.5])
  # The first occurrence's reward: 'x' and 'y' keep their exact tie despite noise on 'x'.
  _, rewards = empirical_distribution(['x', 'y', 'x'], [0.3, 0.3, 0.3 + 1e-16])
  assert rewards[0] == rewards[1]


def test_kl_from_samples_is_the_exact_kl_of_each_prompts_samples():
  rng = np.random.default_rng(7)
  vocab = ['yes', 'no', 'maybe', '42', 'Paris']
  reward_of = {w: float(rng.normal()) for w in vocab}
  answers_NxK = [list(rng.choice(vocab, 12, p=[0.5, 0.2, 0.15, 0.1, 0.05])) for _ in range(4)]
  answers_NxK.append(['yes'] * 12)  # One answer only: KL 0.
  rewards_NxK = np.array([[reward_of[a] for a in answers_K] for answers_K in answers_NxK])
  kl_N = kl_best_of_n_from_samples(answers_NxK, rewards_NxK, 4)
  assert kl_N.shape == (5,)
  for kl, answers_K, rewards_K in zip(kl_N, answers_NxK, rewards_NxK):
    probs, rewards = empirical_distribution(answers_K, rewards_K)
    assert len(probs) == len(set(answers_K))
    assert kl == kl_best_of_n_exact(probs, rewards, 4)
  assert kl_N[-1] == 0.0
  assert np.all(kl_N[:-1] > 0) and np.all(kl_N < kl_best_of_n(4))


@pytest.mark.parametrize('call, message', [
    (lambda: kl_best_of_n_exact([0.5, 0.5], [0, 1], 0), 'n=0'),
    (lambda: best_of_n_distribution([0.5, 0.5], [0, 1], 2.5), 'n=2.5'),
    (lambda: kl_best_of_n_exact([0.5, 0.4], [0, 1], 2), 'sum to 1'),
    (lambda: win_rate_best_of_n([1.5, -0.5], [0, 1], 2), 'non-negative'),
    (lambda: kl_best_of_n_exact([0.5, 0.5], [0, 1, 2], 2), 'differ in length'),
    (lambda: kl_best_of_n_exact([], [], 2), 'non-empty'),
    (lambda: kl_best_of_n_exact([0.5, 0.5], [0, np.nan], 2), 'finite'),
    (lambda: empirical_distribution(['a', 'b'], [1.0]), '2 answers'),
    (lambda: kl_best_of_n_from_samples([['a', 'b']], np.zeros((2, 2)), 2), '1 lists'),
])
def test_bad_inputs_raise_with_the_problem_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()
