"""Shared array ops of the losses: masked reductions, memory-light token log-probs and KLs."""

import functools

import jax
import jax.numpy as jnp


def masked_sum(x, mask, axis=None):
  return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  """Mean of x over the entries where mask is true (0 where there are none)."""
  return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def token_logprobs(hidden_BxTxD, unembedding_DxV, targets_BxT, *, chunk_size: int = 256,
                   temperature: float = 1.0):
  """log π(target_t | context) [B, T] in float32, without holding [B, T, V] logits.

  With `temperature` T the distribution is softmax(logits / T), the one a sampler at T draws
  from (PPO scores its samples under the policy they came from).

  The sequence is cut into chunks of `chunk_size` positions; each chunk's logits are made,
  reduced to log-softmax at the targets and dropped, and recomputed in the backward pass
  (`jax.checkpoint`), so peak memory is O(B · chunk · V) instead of O(B · T · V).
  """
  b, t, d = hidden_BxTxD.shape
  chunk = min(chunk_size, t)
  pad = -t % chunk
  hidden = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  hidden_NxBxCxD = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
  targets_NxBxC = targets.reshape(b, n, chunk).swapaxes(0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_logprobs(h_BxCxD, y_BxC):
    logits = jnp.dot(h_BxCxD, unembedding_DxV.astype(h_BxCxD.dtype),
                     preferred_element_type=jnp.float32)
    if temperature != 1.0:
      logits = logits / temperature
    target_logits = jnp.take_along_axis(logits, y_BxC[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)

  _, logps_NxBxC = jax.lax.scan(lambda c, xs: (c, chunk_logprobs(*xs)), None,
                                (hidden_NxBxCxD, targets_NxBxC))
  return logps_NxBxC.swapaxes(0, 1).reshape(b, t + pad)[:, :t]


def token_kl(hidden_BxTxD, unembedding_DxV, reference_hidden_BxTxD, reference_unembedding_DxV,
             *, chunk_size: int = 256):
  """KL(π(·|context_t) ‖ π_ref(·|context_t)) [B, T] in float32, over the whole vocabulary.

  KL_t = Σ_v π(v|·) (log π(v|·) − log π_ref(v|·)), the two distributions made from each model's
  hidden states and unembedding. Chunked over the sequence like `token_logprobs` (forward only).
  """
  b, t, _ = hidden_BxTxD.shape
  chunk = min(chunk_size, t)
  pad = -t % chunk
  n = (t + pad) // chunk

  def chunks(h_BxTxD):
    h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    return h.reshape(b, n, chunk, h.shape[-1]).swapaxes(0, 1)

  def chunk_kl(h_BxCxD, ref_h_BxCxD):
    logps = jax.nn.log_softmax(jnp.dot(h_BxCxD, unembedding_DxV.astype(h_BxCxD.dtype),
                                       preferred_element_type=jnp.float32))
    ref_logps = jax.nn.log_softmax(jnp.dot(
        ref_h_BxCxD, reference_unembedding_DxV.astype(ref_h_BxCxD.dtype),
        preferred_element_type=jnp.float32))
    return jnp.sum(jnp.exp(logps) * (logps - ref_logps), axis=-1)

  _, kl_NxBxC = jax.lax.scan(lambda c, xs: (c, chunk_kl(*xs)), None,
                             (chunks(hidden_BxTxD), chunks(reference_hidden_BxTxD)))
  return kl_NxBxC.swapaxes(0, 1).reshape(b, t + pad)[:, :t]
