"""Sources tokenized once, in worker processes, into on-disk stores (`store.py`).

A source's store is named by a hash of all that decides its tokens: the source's bytes
(`sources.source_digest`), the tokenizer (its vocabulary, merges, specials and chat template),
the encoding options and the hold-out split. A rerun, a resumed run, or another run on the same
data with the same cache directory reads it back without tokenizing; a changed file, tokenizer
or option builds a new store next to the old one.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence

from absl import logging
from tqdm import tqdm

from rlhf_jax.data import SPLITS
from rlhf_jax.data.records import Record, Records
from rlhf_jax.data.sources import (EncodeOptions, encode_records, encoded_kind, read_records,
                                   source_digest, source_kind)
from rlhf_jax.data.store import Store, Examples, StoreWriter
from rlhf_jax.errors import InputError

CHUNK = 2000  # Records per task of a worker.
PARALLEL_FROM = 50_000  # Records from which 'auto' tokenizes in worker processes.


@dataclasses.dataclass
class TokenizedSource:
  """A source's kind, its stored examples per split, and counts of cut and skipped examples.

  `records(split)` reads the source again for the record of each example (for evaluations that
  need the text); the store holds only tokens.
  """
  kind: str
  examples: dict[str, Examples]
  stats: dict[str, int]
  records: Callable[[str], list[Record]]


def tokenized_source(spec: str, kinds: tuple[str, ...], tokenizer, *, config, cache_dir: str,
                     key: str) -> TokenizedSource:
  """The store of `spec` in `cache_dir`, built first if it is not there."""
  data = config.data
  kind = source_kind(spec, kinds, data=data, key=key)
  encoded = encoded_kind(kind, kinds)
  options = EncodeOptions.of(config)
  fingerprint = json.dumps({
      'source': source_digest(spec, data=data, key=key), 'kind': kind, 'encoded': encoded,
      'tokenizer': tokenizer_fingerprint(tokenizer), 'options': dataclasses.asdict(options),
      'split': {'eval_fraction': data.eval_fraction, 'seed': data.seed,
                'splits': dict(data.splits)}, 'field_map': dict(data.field_map or {})},
      sort_keys=True)
  path = os.path.join(cache_dir, f'{encoded}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:20]}')
  read = functools.cache(lambda: read_records(spec, kind, data=data, key=key))
  if not Store.exists(path):
    _build(path, read(), encoded, tokenizer, options, workers=_workers(data.tokenize_workers),
           key=key)
  else:
    logging.info('%s: tokenized examples from %s', key, path)
  store = Store(path)
  examples = {split: store.split(split) for split in SPLITS}

  def records(split: str) -> list[Record]:
    source_records = read()[split].records
    return [source_records[i] for i in examples[split].record_index]
  return TokenizedSource(encoded, examples, store.stats, records)


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of what a tokenizer maps text to: its model (vocabulary, merges, normalisation,
  pre-tokenisation), its special tokens and its chat template."""
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  model = (backend.to_str() if backend is not None
           else json.dumps(sorted(tokenizer.get_vocab().items())))
  specials = {name: getattr(tokenizer, f'{name}_token_id', None)
              for name in ('bos', 'eos', 'pad', 'unk')}
  description = json.dumps([type(tokenizer).__name__, model, specials,
                            tokenizer.chat_template], sort_keys=True)
  return hashlib.sha256(description.encode()).hexdigest()


def _workers(setting: int) -> int | None:
  """config.data.tokenize_workers: N processes, or 0 for one per CPU on large sources."""
  if setting < 0:
    raise InputError(f'config.data.tokenize_workers={setting} must be >= 0 (0: automatic).')
  return setting or None


def _build(path: str, records: dict[str, Records], kind: str, tokenizer,
           options: EncodeOptions, *, workers: int | None, key: str) -> None:
  writer = StoreWriter(path, kind=kind,
                       pieces_per_example=2 if kind in ('preference', 'unpaired') else 1)
  stats = {}
  try:
    for split in SPLITS:
      split_records = records[split].records
      for reason, n in records[split].skipped.items():
        stats[f'skipped/{reason}'] = stats.get(f'skipped/{reason}', 0) + n
      chunks = _encoded_chunks(split_records, kind, tokenizer, options, workers=workers,
                               desc=f'{key} ({split})')
      count = 0

      def counted(chunks):
        nonlocal count
        for chunk in chunks:
          count += len(chunk.examples)
          for name, n in chunk.stats.items():
            stats[name] = stats.get(name, 0) + n
          yield chunk.examples, chunk.record_index, chunk.labels
      writer.write_split(split, counted(chunks))
      if not count:
        raise InputError(f'{key}: no valid {split} examples in this source.')
  except BaseException:
    writer.abort()
    raise
  writer.close(stats)


def _encoded_chunks(records: Sequence[Record], kind: str, tokenizer, options: EncodeOptions, *,
                    workers: int | None, desc: str) -> Iterator[tuple]:
  """encode_records over chunks of CHUNK records, in order; in worker processes when asked
  (or, for `workers=None`, when the source has PARALLEL_FROM records or more)."""
  starts = range(0, len(records), CHUNK)
  if workers is None:
    workers = os.cpu_count() if len(records) >= PARALLEL_FROM else 1
  with contextlib.ExitStack() as stack:
    if workers > 1:  # Spawned, not forked: the parent may hold JAX's threads.
      pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context('spawn'), initializer=_start_worker,
          initargs=(kind, tokenizer, options)))
      chunks = pool.map(_encode_in_worker, [(records[s:s + CHUNK], s) for s in starts])
    else:
      chunks = (encode_records(records[s:s + CHUNK], s, kind, tokenizer, options)
                for s in starts)
    bar = stack.enter_context(tqdm(total=len(records), desc=f'Tokenizing {desc}', unit='ex',
                                   leave=False, disable=len(records) < PARALLEL_FROM))
    for start, chunk in zip(starts, chunks):
      yield chunk
      bar.update(min(CHUNK, len(records) - start))


_WORKER: dict = {}


def _start_worker(kind: str, tokenizer, options: EncodeOptions) -> None:
  _WORKER.update(kind=kind, tokenizer=tokenizer, options=options)


def _encode_in_worker(task: tuple[Sequence[Record], int]):
  records, start = task
  return encode_records(records, start, _WORKER['kind'], _WORKER['tokenizer'],
                        _WORKER['options'])
