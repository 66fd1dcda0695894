"""The overoptimization experiment end to end on a micro scale, and its notebook executed on the
run's workdir.

Every stage runs for real (pretrain → SFT → a proxy RM on gold-labelled pairs of the policy's
samples → best-of-n and PPO against it → fits and plots), shrunk to a two-layer model and a few
steps; what it checks is the wiring and the files, not the science (docs/ and README report the
tiny preset's figures).
"""

import importlib.util
import json
import pathlib
import shutil
import types
from concurrent import futures

import numpy as np
import pytest
import safetensors

from rlhf_jax import stages
from rlhf_jax.analysis import overoptimization
from rlhf_jax.config import base_config, load_config
from rlhf_jax.engine.progress import RunsProgress
from rlhf_jax.errors import InputError
from rlhf_jax.playground import tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO_MODEL = {'n_layers': 2, 'd_model': 32, 'n_heads': 2, 'n_kv_heads': 1, 'd_ff': 64}


def load_experiment():
  spec = importlib.util.spec_from_file_location(
      'overoptimization_experiment', ROOT / 'experiments' / 'overoptimization.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('preset', ['tiny', 'small'])
def test_the_presets_rl_keys_set_keys_of_the_ppo_config(preset):
  experiment = load_experiment()
  config = load_config(f'overoptimization.py:{preset}')
  ppo = experiment.stage_config('ppo', config, **experiment.ppo_overrides(config.rl))
  assert ppo.train.steps == config.rl.steps and ppo.optim.lr == config.rl.lr
  assert ppo.train.eval_every == config.rl.eval_every
  assert ppo.eval.num_prompts == config.rl.eval_prompts
  assert ppo.data.max_prompt_len == config.rl.max_prompt_len
  assert ppo.eval.max_new_tokens == config.rl.max_new_tokens
  assert ppo.train.seq_len == config.rl.max_prompt_len + config.rl.max_new_tokens
  for key in ('rollout_batch_size', 'num_minibatches', 'ppo_epochs', 'critic', 'stop_kl',
              'max_new_tokens'):
    assert ppo.rl[key] == config.rl[key]


def test_a_key_the_stage_config_lacks_is_an_error_naming_it():
  experiment = load_experiment()
  config = load_config('overoptimization.py:tiny')
  with pytest.raises(InputError, match=r"configs/ppo.py \(set by the experiment's ppo stage\) "
                                       r"has no key 'rl.kl_coeff'"):
    experiment.stage_config('ppo', config, **{'rl.kl_coeff': 0.1})
  config.stage_overrides = {'all': {'train': {'stepz': 3}}}
  with pytest.raises(InputError, match=r"configs/rm.py \(set by config.stage_overrides.all\) "
                                       r"has no key 'train.stepz'"):
    experiment.stage_config('rm', config)


def test_proxy_specs_name_data_steps_and_epochs():
  proxies = load_config('overoptimization.py:data_scaling').proxies
  specs = {s['proxy']: s for s in load_experiment().proxy_specs(proxies, batch_size=32)}
  assert list(specs) == ['policy-250', 'policy-500', 'policy-1000', 'policy-2000', 'policy-4000',
                         'policy-8000', 'policy-16000', 'policy-2000-4ep', 'policy-8000-1ep']
  assert specs['policy-250'] == {'proxy': 'policy-250', 'proxy_model': 'policy',
                                 'proxy_comparisons': 250, 'proxy_steps': 600,
                                 'proxy_epochs': 600 * 32 / 250, 'proxy_seed': 0}
  # 2,000 comparisons × 4 epochs and 8,000 × 1 take the same 250 steps of 32 pairs.
  assert specs['policy-2000-4ep']['proxy_steps'] == specs['policy-8000-1ep']['proxy_steps'] == 250
  assert specs['policy-2000-4ep']['proxy_epochs'] == 4
  members = load_config('overoptimization.py:ensembles').proxies
  assert [(s['proxy'], s['proxy_seed']) for s in load_experiment().proxy_specs(members, 32)] == [
      (f'policy-2000-seed{seed}', seed) for seed in (1, 2, 3, 4, 5)]


def test_stages_side_by_side_have_one_bar_over_their_steps(tmp_path, monkeypatch):
  def stage(steps):
    config = base_config()
    config.train.steps = steps
    return config

  def run(config, workdir):
    """Stops one step short (a stop rule), without its own bar."""
    assert not config.train.progress_bar
    records = ''.join(f'{{"step": {s}}}\n' for s in range(1, config.train.steps))
    pathlib.Path(workdir).mkdir()
    (pathlib.Path(workdir) / 'metrics.jsonl').write_text(records)

  bars = []

  def recorded(*args, **kwargs):
    bars.append(RunsProgress(*args, **kwargs))
    return bars[-1]

  # Threads for processes: the stages are fakes that a spawned process would not see.
  monkeypatch.setattr(stages, 'futures', types.SimpleNamespace(
      ProcessPoolExecutor=lambda workers, mp_context: futures.ThreadPoolExecutor(workers),
      as_completed=futures.as_completed))
  monkeypatch.setattr(stages.algorithms, 'run', run)
  monkeypatch.setattr(stages, 'RunsProgress', recorded)
  stages.run_stages([(stage(4), str(tmp_path / 'a')), (stage(6), str(tmp_path / 'b'))], workers=2)
  [bar] = [progress.bar for progress in bars]
  assert (bar.n, bar.total, bar.desc, bar.postfix) == (10, 10, 'stages', '2/2 runs done')


@pytest.fixture(scope='module')
def micro():
  """(the experiment module with every stage shrunk, the experiment's config)."""
  experiment = load_experiment()
  config = load_config('overoptimization.py:tiny')
  config.update(pretrain_steps=6, sft_steps=6, progress_bar=False, seeds=(0, 1),
                tasks=('sort', 'safety'))  # A micro policy sorts nothing: all of sort's gold is 0.
  config.proxies.update(comparisons=(64,), steps=6)
  config.bon.update(n_max=4, num_prompts=16)
  config.rl.update(steps=3, eval_every=1, eval_prompts=32, lr=3e-3, rollout_batch_size=16,
                   num_minibatches=2, ppo_epochs=1)
  # Every stage shrunk: a two-layer model (pretraining sets it; later stages load it).
  config.stage_overrides = {
      'all': {'train': {'batch_size': 16, 'tensorboard': False},
              'data': {'playground': {'train_size': 64, 'eval_size': 16}}},
      'pretrain': {'model': MICRO_MODEL, 'train': {'eval_every': 0}},
      'sft': {'train': {'eval_every': 0}}, 'rm': {'train': {'eval_every': 0}},
      'ppo': {'rl': {'num_prompts': 64}}}
  return experiment, config


@pytest.fixture(scope='module')
def run(micro, tmp_path_factory):
  experiment, config = micro
  workdir = tmp_path_factory.mktemp('overoptimization')
  return workdir, experiment.run(config, str(workdir))


def test_stages_run_side_by_side_compute_what_each_computes_alone(micro, tmp_path):
  experiment, config = micro

  def pretraining(seed):
    stage = experiment.stage_config('pretrain', config, **{'train.steps': 2})
    stage.seed = seed
    return stage

  stages.run_stages([(pretraining(0), str(tmp_path / 'a')),
                     (pretraining(1), str(tmp_path / 'b'))], workers=2)
  stages.run_stages([(pretraining(0), str(tmp_path / 'alone'))], workers=1)
  metrics = {run: (tmp_path / run / 'metrics.jsonl').read_text() for run in ('a', 'b', 'alone')}
  assert metrics['a'] == metrics['alone'] != metrics['b']
  assert all(stages.finished(str(tmp_path / run)) for run in ('a', 'b'))


def test_the_experiment_writes_measurements_fits_and_plots(run):
  workdir, summary = run
  records = [json.loads(line) for line in (workdir / 'measurements.jsonl').read_text().splitlines()]
  for seed in (0, 1):
    bon = [r for r in records if r['method'] == 'bon' and r['seed'] == seed]
    rl = [r for r in records if r['method'] == 'rl' and r['seed'] == seed]
    assert [r['n'] for r in bon] == [1, 2, 4]
    assert [r['kl'] for r in bon] == pytest.approx([0, np.log(2) - 0.5, np.log(4) - 0.75])
    assert [r['step'] for r in rl] == [0, 1, 2, 3]
    assert rl[0]['kl'] == 0  # The policy before any update is the reference.
    assert all(r['kl'] > 0 for r in rl[1:])  # A sum of KLs, never clipped to 0.
  # The seeds differ on the policy's side: other answers, other PPO runs.
  by_seed = [[r['gold_reward'] for r in records if r['method'] == 'rl' and r['seed'] == seed]
             for seed in (0, 1)]
  assert by_seed[0] != by_seed[1]
  for r in records:
    assert r['proxy'] == 'policy-64' and r['proxy_comparisons'] == 64
    assert r['proxy_params'] > 0 and 0 <= r['gold_reward'] <= 1
    assert r['d'] == pytest.approx(np.sqrt(r['kl']))
  runs = overoptimization.load_runs(str(workdir / 'per_prompt.npz'))
  assert [record for r in runs for record in r.records()] == records
  assert {r.kl_PxI.shape[1] for r in runs if r.method == 'bon'} == {16}  # bon.num_prompts
  assert {r.kl_PxI.shape[1] for r in runs if r.method == 'rl'} == {32}  # rl.eval_prompts
  assert [(f['method'], f['proxy'], f['seeds']) for f in summary['fits']] == [
      ('bon', 'policy-64', [0, 1]), ('rl', 'policy-64', [0, 1])]
  for f in summary['fits']:
    low, high = f['interval']['alpha']
    assert low <= f['alpha'] <= high
  assert len(summary['per_seed']) == 4
  assert [row['n'] for row in summary['bon_kl']] == [1, 2, 4]
  for row in summary['bon_kl']:  # The exact KL of best-of-n: at most the formula's.
    assert 0 <= row['exact'] <= row['formula'] + 1e-12
    assert row['win_rate'] <= row['win_rate_bound']
  assert summary['bon_kl'][0]['exact'] == 0 and summary['bon_kl'][0]['win_rate'] == 0.5
  # config.tasks: best-of-n and PPO optimise and are measured on those prompts; the proxy
  # learned from comparisons on every task.
  assert {task for row in summary['bon_kl'] for task in row['exact_by_task']} == {'sort', 'safety'}
  for step in (0, 3):
    samples = (workdir / 'rl' / 'policy-64' / 'seed0' / 'samples' / f'step_{step}.jsonl')
    assert {tasks.task_of(json.loads(line)['prompt'])
            for line in samples.read_text().splitlines()} == {'sort', 'safety'}
  comparisons, = (workdir / 'proxies' / 'policy-64' / 'data').glob('playground-preference-train*')
  assert {tasks.task_of(json.loads(line)['prompt'])
          for line in comparisons.read_text().splitlines()} == set(tasks.TASKS)
  assert [f['proxy'] for f in summary['bon_exact_kl']] == ['policy-64']
  assert json.loads((workdir / 'fits.json').read_text()) == summary
  assert [e['proxy'] for e in summary['kl_efficiency']] == ['policy-64']
  assert [t['method'] for t in summary['data_scaling']] == ['bon', 'rl']
  for name in ('bon', 'rl', 'coefficients', 'bon_exact_kl', 'gold_vs_proxy'):
    assert (workdir / 'plots' / f'{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_the_data_scaling_preset_runs_best_of_n_only_with_epoch_variants(run, micro, tmp_path):
  """data_scaling's shape at micro scale, from the run's π_init: proxies on two amounts of
  comparisons and one trained for 2 epochs; best-of-n only."""
  workdir, _ = run
  experiment, config = micro
  scaling = config.copy_and_resolve_references()
  scaling.methods = ('bon',)
  scaling.proxies.update(comparisons=(32, 64), epochs=((32, 2),))
  shutil.copytree(workdir / 'policy', tmp_path / 'policy')  # π_init, finished: skipped.
  summary = experiment.run(scaling, str(tmp_path))
  assert not (tmp_path / 'rl').exists()
  assert [f['proxy'] for f in summary['fits']] == ['policy-32', 'policy-64', 'policy-32-2ep']
  assert {f['method'] for f in summary['fits'] + summary['per_seed']} == {'bon'}
  (table,) = summary['data_scaling']  # The proxies of config.proxies.steps only.
  assert [row['proxy_comparisons'] for row in table['rows']] == [32, 64]
  assert [(c['fewer'], c['more']) for c in summary['comparisons']] == [('policy-32', 'policy-64')]
  assert summary['kl_efficiency'] == []
  epochs = next(f for f in summary['fits'] if f['proxy'] == 'policy-32-2ep')
  assert epochs['proxy_steps'] == 32 * 2 // 16 and epochs['proxy_epochs'] == 2
  assert sorted(p.name for p in (tmp_path / 'plots').iterdir()) == [
      'bon.png', 'bon_exact_kl.png', 'coefficients.png']


def test_the_size_scaling_preset_cuts_proxies_from_the_policy(run, micro, tmp_path):
  """size_scaling's shape at micro scale, best-of-n only, from the run's π_init (two layers),
  its proxy and its answers: a proxy on the policy's first layer next to the whole one."""
  workdir, _ = run
  experiment, config = micro
  sizes = config.copy_and_resolve_references()
  sizes.update(methods=('bon',))
  sizes.proxies.models = ('policy-L1', 'policy')
  for stage in ('policy', 'proxies', 'bon'):
    shutil.copytree(workdir / stage, tmp_path / stage)
  summary = experiment.run(sizes, str(tmp_path))
  cut = json.loads((tmp_path / 'proxies' / 'backbones' / 'policy-L1' / 'config.json').read_text())
  assert cut['num_hidden_layers'] == 1
  proxy = json.loads((tmp_path / 'proxies' / 'policy-L1-64' / 'config.json').read_text())
  assert proxy['model']['hf_path'] == str(tmp_path / 'proxies' / 'backbones' / 'policy-L1')
  fits = {f['proxy']: f for f in summary['fits']}
  assert list(fits) == ['policy-L1-64', 'policy-64']
  assert fits['policy-L1-64']['proxy_params'] < fits['policy-64']['proxy_params']
  (table,) = summary['size_scaling']
  assert table['method'] == 'bon' and [r['proxy'] for r in table['rows']] == list(fits)
  assert set(table['betas_shared_alpha']) == set(fits)
  assert (tmp_path / 'plots' / 'coefficients_by_size.png').exists()
  assert 'bon by proxy size (64 comparisons)' in experiment.summary_table(summary)


def test_the_ensembles_preset_optimises_members_ensembles_and_their_average(run, micro, tmp_path):
  """ensembles' shape at micro scale, one seed, from the run's π_init and answers: two
  members by seed; best-of-n against each, each aggregation and WARM; PPO against the first
  member and the uncertainty-weighted ensemble; WARM's accuracy and the early-stopping rule
  (the micro policy's answers may all tie under the gold: then no accuracy)."""
  workdir, _ = run
  experiment, config = micro
  ensembles = config.copy_and_resolve_references()
  ensembles.update(seeds=(0,))
  ensembles.proxies.seeds = (1, 2)
  ensembles.ensemble.update(members=2, rl_aggregations=('uncertainty',))
  for stage in ('policy', 'bon'):
    shutil.copytree(workdir / stage, tmp_path / stage)
  summary = experiment.run(ensembles, str(tmp_path))
  members = ['policy-64-seed1', 'policy-64-seed2']
  for seed, member in enumerate(members, start=1):
    proxy = json.loads((tmp_path / 'proxies' / member / 'config.json').read_text())
    assert proxy['seed'] == proxy['data']['seed'] == seed
  curves = [(f['method'], f['proxy']) for f in summary['fits']]
  assert curves == [('bon', name) for name in members + [
      'ensemble-mean', 'ensemble-min', 'ensemble-uncertainty', 'warm']] + [
          ('rl', 'policy-64-seed1'), ('rl', 'ensemble-uncertainty')]
  assert [(r['method'], r['proxy']) for r in summary['ensembles']] == curves
  assert all(isinstance(r['interior_peak'], bool) for r in summary['ensembles'])
  assert summary['comparisons'] == []  # Members and ensembles share their comparisons.
  # WARM's weights are the members' mean.
  warm = overoptimization_params(tmp_path / 'proxies' / 'warm')
  mean = np.mean([overoptimization_params(tmp_path / 'proxies' / m / 'hf') for m in members],
                 axis=0)
  np.testing.assert_allclose(warm, mean, rtol=1e-6, atol=1e-7)
  for split in ('in_distribution', 'out_of_distribution'):
    accuracies = summary['warm'][split]
    assert set(accuracies) == set(members) | {'ensemble', 'warm'}
    assert len({a['pairs'] for a in accuracies.values()}) == 1  # The same pairs for each.
    assert all(a['accuracy'] is None if a['pairs'] == 0 else 0 <= a['accuracy'] <= 1
               for a in accuracies.values())
  assert summary['warm']['best_member_in_distribution'] in members
  stops = summary['early_stop']
  assert {(r['curve'], r['seed'], r['rule']) for r in stops['runs']} == {
      ('policy-64-seed1', 0, 'disagreement'), ('policy-64-seed1', 0, 'held_out'),
      ('ensemble-uncertainty', 0, 'disagreement')}  # No member is held out of an ensemble.
  for row in stops['runs']:  # Members trained on other orders of the data disagree.
    assert row['disagreement'][0] > 0 and len(row['disagreement']) == 4
    assert row['best_gain'] >= row['gain_at_stop'] and row['regret'] >= 0
  assert [(row['curve'], row['rule']) for row in stops['means']] == [
      ('ensemble-uncertainty', 'disagreement'), ('policy-64-seed1', 'disagreement'),
      ('policy-64-seed1', 'held_out')]
  table = experiment.summary_table(summary)
  assert 'accuracy out of distribution' in table and 'early stop' in table


def overoptimization_params(hf_dir) -> np.ndarray:
  """Every tensor of a checkpoint, flattened in name order."""
  with safetensors.safe_open(str(hf_dir / 'model.safetensors'), 'np') as f:
    return np.concatenate([f.get_tensor(name).ravel() for name in sorted(f.keys())])


def test_the_kl_penalty_preset_runs_ppo_under_each_coefficient(run, micro, tmp_path):
  """kl_penalty's shape at micro scale, from the run's π_init, proxy and unpenalised PPO runs
  (finished: skipped): PPO only, and a penalised run per seed next to them."""
  workdir, _ = run
  experiment, config = micro
  penalty = config.copy_and_resolve_references()
  penalty.update(methods=('rl',), kl_coefs=(0.0, 0.5))
  for stage in ('policy', 'proxies', 'rl'):
    shutil.copytree(workdir / stage, tmp_path / stage)
  summary = experiment.run(penalty, str(tmp_path))
  assert not (tmp_path / 'bon').exists()
  assert sorted(p.name for p in (tmp_path / 'rl').iterdir()) == ['policy-64', 'policy-64-kl0.5']
  assert [f['proxy'] for f in summary['fits']] == ['policy-64', 'policy-64-kl0.5']
  assert summary['comparisons'] == [] and summary['bon_kl'] == []
  penalised = json.loads((tmp_path / 'rl' / 'policy-64-kl0.5' / 'seed0' / 'config.json')
                         .read_text())
  assert penalised['rl']['kl_coef'] == 0.5 and penalised['seed'] == 0
  (entry,) = summary['kl_penalty']
  assert entry['proxy'] == 'policy-64' and entry['seeds'] == [0, 1]
  rows = entry['coefficients']
  assert [row['kl_coef'] for row in rows] == [0.0, 0.5]
  assert rows[0]['gold_at_matched_d'] == rows[0]['proxy_at_matched_d'] == 0.0
  assert all(np.isfinite(row['residual']) and row['final_d'] > 0 for row in rows)
  assert sorted(p.name for p in (tmp_path / 'plots').iterdir()) == [
      'coefficients.png', 'kl_penalty.png', 'rl.png']
  assert 'KL penalty, policy-64' in experiment.summary_table(summary)


def test_a_rerun_skips_every_finished_stage(run, micro, monkeypatch):
  workdir, summary = run
  experiment, config = micro
  calls = []
  monkeypatch.setattr(stages.algorithms, 'run', lambda *args: calls.append(args))
  assert experiment.run(config, str(workdir)) == summary
  assert not calls


def test_the_notebook_redraws_every_plot_from_the_workdir(run, tmp_path, monkeypatch):
  workdir, _ = run
  monkeypatch.setenv('OVEROPTIMIZATION_WORKDIR', str(workdir))
  monkeypatch.setenv('OVEROPTIMIZATION_PLOTS', str(tmp_path))
  notebook = json.loads((ROOT / 'notebooks' / 'overoptimization.ipynb').read_text())
  namespace = {}
  for cell in notebook['cells']:
    if cell['cell_type'] == 'code':
      exec(compile(''.join(cell['source']), 'overoptimization.ipynb', 'exec'), namespace)
  fits = json.loads((workdir / 'fits.json').read_text())
  assert all(fits[key] == value for key, value in namespace['summary'].items())
  for name in ('bon', 'rl', 'coefficients'):
    assert (tmp_path / f'{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
