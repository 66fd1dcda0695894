"""Stanford CS336 (2025) lecture 15's claims about RLHF, measured on the playground, in one command.

  python experiments/lecture.py --config=configs/lecture.py:tiny --workdir=runs/lecture
  python experiments/lecture.py --config=configs/lecture.py:tiny --workdir=runs/lecture \
      --only=calibration

Stages, each a run in <workdir> that a rerun resumes or skips once finished (rlhf_jax/stages.py):
  policy/{pretrain,sft}/  π_init (unless config.policy names one)
  proxy/                  a reward model on config.proxy.comparisons comparisons of π_init's
                          answers, labelled by Bradley-Terry labelers on the gold
  dpo/beta<β>/            DPO (sigmoid) at β on the same comparisons, from π_init
  ppo/kl<t>/              PPO against the proxy, β set by the adaptive KL controller (target t)
  ppo/gold/               PPO against the gold itself (PPO-GT), no KL penalty
  bon/                    n_max answers of π_init per evaluation prompt, for best-of-n
Every run is evaluated along the way on the same held-out prompts: per prompt, the gold reward of
a sampled answer and the Monte-Carlo KL to π_init along it (its samples/step_<N>.jsonl).

Phenomena (config.phenomena, or --only):
  frontier     gold reward against KL to π_init per method, the upper envelope in KL bins with
               bootstrap intervals over prompts (Rafailov et al. 2023, figure 2)
  calibration  on prompts with one right answer: the policies' confidence in their answers
               against their accuracy (ECE, equal-mass bins), a temperature fitted on half the
               prompts and the ECE after it on the other half, per-token entropy over PPO's
               iterations, distinct answers among several samples (OpenAI 2023, GPT-4 report
               figure 8; Kadavath et al. 2022)
Then in <workdir>: report.md (per phenomenon the claim, criterion, numbers and verdict),
summary.json, config.json (the experiment's), plots/{frontier,calibration}.png, points.npz and
calibration/<stage>.npz (what notebooks/lecture.ipynb redraws the plots from).
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import parallel
from rlhf_jax.analysis import lecture
from rlhf_jax.context import RunContext
from rlhf_jax.engine.metrics import read_metrics
from rlhf_jax.errors import InputError
from rlhf_jax.evals import best_of_n, bon_kl
from rlhf_jax.evals.confidence import AnswerConfidence
from rlhf_jax.playground import tasks
from rlhf_jax.sampling.text import TextSampler
from rlhf_jax.stages import initial_policy, read_samples, run_stages, stage_config
from rlhf_jax.storage import replace_file

GOLD_FUNCTION = 'rlhf_jax.playground.tasks:program_gold'
VERIFIABLE = ('sort', 'add', 'repeat')  # Tasks with one right answer: gold 1 exactly for it.
CLAIMS = {
    'frontier': ('DPO matches or beats PPO in gold reward at the same KL (Rafailov et al. 2023, '
                 'figure 2), though tuned PPO wins on some tasks (Ivison et al. 2024, Tulu 3).'),
    'calibration': ('RLHF makes a calibrated SFT model overconfident (OpenAI 2023, GPT-4 report: '
                    'MMLU ECE 0.007 → 0.074); a temperature fitted on held-out data recalibrates '
                    'it (Kadavath et al. 2022: T ≈ 2.5); answers collapse to fewer modes.'),
}
CRITERIA = {
    'frontier': ("DPO's best mean gold ≥ PPO's (against the proxy), or their 95% bootstrap "
                 'intervals over prompts overlap.'),
    'calibration': ("The PPO policy's ECE exceeds the SFT policy's (95% paired bootstrap interval "
                    'of the difference above 0) and its mean confidence exceeds its accuracy.'),
}


def shared_overrides(experiment, policy: str) -> dict:
  """Every trained stage: starts from π_init, reads its tokenizer and holds prompts and answers
  of the experiment's lengths."""
  return {'model.hf_path': policy, 'data.tokenizer': policy,
          'data.max_prompt_len': experiment.max_prompt_len,
          'train.seq_len': experiment.max_prompt_len + experiment.max_new_tokens,
          'seed': experiment.seed, 'data.seed': experiment.seed}


def policy_overrides(experiment, policy: str) -> dict:
  """A stage that trains a policy: evaluated on the experiment's held-out prompts."""
  return shared_overrides(experiment, policy) | {
      'eval.num_prompts': experiment.eval_prompts,
      'eval.max_new_tokens': experiment.max_new_tokens}


def comparison_overrides(experiment, policy: str) -> dict:
  """The proxy's and DPO's data: the same comparisons of π_init's answers."""
  p = experiment.proxy
  return {'data.playground.pairs': policy, 'data.playground.train_size': p.comparisons,
          'data.playground.label_temperature': p.label_temperature}


def stages_of(experiment, workdir: str, policy: str) -> dict[str, tuple]:
  """{name: (config, workdir)} of every stage after π_init: 'proxy', 'dpo/beta<β>',
  'ppo/kl<t>' and 'ppo/gold'."""
  pairs = comparison_overrides(experiment, policy)
  steps = experiment.proxy.steps
  out = {'proxy': stage_config('rm', experiment, **shared_overrides(experiment, policy), **pairs,
                               **{'train.steps': steps, 'train.eval_every': steps,
                                  'train.eval_at_start': False})}
  shared = policy_overrides(experiment, policy)
  d = experiment.dpo
  for beta in d.betas:
    out[f'dpo/beta{beta:g}'] = stage_config('dpo', experiment, **shared, **pairs, **{
        'train.steps': d.steps, 'train.eval_every': d.eval_every, 'optim.lr': d.lr,
        'loss.beta': beta})
  r = experiment.ppo
  ppo = shared | {'train.steps': r.steps, 'train.eval_every': r.eval_every,
                  'train.checkpoint_every': r.eval_every, 'optim.lr': r.lr,
                  'rl.max_new_tokens': experiment.max_new_tokens,
                  'rl.rollout_batch_size': r.rollout_batch_size,
                  'rl.num_minibatches': r.num_minibatches, 'rl.ppo_epochs': r.ppo_epochs,
                  'rl.critic': r.critic}
  proxy = os.path.join(workdir, 'proxy', 'hf')
  for target in r.kl_targets:
    out[f'ppo/kl{target:g}'] = stage_config('ppo', experiment, **ppo, **{
        'rl.reward_model': proxy, 'rl.kl_coef': r.kl_coef, 'rl.adaptive_kl': True,
        'rl.kl_target': target, 'rl.kl_horizon': r.kl_horizon})
  if r.gold:
    out['ppo/gold'] = stage_config('ppo', experiment, **ppo, **{
        'rl.reward_model': '', 'rl.reward_fns': (GOLD_FUNCTION,), 'rl.kl_coef': 0.0})
  return {name: (config, os.path.join(workdir, name)) for name, config in out.items()}


def calibrated_policies(experiment) -> dict[str, str]:
  """{label: stage} of the policies whose calibration is measured, π_init's stage ''."""
  c, policies = experiment.calibration, {'sft': ''}
  if c.ppo_kl_target not in experiment.ppo.kl_targets:
    raise InputError(f'config.calibration.ppo_kl_target={c.ppo_kl_target} is not one of '
                     f'config.ppo.kl_targets {tuple(experiment.ppo.kl_targets)}.')
  if c.dpo_beta not in experiment.dpo.betas:
    raise InputError(f'config.calibration.dpo_beta={c.dpo_beta} is not one of config.dpo.betas '
                     f'{tuple(experiment.dpo.betas)}.')
  policies[f'ppo (KL target {c.ppo_kl_target:g})'] = f'ppo/kl{c.ppo_kl_target:g}'
  if experiment.ppo.gold:
    policies['ppo-gold'] = 'ppo/gold'
  policies[f'dpo (β {c.dpo_beta:g})'] = f'dpo/beta{c.dpo_beta:g}'
  return policies


def train(experiment, workdir: str, policy: str, phenomena) -> dict[str, tuple]:
  """The stages the phenomena read: the proxy and DPO runs side by side, then the PPO runs."""
  stages = stages_of(experiment, workdir, policy)
  if 'frontier' not in phenomena:  # Calibration reads the proxy's PPO and its policies only.
    needed = {'proxy', *calibrated_policies(experiment).values()}
    stages = {name: stage for name, stage in stages.items() if name in needed}
  first = [stage for name, stage in stages.items() if not name.startswith('ppo/')]
  run_stages(first, experiment.workers)
  run_stages([stage for name, stage in stages.items() if name.startswith('ppo/')],
             experiment.workers)
  return stages


def scoring_context(experiment, workdir: str, policy: str) -> tuple:
  """(the best-of-n stage's config, a RunContext in <workdir>/bon): π_init's tokenizer and the
  gold, sampling answers as long as the trained stages'."""
  config = stage_config('bon', experiment, **{
      'model.hf_path': policy, 'data.tokenizer': policy, 'seed': experiment.seed,
      'data.max_prompt_len': experiment.max_prompt_len,
      'eval.max_new_tokens': experiment.max_new_tokens})
  return config, RunContext(config, os.path.join(workdir, 'bon'))


def evaluation_points(method: str, run: str, run_dir: str, prompts) -> list[lecture.Point]:
  """A run's evaluations as points, checked to be on `prompts` (every method's prompts)."""
  points = []
  for record in read_metrics(os.path.join(run_dir, 'metrics.jsonl')):
    if 'eval/samples/gold_reward' not in record:
      continue
    samples = read_samples(os.path.join(run_dir, 'samples', f'step_{record["step"]}.jsonl'))
    if samples['prompt'] != prompts:
      raise InputError(f'{run_dir} was evaluated on other prompts than the experiment\'s '
                       f'{len(prompts)}: its config\'s eval.num_prompts or playground seed '
                       'differs.')
    points.append(lecture.Point(method, run, record['step'], samples['kl'], samples['gold']))
  return points


def best_of_n_points(experiment, workdir: str, policy: str, prompts) -> list[lecture.Point]:
  """Best-of-n under the proxy over π_init's n_max answers per prompt (sampled once,
  <workdir>/bon/answers.json), n = 1, 2, 4, … n_max: per prompt the expected gold of the
  proxy's choice and the exact KL of best-of-n over the prompt's answers (`bon_kl`; answers
  repeat, and log n − (n−1)/n is then only a bound)."""
  config, ctx = scoring_context(experiment, workdir, policy)
  n_max, path = experiment.bon.n_max, os.path.join(workdir, 'bon', 'answers.json')
  if os.path.exists(path):
    with open(path) as f:
      answers = json.load(f)
  else:
    seeds = range(experiment.seed * n_max, (experiment.seed + 1) * n_max)
    answers = best_of_n.sample_candidates(ctx.load(policy, head='lm'), config, ctx.tokenizer,
                                          ctx.mesh, prompts, seeds)
    ctx.release(policy, head='lm')
    if jax.process_index() == 0:
      replace_file(path, json.dumps(answers))
  proxy_path = os.path.join(workdir, 'proxy', 'hf')
  proxy_NxK = best_of_n.score_candidates(ctx.reward_model(proxy_path), prompts, answers)
  ctx.release(proxy_path, head='scalar')
  gold_NxK = best_of_n.score_candidates(ctx.gold, prompts, answers)
  distributions = [bon_kl.empirical_distribution(a, s) for a, s in zip(zip(*answers), proxy_NxK)]
  return [lecture.Point('best-of-n', 'proxy', n,
                        np.array([bon_kl.kl_best_of_n_exact(*d, n) for d in distributions]),
                        best_of_n.expected_rewards(proxy_NxK, gold_NxK, n)[1])
          for n in best_of_n.powers_of_two(n_max)]


def frontier(experiment, workdir: str, policy: str, stages) -> dict:
  """Every method's points, their envelope in KL bins and each method's best, with the
  verdict of CRITERIA['frontier']."""
  prompts = tasks.sample_prompts(stage_config('bon', experiment).data.playground.seed, 'eval',
                                 experiment.eval_prompts)
  points = best_of_n_points(experiment, workdir, policy, prompts)
  for name, (_, run_dir) in stages.items():
    if name != 'proxy':  # ppo/kl<t> -> ppo, ppo/gold -> ppo-gold, dpo/beta<β> -> dpo.
      method = 'ppo-gold' if name == 'ppo/gold' else name.split('/')[0]
      points += evaluation_points(method, name, run_dir, prompts)
  if jax.process_index() == 0:
    lecture.save_points(points, os.path.join(workdir, 'points.npz'))
  bootstrap = {'num_resamples': experiment.bootstrap, 'seed': experiment.seed}
  rows = lecture.envelope(points, experiment.frontier.kl_edges, **bootstrap)
  best = {row['method']: row for row in lecture.envelope(points, (0.0, np.inf), **bootstrap)}
  dpo, ppo = best['dpo'], best['ppo']
  holds = dpo['gold'] >= ppo['gold'] or dpo['ci'][1] >= ppo['ci'][0]
  lecture.plot_frontier(points, rows, os.path.join(workdir, 'plots', 'frontier.png'))
  return {'holds': bool(holds), 'criterion': CRITERIA['frontier'], 'envelope': rows,
          'best': {m: {k: r[k] for k in ('gold', 'ci', 'kl', 'run', 'step')}
                   for m, r in best.items()}}


def answer_measurements(experiment, ctx, config, path: str, prompts) -> dict[str, np.ndarray]:
  """The policy at `path` on `prompts`: calibration.samples answers per prompt at temperature 1;
  the first answer's confidence [G, N] at each of calibration.temperatures [G], whether it is
  right [N], and the number of distinct answers per prompt [N]."""
  c = experiment.calibration
  policy = ctx.load(path, head='lm')
  sampler = TextSampler(ctx.tokenizer, policy.graphdef, mesh=ctx.mesh, rules=ctx.rules,
                        batch_size=config.train.batch_size,
                        max_prompt_len=config.data.max_prompt_len,
                        max_new_tokens=config.eval.max_new_tokens, temperature=1.0)
  draws = [sampler(policy.params, prompts, seed=experiment.seed + k) for k in range(c.samples)]
  confidence = AnswerConfidence(policy.graphdef, c.temperatures, mesh=ctx.mesh, rules=ctx.rules,
                                batch_size=config.train.batch_size,
                                chunk_size=config.train.logprob_chunk_size)
  confidence_NxG = confidence(policy.params, draws[0])
  ctx.release(path, head='lm')
  return {'temperatures_G': np.array(c.temperatures), 'confidence_GxN': confidence_NxG.T,
          'correct_N': tasks.program_gold(prompts, draws[0].responses) == 1.0,
          'distinct_N': np.array([len(set(a)) for a in zip(*(d.responses for d in draws))])}


def per_token_entropy(run_dir: str) -> list[float]:
  """Per PPO iteration, the rollouts' Monte-Carlo entropy per answer token (nats)."""
  return [m['objective/entropy'] / m['response_length']
          for m in read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
          if 'objective/entropy' in m]


def calibration(experiment, workdir: str, policy: str, stages) -> dict:
  """Each policy of `calibrated_policies` measured on the verifiable held-out prompts
  (<workdir>/calibration/<stage>.npz once measured), and the verdict of
  CRITERIA['calibration']."""
  c = experiment.calibration
  config, ctx = scoring_context(experiment, workdir, policy)
  prompts = tasks.sample_prompts(config.data.playground.seed, 'eval', c.prompts, VERIFIABLE)
  policies = calibrated_policies(experiment)
  for label, stage in policies.items():
    path = os.path.join(workdir, 'calibration', (stage or 'sft').replace('/', '-') + '.npz')
    if not os.path.exists(path):
      arrays = answer_measurements(experiment, ctx, config,
                                   stages[stage][1] + '/hf' if stage else policy, prompts)
      if jax.process_index() == 0:
        lecture.save_arrays(arrays | {'label': label}, path)
  parallel.barrier('calibration measured')  # Every process reads what process 0 wrote.
  found = lecture.load_calibration(os.path.join(workdir, 'calibration'))
  measured = {label: found[label] for label in policies}  # Not those of an earlier config.
  half = len(prompts) // 2
  out = {key: {} for key in ('ece', 'mean_confidence', 'accuracy', 'fitted_temperature',
                             'ece_before_temperature', 'ece_after_temperature',
                             'distinct_answers')}
  ece = lecture.calibration_statistic(c.num_bins)
  for label, m in measured.items():
    confidence, correct = lecture.own_confidence(m), m['correct_N']
    out['ece'][label] = {'value': ece(confidence, correct), 'ci': lecture.bootstrap_interval(
        lambda i: ece(confidence[i], correct[i]), len(prompts),
        num_resamples=experiment.bootstrap, seed=experiment.seed)}
    out['mean_confidence'][label] = float(confidence.mean())
    out['accuracy'][label] = float(correct.mean())
    fitted = lecture.fit_temperature(m['confidence_GxN'][:, :half], correct[:half],
                                     c.temperatures)
    out['fitted_temperature'][label] = fitted
    out['ece_before_temperature'][label] = ece(confidence[half:], correct[half:])
    out['ece_after_temperature'][label] = ece(
        m['confidence_GxN'][c.temperatures.index(fitted), half:], correct[half:])
    out['distinct_answers'][label] = float(m['distinct_N'].mean())
  ppo = next(label for label, stage in policies.items() if stage.startswith('ppo/kl'))
  pair = [(lecture.own_confidence(measured[label]), measured[label]['correct_N'])
          for label in (ppo, 'sft')]
  difference = lecture.bootstrap_interval(
      lambda i: ece(pair[0][0][i], pair[0][1][i]) - ece(pair[1][0][i], pair[1][1][i]),
      len(prompts), num_resamples=experiment.bootstrap, seed=experiment.seed)
  entropy = {name: per_token_entropy(run_dir) for name, (_, run_dir) in stages.items()
             if name.startswith('ppo/')}
  out['entropy_trend'] = {name: lecture.trend(values) for name, values in entropy.items()}
  out['entropy'] = entropy
  holds = difference[0] > 0 and out['mean_confidence'][ppo] > out['accuracy'][ppo]
  lecture.plot_calibration({label: (lecture.own_confidence(m), m['correct_N'])
                            for label, m in measured.items()}, entropy,
                           os.path.join(workdir, 'plots', 'calibration.png'),
                           num_bins=c.num_bins)
  return {'holds': bool(holds), 'criterion': CRITERIA['calibration'],
          'ece_difference_ppo_minus_sft': difference, 'prompts': len(prompts), **out}


PHENOMENA = {'frontier': frontier, 'calibration': calibration}


def report(summary: dict, experiment) -> str:
  """report.md: per phenomenon its claim, criterion, numbers, plot and verdict."""
  lines = ['# CS336 lecture 15, measured on the playground', '']
  for name, result in summary.items():
    lines += [f'## {name}', '', f'**Claim.** {CLAIMS[name]}', '',
              f'**Criterion** (fixed before the run). {result["criterion"]}', '',
              f'**Verdict: {"holds" if result["holds"] else "does not hold"}** on this run.', '',
              f'![{name}](plots/{name}.png)', '']
    lines += getattr(lecture, f'{name}_table')(result)
    lines.append('')
  lines.append(f'Intervals: 95% percentile bootstrap over prompts, {experiment.bootstrap} '
               'resamples.')
  return '\n'.join(lines) + '\n'


def run(experiment, workdir: str, only=None) -> dict:
  """Trains what the phenomena need, measures each and writes report.md and summary.json."""
  phenomena = tuple(only or experiment.phenomena)
  unknown = set(phenomena) - set(PHENOMENA)
  if unknown:
    raise InputError(f'--only / config.phenomena: unknown {sorted(unknown)}; choose from '
                     f'{sorted(PHENOMENA)}.')
  os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
  policy = initial_policy(experiment, workdir)
  stages = train(experiment, workdir, policy, phenomena)
  summary = {name: PHENOMENA[name](experiment, workdir, policy, stages) for name in phenomena}
  if jax.process_index() == 0:
    replace_file(os.path.join(workdir, 'config.json'), experiment.to_json(indent=1))
    replace_file(os.path.join(workdir, 'summary.json'), json.dumps(summary, indent=1))
    replace_file(os.path.join(workdir, 'report.md'), report(summary, experiment))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  workdir = flags.FLAGS.workdir
  only = [p for p in flags.FLAGS.only.split(',') if p] if flags.FLAGS.only else None
  summary = run(flags.FLAGS.config, workdir, only)
  for name, result in summary.items():
    print(f'{name}: {"holds" if result["holds"] else "does not hold"} ({result["criterion"]})')
  print(f'{workdir}: report.md, summary.json, plots/ ({time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
  # Defined here, not on import: tests import this module next to others that define --config.
  config_flags.DEFINE_config_file('config', None, 'configs/lecture.py:preset')
  flags.DEFINE_string('workdir', None, 'Where every stage and the results go.')
  flags.DEFINE_string('only', '', 'Comma-separated phenomena to run (default: all of the '
                      "config's).")
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
