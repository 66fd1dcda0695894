"""The prompts that rollouts answer: a pool per split, and each iteration's draw from it."""

import os

import numpy as np

from rlhf_jax.data.records import Prompt
from rlhf_jax.data.sources import SCHEMES, read_records
from rlhf_jax.errors import InputError, NotFound
from rlhf_jax.playground import tasks


def prompt_pool(config, split: str = 'train', n: int | None = None) -> list[Prompt]:
  """config.rl.prompts:
    'playground'             n prompts of `split` (default config.rl.num_prompts);
    jsonl:, tfds:, hf: specs  a source's "prompt" (a string or messages) or "messages" column
                             (a final assistant message dropped), its splits as for training
                             data (`rlhf_jax.data.sources`; config.data.field_map applies);
    a text file              one prompt per line, the same file for both splits.
  A prompt of one user message is its string, as reward functions and the playground take it;
  others stay messages, which the chat template renders.
  """
  spec = config.rl.prompts
  if spec == 'playground':
    return tasks.playground_prompts(config.data.playground, split, n or config.rl.num_prompts)
  if spec.partition(':')[0] in SCHEMES:
    records = read_records(spec, 'prompt', data=config.data, key='config.rl.prompts')[split]
    prompts = [_plain(record.prompt) for record in records.records]
  elif not os.path.exists(spec):
    raise NotFound(f'config.rl.prompts={spec!r}: no such file (give "playground", a text file '
                   'or a jsonl:, tfds: or hf: source).')
  else:
    with open(spec, encoding='utf-8') as f:
      prompts = [line.rstrip('\n') for line in f if line.strip()]
  if not prompts:
    raise InputError(f'config.rl.prompts={spec!r} holds no prompt for split {split!r}.')
  return prompts


def _plain(messages) -> Prompt:
  """One user message as its string; any other conversation as it is."""
  if len(messages) == 1 and messages[0].role == 'user':
    return messages[0].content
  return messages


def rollout_prompts(pool: list[Prompt], config, iteration: int) -> list[Prompt]:
  """The rollout's rows: rollout_batch_size / G prompts drawn without replacement from the
  pool for (seed, iteration), each repeated G times in consecutive rows."""
  rl = config.rl
  n = rl.rollout_batch_size // rl.group_size
  rng = np.random.default_rng([config.seed, iteration])
  chosen = rng.choice(len(pool), size=n, replace=n > len(pool))
  return [pool[i] for i in chosen for _ in range(rl.group_size)]
