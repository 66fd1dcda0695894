"""Reward-model overoptimization (Gao, Schulman & Hilton 2022), end to end, in one command.

  python experiments/overoptimization.py --config=configs/overoptimization.py:tiny \
      --workdir=runs/overoptimization

Stages, each a run in <workdir> that a rerun resumes or skips once finished:
  policy/{pretrain,sft}/   the initial policy π_init (unless config.policy names one)
  proxies/<model>-<N>/     a reward model on N gold-labelled comparisons of π_init's samples
                           (-seed<m>: ensemble members; backbones/policy-L<k>: the policy's
                           first k layers, for smaller proxies; warm/: the members' average)
  bon/                     per seed, n_max answers of π_init per held-out prompt, sampled once
  rl/<target>/seed<s>/     PPO against a proxy or an ensemble (no KL penalty by default;
                           -kl<β>: under config.kl_coefs' β) with config.seed = s, evaluated
                           every few iterations on held-out prompts: gold and proxy reward, KL
                           to π_init; with a KL budget (config.rl.stop_kl) it stops once the KL
                           reaches it
The proxies, and then the PPO runs, are trained config.workers at a time, each in a process of
its own. Every curve is measured for each of config.seeds (the policy's side: best-of-n's
answers, PPO's rollouts, minibatch order and evaluation answers; the proxies are shared).
Then, in <workdir>:
  measurements.jsonl  one record per run (proxy, seed) and measured point: method (bon | rl),
                      kl, d = √kl, gold_reward, proxy_reward, the proxy's size and comparisons
  per_prompt.npz      the same per held-out prompt (analysis.overoptimization.load_runs)
  fits.json           R_bon(d) = d(α − βd) and R_RL(d) = d(α − β log d) fitted to each proxy's
                      curve averaged over seeds: α, β, R², the peak (d*, gold gain at d*), with
                      bootstrap intervals over seeds and prompts, whether it rises and falls
                      (measured: a point whose interval lies above 0, then below the best);
                      each seed's fit; whether the proxy on more data peaks later and higher
                      best-of-n's exact KL next to the formula's, per n and task, and the fits
                      on it; by preset, data_scaling, size_scaling, kl_penalty, and ensembles,
                      warm and early_stop (`analyse`)
  plots/{bon,rl,coefficients,bon_exact_kl,gold_vs_proxy}.png   Gao et al.'s figure 1 (seeds,
                      mean, band, fit), the coefficients against data, best-of-n against the
                      exact KL, gold against proxy reward for both methods; and where the
                      preset has them coefficients_by_size.png, kl_penalty.png
notebooks/overoptimization.ipynb redraws the plots from a workdir.
"""

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
import safetensors
from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import parallel
from rlhf_jax.analysis import overoptimization
from rlhf_jax.config import model_config_dict, reward_model_paths
from rlhf_jax.context import RunContext
from rlhf_jax.engine.metrics import log_media, read_metrics
from rlhf_jax.evals import best_of_n, bon_kl
from rlhf_jax.models import save_first_layers
from rlhf_jax.models.loading import is_export
from rlhf_jax.playground import tasks
from rlhf_jax.rewards.ensemble import aggregate, warm_average
from rlhf_jax.stages import initial_policy, read_samples, run_stages, stage_config
from rlhf_jax.storage import replace_file


def proxy_specs(proxies, batch_size: int) -> list[dict]:
  """The proxies to train: per (model, comparisons) one trained proxies.steps, and per
  (comparisons, epochs) of proxies.epochs one of the first model trained that many epochs
  (comparisons · epochs / batch_size steps); each {'proxy': name, 'proxy_model',
  'proxy_comparisons', 'proxy_steps', 'proxy_epochs', 'proxy_seed'}. With several
  proxies.seeds, one proxy per seed of each (the members of an ensemble: '<name>-seed<s>')."""
  specs = [(model, comparisons, proxies.steps)
           for model in proxies.models for comparisons in proxies.comparisons]
  specs += [(proxies.models[0], comparisons, comparisons * epochs // batch_size)
            for comparisons, epochs in proxies.epochs]
  out = []
  for model, comparisons, steps in specs:
    epochs = steps * batch_size / comparisons
    name = f'{model}-{comparisons}' + ('' if steps == proxies.steps else f'-{epochs:g}ep')
    for seed in proxies.seeds:
      out.append({'proxy': name + (f'-seed{seed}' if len(proxies.seeds) > 1 else ''),
                  'proxy_model': model, 'proxy_comparisons': comparisons,
                  'proxy_steps': steps, 'proxy_epochs': epochs, 'proxy_seed': seed})
  return out


def train_proxies(experiment, workdir: str, policy: str) -> list[dict]:
  """The reward models of `proxy_specs`, each described by its spec, path, size and held-out
  accuracy and agreement with the gold."""
  p = experiment.proxies
  proxies = proxy_specs(p, stage_config('rm', experiment).train.batch_size)
  stages = []
  for proxy in proxies:
    # Evaluated once, trained: held-out accuracy and agreement with the gold.
    steps = proxy['proxy_steps']
    overrides = {'train.steps': steps, 'train.eval_every': steps,
                 'train.eval_at_start': False, 'data.playground.pairs': policy,
                 'data.playground.train_size': proxy['proxy_comparisons'],
                 'data.playground.label_temperature': p.label_temperature,
                 'data.playground.pair_temperature': p.answer_temperature,
                 'data.tokenizer': policy, 'seed': proxy['proxy_seed'],
                 'data.seed': proxy['proxy_seed']}  # The order of its data.
    backbone = proxy_backbone(proxy['proxy_model'], policy, workdir)
    if backbone:
      overrides['model.hf_path'] = backbone
    config = stage_config('rm', experiment, **overrides)
    if not backbone:
      config.model = model_config_dict(proxy['proxy_model'], head='scalar')
    stages.append((config, os.path.join(workdir, 'proxies', proxy['proxy'])))
  run_stages(stages, experiment.workers)
  for proxy, (_, run_dir) in zip(proxies, stages):
    evaluation = [m for m in read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
                  if 'eval/pairs/accuracy' in m][-1]
    proxy |= {'path': os.path.join(run_dir, 'hf'),
              'proxy_params': count_params(os.path.join(run_dir, 'hf')),
              'proxy_accuracy': evaluation['eval/pairs/accuracy'],
              'proxy_gold_agreement': evaluation['eval/pairs/gold_agreement']}
  return proxies


def proxy_backbone(model: str, policy: str, workdir: str) -> str | None:
  """Where a proxy of config.proxies.models starts: 'policy', the policy; 'policy-L<k>', the
  policy's first k layers (<workdir>/proxies/backbones/policy-L<k>, `save_first_layers`:
  smaller proxies with the same pretraining); a model preset, None (from scratch)."""
  if model == 'policy':
    return policy
  if not model.startswith('policy-L'):
    return None
  layers = model.removeprefix('policy-L')
  if not layers.isdigit():
    raise ValueError(f'config.proxies.models: {model!r} is not policy-L<number of layers>.')
  path = os.path.join(workdir, 'proxies', 'backbones', model)
  if jax.process_index() == 0 and not is_export(path):
    save_first_layers(policy, path, int(layers))
  parallel.barrier(f'proxy_backbone {path}')  # Whole before any process trains on it.
  return path


def count_params(hf_dir: str) -> int:
  with safetensors.safe_open(os.path.join(hf_dir, 'model.safetensors'), 'np') as f:
    return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def reward_targets(experiment, workdir: str, proxies) -> list[dict]:
  """What each method optimises: {'name', 'spec' (a reward-model directory, or several
  separated by commas), 'aggregation', 'methods', 'metadata'}.

  Without an ensemble (config.ensemble.members = 0) every proxy, under both methods. With one,
  proxies.seeds are its members (Coste et al. 2023): each member under best-of-n, the first
  also under PPO (the single-proxy baseline); per aggregation of ensemble.aggregations, their
  ensemble ('ensemble-<aggregation>') under best-of-n, and under PPO if in
  ensemble.rl_aggregations; with ensemble.warm, their weight average ('warm', Ramé et al. 2024)
  under best-of-n.
  """
  e = experiment.ensemble
  if not e.members:
    return [{'name': p['proxy'], 'spec': p['path'], 'aggregation': 'mean',
             'methods': experiment.methods, 'metadata': describe(p)} for p in proxies]
  if len(proxies) != e.members:
    raise ValueError(f'config.ensemble.members={e.members} but the proxies are {len(proxies)} '
                     f'({[p["proxy"] for p in proxies]}): an ensemble takes one proxy model and '
                     'number of comparisons, one member per seed of config.proxies.seeds.')
  members = {'ensemble_members': len(proxies)}
  targets = [{'name': p['proxy'], 'spec': p['path'], 'aggregation': 'mean',
              'methods': experiment.methods if i == 0 else ('bon',), 'metadata': describe(p)}
             for i, p in enumerate(proxies)]
  spec = ','.join(p['path'] for p in proxies)
  for aggregation in e.aggregations:
    targets.append({'name': f'ensemble-{aggregation}', 'spec': spec, 'aggregation': aggregation,
                    'methods': ('bon', 'rl') if aggregation in e.rl_aggregations else ('bon',),
                    'metadata': members | {'aggregation': aggregation}})
  if e.warm:
    path = os.path.join(workdir, 'proxies', 'warm')
    if not is_export(path):
      warm_average([p['path'] for p in proxies], path)
    targets.append({'name': 'warm', 'spec': path, 'aggregation': 'mean', 'methods': ('bon',),
                    'metadata': members | {'aggregation': 'warm'}})
  return [t for t in targets if set(t['methods']) & set(experiment.methods)]


def scoring_context(experiment, workdir: str, policy: str) -> tuple:
  """(the best-of-n stage's config, a RunContext on it in <workdir>/bon): π_init's tokenizer,
  the gold reward and reward models that score answers as long as PPO's."""
  config = stage_config('bon', experiment, **{
      'model.hf_path': policy, 'data.tokenizer': policy, 'data.playground.tasks': experiment.tasks,
      'data.max_prompt_len': experiment.rl.max_prompt_len,
      'eval.max_new_tokens': experiment.rl.max_new_tokens})
  return config, RunContext(config, os.path.join(workdir, 'bon'))


def best_of_n_runs(experiment, workdir: str, policy: str, targets) -> tuple[list, list, list]:
  """Per target (`reward_targets`) and seed, the best-of-n curve over n = 1, 2, 4, … n_max: per
  prompt the expected gold and proxy reward of the target's choice
  (`best_of_n.expected_rewards`), against KL_bon = log n − (n−1)/n and against the exact KL of
  best-of-n over the prompt's sampled answers (`bon_kl`: answers repeat, and the formula is then
  only an upper bound).

  Seed s is its own n_max answers per prompt, drawn with keys config.seed + s·n_max + j, sampled
  once (<workdir>/bon/answers_seed<s>.json) and shared by all targets, so that their curves
  differ only by the targets' choices. Each reward model scores every answer once; an
  ensemble's score is the aggregate of its members' scores, each standardised over one answer
  per prompt (the first seed's first: `rewards.ensemble`).

  Returns (runs on the formula's KL, the same runs on the exact KL, the KL table: per target and
  n, the formula, the exact KL (mean over prompts and seeds, and per task) and best-of-n's win
  rate under the target against an answer of π_init, next to its bound n/(n+1)).
  """
  config, ctx = scoring_context(experiment, workdir, policy)
  n_max = experiment.bon.n_max
  prompts = tasks.playground_prompts(config.data.playground, 'eval', experiment.bon.num_prompts)
  task_N = np.array([tasks.task_of(p) for p in prompts])
  ns = best_of_n.powers_of_two(n_max)
  answers = {}
  for seed in experiment.seeds:
    path = os.path.join(workdir, 'bon', f'answers_seed{seed}.json')
    if os.path.exists(path):
      with open(path) as f:
        answers[seed] = json.load(f)
      continue
    first = config.seed + seed * n_max
    answers[seed] = best_of_n.sample_candidates(ctx.load(policy, head='lm'), config,
                                                ctx.tokenizer, ctx.mesh, prompts,
                                                range(first, first + n_max))
    if jax.process_index() == 0:
      replace_file(path, json.dumps(answers[seed]))
  ctx.release(policy, head='lm')
  gold = {seed: best_of_n.score_candidates(ctx.gold, prompts, a) for seed, a in answers.items()}
  raw = {}  # Per reward-model directory and seed: its scores [N, K] of every answer.
  for target in targets:
    for path in reward_model_paths(target['spec']):
      if path not in raw:
        reward = ctx.reward_model(path)
        raw[path] = {seed: best_of_n.score_candidates(reward, prompts, a)
                     for seed, a in answers.items()}
        ctx.release(path, head='scalar')
  runs, exact_runs, table = [], [], []
  first_seed = experiment.seeds[0]
  for target in targets:
    paths = reward_model_paths(target['spec'])
    exact_kl, win_rate = {n: [] for n in ns}, {n: [] for n in ns}
    for seed, seed_answers in answers.items():
      scores_NxK = raw[paths[0]][seed]
      if len(paths) > 1:  # Members standardised over the reference answers, then aggregated.
        scores_NxK = aggregate(overoptimization.standardize(
            np.stack([raw[path][seed] for path in paths]),
            np.stack([raw[path][first_seed][:, 0] for path in paths])),
                               target['aggregation'],
                               uncertainty_weight=experiment.ensemble.uncertainty_weight)
      expected = [best_of_n.expected_rewards(scores_NxK, gold[seed], n) for n in ns]
      run = overoptimization.Run(
          method='bon', proxy=target['name'], seed=seed, points=tuple({'n': n} for n in ns),
          kl_PxI=np.repeat([[best_of_n.kl_best_of_n(n)] for n in ns], len(prompts), axis=1),
          gold_PxI=np.array([g for _, g in expected]),
          proxy_PxI=np.array([p for p, _ in expected]), metadata=target['metadata'])
      distributions = [bon_kl.empirical_distribution(a, s)
                       for a, s in zip(zip(*seed_answers), scores_NxK)]
      for n in ns:
        exact_kl[n].append([bon_kl.kl_best_of_n_exact(*d, n) for d in distributions])
        win_rate[n].append([bon_kl.win_rate_best_of_n(*d, n) for d in distributions])
      runs.append(run)
      exact_runs.append(dataclasses.replace(run, kl_PxI=np.array([exact_kl[n][-1] for n in ns])))
    for n in ns:
      exact_SxN = np.array(exact_kl[n])
      table.append({'proxy': target['name'], 'n': n, 'formula': best_of_n.kl_best_of_n(n),
                    'exact': float(exact_SxN.mean()),
                    'exact_by_task': {t: float(exact_SxN[:, task_N == t].mean())
                                      for t in sorted(set(task_N))},
                    'win_rate': float(np.mean(win_rate[n])), 'win_rate_bound': n / (n + 1)})
  return runs, exact_runs, table


RL_RUN_KEYS = {'steps': 'train.steps', 'eval_every': 'train.eval_every',
               'eval_prompts': 'eval.num_prompts', 'lr': 'optim.lr',
               'max_prompt_len': 'data.max_prompt_len'}


def ppo_overrides(rl) -> dict:
  """configs/ppo.py's keys set by the experiment's config.rl: its run-level keys (RL_RUN_KEYS)
  name train/eval/data/optim entries, every other key is one of the PPO config's config.rl.
  Sequences hold a prompt and an answer (train.seq_len), evaluation answers as long as
  training's."""
  return {RL_RUN_KEYS.get(key, f'rl.{key}'): value for key, value in rl.items()} | {
      'train.seq_len': rl.max_prompt_len + rl.max_new_tokens,
      'eval.max_new_tokens': rl.max_new_tokens}


def rl_runs(experiment, workdir: str, policy: str, targets) -> list:
  """Per target (`reward_targets`), KL coefficient and seed, PPO against the target with
  config.seed = s (its rollouts, minibatch order and evaluation answers) in
  <workdir>/rl/<curve>/seed<s>, where the curve is the target's name, with -kl<β> for a
  coefficient β ≠ 0; per evaluation and held-out prompt, the Rao–Blackwellised Monte-Carlo KL to
  π_init along the sampled answer, its gold and proxy reward (the run's
  samples/step_<N>.jsonl)."""
  r = experiment.rl
  stages, labels = [], []
  for seed in experiment.seeds:  # Seed by seed: side by side, the targets' runs take alike.
    for target in targets:
      for kl_coef in experiment.kl_coefs:
        curve = target['name'] + (f'-kl{kl_coef:g}' if kl_coef else '')
        stages.append((stage_config('ppo', experiment, **ppo_overrides(r), **{
            'model.hf_path': policy, 'rl.reward_model': target['spec'],
            'rl.reward_aggregation': target['aggregation'],
            'rl.uncertainty_weight': experiment.ensemble.uncertainty_weight,
            'rl.kl_coef': kl_coef, 'seed': seed, 'train.checkpoint_every': r.eval_every,
            'data.playground.tasks': experiment.tasks}),
                       os.path.join(workdir, 'rl', curve, f'seed{seed}')))
        labels.append((curve, target, kl_coef, seed))
  run_stages(stages, experiment.workers)
  runs = []
  for (curve, target, kl_coef, seed), (_, run_dir) in zip(labels, stages):
    steps = [m['step'] for m in read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
             if 'eval/samples/gold_reward' in m]
    measured = [read_samples(os.path.join(run_dir, 'samples', f'step_{step}.jsonl'))
                for step in steps]
    runs.append(overoptimization.Run(
        method='rl', proxy=curve, seed=seed, points=tuple({'step': t} for t in steps),
        **{f'{key}_PxI': np.array([m[key] for m in measured]) for key in ('kl', 'gold', 'proxy')},
        metadata=target['metadata'] | {'proxy_name': target['name'], 'kl_coef': kl_coef}))
  return runs


def mitigations(experiment, workdir: str, policy: str, proxies, targets) -> dict:
  """With an ensemble (config.ensemble.members > 0), fits.json's
    'warm': each member's, the prediction ensemble's (the mean of the members' standardised
        scores) and WARM's `pair_accuracy` on pairs of π_init's answers (best-of-n's first two
        per prompt, first seed: in distribution) and on pairs of the optimised policies'
        answers (each PPO run's first and last evaluation answer to a prompt: out of
        distribution), with the member that is best in distribution;
    'early_stop': per PPO curve, seed and rule, a stop point judged by the gold (`judge_stop`)
        and the means over seeds. Rules: 'disagreement' (`stop_before_disagreement` on the
        members' `disagreement` over the run's evaluation answers, standardised on its first
        evaluation's, π_init's) and, for a run against one member, 'held_out' (the peak of the
        other members' standardised score, `stop_at_held_out_peak`).
  """
  e = experiment.ensemble
  _, ctx = scoring_context(experiment, workdir, policy)
  models = {p['proxy']: p['path'] for p in proxies}
  models |= {t['name']: t['spec'] for t in targets if t['name'] == 'warm'}
  rewards = {name: ctx.reward_model(path) for name, path in models.items()}
  members = [p['proxy'] for p in proxies]

  def scores(prompts, responses) -> dict[str, np.ndarray]:
    return {name: reward(prompts, responses) for name, reward in rewards.items()}

  with open(os.path.join(workdir, 'bon', f'answers_seed{experiment.seeds[0]}.json')) as f:
    first_two = json.load(f)[:2]
  prompts = tasks.playground_prompts(ctx.config.data.playground, 'eval',
                                     experiment.bon.num_prompts)
  pairs = {'in_distribution': [(prompts, answers, ctx.gold(prompts, answers))
                               for answers in first_two]}
  evaluations = {}  # Per PPO run directory: its evaluations, each read_samples.
  for curve in sorted(os.listdir(os.path.join(workdir, 'rl'))):
    for seed in experiment.seeds:
      run_dir = os.path.join(workdir, 'rl', curve, f'seed{seed}')
      steps = sorted(int(name.removeprefix('step_').removesuffix('.jsonl'))
                     for name in os.listdir(os.path.join(run_dir, 'samples')))
      evaluations[curve, seed] = [read_samples(os.path.join(run_dir, 'samples',
                                                            f'step_{step}.jsonl'))
                                  for step in steps]
  firsts, lasts = zip(*[(evaluation[0], evaluation[-1]) for evaluation in evaluations.values()])
  pairs['out_of_distribution'] = [
      (sum((e['prompt'] for e in side), []), sum((e['response'] for e in side), []),
       np.concatenate([e['gold'] for e in side])) for side in (firsts, lasts)]
  reference = scores(*pairs['in_distribution'][0][:2])  # π_init's answers: standardisation.
  reference_MxI = np.stack([reference[m] for m in members])
  warm = {}
  for split, ((prompts_a, answers_a, gold_a), (prompts_b, answers_b, gold_b)) in pairs.items():
    side_a, side_b = scores(prompts_a, answers_a), scores(prompts_b, answers_b)
    for side in (side_a, side_b):
      side['ensemble'] = overoptimization.standardize(np.stack([side[m] for m in members]),
                                                      reference_MxI).mean(axis=0)
    warm[split] = {name: overoptimization.pair_accuracy(side_a[name], side_b[name], gold_a,
                                                        gold_b) for name in side_a}
  best_member = max(members, key=lambda m: warm['in_distribution'][m]['accuracy'] or 0.0)
  warm['best_member_in_distribution'] = best_member
  stops = []
  for (curve, seed), evaluation in evaluations.items():
    member_MxPxI = np.array([[rewards[m](point['prompt'], point['response'])
                              for point in evaluation] for m in members])
    gain_P = np.array([point['gold'].mean() for point in evaluation])
    gain_P -= gain_P[0]
    d_P = np.sqrt(np.maximum([point['kl'].mean() for point in evaluation], 0.0))
    disagreement_P = overoptimization.disagreement(member_MxPxI, member_MxPxI[:, 0])
    rules = {'disagreement': overoptimization.stop_before_disagreement(
        disagreement_P, rise=e.early_stop_rise)}
    if curve in members:  # Optimised against one member: the others are held out.
      held_out = [i for i, m in enumerate(members) if m != curve]
      rules['held_out'] = overoptimization.stop_at_held_out_peak(overoptimization.standardize(
          member_MxPxI[held_out], member_MxPxI[held_out, 0]).mean(axis=(0, 2)))
    for rule, stop_index in rules.items():
      stops.append({'curve': curve, 'seed': seed, 'rule': rule,
                    **overoptimization.judge_stop(stop_index, gain_P),
                    'd_at_stop': float(d_P[stop_index]),
                    'disagreement': disagreement_P.tolist()})
  means = []
  for curve, rule in dict.fromkeys((stop['curve'], stop['rule']) for stop in stops):
    rows = [stop for stop in stops if (stop['curve'], stop['rule']) == (curve, rule)]
    means.append({'curve': curve, 'rule': rule, 'seeds': len(rows), **{
        key: float(np.mean([row[key] for row in rows]))
        for key in ('gain_at_stop', 'best_gain', 'final_gain', 'regret', 'd_at_stop')}})
  return {'warm': warm, 'early_stop': {'rise': e.early_stop_rise, 'runs': stops,
                                       'means': means}}


def describe(proxy: dict) -> dict:
  return {k: v for k, v in proxy.items() if k not in ('path', 'proxy')}


def analyse(experiment, runs, bon_exact_runs, bon_kl_table, workdir: str, extra: dict,
            ensemble_curves: list[str]) -> dict:
  """measurements.jsonl (a record per run and point), per_prompt.npz (every prompt's
  measurements), fits.json and the plots; returns fits.json's summary: `overoptimization.summarize`
  of the runs, with 'data_scaling' (`overoptimization.scaling` of the proxies trained
  config.proxies.steps), 'bon_kl' (the KL table of `best_of_n_runs`), 'bon_exact_kl' (the
  fits of best-of-n's curves against d = √(exact KL)), 'kl_penalty'
  (`overoptimization.kl_penalty`: RL's curves under the KL coefficients config.kl_coefs),
  'size_scaling' (`overoptimization.size_scaling`: proxies of several sizes), 'ensembles'
  (`overoptimization.mitigation_table` of the members, ensembles and WARM) and `extra`
  (`mitigations`)."""
  exact = overoptimization.summarize(bon_exact_runs) if bon_exact_runs else {'fits': []}
  summary = overoptimization.summarize(runs)
  equal_steps = [f for f in summary['fits'] if f.get('proxy_steps') == experiment.proxies.steps]
  summary |= {'data_scaling': overoptimization.scaling(equal_steps), 'bon_kl': bon_kl_table,
              'bon_exact_kl': exact['fits'], 'kl_penalty': overoptimization.kl_penalty(runs),
              'size_scaling': overoptimization.size_scaling(summary['fits']),
              'ensembles': overoptimization.mitigation_table(summary['fits'], ensemble_curves),
              **extra}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'measurements.jsonl'), 'w') as f:
      f.writelines(json.dumps(record) + '\n' for run in runs for record in run.records())
    overoptimization.save_runs(runs, os.path.join(workdir, 'per_prompt.npz'))
    with open(os.path.join(workdir, 'fits.json'), 'w') as f:
      json.dump(summary, f, indent=1)
    plots = os.path.join(workdir, 'plots')
    os.makedirs(plots, exist_ok=True)
    figures = {}

    def plot(name: str, draw, *args, **kwargs):
      figures[f'plots/{name}'] = draw(*args, os.path.join(plots, f'{name}.png'), **kwargs)
    for method in experiment.methods:
      plot(method, overoptimization.plot_curves, summary, runs, method=method)
    if bon_exact_runs:
      plot('bon_exact_kl', overoptimization.plot_curves, exact, bon_exact_runs, method='bon')
    plot('coefficients', overoptimization.plot_coefficients,
         [f for f in summary['fits'] if 'proxy_comparisons' in f], by='proxy_comparisons')
    if summary['size_scaling']:
      plot('coefficients_by_size', overoptimization.plot_coefficients, summary['fits'])
    if summary['kl_penalty']:
      plot('kl_penalty', overoptimization.plot_kl_penalty, summary['kl_penalty'], runs)
    if summary['kl_efficiency']:
      plot('gold_vs_proxy', overoptimization.plot_gold_against_proxy, summary)
    log_media(workdir, figures)  # TensorBoard, beside each stage's own logs.
  return summary


def _interval(row: dict, key: str) -> str:
  low, high = ('∞' if v is None else f'{v:.2f}' for v in row['interval'][key])
  value = '∞' if row[key] is None else f'{row[key]:.2f}'
  return f'{value} [{low}, {high}]'


def _mean_se(row: dict, key: str) -> str:
  if row[key] is None:
    return 'n/a'
  return f'{row[key]:+.3f}' + ('' if row[f'{key}_se'] is None else f' ± {row[f"{key}_se"]:.3f}')


def summary_table(summary: dict) -> str:
  """The mean curves' fits with their intervals, each seed's verdict, and the proxy comparisons."""
  lines = [f'Mean over seeds; [{summary["confidence"]:.0%} bootstrap over seeds and prompts]',
           f'{"method":6} {"proxy":14} {"seeds":>5} {"α":>20} {"β":>20} {"R²":>5} '
           f'{"peak d":>20} {"peak gain":>20} {"rises":>5} {"falls":>5} {"seeds ↑↓":>8}']
  for f in summary['fits']:
    verdicts = [s['rises'] and s['falls'] for s in summary['per_seed']
                if s['method'] == f['method'] and s['proxy'] == f['proxy']]
    lines.append(f'{f["method"]:6} {f["proxy"]:14} {len(f["seeds"]):5d} '
                 f'{_interval(f, "alpha"):>20} {_interval(f, "beta"):>20} {f["r2"]:5.2f} '
                 f'{_interval(f, "peak_d"):>20} {_interval(f, "peak_gain"):>20} '
                 f'{str(f["rises"]):>5} {str(f["falls"]):>5} '
                 f'{sum(verdicts):>4d}/{len(verdicts)}')
  for c in summary['comparisons']:
    lines.append(f'{c["method"]}: {c["more"]} peaks later than {c["fewer"]} in '
                 f'{c["later"]:.0%} of replicates, higher in {c["higher"]:.0%}, both in '
                 f'{c["later_and_higher"]:.0%}; both in {c["seeds_later_and_higher"]} of '
                 f'{c["seeds"]} seeds')
  for e in summary['kl_efficiency']:
    lines.append(f'{e["proxy"]}: gold gained per unit d up to the best point: best-of-n '
                 f'{e["gold_slope_bon"]:+.3f}, RL {e["gold_slope_rl"]:+.3f}; proxy slope best-of-n '
                 f'{e["proxy_slope_bon"]:.2f}, RL {e["proxy_slope_rl"]:.2f} '
                 f'({e["proxy_slope_ratio"]:.1f}×)')
  lines.append('Best-of-n: KL = log n − (n−1)/n against the exact KL over the sampled answers; '
               'win rate under the proxy ≤ n/(n+1)')
  for row in summary['bon_kl']:
    by_task = ' '.join(f'{task} {kl:.2f}' for task, kl in row['exact_by_task'].items())
    lines.append(f'{row["proxy"]:14} n={row["n"]:<3d} formula {row["formula"]:.3f} exact '
                 f'{row["exact"]:.3f} ({by_task}); win rate {row["win_rate"]:.3f} ≤ '
                 f'{row["win_rate_bound"]:.3f}')
  for t in summary['size_scaling']:
    betas = ', '.join(f'{proxy} {beta:.3f}' for proxy, beta in t['betas_shared_alpha'].items())
    lines.append(f'{t["method"]} by proxy size ({t["proxy_comparisons"]} comparisons): per '
                 f'decade of parameters α {t["alpha_per_log10_params"]:+.3f}, β '
                 f'{t["beta_per_log10_params"]:+.3f}; one α {t["shared_alpha"]:.3f} (β {betas}): '
                 f'R² {t["r2_shared_alpha"]:.3f} against {t["r2_separate"]:.3f} with an α each')
  for row in summary['ensembles']:
    lines.append(f'{row["method"]:6} {row["proxy"]:20} best gain {row["best_gain"]:+.3f} at d '
                 f'{row["best_d"]:.2f}, final {row["final_gain"]:+.3f} at d {row["max_d"]:.2f}, '
                 f'β {row["beta"]:.3f}; interior peak: {row["interior_peak"]}')
  if 'warm' in summary:
    for split in ('in_distribution', 'out_of_distribution'):
      accuracies = ', '.join(f'{name} ' + ('n/a' if a['accuracy'] is None else
                                           f'{a["accuracy"]:.3f}')
                             for name, a in summary['warm'][split].items())
      pairs = next(iter(summary['warm'][split].values()))['pairs']
      lines.append(f'accuracy {split.replace("_", " ")} ({pairs} pairs): {accuracies}')
    rules = summary['early_stop']
    lines.append(f'early stop, gold gain, mean over seeds; rules: disagreement (before the '
                 f'members\' disagreement exceeds {1 + rules["rise"]:g}× π_init\'s), held_out '
                 '(at the peak of the members the policy was not optimised against):')
    for row in rules['means']:
      lines.append(f'  {row["curve"]:20} {row["rule"]:12} at the stop {row["gain_at_stop"]:+.3f} (d '
                   f'{row["d_at_stop"]:.2f}), best {row["best_gain"]:+.3f}, last '
                   f'{row["final_gain"]:+.3f}')
  for entry in summary['kl_penalty']:
    pooled = entry['pooled']
    lines.append(f'KL penalty, {entry["proxy"]}: R_RL pooled over the coefficients α '
                 f'{pooled["alpha"]:.3f}, β {pooled["beta"]:.3f}, R² {pooled["r2"]:.2f}; per β, '
                 f'mean ± se over {len(entry["seeds"])} seeds; at matched d: against β = 0')
    for row in entry['coefficients']:
      lines.append(f'  β={row["kl_coef"]:<5g} ends at d {row["final_d"]:.2f}; residual '
                   f'{_mean_se(row, "residual")}; at matched d gold {_mean_se(row, "gold_at_matched_d")}'
                   f', proxy {_mean_se(row, "proxy_at_matched_d")}')
  for f in summary['bon_exact_kl']:
    lines.append(f'bon on the exact KL, {f["proxy"]}: α {_interval(f, "alpha")}, β '
                 f'{_interval(f, "beta")}, R² {f["r2"]:.2f}, peak d {_interval(f, "peak_d")}')
  return '\n'.join(lines)


def run(experiment, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  policy = initial_policy(experiment, workdir)
  proxies = train_proxies(experiment, workdir, policy)
  targets = reward_targets(experiment, workdir, proxies)
  runs, bon_exact_runs, bon_kl_table = [], [], []
  if 'bon' in experiment.methods:
    runs, bon_exact_runs, bon_kl_table = best_of_n_runs(
        experiment, workdir, policy, [t for t in targets if 'bon' in t['methods']])
  if 'rl' in experiment.methods:
    runs += rl_runs(experiment, workdir, policy, [t for t in targets if 'rl' in t['methods']])
  extra = {}
  if experiment.ensemble.members and 'rl' in experiment.methods:
    extra = mitigations(experiment, workdir, policy, proxies, targets)
  return analyse(experiment, runs, bon_exact_runs, bon_kl_table, workdir, extra,
                 [t['name'] for t in targets] if experiment.ensemble.members else [])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  workdir = flags.FLAGS.workdir
  print(summary_table(run(flags.FLAGS.config, workdir)))
  print(f'{workdir}: measurements.jsonl, per_prompt.npz, fits.json, plots/ ({time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
  # Defined here, not on import: tests import this module next to others that define --config.
  config_flags.DEFINE_config_file('config', None, 'configs/overoptimization.py:preset')
  flags.DEFINE_string('workdir', None, 'Where every stage and the results go.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
