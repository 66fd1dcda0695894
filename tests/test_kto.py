"""The KTO loss against hand arithmetic, a NumPy transcription of the paper, TRL's KTOTrainer
on the same log-probs, and its gradient (none through the reference point z₀)."""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.errors import InputError
from rlhf_jax.losses import kto_loss

# Four examples, β = 0.5: π = [−4, −6, −8, −5], ρ = [−5, −6, −7, −6]  →  r = [1, 0, −1, 1];
# labels [D, D, U, U]. Mismatched pairs: π' − ρ' = [1, 0, 1, −1]  →  z₀ = 0.25.
TINY = dict(policy_logps=jnp.array([-4.0, -6.0, -8.0, -5.0]),
            ref_logps=jnp.array([-5.0, -6.0, -7.0, -6.0]),
            policy_kl_logps=jnp.array([-10.0, -9.0, -7.0, -8.0]),
            ref_kl_logps=jnp.array([-11.0, -9.0, -8.0, -7.0]),
            desirable=jnp.array([True, True, False, False]))


def sigmoid(x):
  return 1 / (1 + math.exp(-x))


def test_kto_by_hand():
  loss, metrics = kto_loss(**TINY, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
  # Desirable: 1 − σ(β(r − z₀)); undesirable: λ_U (1 − σ(β(z₀ − r))).
  want = (1 - sigmoid(0.5 * 0.75) + 1 - sigmoid(0.5 * -0.25)
          + 2 * (1 - sigmoid(0.5 * 1.25)) + 2 * (1 - sigmoid(0.5 * -0.75))) / 4
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert float(metrics['kl']) == pytest.approx(0.25)
  assert float(metrics['rewards/chosen']) == pytest.approx(0.25)  # β · mean(1, 0).
  assert float(metrics['rewards/rejected']) == pytest.approx(0.0)  # β · mean(−1, 1).
  assert float(metrics['logps/chosen']) == pytest.approx(-5.0)
  assert float(metrics['desirable_fraction']) == 0.5


def test_the_reference_point_is_never_negative_and_apo_zero_ignores_it():
  below = dict(TINY, policy_kl_logps=TINY['ref_kl_logps'] - 3.0)  # KL estimate −3 → z₀ = 0.
  loss, metrics = kto_loss(**below, beta=0.5)
  assert float(metrics['kl']) == 0.0
  r = [1, 0, -1, 1]
  want = (1 - sigmoid(0.5) + 1 - sigmoid(0.0) + 1 - sigmoid(0.5) + 1 - sigmoid(-0.5)) / 4
  assert float(loss) == pytest.approx(want, rel=1e-6)
  apo, _ = kto_loss(**dict(TINY, policy_kl_logps=None, ref_kl_logps=None), beta=0.5,
                    loss_type='apo_zero_unpaired')
  want = (1 - sigmoid(0.5 * r[0]) + 1 - sigmoid(0.5 * r[1]) + sigmoid(0.5 * r[2])
          + sigmoid(0.5 * r[3])) / 4
  assert float(apo) == pytest.approx(want, rel=1e-6)


def numpy_kto(policy, ref, policy_kl, ref_kl, desirable, beta, w_d, w_u):
  """Ethayarajh et al. 2024, eq. 8: L = E[λ_y − v(x, y)], v = λ_D σ(β(r − z₀)) or
  λ_U σ(β(z₀ − r)), z₀ = max(0, KL estimate)."""
  r = policy - ref
  z0 = max(0.0, float(np.mean(policy_kl - ref_kl)))
  lam = np.where(desirable, w_d, w_u)
  v = np.where(desirable, w_d / (1 + np.exp(-beta * (r - z0))),
               w_u / (1 + np.exp(-beta * (z0 - r))))
  return float(np.mean(lam - v))


def random_batch(seed, n=16):
  rng = np.random.default_rng(seed)
  logps = lambda: -rng.uniform(2, 30, n)
  policy, policy_kl = logps(), logps()
  return dict(policy_logps=policy, ref_logps=policy + rng.normal(0, 2, n),
              policy_kl_logps=policy_kl, ref_kl_logps=policy_kl - rng.normal(0.5, 1, n),
              desirable=rng.random(n) < 0.6)


@pytest.mark.parametrize('seed, beta, w_d, w_u', [(0, 0.1, 1.0, 1.0), (1, 0.5, 1.0, 1.33),
                                                   (2, 2.0, 0.7, 1.0)])
def test_kto_equals_a_numpy_transcription_of_the_paper(seed, beta, w_d, w_u):
  batch = random_batch(seed)
  loss, _ = kto_loss(**batch, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
  assert float(loss) == pytest.approx(numpy_kto(*batch.values(), beta, w_d, w_u), rel=1e-5)


def trl_kto_loss(batch, *, beta, desirable_weight, undesirable_weight, loss_type):
  """TRL's KTOTrainer._compute_loss (trl 1.16) run on these log-probs: a stand-in model
  returns per-token log-probs whose sums are the given ones (the last position carries each
  sum), and the reference's come precomputed, as TRL's `precompute_ref_log_probs` gives them."""
  import torch  # pylint: disable=import-outside-toplevel  (trl's import takes seconds)
  from trl.trainer.kto_trainer import KTOTrainer  # pylint: disable=import-outside-toplevel
  n, t = len(batch['policy_logps']), 3
  sums = {'matched': torch.tensor(batch['policy_logps']),
          'mismatched': torch.tensor(batch['policy_kl_logps'])}

  def model(input_ids, **unused):
    del unused
    which = 'mismatched' if input_ids[0, 0] == 1 else 'matched'
    log_probs = torch.zeros(n, t - 1, dtype=torch.float64)
    log_probs[:, -1] = sums[which]
    zeros = torch.zeros(n, t - 1, dtype=torch.float64)
    return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)
  model.training = True
  ids = lambda first: torch.full((n, t), first, dtype=torch.long)
  ones = torch.ones(n, t, dtype=torch.long)
  inputs = {'input_ids': ids(0), 'attention_mask': ones, 'completion_mask': ones,
            'KL_input_ids': ids(1), 'KL_attention_mask': ones, 'KL_completion_mask': ones,
            'label': torch.tensor(batch['desirable']),
            'ref_logps': torch.tensor(batch['ref_logps']),
            'ref_KL_logps': torch.tensor(batch['ref_kl_logps'])}
  trainer = types.SimpleNamespace(
      model=model, beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
      undesirable_weight=undesirable_weight, calculate_KL=loss_type == 'kto',
      precompute_ref_logps=True, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      accelerator=types.SimpleNamespace(device='cpu', gather_for_metrics=lambda x: x))
  trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
  loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
  return float(loss), {k: v[-1] for k, v in trainer._metrics['train'].items()}


@pytest.mark.parametrize('seed, beta, w_d, w_u, loss_type', [
    (0, 0.1, 1.0, 1.0, 'kto'), (1, 0.5, 1.0, 1.33, 'kto'), (2, 2.0, 0.7, 1.0, 'kto'),
    (3, 0.3, 1.0, 1.0, 'apo_zero_unpaired')])
def test_kto_equals_trls_kto_trainer_on_the_same_log_probs(seed, beta, w_d, w_u, loss_type):
  batch = random_batch(seed)
  if seed == 2:  # A batch whose KL estimate is negative: z₀ clamps to 0 in both.
    batch['ref_kl_logps'] = batch['policy_kl_logps'] + 1.0
  options = dict(beta=beta, desirable_weight=w_d, undesirable_weight=w_u, loss_type=loss_type)
  want, trl_metrics = trl_kto_loss(batch, **options)
  loss, metrics = kto_loss(**batch, **options)
  assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-7)
  for key in ('kl', 'rewards/chosen', 'rewards/rejected', 'rewards/margins', 'logps/chosen',
              'logps/rejected'):
    assert float(metrics[key]) == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_no_gradient_flows_through_the_reference_point():
  """d loss / d π(y'|x) = 0: z₀ is a constant of the step, as in the paper and TRL."""
  grads = jax.grad(lambda p, p_kl: kto_loss(
      **dict(TINY, policy_logps=p, policy_kl_logps=p_kl), beta=0.5)[0], argnums=(0, 1))(
          TINY['policy_logps'], TINY['policy_kl_logps'])
  assert not np.any(np.asarray(grads[1]))
  # d/dr of λ(1 − σ(±β(r − z₀))) = ∓λβ σ'(·) / B: desirable pushed up, undesirable down.
  g = np.asarray(grads[0])
  assert (g[:2] < 0).all() and (g[2:] > 0).all()
  s = sigmoid(0.5 * 0.75)
  assert g[0] == pytest.approx(-0.5 * s * (1 - s) / 4, rel=1e-5)


def test_bad_options_name_their_config_key():
  with pytest.raises(InputError, match="config.loss.loss_type='ipo'"):
    kto_loss(**TINY, beta=0.5, loss_type='ipo')
  with pytest.raises(InputError, match='beta > 0'):
    kto_loss(**TINY, beta=0.0)
