"""Supervised fine-tuning (and pretraining) loss: cross-entropy on the target tokens."""

from typing import Literal

from rlhf_jax.errors import InputError
from rlhf_jax.losses.ops import masked_mean


def sft_loss(token_logps_BxT, loss_mask_BxT, *,
             normalize: Literal['token', 'sequence'] = 'token'):
  """Negative log-likelihood of the target (response) tokens.

  token:    L = −Σ_{b,t} m_bt log p_bt / Σ_{b,t} m_bt  — every target token weighs the same,
            so long responses weigh more (the usual LM/SFT convention).
  sequence: L = −mean_b [Σ_t m_bt log p_bt / Σ_t m_bt] — every example weighs the same.
  Prompt and padding tokens have m = 0; for pretraining m covers every real token.
  """
  mask = loss_mask_BxT.astype(bool)
  if normalize == 'token':
    loss = -masked_mean(token_logps_BxT, mask)
  elif normalize == 'sequence':
    has_targets = mask.any(-1)
    loss = -masked_mean(masked_mean(token_logps_BxT, mask, axis=-1), has_targets)
  else:
    raise InputError(f'normalize={normalize!r}; choose "token" or "sequence".')
  return loss, {'loss': loss, 'target_tokens': mask.sum()}
