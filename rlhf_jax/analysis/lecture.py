"""Measurements of the phenomena that Stanford CS336 (2025) lecture 15 attributes to RLHF, on
the playground (experiments/lecture.py): how calibrated a policy's answers are, how diverse, how
a quantity trends over training, and the frontier of gold reward against KL per method.

Host-side NumPy: arrays in, numbers, dicts and figures out. Intervals are percentile bootstraps
over prompts (`bootstrap_interval`).
"""

import dataclasses
import io
import os
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax.errors import InputError
from rlhf_jax.evals.calibration import equal_mass_bins, expected_calibration_error, log_loss
from rlhf_jax.storage import open_file, replace_file


def bootstrap_interval(statistic: Callable[[np.ndarray], float], num_items: int, *,
                       num_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> list[float]:
  """[low, high]: the percentile interval of statistic(indices) over `num_resamples` draws of
  num_items indices with replacement (Efron & Tibshirani 1993)."""
  if num_items < 1 or num_resamples < 1:
    raise InputError(f'bootstrap_interval needs items and resamples, got {num_items} and '
                     f'{num_resamples}.')
  rng = np.random.default_rng(seed)
  values = [statistic(rng.integers(0, num_items, num_items)) for _ in range(num_resamples)]
  return [float(np.quantile(values, q, method='inverted_cdf'))
          for q in ((1 - confidence) / 2, (1 + confidence) / 2)]


def fit_temperature(confidence_GxN, correct_N, temperatures_G) -> float:
  """The temperature T of the grid whose confidences (the answers' probabilities with the
  logits divided by T, row g at temperatures_G[g]) give the least log loss: temperature
  scaling (Guo et al. 2017), fitted on held-out answers."""
  confidence_GxN = np.asarray(confidence_GxN)
  if confidence_GxN.shape[0] != len(temperatures_G):
    raise InputError(f'{confidence_GxN.shape[0]} rows of confidences for '
                     f'{len(temperatures_G)} temperatures.')
  losses = [log_loss(row, correct_N) for row in confidence_GxN]
  return float(temperatures_G[int(np.argmin(losses))])


def calibration_statistic(num_bins: int) -> Callable[[np.ndarray, np.ndarray], float]:
  """ece(confidence, correct): the ECE over num_bins equal-mass bins (Guo et al. 2017; equal
  mass as Kadavath et al. 2022 bin, so that no bin is nearly empty)."""
  return lambda confidence, correct: expected_calibration_error(
      confidence, correct, num_bins=num_bins, equal_mass=True)


def distinct_answers(answers_KxN: Sequence[Sequence[str]]) -> float:
  """The number of distinct answers among the K sampled per prompt, averaged over prompts."""
  if not answers_KxN or not answers_KxN[0]:
    raise InputError('distinct_answers needs at least one answer per prompt.')
  return float(np.mean([len(set(per_prompt)) for per_prompt in zip(*answers_KxN)]))


def trend(values) -> float:
  """Kendall's τ between the values and their order (−1: falling throughout, 1: rising)."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    raise InputError(f'A trend needs at least 2 values, got {values.size}.')
  return float(scipy.stats.kendalltau(np.arange(values.size), values).statistic)


@dataclasses.dataclass(frozen=True)
class Point:
  """One evaluated policy: per held-out prompt its KL to the SFT policy and its gold reward."""
  method: str
  run: str  # Which run of the method (a β, a KL target, …).
  step: int  # Training step, or n for best-of-n.
  kl_I: np.ndarray
  gold_I: np.ndarray

  @property
  def kl(self) -> float:
    return float(self.kl_I.mean())

  @property
  def gold(self) -> float:
    return float(self.gold_I.mean())


def envelope(points: Sequence[Point], kl_edges: Sequence[float], *, num_resamples: int = 1000,
             confidence: float = 0.95, seed: int = 0) -> list[dict]:
  """Per method and KL bin [kl_lo, kl_hi): the best mean gold among the method's points whose
  mean KL falls in the bin (the upper envelope of the DPO paper's figure 2 frontier), with a
  bootstrap interval over prompts (each replicate draws the prompts once for all points, then
  takes the best mean gold in the bin again). Bins without a point are left out."""
  sizes = {p.gold_I.size for p in points}
  if len(sizes) != 1:
    raise InputError(f'Every point must be measured on the same prompts; got sizes {sorted(sizes)}.')
  (num_prompts,) = sizes
  rows = []
  for method in dict.fromkeys(p.method for p in points):
    for lo, hi in zip(kl_edges[:-1], kl_edges[1:]):
      inside = [p for p in points if p.method == method and lo <= p.kl < hi]
      if not inside:
        continue
      gold_MxI = np.stack([p.gold_I for p in inside])
      best = int(np.argmax(gold_MxI.mean(axis=1)))
      rows.append({'method': method, 'kl_lo': float(lo), 'kl_hi': float(hi),
                   'gold': float(gold_MxI[best].mean()), 'kl': inside[best].kl,
                   'run': inside[best].run, 'step': inside[best].step,
                   'ci': bootstrap_interval(lambda i: gold_MxI[:, i].mean(axis=1).max(),
                                            num_prompts, num_resamples=num_resamples,
                                            confidence=confidence, seed=seed)})
  return rows


def save_arrays(arrays: dict, path: str) -> None:
  """The arrays as one .npz at `path` (local or a URL), replaced whole."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  replace_file(path, buffer.getvalue())


def save_points(points: Sequence[Point], path: str) -> None:
  """The points as one .npz: method, run, step [P] and kl, gold [P, I]."""
  save_arrays({'method': [p.method for p in points], 'run': [p.run for p in points],
               'step': [p.step for p in points], 'kl_PxI': np.stack([p.kl_I for p in points]),
               'gold_PxI': np.stack([p.gold_I for p in points])}, path)


def load_points(path: str) -> list[Point]:
  """The points `save_points` wrote."""
  with open_file(path, 'rb') as f, np.load(f) as z:
    return [Point(str(m), str(r), int(t), kl, gold) for m, r, t, kl, gold in
            zip(z['method'], z['run'], z['step'], z['kl_PxI'], z['gold_PxI'])]


def load_calibration(directory: str) -> dict[str, dict[str, np.ndarray]]:
  """{label: arrays} of every policy measured in `directory` (one .npz each)."""
  names = sorted(n for n in os.listdir(directory) if n.endswith('.npz'))
  measured = {}
  for name in names:
    with np.load(os.path.join(directory, name)) as f:
      arrays = dict(f)
    measured[str(arrays.pop('label'))] = arrays
  return measured


def own_confidence(arrays: dict[str, np.ndarray]) -> np.ndarray:
  """The confidence [N] at temperature 1 (the policy's own) of a `load_calibration` entry."""
  (t1,) = np.flatnonzero(arrays['temperatures_G'] == 1.0)
  return arrays['confidence_GxN'][t1]


def _interval(ci) -> str:
  return f'[{ci[0]:.3f}, {ci[1]:.3f}]'


def frontier_table(result: dict) -> list[str]:
  """Markdown lines: each method's best point, then the envelope by KL bin."""
  lines = ['| method | best gold | 95% interval | KL at best | run, step |', '|---|---|---|---|---|']
  lines += [f'| {m} | {r["gold"]:.3f} | {_interval(r["ci"])} | {r["kl"]:.2f} | '
            f'{r["run"]}, {r["step"]} |' for m, r in result['best'].items()]
  unimproved = [m for m, r in result['best'].items() if r['kl'] == 0.0]
  if unimproved:  # A comparison with such a method is won by default: say so.
    lines += ['', f'Never above its start on this run (best point at KL 0): {", ".join(unimproved)}.']
  lines += ['', '| method | KL bin | gold | 95% interval | KL |', '|---|---|---|---|---|']
  lines += [f'| {r["method"]} | [{r["kl_lo"]:g}, {r["kl_hi"]:g}) | {r["gold"]:.3f} | '
            f'{_interval(r["ci"])} | {r["kl"]:.2f} |' for r in result['envelope']]
  return lines


def calibration_table(result: dict) -> list[str]:
  """Markdown lines: per policy ECE, confidence, accuracy, temperature and diversity."""
  lines = [f'On {result["prompts"]} held-out prompts with one right answer; ECE over equal-mass '
           'bins, before and after the temperature fitted on the other half.', '',
           '| policy | ECE | 95% interval | mean confidence | accuracy | fitted T | '
           'ECE before T (half) | after | distinct answers |', '|---|---|---|---|---|---|---|---|---|']
  for label, ece in result['ece'].items():
    lines.append(
        f'| {label} | {ece["value"]:.3f} | {_interval(ece["ci"])} | '
        f'{result["mean_confidence"][label]:.3f} | {result["accuracy"][label]:.3f} | '
        f'{result["fitted_temperature"][label]:g} | '
        f'{result["ece_before_temperature"][label]:.3f} | '
        f'{result["ece_after_temperature"][label]:.3f} | '
        f'{result["distinct_answers"][label]:.2f} |')
  lines += ['', 'ECE(PPO) − ECE(SFT), 95% paired interval: '
            f'{_interval(result["ece_difference_ppo_minus_sft"])}. Entropy per token over PPO '
            'iterations, Kendall τ: ' + ', '.join(f'{run} {tau:+.2f}' for run, tau in
                                                 result['entropy_trend'].items()) + '.']
  return lines


def _figure(width: float, height: float, columns: int = 1):
  figure = Figure(figsize=(width, height), dpi=100, layout='constrained')
  FigureCanvasAgg(figure)
  return figure, figure.subplots(1, columns)


def _save(figure: Figure, path: str | None) -> Figure:
  if path is not None:
    with open_file(path, 'wb') as f:
      figure.savefig(f, format='png')
  return figure


def plot_calibration(policies: dict[str, tuple], entropy: dict[str, Sequence[float]],
                     path: str | None = None, *, num_bins: int = 10) -> Figure:
  """Left: each policy's reliability diagram (accuracy against confidence per equal-mass bin,
  policies: name -> (confidence, correct)); right: per-token entropy over training (entropy:
  run -> per-iteration values)."""
  figure, (left, right) = _figure(10, 4.2, 2)
  left.plot([0, 1], [0, 1], '--', color='gray', label='calibrated')
  for name, (confidence, correct) in policies.items():
    bins = equal_mass_bins(confidence, correct, num_bins=num_bins)
    ece = calibration_statistic(num_bins)(confidence, correct)
    left.plot(bins.confidence, bins.frequency, 'o-', label=f'{name} (ECE {ece:.3f})')
  left.set(xlim=(0, 1), ylim=(0, 1), xlabel='confidence (probability of the answer)',
           ylabel='accuracy', title='Reliability, equal-mass bins')
  left.legend(fontsize=8)
  for name, values in entropy.items():
    right.plot(np.arange(len(values)), values, label=name)
  right.set(xlabel='PPO iteration', ylabel='entropy per answer token (nats)',
            title='Entropy of the rollouts')
  if entropy:
    right.legend(fontsize=8)
  return _save(figure, path)


def plot_frontier(points: Sequence[Point], rows: Sequence[dict], path: str | None = None
                  ) -> Figure:
  """Gold reward against KL to the SFT policy: every evaluated point (small), each method's
  envelope (`envelope` rows: line through the bins' best points, bars for the intervals)."""
  figure, axis = _figure(6.5, 4.5)
  methods = list(dict.fromkeys(p.method for p in points))
  colors = dict(zip(methods, [f'C{i}' for i in range(len(methods))]))
  for method in methods:
    mine = [p for p in points if p.method == method]
    axis.scatter([p.kl for p in mine], [p.gold for p in mine], s=10, alpha=0.4,
                 color=colors[method])
    best = [r for r in rows if r['method'] == method]
    if best:
      axis.errorbar([r['kl'] for r in best], [r['gold'] for r in best],
                    yerr=np.abs(np.array([r['ci'] for r in best]).T
                                - np.array([r['gold'] for r in best])),
                    fmt='o-', color=colors[method], label=method, capsize=2)
  axis.set_xscale('symlog', linthresh=0.1)  # Linear below 0.1 nats, where KL starts.
  axis.set(xlabel='KL(π ‖ π_SFT) per prompt (nats)', ylabel='gold reward',
           title='Reward–KL frontier (envelope in KL bins)')
  axis.legend(fontsize=8)
  return _save(figure, path)
