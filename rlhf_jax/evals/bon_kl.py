"""The exact KL and win rate of best-of-n when answers repeat (a discrete answer distribution).

Best-of-n (BoN) draws n i.i.d. answers from a policy π and keeps the one the proxy rewards most.
The usual formula (Stiennon et al. 2020, Appendix G; Gao et al. 2022)

    KL(π_bon ‖ π) = log n − (n − 1)/n

holds only when the answers are continuous (no answer drawn twice, no equal rewards); for any
distribution it is an upper bound (Beirami et al. 2024, "Theoretical guarantees on the best-of-n
alignment policy"). Playground answers are short and repeat, so it overstates the KL.

Distinct answers y_1..y_m with probabilities p_i under π and proxy rewards r_i. Group answers of
equal reward into blocks B (BoN is indifferent among them; an answer of its own reward is a block
of one) and order the blocks by reward, ascending; q_B = Σ_{i∈B} p_i, F_B the CDF through B and
F_B⁻ = F_B − q_B the CDF below it. All n draws fall at or below B with probability F_B^n, so

    π_bon(B)   = F_B^n − (F_B⁻)^n,
    π_bon(y_i) = π_bon(B) · p_i / q_B              (i ∈ B: uniform tie-breaking among the draws),
    KL(π_bon ‖ π) = Σ_i π_bon(y_i) log(π_bon(y_i) / p_i) = Σ_B π_bon(B) log(π_bon(B) / q_B).

Win rate of BoN's answer over an independent answer y' ~ π under the proxy, ties counted ½:

    W = Σ_B π_bon(B) (F_B⁻ + q_B / 2) = Σ_B (F_B^n − (F_B⁻)^n) (F_B + F_B⁻) / 2.

This is the trapezoid rule for n/(n+1) = ∫₀¹ t d(t^n), block by block, so W = n/(n+1) − Σ_B δ_n,

    δ_n = ∫ (t − c) (g'(t) − g'(c)) dt over [F_B⁻, F_B],   g(t) = t^n,  c = (F_B⁻ + F_B)/2
        = n (F_B^(n+1) − (F_B⁻)^(n+1))/(n+1) − (F_B^n − (F_B⁻)^n)(F_B + F_B⁻)/2.

As g' increases, 0 < δ_n ≤ n(n − 1) q_B³/12 for n ≥ 2 and q_B > 0 (equality at n = 2:
W = 2/3 − Σ_B q_B³/6). Hence W = ½ at n = 1 and W < n/(n+1) for every n ≥ 2 and every discrete
distribution, even with no equal rewards among distinct answers: y' can be the very answer BoN
chose (probability p_i), a tie that costs BoN half a win. W reaches n/(n+1) only in the
continuous limit, max_B q_B → 0.

Rewards tie only when exactly equal (==). Probabilities must be ≥ 0 and sum to 1 within 1e-6;
they are then divided by their sum.
"""

import collections

import numpy as np

from rlhf_jax.errors import InputError

PROBABILITY_SUM_TOLERANCE = 1e-6


def _check_n(n) -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise InputError(f'n={n!r} must be an integer ≥ 1 (the number of answers best-of-n draws).')
  return int(n)


def _check_distribution(probs, rewards) -> tuple[np.ndarray, np.ndarray]:
  """probs and rewards as float [m] arrays, probs normalized; InputError on bad input."""
  probs_M = np.asarray(probs, dtype=np.float64)
  rewards_M = np.asarray(rewards, dtype=np.float64)
  if probs_M.ndim != 1 or probs_M.size == 0:
    raise InputError(f'probs must be a non-empty 1-D array, got shape {probs_M.shape}.')
  if rewards_M.shape != probs_M.shape:
    raise InputError(f'probs and rewards differ in length: shapes {probs_M.shape} and '
                     f'{rewards_M.shape}.')
  if not np.all(np.isfinite(probs_M)) or np.any(probs_M < 0):
    raise InputError(f'probs must be finite and non-negative, got min {probs_M.min()}.')
  total = probs_M.sum()
  if abs(total - 1) > PROBABILITY_SUM_TOLERANCE:
    raise InputError(f'probs must sum to 1 (within {PROBABILITY_SUM_TOLERANCE}), sum to {total}.')
  if not np.all(np.isfinite(rewards_M)):
    raise InputError('rewards must be finite (no NaN or inf).')
  return probs_M / total, rewards_M


def _blocks(probs_M, rewards_M):
  """Per answer its block index (blocks of equal reward, ascending); per block q_B, F_B⁻, F_B."""
  _, block_M = np.unique(rewards_M, return_inverse=True)
  mass_B = np.bincount(block_M.reshape(-1), weights=probs_M)
  cdf_B = np.minimum(np.cumsum(mass_B), 1.0)
  cdf_below_B = np.concatenate([[0.0], cdf_B[:-1]])
  return block_M.reshape(-1), mass_B, cdf_below_B, cdf_B


def best_of_n_distribution(probs, rewards, n: int) -> np.ndarray:
  """[m]: π_bon(y_i), the chance that best-of-n picks answer i (equal rewards form one block,
  whose BoN mass is split in proportion to p)."""
  n = _check_n(n)
  probs_M, rewards_M = _check_distribution(probs, rewards)
  block_M, mass_B, cdf_below_B, cdf_B = _blocks(probs_M, rewards_M)
  bon_B = cdf_B**n - cdf_below_B**n
  # A block of mass 0 gets BoN mass 0 (F_B = F_B⁻); its answers get 0, not 0/0.
  share_M = np.divide(probs_M, mass_B[block_M], out=np.zeros_like(probs_M),
                      where=mass_B[block_M] > 0)
  return bon_B[block_M] * share_M


def kl_best_of_n_exact(probs, rewards, n: int) -> float:
  """KL(π_bon ‖ π) = Σ_i π_bon(y_i) log(π_bon(y_i) / p_i), 0 log 0 = 0; ≤ log n − (n − 1)/n."""
  probs_M, rewards_M = _check_distribution(probs, rewards)
  bon_M = best_of_n_distribution(probs_M, rewards_M, n)
  chosen = bon_M > 0  # π_bon(y) > 0 implies p(y) > 0.
  return float(np.sum(bon_M[chosen] * np.log(bon_M[chosen] / probs_M[chosen])))


def win_rate_best_of_n(probs, rewards, n: int) -> float:
  """P(r(y) > r(y')) + ½ P(r(y) = r(y')) for y ~ π_bon and y' ~ π independent:

      W = Σ_B π_bon(B) (F_B⁻ + q_B / 2) = n/(n+1) − Σ_B δ_n(F_B⁻, F_B)

  (module docstring): ½ at n = 1, below n/(n+1) for n ≥ 2 since y' can be BoN's own answer;
  n/(n+1) only in the continuous limit."""
  n = _check_n(n)
  probs_M, rewards_M = _check_distribution(probs, rewards)
  _, mass_B, cdf_below_B, cdf_B = _blocks(probs_M, rewards_M)
  bon_B = cdf_B**n - cdf_below_B**n
  return float(np.sum(bon_B * (cdf_below_B + mass_B / 2)))


def empirical_distribution(answers, rewards) -> tuple[np.ndarray, np.ndarray]:
  """The plug-in distribution of K sampled answers (strings) of one prompt: per distinct answer,
  in order of first occurrence, its frequency / K and its reward.

  An answer's reward is that of its first occurrence: repeats of a string should score alike, and
  a mean of c equal floats can differ from them in the last bit, which would split a tie between
  different answers of equal reward.
  """
  rewards_K = np.asarray(rewards, dtype=np.float64)
  if rewards_K.ndim != 1 or len(answers) != rewards_K.size or rewards_K.size == 0:
    raise InputError(f'answers and rewards must be non-empty and of one length, got '
                     f'{len(answers)} answers and rewards of shape {rewards_K.shape}.')
  first_index = {}
  for k, answer in enumerate(answers):
    first_index.setdefault(answer, k)
  counts = collections.Counter(answers)
  probs_M = np.array([counts[a] for a in first_index]) / rewards_K.size
  return probs_M, rewards_K[list(first_index.values())]


def kl_best_of_n_from_samples(answers_NxK, rewards_NxK, n: int) -> np.ndarray:
  """[N]: per prompt, kl_best_of_n_exact of the empirical distribution of its K sampled answers
  (answers_NxK: N lists of K strings; rewards_NxK: [N, K] proxy rewards).

  The plug-in estimator: consistent as K grows, but with few samples per distinct answer it can
  be biased low, since answers not sampled get no mass (K distinct answers look like a uniform
  distribution over K, whatever the support beyond them).
  """
  rewards_NxK = np.asarray(rewards_NxK, dtype=np.float64)
  if rewards_NxK.ndim != 2 or len(answers_NxK) != rewards_NxK.shape[0]:
    raise InputError(f'answers_NxK must hold one list per row of rewards_NxK [N, K], got '
                     f'{len(answers_NxK)} lists and rewards of shape {rewards_NxK.shape}.')
  return np.array([kl_best_of_n_exact(*empirical_distribution(answers_K, rewards_K), n)
                   for answers_K, rewards_K in zip(answers_NxK, rewards_NxK)])
