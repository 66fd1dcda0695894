"""Reward-model overoptimization (Gao, Schulman & Hilton 2022): the functional forms of the gold
reward against the distance from the initial policy, their least-squares fits, and the figures.

With d = √KL(π ‖ π_init), the gold reward gained over the initial policy, R(d) = gold(d) − gold(0),
follows (Gao et al. 2022)

    best-of-n:  R_bon(d) = d (α_bon − β_bon d)
    RL:         R_RL(d)  = d (α_RL − β_RL log d)

Both are linear in (α, β) at fixed d, so each is fitted by ordinary least squares, without an
intercept (R(0) = 0 by construction). Measurements come as records, one per measured point (per n
for best-of-n, per evaluation step for RL):

    {'proxy': name, 'method': 'bon' | 'rl', 'kl': …, 'gold_reward': …, 'proxy_reward': …, …}

Host-side NumPy: arrays and records in, dicts and PNG files out.
"""

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax.errors import InputError

METHODS = ('bon', 'rl')
_TITLES = {'bon': 'best-of-n', 'rl': 'RL'}
_MEASURED = ('proxy', 'method', 'kl', 'gold_reward', 'proxy_reward')


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
  ss_res, ss_tot = float(residual_N @ residual_N), float(np.sum((gain_N - gain_N.mean())**2))
  if ss_tot > 0:
    r2 = 1 - ss_res / ss_tot
  else:
    r2 = 1.0 if ss_res == 0 else math.nan
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


def measurements_to_curves(records, *, method: str, kl_atol: float = 1e-6) -> dict[str, dict]:
  """Per proxy (in order of first appearance), its curve for one method, sorted by KL.

  Returns {proxy: {'kl', 'd', 'gold_reward', 'proxy_reward', 'gain', 'proxy_gain': [N] arrays,
  'metadata': dict}}: d = √KL, gain = gold reward − its value at the initial policy, proxy_gain
  likewise. The initial policy is the curve's lowest-KL point, which must have |kl| ≤ kl_atol
  (best-of-n's n = 1, RL's step 0; an estimated KL may miss 0 by rounding, and d clips it at 0).
  metadata holds the other fields equal in all the proxy's records (e.g. 'proxy_params');
  per-point fields such as 'n' or 'step' are left out.
  """
  _form(method)
  _check_records(records)
  grouped = {}
  for record in records:
    if record['method'] == method:
      grouped.setdefault(record['proxy'], []).append(record)
  curves = {}
  for proxy, group in grouped.items():
    group = sorted(group, key=lambda r: r['kl'])
    kl_N, gold_N, proxy_N = (np.array([r[key] for r in group], np.float64)
                             for key in ('kl', 'gold_reward', 'proxy_reward'))
    if abs(kl_N[0]) > kl_atol:
      raise InputError(f'Proxy {proxy!r} ({method}): its lowest kl is {kl_N[0]:g}, not 0; each '
                       'curve needs the initial policy (kl = 0) as a point to measure gains from.')
    curves[proxy] = {'kl': kl_N, 'd': np.sqrt(np.maximum(kl_N, 0.0)), 'gold_reward': gold_N,
                     'proxy_reward': proxy_N, 'gain': gold_N - gold_N[0],
                     'proxy_gain': proxy_N - proxy_N[0], 'metadata': _shared_fields(group)}
  return curves


def fit_all(records, *, kl_atol: float = 1e-6) -> list[dict]:
  """One row per (method, proxy) of the records: {'proxy', 'method', **metadata, 'gold_init',
  'max_d', 'num_points', 'best_d', 'best_gain', **fit}, methods in the order of METHODS, proxies
  in order of first appearance. gold_init is the gold reward of the initial policy; (best_d,
  best_gain) the measured point of largest gold gain, next to the fit's peak; metadata as in
  `measurements_to_curves` (e.g. 'proxy_params', 'proxy_comparisons')."""
  rows = []
  for method in METHODS:
    for proxy, curve in measurements_to_curves(records, method=method, kl_atol=kl_atol).items():
      best = int(np.argmax(curve['gain']))
      rows.append({'proxy': proxy, 'method': method, **curve['metadata'],
                   'gold_init': float(curve['gold_reward'][0]), 'max_d': float(curve['d'][-1]),
                   'num_points': len(curve['d']), 'best_d': float(curve['d'][best]),
                   'best_gain': float(curve['gain'][best]),
                   **fit(curve['d'], curve['gain'], method=method)})
  return rows


def plot_curves(records, fits, path: str, *, method: str) -> str:
  """Writes Gao et al.'s figure 1 for one method as a PNG: rewards against d, one colour per proxy.

  Gold reward solid (points measured), its fitted R(d) dashed, proxy reward dotted on a twin axis.
  Both are relative to the initial policy (gain and proxy_gain): a Bradley–Terry reward is defined
  only up to a constant, and its scale is its own, hence the second axis.
  """
  gain_fn, _ = _form(method)
  curves = measurements_to_curves(records, method=method)
  if not curves:
    raise InputError(f'records hold no {method!r} measurements to plot.')
  fit_by_proxy = {f['proxy']: f for f in fits if f['method'] == method}
  figure = Figure(figsize=(6, 4), dpi=100, layout='constrained')
  FigureCanvasAgg(figure)
  gold_axes = figure.add_subplot()
  proxy_axes = gold_axes.twinx()
  for i, (proxy, curve) in enumerate(curves.items()):
    if proxy not in fit_by_proxy:
      raise InputError(f'fits has no {method!r} fit of proxy {proxy!r}.')
    coefficients = {k: fit_by_proxy[proxy][k] for k in ('alpha', 'beta')}
    d_grid = np.linspace(0.0, curve['d'][-1], 200)
    gold_axes.plot(curve['d'], curve['gain'], 'o-', color=f'C{i}', markersize=3, label=proxy)
    gold_axes.plot(d_grid, gain_fn(d_grid, **coefficients), '--', color=f'C{i}')
    proxy_axes.plot(curve['d'], curve['proxy_gain'], ':', color=f'C{i}')
  gold_axes.axhline(0.0, color='gray', linewidth=0.5)
  gold_axes.set(title=f'{_TITLES[method]}: gold (solid, fit dashed), proxy (dotted)',
                xlabel='d = √KL(π ‖ π_init)', ylabel='gold reward − initial')
  proxy_axes.set_ylabel('proxy reward − initial')
  gold_axes.legend(title='proxy', fontsize=7)
  figure.savefig(path)
  return path


def plot_coefficients(fits, path: str, *, by: str = 'proxy_params') -> str:
  """Writes a PNG: α and β of each method against fits[by] (log scale), each point annotated
  with its fit's R² (Gao et al. 2022, figure 3)."""
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
      y = [f[coefficient] for f in rows]
      ax.plot(x, y, 'o-', color=f'C{i}', label=_TITLES[method])
      for f, xy in zip(rows, zip(x, y)):
        ax.annotate(f"R²={f['r2']:.2f}", xy, fontsize=6, textcoords='offset points',
                    xytext=(3, 3))
  for ax, name in zip(axes, ('α', 'β')):
    ax.set(xscale='log', xlabel=by, ylabel=name, title=f'{name} against {by}')
    ax.legend()
  figure.savefig(path)
  return path
