"""Two CPU processes (jax.distributed + gloo, one device each) train like one 2-device process:
SFT, and PPO (rollouts sampled, scored and decoded across both hosts); what one process writes
is whole when the other reads it.

Each process is a real `python -m rlhf_jax.main` with `--config.distributed.*`, as a user would
launch one per host; process 0 writes metrics.jsonl.
"""

import pathlib
import socket
import subprocess
import sys
import time

import pytest

from rlhf_jax.engine.metrics import read_metrics
from devices import environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 240  # Seconds for all three runs together.
COMMON = [f'--config={ROOT}/configs/sft.py:sorting', '--config.train.seq_len=16',
          '--config.data.max_items=6', '--config.train.batch_size=8',
          '--config.train.steps=6', '--config.train.log_every=1',
          '--config.train.eval_every=3', '--config.train.eval_batches=1',
          '--config.train.checkpoint_every=3', '--config.mesh.data=-1',
          '--config.train.progress_bar=False', '--config.train.tensorboard=False']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, devices: int, log, *overrides, common=COMMON) -> subprocess.Popen:
  env = environment(devices)  # Whatever conftest.py set for the in-process tests.
  # stderr goes to a file: a pipe nobody reads while we wait on the other process could fill
  # up and stall this one, and with it the collectives of both.
  return subprocess.Popen(
      [sys.executable, '-m', 'rlhf_jax.main', f'--workdir={workdir}', *common, *overrides],
      env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)


def run_single_and_two_processes(tmp_path, common) -> tuple[list[dict], list[dict]]:
  """metrics.jsonl of one 2-device process and of two 1-device processes (gloo)."""
  port = free_port()
  logs = {name: open(tmp_path / f'{name}.log', 'w') for name in ('single', 'p0', 'p1')}
  processes = {'single': start(tmp_path / 'single', 2, logs['single'], common=common)}
  for i in range(2):
    processes[f'p{i}'] = start(
        tmp_path / 'multi', 1, logs[f'p{i}'],
        f'--config.distributed.coordinator_address=127.0.0.1:{port}',
        '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
        '--config.distributed.cpu_collectives=gloo', '--verbosity=0', common=common)

  wait(processes, logs)
  stderr = {name: (tmp_path / f'{name}.log').read_text() for name in processes}
  for name, p in processes.items():
    assert p.returncode == 0, f'{name} exited with {p.returncode}:\n{stderr[name][-5000:]}'
  for i in range(2):  # Really one job of two processes with one device each.
    assert f'jax.distributed: process {i} of 2, 1 local devices' in stderr[f'p{i}']
  return (read_metrics(tmp_path / 'single/metrics.jsonl'),
          read_metrics(tmp_path / 'multi/metrics.jsonl'))


def wait(processes, logs) -> None:
  """Until every process has exited, one has failed (the others may wait for it forever: they
  are killed) or TIMEOUT has passed."""
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and any(p.poll() is None for p in processes.values()):
    if any(p.poll() not in (None, 0) for p in processes.values()):
      break  # One failed: the others may wait for it forever.
    time.sleep(0.2)
  for p in processes.values():
    if p.poll() is None:
      p.kill()
      p.wait()
  for log in logs.values():
    log.close()


def test_two_processes_match_one_process(tmp_path):
  single, multi = run_single_and_two_processes(tmp_path, COMMON)
  assert [m['step'] for m in multi] == [1, 2, 3, 3, 4, 5, 6, 6]  # 6 steps, eval at 3 and 6.
  assert [sorted(m) for m in multi] == [sorted(m) for m in single]
  # Exactly equal, not just to 1e-5: both runs split the batch over the same two devices and
  # compute the same partial results; a two-way all-reduce is a single float addition, which
  # is commutative, so gloo and the in-process collectives give the same bits.
  assert multi == single
  assert (tmp_path / 'multi/metrics.jsonl').read_bytes() == (
      tmp_path / 'single/metrics.jsonl').read_bytes()
  # Both processes took part in the final checkpoint (orbax commits only when all have).
  assert (tmp_path / 'multi/checkpoints/6').is_dir()


def test_ppo_on_two_processes_matches_one_process(tmp_path):
  from test_rl_runs import save_checkpoints  # pylint: disable=g-import-not-at-top
  policy, reward = save_checkpoints(tmp_path / 'models')
  common = [f'--config={ROOT}/configs/ppo.py:tiny', f'--config.model.hf_path={policy}',
            f'--config.rl.reward_model={reward}', '--config.train.steps=2',
            '--config.train.eval_every=2', '--config.train.checkpoint_every=2',
            '--config.train.seq_len=38', '--config.rl.max_new_tokens=6',
            '--config.rl.rollout_batch_size=8', '--config.rl.num_minibatches=2',
            '--config.rl.ppo_epochs=1', '--config.rl.num_prompts=32',
            '--config.train.batch_size=8', '--config.eval.num_prompts=8',
            '--config.eval.max_new_tokens=6', '--config.train.export_hf=False',
            '--config.mesh.data=-1', '--config.train.progress_bar=False',
            '--config.train.tensorboard=False']
  single, multi = run_single_and_two_processes(tmp_path, common)
  # The prompts' statistics and an evaluation at step 0, iterations 1 and 2, an evaluation at 2.
  assert [m['step'] for m in multi] == [0, 0, 1, 2, 2]
  assert multi[0]['data/prompts/train'] == 32
  assert multi[2]['objective/kl'] == 0 and 0 <= multi[2]['objective/gold'] <= 1
  assert [sorted(m) for m in multi] == [sorted(m) for m in single]
  for one, two in zip(single, multi):
    for key, value in one.items():
      assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


EXPORT_THEN_READ = """
import sys, time
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from flax import nnx
from rlhf_jax.models import Transformer, loading
from rlhf_jax.models.presets import get_preset
if jax.process_index() == 0:  # A slow disk: process 0 writes long after the gather.
  save_hf = loading.save_hf
  loading.save_hf = lambda *args, **kwargs: (time.sleep(3), save_hf(*args, **kwargs))
loading.export_hf(*nnx.split(Transformer(get_preset('tiny'), rngs=nnx.Rngs(0))), sys.argv[3])
assert loading.is_export(sys.argv[3]), 'returned before the export was whole'
"""


def test_every_process_returns_from_export_hf_once_the_export_is_whole(tmp_path):
  port = free_port()
  logs = {f'p{i}': open(tmp_path / f'p{i}.log', 'w') for i in range(2)}
  env = environment(1)
  processes = {name: subprocess.Popen(
      [sys.executable, '-c', EXPORT_THEN_READ, f'127.0.0.1:{port}', name[1], tmp_path / 'hf'],
      env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log) for name, log in logs.items()}
  wait(processes, logs)
  for name, p in processes.items():
    assert p.returncode == 0, (tmp_path / f'{name}.log').read_text()[-3000:]
