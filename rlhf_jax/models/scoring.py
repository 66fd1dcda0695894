"""Sequence-level outputs of a model: a reward at the last real token, a response's log-prob,
its KL to a reference."""

import jax.numpy as jnp

from rlhf_jax.losses import masked_sum, token_kl, token_logprobs


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


def sequence_logps(model, tokens_BxT, attention_mask_BxT, loss_mask_BxT, *, chunk_size: int):
  """(Σ_t log π(y_t | y_<t) over the tokens marked by loss_mask [B], their count [B]).

  log π(sequence) of the response tokens, as DPO and PPO's KL read it; the first token is never
  a target. Log-probs are computed in sequence chunks (`token_logprobs`), never as float32
  [B, T, V] logits. Left or right padding alike (positions come from the attention mask).
  """
  hidden_BxTxD, _ = model.hidden_states(tokens_BxT, attention_mask=attention_mask_BxT)
  logps_BxT = token_logprobs(hidden_BxTxD[:, :-1], model.unembedding(), tokens_BxT[:, 1:],
                             chunk_size=chunk_size)
  mask_BxT = loss_mask_BxT[:, 1:].astype(bool)
  return masked_sum(logps_BxT, mask_BxT, axis=-1), mask_BxT.sum(-1)


def sequence_kl(model, reference, tokens_BxT, attention_mask_BxT, loss_mask_BxT, *,
                chunk_size: int):
  """Σ_t KL(π(·|y_<t) ‖ π_ref(·|y_<t)) over the tokens marked by loss_mask [B].

  For y ~ π, the Rao–Blackwellised estimate of KL(π‖π_ref) over responses (Amini, Vieira &
  Cotterell 2025, "Better Estimation of the KL Divergence Between Language Models"): by the
  chain rule its expectation is the KL, like Σ_t log π(y_t|·)/π_ref(y_t|·)'s, but each term is
  the exact KL of one next-token distribution, so it is never negative and has no more variance.
  """
  hidden_BxTxD, _ = model.hidden_states(tokens_BxT, attention_mask=attention_mask_BxT)
  reference_BxTxD, _ = reference.hidden_states(tokens_BxT, attention_mask=attention_mask_BxT)
  kl_BxT = token_kl(hidden_BxTxD[:, :-1], model.unembedding(), reference_BxTxD[:, :-1],
                    reference.unembedding(), chunk_size=chunk_size)
  return masked_sum(kl_BxT, loss_mask_BxT[:, 1:].astype(bool), axis=-1)
