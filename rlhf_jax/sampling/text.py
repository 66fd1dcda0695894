"""Text in, text out: a policy's answers to prompts, sampled in global batches on the mesh.

Each prompt becomes one user message through the tokenizer's chat template, left-padded to
`max_prompt_len`; the answers are decoded up to EOS. The same prompts, params and seed give
the same answers.
"""

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from rlhf_jax.data.encoding import encode_prompt
from rlhf_jax.data.records import Prompt, prompt_messages
from rlhf_jax.errors import InputError
from rlhf_jax.parallel import map_batches
from rlhf_jax.sampling.sampler import make_sampler


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int):
  """(tokens [N, length], mask [N, length]) with each sequence at the right end."""
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for i, ids in enumerate(sequences):
    if len(ids) > length:
      raise InputError(f'A prompt of {len(ids)} tokens exceeds config.data.max_prompt_len='
                       f'{length}.')
    tokens[i, length - len(ids):] = ids
    mask[i, length - len(ids):] = 1
  return tokens, mask


def encode_prompts(tokenizer, prompts: Sequence[Prompt], max_prompt_len: int):
  """(tokens [N, max_prompt_len], mask): each prompt (a string: one user message) through the
  chat template, left-padded."""
  ids = [encode_prompt(tokenizer, prompt_messages(p)) for p in prompts]
  return left_pad(ids, max_prompt_len, tokenizer.pad_token_id)


def decode_responses(tokenizer, tokens_NxM, mask_NxM) -> list[str]:
  """The text of each row's generated tokens (up to and including EOS), specials dropped."""
  return [tokenizer.decode(t[m.astype(bool)], skip_special_tokens=True).strip()
          for t, m in zip(np.asarray(tokens_NxM), np.asarray(mask_NxM))]


@dataclasses.dataclass(frozen=True)
class TextSamples:
  responses: list[str]
  prompt_tokens: np.ndarray  # [N, P], left-padded.
  prompt_mask: np.ndarray  # [N, P]
  tokens: np.ndarray  # [N, M] generated, pad after EOS.
  mask: np.ndarray  # [N, M] 1 up to and including EOS.

  def sequences(self) -> dict[str, np.ndarray]:
    """Prompt + answer rows [N, P + M] with a loss mask on the answer, for scoring."""
    return {'tokens': np.concatenate([self.prompt_tokens, self.tokens], axis=1),
            'attention_mask': np.concatenate([self.prompt_mask, self.mask], axis=1),
            'loss_mask': np.concatenate([np.zeros_like(self.prompt_mask), self.mask], axis=1)}


class TextSampler:
  """`sampler(params, prompts, seed=...) -> TextSamples` for a policy of `graphdef`."""

  def __init__(self, tokenizer, graphdef, *, mesh, rules, batch_size: int, max_prompt_len: int,
               max_new_tokens: int, temperature: float):
    self.tokenizer, self.max_prompt_len = tokenizer, max_prompt_len
    self.mesh, self.rules, self.batch_size = mesh, rules, batch_size
    sampler = make_sampler(graphdef, max_new_tokens=max_new_tokens,
                           eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                           temperature=temperature)

    def generate(params, batch):  # A key per global batch, from the seed and its first row.
      rng = jax.random.fold_in(jax.random.key(batch['seed'][0]), batch['row'][0])
      out = sampler(params, batch['tokens'], batch['mask'], rng)
      return out.tokens_BxN, out.mask_BxN

    self._generate = jax.jit(generate)

  def __call__(self, params, prompts: Sequence[str], *, seed: int) -> TextSamples:
    prompt_tokens, prompt_mask = encode_prompts(self.tokenizer, prompts, self.max_prompt_len)
    n = len(prompts)
    tokens, mask = map_batches(
        lambda batch: self._generate(params, batch),
        {'tokens': prompt_tokens, 'mask': prompt_mask, 'row': np.arange(n, dtype=np.int32),
         'seed': np.full(n, seed, np.int32)},
        batch_size=self.batch_size, mesh=self.mesh, rules=self.rules)
    responses = decode_responses(self.tokenizer, tokens, mask)
    return TextSamples(responses, prompt_tokens, prompt_mask, tokens, mask)
