"""The bar over runs side by side: it follows their metrics.jsonl as they grow."""

import json
import time

from rlhf_jax import storage
from rlhf_jax.engine.progress import RunsProgress, last_step


def append_steps(workdir, steps, tail=''):
  """Appends a record per step to <workdir>/metrics.jsonl, then `tail` (a line cut short)."""
  with storage.open_file(f'{workdir}/metrics.jsonl', 'a') as f:
    f.write(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in steps) + tail)


def wait_for(condition, timeout_s=5.0):
  """Whether `condition()` holds within `timeout_s`: the bar's thread polls on its own."""
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.01)
  return True


def test_the_bar_follows_metrics_files_as_they_grow(tmp_path):
  a, b, c = (str(tmp_path / name) for name in 'abc')
  append_steps(a, [1, 2, 3])
  append_steps(b, [1], tail='{"step": 2, "lo')  # A line being written does not count yet.
  with RunsProgress([(a, 10), (b, 5), (c, 4)], interval_s=0.02) as progress:
    bar = progress.bar
    assert (bar.n, bar.total, bar.initial) == (4, 19, 4)  # c has no metrics.jsonl: 0.
    assert bar.postfix == '0/3 runs done'
    append_steps(a, [4, 5])
    append_steps(c, [1, 2])
    assert wait_for(lambda: bar.n == 8), bar.n
    progress.done(b)  # Ended (say a stop rule) at step 1 of 5: all of it counts.
    assert bar.n == 12 and bar.postfix == '1/3 runs done'
    append_steps(a, [6, 7, 8, 9, 10, 11])  # Past its total (a miscount): capped at it.
    assert wait_for(lambda: bar.n == 17), bar.n
  assert progress.bar.n == 17 and not progress._thread.is_alive()


def test_runs_done_before_count_whole_from_the_start(tmp_path):
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  append_steps(b, [1, 2])
  with RunsProgress([(a, 6), (b, 8)], done=[a], interval_s=60) as progress:
    assert (progress.bar.n, progress.bar.initial) == (8, 8)
    assert progress.bar.postfix == '1/2 runs done'
    progress.done(b)
    assert progress.bar.n == 14 and progress.bar.postfix == '2/2 runs done'


def test_workdirs_on_shared_storage():
  workdir = 'memory://progress_test/run'
  assert last_step(workdir) == 0
  append_steps(workdir, [1, 2, 3])
  assert last_step(workdir) == 3
  storage.remove(f'{workdir}/metrics.jsonl')


def test_a_disabled_bar_reads_nothing(tmp_path):
  append_steps(tmp_path, [1, 2])
  with RunsProgress([(str(tmp_path), 5)], enabled=False, interval_s=0.01) as progress:
    progress.poll()
    assert progress.bar.disable and progress.bar.n == 0
    assert not progress._thread.is_alive()
