"""A rollout of online RL, from sampled responses to the arrays that the update reads.

Sampled responses are scored in one jitted pass (Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO"):
  1. the policy's log-probs of its own tokens, recomputed with the training forward pass at the
     sampling temperature, and the critic's values (PPO);
  2. the reference's log-probs, and per-token KL estimates KL_t;
  3. the reward model's score of the whole sequence, read at its last real token, normalised as
     s = (r − shift) / scale, plus the Python reward functions' weighted sum (computed on the
     host from the decoded text, `rlhf_jax.rewards.functions`; or they alone, without a reward
     model), minus `missing_eos_penalty` for responses that never emit EOS; with an ensemble of
     M reward models, each member is normalised by its own shift and scale and s is their
     aggregate (`rlhf_jax.rewards.ensemble.aggregate`) before the functions and the penalty;
  4. advantages, by one of three estimators:
       gae   r_t = −β KL_t + s·1[t = last]; GAE(γ, λ) against the critic; returns = A + V
       grpo  A = (R − mean_group R) / std_group R        (Shao et al. 2024)
       rloo  A = R − mean of the group's other R         (Ahmadian et al. 2024)
     with R = s − β Σ_t KL_t the sequence reward, and a group the G samples of one prompt.
"""

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.algorithms.rl.actor_critic import ActorCritic
from rlhf_jax.errors import InputError
from rlhf_jax.losses import masked_mean, masked_sum
from rlhf_jax.losses.ppo import (gae, group_advantages, kl_penalty, leave_one_out_advantages,
                                 token_rewards, whiten)
from rlhf_jax.models import lora
from rlhf_jax.models.scoring import sequence_rewards
from rlhf_jax.rewards.ensemble import aggregate

ESTIMATORS = ('gae', 'grpo', 'rloo')


def advantages_and_returns(scores_B, kl_BxN, values_BxN, mask_BxN, *, estimator: str, kl_coef,
                           group_size: int, gamma: float, lam: float, whiten_rewards: bool,
                           whiten_advantages: bool, normalize_group_std: bool = True):
  """(advantages [B, N], returns [B, N] or None) of one rollout; see the module docstring.

  Rows of one group are consecutive (prompt i owns rows i·G … i·G + G − 1). Sequence-level
  advantages go to every response token of their row. `normalize_group_std=False`: GRPO's
  advantages keep the group's mean baseline only (Dr. GRPO).
  """
  mask = mask_BxN.astype(bool)
  returns = None
  if estimator == 'gae':
    rewards = token_rewards(scores_B, kl_BxN, mask, kl_coef=kl_coef)
    if whiten_rewards:
      rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values_BxN, mask, gamma=gamma, lam=lam)
  elif estimator in ('grpo', 'rloo'):
    rewards_B = scores_B - kl_coef * masked_sum(kl_BxN, mask, axis=-1)
    grouped = rewards_B.reshape(-1, group_size)
    baselined = (group_advantages(grouped, normalize_std=normalize_group_std)
                 if estimator == 'grpo' else leave_one_out_advantages(grouped))
    advantages = jnp.where(mask, baselined.reshape(-1, 1), 0.0)
  else:
    raise InputError(f'Advantage estimator {estimator!r}; choose one of {ESTIMATORS}.')
  if whiten_advantages:
    advantages = whiten(advantages, mask)
  return advantages, returns


def sequences(batch):
  """(tokens [B, P + N], attention mask) of prompt + response rows."""
  tokens = jnp.concatenate([batch['prompt_tokens'], batch['response_tokens']], axis=1)
  attention_mask = jnp.concatenate([batch['prompt_mask'].astype(bool),
                                    batch['response_mask'].astype(bool)], axis=1)
  return tokens, attention_mask


def reward_model_scores(graphdef, params, batch):
  """The reward model's raw scores [B] of prompt + response rows."""
  return sequence_rewards(nnx.merge(graphdef, params), *sequences(batch))


def score_rollout(trained, reference, reward_model, batch, controls, *, options: dict):
  """The update's batch and the rollout's metrics, from sampled responses.

  trained: the ActorCritic being trained; reference: an ActorCritic with the frozen initial
  policy and no critic; reward_model: a scalar-head Transformer, or a sequence of M of them (an
  ensemble; empty: the reward functions alone).
  batch: prompt_tokens / prompt_mask [B, P] (left-padded), response_tokens / response_mask
  [B, N], and function_scores [B] with reward functions (their weighted sum). controls: kl_coef,
  score_shift, score_scale (scalars that change between rollouts;
  shift and scale may be [M], one per ensemble member).
  options: temperature, chunk_size, kl_estimator, eos_id, missing_eos_penalty, the keyword
  options of `advantages_and_returns`, and for an ensemble aggregation ('mean' if absent) and
  uncertainty_weight.
  """
  options = dict(options)
  temperature, chunk_size = options.pop('temperature'), options.pop('chunk_size')
  kl_estimator, eos_id = options.pop('kl_estimator'), options.pop('eos_id')
  missing_eos_penalty = options.pop('missing_eos_penalty')
  aggregation = options.pop('aggregation', 'mean')
  uncertainty_weight = options.pop('uncertainty_weight', 0.0)
  reward_models = reward_model if isinstance(reward_model, Sequence) else [reward_model]
  prompt_len = batch['prompt_tokens'].shape[1]
  mask = batch['response_mask'].astype(bool)
  tokens, attention_mask = sequences(batch)
  forward = dict(prompt_len=prompt_len, temperature=temperature, chunk_size=chunk_size)

  logps, values = trained.response_logprobs_and_values(tokens, attention_mask, **forward)
  ref_logps, _ = reference.response_logprobs_and_values(tokens, attention_mask, **forward)
  ended = jnp.any(mask & (batch['response_tokens'] == eos_id), axis=-1)
  function_scores = batch.get('function_scores', jnp.zeros(mask.shape[0]))
  scores = function_scores - missing_eos_penalty * (~ended)
  if reward_models:
    raw_MxB = jnp.stack([sequence_rewards(member, tokens, attention_mask)
                         for member in reward_models])
    member_scores_MxB = ((raw_MxB - jnp.reshape(controls['score_shift'], (-1, 1)))
                         / jnp.reshape(controls['score_scale'], (-1, 1)))
    scores += aggregate(member_scores_MxB, aggregation, uncertainty_weight=uncertainty_weight)
  kl = kl_penalty(logps, ref_logps, estimator=kl_estimator)
  advantages, returns = advantages_and_returns(scores, kl, values, mask,
                                               kl_coef=controls['kl_coef'], **options)

  update = {'tokens': tokens, 'attention_mask': attention_mask, 'response_mask': mask,
            'old_logps': logps, 'ref_logps': ref_logps, 'advantages': advantages}
  if values is not None:
    update |= {'old_values': values, 'returns': returns}
  kl_sum_B = masked_sum(kl_penalty(logps, ref_logps, estimator='k1'), mask, axis=-1)
  penalty_B = controls['kl_coef'] * masked_sum(kl, mask, axis=-1)
  metrics = {
      'objective/kl': kl_sum_B.mean(),  # Σ_t log π/π_ref per response: Monte-Carlo KL.
      'objective/entropy': masked_sum(-logps, mask, axis=-1).mean(),  # Monte-Carlo entropy.
      'objective/non_score_reward': -penalty_B.mean(),
      'objective/rlhf_reward': (scores - penalty_B).mean(),
      'response_length': mask.sum(-1).mean(),
      'ended_with_eos': ended.mean(),
  }
  if values is not None:
    metrics['value/mean'] = masked_mean(values, mask)
  # The reward models' own scales; without any, the reward functions'.
  metrics['objective/scores'] = raw_MxB.mean() if reward_models else function_scores.mean()
  if 'function_scores' in batch:
    metrics['objective/function_scores'] = function_scores.mean()
  if len(reward_models) > 1:  # The members' disagreement, in normalised units.
    metrics['objective/ensemble_std'] = member_scores_MxB.std(axis=0).mean()
  return update, metrics


def merge_and_score(graphdefs: dict, params: dict, batch, controls, *, options: dict):
  """`score_rollout` on the parameter states of graphdefs 'trained', 'reference' and 'reward',
  the last a tuple: one graphdef (and parameter state) per reward model of the ensemble.
  Without a 'reference', the trained LoRA policy's base is the reference."""
  trained = nnx.merge(graphdefs['trained'], params['trained'])
  if 'reference' in graphdefs:
    reference = nnx.merge(graphdefs['reference'], params['reference'])
  else:
    reference = ActorCritic(lora.without_adapters(trained.policy), None)
  reward_models = [nnx.merge(graphdef, state)
                   for graphdef, state in zip(graphdefs['reward'], params['reward'], strict=True)]
  return score_rollout(trained, reference, reward_models, batch, controls, options=options)
