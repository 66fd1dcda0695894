"""Runs the sweep a config declares (`config.sweep`) and collects its results into one table.

  python -m rlhf_jax.sweep --config=configs/sft.py:tiny --workdir=runs/lr_sweep \
      --config.sweep.grid="{'optim': {'lr': [1e-3, 3e-3]}}" [--workers=2] [--config.*=...]

Every point runs `python -m rlhf_jax.main` in DIR/points/<name> (its output in log.txt) with the
command's --config.* overrides and its swept values; a point that exits 0 gets sweep_point.json
(its values and final metrics), and DIR/results.{csv,jsonl} are rewritten from those. A rerun
skips finished points (run with the same flags) and resumes the others from their checkpoints.
"""

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent import futures

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.errors import InputError
from rlhf_jax.storage import replace_file
from rlhf_jax.engine.metrics import read_metrics
from rlhf_jax.engine.progress import RunsProgress

RANDOM_SPECS = ('choice', 'uniform', 'log_uniform', 'int')  # int: [lo, hi], both included.
MARKER = 'sweep_point.json'
_MAX_NAME = 100
_LOG_TAIL = 15  # Lines of a failed point's log to print.


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # Its directory under DIR/points, from its values.
  values: dict  # Dotted config key -> value, keys sorted.


def _leaves(declared, config, where: str, prefix: str = '') -> dict:
  """Dotted key -> leaf of a sweep declaration nested like the config; unknown keys raise."""
  leaves = {}
  for name, value in declared.items():
    key = prefix + name
    if name not in config:
      raise InputError(f'{where}: unknown config key {key!r}')
    if isinstance(config[name], ml_collections.ConfigDict):
      if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        raise InputError(f'{where}: {key!r} is a group of keys; sweep its entries instead.')
      leaves.update(_leaves(value, config[name], where, key + '.'))
    else:
      leaves[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return leaves


def _check_spec(key: str, spec) -> None:
  where = f'config.sweep.random: {key!r}'
  if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in RANDOM_SPECS:
    raise InputError(f'{where} needs one of {list(RANDOM_SPECS)} as its only key, got {spec!r}')
  kind, arg = next(iter(spec.items()))
  if not isinstance(arg, (list, tuple)) or not arg:
    raise InputError(f'{where}: {kind} needs a non-empty list, got {arg!r}')
  if kind == 'choice':
    return
  if len(arg) != 2 or not arg[0] <= arg[1]:
    raise InputError(f'{where}: {kind} needs [lo, hi] with lo <= hi, got {arg!r}')
  if kind == 'int' and not all(isinstance(bound, int) for bound in arg):
    raise InputError(f'{where}: int needs integer bounds, got {arg!r}')
  if kind == 'log_uniform' and arg[0] <= 0:
    raise InputError(f'{where}: log_uniform needs 0 < lo, got {arg!r}')


def draw(spec: dict, rng: np.random.Generator):
  """One value of a random spec; floats are rounded to 4 significant digits (readable names)."""
  kind, arg = next(iter(spec.items()))
  if kind == 'choice':
    return arg[int(rng.integers(len(arg)))]
  if kind == 'int':
    return int(rng.integers(arg[0], arg[1], endpoint=True))
  lo, hi = (math.log(arg[0]), math.log(arg[1])) if kind == 'log_uniform' else arg
  value = float(rng.uniform(lo, hi))
  value = math.exp(value) if kind == 'log_uniform' else value
  return min(max(float(f'{value:.4g}'), arg[0]), arg[1])


def flag_value(value) -> str:
  """How config_flags reads `value` back from --config.key=<this>."""
  if isinstance(value, str):
    return value
  if isinstance(value, ml_collections.ConfigDict):
    return repr(value.to_dict())
  return repr(value)


def point_name(values: Mapping) -> str:
  """'optim.lr=0.001,rl.kl_coef=0.1'; a short hash is added when made safe or shortened."""
  raw = ','.join(f'{key}={flag_value(value)}' for key, value in values.items()) or 'default'
  safe = re.sub(r'[^A-Za-z0-9._=,+-]', '_', raw)
  if safe == raw and len(raw) <= _MAX_NAME:
    return raw
  return f'{safe[:_MAX_NAME - 9]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}'


def _typed_by_config(config, values: Mapping) -> dict:
  """The values as the config holds them (an int given to a float key becomes a float)."""
  config = config.copy_and_resolve_references()
  stored = {}
  for key, value in values.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    try:
      node[name] = value
    except (TypeError, ValueError) as e:
      raise InputError(f'config.sweep: {key}={value!r} does not fit the config: {e}') from e
    stored[key] = node[name]
  return stored


def expand(config) -> list[Point]:
  """The points of `config.sweep`, in order: the grid's product (keys sorted, the first varying
  slowest), each with `num_random` draws of the random keys from default_rng(seed)."""
  sweep = config.sweep
  grid = _leaves(sweep.grid, config, 'config.sweep.grid')
  random = _leaves(sweep.random, config, 'config.sweep.random')
  for key, values in grid.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise InputError(f'config.sweep.grid: {key!r} needs a non-empty list, got {values!r}')
  for key, spec in random.items():
    _check_spec(key, spec)
  if both := sorted(grid.keys() & random.keys()):
    raise InputError(f'config.sweep: {both} are in both grid and random.')
  if bool(random) != (sweep.num_random > 0):
    raise InputError(f'config.sweep.num_random={sweep.num_random} with random keys '
                     f'{sorted(random)}: give both or neither.')
  rng = np.random.default_rng(sweep.seed)
  points = {}
  for combination in itertools.product(*(grid[key] for key in sorted(grid))):
    for _ in range(max(sweep.num_random, 1)):
      values = {**dict(zip(sorted(grid), combination)),
                **{key: draw(random[key], rng) for key in sorted(random)}}
      values = _typed_by_config(config, dict(sorted(values.items())))
      points.setdefault(point_name(values), values)  # Repeated draws run once.
  return [Point(name, values) for name, values in points.items()]


def point_flags(point: Point, *, config_file: str, overrides: Mapping) -> list[str]:
  """rlhf_jax.main's flags for `point` (but --workdir): the overrides, then its values."""
  values = {**overrides, **point.values}
  return [f'--config={config_file}', *(f'--config.{k}={flag_value(v)}' for k, v in values.items())]


def point_steps(point: Point, config, overrides: Mapping) -> int:
  """The steps `point` trains for (its config.train.steps), for the sweep's progress bar."""
  return int({**overrides, **point.values}.get('train.steps', config.train.steps))


def final_metrics(records: list[dict]) -> dict:
  """The last value of every metric key (and the last step) of metrics.jsonl records."""
  return {key: value for record in records for key, value in record.items()}


def _read_marker(point_dir: str) -> dict | None:
  try:
    with open(os.path.join(point_dir, MARKER)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def format_table(rows: list[dict], columns: list[str]) -> str:
  """Aligned text columns; floats with 4 significant digits."""
  cells = [[f'{row[c]:.4g}' if isinstance(row.get(c), float) else str(row.get(c, ''))
            for c in columns] for row in rows]
  widths = [max(len(text) for text in column) for column in zip(columns, *cells)]
  return '\n'.join('  '.join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                   for line in [columns, *cells])


def write_results(points: list[Point], workdir: str) -> tuple[list[dict], list[str]]:
  """DIR/results.{jsonl,csv} from the finished points' markers; returns (rows, columns)."""
  markers = [_read_marker(os.path.join(workdir, 'points', p.name)) for p in points]
  rows = [{**p.values, **m['result']} for p, m in zip(points, markers) if m is not None]
  result_keys = {key for m in markers if m is not None for key in m['result']}
  columns = list(points[0].values) + sorted(result_keys - set(points[0].values))
  replace_file(os.path.join(workdir, 'results.jsonl'),
               ''.join(json.dumps(row) + '\n' for row in rows))
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, columns)
  writer.writeheader()
  writer.writerows(rows)
  replace_file(os.path.join(workdir, 'results.csv'), table.getvalue())
  return rows, columns


def _log_tail(point_dir: str) -> str:
  with open(os.path.join(point_dir, 'log.txt')) as f:
    return ''.join(f'    {line}' for line in f.readlines()[-_LOG_TAIL:]).rstrip('\n')


def _run_point(point: Point, point_dir: str, args: list[str], label: str) -> bool:
  """Runs one point to the end and, if it exits 0, marks it finished; returns whether it did."""
  print(f'{label}: running', flush=True)
  command = [sys.executable, '-m', 'rlhf_jax.main', f'--workdir={point_dir}', *args]
  start = time.time()
  with open(os.path.join(point_dir, 'log.txt'), 'a') as log:
    log.write(f'=== {time.strftime("%Y-%m-%d %H:%M:%S")}: {" ".join(command)}\n')
    log.flush()
    returncode = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, check=False).returncode
  seconds = time.time() - start
  if returncode != 0:
    print(f'{label}: FAILED (exit {returncode}) after {seconds:.0f} s; the end of '
          f'{point_dir}/log.txt:\n{_log_tail(point_dir)}', flush=True)
    return False
  metrics_path = os.path.join(point_dir, 'metrics.jsonl')
  result = final_metrics(read_metrics(metrics_path)) if os.path.exists(metrics_path) else {}
  replace_file(os.path.join(point_dir, MARKER), json.dumps(
      {'values': point.values, 'result': result, 'flags': args}, indent=2) + '\n')
  print(f'{label}: finished in {seconds:.0f} s at step {result.get("step")}', flush=True)
  return True


def run_sweep(config, *, config_file: str, workdir: str, overrides: Mapping | None = None,
              workers: int = 1) -> list[str]:
  """Runs the unfinished points of `config.sweep`, `workers` at a time; returns the failed
  points' names. `overrides` (dotted key -> value, as given to --config.*) go to every point,
  but those of `sweep` itself."""
  points = expand(config)
  overrides = {key: value for key, value in (overrides or {}).items()
               if key.split('.')[0] != 'sweep'}
  print(f'sweep: {len(points)} points in {workdir}/points, {workers} at a time', flush=True)
  todo, steps, finished = [], [], []
  for i, point in enumerate(points, 1):
    point_dir = os.path.join(workdir, 'points', point.name)
    label = f'[{i}/{len(points)}] {point.name}'
    args = point_flags(point, config_file=config_file, overrides=overrides)
    steps.append((point_dir, point_steps(point, config, overrides)))
    marker = _read_marker(point_dir)
    if marker is not None and marker['flags'] == args:
      print(f'{label}: skipped (finished)')
      finished.append(point_dir)
      continue
    os.makedirs(point_dir, exist_ok=True)
    todo.append((point, point_dir, args, label))
  write_results(points, workdir)

  failures = []
  pool = futures.ThreadPoolExecutor(workers)
  # One bar over all points: the steps in their metrics.jsonl (the points' own bars are in
  # their logs), the finished ones whole.
  with RunsProgress(steps, done=finished, desc='sweep') as progress:
    try:
      running = {pool.submit(_run_point, *job): job for job in todo}
      for future in futures.as_completed(running):
        point, point_dir = running[future][:2]
        progress.done(point_dir)
        if not future.result():
          failures.append(point.name)
        write_results(points, workdir)
    finally:
      pool.shutdown(cancel_futures=True)  # On Ctrl-C, start no more points.

  rows, columns = write_results(points, workdir)
  print(format_table(rows, columns))
  print(f'results ({len(rows)} of {len(points)} points): {workdir}/results.csv, '
        f'{workdir}/results.jsonl', flush=True)
  return failures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_flag = flags.FLAGS['config']
  failures = run_sweep(config_flag.value, config_file=config_flags.get_config_filename(config_flag),
                       workdir=flags.FLAGS.workdir, workers=flags.FLAGS.workers,
                       overrides=config_flags.get_override_values(config_flag))
  if failures:
    sys.exit(f'sweep: failed points: {", ".join(failures)}')


if __name__ == '__main__':
  # Defined here, not on import: the library's users (tests, notebooks) may define their own.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file[:preset].',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Sweep directory: points/ and results.{csv,jsonl}.')
  flags.DEFINE_integer('workers', 1, 'Points run at the same time.', lower_bound=1)
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
