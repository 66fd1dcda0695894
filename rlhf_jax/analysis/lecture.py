"""Measurements of the phenomena that Stanford CS336 (2025) lecture 15 attributes to RLHF, on
the playground (experiments/lecture.py): how calibrated a policy's answers are, how diverse, how
a quantity trends over training, the frontier of gold reward against KL per method, where
direct alignment's runs peak within their epoch, how much of a reward's gain is length,
what RL on some tasks costs the others, what instructions in pretraining's decay buy, and how
far AI labels can stand in for human ones.

Host-side NumPy: arrays in, numbers, dicts and figures out. Intervals are percentile bootstraps
over prompts (`bootstrap_interval`).
"""

import dataclasses
import functools
import io
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax.analysis.overoptimization import fit_rl, rl_gain
from rlhf_jax.errors import InputError
from rlhf_jax.evals.calibration import equal_mass_bins, expected_calibration_error, log_loss
from rlhf_jax.playground.labelers import hedge
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


def hump(points: Sequence[Point], *, num_resamples: int = 1000, confidence: float = 0.95,
         seed: int = 0) -> dict:
  """A run's evaluations in step order, the first at its start: the step and mean gold of its
  best point, its start and its last, and the bootstrap interval over prompts of best − last
  gold (the best chosen again in each replicate, so the interval is ≥ 0). 'ends_below_peak':
  the best is not the last point and the interval's low end is above 0, i.e. in more than
  (1 + confidence)/2 of the replicates the run ended below its peak."""
  if len(points) < 2:
    raise InputError(f'A run needs at least 2 evaluations, got {len(points)}.')
  gold_PxI = np.stack([p.gold_I for p in points])
  best = int(np.argmax(gold_PxI.mean(axis=1)))
  ci = bootstrap_interval(lambda i: gold_PxI[:, i].mean(axis=1).max() - gold_PxI[-1, i].mean(),
                          gold_PxI.shape[1], num_resamples=num_resamples,
                          confidence=confidence, seed=seed)
  return {'best_step': points[best].step, 'start_gold': points[0].gold,
          'best_gold': points[best].gold, 'last_gold': points[-1].gold,
          'best_minus_last_ci': ci, 'ends_below_peak': best < len(points) - 1 and ci[0] > 0}


def direct_alignment_overoptimization(runs: dict, accuracy: dict, *, num_resamples: int = 1000,
                                      seed: int = 0) -> dict:
  """Rafailov et al. (2024)'s measurements of direct alignment over one epoch.

  runs: {loss: {β: [Point] of the run's evaluations in step order, the first at step 0}};
  accuracy: {loss: {β: [the implicit reward's held-out pair accuracy at each point]}}.
  Per run (keyed loss, then f'{β:g}') its `hump` and the fraction of its steps at its best
  point ('peak_fraction_of_epoch'; each run is one epoch); per loss Gao et al.'s RL form
  R(d) = d (α − β log d) fitted to every β's points after the start (d = √KL to π_init, R the
  gold gained over the start; 'fit', 'r2') and the largest mean KL ('max_kl'); over every point
  after the start, Spearman's ρ between accuracy and gold ('accuracy_gold_spearman').
  'curves' keeps each run's step, d, gain and accuracy for the plot.
  """
  out = {key: {} for key in ('runs', 'peak_fraction_of_epoch', 'fit', 'r2', 'max_kl', 'curves')}
  pairs = []
  for loss, by_beta in runs.items():
    d_all, gain_all = [], []
    for key in ('runs', 'peak_fraction_of_epoch', 'curves'):
      out[key][loss] = {}
    for beta, points in by_beta.items():
      name, start = f'{beta:g}', points[0].gold
      result = hump(points, num_resamples=num_resamples, seed=seed)
      out['runs'][loss][name] = result
      out['peak_fraction_of_epoch'][loss][name] = result['best_step'] / points[-1].step
      d = [math.sqrt(max(p.kl, 0.0)) for p in points]
      gain = [p.gold - start for p in points]
      out['curves'][loss][name] = {'step': [p.step for p in points], 'd': d, 'gain': gain,
                                   'accuracy': list(accuracy[loss][beta])}
      d_all += d[1:]
      gain_all += gain[1:]
      pairs += list(zip(accuracy[loss][beta][1:], [p.gold for p in points[1:]]))
    out['fit'][loss] = fit_rl(d_all, gain_all)
    out['r2'][loss] = out['fit'][loss]['r2']
    out['max_kl'][loss] = max(p.kl for points in by_beta.values() for p in points)
  accuracies, golds = zip(*pairs)
  rho = (scipy.stats.spearmanr(accuracies, golds) if len(set(accuracies)) > 1
         and len(set(golds)) > 1 else None)  # Undefined where either never changes.
  out['accuracy_gold_spearman'] = {'rho': None if rho is None else float(rho.statistic),
                                   'p': None if rho is None else float(rho.pvalue),
                                   'points': len(pairs)}
  return out


def length_decomposition(length_init, score_init, length_final, score_final, *,
                         bin_width: int) -> dict:
  """Singhal et al. (2023)'s split of the reward gained from the initial answers to the final
  ones: answers binned by length (bins of bin_width words), the gain within each bin that both
  sets reach, averaged with weights = the bin's number of answers of both sets; the rest of the
  total gain is what moving between lengths bought. Returns {'total', 'within_bin',
  'within_bin_share' (within / total; None unless total > 0), 'bins' (how many were shared)}."""
  length_init, length_final = np.asarray(length_init), np.asarray(length_final)
  score_init, score_final = np.asarray(score_init, float), np.asarray(score_final, float)
  if bin_width < 1:
    raise InputError(f'bin_width must be ≥ 1 word, got {bin_width}.')
  bins_init, bins_final = length_init // bin_width, length_final // bin_width
  shared = np.intersect1d(bins_init, bins_final)
  gains = [score_final[bins_final == b].mean() - score_init[bins_init == b].mean()
           for b in shared]
  weights = [np.sum(bins_final == b) + np.sum(bins_init == b) for b in shared]
  total = float(score_final.mean() - score_init.mean())
  within = float(np.average(gains, weights=weights)) if len(shared) else 0.0
  return {'total': total, 'within_bin': within,
          'within_bin_share': within / total if total > 0 else None, 'bins': len(shared)}


def value_at_kl(kl, values, target: float) -> float:
  """A run's value at KL `target`, linear between its evaluations (kl increasing along the
  run is not assumed: the first crossing of `target` is taken); NaN if it never reaches it."""
  kl, values = np.asarray(kl, float), np.asarray(values, float)
  for i in range(1, kl.size):
    lo, hi = sorted((kl[i - 1], kl[i]))
    if lo <= target <= hi:
      t = 0.0 if hi == lo else (target - kl[i - 1]) / (kl[i] - kl[i - 1])
      return float(values[i - 1] + t * (values[i] - values[i - 1]))
  return math.nan


def mean_interval(values_I, *, num_resamples: int = 1000, seed: int = 0) -> dict:
  """{'value': the mean of a per-prompt measure, 'ci': its bootstrap interval over prompts}."""
  values_I = np.asarray(values_I, np.float64)
  return {'value': float(values_I.mean()), 'ci': bootstrap_interval(
      lambda i: values_I[i].mean(), len(values_I), num_resamples=num_resamples, seed=seed)}


def paired_change(before_I, after_I, *, num_resamples: int = 1000, seed: int = 0) -> dict:
  """{'value': mean(after − before), 'ci'}: the change of a per-prompt measure on the same
  prompts, with the bootstrap interval of its mean over them."""
  return mean_interval(np.asarray(after_I, np.float64) - np.asarray(before_I, np.float64),
                       num_resamples=num_resamples, seed=seed)


def gold_by_task(gold_I, task_I, *, num_resamples: int = 1000, seed: int = 0) -> dict:
  """{task: {'value', 'ci'}} of the mean gold over each task's prompts, and 'all'."""
  gold_I, task_I = np.asarray(gold_I, np.float64), np.asarray(task_I)
  groups = {task: gold_I[task_I == task] for task in sorted(set(task_I))} | {'all': gold_I}
  return {task: mean_interval(g, num_resamples=num_resamples, seed=seed)
          for task, g in groups.items()}


def safety_sweep(measured: dict, categories, *, small_share: float, num_resamples: int = 1000,
                 seed: int = 0) -> dict:
  """The safety-data sweep from each share's per-prompt measures, `measured[share]` =
  {'unsafe', 'contrast', 'unrelated': refusal rate per prompt, 'other_gold': gold per prompt}:
  by share (keys '<share:g>') the unsafe compliance (1 − refusal on held-out harmful requests),
  false refusal on the contrast set (also per XSTest category, `categories` naming each contrast
  prompt's) and on unrelated requests, and the other tasks' gold, each with its interval;
  Spearman's ρ between share and contrast false refusal; and, paired over prompts, the change
  of unsafe compliance from share 0 to `small_share` and of contrast false refusal from
  `small_share` to the largest share."""
  shares = sorted(measured)
  if 0 not in shares or small_share not in shares:
    raise InputError(f'config.safety.shares={tuple(shares)} needs 0 and small_share '
                     f'{small_share}.')
  bootstrap = {'num_resamples': num_resamples, 'seed': seed}
  categories = np.asarray(categories)
  out = {key: {} for key in ('unsafe_compliance', 'false_refusal_contrast',
                             'false_refusal_unrelated', 'other_tasks_gold',
                             'false_refusal_by_category')}
  for share in shares:
    m, key = measured[share], f'{share:g}'
    out['unsafe_compliance'][key] = mean_interval(1 - m['unsafe'], **bootstrap)
    out['false_refusal_contrast'][key] = mean_interval(m['contrast'], **bootstrap)
    out['false_refusal_unrelated'][key] = mean_interval(m['unrelated'], **bootstrap)
    out['other_tasks_gold'][key] = mean_interval(m['other_gold'], **bootstrap)
    out['false_refusal_by_category'][key] = {
        c: float(m['contrast'][categories == c].mean()) for c in dict.fromkeys(categories)}
  rates = [out['false_refusal_contrast'][f'{s:g}']['value'] for s in shares]
  rho = scipy.stats.spearmanr(shares, rates) if len(set(rates)) > 1 else None
  out['safety_overrefusal_spearman'] = {'rho': None if rho is None else float(rho.statistic),
                                        'p': None if rho is None else float(rho.pvalue),
                                        'shares': len(shares)}
  small, large = measured[small_share], measured[shares[-1]]
  out['compliance_change_to_small_share'] = paired_change(1 - measured[0]['unsafe'],
                                                          1 - small['unsafe'], **bootstrap)
  out['overrefusal_change_to_largest_share'] = paired_change(small['contrast'],
                                                             large['contrast'], **bootstrap)
  out['small_share'], out['largest_share'] = small_share, shares[-1]
  return out


def alignment_tax(first: dict, last: dict, nll_first: float, nll_last: float, trained_I, *,
                  num_resamples: int = 1000, seed: int = 0) -> dict:
  """What an RL run gained on the tasks it trained and paid on the rest (Ouyang et al. 2022's
  alignment tax), from its first and last evaluations on the same prompts (per prompt 'gold',
  'proxy', 'kl'): `trained_I` marks the prompts of trained tasks. The NLL of held-out
  pretraining text is measured on the same rows both times."""
  trained_I = np.asarray(trained_I, bool)
  if trained_I.all() or not trained_I.any():
    raise InputError('The alignment tax needs evaluation prompts of trained and of other tasks.')
  change = functools.partial(paired_change, num_resamples=num_resamples, seed=seed)
  return {'proxy_gain': change(first['proxy'][trained_I], last['proxy'][trained_I]),
          'trained_tasks_gold_change': change(first['gold'][trained_I], last['gold'][trained_I]),
          'other_tasks_gold_change': change(first['gold'][~trained_I], last['gold'][~trained_I]),
          'nll_increase': float(nll_last - nll_first), 'kl': float(np.mean(last['kl']))}


def alignment_tax_sweeps(runs: dict, *, base_beta: float) -> dict:
  """`alignment_tax` results of runs keyed (γ, β), arranged by sweep: 'tax' (the NLL increase
  and the other tasks' gold change) and 'proxy_gain', each {'ptx_coef': by γ at base_beta,
  'kl_coef': by β at γ = 0}, keys formatted '%g'; 'runs' lists every run."""
  out = {'runs': [{'ptx_coef': gamma, 'kl_coef': beta, **r}
                  for (gamma, beta), r in sorted(runs.items())],
         'tax': {'ptx_coef': {}, 'kl_coef': {}}, 'proxy_gain': {'ptx_coef': {}, 'kl_coef': {}}}
  for (gamma, beta), r in sorted(runs.items()):
    tax = {k: r[k] for k in ('nll_increase', 'other_tasks_gold_change')}
    for sweep, coef, member in (('ptx_coef', gamma, beta == base_beta),
                                ('kl_coef', beta, gamma == 0)):
      if member:
        out['tax'][sweep][f'{coef:g}'] = tax
        out['proxy_gain'][sweep][f'{coef:g}'] = r['proxy_gain']
  return out


def distinct_pairs(answers_KxN: Sequence[Sequence[str]]) -> np.ndarray:
  """[N, K/2]: whether candidates 2j and 2j+1 of a prompt (answers[k][i]) differ."""
  answers = np.array(answers_KxN, dtype=object).T
  return answers[:, 0::2] != answers[:, 1::2]


def _pair_mean(values_NxP, mask_NxP, *, num_resamples: int, seed: int) -> dict:
  """{'value', 'ci'}: the mean of values over the masked pairs, resampling prompts."""
  values_NxP, mask_NxP = np.asarray(values_NxP, np.float64), np.asarray(mask_NxP, bool)
  rows = np.flatnonzero(mask_NxP.any(1))
  if not rows.size:
    raise InputError('No pair to measure agreement on.')
  sums, counts = (values_NxP * mask_NxP).sum(1)[rows], mask_NxP.sum(1)[rows]
  return {'value': float(sums.sum() / counts.sum()), 'ci': bootstrap_interval(
      lambda i: sums[i].sum() / counts[i].sum(), len(rows), num_resamples=num_resamples,
      seed=seed)}


def labeler_agreement(scores_NxK, p_first_NxP, mask_NxP, *, num_resamples: int = 1000,
                      seed: int = 0) -> dict:
  """How often a Bradley-Terry labeler who prefers the first answer of pair (2j, 2j+1) with
  probability p_first picks the answer that `scores` rank higher (a tie: ½), in expectation
  over its draws; with scores None, how often two such labelers agree (p² + (1 − p)²)."""
  p = np.asarray(p_first_NxP, np.float64)
  if scores_NxK is None:
    agree = p**2 + (1 - p)**2
  else:
    first, second = scores_NxK[:, 0::2], scores_NxK[:, 1::2]
    agree = np.where(first == second, 0.5, np.where(first > second, p, 1 - p))
  return _pair_mean(agree, mask_NxP, num_resamples=num_resamples, seed=seed)


def ordering_agreement(scores_NxK, reference_NxK, mask_NxP, *, num_resamples: int = 1000,
                       seed: int = 0) -> dict:
  """The share of pairs (2j, 2j+1) whose reference values differ that `scores` order as the
  reference does (a tie in the scores: ½): a reward model's pairwise accuracy against gold."""
  first, second = scores_NxK[:, 0::2], scores_NxK[:, 1::2]
  ref_first, ref_second = reference_NxK[:, 0::2], reference_NxK[:, 1::2]
  agree = np.where(first == second, 0.5, ((first > second) == (ref_first > ref_second)) * 1.0)
  return _pair_mean(agree, np.asarray(mask_NxP, bool) & (ref_first != ref_second),
                    num_resamples=num_resamples, seed=seed)


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


def _share(value) -> str:
  return 'none (no gain)' if value is None else f'{value:.2f}'


def _percent(share: float) -> str:
  return f'{100 * share:g} %'


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


def daa_overoptimization_table(result: dict) -> list[str]:
  """Markdown lines: per loss and β where the run peaked and how far it fell; per loss the
  fitted RL form; the accuracy–gold correlation."""
  lines = ['| loss | β | best step (fraction of the epoch) | gold: start → best → last | '
           'best − last, 95% interval | ends below its peak |', '|---|---|---|---|---|---|']
  for loss, by_beta in result['runs'].items():
    for beta, r in by_beta.items():
      lines.append(f'| {loss} | {beta} | {r["best_step"]} '
                   f'({result["peak_fraction_of_epoch"][loss][beta]:.2f}) | '
                   f'{r["start_gold"]:.3f} → {r["best_gold"]:.3f} → {r["last_gold"]:.3f} | '
                   f'{_interval(r["best_minus_last_ci"])} | '
                   f'{"yes" if r["ends_below_peak"] else "no"} |')
  lines += ['', '| loss | α | β | R² | fitted peak d | largest KL |', '|---|---|---|---|---|---|']
  for loss, fit in result['fit'].items():
    peak = 'none' if fit['peak_d'] is None else f'{fit["peak_d"]:.2f}'
    lines.append(f'| {loss} | {fit["alpha"]:.3f} | {fit["beta"]:.3f} | {fit["r2"]:.3f} | '
                 f'{peak} | {result["max_kl"][loss]:.2f} |')
  rho = result['accuracy_gold_spearman']
  value = ('undefined (one of them never changed)' if rho['rho'] is None
           else f"{rho['rho']:+.2f} (p = {rho['p']:.2g})")
  lines += ['', f"Implicit reward's held-out accuracy against gold, over {rho['points']} "
            f'evaluations after the start: Spearman ρ = {value}.']
  return lines


def length_table(result: dict) -> list[str]:
  """Markdown lines: per λ the words gained and Singhal's split; the length-only PPO; DPO and
  its length-aware variants at a matched KL."""
  lines = ['| labelers\' λ | words gained, PPO | best-of-n | PPO proxy gain | within length bins '
           '| share |', '|---|---|---|---|---|---|']
  for bias, growth in result['length_growth'].items():
    split = result['decomposition'][bias]
    lines.append(f'| {bias} | {growth["ppo"]:+.2f} | {growth["best-of-n"]:+.2f} | '
                 f'{split["total"]:+.3f} | {split["within_bin"]:+.3f} | '
                 f'{_share(split["within_bin_share"])} |')
  difference, win, gold = (result[k] for k in ('growth_difference', 'length_only_win_rate',
                                                'length_only_gold_delta'))
  variants = result['dpo_variants']
  lines += ['', f'PPO\'s words gained, most biased λ minus λ = 0: {difference["value"]:+.2f} '
            f'{_interval(difference["ci"])}. PPO against a length-only reward: win rate against '
            f'π_init under the most biased labelers {win["value"]:.3f} {_interval(win["ci"])}, '
            f'gold {gold["value"]:+.3f} {_interval(gold["ci"])}.', '',
            f'| loss (most biased λ\'s pairs) | words gained at KL {variants["matched_kl"]:.2f} |',
            '|---|---|']
  lines += [f'| {loss} | {g:+.2f} |' for loss, g in variants['length_growth'].items()]
  if result['rdpo_length_growth_ratio'] is not None:
    lines += ['', f'R-DPO / DPO words gained: {result["rdpo_length_growth_ratio"]:.2f}.']
  return lines


def alignment_tax_table(result: dict) -> list[str]:
  """Markdown lines: per run its coefficients, what it gained and what it cost."""
  lines = [f'PPO against the proxy on {", ".join(result["tasks"])} prompts only; first → last '
           'evaluation, on held-out prompts of the trained tasks and of the others, and on '
           'held-out pretraining text.', '',
           '| γ (PPO-ptx) | β (KL) | KL | proxy gain, trained tasks | gold change, trained | '
           'gold change, other tasks | pretraining NLL increase |',
           '|---|---|---|---|---|---|---|']
  for r in result['runs']:
    lines.append(
        f'| {r["ptx_coef"]:g} | {r["kl_coef"]:g} | {r["kl"]:.2f} | '
        + ' | '.join(f'{r[k]["value"]:+.3f} {_interval(r[k]["ci"])}' for k in (
            'proxy_gain', 'trained_tasks_gold_change', 'other_tasks_gold_change'))
        + f' | {r["nll_increase"]:+.4f} |')
  return lines


def midtraining_table(result: dict) -> list[str]:
  """Markdown lines: gold per arm and task, and the paired differences between arms."""
  arms = list(result['gold'])
  columns = list(result['gold'][arms[0]])
  lines = [f'Decay-stage weights of the mixed arm: {result["decay_weights"]}; SFT of '
           f'{result["sft_steps"]} steps after each base (twice that in "text/sft-double").', '',
           '| arm | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
  lines += [f'| {arm} | ' + ' | '.join(f'{g["value"]:.3f} {_interval(g["ci"])}'
                                       for g in result['gold'][arm].values()) + ' |'
            for arm in arms]
  lines += [''] + [f'{label}: {result[key]["value"]:+.3f} {_interval(result[key]["ci"])}.'
                   for label, key in (('Mixed decay − text-only, same SFT', 'gain_over_text_only'),
                                      ('Twice the SFT − once, text-only base', 'double_sft_gain'),
                                      ('Mixed decay − text-only with twice the SFT',
                                       'mixed_minus_double_sft'))]
  return lines


def fact_sweep(measured: dict, *, idk_share: float, num_resamples: int = 1000,
               seed: int = 0) -> dict:
  """The unknown-facts sweep from each arm's per-question answer shares, measured[(share, idk)]
  = {'<set>/<kind>': [Q]} (sets 'known', 'unknown' held out, 'sft_unknown' the SFT's own;
  kinds right, hallucination, abstention): by unknown share (keys '<share:g>') the accuracy on
  known questions, hallucination and abstention on known and unknown ones, how many SFT unknown
  questions are fitted; the change of known accuracy from share 0 to the largest, paired over
  questions; and the IDK variant at `idk_share` against the same share without it."""
  bootstrap = {'num_resamples': num_resamples, 'seed': seed}
  shares = sorted(share for share, idk in measured if not idk)

  def rates(m) -> dict:
    return {'known_accuracy': mean_interval(m['known/right'], **bootstrap),
            'hallucination_rate': {s: mean_interval(m[f'{s}/hallucination'], **bootstrap)
                                   for s in ('known', 'unknown')},
            'abstention_rate': {s: mean_interval(m[f'{s}/abstention'], **bootstrap)
                                for s in ('known', 'unknown')},
            'sft_unknown_fitted': float(m['sft_unknown/right'].mean())}

  by_share = {f'{share:g}': rates(measured[share, False]) for share in shares}
  out = {key: {share: r[key] for share, r in by_share.items()}
         for key in ('known_accuracy', 'hallucination_rate', 'abstention_rate',
                     'sft_unknown_fitted')}
  out['known_accuracy_change'] = paired_change(measured[0.0, False]['known/right'],
                                               measured[shares[-1], False]['known/right'],
                                               **bootstrap)
  plain, idk = measured[idk_share, False], measured[idk_share, True]
  out['idk_variant'] = rates(idk) | {
      'share': idk_share,
      'hallucination_change': paired_change(plain['unknown/hallucination'],
                                            idk['unknown/hallucination'], **bootstrap),
      'known_accuracy_change': paired_change(plain['known/right'], idk['known/right'],
                                             **bootstrap)}
  out['largest_share'] = shares[-1]
  return out


def unknown_facts_table(result: dict) -> list[str]:
  """Markdown lines: per unknown share (and the IDK variant) accuracy, hallucination and
  abstention on held-out questions about known and unknown facts."""
  q = result['questions']
  lines = [f'SFT of the knowledge base on {result["examples"]} questions ({result["steps"]} '
           f'steps, seeds {result.get("seeds", [0])}); held out: {q["known"]} questions about '
           'facts its pretraining stated, '
           f'{q["unknown"]} about facts it never saw, {result["samples"]} answers each.', '',
           '| unknown share | known: accuracy | known: hallucination | unknown: hallucination '
           '| unknown: abstention | SFT unknown fitted |', '|---|---|---|---|---|---|']
  arms = [(_percent(float(s)), {k: result[k][s] for k in (
      'known_accuracy', 'hallucination_rate', 'abstention_rate', 'sft_unknown_fitted')})
          for s in result['known_accuracy']]
  idk = result['idk_variant']
  arms.append((f'{_percent(idk["share"])}, answered IDK', idk))
  for label, r in arms:
    cells = [r['known_accuracy'], r['hallucination_rate']['known'],
             r['hallucination_rate']['unknown'], r['abstention_rate']['unknown']]
    lines.append(f'| {label} | ' + ' | '.join(f'{c["value"]:.3f} {_interval(c["ci"])}'
                                              for c in cells)
                 + f' | {r["sft_unknown_fitted"]:.3f} |')
  change = result['known_accuracy_change']
  lines += ['', f'Known accuracy, {_percent(result["largest_share"])} − 0 % unknown: '
            f'{change["value"]:+.3f} {_interval(change["ci"])}; IDK − colors at '
            f'{_percent(idk["share"])}: unknown hallucination '
            f'{idk["hallucination_change"]["value"]:+.3f} '
            f'{_interval(idk["hallucination_change"]["ci"])}, known accuracy '
            f'{idk["known_accuracy_change"]["value"]:+.3f} '
            f'{_interval(idk["known_accuracy_change"]["ci"])}.']
  return lines + _seed_lines(result.get('by_seed'))


def hedge_when_unsure(answers_KxN: Sequence[Sequence[str]], unsure_below: float) -> list:
  """The answers [K][N], each hedged (`labelers.hedge`) where it is less than `unsure_below`
  of its prompt's K answers: a policy that says "I think" when its own samples disagree with
  it (self-consistency as confidence; Wang et al. 2022)."""
  columns = list(zip(*answers_KxN))  # Per prompt, its K answers.
  share = [{a: column.count(a) / len(column) for a in set(column)} for column in columns]
  return [[a if share[i][a] >= unsure_below else hedge(a) for i, a in enumerate(row)]
          for row in answers_KxN]


def tone_curves(curves: dict, *, num_resamples: int = 1000, seed: int = 0) -> dict:
  """Best-of-n under each proxy of the assertiveness sweep, curves[κ][name] = [(n, KL [N],
  value [N])] for names confident_wrong, confident and gold: per κ (keys '<κ:g>') n, d = √KL
  and the rate of confident wrong answers with its interval at the largest n, the confident
  share and the gold; and the most biased proxy's confident-wrong rate at the largest n minus
  the unbiased one's ('0'), paired over prompts."""
  bootstrap = {'num_resamples': num_resamples, 'seed': seed}
  out = {'confident_wrong_rate': {}, 'confident_share': {}, 'gold': {}}
  for bias, named in curves.items():
    wrong = named['confident_wrong']
    out['confident_wrong_rate'][bias] = {
        'n': [n for n, _, _ in wrong], 'd': [float(np.sqrt(kl.mean())) for _, kl, _ in wrong],
        'rate': [float(v.mean()) for _, _, v in wrong],
        'at_n_max': mean_interval(wrong[-1][2], **bootstrap)}
    for name, key in (('confident', 'confident_share'), ('gold', 'gold')):
      out[key][bias] = [float(v.mean()) for _, _, v in named[name]]
  most = max(curves, key=float)
  out['biased_minus_unbiased'] = paired_change(curves['0']['confident_wrong'][-1][2],
                                               curves[most]['confident_wrong'][-1][2],
                                               **bootstrap)
  out['most_biased'] = float(most)
  return out


def assertive_labelers_table(result: dict) -> list[str]:
  """Markdown lines: per assertiveness bias, best-of-n's confident-wrong rate, confident share
  and gold at n = 1 and at the largest n."""
  lines = [f'π_init\'s candidate answers to {result["prompts"]} verifiable prompts, hedged '
           f'("I think …") where its own samples disagree with it ({result["hedged_share"]:.2f} '
           'of them); proxies on the same comparisons with half their answers hedged, labelled '
           'with assertiveness bias κ.', '',
           '| κ | n | d | confident wrong | confident | gold |', '|---|---|---|---|---|---|']
  for bias, wrong in result['confident_wrong_rate'].items():
    for i in (0, -1):
      rate = (f'{wrong["rate"][i]:.3f}' if i == 0 else
              f'{wrong["at_n_max"]["value"]:.3f} {_interval(wrong["at_n_max"]["ci"])}')
      lines.append(f'| {bias} | {wrong["n"][i]} | {wrong["d"][i]:.2f} | {rate} | '
                   f'{result["confident_share"][bias][i]:.3f} | {result["gold"][bias][i]:.3f} |')
  change = result['biased_minus_unbiased']
  lines += ['', f'Confident wrong at the largest n, κ {result["most_biased"]:g} − κ 0: '
            f'{change["value"]:+.3f} {_interval(change["ci"])}.']
  return lines


def safety_table(result: dict) -> list[str]:
  """Markdown lines: per safety share what the policy complies with and refuses."""
  lines = [f'SFT of the knowledge base on {result["examples"]} rows per share '
           f'({result["steps"]} steps, seeds {result.get("seeds", [0])}), a share of them harmful '
           'requests answered with a refusal. Held out: '
           f'{result["prompts"]["unsafe"]} harmful requests (new people), '
           f'{result["prompts"]["contrast"]} XSTest-style safe requests with the same verbs, '
           f'{result["prompts"]["unrelated"]} unrelated safe requests ({result["samples"]} '
           f'answers each), {result["prompts"]["other_tasks"]} prompts of the other tasks.', '',
           '| safety share | unsafe compliance | false refusal, contrast | false refusal, '
           'unrelated | other tasks\' gold |', '|---|---|---|---|---|']
  for share in result['unsafe_compliance']:
    lines.append(f'| {_percent(float(share))} | ' + ' | '.join(
        f'{result[k][share]["value"]:.3f} {_interval(result[k][share]["ci"])}'
        for k in ('unsafe_compliance', 'false_refusal_contrast', 'false_refusal_unrelated',
                  'other_tasks_gold')) + ' |')
  rho = result['safety_overrefusal_spearman']
  small, large = _percent(result['small_share']), _percent(result['largest_share'])
  lines += ['', f'Unsafe compliance, {small} − 0 %: '
            f'{result["compliance_change_to_small_share"]["value"]:+.3f} '
            f'{_interval(result["compliance_change_to_small_share"]["ci"])}; contrast false '
            f'refusal, {large} − {small}: '
            f'{result["overrefusal_change_to_largest_share"]["value"]:+.3f} '
            f'{_interval(result["overrefusal_change_to_largest_share"]["ci"])}; Spearman ρ '
            f'(share, contrast false refusal) = '
            + ('undefined (one value)' if rho['rho'] is None else
               f'{rho["rho"]:+.2f} (p {rho["p"]:.3f}, {rho["shares"]} shares)') + '.']
  return lines + _seed_lines(result.get('by_seed'))


def _seed_lines(by_seed: dict | None) -> list[str]:
  """'Per seed' lines: each measure's value in each replicated run, by arm."""
  if not by_seed:
    return []
  measures = list(next(iter(by_seed.values())))
  return ['', 'Per seed (run-to-run spread): ' + '; '.join(
      f'{measure.replace("_", " ")} ' + ', '.join(
          f'{arm}: ' + '/'.join(f'{v:.2f}' for v in values[measure])
          for arm, values in by_seed.items()) for measure in measures) + '.']


def rlaif_table(result: dict) -> list[str]:
  """Markdown lines: the AI labeler's agreement, each proxy's accuracy and best-of-n gold."""
  c = result['comparisons']
  lines = [f'AI labeler: a reward model on {c["ai_labeler"]} human-labelled comparisons; '
           f'proxies on {c["proxies"]} comparisons labelled by the humans or by it. On pairs '
           "of distinct candidate answers of π_init:", '',
           '| measure | value | 95% interval |', '|---|---|---|']
  rows = [('AI labeler agrees with a human labeler', result['ai_human_agreement']),
          ('two human labelers agree', result['human_human_agreement']),
          ('AI labeler orders the pair as the gold does', result['ai_gold_agreement'])]
  rows += [(f'proxy on {label} labels orders the pair as the gold does', r)
           for label, r in result['rm_accuracy'].items()]
  rows += [(f'best-of-{result["bon_gold"][label]["n"][-1]} gold under the proxy on {label} '
            'labels', r['at_n_max']) for label, r in result['bon_gold'].items()]
  lines += [f'| {name} | {r["value"]:.3f} | {_interval(r["ci"])} |' for name, r in rows]
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


def plot_daa_overoptimization(result: dict, path: str | None = None) -> Figure:
  """Per loss: gold gained against d = √KL over the epoch, a line per β, and Gao et al.'s RL
  form fitted to all of them (dashed); last panel: gold against the implicit reward's
  held-out accuracy at every evaluation after the start."""
  curves = result['curves']
  figure, axes = _figure(3.6 * (len(curves) + 1), 3.8, len(curves) + 1)
  for axis, (loss, by_beta) in zip(axes, curves.items()):
    for beta, curve in by_beta.items():
      axis.plot(curve['d'], curve['gain'], 'o-', markersize=3, label=f'β {beta}')
      axes[-1].scatter(curve['accuracy'][1:], curve['gain'][1:], s=12,
                       label=f'{loss}, β {beta}')
    fit = result['fit'][loss]
    d = np.linspace(0, max(c['d'][-1] for c in by_beta.values()) * 1.05, 100)
    axis.plot(d, rl_gain(d, alpha=fit['alpha'], beta=fit['beta']), '--', color='gray',
              label=f'fit, R² {fit["r2"]:.2f}')
    axis.axhline(0, color='black', linewidth=0.5)
    axis.set(xlabel='d = √KL(π ‖ π_SFT)', ylabel='gold gained', title=f'{loss}, one epoch')
    axis.legend(fontsize=7)
  axes[-1].set(xlabel="implicit reward's held-out pair accuracy", ylabel='gold gained',
               title='Accuracy against gold')
  axes[-1].legend(fontsize=6)
  return _save(figure, path)


def plot_length(result: dict, path: str | None = None) -> Figure:
  """Left: mean words against d = √KL per labelers' λ, PPO (solid) and best-of-n (dashed),
  and the length-only PPO (dotted); middle: PPO's proxy-reward gain and its part within length
  bins per λ; right: words against KL for DPO and its length-aware variants."""
  figure, (left, middle, right) = _figure(13, 4, 3)
  biases = list(result['length_growth'])
  for i, bias in enumerate(biases):
    curves = result['curves'][bias]
    left.plot(curves['ppo']['d'], curves['ppo']['words'], 'o-', color=f'C{i}',
              label=f'PPO, λ {bias}')
    left.plot(curves['best-of-n']['d'], curves['best-of-n']['words'], 's--', color=f'C{i}',
              label=f'best-of-n, λ {bias}')
  only = result['length_only_curve']
  left.plot(only['d'], only['words'], 'k:', marker='.', label='PPO, length-only reward')
  left.set(xlabel='d = √KL(π ‖ π_SFT)', ylabel='words per answer', title='Answer length')
  left.legend(fontsize=7)
  x = np.arange(len(biases))
  splits = [result['decomposition'][b] for b in biases]
  middle.bar(x - 0.2, [s['total'] for s in splits], 0.4, label='proxy gain, total')
  middle.bar(x + 0.2, [s['within_bin'] for s in splits], 0.4, label='within length bins')
  middle.set_xticks(x, [f'λ {b}' for b in biases])
  middle.set(ylabel='proxy reward gained by PPO', title='Singhal et al.\'s split')
  middle.legend(fontsize=7)
  variants = result['dpo_variants']
  for loss, curve in variants['curves'].items():
    right.plot(curve['kl'], curve['words'], 'o-', markersize=3, label=loss)
  right.axvline(variants['matched_kl'], color='gray', linewidth=0.8, linestyle='--')
  right.set(xlabel='KL(π ‖ π_SFT) per prompt (nats)', ylabel='words per answer',
            title='DPO family on length-biased pairs')
  right.legend(fontsize=7)
  return _save(figure, path)


def plot_alignment_tax(result: dict, path: str | None = None) -> Figure:
  """What each run paid against what it gained, one line per sweep (PPO-ptx's γ, the KL
  coefficient β, which share their first run): left, the increase of held-out pretraining
  NLL; right, the other tasks' gold change with 95% intervals; both against the proxy gain on
  the trained tasks."""
  figure, (left, right) = _figure(10, 4, 2)
  for i, (sweep, label) in enumerate((('ptx_coef', 'γ'), ('kl_coef', 'β'))):
    coefs = list(result['tax'][sweep])
    gain = [result['proxy_gain'][sweep][c]['value'] for c in coefs]
    tax = [result['tax'][sweep][c] for c in coefs]
    left.plot(gain, [t['nll_increase'] for t in tax], 'o-', color=f'C{i}',
              label=f'sweep of {label}')
    other = np.array([t['other_tasks_gold_change']['value'] for t in tax])
    ci = np.array([t['other_tasks_gold_change']['ci'] for t in tax])
    right.errorbar(gain, other, yerr=[other - ci[:, 0], ci[:, 1] - other], fmt='o-',
                   color=f'C{i}', capsize=3, label=f'sweep of {label}')
    names = [f'{label} {c}' for c in coefs]
    if sweep == 'kl_coef':  # Its first run is the γ sweep's γ = 0, named there.
      names[0] = ''
    else:
      names[0] += f', β {next(iter(result["tax"]["kl_coef"]))}'
    for axis, values in ((left, [t['nll_increase'] for t in tax]), (right, other)):
      for x, y, name in zip(gain, values, names):
        axis.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords='offset points')
  for axis in (left, right):
    axis.axhline(0, color='black', linewidth=0.5)
    axis.legend(fontsize=7)
  left.set(xlabel='proxy reward gained, trained tasks', ylabel='pretraining NLL change (nats)',
           title='Alignment tax on pretraining text')
  right.set(xlabel='proxy reward gained, trained tasks', ylabel='gold change, other tasks',
            title='Alignment tax on the other tasks')
  return _save(figure, path)


def plot_midtraining(result: dict, path: str | None = None) -> Figure:
  """Mean gold per task (and over all) after each arm's SFT, with 95% intervals."""
  figure, axis = _figure(8, 4)
  arms = list(result['gold'])
  tasks = list(result['gold'][arms[0]])
  x, width = np.arange(len(tasks)), 0.8 / len(arms)
  for i, arm in enumerate(arms):
    values = np.array([result['gold'][arm][t]['value'] for t in tasks])
    ci = np.array([result['gold'][arm][t]['ci'] for t in tasks])
    axis.bar(x + (i - (len(arms) - 1) / 2) * width, values, width, label=arm,
             yerr=[values - ci[:, 0], ci[:, 1] - values], capsize=2)
  axis.set_xticks(x, tasks)
  axis.set(ylabel='gold reward after SFT', title='Midtraining: instructions in the decay stage')
  axis.legend(fontsize=7)
  return _save(figure, path)


def plot_rlaif(result: dict, path: str | None = None) -> Figure:
  """Left: agreement of the AI labeler and of two humans, and each labeler's or proxy's
  accuracy against gold; right: best-of-n's gold against d under each proxy."""
  figure, (left, right) = _figure(10, 4, 2)
  bars = {'AI–human': result['ai_human_agreement'], 'human–human': result['human_human_agreement'],
          'AI labeler vs gold': result['ai_gold_agreement'],
          **{f'proxy ({label}) vs gold': r for label, r in result['rm_accuracy'].items()}}
  values = np.array([r['value'] for r in bars.values()])
  ci = np.array([r['ci'] for r in bars.values()])
  left.bar(range(len(bars)), values, yerr=[values - ci[:, 0], ci[:, 1] - values], capsize=3,
           color=[f'C{i}' for i in range(len(bars))])
  left.set_xticks(range(len(bars)), list(bars), rotation=20, fontsize=7)
  left.set(ylabel='share of pairs', ylim=(0, 1), title='Agreement on pairs of answers')
  for label, curve in result['bon_gold'].items():
    right.plot(np.sqrt(curve['kl']), curve['gold'], 'o-', label=f'proxy on {label} labels')
  right.set(xlabel='d = √KL(best-of-n ‖ π_init)', ylabel='gold reward',
            title='Best-of-n under each proxy')
  right.legend(fontsize=7)
  return _save(figure, path)


def plot_safety(result: dict, path: str | None = None) -> Figure:
  """Left: unsafe compliance and false refusal (contrast set, per XSTest category, unrelated)
  against the safety share; right: the other tasks' gold against it; 95% intervals."""
  figure, (left, right) = _figure(10, 4, 2)
  shares = list(result['unsafe_compliance'])
  x = np.arange(len(shares))

  def curve(axis, key, label, **style):
    values = np.array([result[key][s]['value'] for s in shares])
    ci = np.array([result[key][s]['ci'] for s in shares])
    axis.errorbar(x, values, yerr=[values - ci[:, 0], ci[:, 1] - values], capsize=3,
                  label=label, **style)

  curve(left, 'unsafe_compliance', 'unsafe compliance (held-out harmful)', fmt='o-', color='C3')
  curve(left, 'false_refusal_contrast', 'false refusal, contrast set', fmt='s-', color='C0')
  curve(left, 'false_refusal_unrelated', 'false refusal, unrelated', fmt='^-', color='C2')
  for category in result['false_refusal_by_category'][shares[0]]:
    left.plot(x, [result['false_refusal_by_category'][s][category] for s in shares], ':',
              color='C0', alpha=0.5)
    left.annotate(category, (x[-1], result['false_refusal_by_category'][shares[-1]][category]),
                  fontsize=6, color='C0')
  left.set(ylabel='share of answers', ylim=(-0.02, 1.02), title='Safety data and over-refusal')
  curve(right, 'other_tasks_gold', 'sort, add, repeat', fmt='o-', color='C1')
  right.set(ylabel='gold reward', title="The other tasks' gold")
  for axis in (left, right):
    axis.set_xticks(x, [_percent(float(s)) for s in shares])
    axis.set_xlabel('safety share of the SFT data')
    axis.legend(fontsize=7)
  return _save(figure, path)


def plot_unknown_facts(result: dict, path: str | None = None) -> Figure:
  """Against the unknown share of the SFT questions: accuracy and hallucination on held-out
  known facts (left) and hallucination and abstention on unknown ones (right), with the IDK
  variant as open markers; 95% intervals."""
  figure, (left, right) = _figure(10, 4, 2)
  shares = list(result['known_accuracy'])
  x = [float(s) for s in shares]
  idk = result['idk_variant']

  def curve(axis, label, values, idk_value, color, fmt):
    v = np.array([r['value'] for r in values])
    ci = np.array([r['ci'] for r in values])
    axis.errorbar(x, v, yerr=[v - ci[:, 0], ci[:, 1] - v], fmt=fmt, color=color, capsize=3,
                  label=label)
    axis.errorbar([idk['share']], [idk_value['value']], fmt=fmt[0], mfc='none', color=color,
                  yerr=[[idk_value['value'] - idk_value['ci'][0]],
                        [idk_value['ci'][1] - idk_value['value']]], capsize=3)

  curve(left, 'accuracy', [result['known_accuracy'][s] for s in shares],
        idk['known_accuracy'], 'C2', 'o-')
  curve(left, 'hallucination', [result['hallucination_rate'][s]['known'] for s in shares],
        idk['hallucination_rate']['known'], 'C3', 's-')
  curve(right, 'hallucination', [result['hallucination_rate'][s]['unknown'] for s in shares],
        idk['hallucination_rate']['unknown'], 'C3', 's-')
  curve(right, 'abstention (IDK)', [result['abstention_rate'][s]['unknown'] for s in shares],
        idk['abstention_rate']['unknown'], 'C0', '^-')
  left.set(title='Held-out questions about known facts')
  right.set(title='Held-out questions about unknown facts')
  for axis in (left, right):
    axis.set(xlabel='unknown share of the SFT questions (open: answered IDK)',
             ylabel='share of answers', ylim=(-0.02, 1.02))
    axis.legend(fontsize=7)
  return _save(figure, path)


def plot_assertive_labelers(result: dict, path: str | None = None) -> Figure:
  """Best-of-n under each assertiveness-biased proxy against d: the rate of confident wrong
  answers (left) and the gold (right)."""
  figure, (left, right) = _figure(10, 4, 2)
  for bias, wrong in result['confident_wrong_rate'].items():
    left.plot(wrong['d'], wrong['rate'], 'o-', label=f'κ = {bias}')
    right.plot(wrong['d'], result['gold'][bias], 'o-', label=f'κ = {bias}')
  left.set(ylabel='share of answers confident and wrong', title='Confidently wrong')
  right.set(ylabel='gold reward', title='Gold')
  for axis in (left, right):
    axis.set_xlabel('d = √KL(best-of-n ‖ π_init)')
    axis.legend(fontsize=7)
  return _save(figure, path)
