"""Metrics to `workdir/metrics.jsonl` and TensorBoard, and a progress bar; process 0 writes.

A resumed run first drops what its killed predecessor logged after the checkpoint it resumes
from (JSONL lines are removed, TensorBoard events hidden), so the logs read as if the run had
never stopped.
"""

import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
import tqdm


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file, in order; a last line cut short is left out."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n') and line.strip()]


def _to_python(value):
  """A Python int/float/bool (a list for arrays) from a Python, NumPy or JAX value."""
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def _drop_after(path: str, step: int) -> None:
  """Rewrites the file without records after `step`; the old one stays whole until replaced."""
  kept = [record for record in read_metrics(path) if record['step'] <= step]
  with open(path + '.tmp', 'w') as f:
    f.writelines(json.dumps(record, sort_keys=True) + '\n' for record in kept)
  os.replace(path + '.tmp', path)


class MetricWriter:
  """Appends {"step": s, **metrics} lines to metrics.jsonl and scalars to TensorBoard.

  Only process 0 writes. `start_step` is the step the run starts (or resumes) from: records
  after it are dropped first.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True):
    self._file = self._tensorboard = None
    if jax.process_index() != 0:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(path):
      _drop_after(path, start_step)
    self._file = open(path, 'a')
    if tensorboard:
      # Imported here: tensorboardX imports torch when it is installed (1.5 s).
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # purge_step hides older events from this step on. The suffix gives each writer a file of
      # its own: tensorboardX names them by the second and truncates one reopened in the same.
      self._tensorboard = tensorboardX.SummaryWriter(
          os.path.join(workdir, 'tensorboard'), purge_step=start_step + 1,
          filename_suffix=f'.{time.time_ns()}')

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    """Writes one record; values are Python/NumPy/JAX scalars (arrays go to JSONL only)."""
    if self._file is None:
      return
    values = {name: _to_python(value) for name, value in metrics.items()}
    self._file.write(json.dumps({'step': int(step), **values}, sort_keys=True) + '\n')
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
