"""SFT as an algorithm of the generic trainer: next-token cross-entropy on response tokens.

With `loss_mask` = every real token this is language-model pretraining.
"""

import functools

from rlhf_jax.data.synthetic import SortingTask
from rlhf_jax.losses import sft_loss, token_logprobs
from rlhf_jax.training.algorithm import Algorithm


def sft_loss_fn(model, batch, rng, *, normalize: str, chunk_size: int):
  """Runs the model on batch['tokens'] and scores token t+1 from position t."""
  del rng  # Deterministic loss.
  tokens = batch['tokens']
  hidden, _ = model.hidden_states(tokens, attention_mask=batch['attention_mask'],
                                  segment_ids=batch.get('segment_ids'))
  logps = token_logprobs(hidden[:, :-1], model.unembedding(), tokens[:, 1:],
                         chunk_size=chunk_size)
  return sft_loss(logps, batch['loss_mask'][:, 1:], normalize=normalize)


def make_algorithm(config) -> Algorithm:
  if config.data.name != 'sorting':
    raise ValueError(f'config.data.name={config.data.name!r}; the SFT trainer knows "sorting".')
  data = SortingTask(seq_len=config.train.seq_len, vocab_size=config.model.vocab_size,
                     min_items=config.data.min_items, max_items=config.data.max_items,
                     seed=config.data.seed)
  loss_fn = functools.partial(sft_loss_fn, normalize=config.loss.normalize,
                              chunk_size=config.train.logprob_chunk_size)
  return Algorithm(loss_fn=loss_fn, data=data)
