"""Reward model: a scalar head trained with the Bradley-Terry loss on preference pairs.

Batches are [B, 2, T] (chosen, rejected); both go through the model in one [2B, T] forward.
Start it from an SFT model with `--config.model.hf_path=<sft workdir>/hf`: the backbone is
loaded and the scalar head starts at zero.
"""

import functools

import numpy as np

from rlhf_jax.algorithms.base import Algorithm, DataBatches
from rlhf_jax.algorithms.preferences import preference_data
from rlhf_jax.evals.pairs import PairEvaluation
from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.models.scoring import sequence_rewards
from rlhf_jax.playground import tasks
from rlhf_jax.playground.labelers import Labeler


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


def make_loss_fn(config):
  """rm_loss_fn with config.loss.center_coef."""
  return functools.partial(rm_loss_fn, center_coef=config.loss.center_coef)


def make_algorithm(ctx) -> Algorithm:
  config = ctx.config
  data = preference_data(ctx, head='scalar')
  model = ctx.initial_model()
  return Algorithm(model=model, loss_fn=make_loss_fn(config),
                   batches=DataBatches.for_run(ctx, data),
                   evaluations=pair_evaluations(ctx, data, model.graphdef),
                   data_stats=data.stats, tokenizer=ctx.tokenizer)


def pair_evaluations(ctx, data, graphdef) -> dict:
  """Accuracy and calibration on every held-out pair; with a gold reward (the playground's),
  agreement with it and the labelers' ceiling."""
  config = ctx.config
  examples = data.examples('eval')
  gold = texts = labeler = groups = None
  if ctx.gold is not None:
    records = data.records('eval')
    prompts = [r.prompt[-1].content for r in records]
    groups = [tasks.task_of(p) for p in prompts]
    texts = ([r.chosen for r in records], [r.rejected for r in records])
    gold = tuple(np.asarray(ctx.gold(prompts, side), np.float64) for side in texts)
    p = config.data.playground
    labeler = Labeler(p.label_temperature, p.length_bias, p.assertiveness_bias)
  return {'pairs': PairEvaluation(
      examples, score_pairs=pair_rewards, graphdef=graphdef, seq_len=config.train.seq_len,
      pad_id=data.shape.pad_id, mesh=ctx.mesh, rules=ctx.rules,
      batch_size=config.train.batch_size, workdir=ctx.workdir, gold=gold, texts=texts,
      labeler=labeler, groups=groups)}
