"""The loss of online RL's updates, on a minibatch of a scored rollout."""

from rlhf_jax.algorithms.rl.actor_critic import ActorCritic
from rlhf_jax.losses import kl_penalty, masked_mean
from rlhf_jax.losses.ppo import ppo_policy_loss, ppo_value_loss


def rl_loss_fn(model: ActorCritic, batch, rng=None, frozen=None, *, temperature: float,
               chunk_size: int, clip_eps: float, value_clip_eps: float, vf_coef: float,
               kl_loss_coef: float):
  """Clipped policy loss (+ vf_coef · clipped value loss with a critic, + β · KL_k3 to the
  reference when the KL is in the loss, as in GRPO) on a minibatch of the rollout."""
  del rng, frozen  # Deterministic; the reference's log-probs come with the batch.
  mask = batch['response_mask']
  prompt_len = batch['tokens'].shape[1] - mask.shape[1]
  logps, values = model.response_logprobs_and_values(
      batch['tokens'], batch['attention_mask'], prompt_len=prompt_len,
      temperature=temperature, chunk_size=chunk_size)
  loss, metrics = ppo_policy_loss(logps, batch['old_logps'], batch['advantages'], mask,
                                  clip_eps=clip_eps)
  if values is not None:
    value_loss, value_metrics = ppo_value_loss(values, batch['old_values'], batch['returns'],
                                               mask, clip_eps=value_clip_eps)
    loss += vf_coef * value_loss
    metrics |= value_metrics
  if kl_loss_coef:
    kl = masked_mean(kl_penalty(logps, batch['ref_logps'], estimator='k3'), mask)
    loss += kl_loss_coef * kl
    metrics['loss/kl'] = kl
  return loss, metrics
