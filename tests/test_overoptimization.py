"""Overoptimization fits (Gao et al. 2022): recovery of known α and β, the peaks, R², the curves
built from records, the fits of every (proxy, method, seed), the curves averaged over seeds with
bootstrap intervals, and the figures."""

import dataclasses
import math
import random
import warnings

import numpy as np
import pytest
import scipy.special
from matplotlib.figure import Figure

from rlhf_jax.analysis.overoptimization import (Run, disagreement, fit, fit_all,
                                                fit_bon, fit_rl, fit_shared_alpha, kl_penalty,
                                                load_runs, measurements_to_curves,
                                                judge_stop, pair_accuracy,
                                                plot_coefficients, plot_curves,
                                                plot_gold_against_proxy, plot_kl_penalty,
                                                save_runs, scaling, size_scaling,
                                                stop_at_held_out_peak,
                                                stop_before_disagreement, summarize)
from rlhf_jax.errors import InputError

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _features(d, method):
  """The regressors of R = α·x₁ + β·x₂: bon x = (d, −d²); RL x = (d, −d log d), xlogy(0, 0) = 0."""
  second = d**2 if method == 'bon' else scipy.special.xlogy(d, d)
  return np.stack([d, -second], axis=1)


def _normal_equations(d, gain, method):
  """(α, β) = (XᵀX)⁻¹ Xᵀ y and R² = 1 − Σ residual² / Σ (y − ȳ)², written out independently."""
  x = _features(d, method)
  coefficients = np.linalg.solve(x.T @ x, x.T @ gain)
  residual = gain - x @ coefficients
  return coefficients, 1 - np.sum(residual**2) / np.sum((gain - gain.mean())**2)


@pytest.mark.parametrize('method, alpha, beta, d_max', [('bon', 1.2, 0.4, 3.0),
                                                         ('rl', 0.8, 0.3, 5.0)])
def test_fit_recovers_known_coefficients_from_noisy_gains(method, alpha, beta, d_max):
  d = np.linspace(0.0, d_max, 40)
  exact = (d * (alpha - beta * d) if method == 'bon' else
           d * alpha - beta * scipy.special.xlogy(d, d))
  gain = exact + np.random.default_rng(0).normal(0.0, 0.01, d.shape)
  result = fit(d, gain, method=method)
  assert result['alpha'] == pytest.approx(alpha, abs=0.03)
  assert result['beta'] == pytest.approx(beta, abs=0.03)
  (expected_alpha, expected_beta), expected_r2 = _normal_equations(d, gain, method)
  assert result['alpha'] == pytest.approx(expected_alpha, rel=1e-9)
  assert result['beta'] == pytest.approx(expected_beta, rel=1e-9)
  assert result['r2'] == pytest.approx(expected_r2, rel=1e-9)
  assert 0.99 < result['r2'] < 1.0


def test_exact_bon_gains_give_r2_one_and_the_analytic_peak():
  d = np.array([0.0, 0.5, 1.0, 2.5, 3.0])
  result = fit_bon(d, d * (1.0 - 0.25 * d))
  assert result['alpha'] == pytest.approx(1.0) and result['beta'] == pytest.approx(0.25)
  assert result['r2'] == pytest.approx(1.0, abs=1e-12)
  assert result['peak_d'] == pytest.approx(2.0)  # α / (2β)
  assert result['peak_gain'] == pytest.approx(1.0)  # α² / (4β)


def test_exact_rl_gains_give_r2_one_and_the_analytic_peak():
  d = np.array([0.0, 0.5, 1.0, 2.0, 4.0])
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # No log(0) warning at d = 0.
    result = fit_rl(d, d * (1.0 - 0.5 * np.log(np.maximum(d, 1e-300))))
  assert result['alpha'] == pytest.approx(1.0) and result['beta'] == pytest.approx(0.5)
  assert result['r2'] == pytest.approx(1.0, abs=1e-12)
  assert result['peak_d'] == pytest.approx(math.e)  # exp(α/β − 1)
  assert result['peak_gain'] == pytest.approx(0.5 * math.e)  # β d*


def test_a_d_zero_point_adds_nothing_to_the_rl_fit():
  d, gain = np.array([0.3, 1.5, 2.0, 3.0]), np.array([0.2, 0.5, 0.45, 0.3])
  without = fit_rl(d, gain)
  with_zero = fit_rl(np.concatenate([[0.0], d]), np.concatenate([[0.0], gain]))
  assert with_zero['alpha'] == pytest.approx(without['alpha'], rel=1e-9)
  assert with_zero['beta'] == pytest.approx(without['beta'], rel=1e-9)
  assert np.isfinite(with_zero['r2'])


def test_peaks_where_the_gain_does_not_turn_down():
  d = np.array([0.0, 1.0, 2.0, 3.0])
  rising = fit_bon(d, d * (1.0 + 0.5 * d))  # β = −0.5: grows without bound.
  assert rising['beta'] == pytest.approx(-0.5)
  assert rising['peak_d'] is None and rising['peak_gain'] is None
  falling = fit_bon(d, d * (-1.0 - 0.5 * d))  # α < 0 < β: the best is not to move.
  assert falling['peak_d'] == 0.0 and falling['peak_gain'] == 0.0
  flat_rl = fit_rl(d, scipy.special.xlogy(d, d))  # α = 0, β = −1: d log d grows.
  assert flat_rl['peak_d'] is None
  barely_falling = fit_rl(d, d - 1e-6 * scipy.special.xlogy(d, d))  # exp(α/β) overflows.
  assert barely_falling['peak_d'] == math.inf


def test_all_equal_gains_and_too_few_points():
  result = fit_bon([0.0, 1.0, 2.0], [0.0, 0.0, 0.0])
  assert (result['alpha'], result['beta'], result['r2']) == (0.0, 0.0, 1.0)
  with pytest.raises(ValueError, match='two points'):
    fit_bon([0.0, 1.0, 1.0], [0.0, 0.5, 0.5])
  with pytest.raises(ValueError, match='two points'):
    fit_rl([0.0, 1.0, 1.0], [0.0, 0.5, 0.4])  # At d = 1, log d = 0: β is not seen.
  with pytest.raises(ValueError, match='same size'):
    fit_bon([0.0, 1.0, 2.0], [0.0, 0.5])
  with pytest.raises(ValueError, match='≥ 0'):
    fit_bon([0.0, -1.0, 2.0], [0.0, 0.5, 0.4])
  with pytest.raises(ValueError, match='method'):
    fit([0.0, 1.0, 2.0], [0.0, 0.5, 0.4], method='dpo')


def _record(proxy, method, kl, gold, proxy_reward, **extra):
  return {'proxy': proxy, 'method': method, 'kl': kl, 'gold_reward': gold,
          'proxy_reward': proxy_reward, **extra}


def test_measurements_to_curves_sorts_and_measures_gains_from_kl_zero():
  records = [
      _record('small', 'bon', 0.64, 0.70, 2.3, n=4, proxy_params=1e6),
      _record('large', 'bon', 0.0, 0.10, -1.0, n=1, proxy_params=1e7),
      _record('small', 'bon', 0.0, 0.50, 2.0, n=1, proxy_params=1e6),
      _record('small', 'rl', 0.0, 9.0, 9.0, step=0, proxy_params=1e6),  # Another method.
      _record('small', 'bon', 0.19, 0.75, 2.1, n=2, proxy_params=1e6),
      _record('large', 'bon', 0.25, 0.30, -0.5, n=2, proxy_params=1e7),
  ]
  curves = measurements_to_curves(records, method='bon')
  assert list(curves) == [('small', 0), ('large', 0)]  # No 'seed': seed 0.
  small = curves['small', 0]
  np.testing.assert_allclose(small['kl'], [0.0, 0.19, 0.64])
  np.testing.assert_allclose(small['d'], [0.0, math.sqrt(0.19), 0.8])
  np.testing.assert_allclose(small['gold_reward'], [0.50, 0.75, 0.70])
  np.testing.assert_allclose(small['gain'], [0.0, 0.25, 0.20])
  np.testing.assert_allclose(small['proxy_gain'], [0.0, 0.1, 0.3], atol=1e-12)
  assert small['metadata'] == {'proxy_params': 1e6}  # n differs per point: left out.
  np.testing.assert_allclose(curves['large', 0]['gain'], [0.0, 0.2])
  np.testing.assert_allclose(curves['large', 0]['d'], [0.0, 0.5])
  # Seeds are runs of their own, each with its own initial policy's measurement.
  seeded = measurements_to_curves([_record('p', 'bon', 0.0, 0.5, 1.0, seed=0),
                                   _record('p', 'bon', 0.0, 0.6, 1.0, seed=1),
                                   _record('p', 'bon', 0.25, 0.9, 1.0, seed=1),
                                   _record('p', 'bon', 0.25, 0.7, 1.0, seed=0)], method='bon')
  assert list(seeded) == [('p', 0), ('p', 1)]
  np.testing.assert_allclose(seeded['p', 0]['gain'], [0.0, 0.2])
  np.testing.assert_allclose(seeded['p', 1]['gain'], [0.0, 0.3])
  assert seeded['p', 1]['metadata'] == {}
  # An estimated KL a rounding error below 0 still marks the initial policy; d clips it at 0.
  rl = measurements_to_curves([_record('p', 'rl', -1e-9, 1.0, 0.0),
                               _record('p', 'rl', 0.25, 1.5, 1.0)], method='rl')
  np.testing.assert_allclose(rl['p', 0]['d'], [0.0, 0.5])


def test_measurements_to_curves_rejects_curves_without_kl_zero_and_bad_records():
  records = [_record('a', 'bon', 0.0, 0.5, 2.0), _record('b', 'bon', 0.19, 0.6, 2.1),
             _record('b', 'bon', 0.64, 0.7, 2.2)]
  with pytest.raises(ValueError, match="'b', seed 0"):
    measurements_to_curves(records, method='bon')
  with pytest.raises(ValueError, match=r"records\[1\] lacks \['gold_reward'\]"):
    measurements_to_curves([records[0], {'proxy': 'a', 'method': 'bon', 'kl': 0.1,
                                         'proxy_reward': 2.0}], method='bon')
  with pytest.raises(ValueError, match="'dpo'"):
    measurements_to_curves([_record('a', 'dpo', 0.0, 0.5, 2.0)], method='bon')


def _synthetic_records(seed=0):
  """Two proxies × two methods, gold gains exactly on the forms, in shuffled order."""
  coefficients = {('small', 'bon'): (1.0, 0.5), ('small', 'rl'): (0.6, 0.4),
                  ('large', 'bon'): (1.5, 0.25), ('large', 'rl'): (0.9, 0.2)}
  records = []
  for (proxy, method), (alpha, beta) in coefficients.items():
    params, comparisons = (1e6, 1000) if proxy == 'small' else (1e7, 1000)
    for i, d in enumerate([0.0, 0.4, 0.9, 1.3, 2.0]):
      gain = alpha * d - beta * (d**2 if method == 'bon' else scipy.special.xlogy(d, d))
      records.append(_record(proxy, method, d**2, 0.3 + gain, 1.0 + d, step=i,
                             proxy_params=params, proxy_comparisons=comparisons))
  random.Random(seed).shuffle(records)
  return records, coefficients


def test_fit_all_fits_each_proxy_and_method_and_keeps_metadata():
  records, coefficients = _synthetic_records()
  fits = fit_all(records)
  assert len(fits) == 4
  assert [f['method'] for f in fits] == ['bon', 'bon', 'rl', 'rl']
  for f in fits:
    alpha, beta = coefficients[f['proxy'], f['method']]
    assert f['alpha'] == pytest.approx(alpha) and f['beta'] == pytest.approx(beta)
    assert f['r2'] == pytest.approx(1.0, abs=1e-12)
    assert f['proxy_params'] == (1e6 if f['proxy'] == 'small' else 1e7)
    assert f['proxy_comparisons'] == 1000
    assert 'step' not in f and f['seed'] == 0
    assert f['gold_init'] == pytest.approx(0.3)
    assert f['max_d'] == pytest.approx(2.0) and f['num_points'] == 5
    grid = np.array([0.0, 0.4, 0.9, 1.3, 2.0])
    gains = alpha * grid - beta * (grid**2 if f['method'] == 'bon'
                                   else scipy.special.xlogy(grid, grid))
    assert f['best_d'] == pytest.approx(grid[np.argmax(gains)])
    assert f['best_gain'] == pytest.approx(gains.max())
    assert f['final_gain'] == pytest.approx(gains[-1])
    # Peaks inside (0, 2): bon 1.0, 3.0 (beyond), RL e^0.5 = 1.65, e^3.5 = 33 (beyond).
    assert f['peak_inside'] == (f['proxy'] == 'small')


def _gain(method, alpha, beta, d):
  return alpha * d - beta * (d**2 if method == 'bon' else scipy.special.xlogy(d, d))


def _runs(coefficients, *, seeds=(0, 1, 2), num_prompts=50, noise=0.0, seed_scale=None,
          d=(0.0, 0.4, 0.9, 1.3, 2.0, 2.6)):
  """Runs whose mean gold gain per prompt follows the forms exactly; noise: per prompt and
  point (a normal of that std); seed_scale: the gain of seed s multiplied by seed_scale[s]."""
  rng = np.random.default_rng(0)
  d = np.array(d)
  runs = []
  for (proxy, method), (alpha, beta) in coefficients.items():
    for s in seeds:
      scale = 1.0 if seed_scale is None else seed_scale[s]
      gold = 0.3 + scale * _gain(method, alpha, beta, d)[:, None] + rng.normal(
          0.0, noise, (len(d), num_prompts))
      gold -= (gold[:1] - 0.3)  # Every prompt starts at 0.3: the gains are exactly per prompt.
      runs.append(Run(method=method, proxy=proxy, seed=s,
                      kl_PxI=np.repeat(d[:, None]**2, num_prompts, 1), gold_PxI=gold,
                      proxy_PxI=1.0 + np.repeat(d[:, None], num_prompts, 1),
                      points=tuple({'step': i} for i in range(len(d))),
                      metadata={'proxy_comparisons': 1000 if proxy == 'small' else 8000}))
  return runs


COEFFICIENTS = {('small', 'bon'): (1.0, 0.5), ('small', 'rl'): (0.6, 0.4),
                ('large', 'bon'): (1.5, 0.5), ('large', 'rl'): (0.9, 0.4)}


def test_without_noise_the_intervals_are_the_exact_fit():
  summary = summarize(_runs(COEFFICIENTS), num_resamples=50)
  assert [(f['method'], f['proxy']) for f in summary['fits']] == [
      ('bon', 'small'), ('bon', 'large'), ('rl', 'small'), ('rl', 'large')]
  for f in summary['fits']:
    alpha, beta = COEFFICIENTS[f['proxy'], f['method']]
    assert f['alpha'] == pytest.approx(alpha) and f['beta'] == pytest.approx(beta)
    assert f['r2'] == pytest.approx(1.0)
    for key, (low, high) in f['interval'].items():
      assert low == pytest.approx(f[key]) and high == pytest.approx(f[key]), key
    assert f['seeds'] == [0, 1, 2] and f['num_prompts'] == 50
    assert f['gold_init'] == pytest.approx(0.3)
    assert f['proxy_comparisons'] in (1000, 8000)
    np.testing.assert_allclose(f['curve']['gain_low'], f['curve']['gain'])
  peaks = {(f['method'], f['proxy']): (f['peak_d'], f['rises'], f['falls'])
           for f in summary['fits']}
  # Measured at d = 0.4, 0.9, 1.3, 2.0, 2.6: bon small gains 0.32, 0.495, 0.455, 0, −0.78;
  # rl large rises throughout (0.9 d − 0.4 d log d > 0 up to d = e^2.25).
  assert peaks['bon', 'small'] == (pytest.approx(1.0), True, True)  # α/(2β)
  assert peaks['bon', 'large'] == (pytest.approx(1.5), True, True)
  assert peaks['rl', 'small'] == (pytest.approx(math.exp(0.5)), True, True)  # e^(α/β − 1)
  assert peaks['rl', 'large'][0] == pytest.approx(math.exp(1.25))  # 3.5: beyond d = 2.6.
  assert peaks['rl', 'large'][1:] == (True, False)
  assert len(summary['per_seed']) == 12
  for row in summary['per_seed']:
    assert row['seed'] in (0, 1, 2)
    assert (row['rises'], row['falls']) == peaks[row['method'], row['proxy']][1:]
  for c in summary['comparisons']:
    assert (c['fewer'], c['more']) == ('small', 'large')
    assert c['later'] == c['higher'] == c['later_and_higher'] == 1.0
    assert c['seeds_later_and_higher'] == c['seeds'] == 3
  # KL efficiency: the proxy gains d (slope 1) under both methods; the gold slope is the gain
  # per unit d up to the best measured point.
  d = np.array([0.0, 0.4, 0.9, 1.3, 2.0, 2.6])
  for row in summary['kl_efficiency']:
    assert row['proxy_slope_bon'] == row['proxy_slope_rl'] == pytest.approx(1.0)
    assert row['proxy_slope_ratio'] == pytest.approx(1.0)
    for method in ('bon', 'rl'):
      gains = _gain(method, *COEFFICIENTS[row['proxy'], method], d)
      best = np.argmax(gains)
      assert row[f'gold_slope_{method}'] == pytest.approx(gains[best] / d[best])


def test_the_intervals_cover_the_truth_and_the_spread_of_seeds():
  noisy = summarize(_runs(COEFFICIENTS, num_prompts=200, noise=0.3), num_resamples=300)
  for f in noisy['fits']:
    alpha, beta = COEFFICIENTS[f['proxy'], f['method']]
    for key, truth in (('alpha', alpha), ('beta', beta)):
      low, high = f['interval'][key]
      assert low < f[key] < high and low < truth < high, (f['method'], f['proxy'], key)
  # Seeds that scale the gain by 0.5, 1 and 1.5 (no prompt noise): the mean scales it by 1 and
  # the interval spans what a resample of three seeds can give, never beyond the extremes.
  spread = summarize(_runs({('p', 'bon'): (1.0, 0.5)}, seed_scale={0: 0.5, 1: 1.0, 2: 1.5}),
                     num_resamples=400)
  (f,) = spread['fits']
  low, high = f['interval']['peak_gain']
  assert f['peak_gain'] == pytest.approx(0.5)  # α²/(4β)
  assert 0.25 - 1e-9 <= low < 0.45 and 0.55 < high <= 0.75 + 1e-9
  assert [row['peak_gain'] for row in spread['per_seed']] == pytest.approx([0.25, 0.5, 0.75])


def test_proxies_are_compared_within_a_model_and_number_of_steps_and_scaled_by_data():
  coefficients = {('p250', 'bon'): (0.0, 0.5), ('p1000', 'bon'): (1.0, 0.5),
                  ('p4000', 'bon'): (1.5, 0.5), ('p1000-4ep', 'bon'): (1.2, 0.5)}
  runs = _runs(coefficients)
  meta = {'p250': (250, 600), 'p1000': (1000, 600), 'p4000': (4000, 600), 'p1000-4ep': (1000, 250)}
  runs = [dataclasses.replace(r, metadata={'proxy_model': 'policy',
                                           'proxy_comparisons': meta[r.proxy][0],
                                           'proxy_steps': meta[r.proxy][1]}) for r in runs]
  summary = summarize(runs, num_resamples=20)
  assert [(c['fewer'], c['more']) for c in summary['comparisons']] == [
      ('p250', 'p1000'), ('p1000', 'p4000')]  # p1000-4ep has no peer at 250 steps.
  (table,) = scaling([f for f in summary['fits'] if f['proxy_steps'] == 600])
  assert [row['proxy_comparisons'] for row in table['rows']] == [250, 1000, 4000]
  assert [row['rises'] for row in table['rows']] == [False, True, True]  # α = 0: no gain.
  assert table['no_gain_up_to'] == 250 and table['method'] == 'bon'
  assert table['rows'][2]['peak_gain'] == pytest.approx(1.5**2 / 2)  # α²/(4β)
  assert scaling(summary['fits'], by='proxy_steps')[0]['rows'][0]['proxy'] == 'p1000-4ep'


def test_one_alpha_fits_curves_that_share_it_and_costs_r2_where_they_do_not():
  d = np.array([0.0, 0.3, 0.7, 1.2, 1.8, 2.5])
  shared = fit_shared_alpha([(d, _gain('rl', 0.5, beta, d)) for beta in (0.2, 0.3, 0.45)],
                            method='rl')
  assert shared['alpha'] == pytest.approx(0.5)
  assert shared['betas'] == pytest.approx([0.2, 0.3, 0.45])
  assert shared['r2'] == pytest.approx(1.0) and shared['r2_separate'] == pytest.approx(1.0)
  apart = fit_shared_alpha([(d, _gain('bon', alpha, 0.3, d)) for alpha in (0.2, 0.8)],
                           method='bon')
  assert apart['r2_separate'] == pytest.approx(1.0) and apart['r2'] < 0.99
  with pytest.raises(InputError, match='needs two points that set them apart'):
    fit_shared_alpha([(d, _gain('rl', 0.5, 0.2, d)), (np.zeros(3), np.zeros(3))], method='rl')
  # Curves that never leave 0 (a policy that gains nothing) are fitted exactly, α = β = 0.
  flat = fit_shared_alpha([(d, np.zeros_like(d))] * 2, method='bon')
  assert (flat['alpha'], flat['betas'], flat['r2'], flat['r2_separate']) == (0, [0, 0], 1, 1)


def test_size_scaling_relates_the_coefficients_to_log_parameters():
  """Three proxy sizes of one family; RL: one α, β = 0.5 − 0.1·log10(params); best-of-n: α
  growing with size. A second family (other comparisons) is scaled on its own."""
  sizes = {'s': 1e4, 'm': 1e5, 'l': 1e6}
  coefficients = {}
  for name, params in sizes.items():
    coefficients[name, 'rl'] = (0.6, 0.5 - 0.1 * math.log10(params))
    coefficients[name, 'bon'] = (0.2 * math.log10(params), 0.5)
  runs = [dataclasses.replace(r, metadata={'proxy_params': sizes[r.proxy],
                                           'proxy_comparisons': 1000, 'proxy_steps': 600})
          for r in _runs(coefficients)]
  other = [dataclasses.replace(r, proxy=r.proxy + '-other', metadata=r.metadata | {
      'proxy_comparisons': 4000}) for r in runs if r.proxy != 'l']
  tables = size_scaling(summarize(runs + other, num_resamples=10)['fits'])
  assert [(t['method'], t['proxy_comparisons'], len(t['rows'])) for t in tables] == [
      ('bon', 1000, 3), ('bon', 4000, 2), ('rl', 1000, 3), ('rl', 4000, 2)]
  rl = tables[2]
  assert [row['proxy'] for row in rl['rows']] == ['s', 'm', 'l']
  assert rl['beta_per_log10_params'] == pytest.approx(-0.1)
  assert rl['alpha_per_log10_params'] == pytest.approx(0.0, abs=1e-9)
  assert rl['shared_alpha'] == pytest.approx(0.6)
  assert rl['r2_shared_alpha'] == pytest.approx(1.0)
  assert rl['betas_shared_alpha'] == pytest.approx({'s': 0.1, 'm': 0.0, 'l': -0.1})
  bon = tables[0]
  assert bon['alpha_per_log10_params'] == pytest.approx(0.2)
  assert bon['r2_shared_alpha'] < bon['r2_separate'] == pytest.approx(1.0)


def test_pair_accuracy_counts_agreement_with_the_gold_and_skips_its_ties():
  # Pairs: gold prefers b, a, b, (tie: skipped), b; the model prefers b, b, a, b, and ties.
  result = pair_accuracy(score_a=[0, 1, 5, 0, 2], score_b=[1, 2, 4, 3, 2],
                         gold_a=[0.1, 0.9, 0.2, 0.5, 0.0], gold_b=[0.8, 0.3, 0.7, 0.5, 1.0])
  assert result == {'accuracy': (1 + 0 + 0 + 0.5) / 4, 'pairs': 4}
  assert pair_accuracy([0, 1], [1, 0], [0.5, 0.5], [0.5, 0.5]) == {'accuracy': None, 'pairs': 0}


def test_disagreement_is_the_std_of_standardised_members_averaged_over_prompts():
  reference_MxI = np.array([[0.0, 2.0], [10.0, 30.0]])  # Means 1, 20; stds 1, 10.
  # Point 0: both members at their means (+0 std); point 1: member 0 at +1 std, member 1 at
  # −1 std on prompt 0, both at +1 std on prompt 1.
  scores_MxPxI = np.array([[[1.0, 1.0], [2.0, 2.0]], [[20.0, 20.0], [10.0, 30.0]]])
  np.testing.assert_allclose(disagreement(scores_MxPxI, reference_MxI), [0.0, 0.5])


def test_stop_before_disagreement_stops_at_the_last_point_under_the_threshold():
  assert stop_before_disagreement([0.2, 0.22, 0.28, 0.31, 0.5], rise=0.5) == 2
  assert stop_before_disagreement([0.2] * 5, rise=0.5) == 4  # Never rises.
  assert stop_before_disagreement([0.2, 0.5, 0.5], rise=0.5) == 0


def test_stop_at_held_out_peak_and_judge_stop_by_the_gold():
  gain = [0.0, 0.03, 0.05, 0.02, -0.04]
  stop = stop_at_held_out_peak([0.0, 0.4, 0.3, 0.6, 0.5])
  assert stop == 3
  assert judge_stop(stop, gain) == {
      'stop_index': 3, 'gain_at_stop': 0.02, 'best_index': 2, 'best_gain': 0.05,
      'final_gain': -0.04, 'regret': pytest.approx(0.03)}


def _penalised_runs(*, frontier_shift=0.0, proxy_shift=0.1):
  """RL runs against one proxy under three KL coefficients, seeds 0–2: the unpenalised runs
  follow R_RL(d) = d(0.6 − 0.4 log d) out to d = 2.6 with proxy gain d; a coefficient stops
  its runs sooner (at d 1.3 and 0.975), on the same frontier shifted by frontier_shift, and
  with proxy_shift + 0.01·s more proxy gain at every d in seed s. Every run is measured on
  one grid of d (steps of 0.325), so that matching d needs no interpolation."""
  runs = []
  for coef, num_points in ((0.0, 9), (0.02, 5), (0.1, 4)):
    d = 0.325 * np.arange(num_points)
    for s in range(3):
      shift = (frontier_shift, proxy_shift + 0.01 * s) if coef else (0.0, 0.0)
      gain = _gain('rl', 0.6, 0.4, d) + np.where(d > 0, shift[0], 0.0)
      proxy = d + np.where(d > 0, shift[1], 0.0)
      runs.append(Run(method='rl', proxy=f'p-kl{coef:g}', seed=s,
                      kl_PxI=np.repeat(d[:, None]**2, 4, 1),
                      gold_PxI=np.repeat(0.3 + gain[:, None], 4, 1),
                      proxy_PxI=np.repeat(1.0 + proxy[:, None], 4, 1),
                      points=tuple({'step': 10 * i} for i in range(num_points)),
                      metadata={'proxy_name': 'p', 'kl_coef': coef}))
  return runs


def test_a_kl_penalty_that_only_stops_early_lies_on_the_frontier(tmp_path):
  (entry,) = kl_penalty(_penalised_runs())
  assert entry['proxy'] == 'p' and entry['seeds'] == [0, 1, 2]
  assert entry['pooled']['alpha'] == pytest.approx(0.6)
  assert entry['pooled']['beta'] == pytest.approx(0.4)
  rows = {r['kl_coef']: r for r in entry['coefficients']}
  assert list(rows) == [0.0, 0.02, 0.1]
  assert [rows[c]['final_d'] for c in rows] == pytest.approx([2.6, 1.3, 0.975])
  for coef, row in rows.items():
    assert row['residual'] == pytest.approx(0.0, abs=1e-12)
    assert row['gold_at_matched_d'] == pytest.approx(0.0, abs=1e-12)
    # Proxy gain 0.1 + 0.01 s above the unpenalised run at every matched d: mean 0.11, and the
    # standard error of (0.10, 0.11, 0.12) is 0.01/√3.
    assert row['proxy_at_matched_d'] == pytest.approx(0.11 if coef else 0.0)
    assert row['proxy_at_matched_d_se'] == pytest.approx(0.01 / math.sqrt(3) if coef else 0.0)
  assert written(plot_kl_penalty([entry], _penalised_runs(), str(tmp_path / 'kl.png')),
                 tmp_path / 'kl.png')


def test_a_kl_penalty_below_the_frontier_shows_in_its_residuals():
  (entry,) = kl_penalty(_penalised_runs(frontier_shift=-0.05))
  rows = {r['kl_coef']: r for r in entry['coefficients']}
  for coef in (0.02, 0.1):
    assert rows[coef]['gold_at_matched_d'] == pytest.approx(-0.05)
    assert rows[coef]['residual'] < 0 < rows[0.0]['residual']


def test_kl_penalty_needs_unpenalised_runs_on_the_same_seeds():
  runs = _penalised_runs()
  with pytest.raises(InputError, match=r"proxy 'p' has no unpenalised runs"):
    kl_penalty([r for r in runs if r.metadata['kl_coef'] != 0.0])
  with pytest.raises(InputError, match='same seeds'):
    kl_penalty([r for r in runs if not (r.metadata['kl_coef'] == 0.1 and r.seed == 2)])
  assert kl_penalty([r for r in runs if r.metadata['kl_coef'] == 0.0]) == []


def test_a_curve_that_only_falls_neither_rises_nor_needs_its_fit_to_say_so():
  """The RL form rises near d = 0 whenever β > 0, even fitted to a curve that only falls: the
  verdict reads the measured points and their intervals, not the fitted peak."""
  falling = _runs({('p', 'rl'): (-0.3, 0.1)}, num_prompts=100, noise=0.05)
  (f,) = summarize(falling, num_resamples=200)['fits']
  assert f['peak_gain'] > 0 and f['peak_d'] < 0.1  # The form's rise, tiny and early.
  assert max(f['curve']['gain'][1:]) < 0
  assert not f['rises'] and f['falls']


def test_summarize_needs_the_same_prompts_and_seeds_for_every_proxy():
  runs = _runs(COEFFICIENTS)
  with pytest.raises(ValueError, match='same prompts'):
    summarize([r for r in runs if not (r.proxy == 'large' and r.seed == 2)])
  fewer_prompts = dataclasses.replace(runs[0], kl_PxI=runs[0].kl_PxI[:, :10],
                                      gold_PxI=runs[0].gold_PxI[:, :10],
                                      proxy_PxI=runs[0].proxy_PxI[:, :10])
  with pytest.raises(ValueError, match='same prompts'):
    summarize([fewer_prompts, *runs[1:]])
  with pytest.raises(ValueError, match='one label per point'):
    dataclasses.replace(runs[0], points=runs[0].points[:2])


def test_runs_round_trip_through_npz_and_give_records(tmp_path):
  runs = _runs({('p', 'rl'): (0.6, 0.4)}, seeds=(3, 5), noise=0.1, num_prompts=7)
  save_runs(runs, str(tmp_path / 'per_prompt.npz'))
  loaded = load_runs(str(tmp_path / 'per_prompt.npz'))
  for a, b in zip(runs, loaded, strict=True):
    assert (a.method, a.proxy, a.seed, a.points, a.metadata) == (
        b.method, b.proxy, b.seed, b.points, b.metadata)
    for key in ('kl_PxI', 'gold_PxI', 'proxy_PxI'):
      np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
  records = runs[1].records()
  assert [r['step'] for r in records] == list(range(6))
  assert records[2] == {'proxy': 'p', 'method': 'rl', 'seed': 5, 'proxy_comparisons': 8000,
                        'step': 2, 'kl': pytest.approx(0.81), 'd': pytest.approx(0.9),
                        'gold_reward': pytest.approx(runs[1].gold_PxI[2].mean()),
                        'proxy_reward': pytest.approx(1.9)}


def written(figure, path) -> bool:
  """Whether a plot returned its figure (TensorBoard logs it) and wrote it to `path` as PNG."""
  with open(path, 'rb') as f:
    return isinstance(figure, Figure) and bool(figure.axes) and f.read(8) == PNG_MAGIC


def test_plots_write_png_files(tmp_path):
  runs = _runs(COEFFICIENTS, noise=0.1)
  summary = summarize(runs, num_resamples=20)
  for method in ('bon', 'rl'):
    path = tmp_path / f'{method}.png'
    assert written(plot_curves(summary, runs, str(path), method=method), path)
  path = tmp_path / 'coefficients.png'
  assert written(plot_coefficients(summary['fits'], str(path), by='proxy_comparisons'), path)
  path = tmp_path / 'gold_vs_proxy.png'
  assert written(plot_gold_against_proxy(summary, str(path)), path)
  records, _ = _synthetic_records()
  path = tmp_path / 'no_intervals.png'
  assert written(plot_coefficients(fit_all(records), str(path)), path)
  with pytest.raises(ValueError, match="'reward_params'"):
    plot_coefficients(summary['fits'], str(tmp_path / 'x.png'), by='reward_params')
  with pytest.raises(ValueError, match="no 'rl' fits"):
    plot_curves({**summary, 'fits': summary['fits'][:2]}, runs, str(tmp_path / 'x.png'),
                method='rl')
