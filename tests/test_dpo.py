"""The DPO loss family, against hand arithmetic, NumPy transcriptions of each paper and limits."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import dpo_loss
from rlhf_jax.losses.dpo import LOSS_TYPES

VARIANT_ARGS = {'rdpo': {'alpha': 0.1}, 'simpo': {'gamma': 0.25}}

# The tiny example: two pairs, β = 0.5.
#   π_c = [−4, −6], π_r = [−8, −5], ρ_c = [−5, −6], ρ_r = [−7, −6], |y_c| = [2, 3], |y_r| = [4, 1].
#   Log-ratios: chosen [1, 0], rejected [−1, 1]  →  h = [2, −1], βh = [1, −0.5].
#   Per token: chosen [1/2, 0/3], rejected [−1/4, 1/1]  →  h̄ = [0.75, −1].
TINY = dict(policy_chosen_logps=jnp.array([-4.0, -6.0]),
            policy_rejected_logps=jnp.array([-8.0, -5.0]),
            ref_chosen_logps=jnp.array([-5.0, -6.0]),
            ref_rejected_logps=jnp.array([-7.0, -6.0]),
            chosen_lengths=jnp.array([2, 3]), rejected_lengths=jnp.array([4, 1]))


def nll(x):
  """ℓ(x) = −log σ(x) = log(1 + e^−x)."""
  return math.log1p(math.exp(-x))


def log_odds(a):
  """log(p / (1 − p)) for p = e^a."""
  return a - math.log(1 - math.exp(a))


HAND_LOSSES = {
    # Per pair ℓ(βh): ℓ(1), ℓ(−0.5).
    ('sigmoid', 0.0): (nll(1.0) + nll(-0.5)) / 2,
    # cDPO, ε = 0.2: 0.8 ℓ(βh) + 0.2 ℓ(−βh).
    ('sigmoid', 0.2): (0.8 * nll(1.0) + 0.2 * nll(-1.0) + 0.8 * nll(-0.5) + 0.2 * nll(0.5)) / 2,
    # Robust, ε = 0.2: (0.8 ℓ(βh) − 0.2 ℓ(−βh)) / (1 − 0.4).
    ('robust', 0.2): ((0.8 * nll(1.0) - 0.2 * nll(-1.0)) / 0.6
                      + (0.8 * nll(-0.5) - 0.2 * nll(0.5)) / 0.6) / 2,
    # 1/(2β) = 1: ((0.75 − 1)² + (−1 − 1)²) / 2 = (0.0625 + 4) / 2.
    ('ipo', 0.0): 2.03125,
    # max(0, 1 − 1) = 0, max(0, 1 + 0.5) = 1.5.
    ('hinge', 0.0): 0.75,
    # βh̄ = [0.375, −0.5].
    ('length_normalized', 0.0): (nll(0.375) + nll(-0.5)) / 2,
    # α = 0.1: z = [1 + 0.1 (2 − 4), −0.5 + 0.1 (3 − 1)] = [0.8, −0.3].
    ('rdpo', 0.0): (nll(0.8) + nll(-0.3)) / 2,
    # π/|y|: chosen [−2, −2], rejected [−2, −5]; γ = 0.25: z = 0.5 [0, 3] − 0.25 = [−0.25, 1.25].
    ('simpo', 0.0): (nll(-0.25) + nll(1.25)) / 2,
    # Same per-token log-probs; NLL = mean(2, 2) = 2; log-odds ratios [0, lo(−2) − lo(−5)].
    ('orpo', 0.0): 2 + 0.5 * (nll(0.0) + nll(log_odds(-2.0) - log_odds(-5.0))) / 2,
}


@pytest.mark.parametrize('loss_type, label_smoothing', HAND_LOSSES)
def test_each_loss_type_hand_computed(loss_type, label_smoothing):
  loss, metrics = dpo_loss(**TINY, beta=0.5, loss_type=loss_type,
                           label_smoothing=label_smoothing, **VARIANT_ARGS.get(loss_type, {}))
  assert loss == pytest.approx(HAND_LOSSES[loss_type, label_smoothing], rel=1e-6)
  assert metrics['loss'] == loss


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def paper_loss(loss_type, pc, pr, rc, rr, lc, lr, *, beta, eps, alpha=None, gamma=None):
  """Each paper's per-pair loss, transcribed afresh in float64 NumPy, averaged over pairs."""
  u = beta * ((pc - rc) - (pr - rr))
  per_token_h = (pc - rc) / lc - (pr - rr) / lr
  if loss_type == 'sigmoid':  # Rafailov et al. 2023, Eq. 7; cDPO (Mitchell 2023) for ε > 0.
    per_pair = -(1 - eps) * np_log_sigmoid(u) - eps * np_log_sigmoid(-u)
  elif loss_type == 'robust':  # Chowdhury et al. 2024, the de-biased loss.
    per_pair = (-(1 - eps) * np_log_sigmoid(u) + eps * np_log_sigmoid(-u)) / (1 - 2 * eps)
  elif loss_type == 'ipo':  # Azar et al. 2023, Eq. 17, on per-token averaged log-ratios.
    per_pair = (per_token_h - 1 / (2 * beta)) ** 2
  elif loss_type == 'hinge':  # SLiC, Zhao et al. 2023.
    per_pair = np.maximum(0.0, 1 - u)
  elif loss_type == 'length_normalized':  # LN-DPO, Ahrabian et al. 2024.
    v = beta * per_token_h
    per_pair = -(1 - eps) * np_log_sigmoid(v) - eps * np_log_sigmoid(-v)
  elif loss_type == 'rdpo':  # Park et al. 2024: the length term inside the log-sigmoid.
    v = u + (alpha * lc - alpha * lr)
    per_pair = -(1 - eps) * np_log_sigmoid(v) - eps * np_log_sigmoid(-v)
  elif loss_type == 'simpo':  # Meng et al. 2024, Eq. 6.
    v = beta / lc * pc - beta / lr * pr - gamma
    per_pair = -(1 - eps) * np_log_sigmoid(v) - eps * np_log_sigmoid(-v)
  elif loss_type == 'orpo':  # Hong et al. 2024: L_SFT + λ L_OR, odds = p / (1 − p).
    p_c, p_r = np.exp(pc / lc), np.exp(pr / lr)
    odds_ratio = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
    per_pair = -pc / lc - beta * np.log(1 / (1 + 1 / odds_ratio))
  return per_pair.mean()


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_each_loss_type_matches_numpy_transcription(loss_type):
  rng = np.random.default_rng(0)
  lc, lr = (rng.integers(1, 40, size=16).astype(np.float64) for _ in range(2))
  # Float32-representable inputs, so only the arithmetic differs between JAX and NumPy.
  f32 = lambda x: x.astype(np.float32).astype(np.float64)
  pc, pr = f32(-lc * rng.uniform(0.1, 3, 16)), f32(-lr * rng.uniform(0.1, 3, 16))
  rc, rr = f32(pc + rng.normal(0, 3, 16)), f32(pr + rng.normal(0, 3, 16))
  eps = 0.1 if loss_type in ('sigmoid', 'robust', 'length_normalized', 'rdpo', 'simpo') else 0.0
  variant = VARIANT_ARGS.get(loss_type, {})
  loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=eps,
                     chosen_lengths=lc, rejected_lengths=lr, **variant)
  expected = paper_loss(loss_type, pc, pr, rc, rr, lc, lr, beta=0.3, eps=eps, **variant)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def sigmoid_loss(**kwargs):
  return float(dpo_loss(**{**TINY, **kwargs}, beta=0.5)[0])


def test_sigmoid_at_zero_log_ratios_is_log_2():
  logps = jnp.array([-3.0, -11.0, -0.5])
  loss, metrics = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
  assert loss == pytest.approx(math.log(2), rel=1e-6)
  assert metrics['rewards/accuracies'] == 0.0  # All rewards tie at 0; ties count 0.


def test_limits_that_reduce_to_plain_sigmoid():
  plain = (nll(1.0) + nll(-0.5)) / 2  # −log σ(βh) of the tiny example.
  assert sigmoid_loss(label_smoothing=0.0) == pytest.approx(plain, rel=1e-6)
  assert sigmoid_loss(loss_type='robust', label_smoothing=0.0) == pytest.approx(plain, rel=1e-6)
  assert sigmoid_loss(loss_type='rdpo', alpha=0.0) == pytest.approx(plain, rel=1e-6)
  ones = jnp.ones(2, jnp.int32)
  assert sigmoid_loss(loss_type='length_normalized', chosen_lengths=ones,
                      rejected_lengths=ones) == pytest.approx(plain, rel=1e-6)


def test_robust_loss_is_unbiased_under_label_flips():
  # Chowdhury et al.: E over a flip with probability ε of the robust loss = the clean loss.
  eps, flipped = 0.3, dict(policy_chosen_logps=TINY['policy_rejected_logps'],
                           policy_rejected_logps=TINY['policy_chosen_logps'],
                           ref_chosen_logps=TINY['ref_rejected_logps'],
                           ref_rejected_logps=TINY['ref_chosen_logps'])
  expected = ((1 - eps) * sigmoid_loss(loss_type='robust', label_smoothing=eps)
              + eps * sigmoid_loss(**flipped, loss_type='robust', label_smoothing=eps))
  assert expected == pytest.approx(sigmoid_loss(), rel=1e-5)


def test_ipo_is_zero_at_its_target_margin():
  # β = 0.25: target 1/(2β) = 2. Per-token log-ratios 6/3 − 0/2 = 2 and 1/1 − (−4)/4 = 2.
  loss, _ = dpo_loss(jnp.array([0.0, -1.0]), jnp.array([-2.0, -8.0]),
                     jnp.array([-6.0, -2.0]), jnp.array([-2.0, -4.0]), beta=0.25,
                     loss_type='ipo', chosen_lengths=jnp.array([3, 1]),
                     rejected_lengths=jnp.array([2, 4]))
  assert loss == 0.0


def test_hinge_is_flat_beyond_its_margin():
  # β = 0.5, h = [2, 3, 1]: βh = [1, 1.5, 0.5]; only the last pair is inside the margin.
  zeros = jnp.zeros(3)
  loss_fn = lambda chosen: dpo_loss(chosen, zeros, zeros, zeros, beta=0.5, loss_type='hinge')[0]
  loss, grad = jax.value_and_grad(loss_fn)(jnp.array([2.0, 3.0, 1.0]))
  assert loss == pytest.approx(0.5 / 3)
  np.testing.assert_allclose(grad, [0.0, 0.0, -0.5 / 3])  # d(1 − βh)/dπ_c / B = −β/B.
  loss, grad = jax.value_and_grad(loss_fn)(jnp.array([2.0, 3.0, 4.0]))
  assert loss == 0.0
  np.testing.assert_array_equal(grad, np.zeros(3))


@pytest.mark.parametrize('eps', [0.0, 0.2])
def test_sigmoid_gradient_matches_hand_derivation(eps):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  pc, pr, rc, rr = (-10 * jax.random.uniform(k, (5,)) for k in (k1, k2, k3, k4))
  beta, batch = 0.1, 5
  loss_fn = lambda pc, pr: dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0]
  grad_chosen, grad_rejected = jax.grad(loss_fn, argnums=(0, 1))(pc, pr)
  pc, pr, rc, rr = map(np.asarray, (pc, pr, rc, rr))
  u = beta * ((pc - rc) - (pr - rr))
  sig = lambda x: 1 / (1 + np.exp(-x))
  # d/dπ_c [−(1−ε) log σ(u) − ε log σ(−u)] / B = −β [(1−ε) σ(−u) − ε σ(u)] / B.
  pull = beta * ((1 - eps) * sig(-u) - eps * sig(u)) / batch
  np.testing.assert_allclose(grad_chosen, -pull, rtol=1e-5)
  np.testing.assert_allclose(grad_rejected, pull, rtol=1e-5)


def test_metrics_hand_computed():
  _, metrics = dpo_loss(**TINY, beta=0.5)
  # Rewards β(π − ρ): chosen 0.5 [1, 0], rejected 0.5 [−1, 1]; only the first pair is right.
  assert metrics['rewards/chosen'] == 0.25
  assert metrics['rewards/rejected'] == 0.0
  assert metrics['rewards/margins'] == 0.25  # mean(1, −0.5)
  assert metrics['rewards/accuracies'] == 0.5
  assert metrics['logps/chosen'] == -5.0
  assert metrics['logps/rejected'] == -6.5
  # IPO's rewards are per token: chosen 0.5 [0.5, 0], rejected 0.5 [−0.25, 1].
  _, metrics = dpo_loss(**TINY, beta=0.5, loss_type='ipo')
  assert metrics['rewards/chosen'] == 0.125
  assert metrics['rewards/rejected'] == 0.1875
  assert metrics['rewards/accuracies'] == 0.5
  # SimPO's are reference-free: chosen 0.5 [−2, −2], rejected 0.5 [−2, −5]; the tie counts 0.
  _, metrics = dpo_loss(**TINY, beta=0.5, loss_type='simpo', gamma=0.25)
  assert metrics['rewards/chosen'] == -1.0
  assert metrics['rewards/rejected'] == -1.75
  assert metrics['rewards/margins'] == 0.75
  assert metrics['rewards/accuracies'] == 0.5
  assert metrics['logps/chosen'] == -5.0
  # ORPO adds its SFT term (mean of 2, 2) and the mean log-odds ratio.
  _, metrics = dpo_loss(**TINY, beta=0.5, loss_type='orpo')
  assert metrics['nll_loss'] == 2.0
  expected = (log_odds(-2.0) - log_odds(-5.0)) / 2
  assert metrics['log_odds_ratio'] == pytest.approx(expected, rel=1e-6)


def test_reference_free_losses_ignore_the_reference():
  for loss_type in ('simpo', 'orpo'):
    with_ref, _ = dpo_loss(**TINY, beta=0.5, loss_type=loss_type,
                           **VARIANT_ARGS.get(loss_type, {}))
    without_ref, _ = dpo_loss(**{**TINY, 'ref_chosen_logps': None, 'ref_rejected_logps': None},
                              beta=0.5, loss_type=loss_type, **VARIANT_ARGS.get(loss_type, {}))
    assert with_ref == without_ref


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_jit_matches_eager(loss_type):
  loss_fn = functools.partial(dpo_loss, beta=0.1, loss_type=loss_type,
                              **VARIANT_ARGS.get(loss_type, {}))
  args = list(TINY.values())[:4]
  lengths = dict(chosen_lengths=TINY['chosen_lengths'], rejected_lengths=TINY['rejected_lengths'])
  if loss_type in ('simpo', 'orpo'):
    args[2:] = None, None
  jitted = jax.jit(loss_fn)(*args, **lengths)
  eager = loss_fn(*args, **lengths)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jitted, eager)


def test_errors_name_the_argument():
  no_lengths = {k: v for k, v in TINY.items() if not k.endswith('lengths')}
  with pytest.raises(ValueError, match='chosen_lengths is None'):
    dpo_loss(**no_lengths, beta=0.1, loss_type='ipo')
  with pytest.raises(ValueError, match='rejected_lengths is None'):
    dpo_loss(**no_lengths, chosen_lengths=TINY['chosen_lengths'], beta=0.1, loss_type='simpo',
             gamma=0.5)
  with pytest.raises(ValueError, match="loss_type='kto'"):
    dpo_loss(**TINY, beta=0.1, loss_type='kto')
  with pytest.raises(ValueError, match='ref_rejected_logps has shape'):
    dpo_loss(**{**TINY, 'ref_rejected_logps': jnp.zeros(3)}, beta=0.1)
  with pytest.raises(ValueError, match='policy_chosen_logps has shape'):
    dpo_loss(*(jnp.zeros((2, 1)),) * 4, beta=0.1)
  with pytest.raises(ValueError, match='chosen_lengths has shape'):
    dpo_loss(**{**TINY, 'chosen_lengths': jnp.ones((2, 1))}, beta=0.1, loss_type='ipo')
  with pytest.raises(ValueError, match='ref_chosen_logps is None'):
    dpo_loss(**{**TINY, 'ref_chosen_logps': None}, beta=0.1)
  with pytest.raises(ValueError, match=r"unknown: \['gamma'\], missing: \['alpha'\]"):
    dpo_loss(**TINY, beta=0.1, loss_type='rdpo', gamma=1.0)
  with pytest.raises(ValueError, match=r"unknown: \['alpha'\]"):
    dpo_loss(**TINY, beta=0.1, alpha=1.0)
  with pytest.raises(ValueError, match='label_smoothing=0.5'):
    dpo_loss(**TINY, beta=0.1, loss_type='robust', label_smoothing=0.5)
  with pytest.raises(ValueError, match='label_smoothing=0.1'):
    dpo_loss(**TINY, beta=0.1, loss_type='hinge', label_smoothing=0.1)
