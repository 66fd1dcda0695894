"""Gold reward of a policy's sampled answers to held-out prompts.

The prompts go through the chat template, left-padded to `max_prompt_len`; the policy samples
up to `max_new_tokens` with the KV-cache sampler; the decoded answers are scored by a gold
reward `gold_fn(prompts, responses) -> rewards`. Reported: the mean gold reward, per group (e.g.
per playground task), mean response length and the share of answers that ended with EOS; the
samples themselves go to `<workdir>/samples/step_<N>.jsonl`.
"""

import collections
import functools
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from rlhf_jax.data.encoding import encode_prompt
from rlhf_jax.data.records import Message
from rlhf_jax.eval.batched import map_batches
from rlhf_jax.sampling import make_sampler


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int):
  """(tokens [N, length], mask [N, length]) with each sequence at the right end."""
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for i, ids in enumerate(sequences):
    if len(ids) > length:
      raise ValueError(f'A prompt of {len(ids)} tokens exceeds config.data.max_prompt_len='
                       f'{length}.')
    tokens[i, length - len(ids):] = ids
    mask[i, length - len(ids):] = 1
  return tokens, mask


class GoldRewardOfSamples:
  """Callable `(params, step) -> metrics`: samples answers and scores them with the gold."""

  def __init__(self, prompts: Sequence[str], tokenizer, graphdef, *, gold_fn: Callable,
               groups: Sequence[str] | None, mesh, rules, batch_size: int, max_prompt_len: int,
               max_new_tokens: int, temperature: float, seed: int, workdir: str | None):
    self.prompts, self.tokenizer, self.gold_fn = list(prompts), tokenizer, gold_fn
    self.groups = list(groups) if groups is not None else None
    self.mesh, self.rules, self.batch_size, self.seed = mesh, rules, batch_size, seed
    self.workdir = workdir
    ids = [encode_prompt(tokenizer, (Message('user', p),)) for p in self.prompts]
    self.tokens, self.mask = left_pad(ids, max_prompt_len, tokenizer.pad_token_id)
    self.sampler = make_sampler(graphdef, max_new_tokens=max_new_tokens,
                                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                temperature=temperature)
    self._generate_jit = jax.jit(self._generate)

  def _generate(self, params, batch):
    rng = jax.random.fold_in(jax.random.key(self.seed), batch['row'][0])
    out = self.sampler(params, batch['tokens'], batch['mask'], rng)
    return out.tokens_BxN, out.mask_BxN

  def __call__(self, params, step: int) -> dict[str, float]:
    """Same prompts and keys at every evaluation, so only the policy's change shows."""
    generate = functools.partial(self._generate_jit, params)
    rows = np.arange(len(self.prompts), dtype=np.int32)
    tokens, mask = map_batches(generate, {'tokens': self.tokens, 'mask': self.mask, 'row': rows},
                               batch_size=self.batch_size, mesh=self.mesh, rules=self.rules)
    responses = [self.tokenizer.decode(t[m.astype(bool)], skip_special_tokens=True).strip()
                 for t, m in zip(tokens, mask)]
    gold = np.asarray(self.gold_fn(self.prompts, responses), np.float64)
    lengths = mask.sum(-1)
    ended = (tokens == self.tokenizer.eos_token_id).any(-1)
    metrics = {'gold_reward': gold.mean(), 'response_tokens': lengths.mean(),
               'ended_with_eos': ended.mean()}
    if self.groups is not None:
      by_group = collections.defaultdict(list)
      for group, g in zip(self.groups, gold):
        by_group[group].append(g)
      metrics |= {f'gold_reward/{k}': float(np.mean(v)) for k, v in sorted(by_group.items())}
    self._write_samples(step, responses, gold)
    return metrics

  def _write_samples(self, step, responses, gold):
    if self.workdir is None or jax.process_index() != 0:
      return
    os.makedirs(os.path.join(self.workdir, 'samples'), exist_ok=True)
    with open(os.path.join(self.workdir, 'samples', f'step_{step}.jsonl'), 'w') as f:
      for prompt, response, g in zip(self.prompts, responses, gold):
        f.write(json.dumps({'prompt': prompt, 'response': response, 'gold': float(g)}) + '\n')
