"""Supervised fine-tuning and pretraining: cross-entropy on the target tokens.

SFT examples have loss on their response tokens; text examples (pretraining, or the
"pre-training mix" of an SFT run) on every token. With packing, a token is never predicted
from the previous example's last token. Preference pairs train on their chosen response
(Preferred-FT); the playground's are labelled like the pair trainers' (`preference_data`).
"""

import functools

from rlhf_jax.algorithms.base import Algorithm, DataBatches
from rlhf_jax.algorithms.evaluations import sample_evaluations
from rlhf_jax.algorithms.preferences import make_answer_pairs
from rlhf_jax.losses import sft_loss, token_logprobs
from rlhf_jax.playground.sorting import SortingTask


def sft_loss_fn(model, batch, rng=None, frozen=None, *, normalize: str, chunk_size: int):
  """Runs the model on batch['tokens'] and scores token t+1 from position t."""
  del rng, frozen  # Deterministic, and no other model.
  tokens, segment_ids = batch['tokens'], batch.get('segment_ids')
  hidden, _ = model.hidden_states(tokens, attention_mask=batch['attention_mask'],
                                  positions=batch.get('positions'), segment_ids=segment_ids)
  logps = token_logprobs(hidden[:, :-1], model.unembedding(), tokens[:, 1:],
                         chunk_size=chunk_size)
  mask = batch['loss_mask'][:, 1:].astype(bool)
  if segment_ids is not None:  # The first token of a packed example has no context to score.
    mask &= segment_ids[:, 1:] == segment_ids[:, :-1]
  return sft_loss(logps, mask, normalize=normalize)


def make_loss_fn(config):
  """sft_loss_fn with config.loss.normalize and config.train.logprob_chunk_size."""
  return functools.partial(sft_loss_fn, normalize=config.loss.normalize,
                           chunk_size=config.train.logprob_chunk_size)


def make_algorithm(ctx) -> Algorithm:
  config = ctx.config
  loss_fn = make_loss_fn(config)
  tokenizer, stats, evaluations = None, {}, {}
  if config.data.name == 'sorting':
    data = SortingTask(seq_len=config.train.seq_len, vocab_size=config.model.vocab_size,
                       min_items=config.data.min_items, max_items=config.data.max_items,
                       seed=config.data.seed)
  else:
    tokenizer = ctx.tokenizer
    data = ctx.token_data(kinds=('sft', 'text'), gold=ctx.gold,
                          answer_pairs=make_answer_pairs(ctx))
    stats = data.stats
  model = ctx.initial_model()
  if tokenizer is not None:
    reference = model.copy().params if config.eval.get('kl_to_initial') else None
    evaluations = sample_evaluations(ctx, model.graphdef, reference=reference)
  return Algorithm(model=model, loss_fn=loss_fn, batches=DataBatches.for_run(ctx, data),
                   evaluations=evaluations, data_stats=stats, tokenizer=tokenizer)

