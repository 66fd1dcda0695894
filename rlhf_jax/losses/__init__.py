"""Pure loss functions: arrays in, (loss, metrics) out."""

from rlhf_jax.losses.dpo import dpo_loss
from rlhf_jax.losses.ops import masked_mean, masked_sum, token_logprobs
from rlhf_jax.losses.reward import bradley_terry_loss
from rlhf_jax.losses.sft import sft_loss
