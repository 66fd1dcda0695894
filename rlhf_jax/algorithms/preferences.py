"""Preference data of the pair trainers (RM, DPO), and pairs from a policy's own answers.

`config.data.playground.pairs` = 'policy' samples two answers per prompt from the run's initial
model (`config.model.hf_path`, read as a causal LM even when the run trains a reward model);
a directory samples from the policy saved there. Answers are drawn at
`config.data.playground.pair_temperature` (1: the policy's own distribution) with at most
seq_len − max_prompt_len new tokens, so every pair fits the run's rows.
"""

import functools

from rlhf_jax.data import SPLITS
from rlhf_jax.errors import InputError
from rlhf_jax.sampling.text import TextSampler


def preference_data(ctx, *, head: str, kinds: tuple[str, ...] = ('preference',)):
  """The pairs' TokenData of a run that trains a `head` model on them (a reward model:
  'scalar', DPO's policy: 'lm'), labelled by the run's gold (default: the playground's
  program); kinds=('unpaired',) reads them, and KTO files, as unpaired examples."""
  if ctx.config.model.head != head:
    raise InputError(f'config.algorithm={ctx.config.algorithm!r} trains a model with '
                     f'config.model.head="{head}", got {ctx.config.model.head!r}.')
  return ctx.token_data(kinds=kinds, gold=ctx.gold,
                        answer_pairs=make_answer_pairs(ctx))


def make_answer_pairs(ctx):
  """`answer_pairs(prompts, split) -> (answers, other answers)`, or None for corruptions.

  The policy is loaded only when a pair file is written; the run keeps it when it is the
  policy the run starts from (DPO), so that its checkpoint is read once.
  """
  config = ctx.config
  spec = config.data.playground.pairs
  if spec == 'corruptions':
    return None
  path = config.model.hf_path if spec == 'policy' else spec
  if not path:
    raise InputError('config.data.playground.pairs="policy" samples the initial model of '
                     'config.model.hf_path, which is empty.')

  @functools.cache
  def policy():
    own = path == config.model.hf_path and config.model.head == 'lm'
    graphdef, params, _ = ctx.load(path, head='lm', keep=own)
    return params, TextSampler(
        ctx.tokenizer, graphdef, mesh=ctx.mesh, rules=ctx.rules,
        batch_size=config.train.batch_size, max_prompt_len=config.data.max_prompt_len,
        max_new_tokens=config.train.seq_len - config.data.max_prompt_len,
        temperature=config.data.playground.pair_temperature)

  def answer_pairs(prompts, split):
    params, sampler = policy()
    seed = 2 * (config.data.playground.seed * len(SPLITS) + SPLITS.index(split))
    return (sampler(params, prompts, seed=seed).responses,
            sampler(params, prompts, seed=seed + 1).responses)
  return answer_pairs
