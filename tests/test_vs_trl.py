"""benchmarks/vs_trl.py runs end to end at a tiny size and prints its JSON."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip('trl')

SCRIPT = pathlib.Path(__file__).parent.parent / 'benchmarks' / 'vs_trl.py'


def with_torch() -> dict:
  """This environment without the shim that hides torch from the tests' subprocesses."""
  paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
  shim = str(pathlib.Path(__file__).parent / 'no_torch')
  return {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in paths if p and p != shim)}


def test_dpo_and_grpo_ratios_are_measured():
  # Batch 8: the tests run JAX on 8 CPU devices (conftest), and GRPO takes groups of 8. DPO
  # (a train step with a reference, TRL's text data) and GRPO (the engine) only: each kind
  # costs its own compiles and trainer set-up.
  out = subprocess.run(
      [sys.executable, str(SCRIPT), '--shape=playground', '--batch_size=8', '--seq_len=16',
       '--new_tokens=4', '--repeats=1', '--only=dpo,grpo'],
      capture_output=True, text=True, check=True, env=with_torch()).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert set(result['ratios']) == {'dpo', 'grpo'}
  assert all(math.isfinite(r) and r > 0 for r in result['ratios'].values())
  assert 'ppo' in result['skipped']
