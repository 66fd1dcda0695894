"""TFDS without TensorFlow: prepare a dataset from JSONL files as array_record, read any back.

`prepare_from_jsonl` validates each split's JSONL file with `records.read_jsonl` and writes its
examples, in file order, through TFDS' own `GeneratorBasedBuilder` into array_record files
(which need no TensorFlow), with typed features:

  sft         {'prompt': Sequence({'role': Text, 'content': Text}), 'response': Text}
  preference  {'prompt': Sequence({'role': Text, 'content': Text}), 'chosen': Text,
               'rejected': Text}

The result is an ordinary TFDS dataset: `tfds.data_source(name, split=..., data_dir=...)` reads
it from its files alone. `tfds_records` reads any prepared array_record dataset by name (ours,
or one with other field names through `field_map`) back into validated records.
"""

import functools
import hashlib
import os
import re
from collections.abc import Mapping

import tensorflow_datasets as tfds

from rlhf_jax.data.records import (InvalidExample, Kind, Origin, Records, collect, parse_record,
                                   read_jsonl)
from rlhf_jax.errors import InputError

RESPONSE_FIELDS = {'sft': ('response',), 'preference': ('chosen', 'rejected')}


class JsonlDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Examples of one kind from one JSONL file per split. Like TFDS' own AdhocBuilder, each
  instance carries its dataset's name, so one unregistered class serves every dataset."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for download checksums next to a builder's source file, which needs the
  # `importlib_resources` package that TFDS 4.9.10 does not install on Python >= 3.9
  # (tensorflow/datasets#11212). This builder downloads nothing.
  code_path = None

  def __init__(self, *, name: str, kind: Kind, splits: Mapping[str, str | os.PathLike],
               field_map: Mapping[str, str] | None, skip_invalid: bool, **kwargs):
    self.name = name
    self._kind, self._splits = kind, dict(splits)
    self._field_map, self._skip_invalid = field_map, skip_invalid
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    messages = tfds.features.Sequence({'role': tfds.features.Text(),
                                       'content': tfds.features.Text()})
    texts = {field: tfds.features.Text() for field in RESPONSE_FIELDS[self._kind]}
    sources = ', '.join(f'{split}: {os.fspath(path)}' for split, path in self._splits.items())
    return tfds.core.DatasetInfo(
        builder=self, description=f'{self._kind} examples from JSONL files ({sources}).',
        features=tfds.features.FeaturesDict({'prompt': messages, **texts}),
        disable_shuffling=True)  # Keep the files' order.

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(path) for split, path in self._splits.items()}

  def _generate_examples(self, path):
    records = read_jsonl(path, self._kind, skip_invalid=self._skip_invalid,
                         field_map=self._field_map).records
    for index, record in enumerate(records):
      texts = {field: getattr(record, field) for field in RESPONSE_FIELDS[self._kind]}
      yield index, {'prompt': [message._asdict() for message in record.prompt], **texts}


def prepare_from_jsonl(name: str, kind: Kind, splits: Mapping[str, str | os.PathLike], *,
                       data_dir: str | os.PathLike, field_map: Mapping[str, str] | None = None,
                       skip_invalid: bool = False) -> JsonlDataset:
  """Prepares `data_dir/name/1.0.0` from {split: JSONL path}; returns the builder.

  As always in TFDS, a dataset already prepared there is reused as it is: delete it to prepare
  it again from changed files.
  """
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise InputError(f'name={name!r}: a TFDS dataset name is snake_case ([a-z][a-z0-9_]*).')
  if kind not in RESPONSE_FIELDS:
    raise InputError(f'kind={kind!r}; choose "sft" or "preference".')
  if not splits:
    raise InputError('splits is empty; give {split: JSONL path}.')
  builder = JsonlDataset(name=name, kind=kind, splits=splits, field_map=field_map,
                         skip_invalid=skip_invalid, data_dir=data_dir,
                         file_format='array_record')
  builder.download_and_prepare()
  return builder


def tfds_records(name: str, split: str, *, data_dir: str | os.PathLike, kind: Kind,
                 skip_invalid: bool = False,
                 field_map: Mapping[str, str] | None = None) -> Records:
  """Records of a prepared TFDS dataset, read with `tfds.data_source` (no TensorFlow).

  Each example is validated by `parse_record`; its origin is `tfds:<name>/<split>:<index>`.
  """
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  features = source.dataset_info.features
  path = f'tfds:{name}/{split}'
  parsers = (functools.partial(_parse_example, example, features, kind, Origin(path, index),
                               field_map)
             for index, example in enumerate(source))
  return collect(parsers, source=path, skip_invalid=skip_invalid)


def feature_names(name: str, split: str, *, data_dir: str | os.PathLike) -> list[str]:
  """The top-level feature names of a prepared dataset."""
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  return list(source.dataset_info.features.keys())


def info_digest(name: str, split: str, *, data_dir: str | os.PathLike) -> str:
  """A hash of the dataset's info (version, every shard's length and size) and of `split`."""
  info = tfds.data_source(name, split=split, data_dir=data_dir, download=False).dataset_info
  return hashlib.sha256(f'{split}\n{info.as_json}'.encode()).hexdigest()


def _parse_example(example, features, kind: Kind, origin: Origin,
                   field_map: Mapping[str, str] | None):
  try:
    obj = _plain(example, features)
  except UnicodeDecodeError as e:
    raise InvalidExample(origin, 'invalid_utf8', f'invalid UTF-8 in a text feature: '
                         f'{e.object[e.start:e.end]!r}') from None
  return parse_record(obj, kind, origin, field_map)


def _plain(value, feature):
  """A decoded TFDS example as JSON would give it: bytes → str, and a Sequence of dicts (which
  TFDS returns as a dict of lists) → a list of dicts."""
  if isinstance(feature, tfds.features.FeaturesDict):
    return {key: _plain(value[key], sub) for key, sub in feature.items()}
  if isinstance(feature, tfds.features.Sequence):
    inner = feature.feature
    if isinstance(inner, tfds.features.FeaturesDict):
      columns = {key: [_plain(v, sub) for v in value[key]] for key, sub in inner.items()}
      return [dict(zip(columns, row)) for row in zip(*columns.values())]
    return [_plain(v, inner) for v in value]
  return value.decode('utf-8') if isinstance(value, bytes) else value
