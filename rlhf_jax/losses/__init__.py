"""Pure loss functions: arrays in, (loss, metrics) out."""

from rlhf_jax.losses.dpo import dpo_loss
from rlhf_jax.losses.kto import kto_loss
from rlhf_jax.losses.ops import masked_mean, masked_sum, token_kl, token_logprobs
from rlhf_jax.losses.ppo import (adaptive_kl_coef, aggregate_tokens, gae, group_advantages,
                                 kl_penalty, leave_one_out_advantages, ppo_policy_loss,
                                 ppo_value_loss, token_rewards, whiten)
from rlhf_jax.losses.reward import bradley_terry_loss
from rlhf_jax.losses.sft import sft_loss
