"""Sweeps: points from config.sweep (grid, random, errors), then real sweeps of tiny SFT runs.

The sweeps run as a user starts them, `python -m rlhf_jax.sweep`, each point a real
`python -m rlhf_jax.main` on one CPU device.
"""

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import sweep
from rlhf_jax.config import base_config
from rlhf_jax.engine.progress import RunsProgress
from devices import environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [f'--config={ROOT}/configs/sft.py:sorting', '--config.train.seq_len=16',
        '--config.data.max_items=6', '--config.train.batch_size=8', '--config.train.steps=4',
        '--config.train.eval_every=0', '--config.train.progress_bar=False',
        '--config.train.tensorboard=False']


def config_with(**sweep_entries):
  config = base_config()
  config.sweep.update(sweep_entries)
  return config


def test_grid_is_the_product_in_sorted_key_order():
  config = config_with(grid={'train': {'steps': [3, 5]}, 'optim': {'lr': [0.1, 0.01]}})
  points = sweep.expand(config)
  assert [p.name for p in points] == [
      'optim.lr=0.1,train.steps=3', 'optim.lr=0.1,train.steps=5',
      'optim.lr=0.01,train.steps=3', 'optim.lr=0.01,train.steps=5']
  assert points[1].values == {'optim.lr': 0.1, 'train.steps': 5}
  assert sweep.point_flags(points[1], config_file='c.py:x', overrides={'seed': 3}) == [
      '--config=c.py:x', '--config.seed=3', '--config.optim.lr=0.1', '--config.train.steps=5']


def test_values_take_the_config_types():
  points = sweep.expand(config_with(grid={'optim': {'lr': [1]}, 'train': {'steps': [2]}}))
  assert points[0].values == {'optim.lr': 1.0, 'train.steps': 2}
  assert type(points[0].values['optim.lr']) is float  # Given as an int to a float key.
  assert type(points[0].values['train.steps']) is int
  assert points[0].name == 'optim.lr=1.0,train.steps=2'
  assert [p.name for p in sweep.expand(base_config())] == ['default']  # No sweep: one point.


def test_random_draws_are_in_bounds_typed_and_seeded():
  random = {'optim': {'lr': {'log_uniform': [1e-4, 1e-2]}, 'b1': {'uniform': [0.8, 0.9]},
                      'name': {'choice': ['adamw', 'sgd']}},
            'train': {'steps': {'int': [3, 7]}}}
  points = sweep.expand(config_with(random=random, num_random=40, seed=1))
  assert 30 <= len(points) <= 40  # Repeated draws (few, with the rounding) run once.
  for p in points:
    assert 1e-4 <= p.values['optim.lr'] <= 1e-2
    assert 0.8 <= p.values['optim.b1'] <= 0.9
    assert p.values['optim.name'] in ('adamw', 'sgd')
    assert type(p.values['train.steps']) is int and 3 <= p.values['train.steps'] <= 7
  assert {p.values['train.steps'] for p in points} == {3, 4, 5, 6, 7}
  # The first draws, keys sorted, from default_rng(seed); floats to 4 significant digits.
  rng = np.random.default_rng(1)
  b1 = rng.uniform(0.8, 0.9)
  lr = math.exp(rng.uniform(math.log(1e-4), math.log(1e-2)))
  name = ['adamw', 'sgd'][rng.integers(2)]
  steps = rng.integers(3, 8)
  assert points[0].values == {'optim.b1': float(f'{b1:.4g}'), 'optim.lr': float(f'{lr:.4g}'),
                              'optim.name': name, 'train.steps': steps}
  again = sweep.expand(config_with(random=random, num_random=40, seed=1))
  other = sweep.expand(config_with(random=random, num_random=40, seed=2))
  assert again == points and other != points


def test_random_draws_per_grid_point():
  points = sweep.expand(config_with(grid={'optim': {'lr': [0.1, 0.2]}}, num_random=3,
                                    random={'train': {'steps': {'int': [1, 1000]}}}))
  assert [p.values['optim.lr'] for p in points] == [0.1, 0.1, 0.1, 0.2, 0.2, 0.2]


@pytest.mark.parametrize('entries, message', [
    (dict(grid={'optim': {'lrr': [1e-3]}}), "config.sweep.grid: unknown config key 'optim.lrr'"),
    (dict(random={'nope': {'int': [1, 2]}}, num_random=2),
     "config.sweep.random: unknown config key 'nope'"),
    (dict(grid={'optim': [1e-3]}), "'optim' is a group of keys"),
    (dict(grid={'optim': {'lr': 1e-3}}), "'optim.lr' needs a non-empty list"),
    (dict(grid={'train': {'steps': [1.5]}}), 'train.steps=1.5 does not fit the config'),
    (dict(random={'optim': {'lr': {'normal': [0, 1]}}}, num_random=2),
     "'optim.lr' needs one of"),
    (dict(random={'optim': {'lr': {'uniform': [1, 0]}}}, num_random=2), 'lo <= hi'),
    (dict(random={'train': {'steps': {'int': [1, 2.5]}}}, num_random=2), 'integer bounds'),
    (dict(random={'optim': {'lr': {'uniform': [0, 1]}}}), 'num_random=0'),
    (dict(grid={'seed': [1]}, random={'seed': {'int': [1, 2]}}, num_random=2),
     'in both grid and random'),
])
def test_bad_sweeps_name_the_key(entries, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    sweep.expand(config_with(**entries))


def test_names_are_safe_directory_names():
  assert sweep.point_name({'data.name': 'a/b'}).startswith('data.name=a_b-')
  long_name = sweep.point_name({'data.name': 'x' * 300})
  assert len(long_name) == 100 and '/' not in long_name
  assert long_name != sweep.point_name({'data.name': 'x' * 301})


def test_final_metrics_are_the_last_of_each_key():
  records = [{'step': 1, 'loss': 3.0, 'eval/loss': 5.0}, {'step': 2, 'loss': 2.0}]
  assert sweep.final_metrics(records) == {'step': 2, 'loss': 2.0, 'eval/loss': 5.0}


def test_one_bar_counts_every_points_steps(tmp_path, monkeypatch):
  config = config_with(grid={'train': {'steps': [3, 5]}, 'optim': {'lr': [0.1]}})
  first, second = sweep.expand(config)
  first_dir, second_dir = (str(tmp_path / 'points' / p.name) for p in (first, second))
  os.makedirs(first_dir)
  with open(os.path.join(first_dir, sweep.MARKER), 'w') as f:  # Finished by an earlier sweep.
    json.dump({'values': first.values, 'result': {'step': 3},
               'flags': sweep.point_flags(first, config_file='c.py', overrides={})}, f)

  def run_point(point, point_dir, args, label):
    """Stops at step 2 of 5 (a stop rule), as far as its metrics.jsonl tells."""
    with open(os.path.join(point_dir, 'metrics.jsonl'), 'w') as f:
      f.write('{"step": 1}\n{"step": 2}\n')
    return False

  bars = []

  def recorded(*args, **kwargs):
    bars.append(RunsProgress(*args, **kwargs))
    return bars[-1]

  monkeypatch.setattr(sweep, '_run_point', run_point)
  monkeypatch.setattr(sweep, 'RunsProgress', recorded)
  assert sweep.run_sweep(config, config_file='c.py', workdir=str(tmp_path)) == [second.name]
  [bar] = [progress.bar for progress in bars]
  assert (bar.initial, bar.n, bar.total) == (3, 8, 8)  # The finished point counts whole.
  assert bar.postfix == '2/2 runs done' and bar.desc == 'sweep'
  # A point's steps: its value, else the command's --config.train.steps, else the config's.
  assert sweep.point_steps(first, config, {'train.steps': 7}) == 3
  assert sweep.point_steps(sweep.Point('p', {}), config, {'train.steps': 7}) == 7
  assert sweep.point_steps(sweep.Point('p', {}), config, {}) == config.train.steps == 100


def run_sweep_command(workdir, *flags):
  env = environment(1)
  command = [sys.executable, '-m', 'rlhf_jax.sweep', f'--workdir={workdir}', *TINY, *flags]
  return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sweep_runs_points_collects_results_and_skips_finished_points(tmp_path):
  grid = "--config.sweep.grid={'optim': {'lr': [0.001, 0.003]}}"
  result = run_sweep_command(tmp_path, grid, '--workers=2')
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  names = ['optim.lr=0.001', 'optim.lr=0.003']
  with open(tmp_path / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  with open(tmp_path / 'results.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert list(rows[0])[:2] == ['optim.lr', 'grad_norm']  # Swept keys, then results sorted.
  metrics_text = {}
  for name, lr, row, record in zip(names, [0.001, 0.003], rows, records, strict=True):
    point_dir = tmp_path / 'points' / name
    with open(point_dir / 'config.json') as f:
      run_config = json.load(f)
    assert run_config['optim']['lr'] == lr and run_config['train']['steps'] == 4
    metrics_text[name] = (point_dir / 'metrics.jsonl').read_text()
    last = json.loads(metrics_text[name].splitlines()[-1])
    assert float(row['optim.lr']) == record['optim.lr'] == lr
    assert float(row['loss']) == record['loss'] == last['loss']
    assert int(row['step']) == record['step'] == 4
  assert records[0]['loss'] != records[1]['loss']
  assert 'results (2 of 2 points)' in result.stdout
  assert '8/8 [' in result.stderr and '2/2 runs done' in result.stderr  # The sweep's bar.

  rerun = run_sweep_command(tmp_path, grid)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.count('skipped (finished)') == 2 and 'running' not in rerun.stdout
  for name in names:
    assert (tmp_path / 'points' / name / 'metrics.jsonl').read_text() == metrics_text[name]
  with open(tmp_path / 'results.jsonl') as f:
    assert [json.loads(line) for line in f] == records


def test_a_failed_point_is_reported_and_the_sweep_fails(tmp_path):
  result = run_sweep_command(tmp_path, "--config.sweep.grid={'algorithm': ['nope']}")
  assert result.returncode != 0
  assert 'algorithm=nope: FAILED (exit 1)' in result.stdout
  assert "config.algorithm='nope'" in result.stdout  # The end of the point's log.
  assert 'failed points: algorithm=nope' in result.stderr
  assert not (tmp_path / 'points' / 'algorithm=nope' / sweep.MARKER).exists()
  assert (tmp_path / 'results.jsonl').read_text() == ''
