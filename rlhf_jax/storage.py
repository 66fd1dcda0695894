"""Files of a workdir that is a local directory or a URL on shared storage (`gs://bucket/run`,
`memory://...`), through fsspec; gs:// needs `pip install gcsfs`, the `gcs` extra.

Local paths keep the builtin `open` and `os`; a URL's objects have no directories, cannot be
appended to and land whole when uploaded. Caches that each host may build for itself go to a
local directory instead (`local_cache_dir`), and so do copies of directories that a library
reads only from local disk (a model's, `local_copy`).
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import fsspec

from rlhf_jax.errors import NotFound


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (`gs://...`, `memory://...`) rather than a local path."""
  return '://' in os.fspath(path)


def exists(path: str | os.PathLike) -> bool:
  fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
  return fs.exists(fs_path)


def open_file(path: str | os.PathLike, mode: str = 'r'):
  """The file at `path` opened in `mode`: fsspec's for a URL, the builtin one for a local path,
  whose parent directories a write ('w', 'a', 'x') creates."""
  if is_remote(path):
    fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
    return fs.open(fs_path, mode)
  if mode[0] in 'wax':
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  return open(path, mode)


def remove(path: str | os.PathLike) -> None:
  """Deletes the file at `path` if it is there."""
  fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
  if fs.exists(fs_path):
    fs.rm(fs_path)


def replace_file(path: str, data: str | bytes) -> None:
  """Replaces the file with `data`; the old one stays whole until replaced: a local file by a
  rename, an object on shared storage by its upload, which lands in one piece."""
  mode = 'wb' if isinstance(data, bytes) else 'w'
  if is_remote(path):
    with open_file(path, mode) as f:
      f.write(data)
    return
  with open_file(path + '.tmp', mode) as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def upload_dir(local_dir: str | os.PathLike, url: str) -> None:
  """Copies the files under `local_dir` (recursively) to the same relative paths under `url`."""
  fs, fs_path = fsspec.core.url_to_fs(url)
  # The trailing '/' copies the directory's contents, not the directory, into fs_path.
  fs.put(os.path.join(os.fspath(local_dir), ''), fs_path, recursive=True)


@contextlib.contextmanager
def staged_dir(path: str):
  """A local directory to write the files of directory `path` into, which becomes `path` only
  when the block completes: a local `path` is written beside it and renamed into place
  (replacing an older one), so a half-written directory never stands at `path`; for a URL a
  temporary directory is uploaded to it on leaving the block. An error leaves `path` as it was.
  """
  if is_remote(path):
    with tempfile.TemporaryDirectory() as local_dir:
      yield local_dir
      upload_dir(local_dir, path)
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  partial = tempfile.mkdtemp(prefix=os.path.basename(path) + '.partial-', dir=parent)
  try:
    yield partial
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      shutil.rmtree(partial)


def local_copy(url: str) -> str:
  """A local copy of the directory at `url`, made once per host and per version of its files
  (their listing: names, sizes, times) in `local_cache_dir(url)`, and reused while they stay as
  they are. It is copied into a temporary directory and renamed into place whole, so processes
  of one host that copy at once never see a partial copy: the first rename wins, the others use
  it."""
  fs, fs_path = fsspec.core.url_to_fs(url)
  files = fs.find(fs_path, detail=True)
  if not files:
    raise NotFound(f'{url}: no such directory, or it is empty.')
  listing = json.dumps(sorted(files.items()), sort_keys=True, default=str)
  parent = local_cache_dir(url)
  copy = os.path.join(parent, hashlib.sha256(listing.encode()).hexdigest()[:16])
  if os.path.isdir(copy):
    return copy
  os.makedirs(parent, exist_ok=True)
  partial = tempfile.mkdtemp(prefix=os.path.basename(copy) + '.partial-', dir=parent)
  try:
    fs.get(fs_path.rstrip('/') + '/', partial, recursive=True)
    try:
      os.rename(partial, copy)
    except OSError:  # Another process renamed its copy into place first.
      if not os.path.isdir(copy):
        raise
  finally:
    if os.path.exists(partial):
      shutil.rmtree(partial)
  return copy


def local_cache_dir(path: str) -> str:
  """`path` when local; for a URL, a directory of this host's temporary space named by a hash of
  the URL, for caches that each host can build for itself (the same URL, the same directory)."""
  if not is_remote(path):
    return path
  return os.path.join(tempfile.gettempdir(),
                      'rlhf_jax-' + hashlib.sha256(path.encode()).hexdigest()[:16])
