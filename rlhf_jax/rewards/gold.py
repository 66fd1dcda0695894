"""The gold reward of a playground run: the playground's program or a frozen teacher model.

`config.data.playground.gold` chooses:
    'program'          tasks.gold_reward, in [0, 1]
    'teacher:random'   a randomly initialised scalar-head transformer of preset
                       `config.data.playground.teacher_preset` (seed: playground seed)
    'teacher:PATH'     a reward-model checkpoint in HF format
A teacher's rewards are standardised (mean 0, std 1) over playground reference answers and
their corruptions, so the labelers' temperature keeps its meaning (Gao et al. 2022 label
comparisons with such a gold model).
"""

from collections.abc import Callable, Sequence

import numpy as np

from rlhf_jax.errors import InputError
from rlhf_jax.models.presets import get_preset
from rlhf_jax.playground import tasks
from rlhf_jax.rewards.model import ModelReward

GoldFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def uses_playground_gold(config) -> bool:
  """Whether config.eval.gold asks for evaluations against the playground's gold reward."""
  if config.eval.gold not in ('playground', ''):
    raise InputError(f'config.eval.gold={config.eval.gold!r}; choose "playground" or "".')
  return config.eval.gold == 'playground'


def make_gold(config, tokenizer, *, mesh) -> GoldFn:
  """The gold reward `gold(prompts, responses) -> [N]` that config.data.playground names."""
  p = config.data.playground
  if p.gold == 'program':
    return tasks.program_gold
  scheme, _, location = p.gold.partition(':')
  if scheme != 'teacher' or not location:
    raise InputError(f'config.data.playground.gold={p.gold!r}; choose "program", '
                     '"teacher:random" or "teacher:<HF reward-model directory>".')
  prompts = tasks.sample_prompts(p.seed, 'train', 512)
  rng = np.random.default_rng([p.seed, 11])
  reference = (prompts * 2, [tasks.reference(q) for q in prompts]
               + [tasks.corrupt(q, rng) for q in prompts])
  options = dict(seq_len=config.train.seq_len, max_prompt_len=config.data.max_prompt_len,
                 batch_size=config.train.batch_size, mesh=mesh,
                 rules=config.sharding_rules, standardize_on=reference)
  if location == 'random':
    return ModelReward.random(get_preset(p.teacher_preset), tokenizer, seed=p.seed, **options)
  return ModelReward.from_hf(location, tokenizer, **options)
