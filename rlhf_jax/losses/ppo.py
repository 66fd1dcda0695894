"""PPO for RLHF as pure functions: KL estimates, per-token rewards, GAE, whitening, the clipped
policy and value losses, GRPO / RLOO group advantages and the adaptive KL coefficient.

Every [B, T] array is over the RESPONSE tokens; mask_BxT is 1 on real response tokens (rows may
have different lengths). The recipe follows Huang et al. 2024, "The N+ Implementation Details of
RLHF with PPO": reward r_t = −β KL_t plus the score at the last token, GAE, whitened advantages,
clipped policy and value losses. Entropy is not here: it needs the full [B, T, V] distribution,
which the model side computes.
"""

import jax
import jax.numpy as jnp

from rlhf_jax.errors import InputError
from rlhf_jax.losses.ops import masked_mean

KL_ESTIMATORS = ('k1', 'k2', 'k3')
LOSS_AGGREGATIONS = ('token_mean', 'sequence_mean', 'max_length')


def kl_penalty(logprobs_BxT, ref_logprobs_BxT, *, estimator: str = 'k1'):
  """Per-token estimates of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020,
  "Approximating KL divergence"). With log r = log π_ref − log π:

    k1 = −log r = log π − log π_ref    unbiased, high variance, can be negative
    k2 = ½ (log r)²                    biased (low for nearby π, π_ref), low variance, ≥ 0
    k3 = (r − 1) − log r               unbiased, low variance, ≥ 0
  """
  if estimator not in KL_ESTIMATORS:
    raise InputError(f'estimator={estimator!r}; choose one of {", ".join(KL_ESTIMATORS)}.')
  log_r = ref_logprobs_BxT.astype(jnp.float32) - logprobs_BxT.astype(jnp.float32)
  if estimator == 'k1':
    return -log_r
  if estimator == 'k2':
    return 0.5 * jnp.square(log_r)
  return jnp.expm1(log_r) - log_r


def token_rewards(scores_B, kl_BxT, mask_BxT, *, kl_coef):
  """r_t = −β KL_t on every response token, plus the sequence score at the row's last real
  token (Ziegler et al. 2019; Ouyang et al. 2022). Masked positions get 0; a row without real
  tokens gets no score."""
  _check_bxt(kl_BxT=kl_BxT, mask_BxT=mask_BxT)
  if jnp.shape(scores_B) != kl_BxT.shape[:1]:
    raise InputError(f'scores_B has shape {jnp.shape(scores_B)}; expected {kl_BxT.shape[:1]}.')
  mask = mask_BxT.astype(bool)
  t = mask.shape[1]
  last_B = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  score_BxT = jax.nn.one_hot(last_B, t) * jnp.where(mask.any(1), scores_B, 0.0)[:, None]
  return jnp.where(mask, score_BxT - kl_coef * kl_BxT.astype(jnp.float32), 0.0)


def gae(rewards_BxT, values_BxT, mask_BxT, *, gamma, lam):
  """Generalized advantage estimation (Schulman et al. 2016, Eq. 16), backwards in time:

    δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    returns_t = A_t + V_t,

  with V and A after the last real token 0 (the episode ends there). Masked positions are
  skipped: A = returns = 0 there, and the recursion passes over them to the next real token, so
  right padding, left padding and holes give the compacted row's values.
  """
  _check_bxt(rewards_BxT=rewards_BxT, values_BxT=values_BxT, mask_BxT=mask_BxT)
  mask = mask_BxT.astype(bool)
  rewards, values = (jnp.where(mask, x.astype(jnp.float32), 0.0)
                     for x in (rewards_BxT, values_BxT))

  def step(carry, xs):
    next_value_B, next_adv_B = carry
    reward_B, value_B, real_B = xs
    adv_B = reward_B + gamma * next_value_B - value_B + gamma * lam * next_adv_B
    carry = (jnp.where(real_B, value_B, next_value_B), jnp.where(real_B, adv_B, next_adv_B))
    return carry, jnp.where(real_B, adv_B, 0.0)

  zeros_B = jnp.zeros(mask.shape[0], jnp.float32)
  _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards.T, values.T, mask.T),
                            reverse=True)
  advantages = adv_TxB.T
  return advantages, jnp.where(mask, advantages + values, 0.0)


def whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
  """(x − μ) / √(σ² + eps) with μ, σ² the mean and (population) variance over the masked
  entries; shift_mean=False adds μ back (reward whitening keeps the mean). Masked-out entries
  become 0. Advantage whitening is one of Huang et al. 2024's details."""
  mask = mask.astype(bool)
  x = x.astype(jnp.float32)
  mean = masked_mean(x, mask)
  whitened = (x - mean) * jax.lax.rsqrt(masked_mean(jnp.square(x - mean), mask) + eps)
  return jnp.where(mask, whitened if shift_mean else whitened + mean, 0.0)


def aggregate_tokens(x_BxT, mask_BxT, how: str = 'token_mean'):
  """One number from per-token losses x over the real tokens of B rows of T positions:

    token_mean     Σ_bt x / Σ_bt m          each token weighs the same (DAPO, Yu et al. 2025)
    sequence_mean  mean_b Σ_t x / Σ_t m     each sequence weighs the same (GRPO, Shao et al.
                                            2024, eq. 3): a long answer's tokens weigh less
    max_length     Σ_bt x / (B · T)         a constant divisor, no length bias (Dr. GRPO, Liu
                                            et al. 2025)

  A row without real tokens counts in sequence_mean as 0. With gradient accumulation the
  micro-batches' aggregates are averaged: the minibatch's own for sequence_mean and
  max_length; token_mean then weighs each micro-batch alike, not each token.
  """
  if how not in LOSS_AGGREGATIONS:
    raise InputError(f'Loss aggregation {how!r}; choose one of {", ".join(LOSS_AGGREGATIONS)}.')
  mask = mask_BxT.astype(bool)
  if how == 'token_mean':
    return masked_mean(x_BxT, mask)
  if how == 'sequence_mean':
    return jnp.mean(masked_mean(x_BxT, mask, axis=1))
  return jnp.sum(jnp.where(mask, x_BxT, 0.0)) / mask.size


def ppo_policy_loss(logprobs_BxT, old_logprobs_BxT, advantages_BxT, mask_BxT, *, clip_eps,
                    clip_eps_high=None, aggregation: str = 'token_mean'):
  """Clipped surrogate (Schulman et al. 2017), per token

    max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε_high)),    ρ = exp(log π − log π_old),

  aggregated over the real tokens by `aggregate_tokens`. ε_high = ε unless given: DAPO's
  "clip-higher" (Yu et al. 2025) raises it (0.28 against ε = 0.2) so that unlikely tokens with
  a positive advantage can grow further.

  Only log π carries gradient. Metrics: 'policy/clipfrac' is the fraction of tokens where the
  clipped term is the larger (so the token's gradient is 0); 'policy/approxkl' the k2 estimate
  ½ (log π − log π_old)² of KL(π_old ‖ π) on the tokens sampled from π_old.
  """
  _check_bxt(logprobs_BxT=logprobs_BxT, old_logprobs_BxT=old_logprobs_BxT,
             advantages_BxT=advantages_BxT, mask_BxT=mask_BxT)
  mask = mask_BxT.astype(bool)
  log_ratio = logprobs_BxT.astype(jnp.float32) - _constant(old_logprobs_BxT)
  ratio = jnp.exp(log_ratio)
  advantages = _constant(advantages_BxT)
  unclipped = -advantages * ratio
  high = clip_eps if clip_eps_high is None else clip_eps_high
  clipped = -advantages * jnp.clip(ratio, 1 - clip_eps, 1 + high)
  loss = aggregate_tokens(jnp.maximum(unclipped, clipped), mask, aggregation)
  return loss, {
      'loss/policy': loss,
      'policy/clipfrac': masked_mean(clipped > unclipped, mask),
      'policy/approxkl': masked_mean(0.5 * jnp.square(log_ratio), mask),
  }


def ppo_value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, *, clip_eps):
  """Clipped value loss (Huang et al. 2024, as in OpenAI's lm-human-preferences):

    ½ masked_mean max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²).

  Only V carries gradient. 'value/clipfrac' is the fraction of tokens where the clipped term is
  the larger.
  """
  _check_bxt(values_BxT=values_BxT, old_values_BxT=old_values_BxT, returns_BxT=returns_BxT,
             mask_BxT=mask_BxT)
  mask = mask_BxT.astype(bool)
  values, old_values = values_BxT.astype(jnp.float32), _constant(old_values_BxT)
  returns = _constant(returns_BxT)
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  unclipped_err, clipped_err = jnp.square(values - returns), jnp.square(clipped_values - returns)
  loss = 0.5 * masked_mean(jnp.maximum(unclipped_err, clipped_err), mask)
  clipfrac = masked_mean(clipped_err > unclipped_err, mask)
  return loss, {'loss/value': loss, 'value/clipfrac': clipfrac}


def group_advantages(scores_NxG, *, normalize_std: bool = True, eps: float = 1e-4):
  """GRPO (Shao et al. 2024): A_i = (s_i − mean_g s) / (std_g s + eps) within each group of G
  samples of one prompt; std with Bessel's correction, eps = 1e-4, as in TRL.
  normalize_std=False keeps only the mean baseline (Dr. GRPO, Liu et al. 2025)."""
  scores = _check_groups(scores_NxG)
  centered = scores - scores.mean(axis=1, keepdims=True)
  if not normalize_std:
    return centered
  return centered / (jnp.std(scores, axis=1, ddof=1, keepdims=True) + eps)


def leave_one_out_advantages(scores_NxG):
  """RLOO (Ahmadian et al. 2024): A_i = s_i − mean_{j≠i} s_j = s_i − (Σ_j s_j − s_i) / (G − 1)."""
  scores = _check_groups(scores_NxG)
  return scores - (scores.sum(axis=1, keepdims=True) - scores) / (scores.shape[1] - 1)


def adaptive_kl_coef(kl_coef, observed_kl, *, target, horizon, n_steps):
  """The adaptive KL controller of Ziegler et al. 2019 as a pure update:

    β ← β (1 + clip(KL / KL_target − 1, −0.2, 0.2) · n_steps / horizon).
  """
  error = jnp.clip(observed_kl / target - 1, -0.2, 0.2)
  return kl_coef * (1 + error * n_steps / horizon)


def _constant(x):
  return jax.lax.stop_gradient(x.astype(jnp.float32))


def _check_bxt(**named):
  """Checks that the named arrays all share one [B, T] shape."""
  (first_name, first), *_ = named.items()
  if first.ndim != 2:
    raise InputError(f'{first_name} has shape {first.shape}; expected [B, T].')
  for name, value in named.items():
    if value.shape != first.shape:
      raise InputError(f'{name} has shape {value.shape}; expected {first.shape} like '
                       f'{first_name}.')


def _check_groups(scores_NxG):
  if scores_NxG.ndim != 2 or scores_NxG.shape[1] < 2:
    raise InputError(f'scores_NxG has shape {scores_NxG.shape}; expected [N, G] with G >= 2.')
  return scores_NxG.astype(jnp.float32)
