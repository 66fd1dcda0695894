"""Batched autoregressive sampling with the KV cache: greedy, temperature, top-k and top-p.

The left-padded prompt is prefilled in one pass, then one token per row per step inside a
`lax.while_loop` that ends when every row has emitted EOS or after `max_new_tokens`. Shapes are
fixed, so one compile serves every batch of the same [B, P].
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.errors import InputError
from rlhf_jax.models import Transformer


@flax.struct.dataclass
class SampleOutput:
  """N = max_new_tokens generated positions per row; row b's response is its first lengths_B[b].

  logprobs_BxN is log softmax(logits / T) at the sampled token in float32: the tempered policy
  before top-k / top-p truncation (T = 1, the model's own policy, for greedy decoding). It is 0
  wherever mask_BxN is 0.
  """
  tokens_BxN: jax.Array  # int32; pad_id after EOS.
  logprobs_BxN: jax.Array  # float32.
  mask_BxN: jax.Array  # bool; True for generated tokens up to and including EOS.
  lengths_B: jax.Array  # int32; mask_BxN.sum(-1).


def top_k_mask(logits_BxV, k: int):
  """True for the k largest logits of each row (all tokens tied with the k-th one are kept)."""
  k = min(k, logits_BxV.shape[-1])
  kth_largest_Bx1 = jax.lax.top_k(logits_BxV, k)[0][..., -1:]
  return logits_BxV >= kth_largest_Bx1


def top_p_mask(logits_BxV, p: float):
  """Nucleus (Holtzman 2020): the smallest set of most likely tokens with probability ≥ p.

  A token is kept iff the mass of the tokens ranked above it is < p, so the most likely token
  always is; probabilities are softmax(logits_BxV), and ties with the last kept token are kept.
  """
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_above_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  smallest_kept_Bx1 = jnp.min(jnp.where(mass_above_BxV < p, sorted_BxV, jnp.inf), axis=-1,
                              keepdims=True)
  return logits_BxV >= smallest_kept_Bx1


def truncated_logits(logits_BxV, *, top_k: int = 0, top_p: float = 1.0):
  """The logits with every token outside the top k, then outside the top-p nucleus, at −inf.

  As in HF transformers, the nucleus is taken on the distribution already cut to the top k.
  top_k = 0 and top_p = 1 turn the filters off.
  """
  if top_k:
    logits_BxV = jnp.where(top_k_mask(logits_BxV, top_k), logits_BxV, -jnp.inf)
  if top_p < 1.0:
    logits_BxV = jnp.where(top_p_mask(logits_BxV, top_p), logits_BxV, -jnp.inf)
  return logits_BxV


def _check_options(max_new_tokens, temperature, top_k, top_p):
  if max_new_tokens < 1:
    raise InputError(f'max_new_tokens={max_new_tokens}; need at least 1.')
  if temperature < 0:
    raise InputError(f'temperature={temperature}; need ≥ 0 (0 = greedy).')
  if top_k < 0:
    raise InputError(f'top_k={top_k}; need ≥ 0 (0 = off).')
  if not 0 < top_p <= 1:
    raise InputError(f'top_p={top_p}; need 0 < top_p ≤ 1 (1 = off).')


def sample(model: Transformer, prompt_tokens_BxP, prompt_mask_BxP, rng, *, max_new_tokens: int,
           eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> SampleOutput:
  """Samples up to `max_new_tokens` tokens after each left-padded prompt.

  Each step draws token ~ softmax(truncated_logits(logits / T)), or takes argmax(logits) when
  temperature = 0. Every row needs at least one real prompt token. Step i uses
  `jax.random.split(rng, max_new_tokens)[i]`, so a key gives the same tokens every time.
  A row that has emitted `eos_id` emits `pad_id` (mask 0) from then on. The cache holds
  P + max_new_tokens − 1 tokens: the last sampled token is never fed back.
  """
  _check_options(max_new_tokens, temperature, top_k, top_p)
  if model.cfg.head != 'lm':
    raise InputError(f'Sampling needs an LM head; the model has config.head={model.cfg.head!r}.')
  batch_size, prompt_len = prompt_tokens_BxP.shape
  keys_N = jax.random.split(rng, max_new_tokens)

  def emit(state, logits_BxV):
    """Picks token `i` of every unfinished row from the logits that predict it."""
    i, done_B = state['i'], state['done_B']
    if temperature == 0:
      token_B = jnp.argmax(logits_BxV, axis=-1)
      logps_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
      scaled_BxV = logits_BxV / temperature
      truncated_BxV = truncated_logits(scaled_BxV, top_k=top_k, top_p=top_p)
      token_B = jax.random.categorical(keys_N[i], truncated_BxV, axis=-1)
      logps_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
    logp_B = jnp.take_along_axis(logps_BxV, token_B[:, None], axis=-1)[:, 0]
    token_B = jnp.where(done_B, pad_id, token_B).astype(jnp.int32)
    return dict(
        i=i + 1, cache=state['cache'], done_B=done_B | (token_B == eos_id),
        tokens_BxN=state['tokens_BxN'].at[:, i].set(token_B),
        logprobs_BxN=state['logprobs_BxN'].at[:, i].set(jnp.where(done_B, 0.0, logp_B)),
        mask_BxN=state['mask_BxN'].at[:, i].set(~done_B))

  def decode_one(state):
    """Feeds the last token (masked out for finished rows) and emits the next."""
    i = state['i']
    last_Bx1 = jax.lax.dynamic_slice_in_dim(state['tokens_BxN'], i - 1, 1, axis=1)
    last_mask_Bx1 = jax.lax.dynamic_slice_in_dim(state['mask_BxN'], i - 1, 1, axis=1)
    logits_Bx1xV, cache = model.step(last_Bx1, state['cache'], attention_mask=last_mask_Bx1)
    return emit({**state, 'cache': cache}, logits_Bx1xV[:, 0])

  def unfinished(state):
    return (state['i'] < max_new_tokens) & ~jnp.all(state['done_B'])

  # Prefill; the head runs on the last column only (prompts are left-padded).
  cache = model.init_cache(batch_size, prompt_len + max_new_tokens - 1)
  hidden_BxPxD, cache = model.hidden_states(prompt_tokens_BxP, attention_mask=prompt_mask_BxP,
                                            cache=cache)
  state = dict(i=jnp.zeros((), jnp.int32), cache=cache,
               done_B=jnp.zeros((batch_size,), jnp.bool_),
               tokens_BxN=jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32),
               logprobs_BxN=jnp.zeros((batch_size, max_new_tokens), jnp.float32),
               mask_BxN=jnp.zeros((batch_size, max_new_tokens), jnp.bool_))
  state = emit(state, model.apply_head(hidden_BxPxD[:, -1]))
  state = jax.lax.while_loop(unfinished, decode_one, state)
  return SampleOutput(tokens_BxN=state['tokens_BxN'], logprobs_BxN=state['logprobs_BxN'],
                      mask_BxN=state['mask_BxN'],
                      lengths_B=state['mask_BxN'].sum(-1, dtype=jnp.int32))


def make_sampler(graphdef: nnx.GraphDef, *, max_new_tokens: int, eos_id: int, pad_id: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Jitted `fn(params_state, prompt_tokens_BxP, prompt_mask_BxP, rng) -> SampleOutput`.

  `params_state` is the state half of `nnx.split(model)` (graphdef is the other half); it keeps
  its shardings, and the outputs stay on device.
  """
  _check_options(max_new_tokens, temperature, top_k, top_p)
  options = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                 temperature=temperature, top_k=top_k, top_p=top_p)

  @jax.jit
  def sample_fn(params_state, prompt_tokens_BxP, prompt_mask_BxP, rng):
    return sample(nnx.merge(graphdef, params_state), prompt_tokens_BxP, prompt_mask_BxP, rng,
                  **options)

  return sample_fn
