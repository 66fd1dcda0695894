"""A Hugging Face dataset's parquet or arrow files, on local disk or at a URL (gs://…, fsspec).

`hf:DIR` names a directory as the Hub stores a dataset or `datasets.save_to_disk` writes one;
the files of split S are the parquet (`.parquet`) or arrow (`.arrow`, IPC stream or file)
files under DIR whose name starts with S (`data/train-00000-of-00002.parquet`) or that lie in
a folder named S (`train/data-00000-of-00001.arrow`), read in name order. Rows are validated
by `records.parse_record` like JSONL lines; a row's origin is `<file>:<1-based row>`.
"""

import functools
import hashlib
import posixpath
import re
from collections.abc import Mapping

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_jax.data.records import Kind, Origin, Records, collect, parse_record
from rlhf_jax.errors import NotFound

EXTENSIONS = ('.parquet', '.arrow')


def split_files(location: str, split: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
  """(filesystem, the split's files in name order); NotFound names what was looked for."""
  fs, root = fsspec.core.url_to_fs(location)
  if not fs.isdir(root):
    raise NotFound(f'hf:{location}: no such directory.')
  found = [path for path in fs.find(root) if path.endswith(EXTENSIONS)
           and _in_split(posixpath.relpath(path, root), split)]
  if not found:
    raise NotFound(f'hf:{location}: no {" or ".join(EXTENSIONS)} files of split {split!r} '
                   f'(named "{split}-*" or in a folder "{split}/").')
  return fs, sorted(found)


def _in_split(relative: str, split: str) -> bool:
  *folders, name = relative.split('/')
  return split in folders or re.match(rf'{re.escape(split)}([-_.]|$)', name) is not None


def column_names(location: str, split: str) -> list[str]:
  fs, files = split_files(location, split)
  return list(_schema(fs, files[0]).names)


def files_digest(location: str, split: str) -> str:
  """A hash of the split's file names, sizes and modification times (no read of the data)."""
  fs, files = split_files(location, split)
  digest = hashlib.sha256(split.encode())
  for path in files:
    info = fs.info(path)
    stamp = info.get('mtime') or info.get('updated') or info.get('etag') or ''
    digest.update(f'{path}\n{info.get("size")}\n{stamp}\n'.encode())
  return digest.hexdigest()


def hf_records(location: str, split: str, *, kind: Kind, skip_invalid: bool = False,
               field_map: Mapping[str, str] | None = None) -> Records:
  """The split's rows as validated records, file after file."""
  fs, files = split_files(location, split)
  parsers = (functools.partial(parse_record, row, kind, Origin(_display(fs, path), number),
                               field_map)
             for path in files for number, row in enumerate(_rows(fs, path), start=1))
  return collect(parsers, source=f'hf:{location} ({split})', skip_invalid=skip_invalid)


def _display(fs, path: str) -> str:
  local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
  return path if local else fs.unstrip_protocol(path)


def _schema(fs, path: str) -> pa.Schema:
  with fs.open(path, 'rb') as f:
    if path.endswith('.parquet'):
      return pq.ParquetFile(f).schema_arrow
    return _arrow_batches(f)[0]


def _rows(fs, path: str):
  """Rows of one file as dicts, a record batch at a time."""
  with fs.open(path, 'rb') as f:
    if path.endswith('.parquet'):
      batches = pq.ParquetFile(f).iter_batches(batch_size=4096)
    else:
      batches = _arrow_batches(f)[1]
    for batch in batches:
      yield from batch.to_pylist()


def _arrow_batches(f) -> tuple[pa.Schema, object]:
  """(schema, record batches) of an arrow file: the IPC stream format (`datasets.save_to_disk`)
  or the IPC file format."""
  try:
    reader = pa.ipc.open_stream(f)
    return reader.schema, iter(reader)
  except pa.ArrowInvalid:
    f.seek(0)
    reader = pa.ipc.open_file(f)
    return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
