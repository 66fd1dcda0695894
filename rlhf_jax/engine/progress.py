"""One progress bar over training runs that go on side by side (an experiment's stages, a sweep's
points), whose own bars are off or in their logs: it counts the steps each run has written to
its metrics.jsonl, so it needs nothing from the runs' processes."""

import os
import threading
from collections.abc import Iterable

import jax
import tqdm

from rlhf_jax import storage
from rlhf_jax.engine.metrics import read_metrics


def last_step(workdir: str) -> int:
  """The last step in <workdir>/metrics.jsonl (local or a URL); 0 before the run writes one."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not storage.exists(path):
    return 0
  records = read_metrics(path)
  return records[-1]['step'] if records else 0


class RunsProgress:
  """A tqdm bar (with its ETA) over runs given as (workdir, total steps): its count is the sum of
  each run's last step, or its total once it is in `done` or `done(workdir)` says that it ended
  (it may stop early on a stop rule, or fail). Shown on process 0 when `enabled`; as a context
  manager a background thread refreshes it every `interval_s` until the block ends."""

  def __init__(self, runs: Iterable[tuple[str, int]], *, done: Iterable[str] = (),
               enabled: bool = True, interval_s: float = 5.0, desc: str = 'runs'):
    self._totals = dict(runs)
    self._done = set(done)
    self._interval_s = interval_s
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll_until_stopped, daemon=True)
    shown = enabled and jax.process_index() == 0
    # The steps made before the bar count in `initial`, so that the rate (and ETA) is this
    # session's: resumed and finished runs do not make it look faster.
    self.bar = tqdm.tqdm(total=sum(self._totals.values()), initial=self._steps() if shown else 0,
                         unit='step', desc=desc, dynamic_ncols=True, disable=not shown)
    self.bar.set_postfix_str(self._postfix(), refresh=False)

  def _steps(self) -> int:
    return sum(total if workdir in self._done else min(last_step(workdir), total)
               for workdir, total in self._totals.items())

  def _postfix(self) -> str:
    return f'{len(self._done)}/{len(self._totals)} runs done'

  def poll(self) -> None:
    """Reads every run's metrics.jsonl again and redraws the bar."""
    if self.bar.disable:
      return
    with self._lock:
      self.bar.update(self._steps() - self.bar.n)
      self.bar.set_postfix_str(self._postfix())

  def done(self, workdir: str) -> None:
    """Counts the run in `workdir` as ended: all its steps, whatever its metrics.jsonl says."""
    with self._lock:
      self._done.add(workdir)
    self.poll()

  def _poll_until_stopped(self) -> None:
    while not self._stop.wait(self._interval_s):
      try:
        self.poll()
      except OSError:
        pass  # Shared storage out of reach for a moment: the next poll tries again.

  def __enter__(self) -> 'RunsProgress':
    if not self.bar.disable:
      self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()
    self.poll()
    self.bar.close()
