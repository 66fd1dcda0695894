"""Simulated labelers: preference labels drawn from a Bradley-Terry model of a gold reward.

    P(a ≻ b) = σ((g_a − g_b + λ·(ℓ_a − ℓ_b) + κ·(c_a − c_b)) / T)

g is the gold reward, ℓ the response length in words, λ ≥ 0 a bias toward longer answers (the
length effect human labelers show; Singhal 2023), c = 1 for an answer said with confidence and
0 for one hedged ("I think …", `hedge`), κ ≥ 0 a bias toward confident answers (crowd workers
miss errors and like a confident tone: the lecture, after Hosking et al. 2024), T > 0 the
labelers' noise (T → 0: they always
pick the better answer; T = 0 exactly is that limit, ties broken by a coin). The label noise
puts a ceiling on any reward model's accuracy against these labels:
`rlhf_jax.evals.calibration.bradley_terry_ceiling`.
"""

import dataclasses

import numpy as np

from rlhf_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Labeler:
  temperature: float = 0.1
  length_bias: float = 0.0
  assertiveness_bias: float = 0.0

  def __post_init__(self):
    if self.temperature < 0:
      raise InputError(f'Labeler temperature must be >= 0, got {self.temperature}.')

  def preference_logit(self, gold_a, gold_b, length_a, length_b, confident_a=1.0,
                       confident_b=1.0) -> np.ndarray:
    """The labeler's margin in favour of a, before the temperature:
    g_a − g_b + λ(ℓ_a − ℓ_b) + κ(c_a − c_b)."""
    return (np.asarray(gold_a, np.float64) - np.asarray(gold_b, np.float64)
            + self.length_bias * (np.asarray(length_a) - np.asarray(length_b))
            + self.assertiveness_bias * (np.asarray(confident_a, np.float64)
                                         - np.asarray(confident_b, np.float64)))

  def probability(self, gold_a, gold_b, length_a, length_b, confident_a=1.0,
                  confident_b=1.0) -> np.ndarray:
    """P(a ≻ b); with temperature 0: 1, 0, or ½ on a tie."""
    logit = self.preference_logit(gold_a, gold_b, length_a, length_b, confident_a, confident_b)
    if self.temperature == 0:
      return 0.5 * (1 + np.sign(logit))
    return 1.0 / (1.0 + np.exp(-logit / self.temperature))

  def label(self, gold_a, gold_b, length_a, length_b, rng: np.random.Generator,
            confident_a=1.0, confident_b=1.0):
    """(a_preferred [N] bool, P(a ≻ b) [N]), one Bernoulli draw per pair."""
    p = self.probability(gold_a, gold_b, length_a, length_b, confident_a, confident_b)
    return rng.random(p.shape) < p, p


def num_words(text: str) -> int:
  return len(text.split())


HEDGE = 'I think'  # A hedged answer is the answer after it; the gold reads past it.


def hedge(answer: str) -> str:
  return f'{HEDGE} {answer}'


def is_confident(text: str) -> bool:
  """Said without a hedge."""
  return not text.startswith(HEDGE + ' ')


def without_hedge(text: str) -> str:
  return text[len(HEDGE) + 1:] if not is_confident(text) else text


def answer_words(prompts, responses) -> np.ndarray:
  """The words of each response, the length the labelers' bias sees, as a reward function (a
  reward that only length earns: Singhal et al. 2023's length-only PPO)."""
  del prompts
  return np.array([num_words(r) for r in responses], np.float64)
