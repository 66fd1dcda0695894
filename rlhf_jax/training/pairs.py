"""Preference data of the pair trainers (RM, DPO), and pairs from a policy's own answers.

`config.data.playground.pairs` = 'policy' samples two answers per prompt from the run's initial
model (`config.model.hf_path`, read as a causal LM even when the run trains a reward model);
a directory samples from the policy saved there. Answers are drawn at temperature 1 with at
most seq_len − max_prompt_len new tokens, so every pair fits the run's rows.
"""

import ml_collections

from rlhf_jax import parallel
from rlhf_jax.data import playground
from rlhf_jax.data.pipeline import make_token_data, make_tokenizer
from rlhf_jax.eval.gold import make_gold, uses_playground_gold
from rlhf_jax.sampling.text import TextSampler
from rlhf_jax.training import loop


def preference_data(config, workdir: str):
  """(tokenizer, gold reward or None, the pairs' TokenData) of a reward-model or DPO run."""
  tokenizer = make_tokenizer(config, workdir)
  gold = make_gold(config, tokenizer) if uses_playground_gold(config) else None
  data = make_token_data(config, workdir, tokenizer, kinds=('preference',), gold=gold,
                         answer_pairs=make_answer_pairs(config, tokenizer))
  return tokenizer, gold, data


def make_answer_pairs(config, tokenizer):
  """`answer_pairs(prompts, split) -> (answers, other answers)`, or None for corruptions."""
  spec = config.data.playground.pairs
  if spec == 'corruptions':
    return None
  policy = ml_collections.ConfigDict(config.to_dict())
  policy.model.head = 'lm'
  if spec != 'policy':
    policy.model.hf_path = spec
  elif not policy.model.hf_path:
    raise ValueError('config.data.playground.pairs="policy" samples the initial model of '
                     'config.model.hf_path, which is empty.')
  mesh = parallel.make_mesh(config.mesh)
  graphdef, params, _ = loop.build_model(policy, mesh)
  sampler = TextSampler(tokenizer, graphdef, mesh=mesh, rules=config.sharding_rules,
                        batch_size=config.train.batch_size,
                        max_prompt_len=config.data.max_prompt_len,
                        max_new_tokens=config.train.seq_len - config.data.max_prompt_len,
                        temperature=1.0)

  def answer_pairs(prompts, split):
    seed = 2 * (config.data.playground.seed * len(playground.SPLITS) + playground.SPLITS[split])
    return (sampler(params, prompts, seed=seed).responses,
            sampler(params, prompts, seed=seed + 1).responses)
  return answer_pairs
