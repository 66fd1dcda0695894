"""Reward model: a scalar head trained with the Bradley-Terry loss on preference pairs.

Batches are [B, 2, T] (chosen, rejected); both go through the model in one [2B, T] forward.
Start it from an SFT model with `--config.model.hf_path=<sft workdir>/hf`: the backbone is
loaded and the scalar head starts at zero.
"""

import functools

import numpy as np

from rlhf_jax.data import playground
from rlhf_jax.data.labelers import Labeler
from rlhf_jax.eval.pairs import PairEvaluation
from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.training.algorithm import Algorithm
from rlhf_jax.training.pairs import preference_data
from rlhf_jax.training.scoring import sequence_rewards


def pair_rewards(model, batch):
  """(r_chosen [B], r_rejected [B]) of a [B, 2, T] preference batch, in one forward pass."""
  tokens_Bx2xT = batch['tokens']
  b, _, t = tokens_Bx2xT.shape
  rewards = sequence_rewards(model, tokens_Bx2xT.reshape(2 * b, t),
                             batch['attention_mask'].reshape(2 * b, t)).reshape(b, 2)
  return rewards[:, 0], rewards[:, 1]


def rm_loss_fn(model, batch, rng=None, frozen=None, *, center_coef: float):
  del rng, frozen  # Deterministic, and no other model.
  return bradley_terry_loss(*pair_rewards(model, batch), center_coef=center_coef)


def make_algorithm(config, workdir: str) -> Algorithm:
  if config.model.head != 'scalar':
    raise ValueError(f'A reward model needs config.model.head="scalar", got '
                     f'{config.model.head!r}.')
  tokenizer, gold, data = preference_data(config, workdir)
  loss_fn = functools.partial(rm_loss_fn, center_coef=config.loss.center_coef)
  return Algorithm(loss_fn=loss_fn, data=data, tokenizer=tokenizer, data_stats=data.stats,
                   make_evaluations=pair_evaluations(config, workdir, data, gold))


def pair_evaluations(config, workdir: str, data, gold_fn):
  """Accuracy and calibration on every held-out pair; with a gold reward (the playground's),
  agreement with it and the labelers' ceiling."""
  examples = data.examples('eval')
  gold = texts = labeler = groups = None
  if gold_fn is not None:
    records = data.records('eval')
    prompts = [r.prompt[-1].content for r in records]
    groups = [playground.task_of(p) for p in prompts]
    texts = ([r.chosen for r in records], [r.rejected for r in records])
    gold = tuple(np.asarray(gold_fn(prompts, side), np.float64) for side in texts)
    p = config.data.playground
    labeler = Labeler(p.label_temperature, p.length_bias)

  def make(graphdef, mesh):
    return {'pairs': PairEvaluation(
        examples, score_pairs=pair_rewards, graphdef=graphdef, seq_len=config.train.seq_len,
        pad_id=data.shape.pad_id, mesh=mesh, rules=config.sharding_rules,
        batch_size=config.train.batch_size, workdir=workdir, gold=gold, texts=texts,
        labeler=labeler, groups=groups)}
  return make
