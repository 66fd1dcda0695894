"""Whole runs as a user starts them, from a Hugging Face checkpoint."""

import pathlib
import subprocess
import sys

import pytest

from rlhf_jax.engine.metrics import read_metrics
from devices import environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [f'--config={ROOT}/configs/sft.py:sorting', '--config.train.seq_len=16',
        '--config.data.max_items=6', '--config.train.batch_size=8',
        '--config.train.progress_bar=False', '--config.train.tensorboard=False']


def command(workdir, *overrides):
  return [sys.executable, '-m', 'rlhf_jax.main', f'--workdir={workdir}', *TINY, *overrides]


def run(workdir, *overrides, devices=1, timeout=240):
  result = subprocess.run(command(workdir, *overrides), env=environment(devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return read_metrics(workdir / 'metrics.jsonl')


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
