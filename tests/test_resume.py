"""Whole runs as a user starts them: determinism, config errors (SIGKILL and SIGTERM:
tests/test_reliability.py).

Every run is a real `python -m rlhf_jax.main` subprocess on one CPU device. Runs that do not
depend on each other are started together, so the two cores work in parallel.
"""

import pathlib
import subprocess
import sys

from rlhf_jax.engine.metrics import read_metrics
from devices import environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [f'--config={ROOT}/configs/sft.py:sorting', '--config.train.seq_len=16',
        '--config.data.max_items=6', '--config.train.batch_size=8',
        '--config.train.progress_bar=False', '--config.train.tensorboard=False']
TIMEOUT = 240  # Seconds; a run takes ~10 s on an idle core.


def start(workdir, *overrides) -> subprocess.Popen:
  env = environment(1)  # One device, whatever conftest.py set for the in-process tests.
  command = [sys.executable, '-m', 'rlhf_jax.main', f'--workdir={workdir}', *TINY, *overrides]
  return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, *, expect_ok: bool = True) -> str:
  """Waits for `process`; returns its stderr, which a failure shows."""
  try:
    _, stderr = process.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    process.kill()
    _, stderr = process.communicate()
    raise AssertionError(f'Run timed out after {TIMEOUT} s; stderr:\n{stderr[-5000:]}')
  if expect_ok:
    assert process.returncode == 0, f'Run failed ({process.returncode}):\n{stderr[-5000:]}'
  return stderr


def test_same_config_and_seed_give_identical_metrics(tmp_path):
  overrides = ['--config.train.steps=6', '--config.train.log_every=1',
               '--config.train.eval_every=3', '--config.train.eval_batches=1']
  for process in [start(tmp_path / 'a', *overrides), start(tmp_path / 'b', *overrides)]:
    finish(process)
  a = (tmp_path / 'a/metrics.jsonl').read_bytes()
  assert len(read_metrics(tmp_path / 'a/metrics.jsonl')) == 6 + 2  # 6 steps, 2 evals.
  assert a == (tmp_path / 'b/metrics.jsonl').read_bytes()


def test_config_errors_name_the_key(tmp_path):
  cases = {  # overrides -> what stderr must say.
      '--config.optim.lrr=1': ['lrr', 'Did you mean "lr"'],
      f'--config={ROOT}/configs/sft.py:nope': ["Unknown preset 'nope'", 'tiny'],
      '--config.mesh.tensor=3': ['config.mesh', "'tensor': 3", '1 devices'],
  }
  processes = {arg: start(tmp_path / str(i), arg) for i, arg in enumerate(cases)}
  for arg, process in processes.items():
    stderr = finish(process, expect_ok=False)
    assert process.returncode not in (0, None), arg
    for message in cases[arg]:
      assert message in stderr, f'{arg}: {message!r} not in\n{stderr[-3000:]}'
