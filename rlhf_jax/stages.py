"""Experiments made of training runs ("stages"), each in a workdir of its own that a rerun
resumes or skips once finished: what experiments/overoptimization.py and experiments/lecture.py
share.

A stage's config is a preset of configs/<name>.py (`stage_config`) with the experiment's gold
reward, shrunk or grown by the experiment's `stage_overrides` and by the stage's own overrides,
each written as dotted keys ('train.steps'). `run_stages` trains several at once, each in a
process of its own, `stage_waves` orders stages that read one another's models; `initial_policy`
is π_init, pretraining then an SFT stopped early.
"""

import json
import multiprocessing
import os
import time
from concurrent import futures

import jax
import numpy as np
from absl import logging

from rlhf_jax import algorithms
from rlhf_jax.config import load_config, reward_model_paths
from rlhf_jax.engine.progress import RunsProgress
from rlhf_jax.errors import InputError
from rlhf_jax.models.loading import is_export


def finished(workdir: str) -> bool:
  """A stage is done once its model is exported whole (the last thing a run does)."""
  return is_export(os.path.join(workdir, 'hf'))


def run_stage(config, workdir: str) -> str:
  """Trains `config` in `workdir` unless it has finished; returns its exported model."""
  run_stages([(config, workdir)], workers=1)
  return os.path.join(workdir, 'hf')


def run_stages(stages: list[tuple], workers: int) -> None:
  """Trains each unfinished (config, workdir); with workers > 1, that many at once, each in a
  process of its own, without its progress bar (they would overwrite one another): one bar
  counts the steps of all of them instead, read from their metrics.jsonl.

  On a CPU one run leaves cores idle (on a 2-core machine 1.7 of 2 are busy), so two at once
  finish sooner; a process computes exactly what the run computes alone. On an accelerator,
  where one run fills the device, keep workers = 1.
  """
  todo = [(config, workdir) for config, workdir in stages if not finished(workdir)]
  start = time.perf_counter()
  if workers == 1 or len(todo) <= 1:
    for config, workdir in todo:
      algorithms.run(config, workdir)
      logging.warning('%s: %.0f s', workdir, time.perf_counter() - start)
      start = time.perf_counter()
    return
  if jax.process_count() > 1:
    raise InputError('config.workers > 1 runs stages side by side on one host; a multi-host '
                     'run needs config.workers = 1.')
  logging.warning('%s: %d at a time, progress in each metrics.jsonl',
                  ', '.join(workdir for _, workdir in todo), workers)
  quiet = []
  for config, workdir in todo:
    config = config.copy_and_resolve_references()
    config.train.progress_bar = False
    quiet.append((config, workdir))
  progress = RunsProgress([(workdir, config.train.steps) for config, workdir in todo],
                          enabled=any(config.train.progress_bar for config, _ in todo),
                          desc='stages')
  with progress, futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn')) as pool:
    running = {pool.submit(algorithms.run, *stage): stage[1] for stage in quiet}
    for future in futures.as_completed(running):
      future.result()  # A failed stage raises its error here.
      progress.done(running[future])
      logging.warning('%s: done %.0f s after the %d started', running[future],
                      time.perf_counter() - start, len(todo))


def set_keys(config, overrides, *, source: str) -> None:
  """config[a][b] = value for each 'a.b': value of `overrides`; a key the config does not have
  is an error naming `source` (the config and where the override came from)."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for part in path:
      if part not in target:
        raise InputError(f'{source} has no key {key!r}.')
      target = target[part]
    if last not in target:
      raise InputError(f'{source} has no key {key!r}.')
    target[last] = value


def dotted(tree, prefix: str = '') -> dict:
  """{'train': {'steps': 3}} as {'train.steps': 3}."""
  out = {}
  for key, value in tree.items():
    if hasattr(value, 'items'):
      out |= dotted(value, f'{prefix}{key}.')
    else:
      out[f'{prefix}{key}'] = value
  return out


def stage_config(name: str, experiment, **overrides):
  """configs/<name>.py at the experiment's stage preset, with its gold reward and progress bar;
  then experiment.stage_overrides.all and .<name> (nested like a stage config: a preset that
  shrinks every stage, e.g. for a test) and `overrides` (the stage's own, dotted keys)."""
  c = load_config(f'{name}.py:{experiment.stage_preset}')
  c.data.playground.gold = experiment.gold
  c.train.progress_bar = experiment.progress_bar
  shared = experiment.get('stage_overrides', {})
  for scope in ('all', name):
    set_keys(c, dotted(shared.get(scope, {})),
             source=f'configs/{name}.py (set by config.stage_overrides.{scope})')
  set_keys(c, overrides, source=f'configs/{name}.py (set by the experiment\'s {name} stage)')
  return c


def initial_policy(experiment, workdir: str) -> str:
  """π_init: experiment.policy, or pretraining (experiment.pretrain_steps) then an SFT stopped
  early (experiment.sft_steps), in <workdir>/policy/{pretrain,sft}."""
  if experiment.policy:
    return experiment.policy
  base = run_stage(stage_config('pretrain', experiment,
                                **{'train.steps': experiment.pretrain_steps}),
                   os.path.join(workdir, 'policy', 'pretrain'))
  return run_stage(stage_config('sft', experiment, **{'train.steps': experiment.sft_steps,
                                                      'model.hf_path': base}),
                   os.path.join(workdir, 'policy', 'sft'))


def models_read(config) -> set[str]:
  """The model directories a stage reads: its initial model, its reward and value models, the
  policy its preference pairs are sampled from and the teacher that labels them."""
  playground = config.data.get('playground', {})
  paths = {config.model.hf_path, playground.get('pairs', ''),
           playground.get('gold', '').removeprefix('teacher:')}
  if 'rl' in config:
    paths |= set(reward_model_paths(config.rl.reward_model)) | {config.rl.value_model}
  return {path for path in paths if path}


def stage_waves(stages: dict[str, tuple]) -> list[list[str]]:
  """The names of the unfinished stages of {name: (config, workdir)} in waves that `run_stages`
  can train one after another: each after the stages whose exported model (<workdir>/hf) it
  reads."""
  exporter = {os.path.join(workdir, 'hf'): name for name, (_, workdir) in stages.items()}
  needs = {name: {exporter[path] for path in models_read(config) if path in exporter}
           for name, (config, _) in stages.items()}
  waves, done = [], {name for name, (_, workdir) in stages.items() if finished(workdir)}
  while len(done) < len(stages):
    wave = [name for name in stages if name not in done and needs[name] <= done]
    if not wave:
      raise InputError('Stages that read one another\'s models in a cycle: '
                       f'{sorted(set(stages) - done)}.')
    waves.append(wave)
    done |= set(wave)
  return waves


def read_samples(path: str) -> dict:
  """An evaluation's per-prompt 'kl', 'gold' and 'proxy' where measured (evals/samples.py
  writes them) as arrays, and its 'prompt' and 'response' texts."""
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  return {key: np.array([row[key] for row in rows], np.float64)
          for key in ('kl', 'gold', 'proxy', 'win') if key in rows[0]
          } | {key: [row[key] for row in rows] for key in ('prompt', 'response')}


def evaluation_steps(run_dir: str) -> list[int]:
  """The steps at which a run evaluated its samples (<run_dir>/samples/step_<N>.jsonl)."""
  return sorted(int(name.removeprefix('step_').removesuffix('.jsonl'))
                for name in os.listdir(os.path.join(run_dir, 'samples')))
