"""Bradley-Terry loss and reward-model calibration metrics, against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from rlhf_jax.evals import (bradley_terry_ceiling, expected_calibration_error, preference_metrics,
                           reliability_bins, reliability_diagram)
from rlhf_jax.losses import bradley_terry_loss


def neg_log_sigmoid(x):
  return math.log1p(math.exp(-x))


def test_bt_loss_is_log_2_at_equal_rewards():
  loss, metrics = bradley_terry_loss(jnp.array([0.3, -1.0]), jnp.array([0.3, -1.0]))
  assert loss == pytest.approx(math.log(2), rel=1e-6)
  assert metrics['accuracy'] == 0.5


def test_bt_loss_with_margin_and_centering_hand_computed():
  chosen, rejected = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0])
  loss, metrics = bradley_terry_loss(chosen, rejected, margin=jnp.array([0.5, 2.0]),
                                     center_coef=0.1)
  # Gaps 1 and −1, minus margins: 0.5 and −3; sums 3 and 1.
  expected = (neg_log_sigmoid(0.5) + neg_log_sigmoid(-3.0)) / 2 + 0.1 * (9 + 1) / 2
  assert loss == pytest.approx(expected, rel=1e-6)
  assert metrics['loss'] == loss
  assert metrics['margin'] == 0.0
  assert metrics['reward_chosen'] == 1.0
  assert metrics['reward_rejected'] == 1.0
  assert metrics['reward_mean'] == 1.0
  # A scalar margin is the same as that margin repeated.
  scalar, _ = bradley_terry_loss(chosen, rejected, margin=0.5)
  expected = (neg_log_sigmoid(0.5) + neg_log_sigmoid(-1.5)) / 2
  assert scalar == pytest.approx(expected, rel=1e-6)
  repeated, _ = bradley_terry_loss(chosen, rejected, margin=jnp.array([0.5, 0.5]))
  assert repeated == pytest.approx(float(scalar), rel=1e-6)


def test_bt_loss_gradient_matches_hand_derivation():
  chosen, rejected = jnp.array([0.7, -0.2, 1.5]), jnp.array([0.1, 0.4, -2.0])
  margin, coef, batch = jnp.array([0.0, 0.3, 1.0]), 0.05, 3
  loss_fn = lambda c, r: bradley_terry_loss(c, r, margin=margin, center_coef=coef)[0]
  grad_chosen, grad_rejected = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(chosen, rejected)
  c, r, m = map(np.asarray, (chosen, rejected, margin))
  pull = 1 / (1 + np.exp(c - r - m)) / batch  # σ(−(Δ − m)) / B
  center = 2 * coef * (c + r) / batch
  np.testing.assert_allclose(grad_chosen, -pull + center, rtol=1e-5)
  np.testing.assert_allclose(grad_rejected, pull + center, rtol=1e-5)


def test_bt_loss_is_finite_at_huge_gaps():
  chosen, rejected = jnp.array([1e4, -1e4]), jnp.array([0.0, 0.0])
  loss, grads = jax.value_and_grad(lambda c: bradley_terry_loss(c, rejected)[0])(chosen)
  assert loss == pytest.approx(1e4 / 2, rel=1e-6)  # −log σ(1e4) ≈ 0, −log σ(−1e4) ≈ 1e4.
  np.testing.assert_allclose(grads, [0.0, -0.5])


def test_bt_accuracy_counts_ties_as_half():
  chosen, rejected = jnp.array([1.0, 2.0, 3.0, 0.0]), jnp.array([1.0, 1.0, 4.0, 0.0])
  _, metrics = bradley_terry_loss(chosen, rejected)
  assert metrics['accuracy'] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)


def test_bt_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match='rewards_rejected_B'):
    bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(ValueError, match="margin"):
    bradley_terry_loss(jnp.zeros(3), jnp.zeros(3), margin=jnp.zeros(2))


def test_ece_and_bins_hand_computed():
  probs, labels = np.array([0.1, 0.3, 0.5, 1.0]), np.array([0, 1, 0, 1])
  # Two bins [0, .5) and [.5, 1]: |0.5 − 0.2| · 1/2 + |0.5 − 0.75| · 1/2.
  assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.275)
  # Five bins; 1.0 falls in the last, closed one and [.6, .8) is empty.
  bins = reliability_bins(probs, labels, num_bins=5)
  np.testing.assert_allclose(bins.edges, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
  np.testing.assert_array_equal(bins.count, [1, 1, 1, 0, 1])
  np.testing.assert_allclose(bins.confidence, [0.1, 0.3, 0.5, np.nan, 1.0])
  np.testing.assert_allclose(bins.frequency, [0, 1, 0, np.nan, 1])
  expected = (0.1 + 0.7 + 0.5 + 0.0) / 4
  assert expected_calibration_error(probs, labels, num_bins=5) == pytest.approx(expected)


def test_ece_of_calibrated_and_miscalibrated_data():
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=200_000)
  calibrated = rng.uniform(size=probs.size) < probs
  assert expected_calibration_error(probs, calibrated) < 0.01
  # Coin-flip labels: each bin is off by |centre − 0.5|; mean over 10 bins = 0.25.
  coin_flips = rng.uniform(size=probs.size) < 0.5
  assert expected_calibration_error(probs, coin_flips) == pytest.approx(0.25, abs=0.01)


def test_ece_rejects_bad_inputs():
  with pytest.raises(ValueError, match='probs'):
    expected_calibration_error([0.5, 1.2], [0, 1])
  with pytest.raises(ValueError, match='labels'):
    expected_calibration_error([0.5, 0.2], [0, 2])


def test_reliability_diagram_writes_a_readable_png(tmp_path):
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=500)
  path = tmp_path / 'reliability.png'
  figure = reliability_diagram(probs, rng.uniform(size=500) < probs, path, num_bins=8,
                               title='test')
  assert len(figure.axes) == 2 and figure.axes[0].get_title().startswith('test: ECE = 0.')
  assert path.stat().st_size > 0
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[2] == 4
  assert image.shape[0] > image.shape[1] > 100  # Portrait: diagram above histogram.
  assert image[..., :3].std() > 0  # Something was drawn.


def test_preference_metrics_hand_computed():
  # Gaps 0, log 3, log 9: p = 0.5, 0.75, 0.9.
  metrics = preference_metrics(np.array([1.0, math.log(3), math.log(9)]), np.array([1.0, 0, 0]))
  assert metrics['accuracy'] == pytest.approx((0.5 + 1 + 1) / 3)
  assert metrics['mean_prob'] == pytest.approx((0.5 + 0.75 + 0.9) / 3)
  # Both orientations, one point per bin except .5: (.5, 1), (.75, 1), (.9, 1), (.5, 0),
  # (.25, 0), (.1, 0). The .5 bin is exact; the others are off by .25, .1, .25, .1.
  assert metrics['ece'] == pytest.approx((0.25 + 0.1 + 0.25 + 0.1) / 6)
  assert 'gold_agreement' not in metrics


def test_gold_agreement_hand_computed():
  chosen, rejected = np.array([1.0, -2.0, 0.0, 3.0, 5.0]), np.zeros(5)
  gold = np.array([1, 1, 0, np.nan, -1])
  # Kept: agree, disagree, model tie (0.5); gold ties left out.
  assert preference_metrics(chosen, rejected, gold_labels=gold)['gold_agreement'] == 0.5
  gold = np.array([0, 0, 1, 1, 0])
  assert preference_metrics(chosen, rejected, gold_labels=gold)['gold_agreement'] == 0.5
  assert math.isnan(preference_metrics(chosen, rejected, gold_labels=-np.ones(5))
                    ['gold_agreement'])


def test_bradley_terry_ceiling_hand_values():
  assert bradley_terry_ceiling(np.zeros(4), temperature=1.0) == 0.5
  assert bradley_terry_ceiling(np.array([1e3, -1e3]), temperature=1.0) == 1.0
  # p = σ(±log 3) ∈ {.75, .25}: the better guess is right 3/4 of the time either way.
  assert bradley_terry_ceiling(np.array([2 * math.log(3), -2 * math.log(3)]),
                               temperature=2.0) == pytest.approx(0.75)
  with pytest.raises(ValueError, match='temperature'):
    bradley_terry_ceiling(np.zeros(2), temperature=0.0)


def test_bradley_terry_ceiling_matches_monte_carlo():
  rng = np.random.default_rng(0)
  gold_margins, temperature, draws = rng.normal(size=200), 0.7, 2_000
  probs = 1 / (1 + np.exp(-gold_margins / temperature))
  labels = rng.uniform(size=(draws, probs.size)) < probs  # True: 'chosen' wins.
  # The gold reward itself, as a reward model, picks 'chosen' where its margin is positive.
  accuracy = np.mean(labels == (gold_margins > 0))
  ceiling = bradley_terry_ceiling(gold_margins, temperature=temperature)
  assert accuracy == pytest.approx(ceiling, abs=0.005)
  # A noisier reward model does worse.
  noisy = gold_margins + rng.normal(size=probs.size)
  assert np.mean(labels == (noisy > 0)) < ceiling
