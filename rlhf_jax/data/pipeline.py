"""From a config to the trainer's data: tokenizer, sources, mixture and batch shape.

The playground's tokenizer and data are built once into `<workdir>/data`; for a workdir on
shared storage (a URL), into a local directory of each host instead (`local_cache_dir`).
"""

import collections
import os

from rlhf_jax.data.batching import buckets_for
from rlhf_jax.data.datasets import BatchShape, TokenData
from rlhf_jax.data.mixture import Mixture, decay_start_step
from rlhf_jax.data.sources import encode_source, read_source
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.models import read_hf_config
from rlhf_jax.storage import local_cache_dir


def make_tokenizer(config, workdir: str):
  """config.data.tokenizer: a directory, 'playground', or '' for config.model.hf_path's.

  Its ids must fit the model's embedding: config.model.vocab_size, or the checkpoint's
  vocab_size when the model is loaded from config.model.hf_path.
  """
  model = config.model
  spec = config.data.tokenizer or model.hf_path
  if not spec:
    raise ValueError('config.data.tokenizer is empty and there is no config.model.hf_path to '
                     'take a tokenizer from.')
  tokenizer = load_tokenizer(spec, cache_dir=local_cache_dir(os.path.join(workdir, 'data')),
                             seed=config.data.playground.seed)
  if model.hf_path:
    vocab_size = read_hf_config(model.hf_path, head=model.head).vocab_size
    where = f'the checkpoint config.model.hf_path={model.hf_path!r} has vocab_size={vocab_size}'
  else:
    vocab_size = model.vocab_size
    where = f'config.model.vocab_size={vocab_size}'
  if len(tokenizer) > vocab_size:
    raise ValueError(f'The tokenizer has {len(tokenizer)} tokens but {where}.')
  return tokenizer


def make_token_data(config, workdir: str, tokenizer, *, kinds: tuple[str, ...],
                    gold=None, answer_pairs=None) -> TokenData:
  """The mixture of config.data.sources, tokenized; each source's kind must be in `kinds`.

  gold: the gold reward that labels playground preference pairs (default: the program);
  answer_pairs: a policy's two answers per prompt for them (default: corruptions).
  """
  data, train = config.data, config.train
  if set(data.weights) != set(data.sources):
    raise ValueError(f'config.data.weights names {sorted(data.weights)}; config.data.sources '
                     f'names {sorted(data.sources)}.')
  splits, records = {'train': {}, 'eval': {}}, {'train': {}, 'eval': {}}
  stats = collections.Counter()
  for name, spec in data.sources.items():
    kind, source_records = read_source(spec, kinds, data=data,
                                       cache_dir=local_cache_dir(os.path.join(workdir, 'data')),
                                       key=f'config.data.sources.{name}', gold=gold,
                                       answer_pairs=answer_pairs)
    encoded = encode_source(source_records, kind, tokenizer, data=data, seq_len=train.seq_len)
    for split in splits:
      splits[split][name] = encoded.examples[split]
      records[split][name] = encoded.records[split]
    stats.update({f'data/{name}/{k}': v for k, v in encoded.stats.items()})
  decay_weights = data.decay_weights.to_dict() if data.decay_weights else None
  mixture = Mixture(data.weights.to_dict(), train.batch_size, seed=data.seed,
                    switch_step=decay_start_step(config.optim, train.steps) if decay_weights
                    else None, weights_after=decay_weights)
  shape = BatchShape(batch_size=train.batch_size, buckets=buckets_for(train.seq_len, data.buckets),
                     pad_id=tokenizer.pad_token_id, packing=data.packing)
  return TokenData(splits, mixture, shape, seed=data.seed, stats=stats, records=records)
