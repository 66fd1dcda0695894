"""KTO: unpaired desirable / undesirable examples, (loss, metrics) out.

Kahneman-Tversky optimisation (Ethayarajh et al. 2024, eq. 7–8). For example (x, y) with
policy and reference log-probs π, ρ (sums over the response's tokens):

  r(x, y) = π − ρ                                 the implied reward, divided by β
  z₀ = max(0, mean_j [π(y'_j | x_j) − ρ(y'_j | x_j)])
                                                  the reference point: a batch estimate of
                                                  KL(π ‖ π_ref) from mismatched pairs (x_j, y'_j),
                                                  y'_j another example's response; no gradient
  v = λ_D σ(β(r − z₀))   desirable y
      λ_U σ(β(z₀ − r))   undesirable y
  loss = mean over the batch of λ_y − v = λ_y (1 − σ(±β(r − z₀)))

`apo_zero_unpaired` (D'Oosterlinck et al. 2024, APO-zero's unpaired form, as in TRL) drops z₀:
1 − σ(βr) for desirable and σ(βr) for undesirable examples.
"""

import jax
import jax.numpy as jnp

from rlhf_jax.errors import InputError

LOSS_TYPES = ('kto', 'apo_zero_unpaired')


def kto_loss(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps, desirable, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = 'kto'):
  """The mean KTO loss of the module doc over a batch of B examples.

  policy_logps, ref_logps: [B] log-prob sums of each example's response; policy_kl_logps,
  ref_kl_logps: [B] the same of the mismatched pairs that estimate z₀ (ignored by
  apo_zero_unpaired, may be None); desirable: [B] bool (or 0/1) labels.

  Metrics, named as in TRL: 'kl' (z₀), 'rewards/chosen' and 'rewards/rejected' (mean βr over
  the desirable / undesirable examples, 0 when the batch has none), 'rewards/margins' their
  difference, 'logps/chosen' and 'logps/rejected' likewise of π, and 'desirable_fraction'.
  """
  if loss_type not in LOSS_TYPES:
    raise InputError(f'config.loss.loss_type={loss_type!r}; choose from {LOSS_TYPES}.')
  if beta <= 0 or min(desirable_weight, undesirable_weight) < 0:
    raise InputError(f'KTO needs beta > 0 and weights >= 0 (beta={beta}, desirable_weight='
                     f'{desirable_weight}, undesirable_weight={undesirable_weight}).')
  policy_B = jnp.asarray(policy_logps, jnp.float32)
  reward_B = policy_B - jnp.asarray(ref_logps, jnp.float32)
  desirable_B = jnp.asarray(desirable).astype(bool)
  z0 = jnp.zeros((), jnp.float32)
  if loss_type == 'kto':
    kl_B = (jnp.asarray(policy_kl_logps, jnp.float32)
            - jnp.asarray(ref_kl_logps, jnp.float32))
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_B), 0.0))
  sign_B = jnp.where(desirable_B, 1.0, -1.0)
  if loss_type == 'kto':
    losses_B = 1 - jax.nn.sigmoid(beta * sign_B * (reward_B - z0))
  else:
    losses_B = jnp.where(desirable_B, 1 - jax.nn.sigmoid(beta * reward_B),
                         jax.nn.sigmoid(beta * reward_B))
  weight_B = jnp.where(desirable_B, desirable_weight, undesirable_weight)
  loss = jnp.mean(weight_B * losses_B)

  def mean_where(x_B, mask_B):
    return jnp.sum(jnp.where(mask_B, x_B, 0.0)) / jnp.maximum(jnp.sum(mask_B), 1)
  rewards_B = beta * reward_B
  chosen, rejected = mean_where(rewards_B, desirable_B), mean_where(rewards_B, ~desirable_B)
  return loss, {
      'loss': loss, 'kl': z0,
      'rewards/chosen': chosen, 'rewards/rejected': rejected,
      'rewards/margins': chosen - rejected,
      'logps/chosen': mean_where(policy_B, desirable_B),
      'logps/rejected': mean_where(policy_B, ~desirable_B),
      'desirable_fraction': jnp.mean(desirable_B),
  }
