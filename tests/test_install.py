"""The entry point as a user starts it: from any working directory, and from a non-editable
`pip install .` (the configs ship inside the package as `rlhf_jax.configs`)."""

import pathlib
import subprocess
import sys

from rlhf_jax.engine.metrics import read_metrics
from devices import environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ['-m', 'rlhf_jax.main', '--config=configs/sft.py:sorting', '--config.train.steps=2',
       '--config.train.seq_len=16', '--config.data.max_items=6', '--config.train.batch_size=8',
       '--config.train.eval_every=0', '--config.train.progress_bar=False',
       '--config.train.tensorboard=False']
ENV = environment(1)


def run(python_path: str | None, cwd, *args) -> subprocess.CompletedProcess:
  env = dict(ENV) if python_path is None else {**ENV, 'PYTHONPATH': python_path}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def test_main_runs_from_another_directory(tmp_path):
  done = run(None, tmp_path, *RUN, f'--workdir={tmp_path / "run"}')
  assert done.returncode == 0, done.stderr[-3000:]
  assert [m['step'] for m in read_metrics(tmp_path / 'run' / 'metrics.jsonl')] == [2]


def test_main_runs_from_a_non_editable_install(tmp_path):
  site = tmp_path / 'site'
  installed = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--target', str(site),
       str(ROOT)], capture_output=True, text=True, timeout=600, check=False)
  assert installed.returncode == 0, installed.stderr[-3000:]
  where = run(str(site), tmp_path, '-c',
              'import rlhf_jax, rlhf_jax.config as c; print(rlhf_jax.__file__, c.configs_dir())')
  assert where.returncode == 0, where.stderr[-3000:]
  assert all(path.startswith(str(site)) for path in where.stdout.split()), where.stdout
  done = run(str(site), tmp_path, *RUN, f'--workdir={tmp_path / "run"}')
  assert done.returncode == 0, done.stderr[-3000:]
  assert [m['step'] for m in read_metrics(tmp_path / 'run' / 'metrics.jsonl')] == [2]
