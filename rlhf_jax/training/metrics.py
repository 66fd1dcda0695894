"""Metrics to `workdir/metrics.jsonl` and TensorBoard, and a progress bar; process 0 writes."""

import json
import os
from collections.abc import Mapping

import jax
import numpy as np
import tqdm


def _scalar(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Appends {"step": s, **metrics} lines to metrics.jsonl and scalars to TensorBoard.

  On resume from `start_step`, lines after that step (written by a run killed after its last
  checkpoint) are dropped first, so the file reads as if the run had never stopped.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self._path):
      kept = [m for m in read_metrics(self._path) if m['step'] <= start_step]
      with open(self._path + '.tmp', 'w') as f:
        f.writelines(json.dumps(m, sort_keys=True) + '\n' for m in kept)
      os.replace(self._path + '.tmp', self._path)
    self._file = open(self._path, 'a')
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    if not self._active:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    self._file.write(json.dumps({'step': int(step), **values}, sort_keys=True) + '\n')
    self._file.flush()
    if self._tensorboard is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self._tensorboard.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._active:
      self._file.close()
      if self._tensorboard is not None:
        self._tensorboard.close()


def progress_bar(total: int, initial: int, *, enabled: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                   disable=not enabled or jax.process_index() != 0)
