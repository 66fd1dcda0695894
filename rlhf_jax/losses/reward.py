"""Bradley-Terry reward-model loss on (chosen, rejected) pairs, with margin and centering."""

import jax
import jax.numpy as jnp

from rlhf_jax.errors import InputError


def bradley_terry_loss(rewards_chosen_B, rewards_rejected_B, *, margin=None,
                       center_coef: float = 0.0):
  """Pairwise Bradley-Terry loss with an optional margin and reward centering.

  L = mean_b [−log σ(r_c − r_r − m)] + c · mean_b [(r_c + r_r)²]

  The first term is the negative log-likelihood of the labeler's choice under
  P(chosen ≻ rejected) = σ(r_c − r_r) (Stiennon et al. 2020; Ouyang et al. 2022). The margin m
  (None, a scalar or [B]) asks for a larger gap on clearly-preferred pairs (Llama 2, Touvron et
  al. 2023). The BT likelihood is blind to a shift of all rewards; the centering term
  c · (r_c + r_r)² pins their mean near 0 (Eisenstein et al. 2023, "Helping or Herding?").
  Computed in float32 with log σ = jax.nn.log_sigmoid, finite for any |r_c − r_r|.

  Metrics: accuracy counts r_c > r_r as 1 and ties as 0.5 (margin not applied); 'margin' is the
  mean reward gap r_c − r_r; 'reward_mean' is the mean of all 2B rewards.
  """
  if rewards_chosen_B.ndim != 1 or rewards_chosen_B.shape != rewards_rejected_B.shape:
    raise InputError(f'rewards_chosen_B {rewards_chosen_B.shape} and rewards_rejected_B '
                     f'{rewards_rejected_B.shape} must both have shape [B].')
  chosen = rewards_chosen_B.astype(jnp.float32)
  rejected = rewards_rejected_B.astype(jnp.float32)
  gap_B = chosen - rejected
  margin = 0.0 if margin is None else jnp.asarray(margin, jnp.float32)
  if jnp.ndim(margin) not in (0, 1) or jnp.size(margin) not in (1, gap_B.size):
    raise InputError(f'margin has shape {jnp.shape(margin)}; expected a scalar or '
                     f'[{gap_B.size}].')
  loss = (-jnp.mean(jax.nn.log_sigmoid(gap_B - margin))
          + center_coef * jnp.mean(jnp.square(chosen + rejected)))
  return loss, {
      'loss': loss,
      'accuracy': jnp.mean((jnp.sign(gap_B) + 1) / 2),
      'margin': jnp.mean(gap_B),
      'reward_chosen': jnp.mean(chosen),
      'reward_rejected': jnp.mean(rejected),
      'reward_mean': (jnp.mean(chosen) + jnp.mean(rejected)) / 2,
  }
