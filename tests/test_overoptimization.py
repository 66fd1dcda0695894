"""Overoptimization fits (Gao et al. 2022): recovery of known α and β, the peaks, R², the curves
built from records, the fits of every (proxy, method), and the figures."""

import math
import random
import warnings

import numpy as np
import pytest
import scipy.special

from rlhf_jax.analysis.overoptimization import (fit, fit_all, fit_bon, fit_rl, measurements_to_curves,
                                            plot_coefficients, plot_curves)

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
  assert list(curves) == ['small', 'large']
  small = curves['small']
  np.testing.assert_allclose(small['kl'], [0.0, 0.19, 0.64])
  np.testing.assert_allclose(small['d'], [0.0, math.sqrt(0.19), 0.8])
  np.testing.assert_allclose(small['gold_reward'], [0.50, 0.75, 0.70])
  np.testing.assert_allclose(small['gain'], [0.0, 0.25, 0.20])
  np.testing.assert_allclose(small['proxy_gain'], [0.0, 0.1, 0.3], atol=1e-12)
  assert small['metadata'] == {'proxy_params': 1e6}  # n differs per point: left out.
  np.testing.assert_allclose(curves['large']['gain'], [0.0, 0.2])
  np.testing.assert_allclose(curves['large']['d'], [0.0, 0.5])
  # An estimated KL a rounding error below 0 still marks the initial policy; d clips it at 0.
  rl = measurements_to_curves([_record('p', 'rl', -1e-9, 1.0, 0.0),
                               _record('p', 'rl', 0.25, 1.5, 1.0)], method='rl')
  np.testing.assert_allclose(rl['p']['d'], [0.0, 0.5])


def test_measurements_to_curves_rejects_curves_without_kl_zero_and_bad_records():
  records = [_record('a', 'bon', 0.0, 0.5, 2.0), _record('b', 'bon', 0.19, 0.6, 2.1),
             _record('b', 'bon', 0.64, 0.7, 2.2)]
  with pytest.raises(ValueError, match="'b'"):
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
    assert 'step' not in f
    assert f['gold_init'] == pytest.approx(0.3)
    assert f['max_d'] == pytest.approx(2.0) and f['num_points'] == 5
    grid = np.array([0.0, 0.4, 0.9, 1.3, 2.0])
    gains = alpha * grid - beta * (grid**2 if f['method'] == 'bon'
                                   else scipy.special.xlogy(grid, grid))
    assert f['best_d'] == pytest.approx(grid[np.argmax(gains)])
    assert f['best_gain'] == pytest.approx(gains.max())


def test_plots_write_png_files(tmp_path):
  records, _ = _synthetic_records()
  fits = fit_all(records)
  for method in ('bon', 'rl'):
    path = plot_curves(records, fits, str(tmp_path / f'{method}.png'), method=method)
    assert open(path, 'rb').read(8) == PNG_MAGIC
  path = plot_coefficients(fits, str(tmp_path / 'coefficients.png'))
  assert open(path, 'rb').read(8) == PNG_MAGIC
  with pytest.raises(ValueError, match="'reward_params'"):
    plot_coefficients(fits, str(tmp_path / 'x.png'), by='reward_params')
  with pytest.raises(ValueError, match="proxy 'large'"):
    without_large = [f for f in fits if f['proxy'] != 'large']
    plot_curves(records, without_large, str(tmp_path / 'x.png'), method='bon')
