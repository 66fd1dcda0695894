"""The prompts that rollouts answer: a pool per split, and each iteration's draw from it."""

import os

import numpy as np

from rlhf_jax.errors import InputError, NotFound
from rlhf_jax.playground import tasks


def prompt_pool(config, split: str = 'train', n: int | None = None) -> list[str]:
  """config.rl.prompts: 'playground' (n prompts of `split`, default config.rl.num_prompts) or a
  text file with one prompt per line (it has no held-out split: the same file for both)."""
  spec = config.rl.prompts
  if spec == 'playground':
    return tasks.sample_prompts(config.data.playground.seed, split, n or config.rl.num_prompts)
  if not os.path.exists(spec):
    raise NotFound(f'config.rl.prompts={spec!r}: no such file (or "playground").')
  with open(spec, encoding='utf-8') as f:
    prompts = [line.rstrip('\n') for line in f if line.strip()]
  if not prompts:
    raise InputError(f'config.rl.prompts={spec!r} holds no prompt.')
  return prompts


def rollout_prompts(pool: list[str], config, iteration: int) -> list[str]:
  """The rollout's rows: rollout_batch_size / G prompts drawn without replacement from the
  pool for (seed, iteration), each repeated G times in consecutive rows."""
  rl = config.rl
  n = rl.rollout_batch_size // rl.group_size
  rng = np.random.default_rng([config.seed, iteration])
  chosen = rng.choice(len(pool), size=n, replace=n > len(pool))
  return [pool[i] for i in chosen for _ in range(rl.group_size)]
