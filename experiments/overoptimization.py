"""Reward-model overoptimization (Gao, Schulman & Hilton 2022), end to end, in one command.

  python experiments/overoptimization.py --config=configs/overoptimization.py:tiny \
      --workdir=runs/overoptimization

Stages, each a run in <workdir> that a rerun resumes or skips once finished:
  policy/{pretrain,sft}/   the initial policy π_init (unless config.policy names one)
  proxies/<model>-<N>/     a reward model on N gold-labelled comparisons of π_init's samples
  bon/                     n_max answers of π_init per held-out prompt, sampled once
  rl/<proxy>/              PPO against the proxy (no KL penalty by default), evaluated every
                           few iterations on held-out prompts: gold and proxy reward, KL to π_init;
                           with a KL budget (config.rl.stop_kl) it stops once the KL reaches it
The proxies, and then the PPO runs, are trained config.workers at a time, each in a process of
its own.
Then, in <workdir>:
  measurements.jsonl  one record per measured point: proxy, method (bon | rl), kl, d = √kl,
                      gold_reward, proxy_reward, the proxy's size and number of comparisons
  fits.json           R_bon(d) = d(α − βd) and R_RL(d) = d(α − β log d) per proxy: α, β, R²,
                      the peak (d*, gold gain at d*)
  plots/{bon,rl,coefficients}.png   Gao et al.'s figure 1 and the coefficients against data
notebooks/overoptimization.ipynb redraws the plots from a workdir.
"""

import json
import math
import multiprocessing
import os
import time
from concurrent import futures

import jax
import safetensors
from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import algorithms
from rlhf_jax.analysis import overoptimization
from rlhf_jax.config import load_config, model_config_dict
from rlhf_jax.context import RunContext
from rlhf_jax.engine.metrics import read_metrics
from rlhf_jax.evals import best_of_n
from rlhf_jax.models.loading import is_export
from rlhf_jax.playground import tasks
from rlhf_jax.storage import replace_file

def finished(workdir: str) -> bool:
  """A stage is done once its model is exported whole (the last thing a run does)."""
  return is_export(os.path.join(workdir, 'hf'))


def run_stage(config, workdir: str) -> str:
  """Trains `config` in `workdir` unless it has finished; returns its exported model."""
  run_stages([(config, workdir)], workers=1)
  return os.path.join(workdir, 'hf')


def run_stages(stages: list[tuple], workers: int) -> None:
  """Trains each unfinished (config, workdir); with workers > 1, that many at once, each in a
  process of its own (without progress bars, which would overwrite one another).

  On a CPU one run leaves cores idle (on this 2-core machine 1.7 of 2 are busy), so two at once
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
    raise ValueError('config.workers > 1 runs stages side by side on one host; a multi-host '
                     'run needs config.workers = 1.')
  logging.warning('%s: %d at a time, progress in each metrics.jsonl',
                  ', '.join(workdir for _, workdir in todo), workers)
  quiet = []
  for config, workdir in todo:
    config = config.copy_and_resolve_references()
    config.train.progress_bar = False
    quiet.append((config, workdir))
  with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
    running = {pool.submit(algorithms.run, *stage): stage[1] for stage in quiet}
    for future in futures.as_completed(running):
      future.result()  # A failed stage raises its error here.
      logging.warning('%s: done %.0f s after the %d started', running[future],
                      time.perf_counter() - start, len(todo))


def stage_config(name: str, experiment, **overrides):
  """configs/<name>.py at the experiment's stage preset, with its gold reward."""
  c = load_config(f'{name}.py:{experiment.stage_preset}')
  c.data.playground.gold = experiment.gold
  c.train.progress_bar = experiment.progress_bar
  for key, value in overrides.items():
    target = c
    *path, last = key.split('.')
    for part in path:
      target = target[part]
    if last not in target:
      raise KeyError(f'configs/{name}.py has no key {key!r} to set from the experiment\'s config.')
    target[last] = value
  return c


def initial_policy(experiment, workdir: str) -> str:
  """π_init: config.policy, or pretraining then an SFT stopped early."""
  if experiment.policy:
    return experiment.policy
  base = run_stage(stage_config('pretrain', experiment,
                                **{'train.steps': experiment.pretrain_steps}),
                   os.path.join(workdir, 'policy', 'pretrain'))
  return run_stage(stage_config('sft', experiment, **{'train.steps': experiment.sft_steps,
                                                      'model.hf_path': base}),
                   os.path.join(workdir, 'policy', 'sft'))


def train_proxies(experiment, workdir: str, policy: str) -> list[dict]:
  """A reward model per (model, comparisons); each described by name, path, size, data."""
  stages, proxies = [], []
  p = experiment.proxies
  for model in p.models:
    for comparisons in p.comparisons:
      name = f'{model}-{comparisons}'
      # Evaluated once, trained: held-out accuracy and agreement with the gold.
      overrides = {'train.steps': p.steps, 'train.eval_every': p.steps,
                   'train.eval_at_start': False, 'data.playground.pairs': policy,
                   'data.playground.train_size': comparisons,
                   'data.playground.label_temperature': p.label_temperature,
                   'data.tokenizer': policy}
      if model == 'policy':
        overrides['model.hf_path'] = policy
      config = stage_config('rm', experiment, **overrides)
      if model != 'policy':
        config.model = model_config_dict(model, head='scalar')
      stages.append((config, os.path.join(workdir, 'proxies', name)))
      proxies.append((name, comparisons, model))
  run_stages(stages, experiment.workers)
  return [{'proxy': name, 'path': os.path.join(run_dir, 'hf'),
           'proxy_params': count_params(os.path.join(run_dir, 'hf')),
           'proxy_comparisons': comparisons, 'proxy_model': model}
          for (name, comparisons, model), (_, run_dir) in zip(proxies, stages)]


def count_params(hf_dir: str) -> int:
  with safetensors.safe_open(os.path.join(hf_dir, 'model.safetensors'), 'np') as f:
    return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def best_of_n_records(experiment, workdir: str, policy: str, proxies) -> list[dict]:
  """Per proxy and n = 1, 2, 4, … n_max: KL_bon and the chosen answers' gold and proxy reward.

  The n_max answers per prompt are sampled once (<workdir>/bon/answers.json) and shared by all
  proxies, so their curves differ only by the proxy's choices.
  """
  config = stage_config('bon', experiment, **{'model.hf_path': policy, 'data.tokenizer': policy})
  ctx = RunContext(config, os.path.join(workdir, 'bon'))
  prompts = tasks.sample_prompts(config.data.playground.seed, 'eval',
                                 experiment.bon.num_prompts)
  path = os.path.join(workdir, 'bon', 'answers.json')
  if os.path.exists(path):
    with open(path) as f:
      answers = json.load(f)
  else:
    answers = best_of_n.sample_candidates(ctx.load(policy, head='lm', keep=False), config,
                                          ctx.tokenizer, ctx.mesh, prompts,
                                          experiment.bon.n_max)
    if jax.process_index() == 0:
      replace_file(path, json.dumps(answers))
  gold = best_of_n.score_candidates(ctx.gold, prompts, answers)
  records = []
  for proxy in proxies:
    scores = best_of_n.score_candidates(ctx.reward_model(proxy['path']), prompts, answers)
    for point in best_of_n.curve(scores, gold, best_of_n.powers_of_two(experiment.bon.n_max)):
      records.append({**describe(proxy), 'method': 'bon', **point})
  return records


RL_RUN_KEYS = {'steps': 'train.steps', 'eval_every': 'train.eval_every',
               'eval_prompts': 'eval.num_prompts', 'lr': 'optim.lr'}


def ppo_overrides(rl) -> dict:
  """configs/ppo.py's keys set by the experiment's config.rl: its run-level keys (RL_RUN_KEYS)
  name train/eval/optim entries, every other key is one of the PPO config's config.rl."""
  return {RL_RUN_KEYS.get(key, f'rl.{key}'): value for key, value in rl.items()}


def rl_records(experiment, workdir: str, policy: str, proxies) -> list[dict]:
  """Per proxy, PPO against it; a record per evaluation: the Rao–Blackwellised Monte-Carlo KL
  to π_init on held-out prompts, the gold and the proxy reward of the sampled answers."""
  r = experiment.rl
  stages = [(stage_config('ppo', experiment, **ppo_overrides(r), **{
      'model.hf_path': policy, 'rl.reward_model': proxy['path'],
      'train.checkpoint_every': r.eval_every}), os.path.join(workdir, 'rl', proxy['proxy']))
            for proxy in proxies]
  run_stages(stages, experiment.workers)
  records = []
  for proxy, (_, run_dir) in zip(proxies, stages):
    for m in read_metrics(os.path.join(run_dir, 'metrics.jsonl')):
      if 'eval/samples/gold_reward' in m:
        kl = max(m['eval/samples/kl'], 0.0)  # A sum of KLs ≥ 0, but for float rounding.
        records.append({**describe(proxy), 'method': 'rl', 'step': m['step'], 'kl': kl,
                        'd': math.sqrt(kl), 'gold_reward': m['eval/samples/gold_reward'],
                        'proxy_reward': m['eval/samples/proxy_reward']})
  return records


def describe(proxy: dict) -> dict:
  return {k: v for k, v in proxy.items() if k != 'path'}


def analyse(records: list[dict], workdir: str) -> list[dict]:
  """measurements.jsonl, fits.json and the plots; returns the fits."""
  fits = overoptimization.fit_all(records)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'measurements.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)
    with open(os.path.join(workdir, 'fits.json'), 'w') as f:
      json.dump(fits, f, indent=2)
    plots = os.path.join(workdir, 'plots')
    os.makedirs(plots, exist_ok=True)
    for method in overoptimization.METHODS:
      overoptimization.plot_curves(records, fits, os.path.join(plots, f'{method}.png'),
                                   method=method)
    overoptimization.plot_coefficients(fits, os.path.join(plots, 'coefficients.png'),
                                       by='proxy_comparisons')
  return fits


def summary(fits: list[dict]) -> str:
  """A table of the fits: coefficients, R², the fitted peak and the best measured point."""
  lines = [f'{"method":6} {"proxy":14} {"α":>7} {"β":>7} {"R²":>6} {"fit: peak d":>11} '
           f'{"gain":>7} {"measured: best d":>16} {"gain":>7} {"max d":>6}']
  for f in fits:
    peak_d = '—' if f['peak_d'] is None else f'{f["peak_d"]:.2f}'
    peak_gain = '—' if f['peak_gain'] is None else f'{f["peak_gain"]:+.3f}'
    lines.append(f'{f["method"]:6} {f["proxy"]:14} {f["alpha"]:7.3f} {f["beta"]:7.3f} '
                 f'{f["r2"]:6.3f} {peak_d:>11} {peak_gain:>7} {f["best_d"]:16.2f} '
                 f'{f["best_gain"]:+7.3f} {f["max_d"]:6.2f}')
  return '\n'.join(lines)


def run(experiment, workdir: str) -> list[dict]:
  os.makedirs(workdir, exist_ok=True)
  policy = initial_policy(experiment, workdir)
  proxies = train_proxies(experiment, workdir, policy)
  records = (best_of_n_records(experiment, workdir, policy, proxies)
             + rl_records(experiment, workdir, policy, proxies))
  return analyse(records, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  workdir = flags.FLAGS.workdir
  fits = run(flags.FLAGS.config, workdir)
  print(summary(fits))
  print(f'{workdir}: measurements.jsonl, fits.json, plots/ ({time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
  # Defined here, not on import: tests import this module next to others that define --config.
  config_flags.DEFINE_config_file('config', None, 'configs/overoptimization.py:preset')
  flags.DEFINE_string('workdir', None, 'Where every stage and the results go.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
