"""Metrics to `workdir/metrics.jsonl`, TensorBoard and (optionally) Weights & Biases, the run's
config.json, and a progress bar; process 0 writes.

A resumed run first drops what its killed predecessor logged after the checkpoint it resumes
from (JSONL lines are removed, TensorBoard events hidden), so the logs read as if the run had
never stopped. W&B continues the same run (its id is derived from the workdir) but keeps the
steps its predecessor logged: it ignores a step logged twice.

Evaluations may return matplotlib figures and `evals.media.Table`s among their numbers: those
go to TensorBoard and W&B only (metrics.jsonl keeps numbers).

The workdir may be a URL on shared storage (`gs://bucket/run`, through fsspec; gs:// needs
`pip install gcsfs`, the `gcs` extra). Objects there cannot be appended to, so the writer keeps
the records and uploads the whole file at each write (metrics files are small), and writes
TensorBoard events to a local directory that it uploads every minute and at the end.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping

import jax
import numpy as np
import tqdm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax.evals.media import Table
from rlhf_jax.storage import (exists, is_remote, local_cache_dir, open_file, replace_file,
                              upload_dir)


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


def _is_media(value) -> bool:
  return isinstance(value, (Figure, Table))


def _pixels(figure: Figure) -> np.ndarray:
  """The figure drawn as [height, width, 3] uint8 RGB (Agg, without pyplot)."""
  canvas = FigureCanvasAgg(figure)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class _TensorBoard:
  """The TensorBoard events of one writer, written as they come (no background thread, so an
  upload has every event so far): in <workdir>/tensorboard, or for a URL in a local directory
  uploaded to <workdir>/tensorboard at the first write, then at most every `upload_every_s` and
  at close (objects cannot be appended to; each writer has a file of its own). Events at
  `purge_step` and later in older files are hidden (TensorBoard's SessionLog START)."""

  def __init__(self, workdir: str, *, purge_step: int, upload_every_s: float):
    # Imported here: tensorboardX imports torch when it is installed (1.5 s).
    from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._logdir = self._url = os.path.join(workdir, 'tensorboard')
    if is_remote(workdir):
      self._logdir = tempfile.mkdtemp(prefix='tensorboard-')
    else:
      self._url = None
      os.makedirs(self._logdir, exist_ok=True)
    self._upload_every_s, self._uploaded = upload_every_s, -math.inf
    self._event = event_pb2.Event
    # The suffix: tensorboardX names files by the second, and two writers may start in one.
    self._events = event_file_writer.EventsWriter(os.path.join(self._logdir, 'events'),
                                                  f'.{time.time_ns()}')
    self._events.write_event(self._event(
        step=purge_step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write(self, step: int, scalars: Mapping[str, float], media: Mapping[str, object]):
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    summaries = [summary.scalar(name, value) for name, value in scalars.items()]
    for name, value in media.items():
      if isinstance(value, Table):
        summaries.append(summary.text(name, value.markdown()))
      else:
        summaries.append(summary.image(name, _pixels(value), dataformats='HWC'))
    for one in summaries:
      self._events.write_event(self._event(summary=one, step=step, wall_time=time.time()))
    self._events.flush()
    if self._url and time.monotonic() - self._uploaded >= self._upload_every_s:
      self._upload()

  def _upload(self):
    upload_dir(self._logdir, self._url)
    self._uploaded = time.monotonic()

  def close(self):
    self._events.close()
    if self._url:
      self._upload()
      shutil.rmtree(self._logdir)


def wandb_run_id(workdir: str) -> str:
  """The W&B run of a workdir: one id per absolute path or URL, so a resumed run continues it."""
  where = workdir if is_remote(workdir) else os.path.abspath(workdir)
  return 'rlhf-jax-' + hashlib.sha256(where.encode()).hexdigest()[:16]


class _WandB:
  """A Weights & Biases run named after the workdir, its files (and offline runs, for
  `wandb sync`) in <workdir>/wandb, or this host's cache directory for a URL."""

  def __init__(self, workdir: str, *, project: str, run_config: Mapping | None):
    import wandb  # pylint: disable=g-import-not-at-top
    local = local_cache_dir(workdir)
    os.makedirs(local, exist_ok=True)
    self._wandb = wandb
    self._run = wandb.init(project=project, id=wandb_run_id(workdir), resume='allow',
                           name=os.path.basename(workdir.rstrip('/')), dir=local,
                           config=dict(run_config or {}))

  def write(self, step: int, scalars: Mapping[str, float], media: Mapping[str, object]):
    values = dict(scalars)
    for name, value in media.items():
      if isinstance(value, Table):
        values[name] = self._wandb.Table(columns=list(value.columns),
                                         data=[list(row) for row in value.rows])
      else:
        values[name] = self._wandb.Image(_pixels(value))
    self._run.log(values, step=step)

  def close(self):
    self._run.finish()


@dataclasses.dataclass(frozen=True)
class WandbOptions:
  """Where a run logs to W&B (config.train.wandb_project) and the config it shows there."""
  project: str
  run_config: Mapping | None = None


class MetricWriter:
  """Appends {"step": s, **numbers} lines to metrics.jsonl; scalars, figures and tables to
  TensorBoard and, with `wandb`, to Weights & Biases.

  Only process 0 writes. `start_step` is the step the run starts (or resumes) from: records
  after it are dropped first. In a remote workdir (a URL) each write uploads the whole file.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True,
               wandb: WandbOptions | None = None, upload_every_s: float = 60.0):
    self._file = self._records = None
    self._sinks = []
    if jax.process_index() != 0:
      return
    self._path = os.path.join(workdir, 'metrics.jsonl')
    kept = _drop_after(self._path, start_step) if exists(self._path) else []
    if is_remote(workdir):
      self._records = kept
    else:
      self._file = open_file(self._path, 'a')
    if tensorboard:
      self._sinks.append(_TensorBoard(workdir, purge_step=start_step + 1,
                                      upload_every_s=upload_every_s))
    if wandb is not None:
      self._sinks.append(_WandB(workdir, project=wandb.project, run_config=wandb.run_config))

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    """Writes one record; values are Python/NumPy/JAX scalars (arrays go to JSONL only),
    matplotlib figures or Tables (to TensorBoard and W&B only)."""
    if self._file is None and self._records is None:
      return
    media = {name: value for name, value in metrics.items() if _is_media(value)}
    values = {name: _to_python(value) for name, value in metrics.items() if name not in media}
    record = {'step': int(step), **values}
    if self._records is not None:
      self._records.append(record)
      replace_file(self._path, _jsonl(self._records))
    else:
      self._file.write(_jsonl([record]))
      self._file.flush()
    scalars = {name: value for name, value in values.items()
               if isinstance(value, (int, float))}
    for sink in self._sinks:
      sink.write(int(step), scalars, media)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    for sink in self._sinks:
      sink.close()


def log_media(workdir: str, media: Mapping[str, object], *, step: int = 0) -> None:
  """Figures and tables of work without a metrics.jsonl (an experiment's analysis) to
  <workdir>/tensorboard at `step`, hiding what an earlier call logged there; process 0."""
  if jax.process_index() != 0:
    return
  board = _TensorBoard(workdir, purge_step=step, upload_every_s=math.inf)
  board.write(step, {}, media)
  board.close()


def progress_bar(total: int, initial: int, *, enabled: bool) -> tqdm.tqdm:
  """A step counter for the training loop, shown on process 0 only."""
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                   disable=not enabled or jax.process_index() != 0)
