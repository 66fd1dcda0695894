"""Data sources named in a config, read, validated and tokenized into examples.

`config.data.sources` maps a name to a spec; `config.data.weights` mixes them:

    jsonl:PATH           a JSONL file; with '{split}' in PATH one file per split, otherwise
                         config.data.eval_fraction of it (a seeded choice) is held out for eval
    tfds:NAME            a prepared TFDS dataset, read with tfds.data_source (no TensorFlow);
                         splits named by config.data.splits, from config.data.tfds_data_dir
    hf:DIR               a Hugging Face dataset's parquet or arrow files in DIR (local or a URL
                         such as gs://…), splits named by config.data.splits

The playground's generated data reach this module as JSONL files like any user's
(`rlhf_jax.playground.files`), so the built-in data exercise the real loading path.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from absl import logging

from rlhf_jax.data import SPLITS, hf_source, tfds_source
from rlhf_jax.data.batching import Piece
from rlhf_jax.data.encoding import encode_preference, encode_sft
from rlhf_jax.data.records import (FIELDS, InvalidExample, PreferenceRecord, Record, Records,
                                   SFTRecord, UnpairedRecord, read_jsonl)
from rlhf_jax.data.store import Example
from rlhf_jax.errors import InputError, NotFound

KINDS = ('sft', 'preference', 'unpaired', 'text')
SCHEMES = ('jsonl', 'tfds', 'hf')


def parse_spec(spec: str, key: str) -> tuple[str, str]:
  scheme, _, location = spec.partition(':')
  if scheme not in SCHEMES or not location:
    raise InputError(f'{key}={spec!r}: expected "jsonl:PATH", "tfds:NAME", "hf:DIR" or, on the '
                     f'playground, "playground:KIND" with KIND one of {KINDS}.')
  return scheme, location


def source_kind(spec: str, kinds: tuple[str, ...], *, data, key: str) -> str:
  """The kind of a source's examples, read off the fields of the first one (named through
  config.data.field_map): "chosen" → preference, "label" → unpaired, "text" → text, otherwise
  sft. A trainer reads the kinds in `kinds`, and one of unpaired examples also reads preference
  pairs (`encoded_kind`)."""
  scheme, location = parse_spec(spec, key)
  if scheme == 'tfds':
    fields = tfds_source.feature_names(location, data.splits['train'],
                                       data_dir=data.tfds_data_dir)
  elif scheme == 'hf':
    fields = hf_source.column_names(location, data.splits['train'])
  else:
    fields = _first_object(location.format(split='train'))
  ours = {theirs: our for our, theirs in field_map(data).items()}
  kind = kind_of_fields(ours.get(field, field) for field in fields)
  if kind not in kinds and encoded_kind(kind, kinds) not in kinds:
    raise InputError(f'{key}={spec!r} holds {kind!r} examples; this trainer reads {kinds}.')
  return kind


def encoded_kind(kind: str, kinds: tuple[str, ...]) -> str:
  """The kind of example a source of `kind` gives a trainer of `kinds`: its own, except that
  preference pairs read by a trainer of unpaired examples (KTO) give two each, the chosen
  response desirable and the rejected one not (TRL's `unpair_preference_dataset`), and read
  by an SFT trainer give their chosen response (Rafailov et al. 2023's "Preferred-FT")."""
  if kind == 'preference' and 'preference' not in kinds:
    return 'unpaired' if 'unpaired' in kinds else 'sft' if 'sft' in kinds else kind
  return kind


def field_map(data, kind: str | None = None) -> dict[str, str]:
  """config.data.field_map (our field name -> the data's), only `kind`'s fields if given."""
  mapping = dict(data.get('field_map') or {})
  known = {name for names in FIELDS.values() for name in names}
  if set(mapping) - known:
    raise InputError(f'config.data.field_map names {sorted(set(mapping) - known)}; our fields '
                     f'are {", ".join(sorted(known))}.')
  return {k: v for k, v in mapping.items() if kind is None or k in FIELDS[kind]}


def read_records(spec: str, kind: str, *, data, key: str) -> dict[str, Records]:
  """The validated records of both splits of a source of `kind` examples."""
  scheme, location = parse_spec(spec, key)
  options = dict(kind=kind, skip_invalid=data.skip_invalid, field_map=field_map(data, kind))
  if scheme == 'tfds':
    return {split: tfds_source.tfds_records(location, data.splits[split],
                                            data_dir=data.tfds_data_dir, **options)
            for split in SPLITS}
  if scheme == 'hf':
    return {split: hf_source.hf_records(location, data.splits[split], **options)
            for split in SPLITS}
  if '{split}' in location:
    return {split: read_jsonl(location.format(split=split), **options) for split in SPLITS}
  return _hold_out(read_jsonl(location, **options), data.eval_fraction, seed=data.seed, key=key)


def source_digest(spec: str, *, data, key: str) -> str:
  """A hash of the bytes a source's examples come from: its JSONL files, its TFDS dataset's
  info (which lists every shard's length), or its parquet/arrow files' sizes and times."""
  scheme, location = parse_spec(spec, key)
  digest = hashlib.sha256(spec.encode())
  if scheme == 'tfds':
    for split in SPLITS:
      digest.update(tfds_source.info_digest(location, data.splits[split],
                                            data_dir=data.tfds_data_dir).encode())
  elif scheme == 'hf':
    for split in SPLITS:
      digest.update(hf_source.files_digest(location, data.splits[split]).encode())
  else:
    paths = ([location.format(split=split) for split in SPLITS] if '{split}' in location
             else [location])
    for path in paths:
      if not os.path.exists(path):
        raise NotFound(f'{key}={spec!r}: no such JSONL file: {path}')
      with open(path, 'rb') as f:
        digest.update(hashlib.file_digest(f, 'sha256').digest())
  return digest.hexdigest()


def kind_of_fields(fields) -> str:
  fields = set(fields)
  if 'chosen' in fields:
    return 'preference'
  return 'unpaired' if 'label' in fields else 'text' if 'text' in fields else 'sft'


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


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
  """What besides the tokenizer decides an example's tokens (config.data and config.train)."""
  seq_len: int
  max_prompt_len: int
  truncation: str
  skip_invalid: bool
  train_turns: str = 'all'

  @classmethod
  def of(cls, config) -> 'EncodeOptions':
    data = config.data
    return cls(config.train.seq_len, data.max_prompt_len, data.truncation, data.skip_invalid,
               data.train_turns)


class EncodedChunk(NamedTuple):
  """Examples of consecutive records, the index of each one's record, each one's label
  (unpaired examples: 1 desirable, 0 undesirable; empty for other kinds), and counts of cut and
  skipped examples."""
  examples: list[Example]
  record_index: list[int]
  labels: list[int]
  stats: collections.Counter


def encode_records(records: Sequence[Record], first_index: int, kind: str, tokenizer,
                   options: EncodeOptions) -> EncodedChunk:
  """The `kind` examples (`encoded_kind`) of records numbered from `first_index`; an invalid
  record raises, or is counted with skip_invalid."""
  chunk = EncodedChunk([], [], [], collections.Counter())
  for index, record in enumerate(records, start=first_index):
    try:
      encoded = _encode(record, kind, tokenizer, options=options, stats=chunk.stats)
    except InvalidExample as e:
      if not options.skip_invalid:
        raise
      logging.warning('Skipped %s', e)
      chunk.stats[f'skipped/{e.reason}'] += 1
      continue
    if kind == 'unpaired':
      encoded, labels = zip(*encoded)
      chunk.labels.extend(labels)
    chunk.examples.extend(encoded)
    chunk.record_index.extend([index] * len(encoded))
  return chunk


def _encode(record, kind: str, tokenizer, *, options: EncodeOptions, stats) -> list:
  """The record's examples; for kind 'unpaired', (example, label) pairs."""
  seq_len = options.seq_len
  if kind == 'text':  # Pretraining: documents cut into rows of seq_len, loss on every token.
    ids = tokenizer.encode(record.text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [(_piece([], ids[i:i + seq_len]),) for i in range(0, len(ids), seq_len)]
  fit = dict(seq_len=seq_len, max_prompt_len=options.max_prompt_len,
             truncation=options.truncation)
  if kind == 'sft':
    if isinstance(record, PreferenceRecord):  # Preferred-FT: the chosen response.
      record = SFTRecord(record.prompt, record.chosen, record.origin)
    encoded = encode_sft(record, tokenizer, **fit, train_turns=options.train_turns)
    stats.update(f'truncated/{part}' for part in encoded.truncated)
    return [(_piece(encoded.prompt_ids, encoded.response_ids, encoded.prompt_mask),)]
  if kind == 'unpaired' and isinstance(record, UnpairedRecord):
    encoded = encode_sft(SFTRecord(record.prompt, record.completion, record.origin), tokenizer,
                         **fit, train_turns='last')
    stats.update(f'truncated/{part}' for part in encoded.truncated)
    return [(_prompt_and_completion(encoded.prompt_ids, encoded.response_ids),
             int(record.desirable))]
  encoded = encode_preference(record, tokenizer, **fit)
  stats.update(f'truncated/{part}' for part in encoded.truncated)
  if kind == 'unpaired':
    return [(_prompt_and_completion(encoded.prompt_ids, encoded.chosen_ids), 1),
            (_prompt_and_completion(encoded.prompt_ids, encoded.rejected_ids), 0)]
  return [(_piece(encoded.prompt_ids, encoded.chosen_ids),
           _piece(encoded.prompt_ids, encoded.rejected_ids))]


def _prompt_and_completion(prompt_ids, completion_ids) -> Example:
  """An unpaired example's two pieces: the prompt (no loss) and the completion (loss), which
  batches join into one sequence, and also join to other examples' prompts (KTO's KL pairs)."""
  return _piece(prompt_ids, []), _piece([], completion_ids)


def _piece(prompt_ids, response_ids, prompt_mask=()) -> Piece:
  """Ids of prompt + response; the loss mask is 1 on the response (and where prompt_mask is)."""
  ids = np.asarray(list(prompt_ids) + list(response_ids), np.int32)
  mask = np.zeros(len(ids), np.int32)
  mask[:len(prompt_mask)] = prompt_mask
  mask[len(prompt_ids):] = 1
  return ids, mask
