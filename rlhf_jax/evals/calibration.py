"""Reward-model evaluation on held-out preference pairs: accuracy, calibration (ECE, reliability
diagram), agreement with a gold reward, and the Bradley-Terry accuracy ceiling. NumPy, host side.
"""

from typing import NamedTuple

import numpy as np
import scipy.special
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax.errors import InputError
from rlhf_jax.storage import open_file


class ReliabilityBins(NamedTuple):
  """Bins of predictions: edges [n+1]; count, confidence, frequency [n] (NaN if empty)."""
  edges: np.ndarray
  count: np.ndarray
  confidence: np.ndarray  # Mean predicted probability in the bin.
  frequency: np.ndarray  # Fraction of label 1 in the bin.


def _checked(probs, labels):
  probs, labels = np.ravel(probs).astype(np.float64), np.ravel(labels)
  if probs.size == 0 or probs.shape != labels.shape:
    raise InputError(f'probs ({probs.size}) and labels ({labels.size}) must be non-empty and '
                     'of the same size.')
  if not np.all((probs >= 0) & (probs <= 1)):
    raise InputError('probs must lie in [0, 1].')
  if not np.all((labels == 0) | (labels == 1)):
    raise InputError('labels must be 0 or 1.')
  return probs, labels.astype(np.float64)


def reliability_bins(probs, labels, *, num_bins: int = 10) -> ReliabilityBins:
  """Bins [k/n, (k+1)/n), the last one [1 − 1/n, 1]; per bin its count, mean prob, mean label."""
  if num_bins < 1:
    raise InputError(f'num_bins={num_bins}; need at least 1.')
  probs, labels = _checked(probs, labels)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bin_ids = np.clip(np.searchsorted(edges, probs, side='right') - 1, 0, num_bins - 1)
  count = np.bincount(bin_ids, minlength=num_bins)
  with np.errstate(invalid='ignore', divide='ignore'):  # Empty bins: 0 / 0 = NaN.
    confidence = np.bincount(bin_ids, probs, num_bins) / count
    frequency = np.bincount(bin_ids, labels, num_bins) / count
  return ReliabilityBins(edges, count, confidence, frequency)


def equal_mass_bins(probs, labels, *, num_bins: int = 10) -> ReliabilityBins:
  """The predictions sorted by probability, cut into num_bins bins of (nearly) equal counts, so
  that no bin is nearly empty when the probabilities crowd near 0 or 1 (Kadavath et al. 2022);
  edges are each bin's lowest probability, then the highest one."""
  probs, labels = _checked(probs, labels)
  if not 1 <= num_bins <= probs.size:
    raise InputError(f'num_bins={num_bins}: need 1 to {probs.size} (the predictions).')
  bins = np.array_split(np.argsort(probs, kind='stable'), num_bins)
  return ReliabilityBins(edges=np.array([probs[b[0]] for b in bins] + [probs[bins[-1][-1]]]),
                         count=np.array([b.size for b in bins]),
                         confidence=np.array([probs[b].mean() for b in bins]),
                         frequency=np.array([labels[b].mean() for b in bins]))


def _ece(bins: ReliabilityBins) -> float:
  filled = bins.count > 0
  weights = bins.count[filled] / bins.count.sum()
  return float(np.sum(weights * np.abs(bins.frequency[filled] - bins.confidence[filled])))


def expected_calibration_error(probs, labels, *, num_bins: int = 10,
                               equal_mass: bool = False) -> float:
  """ECE = Σ_bins (n_bin / N) · |mean(label) − mean(prob)| over equal-width bins, or equal-mass
  ones (Guo et al. 2017, "On Calibration of Modern Neural Networks")."""
  binning = equal_mass_bins if equal_mass else reliability_bins
  return _ece(binning(probs, labels, num_bins=num_bins))


def log_loss(probs, labels) -> float:
  """Mean −[y log p + (1 − y) log(1 − p)] of the labels y under the probabilities p."""
  probs, labels = _checked(probs, labels)
  probs = np.clip(probs, 1e-12, 1 - 1e-12)
  return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs)))


def reliability_diagram(probs, labels, path=None, *, num_bins: int = 10,
                        title: str | None = None) -> Figure:
  """The figure of empirical frequency per bin against the diagonal, the bin counts below;
  also written as a PNG to `path` (local or a URL) if given."""
  bins = reliability_bins(probs, labels, num_bins=num_bins)
  centers, width = (bins.edges[:-1] + bins.edges[1:]) / 2, 1.0 / num_bins
  figure = Figure(figsize=(4, 5), dpi=100, layout='constrained')
  FigureCanvasAgg(figure)
  top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  top.bar(centers, np.nan_to_num(bins.frequency), width, edgecolor='black', label='observed')
  top.plot([0, 1], [0, 1], '--', color='gray', label='perfect calibration')
  top.set(xlim=(0, 1), ylim=(0, 1), ylabel='fraction labelled 1',
          title=f'{title + ": " if title else ""}ECE = {_ece(bins):.3f}')
  top.legend(loc='upper left')
  bottom.bar(centers, bins.count, width, edgecolor='black')
  bottom.set(xlabel='predicted probability', ylabel='count')
  if path is not None:
    with open_file(path, 'wb') as f:
      figure.savefig(f, format='png')
  return figure


def _pairwise_accuracy(gaps) -> float:
  """Fraction of positive gaps; a zero gap counts 0.5."""
  return float(np.mean((np.sign(gaps) + 1) / 2))


def preference_metrics(rewards_chosen, rewards_rejected, *, gold_labels=None,
                       num_bins: int = 10) -> dict:
  """Accuracy and calibration of a reward model on held-out pairs labelled 'chosen ≻ rejected'.

  accuracy:  fraction with r_c > r_r (ties 0.5).
  mean_prob: mean of p = σ(r_c − r_r), the model's P(chosen ≻ rejected).
  ece:       ECE of the BT probabilities, evaluated symmetrically on both orientations of each
             pair: p with label 1 and 1 − p = P(rejected ≻ chosen) with label 0. In the
             labeler's orientation alone every label is 1, the ECE collapses to mean(1 − p)
             and rewards overconfidence; a BT model predicts both orders, so both are scored.
  gold_agreement (if gold_labels is given: 1 where the gold reward prefers 'chosen', 0 where it
             prefers 'rejected', NaN or −1 for gold ties, which are left out): fraction of pairs
             where sign(r_c − r_r) agrees with the gold preference (model ties 0.5; NaN if no
             pair is left).
  """
  chosen, rejected = np.ravel(rewards_chosen), np.ravel(rewards_rejected)
  if chosen.size == 0 or chosen.shape != rejected.shape:
    raise InputError(f'rewards_chosen ({chosen.size}) and rewards_rejected ({rejected.size}) '
                     'must be non-empty and of the same size.')
  gaps = chosen.astype(np.float64) - rejected
  probs = scipy.special.expit(gaps)
  both_probs = np.concatenate([probs, 1 - probs])
  both_labels = np.concatenate([np.ones_like(probs), np.zeros_like(probs)])
  metrics = {
      'accuracy': _pairwise_accuracy(gaps),
      'mean_prob': float(np.mean(probs)),
      'ece': expected_calibration_error(both_probs, both_labels, num_bins=num_bins),
  }
  if gold_labels is not None:
    gold = np.ravel(gold_labels).astype(np.float64)
    if gold.shape != gaps.shape:
      raise InputError(f'gold_labels has {gold.size} entries; expected one per pair '
                       f'({gaps.size}).')
    if not np.all(np.isin(gold, (0, 1, -1)) | np.isnan(gold)):
      raise InputError('gold_labels must be 1, 0, or NaN / -1 for a gold tie.')
    kept = (gold == 0) | (gold == 1)
    oriented_gaps = np.where(gold == 1, gaps, -gaps)[kept]
    metrics['gold_agreement'] = (_pairwise_accuracy(oriented_gaps) if kept.any()
                                 else float('nan'))
  return metrics


def bradley_terry_ceiling(gold_margins, *, temperature: float) -> float:
  """Highest expected accuracy of any reward model against labels drawn from a BT labeler.

  The labeler prefers 'chosen' with p = σ(Δ / T), Δ the gold reward gap. A reward model only
  predicts which side it prefers; for a pair it is right with probability p if it picks
  'chosen' and 1 − p otherwise. The Bayes-optimal choice takes the more likely label, right
  with max(p, 1 − p) = σ(|Δ| / T), and no predictor does better pair by pair, so the ceiling is
  mean_pairs max(p, 1 − p): 0.5 at Δ = 0 (coin-flip labels), → 1 as |Δ| / T → ∞.
  """
  if temperature <= 0:
    raise InputError(f'temperature={temperature}; must be positive.')
  probs = scipy.special.expit(np.asarray(gold_margins, np.float64) / temperature)
  return float(np.mean(np.maximum(probs, 1 - probs)))
