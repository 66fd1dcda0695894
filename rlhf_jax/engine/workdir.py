"""One run per workdir: a lock file that names the run holding it.

`<workdir>/run.lock` holds the host, pid and start time of the run that owns the workdir; a
second run on it stops at once, naming the first. A lock whose process is gone (on this host)
is stale: the new run takes it over, saying so. Process 0 holds the lock for all processes of
a multi-host run. On shared storage (a URL) the check is a read then a write, not atomic:
it catches a forgotten second run, not two started in the same instant.
"""

import contextlib
import datetime
import json
import os
import socket

import jax
from absl import logging

from rlhf_jax.errors import WorkdirInUse
from rlhf_jax.storage import exists, is_remote, open_file, remove, replace_file

LOCK_FILE = 'run.lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    return True
  return True


def _read(path: str) -> dict:
  try:
    with open_file(path, 'r') as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # Being written, or cut short: treated as held by an unknown run.


def _try_create(path: str, record: str) -> bool:
  """Creates the lock file; False if it already exists."""
  if is_remote(path):
    if exists(path):
      return False
    replace_file(path, record)
    return True
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(record)
  return True


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `<workdir>/run.lock` for the duration of the block (process 0)."""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  me = {'host': socket.gethostname(), 'pid': os.getpid(),
        'started': datetime.datetime.now().isoformat(timespec='seconds')}
  record = json.dumps(me)
  while not _try_create(path, record):
    holder = _read(path)
    stale = (holder.get('host') == me['host'] and isinstance(holder.get('pid'), int)
             and not _alive(holder['pid']))
    if not stale:
      raise WorkdirInUse(
          f'{workdir} is in use by the run of pid {holder.get("pid", "?")} on host '
          f'{holder.get("host", "?")} (started {holder.get("started", "?")}); wait for it to '
          f'end, use another --workdir, or delete {path} if that run is gone.')
    logging.warning('%s: taking over the lock of pid %d, which is gone.', workdir,
                    holder['pid'])
    remove(path)
  try:
    yield
  finally:
    if _read(path).get('pid') == me['pid']:
      remove(path)

