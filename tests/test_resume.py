"""Whole runs as a user starts them: SIGKILL and resume, determinism, config errors.

Every run is a real `python -m rlhf_jax.main` subprocess on one CPU device. Runs that do not
depend on each other are started together, so the two cores work in parallel.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from rlhf_jax.engine.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [f'--config={ROOT}/configs/sft.py:sorting', '--config.train.seq_len=16',
        '--config.data.max_items=6', '--config.train.batch_size=8',
        '--config.train.progress_bar=False', '--config.train.tensorboard=False']
TIMEOUT = 240  # Seconds; a run takes ~10 s on an idle core.


def start(workdir, *overrides) -> subprocess.Popen:
  # An explicit XLA_FLAGS: one device, whatever conftest.py set for the in-process tests.
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
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


def logged_steps(workdir) -> list[int]:
  """Steps of the complete lines of a metrics file that a live run may be writing to."""
  try:
    text = (workdir / 'metrics.jsonl').read_text()
  except FileNotFoundError:
    return []
  complete = text[:text.rfind('\n') + 1]  # A line being written has no newline yet.
  return [json.loads(line)['step'] for line in complete.splitlines() if line.strip()]


def test_killed_run_resumes_exactly(tmp_path):
  steps, kill_after = 50, 25
  overrides = [f'--config.train.steps={steps}', '--config.train.checkpoint_every=10',
               '--config.train.log_every=1', '--config.train.eval_every=20',
               '--config.train.eval_batches=2', '--config.train.async_checkpoint=True']
  reference = start(tmp_path / 'ref', *overrides)
  workdir = tmp_path / 'killed'
  victim = start(workdir, *overrides)

  deadline = time.time() + TIMEOUT
  while (victim.poll() is None and time.time() < deadline
         and max(logged_steps(workdir), default=0) < kill_after):
    time.sleep(0.01)
  assert victim.poll() is None, 'The run ended before it could be killed:\n' + finish(
      victim, expect_ok=False)[-5000:]
  victim.send_signal(signal.SIGKILL)
  victim.communicate(timeout=TIMEOUT)
  assert victim.returncode == -signal.SIGKILL
  killed_at = max(logged_steps(workdir))
  assert kill_after <= killed_at < steps

  stderr = finish(start(workdir, *overrides))
  resumed_from = int(stderr.split('from step ')[1].split('.')[0])  # loop.py's warning.
  assert resumed_from in (10, 20, 30, 40) and resumed_from <= killed_at, stderr[-3000:]
  finish(reference)

  resumed = read_metrics(workdir / 'metrics.jsonl')
  train_steps = [m['step'] for m in resumed if 'loss' in m]
  eval_steps = [m['step'] for m in resumed if 'eval/loss' in m]
  assert train_steps == list(range(1, steps + 1))  # Every step exactly once, in order.
  assert eval_steps == [20, 40, 50]
  assert set(resumed[0]) >= {'step', 'loss', 'grad_norm', 'param_norm', 'lr'}
  # Bit-identical to the run that was never interrupted: every key, every value, every line.
  assert resumed == read_metrics(tmp_path / 'ref/metrics.jsonl')
  assert (workdir / 'metrics.jsonl').read_bytes() == (tmp_path / 'ref/metrics.jsonl').read_bytes()


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
