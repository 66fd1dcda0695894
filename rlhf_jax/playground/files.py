"""The playground's data as JSONL files: instructions, pretraining text and labelled pairs.

Each file is written once into a cache directory and then read like any user's file
(`jsonl:PATH` sources of `rlhf_jax.data`). Preference pairs are two graded corruptions of the
best answer, or two answers of a policy (`answer_pairs`), labelled by the simulated labelers
on a gold reward (the program by default, a teacher model for Gao-style experiments).
"""

import json
import os
import re

import numpy as np

from rlhf_jax.data import SPLITS
from rlhf_jax.errors import InputError
from rlhf_jax.playground import tasks
from rlhf_jax.playground.labelers import Labeler, hedge, is_confident, num_words

KINDS = ('sft', 'preference', 'text')


def source_spec(kind: str, p, cache_dir: str, *, gold=None, answer_pairs=None,
                key: str = 'source') -> str:
  """'jsonl:PATH' of the playground's `kind` examples, written once into `cache_dir`, with
  '{split}' in PATH for the train and eval files. `key` names the spec in errors."""
  if kind not in KINDS:
    raise InputError(f'{key}="playground:{kind}": the playground has {KINDS}.')
  name = f'playground-{kind}-{{split}}-n{p.train_size}-{p.eval_size}-seed{p.seed}'
  if kind != 'text' and tasks.configured_tasks(p) != tasks.TASKS:
    name += '-tasks-' + '-'.join(p.tasks)
  if kind == 'preference':
    name += (f'-T{p.label_temperature}-len{p.length_bias}-gold-{_slug(p.gold)}'
             f'-pairs-{_slug(p.pairs)}')
    if p.pairs != 'corruptions':
      name += f'-at{p.pair_temperature}'
    if p.hedge_share or p.assertiveness_bias:
      name += f'-hedge{p.hedge_share}-assert{p.assertiveness_bias}'
  pattern = os.path.join(cache_dir, name + '.jsonl')
  for split in SPLITS:
    write_file(kind, split, p, pattern.format(split=split), gold=gold,
               answer_pairs=answer_pairs)
  return 'jsonl:' + pattern


def write_file(kind: str, split: str, p, path: str, *, gold=None, answer_pairs=None) -> None:
  """Writes the playground's `kind` examples of `split` to `path` unless it exists.

  p: the config's `data.playground` entry. Each process writes a file of its own and renames
  it into place, so concurrent writers (several hosts) never leave a partial file.
  """
  size = p.train_size if split == 'train' else p.eval_size
  cache_dir = os.path.dirname(path)
  if not os.path.exists(path):
    os.makedirs(cache_dir, exist_ok=True)
    rows = playground_rows(kind, split, size, seed=p.seed, gold=gold, answer_pairs=answer_pairs,
                           labeler=Labeler(p.label_temperature, p.length_bias,
                                           p.assertiveness_bias),
                           task_names=tasks.configured_tasks(p), hedge_share=p.hedge_share)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
    os.replace(tmp, path)


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9.]+', '_', text).strip('_')[-60:]


def playground_rows(kind: str, split: str, n: int, *, seed: int, labeler: Labeler,
                    gold=None, answer_pairs=None, task_names=tasks.TASKS,
                    hedge_share: float = 0.0) -> list:
  """The JSON objects of a playground file; preference rows also keep their gold rewards.

  Preference pairs are two corruptions of the best answer, or with `answer_pairs(prompts,
  split)` two answers of a policy; pairs whose answers are the same are redrawn
  (corruptions) or left out (a policy's, as are pairs with an empty answer).
  gold(prompts, responses) -> rewards labels them (default: the playground's program). The
  prompts are of `task_names`, in turn. With `hedge_share`, each answer of a pair is hedged
  (`labelers.hedge`) with that probability, for labelers biased toward confident answers.
  """
  if kind == 'text':
    rng = np.random.default_rng([seed, SPLITS.index(split), 9])
    return [{'text': tasks.pretraining_document(rng)} for _ in range(n)]
  prompts = tasks.sample_prompts(seed, split, n, task_names)
  if kind == 'sft':
    return [{'prompt': p, 'response': tasks.reference(p)} for p in prompts]
  rngs = [np.random.default_rng([seed, SPLITS.index(split), i, 3]) for i in range(n)]
  if answer_pairs is None:
    pairs = [_corruption_pair(prompt, rng) for prompt, rng in zip(prompts, rngs)]
  else:
    pairs = list(zip(*answer_pairs(prompts, split)))
    kept = [i for i, (a, b) in enumerate(pairs) if a != b and a.strip() and b.strip()]
    prompts, pairs, rngs = ([xs[i] for i in kept] for xs in (prompts, pairs, rngs))
  if hedge_share:
    pairs = [tuple(hedge(x) if rng.random() < hedge_share else x for x in pair)
             for pair, rng in zip(pairs, rngs)]
  gold = gold or tasks.program_gold
  gold_a, gold_b = (gold(prompts, [pair[j] for pair in pairs]) for j in (0, 1))
  rows = []
  for prompt, (a, b), g_a, g_b, rng in zip(prompts, pairs, gold_a, gold_b, rngs):
    a_wins, p_a = labeler.label(g_a, g_b, num_words(a), num_words(b), rng, is_confident(a),
                                is_confident(b))
    (chosen, g_c), (rejected, g_r) = ((a, g_a), (b, g_b))[::1 if a_wins else -1]
    rows.append({'prompt': prompt, 'chosen': chosen, 'rejected': rejected,
                 'gold_chosen': float(g_c), 'gold_rejected': float(g_r),
                 'p_chosen': float(p_a if a_wins else 1 - p_a)})
  return rows


def _corruption_pair(prompt: str, rng: np.random.Generator) -> tuple[str, str]:
  a, b = tasks.corrupt(prompt, rng), tasks.corrupt(prompt, rng)
  while a == b:  # A pair must differ; redraw the second answer.
    b = tasks.corrupt(prompt, rng)
  return a, b
