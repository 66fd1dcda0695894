"""Supervised fine-tuning and pretraining: cross-entropy on the target tokens.

SFT examples have loss on their response tokens; text examples (pretraining, or the
"pre-training mix" of an SFT run) on every token. With packing, a token is never predicted
from the previous example's last token.
"""

import functools

from rlhf_jax.data import playground
from rlhf_jax.data.pipeline import make_token_data, make_tokenizer
from rlhf_jax.data.synthetic import SortingTask
from rlhf_jax.eval.generation import GoldRewardOfSamples
from rlhf_jax.eval.gold import make_gold, uses_playground_gold
from rlhf_jax.losses import sft_loss, token_logprobs
from rlhf_jax.training.algorithm import Algorithm


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


def make_algorithm(config, workdir: str) -> Algorithm:
  loss_fn = functools.partial(sft_loss_fn, normalize=config.loss.normalize,
                              chunk_size=config.train.logprob_chunk_size)
  if config.data.name == 'sorting':
    data = SortingTask(seq_len=config.train.seq_len, vocab_size=config.model.vocab_size,
                       min_items=config.data.min_items, max_items=config.data.max_items,
                       seed=config.data.seed)
    return Algorithm(loss_fn=loss_fn, data=data)
  tokenizer = make_tokenizer(config, workdir)
  data = make_token_data(config, workdir, tokenizer, kinds=('sft', 'text'))
  return Algorithm(loss_fn=loss_fn, data=data, tokenizer=tokenizer, data_stats=data.stats,
                   make_evaluations=sample_evaluations(config, workdir, tokenizer))


def sample_evaluations(config, workdir: str, tokenizer, make_reference=None, gold=None,
                       proxy=None):
  """config.eval.gold == 'playground': gold reward of sampled answers to held-out prompts.

  make_reference(mesh) -> reference params adds win rate and KL against that policy; gold is
  the run's gold reward where it already has one; proxy(prompts, responses), a reward model,
  adds their proxy reward.
  """
  ev = config.eval
  if not uses_playground_gold(config):
    return None
  gold = gold or make_gold(config, tokenizer)
  prompts = playground.sample_prompts(config.data.playground.seed, 'eval', ev.num_prompts)

  def make(graphdef, mesh):
    reference = None if make_reference is None else functools.partial(make_reference, mesh)
    return {'samples': GoldRewardOfSamples(
        prompts, tokenizer, graphdef, gold_fn=gold,
        groups=[playground.task_of(p) for p in prompts], mesh=mesh,
        rules=config.sharding_rules, batch_size=config.train.batch_size,
        max_prompt_len=config.data.max_prompt_len, max_new_tokens=ev.max_new_tokens,
        temperature=ev.temperature, seed=config.seed, workdir=workdir, reference=reference,
        chunk_size=config.train.logprob_chunk_size, proxy_fn=proxy)}
  return make
