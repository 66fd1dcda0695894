"""Data sources named in a config, read, validated and tokenized into examples.

`config.data.sources` maps a name to a spec; `config.data.weights` mixes them:

    jsonl:PATH           a JSONL file; with '{split}' in PATH one file per split, otherwise
                         config.data.eval_fraction of it (a seeded choice) is held out for eval
    tfds:NAME            a prepared TFDS dataset, read with tfds.data_source (no TensorFlow);
                         splits named by config.data.tfds_splits, from config.data.tfds_data_dir

The playground's generated data reach this module as JSONL files like any user's
(`rlhf_jax.playground.files`), so the built-in data exercise the real loading path.
"""

import collections
import dataclasses
import json
import math
import os

import numpy as np
from absl import logging

from rlhf_jax.data import SPLITS, tfds_source
from rlhf_jax.data.batching import Piece
from rlhf_jax.data.datasets import Example
from rlhf_jax.data.encoding import encode_preference, encode_sft
from rlhf_jax.data.records import InvalidExample, Records, read_jsonl
from rlhf_jax.errors import InputError, NotFound

KINDS = ('sft', 'preference', 'text')


def parse_spec(spec: str, key: str) -> tuple[str, str]:
  scheme, _, location = spec.partition(':')
  if scheme not in ('jsonl', 'tfds') or not location:
    raise InputError(f'{key}={spec!r}: expected "jsonl:PATH", "tfds:NAME" or, on the '
                     f'playground, "playground:KIND" with KIND one of {KINDS}.')
  return scheme, location


def read_source(spec: str, kinds: tuple[str, ...], *, data, key: str
                ) -> tuple[str, dict[str, Records]]:
  """(kind, records of both splits) of one source. `data` is the config's `data` entry.

  The kind is read off the fields of the first example: "chosen" → preference, "text" → text,
  otherwise sft. It must be one of `kinds`.
  """
  scheme, location = parse_spec(spec, key)
  if scheme == 'tfds':
    kind = kind_of_fields(tfds_source.feature_names(location, data.tfds_splits['train'],
                                                    data_dir=data.tfds_data_dir))
  else:
    kind = kind_of_fields(_first_object(location.format(split='train')))
  if kind not in kinds:
    raise InputError(f'{key}={spec!r} holds {kind!r} examples; this trainer reads {kinds}.')
  if scheme == 'tfds':
    return kind, {split: tfds_source.tfds_records(
        location, data.tfds_splits[split], data_dir=data.tfds_data_dir, kind=kind,
        skip_invalid=data.skip_invalid) for split in SPLITS}
  if '{split}' in location:
    return kind, {split: read_jsonl(location.format(split=split), kind,
                                    skip_invalid=data.skip_invalid) for split in SPLITS}
  return kind, _hold_out(read_jsonl(location, kind, skip_invalid=data.skip_invalid),
                         data.eval_fraction, seed=data.seed, key=key)


def kind_of_fields(fields) -> str:
  fields = set(fields)
  return 'preference' if 'chosen' in fields else 'text' if 'text' in fields else 'sft'


def _first_object(path: str) -> dict:
  """The first example of a JSONL file, or {} if it does not parse (the reader then says why)."""
  if not os.path.exists(path):
    raise NotFound(f'No such JSONL file: {path}')
  with open(path, 'rb') as f:
    for line in f:
      if line.strip():
        try:
          obj = json.loads(line)
        except ValueError:
          return {}
        return obj if isinstance(obj, dict) else {}
  return {}


def _hold_out(records: Records, fraction: float, *, seed: int, key: str) -> dict[str, Records]:
  n = len(records.records)
  n_eval = math.ceil(n * fraction)
  if not 0 < n_eval < n:
    raise InputError(f'{key}: config.data.eval_fraction={fraction} of {n} examples leaves an '
                     'empty split; give a file per split with "{split}" in the path.')
  eval_rows = set(np.random.default_rng([seed, 5]).permutation(n)[:n_eval].tolist())
  # The file's skipped examples are counted once, with the train split.
  split = lambda keep, skipped: Records([r for i, r in enumerate(records.records) if keep(i)],
                                        skipped)
  return {'train': split(lambda i: i not in eval_rows, records.skipped),
          'eval': split(lambda i: i in eval_rows, collections.Counter())}


@dataclasses.dataclass
class EncodedSplits:
  """Examples per split of one source, the record of each, and what was skipped or cut."""
  examples: dict[str, list[Example]]
  records: dict[str, list]
  stats: collections.Counter


def encode_source(records: dict[str, Records], kind: str, tokenizer, *, data,
                  seq_len: int) -> EncodedSplits:
  """Token pieces of every example; invalid ones raise, or are counted when skip_invalid."""
  stats = collections.Counter()
  examples, origins = {}, {}
  for split, recs in records.items():
    stats.update({f'skipped/{reason}': n for reason, n in recs.skipped.items()})
    examples[split], origins[split] = [], []
    for record in recs.records:
      try:
        encoded = _encode(record, kind, tokenizer, data=data, seq_len=seq_len, stats=stats)
        examples[split] += encoded
        origins[split] += [record] * len(encoded)
      except InvalidExample as e:
        if not data.skip_invalid:
          raise
        logging.warning('Skipped %s', e)
        stats[f'skipped/{e.reason}'] += 1
    if not examples[split]:
      raise InputError(f'No valid {split} examples in this source.')
  return EncodedSplits(examples, origins, stats)


def _encode(record, kind: str, tokenizer, *, data, seq_len: int, stats) -> list[Example]:
  if kind == 'text':  # Pretraining: documents cut into rows of seq_len, loss on every token.
    ids = tokenizer.encode(record.text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [(_piece([], ids[i:i + seq_len]),) for i in range(0, len(ids), seq_len)]
  options = dict(seq_len=seq_len, max_prompt_len=data.max_prompt_len,
                 truncation=data.truncation)
  if kind == 'sft':
    encoded = encode_sft(record, tokenizer, **options)
    stats.update(f'truncated/{part}' for part in encoded.truncated)
    return [(_piece(encoded.prompt_ids, encoded.response_ids),)]
  encoded = encode_preference(record, tokenizer, **options)
  stats.update(f'truncated/{part}' for part in encoded.truncated)
  return [(_piece(encoded.prompt_ids, encoded.chosen_ids),
           _piece(encoded.prompt_ids, encoded.rejected_ids))]


def _piece(prompt_ids, response_ids) -> Piece:
  ids = np.asarray(list(prompt_ids) + list(response_ids), np.int32)
  mask = np.zeros(len(ids), np.int32)
  mask[len(prompt_ids):] = 1
  return ids, mask
