"""benchmarks/vs_trl.py runs end to end at a tiny size and prints its JSON."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('trl')

SCRIPT = pathlib.Path(__file__).parent.parent / 'benchmarks' / 'vs_trl.py'


def with_torch() -> dict:
  """This environment without the shim that hides torch from the tests' subprocesses."""
  paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
  shim = str(pathlib.Path(__file__).parent / 'no_torch')
  return {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in paths if p and p != shim)}


def test_both_sides_compute_the_same_loss_and_every_ratio_is_measured():
  """Each offline step's losses are TRL's to 1e-4: the same weights, batch, loss, optimizer and
  precision on both sides. The second step's counts for DPO, whose first is log 2 whatever the
  log-probs (the policy is its reference). GRPO's losses differ in form (TRL's default
  'dapo' token mean, ours configs/grpo.py's) and in samples, so only its ratio is checked."""
  # Batch 8: the tests run JAX on 8 CPU devices (conftest), and GRPO takes groups of 8.
  out = subprocess.run(
      [sys.executable, str(SCRIPT), '--shape=playground', '--batch_size=8', '--seq_len=16',
       '--new_tokens=4', '--repeats=1'],
      capture_output=True, text=True, check=True, env=with_torch()).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert set(result['ratios']) == {'sft', 'rm', 'dpo', 'dpo_precomputed', 'grpo'}
  assert all(math.isfinite(r) and r > 0 for r in result['ratios'].values())
  for name in ('sft', 'rm', 'dpo', 'dpo_precomputed'):
    losses = result['times'][name]['losses']
    np.testing.assert_allclose(losses['ours'], losses['trl'], atol=1e-4, rtol=0, err_msg=name)
    assert 0 < result['mfu'][name]['ours'] and 1 <= result['ratio_ceilings'][name]
  assert 'ppo' in result['skipped']
