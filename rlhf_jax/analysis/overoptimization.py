"""Reward-model overoptimization (Gao, Schulman & Hilton 2022): the functional forms of the gold
reward against the distance from the initial policy, their least-squares fits, and the figures.

With d = √KL(π ‖ π_init), the gold reward gained over the initial policy, R(d) = gold(d) − gold(0),
follows (Gao et al. 2022)

    best-of-n:  R_bon(d) = d (α_bon − β_bon d)
    RL:         R_RL(d)  = d (α_RL − β_RL log d)

Both are linear in (α, β) at fixed d, so each is fitted by ordinary least squares, without an
intercept (R(0) = 0 by construction). Measurements come as records, one per measured point (per n
for best-of-n, per evaluation step for RL) of one run (a seed):

    {'proxy': name, 'method': 'bon' | 'rl', 'seed': …, 'kl': …, 'gold_reward': …,
     'proxy_reward': …, …}

or, for intervals, as `Run`s that keep every prompt's measurements: `summarize` fits the curve
averaged over seeds and bootstraps it over seeds and prompts.

Host-side NumPy: arrays and records in, dicts and PNG files out.
"""

import dataclasses
import itertools
import json
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax.errors import InputError

METHODS = ('bon', 'rl')
_TITLES = {'bon': 'best-of-n', 'rl': 'RL'}
_MEASURED = ('proxy', 'method', 'kl', 'gold_reward', 'proxy_reward')
_RUN_KEYS = ('proxy', 'seed')  # A run is one seed of one proxy's curve.


def bon_gain(d, *, alpha: float, beta: float) -> np.ndarray:
  """R_bon(d) = d (α − β d)."""
  d = np.asarray(d, np.float64)
  return d * (alpha - beta * d)


def rl_gain(d, *, alpha: float, beta: float) -> np.ndarray:
  """R_RL(d) = d (α − β log d), with its limit 0 at d = 0."""
  d = np.asarray(d, np.float64)
  log_d = np.log(np.where(d > 0, d, 1.0))  # d log d → 0: any finite log at d = 0 gives 0.
  return d * (alpha - beta * log_d)


def _bon_peak(alpha: float, beta: float) -> float | None:
  """argmax_{d ≥ 0} R_bon = α/(2β) (0 when α ≤ 0) if β > 0; none (unbounded) if β ≤ 0."""
  return max(alpha / (2 * beta), 0.0) if beta > 0 else None


def _rl_peak(alpha: float, beta: float) -> float | None:
  """dR_RL/dd = α − β (log d + 1) = 0 at d* = exp(α/β − 1), the maximum if β > 0; none if not.
  A tiny β > 0 puts d* beyond floating point: inf."""
  if beta <= 0:
    return None
  log_peak = alpha / beta - 1
  return math.exp(log_peak) if log_peak < math.log(np.finfo(np.float64).max) else math.inf


_FORMS = {'bon': (bon_gain, _bon_peak), 'rl': (rl_gain, _rl_peak)}


def _form(method):
  if method not in _FORMS:
    raise InputError(f'method={method!r}; expected one of {METHODS}.')
  return _FORMS[method]


def _r2(ss_res: float, ss_tot: float) -> float:
  """1 − SS_res / SS_tot; for gains that do not vary, 1 if the fit is exact, else NaN."""
  if ss_tot > 0:
    return 1 - ss_res / ss_tot
  return 1.0 if ss_res == 0 else math.nan


def fit(d, gain, *, method: str) -> dict:
  """Least-squares (α, β) of R_method(d) to the measured gains, with R² and the fitted peak.

  Returns {'alpha', 'beta', 'r2', 'peak_d', 'peak_gain'}:
  r2 = 1 − SS_res / SS_tot with SS_tot = Σ (gain − mean gain)², the sum about the mean: with no
  intercept in the form it is negative where the form fits worse than the mean. Where every gain
  is equal (SS_tot = 0) r2 is 1 if the fit is exact and NaN if not.
  peak_d = argmax_{d ≥ 0} R(d) and peak_gain = R(peak_d); both None where β ≤ 0 (R then grows
  without bound, or for β = 0 is a line).
  """
  gain_fn, peak_fn = _form(method)
  d_N, gain_N = np.ravel(d).astype(np.float64), np.ravel(gain).astype(np.float64)
  if d_N.shape != gain_N.shape:
    raise InputError(f'd ({d_N.size}) and gain ({gain_N.size}) must have the same size.')
  if not (np.all(np.isfinite(d_N)) and np.all(np.isfinite(gain_N)) and np.all(d_N >= 0)):
    raise InputError('d must be finite and ≥ 0, and gain finite.')
  features_Nx2 = np.stack([gain_fn(d_N, alpha=1.0, beta=0.0),
                           gain_fn(d_N, alpha=0.0, beta=1.0)], axis=1)
  coefficients, _, rank, _ = np.linalg.lstsq(features_Nx2, gain_N)
  if rank < 2:
    raise InputError(f'The {method} fit of α and β needs two points that set them apart (for RL, '
                     f'two with d > 0 and d ≠ 1; for best-of-n, two with d > 0); got d = '
                     f'{d_N.tolist()}.')
  alpha, beta = (float(c) for c in coefficients)
  residual_N = gain_N - features_Nx2 @ coefficients
  r2 = _r2(float(residual_N @ residual_N), float(np.sum((gain_N - gain_N.mean())**2)))
  peak_d = peak_fn(alpha, beta)
  peak_gain = None if peak_d is None else float(gain_fn(peak_d, alpha=alpha, beta=beta))
  return {'alpha': alpha, 'beta': beta, 'r2': r2, 'peak_d': peak_d, 'peak_gain': peak_gain}


def fit_bon(d, gain) -> dict:
  """`fit` of R_bon(d) = d (α − β d): peak at d* = α/(2β), gain α²/(4β) (α, β > 0)."""
  return fit(d, gain, method='bon')


def fit_rl(d, gain) -> dict:
  """`fit` of R_RL(d) = d (α − β log d): peak at d* = exp(α/β − 1), gain β d* (β > 0)."""
  return fit(d, gain, method='rl')


def _check_records(records) -> None:
  for i, record in enumerate(records):
    missing = [key for key in _MEASURED if key not in record]
    if missing:
      raise InputError(f'records[{i}] lacks {missing}; each needs {list(_MEASURED)}.')
    _form(record['method'])


def _shared_fields(records) -> dict:
  """The fields besides the measured ones that all the records have, with one value."""
  first, *rest = records
  return {key: value for key, value in first.items()
          if key not in _MEASURED and all(key in r and r[key] == value for r in rest)}


def measurements_to_curves(records, *, method: str, kl_atol: float = 1e-6
                           ) -> dict[tuple[str, int], dict]:
  """Per run (proxy, seed; in order of first appearance), its curve for one method, sorted by KL.
  A record without a 'seed' is seed 0.

  Returns {(proxy, seed): {'kl', 'd', 'gold_reward', 'proxy_reward', 'gain', 'proxy_gain': [N]
  arrays, 'metadata': dict}}: d = √KL, gain = gold reward − its value at the initial policy,
  proxy_gain likewise. The initial policy is the curve's lowest-KL point, which must have
  |kl| ≤ kl_atol (best-of-n's n = 1, RL's step 0; an estimated KL may miss 0 by rounding, and d
  clips it at 0). metadata holds the other fields equal in all the run's records (e.g.
  'proxy_params'); per-point fields such as 'n' or 'step' are left out.
  """
  _form(method)
  _check_records(records)
  grouped = {}
  for record in records:
    if record['method'] == method:
      grouped.setdefault((record['proxy'], record.get('seed', 0)), []).append(record)
  curves = {}
  for (proxy, seed), group in grouped.items():
    group = sorted(group, key=lambda r: r['kl'])
    kl_N, gold_N, proxy_N = (np.array([r[key] for r in group], np.float64)
                             for key in ('kl', 'gold_reward', 'proxy_reward'))
    if abs(kl_N[0]) > kl_atol:
      raise InputError(f'Proxy {proxy!r}, seed {seed} ({method}): its lowest kl is {kl_N[0]:g}, '
                       'not 0; each curve needs the initial policy (kl = 0) as a point to '
                       'measure gains from.')
    metadata = {k: v for k, v in _shared_fields(group).items() if k not in _RUN_KEYS}
    curves[proxy, seed] = {'kl': kl_N, 'd': np.sqrt(np.maximum(kl_N, 0.0)), 'gold_reward': gold_N,
                           'proxy_reward': proxy_N, 'gain': gold_N - gold_N[0],
                           'proxy_gain': proxy_N - proxy_N[0], 'metadata': metadata}
  return curves


def fit_all(records, *, kl_atol: float = 1e-6) -> list[dict]:
  """One row per (method, proxy, seed) of the records: {'proxy', 'method', 'seed', **metadata,
  'gold_init', 'max_d', 'num_points', 'best_d', 'best_gain', 'final_gain', 'peak_inside',
  **fit}, methods in the order of METHODS, runs in order of first appearance. gold_init is the
  gold reward of the initial policy; (best_d, best_gain) the measured point of largest gold gain,
  next to the fit's peak; final_gain the gain at the largest d; peak_inside that the fitted
  peak gain is > 0 at a d* inside the measured range (0, max_d); metadata as in
  `measurements_to_curves` (e.g. 'proxy_params', 'proxy_comparisons')."""
  rows = []
  for method in METHODS:
    curves = measurements_to_curves(records, method=method, kl_atol=kl_atol)
    for (proxy, seed), curve in curves.items():
      best = int(np.argmax(curve['gain']))
      result = fit(curve['d'], curve['gain'], method=method)
      rows.append({'proxy': proxy, 'method': method, 'seed': seed, **curve['metadata'],
                   'gold_init': float(curve['gold_reward'][0]), 'max_d': float(curve['d'][-1]),
                   'num_points': len(curve['d']), 'best_d': float(curve['d'][best]),
                   'best_gain': float(curve['gain'][best]),
                   'final_gain': float(curve['gain'][-1]), **result,
                   'peak_inside': _peak_inside(result, float(curve['d'][-1]))})
  return rows


def _peak_inside(result: dict, max_d: float) -> bool:
  return (result['peak_d'] is not None and 0 < result['peak_d'] < max_d
          and result['peak_gain'] > 0)


@dataclasses.dataclass(frozen=True)
class Run:
  """One run's curve with every prompt's measurements: per measured point p, in the order
  measured (the first the initial policy, KL 0), and held-out prompt i (the same prompts at
  every point):

    kl_PxI     the KL to π_init (best-of-n: its formula, the same for every prompt; RL: the
               Rao–Blackwellised estimate along the answer to prompt i)
    gold_PxI, proxy_PxI  the gold and the proxy reward of the answer (best-of-n: expected)
    points     per point, what labels it ({'n': …} or {'step': …})
    metadata   what describes the run besides proxy and seed (e.g. 'proxy_comparisons')
  """
  method: str
  proxy: str
  seed: int
  kl_PxI: np.ndarray
  gold_PxI: np.ndarray
  proxy_PxI: np.ndarray
  points: tuple[dict, ...]
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _form(self.method)
    shapes = {a.shape for a in (self.kl_PxI, self.gold_PxI, self.proxy_PxI)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(self.points) != self.kl_PxI.shape[0]:
      raise InputError(f'Run {self.method}/{self.proxy}/seed {self.seed}: kl, gold and proxy must '
                       f'be [points, prompts] arrays of one shape with one label per point; got '
                       f'{sorted(shapes)} and {len(self.points)} labels.')

  def means(self, prompts_I=None) -> dict[str, np.ndarray]:
    """Per point [P], over the prompts (or the resampled `prompts_I`): 'kl', 'd' = √KL (clipped
    at 0), 'gold', 'proxy', and 'gain', 'proxy_gain' relative to the first point."""
    select = slice(None) if prompts_I is None else prompts_I
    kl_P, gold_P, proxy_P = (a[:, select].mean(1) for a in (self.kl_PxI, self.gold_PxI,
                                                            self.proxy_PxI))
    return {'kl': kl_P, 'd': np.sqrt(np.maximum(kl_P, 0.0)), 'gold': gold_P, 'proxy': proxy_P,
            'gain': gold_P - gold_P[0], 'proxy_gain': proxy_P - proxy_P[0]}

  def records(self) -> list[dict]:
    """measurements.jsonl's records: one per point, the means over prompts."""
    means = self.means()
    return [{'proxy': self.proxy, 'method': self.method, 'seed': self.seed, **self.metadata,
             **label, 'kl': float(means['kl'][p]), 'd': float(means['d'][p]),
             'gold_reward': float(means['gold'][p]), 'proxy_reward': float(means['proxy'][p])}
            for p, label in enumerate(self.points)]


def save_runs(runs, path: str) -> None:
  """Every prompt's measurements of every run, as one .npz (no pickles)."""
  index = [{'method': r.method, 'proxy': r.proxy, 'seed': r.seed, 'points': list(r.points),
            'metadata': r.metadata} for r in runs]
  arrays = {f'{i}/{name}': getattr(r, f'{name}_PxI')
            for i, r in enumerate(runs) for name in ('kl', 'gold', 'proxy')}
  with open(path, 'wb') as f:
    np.savez_compressed(f, index=np.array(json.dumps(index)), **arrays)


def load_runs(path: str) -> list[Run]:
  with np.load(path) as data:
    return [Run(method=r['method'], proxy=r['proxy'], seed=r['seed'], points=tuple(r['points']),
                metadata=r['metadata'], **{f'{name}_PxI': data[f'{i}/{name}']
                                           for name in ('kl', 'gold', 'proxy')})
            for i, r in enumerate(json.loads(str(data['index'])))]


def _mean_curve(runs, seeds_S, prompts_I) -> dict[str, np.ndarray]:
  """The curve averaged over the runs chosen by seeds_S (indices into runs, repeats allowed), at
  the points that all of them measured, each run's prompts chosen by prompts_I."""
  num_points = min(len(r.points) for r in runs)
  means = [runs[s].means(prompts_I) for s in seeds_S]
  return {key: np.mean([m[key][:num_points] for m in means], axis=0)
          for key in ('d', 'gain', 'proxy_gain')}


def _curve_statistics(curve: dict, method: str) -> dict:
  """The fit, the best and final measured gain, and the KL efficiency: the gold gained per unit
  of d up to the best point (best_gain / best_d; 0 if no point gains) and the proxy's slope,
  Σ d·proxy_gain / Σ d² (least squares through the origin)."""
  result = fit(curve['d'], curve['gain'], method=method)
  best = int(np.argmax(curve['gain']))
  d, best_d, best_gain = curve['d'], float(curve['d'][best]), float(curve['gain'][best])
  return {**result, 'best_d': best_d, 'best_gain': best_gain,
          'final_gain': float(curve['gain'][-1]),
          'gold_slope': best_gain / best_d if best_d > 0 else 0.0,
          'proxy_slope': float(d @ curve['proxy_gain'] / (d @ d))}


_INTERVAL_KEYS = ('alpha', 'beta', 'peak_d', 'peak_gain', 'best_gain', 'final_gain',
                  'gold_slope', 'proxy_slope')


def summarize(runs, *, num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
              ) -> dict:
  """The curves averaged over seeds, their fits and bootstrap intervals over seeds and prompts.

  Per (method, proxy) the mean curve averages the runs' (d, gain, proxy_gain) point by point
  over the points every seed measured (best-of-n: each n; RL: each evaluation step). A
  bootstrap replicate draws the seeds with replacement, then the prompts with replacement (the
  same draw for every run of a method, so that proxies are compared on the same prompts and
  seeds), and recomputes the mean curve, its fit and its peak; intervals are the replicates'
  percentiles (a peak that does not exist, β ≤ 0, counts as beyond every d: +inf).

  Returns {'fits': a row per (method, proxy) with the mean curve's fit (`fit`), its best and
  final measured gain, 'interval': {key: [low, high]} for α, β, peak_d, peak_gain, best_gain,
  final_gain and the KL-efficiency slopes, 'rises' and 'falls' (`_verdict` on the intervals of
  the measured points), 'curve' (the mean curve and the interval of its gain at each point);
  'per_seed': `fit_all` of every run's records, with the run's own 'rises' and 'falls' (its
  prompts resampled); 'comparisons': per method, for each proxy and the next by comparisons,
  the share of replicates in which the better-data proxy's fitted peak is later, higher, and
  both, and in how many seeds both hold; 'kl_efficiency'}.
  """
  runs = list(runs)
  if not runs:
    raise InputError('summarize needs at least one run.')
  rng = np.random.default_rng(seed)
  low_q, high_q = (1 - confidence) / 2, (1 + confidence) / 2
  groups, prompt_draws, seed_draws = {}, {}, {}
  for r in runs:
    groups.setdefault((r.method, r.proxy), []).append(r)
  for method in METHODS:
    method_groups = [g for (m, _), g in groups.items() if m == method]
    if not method_groups:
      continue
    sizes = {r.kl_PxI.shape[1] for g in method_groups for r in g}
    seed_sets = {tuple(sorted(r.seed for r in g)) for g in method_groups}
    if len(sizes) > 1 or len(seed_sets) > 1 or any(len(set(s)) < len(s) for s in seed_sets):
      raise InputError(f'The {method} runs must measure the same prompts and the same distinct '
                       f'seeds for every proxy (to resample both alike); got prompts '
                       f'{sorted(sizes)} and seeds {sorted(seed_sets)}.')
    (num_prompts,), (seeds,) = sizes, seed_sets
    # One draw of seeds and of prompts per replicate, shared by the method's proxies.
    prompt_draws[method] = rng.integers(0, num_prompts, (num_resamples, num_prompts))
    seed_draws[method] = rng.integers(0, len(seeds), (num_resamples, len(seeds)))
  rows, replicates, seed_verdicts = [], {}, {}
  for (method, proxy), group in sorted(groups.items(), key=lambda kv: METHODS.index(kv[0][0])):
    group = sorted(group, key=lambda r: r.seed)
    curve = _mean_curve(group, np.arange(len(group)), None)
    point = _curve_statistics(curve, method)
    samples, gains_BxP = [], []
    for b in range(num_resamples):
      replicate = _mean_curve(group, seed_draws[method][b], prompt_draws[method][b])
      samples.append(_curve_statistics(replicate, method))
      gains_BxP.append(replicate['gain'])
    replicates[method, proxy] = samples
    interval = {}
    for key in _INTERVAL_KEYS:
      values = np.array([math.inf if x[key] is None else x[key] for x in samples])
      interval[key] = [float(np.quantile(values, q, method='inverted_cdf'))
                       for q in (low_q, high_q)]
    band = np.quantile(np.array(gains_BxP), [low_q, high_q], axis=0, method='inverted_cdf')
    for run in group:  # Each seed alone, resampled over prompts.
      gains = np.array([run.means(prompts)['gain'] for prompts in prompt_draws[method]])
      seed_verdicts[method, proxy, run.seed] = _verdict(
          run.means()['gain'], *np.quantile(gains, [low_q, high_q], axis=0,
                                            method='inverted_cdf'))
    max_d = float(curve['d'][-1])
    rows.append({'proxy': proxy, 'method': method, **group[0].metadata,
                 'seeds': [r.seed for r in group], 'num_prompts': group[0].kl_PxI.shape[1],
                 'gold_init': float(np.mean([r.means()['gold'][0] for r in group])),
                 'max_d': max_d, 'num_points': len(curve['d']), **point,
                 'interval': interval, **_verdict(curve['gain'], *band),
                 'curve': {'d': curve['d'].tolist(), 'gain': curve['gain'].tolist(),
                           'proxy_gain': curve['proxy_gain'].tolist(),
                           'gain_low': band[0].tolist(), 'gain_high': band[1].tolist()}})
  records = [record for r in runs for record in r.records()]
  per_seed = [row | seed_verdicts[row['method'], row['proxy'], row['seed']]
              for row in fit_all(records)]
  return {'confidence': confidence, 'num_resamples': num_resamples, 'fits': _finite(rows),
          'per_seed': per_seed, 'comparisons': _comparisons(rows, replicates, per_seed),
          'kl_efficiency': _kl_efficiency(rows)}


def _verdict(gain_P, low_P, high_P) -> dict[str, bool]:
  """Measured, not fitted (the RL form rises near d = 0 whenever β > 0): 'rises' if at some
  point after the first the interval of the gain lies above 0; 'falls' if the last point's
  interval lies below the best point's gain."""
  return {'rises': bool(np.any(low_P[1:] > 0)), 'falls': bool(high_P[-1] < np.max(gain_P))}


def _kl_efficiency(rows) -> list[dict]:
  """Per proxy optimised by both methods: best-of-n's gold and proxy slopes over RL's (Gao et al.
  2022 §3.4: RL spends far more KL than best-of-n for the same gain)."""
  by_method = {(r['method'], r['proxy']): r for r in rows}
  out = []
  for proxy in dict.fromkeys(r['proxy'] for r in rows):
    if ('bon', proxy) in by_method and ('rl', proxy) in by_method:
      bon, rl = by_method['bon', proxy], by_method['rl', proxy]
      out.append({'proxy': proxy, **{
          f'{key}_{method}': row[key] for key in ('gold_slope', 'proxy_slope')
          for method, row in (('bon', bon), ('rl', rl))},
          'proxy_slope_ratio': bon['proxy_slope'] / rl['proxy_slope']})
  return out


def _comparisons(rows, replicates, per_seed) -> list[dict]:
  """Per method, each proxy against the next by number of comparisons, among proxies of one
  model, seed and number of steps, optimised under one KL coefficient and aggregation (where
  the rows say: 'proxy_model', 'proxy_seed', 'proxy_steps', 'kl_coef', 'aggregation')."""
  out = []
  for method in METHODS:
    families = {}
    for r in rows:
      if r['method'] == method and 'proxy_comparisons' in r:
        key = tuple(r.get(k) for k in ('proxy_model', 'proxy_steps', 'kl_coef', 'proxy_seed',
                                         'aggregation'))
        families.setdefault(key, []).append(r)
    pairs_of_proxies = [(fewer, more) for family in families.values()
                        for fewer, more in itertools.pairwise(
                            sorted(family, key=lambda r: r['proxy_comparisons']))
                        if fewer['proxy_comparisons'] < more['proxy_comparisons']]
    for fewer, more in pairs_of_proxies:
      pairs = list(zip(replicates[method, fewer['proxy']], replicates[method, more['proxy']]))
      later = [_peak(b, 'peak_d') > _peak(a, 'peak_d') for a, b in pairs]
      higher = [_peak(b, 'peak_gain') > _peak(a, 'peak_gain') for a, b in pairs]
      by_seed = {(f['proxy'], f['seed']): f for f in per_seed if f['method'] == method}
      seeds = sorted({seed for proxy, seed in by_seed if proxy == fewer['proxy']}
                     & {seed for proxy, seed in by_seed if proxy == more['proxy']})
      both_in_seed = [
          _peak(by_seed[more['proxy'], s], 'peak_d') > _peak(by_seed[fewer['proxy'], s], 'peak_d')
          and _peak(by_seed[more['proxy'], s], 'peak_gain')
          > _peak(by_seed[fewer['proxy'], s], 'peak_gain') for s in seeds]
      out.append({'method': method, 'fewer': fewer['proxy'], 'more': more['proxy'],
                  'later': float(np.mean(later)), 'higher': float(np.mean(higher)),
                  'later_and_higher': float(np.mean(np.logical_and(later, higher))),
                  'seeds_later_and_higher': int(sum(both_in_seed)), 'seeds': len(seeds)})
  return out


def scaling(fits, *, by: str = 'proxy_comparisons') -> list[dict]:
  """Per method, the fits against fits[by] (Gao et al. 2022 §3.3: proxy data), ascending:
  {'method', by, 'proxy', α, β, R², peak d and gain with their intervals, 'rises'}, and per method
  'no_gain_up_to': the largest fits[by] whose curve does not rise (`_verdict`: no measured gain
  whose interval lies above 0; the "dead zone" within which a proxy gives no gain; None if every
  proxy gives one)."""
  out = []
  for method in METHODS:
    rows = sorted((f for f in fits if f['method'] == method and by in f), key=lambda f: f[by])
    if not rows:
      continue
    dead = [f[by] for f in rows if not f['rises']]
    out.append({'method': method, 'no_gain_up_to': max(dead) if dead else None, 'rows': [
        {by: f[by], 'proxy': f['proxy'], **{k: f[k] for k in (
            'alpha', 'beta', 'r2', 'peak_d', 'peak_gain', 'rises', 'best_gain', 'proxy_accuracy')
            if k in f},
         'interval': {k: f['interval'][k] for k in ('alpha', 'beta', 'peak_d', 'peak_gain')}}
        for f in rows]})
  return out


def kl_penalty(runs) -> list[dict]:
  """Gao et al. 2022 §3.6: a KL penalty acts like early stopping. It moves where an RL run ends,
  not the gold reward it reaches at a given d: the penalised runs lie on the unpenalised runs'
  gold-against-d curve, while their proxy reward at that d is higher.

  Per proxy ('proxy_name' in the runs' metadata) optimised by RL under several coefficients
  ('kl_coef'), each over the same seeds:
    'pooled': R_RL(d) fitted to every coefficient's curve (means over seeds) at once;
    per coefficient, mean ± standard error over seeds of
      'residual'  the run's gold gain minus the pooled fit, averaged over its points after d = 0;
      'gold_at_matched_d', 'proxy_at_matched_d'  the run's gold and proxy gain minus those of the
          unpenalised run of the same seed at the same d (linear interpolation), averaged over
          the points within that run's range of d (0 for the unpenalised run itself);
    and 'final_d', the d where its runs end (mean over seeds).
  """
  groups = {}
  for run in runs:
    if run.method == 'rl' and 'kl_coef' in run.metadata:
      name = run.metadata.get('proxy_name', run.proxy)
      groups.setdefault(name, {}).setdefault(run.metadata['kl_coef'], {})[run.seed] = run
  out = []
  for name, by_coef in groups.items():
    if len(by_coef) < 2:
      continue
    if 0.0 not in by_coef:
      raise InputError(f'kl_penalty: proxy {name!r} has no unpenalised runs (kl_coef 0) to '
                       f'compare coefficients {sorted(by_coef)} with.')
    seeds = sorted(by_coef[0.0])
    if any(sorted(by_seed) != seeds for by_seed in by_coef.values()):
      raise InputError(f'kl_penalty: proxy {name!r} needs every coefficient run on the same '
                       f'seeds; got {({c: sorted(s) for c, s in by_coef.items()})}.')
    curves = {c: _mean_curve(list(by_seed.values()), np.arange(len(seeds)), None)
              for c, by_seed in by_coef.items()}
    pooled = fit(np.concatenate([c['d'] for c in curves.values()]),
                 np.concatenate([c['gain'] for c in curves.values()]), method='rl')
    rows = []
    for coef in sorted(by_coef):
      residual, gold, proxy, final_d = [], [], [], []
      for seed in seeds:
        means, unpenalised = by_coef[coef][seed].means(), by_coef[0.0][seed].means()
        residual.append(np.mean(means['gain'][1:] - rl_gain(means['d'][1:], **{
            k: pooled[k] for k in ('alpha', 'beta')})))
        order = np.argsort(unpenalised['d'])
        inside = means['d'][1:] <= unpenalised['d'].max()
        for key, out_list in (('gain', gold), ('proxy_gain', proxy)):
          matched = np.interp(means['d'][1:], unpenalised['d'][order], unpenalised[key][order])
          out_list.append(np.mean((means[key][1:] - matched)[inside]) if inside.any() else np.nan)
        final_d.append(means['d'][-1])
      rows.append({'kl_coef': coef, 'final_d': float(np.mean(final_d)),
                   **_mean_and_se('residual', residual),
                   **_mean_and_se('gold_at_matched_d', gold),
                   **_mean_and_se('proxy_at_matched_d', proxy)})
    out.append({'proxy': name, 'seeds': seeds,
                'pooled': {k: pooled[k] for k in ('alpha', 'beta', 'r2', 'peak_d', 'peak_gain')},
                'coefficients': rows})
  return out


def _mean_and_se(name: str, values) -> dict:
  """{name: mean, name_se: standard error} over the seeds that have a value."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
  return {name: float(values.mean()) if len(values) else None, f'{name}_se': se}


def fit_shared_alpha(curves, *, method: str) -> dict:
  """Gao et al. 2022 §3.2: across proxy sizes α_RL barely changes, so R(d) can be refitted with
  one α and a β per curve. Least squares of gain_k(d) = α·x₁(d) − β_k·x₂(d) over every curve k
  at once (x₁, x₂: the method's form, `fit`).

  curves: [(d, gain)] per curve. Returns {'alpha', 'betas' (per curve), 'r2' and
  'r2_separate' (each curve fitted alone), both 1 − Σ residual² / Σ (gain − its curve's mean)²
  over all points: the share of the within-curve variance that one α gives up}.
  """
  gain_fn, _ = _form(method)
  columns, gains, ss_tot, ss_separate = [], [], 0.0, 0.0
  for k, (d, gain) in enumerate(curves):
    d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
    own = np.zeros((len(d), len(curves)))
    own[:, k] = gain_fn(d, alpha=0.0, beta=1.0)
    columns.append(np.concatenate([gain_fn(d, alpha=1.0, beta=0.0)[:, None], own], axis=1))
    gains.append(gain)
    ss_tot += float(np.sum((gain - gain.mean())**2))
    alone = fit(d, gain, method=method)
    ss_separate += float(np.sum((gain - gain_fn(d, alpha=alone['alpha'],
                                                beta=alone['beta']))**2))
  features, gain = np.concatenate(columns), np.concatenate(gains)
  # Each curve fitted alone has rank 2 (`fit` raises if not), so the joint fit has full rank.
  coefficients = np.linalg.lstsq(features, gain)[0]
  residual = gain - features @ coefficients
  return {'alpha': float(coefficients[0]), 'betas': [float(b) for b in coefficients[1:]],
          'r2': _r2(float(residual @ residual), ss_tot), 'r2_separate': _r2(ss_separate, ss_tot)}


def size_scaling(fits) -> list[dict]:
  """Gao et al. 2022 §3.2, per method and family of proxies that differ only in size
  ('proxy_params'; one number of comparisons and steps, one KL coefficient): `scaling` by size,
  the least-squares slopes of α and β against log10 parameters (Gao et al. find both close to
  linear in log size), and `fit_shared_alpha` of the family's mean curves."""
  families = {}
  for f in fits:
    if 'proxy_params' in f:
      key = tuple(f.get(k) for k in ('method', 'proxy_comparisons', 'proxy_steps', 'kl_coef'))
      families.setdefault(key, []).append(f)
  out = []
  for family in families.values():
    if len({f['proxy_params'] for f in family}) < 2:
      continue
    (table,) = scaling(family, by='proxy_params')
    rows = table['rows']
    log_params = np.log10([row['proxy_params'] for row in rows])
    slopes = {f'{key}_per_log10_params': float(np.polyfit(log_params,
                                                          [row[key] for row in rows], 1)[0])
              for key in ('alpha', 'beta')}
    curves = {f['proxy']: f['curve'] for f in family}
    shared = fit_shared_alpha([(curves[row['proxy']]['d'], curves[row['proxy']]['gain'])
                               for row in rows], method=table['method'])
    out.append(table | slopes | {
        'proxy_comparisons': family[0].get('proxy_comparisons'), 'shared_alpha': shared['alpha'],
        'r2_shared_alpha': shared['r2'], 'r2_separate': shared['r2_separate'],
        'betas_shared_alpha': dict(zip((row['proxy'] for row in rows), shared['betas']))})
  return out


def pair_accuracy(score_a, score_b, gold_a, gold_b) -> dict:
  """How often a reward model prefers what the gold prefers, over the pairs (a_i, b_i) whose
  gold rewards differ (a tie of the model's scores counts half): {'accuracy', 'pairs'}, the
  accuracy None where no pair's gold rewards differ."""
  score_a, score_b, gold_a, gold_b = (np.asarray(x, np.float64)
                                      for x in (score_a, score_b, gold_a, gold_b))
  decided = gold_a != gold_b
  if not decided.any():
    return {'accuracy': None, 'pairs': 0}
  agree = np.sign(score_b - score_a)[decided] * np.sign(gold_b - gold_a)[decided]
  return {'accuracy': float(np.mean((agree + 1) / 2)), 'pairs': int(decided.sum())}


def disagreement(member_scores_MxPxI, reference_MxI) -> np.ndarray:
  """[P] Coste et al. 2023's uncertainty along a curve: per point, the std over the M members of
  their scores standardised by each member's mean and std over reference answers (π_init's),
  averaged over the I prompts."""
  return standardize(member_scores_MxPxI, reference_MxI).std(axis=0).mean(axis=-1)


def standardize(member_scores_Mx, reference_MxI) -> np.ndarray:
  """Each member's scores [M, …] minus its mean over its reference scores [M, I], over their
  (population) std: ensembles compare members on one scale (Coste et al. 2023)."""
  scores = np.asarray(member_scores_Mx, np.float64)
  reference_MxI = np.asarray(reference_MxI, np.float64)
  extra = (None,) * (scores.ndim - 1)
  return ((scores - reference_MxI.mean(1)[(slice(None),) + extra])
          / reference_MxI.std(1)[(slice(None),) + extra])


def stop_before_disagreement(disagreement_P, *, rise: float) -> int:
  """A stop read from the ensemble alone (Coste et al. 2023): the last point before the
  members' disagreement first exceeds (1 + rise) times its value at the first point (the
  initial policy), or the last point if it never does."""
  disagreement_P = np.asarray(disagreement_P)
  over = np.flatnonzero(disagreement_P > (1 + rise) * disagreement_P[0])
  return max(int(over[0]) - 1, 0) if len(over) else len(disagreement_P) - 1


def stop_at_held_out_peak(held_out_P) -> int:
  """A stop read from proxies the policy was not optimised against: the point where their
  (standardised, mean over members and prompts) score is highest — a validation proxy, as a
  held-out set for early stopping in supervised learning."""
  return int(np.argmax(held_out_P))


def judge_stop(stop_index: int, gain_P) -> dict:
  """A stop judged by the gold afterwards: {'stop_index', 'gain_at_stop', 'best_index',
  'best_gain' (the oracle: the best measured point), 'final_gain', 'regret' = best_gain −
  gain_at_stop}."""
  gain_P = np.asarray(gain_P)
  best = int(np.argmax(gain_P))
  return {'stop_index': stop_index, 'gain_at_stop': float(gain_P[stop_index]),
          'best_index': best, 'best_gain': float(gain_P[best]), 'final_gain': float(gain_P[-1]),
          'regret': float(gain_P[best] - gain_P[stop_index])}


def mitigation_table(fits, names) -> list[dict]:
  """fits.json's 'ensembles': per method and curve among `names` (single proxies, ensembles,
  WARM), the best and final measured gold gain with their intervals, the fitted peak and whether
  the curve has an interior peak (measured: it rises, then falls; `_verdict`)."""
  return [{'method': f['method'], 'proxy': f['proxy'], 'aggregation': f.get('aggregation'),
           'best_gain': f['best_gain'], 'best_d': f['best_d'], 'final_gain': f['final_gain'],
           'max_d': f['max_d'], 'peak_d': f['peak_d'], 'beta': f['beta'],
           'interval': {k: f['interval'][k] for k in ('best_gain', 'final_gain', 'beta')},
           'interior_peak': f['rises'] and f['falls']}
          for f in fits if f['proxy'] in names]


def _peak(statistics: dict, key: str) -> float:
  """A fit's peak_d or peak_gain, +inf where there is no peak (β ≤ 0: R grows without bound)."""
  return math.inf if statistics[key] is None else statistics[key]


def _finite(rows):
  """+inf (no peak within reach) as None, so that the rows are JSON."""
  for row in rows:
    row['interval'] = {k: [None if math.isinf(v) else v for v in pair]
                       for k, pair in row['interval'].items()}
  return rows


def plot_curves(summary: dict, runs, path: str, *, method: str) -> Figure:
  """Writes Gao et al.'s figure 1 for one method as a PNG, one colour per proxy: each seed's gold
  curve (thin), the mean over seeds (points, its bootstrap interval shaded) and its fit
  (dashed); the mean proxy reward dotted on a twin axis.

  Both rewards are relative to the initial policy (gain and proxy_gain): a Bradley–Terry reward
  is defined only up to a constant, and its scale is its own, hence the second axis.
  """
  gain_fn, _ = _form(method)
  rows = [f for f in summary['fits'] if f['method'] == method]
  if not rows:
    raise InputError(f'The summary holds no {method!r} fits to plot.')
  figure = Figure(figsize=(6, 4), dpi=100, layout='constrained')
  FigureCanvasAgg(figure)
  gold_axes = figure.add_subplot()
  proxy_axes = gold_axes.twinx()
  for i, row in enumerate(rows):
    color = f'C{i}'
    for run in runs:
      if run.method == method and run.proxy == row['proxy']:
        means = run.means()
        gold_axes.plot(means['d'], means['gain'], '-', color=color, linewidth=0.6, alpha=0.4)
    curve = row['curve']
    gold_axes.fill_between(curve['d'], curve['gain_low'], curve['gain_high'], color=color,
                           alpha=0.2, linewidth=0)
    gold_axes.plot(curve['d'], curve['gain'], 'o-', color=color, markersize=3,
                   label=f"{row['proxy']} ({len(row['seeds'])} seeds)")
    d_grid = np.linspace(0.0, row['max_d'], 200)
    gold_axes.plot(d_grid, gain_fn(d_grid, alpha=row['alpha'], beta=row['beta']), '--',
                   color=color)
    proxy_axes.plot(curve['d'], curve['proxy_gain'], ':', color=color)
  gold_axes.axhline(0.0, color='gray', linewidth=0.5)
  confidence = f"{summary['confidence']:.0%}"
  gold_axes.set(title=f'{_TITLES[method]}: gold, mean of seeds ({confidence} band), fit dashed; '
                      'proxy dotted', xlabel='d = √KL(π ‖ π_init)', ylabel='gold reward − initial')
  gold_axes.title.set_fontsize(8)
  proxy_axes.set_ylabel('proxy reward − initial')
  gold_axes.legend(title='proxy', fontsize=7)
  figure.savefig(path)
  return figure


def plot_coefficients(fits, path: str, *, by: str = 'proxy_params') -> Figure:
  """Writes a PNG: α and β of each method against fits[by] (log scale), with their intervals
  where the fits have them ('interval'), each point annotated with its fit's R² (Gao et al.
  2022, figure 3)."""
  if not fits:
    raise InputError('fits is empty: nothing to plot.')
  missing = sorted({f['proxy'] for f in fits if by not in f})
  if missing:
    raise InputError(f'by={by!r}: the fits of proxies {missing} have no such field.')
  figure = Figure(figsize=(8, 3.5), dpi=100, layout='constrained')
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, 2)
  for i, method in enumerate(METHODS):
    rows = sorted((f for f in fits if f['method'] == method), key=lambda f: f[by])
    if not rows:
      continue
    x = [f[by] for f in rows]
    for ax, coefficient in zip(axes, ('alpha', 'beta')):
      y = np.array([f[coefficient] for f in rows])
      if all('interval' in f for f in rows):
        low, high = np.array([f['interval'][coefficient] for f in rows]).T
        ax.errorbar(x, y, yerr=[y - low, high - y], fmt='o-', color=f'C{i}', capsize=3,
                    label=_TITLES[method])
      else:
        ax.plot(x, y, 'o-', color=f'C{i}', label=_TITLES[method])
      for f, xy in zip(rows, zip(x, y)):
        ax.annotate(f"R²={f['r2']:.2f}", xy, fontsize=6, textcoords='offset points',
                    xytext=(3, 3))
  for ax, name in zip(axes, ('α', 'β')):
    ax.set(xscale='log', xlabel=by, ylabel=name, title=f'{name} against {by}')
    ax.legend()
  figure.savefig(path)
  return figure


def plot_gold_against_proxy(summary: dict, path: str) -> Figure:
  """Writes a PNG: each mean curve's gold gain against its proxy gain, best-of-n solid and RL
  dashed, one colour per proxy (Gao et al. 2022, figure 7: against the proxy reward instead of
  the KL, the two methods nearly coincide)."""
  if not summary['fits']:
    raise InputError('The summary holds no fits to plot.')
  figure = Figure(figsize=(5, 4), dpi=100, layout='constrained')
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  proxies = list(dict.fromkeys(f['proxy'] for f in summary['fits']))
  for f in summary['fits']:
    axes.plot(f['curve']['proxy_gain'], f['curve']['gain'], 'o-' if f['method'] == 'bon' else
              's--', color=f'C{proxies.index(f["proxy"])}', markersize=3,
              label=f'{_TITLES[f["method"]]}, {f["proxy"]}')
  axes.axhline(0.0, color='gray', linewidth=0.5)
  axes.set(title='gold against proxy reward (means over seeds)', xlabel='proxy reward − initial',
           ylabel='gold reward − initial')
  axes.legend(fontsize=7)
  figure.savefig(path)
  return figure


def plot_kl_penalty(table: list[dict], runs, path: str) -> Figure:
  """Writes a PNG per `kl_penalty`'s table: for each proxy, gold gain (left) and proxy gain
  (right) against d, one colour per KL coefficient, each seed thin and the mean over seeds
  with points; the pooled R_RL fit dashed on the left (Gao et al. 2022, figure 10)."""
  if not table:
    raise InputError('The kl_penalty table is empty: no proxy was optimised under several KL '
                     'coefficients.')
  figure = Figure(figsize=(8, 3.5 * len(table)), dpi=100, layout='constrained')
  FigureCanvasAgg(figure)
  for row_axes, entry in zip(figure.subplots(len(table), 2, squeeze=False), table):
    gold_axes, proxy_axes = row_axes
    max_d = 0.0
    for i, coef in enumerate(r['kl_coef'] for r in entry['coefficients']):
      group = [r for r in runs if r.method == 'rl' and r.metadata.get('kl_coef') == coef
               and r.metadata.get('proxy_name', r.proxy) == entry['proxy']]
      for run in group:
        means = run.means()
        gold_axes.plot(means['d'], means['gain'], '-', color=f'C{i}', linewidth=0.6, alpha=0.4)
        proxy_axes.plot(means['d'], means['proxy_gain'], '-', color=f'C{i}', linewidth=0.6,
                        alpha=0.4)
      curve = _mean_curve(group, np.arange(len(group)), None)
      gold_axes.plot(curve['d'], curve['gain'], 'o-', color=f'C{i}', markersize=3,
                     label=f'β = {coef:g}')
      proxy_axes.plot(curve['d'], curve['proxy_gain'], 'o-', color=f'C{i}', markersize=3)
      max_d = max(max_d, float(curve['d'].max()))
    d_grid = np.linspace(0.0, max_d, 200)
    pooled = entry['pooled']
    gold_axes.plot(d_grid, rl_gain(d_grid, alpha=pooled['alpha'], beta=pooled['beta']), 'k--',
                   linewidth=1, label=f"pooled fit, R²={pooled['r2']:.2f}")
    gold_axes.axhline(0.0, color='gray', linewidth=0.5)
    gold_axes.set(title=f"{entry['proxy']}: gold (RL, {len(entry['seeds'])} seeds)",
                  xlabel='d = √KL(π ‖ π_init)', ylabel='gold reward − initial')
    proxy_axes.set(title='proxy', xlabel='d = √KL(π ‖ π_init)', ylabel='proxy reward − initial')
    gold_axes.legend(title='KL coefficient', fontsize=7)
  figure.savefig(path)
  return figure
