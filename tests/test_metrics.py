"""MetricWriter: JSONL round trip, resume truncation, TensorBoard events, process 0 only."""

import os
import struct

import fsspec
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlhf_jax.training.metrics import MetricWriter, progress_bar, read_metrics, write_config


def read_events(logdir) -> list[list[event_pb2.Event]]:
  """The events of each file in a TensorBoard logdir (TFRecords: length, crc, data, crc)."""
  files = []
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    events, offset = [], 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
    files.append(events)
  return files


def scalars(events) -> list[tuple[int, str, float]]:
  return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def test_round_trip_of_jax_numpy_and_python_values(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(np.int64(3), {'loss': jnp.float32(0.25), 'tokens': jnp.int32(7),
                             'lr': np.float64(1e-3), 'grad_norm': np.float32(2.5),
                             'seqs': np.int64(4), 'frac': 0.5, 'hist': jnp.arange(3)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    assert f.read() == ('{"frac": 0.5, "grad_norm": 2.5, "hist": [0, 1, 2], "loss": 0.25, '
                        '"lr": 0.001, "seqs": 4, "step": 3, "tokens": 7}\n')
  [record] = read_metrics(tmp_path / 'metrics.jsonl')
  assert all(type(record[k]) is int for k in ('step', 'tokens', 'seqs'))
  assert all(type(record[k]) is float for k in ('loss', 'lr', 'grad_norm'))
  assert not os.path.exists(tmp_path / 'tensorboard')


def write_steps(workdir, steps, *, start_step=0, scale=1.0):
  writer = MetricWriter(str(workdir), start_step=start_step)
  for step in steps:
    writer.write(step, {'loss': jnp.float32(scale / step), 'tokens': np.int32(step)})
  writer.close()


def test_resume_drops_what_was_logged_after_the_checkpoint(tmp_path):
  write_steps(tmp_path, range(1, 7))
  write_steps(tmp_path, (5, 6), start_step=4, scale=2.0)  # Resumed from the step 4 checkpoint.
  records = read_metrics(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[3] == {'step': 4, 'loss': 0.25, 'tokens': 4}
  assert records[5] == {'step': 6, 'loss': np.float32(2 / 6).item(), 'tokens': 6}
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tensorboard']

  resumed, first = sorted(read_events(tmp_path / 'tensorboard'), key=len)
  assert [(step, tag) for step, tag, _ in scalars(first)] == [
      (step, tag) for step in range(1, 7) for tag in ('loss', 'tokens')]
  assert [s for s in scalars(resumed) if s[1] == 'tokens'] == [(5, 'tokens', 5), (6, 'tokens', 6)]
  # The resumed file tells TensorBoard to hide the first file's events from step 5 on.
  [purge] = [e for e in resumed if e.session_log.status == event_pb2.SessionLog.START]
  assert purge.step == 5


def test_a_line_cut_short_by_a_crash_is_dropped(tmp_path):
  write_steps(tmp_path, range(1, 4))
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"loss": 0.1, "st')
  assert [r['step'] for r in read_metrics(tmp_path / 'metrics.jsonl')] == [1, 2, 3]
  write_steps(tmp_path, [4], start_step=3)
  assert [r['step'] for r in read_metrics(tmp_path / 'metrics.jsonl')] == [1, 2, 3, 4]


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  writer = MetricWriter(str(tmp_path / 'workdir'))
  writer.write(1, {'loss': 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / 'workdir')
  assert progress_bar(10, 2, enabled=True).disable


def test_progress_bar_counts_steps_from_the_resumed_one():
  bar = progress_bar(10, 4, enabled=True)
  assert not bar.disable and (bar.n, bar.total, bar.unit) == (4, 10, 'step')
  bar.close()
  assert progress_bar(10, 4, enabled=False).disable


@pytest.fixture
def remote_workdir(tmp_path):
  """A workdir URL on fsspec's in-memory filesystem (standing in for gs://), removed after."""
  url = f'memory://{tmp_path.name}/run'
  yield url
  fs = fsspec.filesystem('memory')
  if fs.exists(url):
    fs.rm(url, recursive=True)


def test_remote_writer_uploads_every_record_and_resumes_like_a_local_one(remote_workdir,
                                                                         tmp_path):
  path = f'{remote_workdir}/metrics.jsonl'
  writer = MetricWriter(remote_workdir)  # TensorBoard asked for, skipped with a warning.
  writer.write(1, {'loss': jnp.float32(0.5)})
  assert read_metrics(path) == [{'step': 1, 'loss': 0.5}]  # Readable before close().
  writer.write(2, {'loss': 0.25})
  assert read_metrics(path) == [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25}]
  writer.close()

  write_steps(remote_workdir, range(3, 7), start_step=2)
  write_steps(remote_workdir, (5, 6), start_step=4, scale=2.0)  # Resumed from step 4.
  records = read_metrics(path)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[3] == {'step': 4, 'loss': 0.25, 'tokens': 4}
  assert records[5] == {'step': 6, 'loss': np.float32(2 / 6).item(), 'tokens': 6}
  assert fsspec.filesystem('memory').ls(remote_workdir, detail=False) == [
      f'/{tmp_path.name}/run/metrics.jsonl']  # No TensorBoard events, no temporary files.


def test_remote_and_local_files_are_byte_for_byte_equal(remote_workdir, tmp_path):
  for workdir in (remote_workdir, tmp_path):
    write_steps(workdir, range(1, 5))
    write_steps(workdir, [4], start_step=3, scale=3.0)
  with fsspec.open(f'{remote_workdir}/metrics.jsonl') as remote, \
      open(tmp_path / 'metrics.jsonl', 'rb') as local:
    assert remote.read() == local.read()


def test_a_resumed_remote_writer_drops_later_records_before_writing_any(remote_workdir):
  write_steps(remote_workdir, range(1, 5))
  MetricWriter(remote_workdir, start_step=2, tensorboard=False).close()
  assert [r['step'] for r in read_metrics(f'{remote_workdir}/metrics.jsonl')] == [1, 2]


@pytest.mark.parametrize('remote', [False, True])
def test_write_config_writes_sorted_json(remote, remote_workdir, tmp_path):
  workdir = remote_workdir if remote else str(tmp_path / 'new' / 'run')
  config = ml_collections.ConfigDict({'seed': 3, 'optim': {'lr': 1e-3, 'name': 'adamw'}})
  write_config(config, workdir)
  with fsspec.open(f'{workdir}/config.json', 'r') as f:
    text = f.read()
  assert text == ('{\n  "optim": {\n    "lr": 0.001,\n    "name": "adamw"\n  },\n'
                  '  "seed": 3\n}')
