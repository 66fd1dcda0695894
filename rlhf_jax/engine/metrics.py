"""Metrics to `workdir/metrics.jsonl` and TensorBoard, the run's config.json, and a progress
bar; process 0 writes.

A resumed run first drops what its killed predecessor logged after the checkpoint it resumes
from (JSONL lines are removed, TensorBoard events hidden), so the logs read as if the run had
never stopped.

The workdir may be a URL on shared storage (`gs://bucket/run`, through fsspec; gs:// needs
`pip install gcsfs`, the `gcs` extra). Objects there cannot be appended to, so the writer keeps
the records and uploads the whole file at each write (metrics files are small), and skips
TensorBoard.
"""

import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
import tqdm
from absl import logging

from rlhf_jax.storage import exists, is_remote, open_file, replace_file


def write_config(config, workdir: str) -> None:
  """Writes `config` (a ConfigDict) to `workdir/config.json`, local or remote; process 0 only."""
  if jax.process_index() != 0:
    return
  replace_file(os.path.join(workdir, 'config.json'),
               config.to_json_best_effort(indent=2, sort_keys=True))


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file (local or a URL), in order; a last line cut short is
  left out."""
  with open_file(path, 'r') as f:
    return [json.loads(line) for line in f if line.endswith('\n') and line.strip()]


def _jsonl(records: list[dict]) -> str:
  return ''.join(json.dumps(record, sort_keys=True) + '\n' for record in records)


def _to_python(value):
  """A Python int/float/bool (a list for arrays) from a Python, NumPy or JAX value."""
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def _drop_after(path: str, step: int) -> list[dict]:
  """Rewrites the file without records after `step` and returns the records kept."""
  kept = [record for record in read_metrics(path) if record['step'] <= step]
  replace_file(path, _jsonl(kept))
  return kept


class MetricWriter:
  """Appends {"step": s, **metrics} lines to metrics.jsonl and scalars to TensorBoard.

  Only process 0 writes. `start_step` is the step the run starts (or resumes) from: records
  after it are dropped first. In a remote workdir (a URL) each write uploads the whole file
  and TensorBoard is skipped.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True):
    self._file = self._tensorboard = self._records = None
    if jax.process_index() != 0:
      return
    remote = is_remote(workdir)
    self._path = os.path.join(workdir, 'metrics.jsonl')
    kept = _drop_after(self._path, start_step) if exists(self._path) else []
    if remote:
      self._records = kept
    else:
      self._file = open_file(self._path, 'a')
    if tensorboard and remote:
      logging.log_first_n(logging.WARNING, 'No TensorBoard events in a remote workdir (%s); '
                          'metrics.jsonl has every metric.', 1, workdir)
    elif tensorboard:
      # Imported here: tensorboardX imports torch when it is installed (1.5 s).
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # purge_step hides older events from this step on. The suffix gives each writer a file of
      # its own: tensorboardX names them by the second and truncates one reopened in the same.
      self._tensorboard = tensorboardX.SummaryWriter(
          os.path.join(workdir, 'tensorboard'), purge_step=start_step + 1,
          filename_suffix=f'.{time.time_ns()}')

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    """Writes one record; values are Python/NumPy/JAX scalars (arrays go to JSONL only)."""
    if self._file is None and self._records is None:
      return
    values = {name: _to_python(value) for name, value in metrics.items()}
    record = {'step': int(step), **values}
    if self._records is not None:
      self._records.append(record)
      replace_file(self._path, _jsonl(self._records))
    else:
      self._file.write(_jsonl([record]))
      self._file.flush()
    if self._tensorboard is not None:
      for name, value in values.items():
        if isinstance(value, (int, float)):
          self._tensorboard.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def progress_bar(total: int, initial: int, *, enabled: bool) -> tqdm.tqdm:
  """A step counter for the training loop, shown on process 0 only."""
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                   disable=not enabled or jax.process_index() != 0)
