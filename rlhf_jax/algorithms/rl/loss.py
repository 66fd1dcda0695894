"""The loss of online RL's updates, on a minibatch of a scored rollout."""

from rlhf_jax.algorithms.rl.actor_critic import ActorCritic
from rlhf_jax.algorithms.sft import sft_loss_fn
from rlhf_jax.losses import aggregate_tokens, kl_penalty
from rlhf_jax.losses.ppo import ppo_policy_loss, ppo_value_loss


def rl_loss_fn(model: ActorCritic, batch, rng=None, frozen=None, *, temperature: float,
               chunk_size: int, clip_eps: float, value_clip_eps: float, vf_coef: float,
               kl_loss_coef: float, ptx_coef: float = 0.0, clip_eps_high: float | None = None,
               loss_aggregation: str = 'token_mean'):
  """Clipped policy loss (+ vf_coef · clipped value loss with a critic, + β · KL_k3 to the
  reference when the KL is in the loss, as in GRPO) on a minibatch of the rollout. The policy
  loss and the KL term are aggregated over tokens by `loss_aggregation` (`aggregate_tokens`);
  the value loss is a mean over tokens.

  With pretraining rows in batch['ptx'], + γ · their next-token NLL per token (PPO-ptx,
  Ouyang et al. 2022, eq. 2: objective = E_π[r − β log π/π_SFT] + γ E_pretrain[log π(x)];
  γ = ptx_coef). The NLL is reported as 'loss/ptx' even at γ = 0 (what evaluations measure).
  """
  del rng, frozen  # Deterministic; the reference's log-probs come with the batch.
  mask = batch['response_mask']
  prompt_len = batch['tokens'].shape[1] - mask.shape[1]
  logps, values = model.response_logprobs_and_values(
      batch['tokens'], batch['attention_mask'], prompt_len=prompt_len,
      temperature=temperature, chunk_size=chunk_size)
  loss, metrics = ppo_policy_loss(logps, batch['old_logps'], batch['advantages'], mask,
                                  clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                  aggregation=loss_aggregation)
  if values is not None:
    value_loss, value_metrics = ppo_value_loss(values, batch['old_values'], batch['returns'],
                                               mask, clip_eps=value_clip_eps)
    loss += vf_coef * value_loss
    metrics |= value_metrics
  if kl_loss_coef:
    kl = aggregate_tokens(kl_penalty(logps, batch['ref_logps'], estimator='k3'), mask,
                          loss_aggregation)
    loss += kl_loss_coef * kl
    metrics['loss/kl'] = kl
  if 'ptx' in batch:
    nll, _ = sft_loss_fn(model.policy, batch['ptx'], normalize='token', chunk_size=chunk_size)
    loss += ptx_coef * nll
    metrics['loss/ptx'] = nll
  return loss, metrics
