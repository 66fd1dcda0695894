"""From a config's `data` entry to the trainer's data: sources, mixture and batch shape."""

import collections

from rlhf_jax.data.batching import buckets_for
from rlhf_jax.data.datasets import BatchShape, TokenData
from rlhf_jax.data.mixture import Mixture
from rlhf_jax.data.tokenized import tokenized_source
from rlhf_jax.errors import InputError


def make_token_data(config, tokenizer, *, sources: dict[str, str], kinds: tuple[str, ...],
                    cache_dir: str, decay_start: int | None = None) -> TokenData:
  """The mixture of `sources` (config.data.sources' names, each a jsonl:, tfds: or hf: spec),
  tokenized into stores in `cache_dir` once; each source's kind must be in `kinds`. With
  config.data.decay_weights the mixture switches to them at step `decay_start` (the schedule's
  decay stage: "midtraining")."""
  data, train = config.data, config.train
  if set(data.weights) != set(sources):
    raise InputError(f'config.data.weights names {sorted(data.weights)}; config.data.sources '
                     f'names {sorted(sources)}.')
  splits, records = {'train': {}, 'eval': {}}, {}
  stats = collections.Counter()
  for name, spec in sources.items():
    source = tokenized_source(spec, kinds, tokenizer, config=config, cache_dir=cache_dir,
                              key=f'config.data.sources.{name}')
    for split in splits:
      splits[split][name] = source.examples[split]
    records[name] = source.records
    stats.update({f'data/{name}/{k}': v for k, v in source.stats.items()})
  decay_weights = data.decay_weights.to_dict() if data.decay_weights else None
  mixture = Mixture(data.weights.to_dict(), train.batch_size, seed=data.seed,
                    switch_step=decay_start if decay_weights else None,
                    weights_after=decay_weights)
  shape = BatchShape(batch_size=train.batch_size,
                     buckets=buckets_for(train.seq_len, data.buckets),
                     pad_id=tokenizer.pad_token_id, packing=data.packing)
  return TokenData(splits, mixture, shape, seed=data.seed, stats=stats, records=records)
