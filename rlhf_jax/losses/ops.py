"""Shared array ops of the losses: masked reductions, memory-light token log-probs and KLs."""

import functools

import jax
import jax.numpy as jnp


def masked_sum(x, mask, axis=None):
  return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  """Mean of x over the entries where mask is true (0 where there are none)."""
  return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def _over_sequence_chunks(fn, chunk_size: int, *sequences):
  """fn(*chunks) -> [B, C] for consecutive chunks of C = chunk_size positions of the [B, T, …]
  `sequences` (zero-padded to a multiple of C), in a `lax.scan`; the outputs joined back to
  [B, T]."""
  b, t = sequences[0].shape[:2]
  chunk = min(chunk_size, t)
  pad = -t % chunk
  n = (t + pad) // chunk

  def chunks(x_BxT):
    x = jnp.pad(x_BxT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BxT.ndim - 2))
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  _, out_NxBxC = jax.lax.scan(lambda c, xs: (c, fn(*xs)), None,
                              tuple(chunks(x) for x in sequences))
  return out_NxBxC.swapaxes(0, 1).reshape(b, t + pad)[:, :t]


def token_logprobs(hidden_BxTxD, unembedding_DxV, targets_BxT, *, chunk_size: int = 256,
                   temperature: float = 1.0):
  """log π(target_t | context) [B, T] in float32, without holding [B, T, V] logits.

  With `temperature` T the distribution is softmax(logits / T), the one a sampler at T draws
  from (PPO scores its samples under the policy they came from).

  The sequence is cut into chunks of `chunk_size` positions; each chunk's logits are made,
  reduced to log-softmax at the targets and dropped, and recomputed in the backward pass
  (`jax.checkpoint`), so peak memory is O(B · chunk · V) instead of O(B · T · V).
  """

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_logprobs(h_BxCxD, y_BxC):
    logits = jnp.dot(h_BxCxD, unembedding_DxV.astype(h_BxCxD.dtype),
                     preferred_element_type=jnp.float32)
    if temperature != 1.0:
      logits = logits / temperature
    target_logits = jnp.take_along_axis(logits, y_BxC[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)

  return _over_sequence_chunks(chunk_logprobs, chunk_size, hidden_BxTxD, targets_BxT)


def token_kl(hidden_BxTxD, unembedding_DxV, reference_hidden_BxTxD, reference_unembedding_DxV,
             *, chunk_size: int = 256):
  """KL(π(·|context_t) ‖ π_ref(·|context_t)) [B, T] in float32, over the whole vocabulary.

  KL_t = Σ_v π(v|·) (log π(v|·) − log π_ref(v|·)), the two distributions made from each model's
  hidden states and unembedding. Chunked over the sequence like `token_logprobs` (forward only).
  """

  def log_softmax(h_BxCxD, unembedding_DxV):
    return jax.nn.log_softmax(jnp.dot(h_BxCxD, unembedding_DxV.astype(h_BxCxD.dtype),
                                      preferred_element_type=jnp.float32))

  def chunk_kl(h_BxCxD, reference_h_BxCxD):
    logps = log_softmax(h_BxCxD, unembedding_DxV)
    reference_logps = log_softmax(reference_h_BxCxD, reference_unembedding_DxV)
    return jnp.sum(jnp.exp(logps) * (logps - reference_logps), axis=-1)

  return _over_sequence_chunks(chunk_kl, chunk_size, hidden_BxTxD, reference_hidden_BxTxD)
