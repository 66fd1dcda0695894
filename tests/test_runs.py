"""Whole runs as a user starts them: resume after SIGKILL, determinism, several hosts, errors."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from rlhf_jax.training.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [f'--config={ROOT}/configs/sft.py:tiny', '--config.train.seq_len=16',
        '--config.data.max_items=6', '--config.train.batch_size=8',
        '--config.train.progress_bar=False', '--config.train.tensorboard=False']


def command(workdir, *overrides):
  return [sys.executable, '-m', 'rlhf_jax.main', f'--workdir={workdir}', *TINY, *overrides]


def environment(devices: int):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def run(workdir, *overrides, devices=1, timeout=240):
  result = subprocess.run(command(workdir, *overrides), env=environment(devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return read_metrics(workdir / 'metrics.jsonl')


def test_killed_run_resumes_exactly(tmp_path):
  overrides = ['--config.train.steps=40', '--config.train.checkpoint_every=10',
               '--config.train.log_every=1', '--config.train.eval_every=20']
  uninterrupted = run(tmp_path / 'ref', *overrides)

  workdir = tmp_path / 'killed'
  process = subprocess.Popen(command(workdir, *overrides), env=environment(1), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 180
  while time.time() < deadline and process.poll() is None:
    metrics_file = workdir / 'metrics.jsonl'
    if metrics_file.exists() and any(m['step'] >= 25 for m in read_metrics(metrics_file)):
      break
    time.sleep(0.05)
  assert process.poll() is None, 'The run ended before it could be killed.'
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(m['step'] for m in read_metrics(workdir / 'metrics.jsonl'))
  assert 25 <= killed_at < 40

  resumed = run(workdir, *overrides)
  assert resumed == uninterrupted  # Every step once, every value bit-identical.


def test_same_config_and_seed_give_identical_metrics(tmp_path):
  overrides = ['--config.train.steps=6', '--config.train.log_every=1']
  run(tmp_path / 'a', *overrides)
  run(tmp_path / 'b', *overrides)
  assert (tmp_path / 'a/metrics.jsonl').read_bytes() == (tmp_path / 'b/metrics.jsonl').read_bytes()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  overrides = ['--config.train.steps=5', '--config.train.log_every=1',
               '--config.train.eval_every=0', '--config.mesh.data=-1']
  single = run(tmp_path / 'single', *overrides, devices=2)

  port = free_port()
  workdir = tmp_path / 'multi'
  processes = [
      subprocess.Popen(
          command(workdir, *overrides,
                  f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                  '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
                  '--config.distributed.cpu_collectives=gloo', '--verbosity=0'),
          env=environment(1), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
          text=True) for i in range(2)]
  for i, p in enumerate(processes):
    _, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-3000:]
    assert f'jax.distributed: process {i} of 2' in stderr  # Really one job of two hosts.
  multi = read_metrics(workdir / 'metrics.jsonl')
  assert [m['step'] for m in multi] == [m['step'] for m in single]
  for m, s in zip(multi, single):
    assert m['loss'] == pytest.approx(s['loss'], rel=1e-5)
    assert m['grad_norm'] == pytest.approx(s['grad_norm'], rel=1e-5)


@pytest.mark.parametrize('args, message', [
    (['--config.optim.lrr=1'], 'lrr'),
    ([f'--config={ROOT}/configs/sft.py:nope'], "Unknown preset 'nope'"),
    (['--config.mesh.tensor=3'], 'config.mesh'),
])
def test_config_errors_name_the_key(tmp_path, args, message):
  result = subprocess.run(command(tmp_path, *args), env=environment(1), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr


def test_a_run_starts_from_an_hf_checkpoint(tmp_path):
  from hf_fixtures import VOCAB, tiny_model  # pylint: disable=g-import-not-at-top
  hf_model = tiny_model('qwen2')
  hf_model.save_pretrained(tmp_path / 'hf')
  metrics = run(tmp_path / 'run', f'--config.model.hf_path={tmp_path / "hf"}',
                f'--config.model.vocab_size={VOCAB}', '--config.train.steps=4',
                '--config.train.log_every=1', '--config.train.eval_every=0',
                '--config.mesh.fsdp=2', devices=2)
  assert [m['step'] for m in metrics] == [1, 2, 3, 4]
  # The warmup's first learning rate is 0, so after step 1 the parameters are still the
  # checkpoint's: their norm is the HF model's (tied embedding counted once).
  hf_norm = sum(float((p.detach().double() ** 2).sum()) for p in hf_model.parameters()) ** 0.5
  assert metrics[0]['lr'] == 0.0
  assert metrics[0]['param_norm'] == pytest.approx(hf_norm, rel=1e-5)
