"""Sequence-level outputs of a model: the scalar head read at each sequence's last real token."""

import jax.numpy as jnp


def last_token_index(attention_mask_BxT):
  """Index of each row's last real token (left or right padding alike)."""
  t = attention_mask_BxT.shape[-1]
  return t - 1 - jnp.argmax(jnp.flip(attention_mask_BxT.astype(bool), -1), axis=-1)


def sequence_rewards(model, tokens_BxT, attention_mask_BxT, *, segment_ids_BxT=None):
  """r(x, y) [B]: a scalar-head model's output at the last real token of each sequence.

  The head is applied to that one hidden state per row (InstructGPT's reward model reads the
  final token), not to all T positions.
  """
  hidden_BxTxD, _ = model.hidden_states(tokens_BxT, attention_mask=attention_mask_BxT,
                                        segment_ids=segment_ids_BxT)
  last_B = last_token_index(attention_mask_BxT)
  hidden_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
  return model.apply_head(hidden_BxD[:, None])[:, 0]
