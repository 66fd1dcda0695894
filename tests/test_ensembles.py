"""Reward-model ensembles and WARM (rlhf_jax.rewards.ensemble): aggregations by hand, weight
averages against the mean of the weights, ensembles of text rewards and of rollout scoring
against their members, and the config entry listing several reward models."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_rl_runs import config_for, load_config, save_checkpoints
from test_rl_units import BATCH, ENDED, EOS

from rlhf_jax import parallel
from rlhf_jax.algorithms.rl.actor_critic import ActorCritic, ValueHead
from rlhf_jax.algorithms.rl.learner import make_algorithm
from rlhf_jax.algorithms.rl.rollout import merge_and_score, reward_model_scores
from rlhf_jax.config import base_config, check_paths, data_config, reward_model_paths
from rlhf_jax.context import RunContext
from rlhf_jax.evals import best_of_n
from rlhf_jax.errors import InputError, NotFound
from rlhf_jax.models import ModelConfig, Transformer, read_hf_config, save_hf
from rlhf_jax.models.loading import load_model
from rlhf_jax.playground import tasks
from rlhf_jax.playground.tokenizer import build_playground_tokenizer
from rlhf_jax.rewards.ensemble import (EnsembleReward, aggregate, average_weights,
                                       check_aggregation, warm_average)
from rlhf_jax.rewards.model import ModelReward

# Three members' scores of four responses.
SCORES_3x4 = np.array([[1.0, 2.0, 3.0, 4.0],
                       [3.0, 0.0, 3.0, 8.0],
                       [2.0, 4.0, 0.0, 0.0]])


@pytest.mark.parametrize('array', [np.asarray, jnp.asarray])
def test_aggregations_by_hand(array):
  scores = array(SCORES_3x4)
  np.testing.assert_allclose(aggregate(scores, 'mean', uncertainty_weight=0.5), [2, 2, 2, 4])
  np.testing.assert_allclose(aggregate(scores, 'min', uncertainty_weight=0.5), [1, 0, 0, 0])
  # Population variances: 2/3, 8/3, 2, 32/3; mean − 0.5 · var.
  np.testing.assert_allclose(aggregate(scores, 'uncertainty', uncertainty_weight=0.5),
                             [2 - 1 / 3, 2 - 4 / 3, 2 - 1, 4 - 16 / 3], rtol=1e-6)
  np.testing.assert_allclose(aggregate(scores, 'uncertainty', uncertainty_weight=0.0),
                             [2, 2, 2, 4])
  with pytest.raises(InputError, match="aggregation 'median'; choose one of"):
    aggregate(scores, 'median', uncertainty_weight=0.5)


def test_check_aggregation_names_the_key():
  block = ml_collections.ConfigDict({'reward_aggregation': 'max', 'uncertainty_weight': 0.5})
  with pytest.raises(InputError, match=r'config\.rl\.reward_aggregation='):
    check_aggregation(block, 'config.rl')
  block.update(reward_aggregation='uncertainty', uncertainty_weight=-1.0)
  with pytest.raises(InputError, match=r'config\.bon\.uncertainty_weight=-1\.0'):
    check_aggregation(block, 'config.bon')


# WARM.

SMALL = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                    head='scalar')


def scalar_model(seed, cfg=SMALL):
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  model.head.kernel[...] = jax.random.normal(jax.random.key(seed + 100), model.head.kernel.shape)
  return model


def leaves(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_average_weights_is_the_elementwise_mean():
  states = [nnx.split(scalar_model(seed))[1] for seed in range(3)]
  graphdef = nnx.split(scalar_model(0))[0]
  averaged = average_weights(states)
  members = [leaves(state) for state in states]
  for leaf, a, b, c in zip(leaves(averaged), *members, strict=True):
    assert leaf.dtype == np.float32
    np.testing.assert_allclose(leaf, (a + b + c) / 3, rtol=1e-6, atol=1e-7)
  assert not np.allclose(leaves(averaged)[-1], members[0][-1])
  assert nnx.merge(graphdef, averaged).cfg == SMALL  # Still the architecture's state.
  np.testing.assert_array_equal(leaves(average_weights(states[:1]))[0], members[0][0])


def test_average_weights_rejects_other_architectures():
  state = nnx.split(scalar_model(0))[1]
  deeper = nnx.split(scalar_model(1, SMALL.replace(n_layers=3)))[1]
  with pytest.raises(InputError, match='another tree'):
    average_weights([state, deeper])
  wider = nnx.split(scalar_model(1, SMALL.replace(d_ff=64)))[1]
  with pytest.raises(InputError,
                     match=r"\['down'\]\['kernel'\].* has shapes \[\(32, 16\), \(64, 16\)\]"):
    average_weights([state, wider])
  with pytest.raises(InputError, match='at least one'):
    average_weights([])


def test_warm_average_writes_a_reward_model_with_the_mean_weights(tmp_path):
  models = [scalar_model(seed) for seed in (0, 1)]
  for i, model in enumerate(models):
    save_hf(model, tmp_path / f'rm{i}')
  mesh = parallel.make_mesh({'data': -1})
  warm_average([str(tmp_path / 'rm0'), str(tmp_path / 'rm1')], str(tmp_path / 'warm'),
               mesh=mesh)
  warm = load_model(str(tmp_path / 'warm'), mesh, parallel.DEFAULT_RULES, head='scalar')
  assert warm.module().cfg == read_hf_config(str(tmp_path / 'rm0'), head='scalar')
  for leaf, a, b in zip(leaves(warm.params), *(leaves(nnx.state(m)) for m in models),
                        strict=True):
    np.testing.assert_array_equal(leaf, (a + b) / 2)
  save_hf(scalar_model(2, SMALL.replace(d_ff=64)), tmp_path / 'wider')
  with pytest.raises(InputError, match='different architectures'):
    warm_average([str(tmp_path / 'rm0'), str(tmp_path / 'wider')], str(tmp_path / 'bad'))


# Ensembles of text rewards.

TEXT_MODEL = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         d_ff=64, max_position=64)
SHAPE = dict(seq_len=48, max_prompt_len=24, batch_size=8, rules=parallel.DEFAULT_RULES)


@pytest.fixture(scope='module')
def tokenizer():
  return build_playground_tokenizer(num_documents=200)


@pytest.fixture(scope='module')
def members(tokenizer):
  mesh = parallel.make_mesh({'data': -1})
  return [ModelReward.random(TEXT_MODEL, tokenizer, seed=seed, mesh=mesh, **SHAPE)
          for seed in (0, 1)]


@pytest.fixture(scope='module')
def pairs():
  prompts = tasks.sample_prompts(0, 'eval', 6)
  rng = np.random.default_rng(0)
  return prompts * 2, [tasks.reference(p) for p in prompts] + [tasks.corrupt(p, rng)
                                                               for p in prompts]


def test_an_ensemble_of_one_model_twice_is_that_model(members, pairs):
  alone = members[0](*pairs)
  for how in ('mean', 'min', 'uncertainty'):
    twice = EnsembleReward([members[0], members[0]], aggregation=how, uncertainty_weight=0.5)
    np.testing.assert_array_equal(twice(*pairs), alone)


def test_an_ensemble_aggregates_its_members_scores(members, pairs):
  r0, r1 = (member(*pairs) for member in members)
  assert np.abs(r0 - r1).max() > 0.1
  ensemble = EnsembleReward(members, aggregation='uncertainty', uncertainty_weight=2.0)
  np.testing.assert_allclose(ensemble(*pairs),
                             (r0 + r1) / 2 - 2.0 * ((r0 - r1) / 2)**2, rtol=1e-12)
  worst = EnsembleReward(members, aggregation='min', uncertainty_weight=0.0)
  np.testing.assert_array_equal(worst(*pairs), np.minimum(r0, r1))
  shifted = worst.normalized([1.0, -2.0], [2.0, 0.5])
  np.testing.assert_allclose(shifted(*pairs), np.minimum((r0 - 1) / 2, (r1 + 2) / 0.5),
                             rtol=1e-12)
  reference = (pairs[0][:6], pairs[1][:6])
  standardized = worst.standardized_on(*reference)
  on_reference = standardized.member_scores(*reference)
  np.testing.assert_allclose(on_reference.mean(axis=1), 0.0, atol=1e-12)
  np.testing.assert_allclose(on_reference.std(axis=1), 1.0, rtol=1e-12)
  r0_ref, r1_ref = (member(*reference) for member in members)
  np.testing.assert_allclose(
      standardized(*pairs), np.minimum((r0 - r0_ref.mean()) / r0_ref.std(),
                                       (r1 - r1_ref.mean()) / r1_ref.std()), rtol=1e-12)
  with pytest.raises(InputError, match="aggregation 'max'"):
    EnsembleReward(members, aggregation='max', uncertainty_weight=0.0)


# The config entry and the run context.

def test_reward_model_lists_several_directories_and_each_is_checked(tmp_path, tokenizer):
  save_hf(scalar_model(0, TEXT_MODEL.replace(head='scalar')), tmp_path / 'rm0')
  save_hf(scalar_model(1, TEXT_MODEL.replace(head='scalar')), tmp_path / 'rm1')
  tokenizer.save_pretrained(tmp_path / 'tokenizer')
  rm0, rm1 = str(tmp_path / 'rm0'), str(tmp_path / 'rm1')
  assert reward_model_paths(f'{rm0}, {rm1},') == [rm0, rm1]
  assert reward_model_paths('') == []

  config = base_config()
  config.model.vocab_size = TEXT_MODEL.vocab_size
  config.train.seq_len = 48
  config.data = data_config({})
  config.data.tokenizer = str(tmp_path / 'tokenizer')
  config.bon = ml_collections.ConfigDict({'reward_model': f'{rm0},{rm1}'})
  check_paths(config)
  config.bon.reward_model = f'{rm0},{tmp_path / "missing"}'
  with pytest.raises(NotFound, match=r"config\.bon\.reward_model='.*missing': no such"):
    check_paths(config)

  ctx = RunContext(config, str(tmp_path / 'run'))
  single = ctx.reward_model(rm0)
  assert isinstance(single, ModelReward)
  ensemble = ctx.reward_model(f'{rm0},{rm1}', aggregation='min', uncertainty_weight=0.0)
  assert isinstance(ensemble, EnsembleReward) and len(ensemble.members) == 2
  prompts, responses = ['sort: 3 1 2'] * 2, ['1 2 3', '3 2 1']
  np.testing.assert_array_equal(ensemble(prompts, responses),
                                np.minimum(single(prompts, responses),
                                           ctx.reward_model(rm1)(prompts, responses)))


# Rollout scoring with an ensemble.

POLICY = SMALL.replace(head='lm')
SCORING = dict(temperature=1.0, chunk_size=2, kl_estimator='k1', eos_id=EOS,
               missing_eos_penalty=1.5, estimator='gae', group_size=1, gamma=1.0, lam=1.0,
               whiten_rewards=False, whiten_advantages=False)


def score(reward_states, shifts, scales, **options):
  """merge_and_score of policy = reference (KL = 0, V ≡ 0) against these reward models."""
  graphdefs, params = {}, {}
  for name, module in (('trained', ActorCritic(Transformer(POLICY, rngs=nnx.Rngs(0)),
                                               ValueHead(POLICY.d_model))),
                       ('reference', ActorCritic(Transformer(POLICY, rngs=nnx.Rngs(0)), None))):
    graphdefs[name], params[name] = nnx.split(module)
  graphdefs['reward'] = tuple(graphdef for graphdef, _ in reward_states)
  params['reward'] = [state for _, state in reward_states]
  controls = {'kl_coef': jnp.float32(0.1), 'score_shift': jnp.asarray(shifts, jnp.float32),
              'score_scale': jnp.asarray(scales, jnp.float32)}
  batch = {k: jnp.asarray(v) for k, v in BATCH.items()}
  return jax.jit(functools.partial(merge_and_score, graphdefs, options=SCORING | options))(
      params, batch, controls)


def test_rollout_scores_of_a_model_listed_twice_are_those_of_the_model():
  reward = nnx.split(scalar_model(2))
  update, metrics = score([reward], [0.3], [2.0])
  twice_update, twice_metrics = score([reward, reward], [0.3, 0.3], [2.0, 2.0],
                                      aggregation='mean')
  for key in update:
    np.testing.assert_array_equal(twice_update[key], update[key], err_msg=key)
  assert twice_metrics.pop('objective/ensemble_std') == 0.0
  assert twice_metrics.keys() == metrics.keys()
  for key in metrics:
    np.testing.assert_allclose(twice_metrics[key], metrics[key], rtol=1e-6, err_msg=key)


def test_rollout_scores_aggregate_each_member_normalised_by_its_own_statistics():
  """With KL = 0, V ≡ 0 and γ = λ = 1, every response token's advantage is its row's
  s = min_m (r_m − shift_m) / scale_m − 1.5 · [no EOS]."""
  rewards = [nnx.split(scalar_model(seed)) for seed in (2, 3)]
  batch = {k: jnp.asarray(v) for k, v in BATCH.items()}
  raw_MxB = np.stack([reward_model_scores(*reward, batch) for reward in rewards])
  member_MxB = (raw_MxB - np.array([[0.3], [-1.0]])) / np.array([[2.0], [0.5]])
  assert np.any(member_MxB[0] < member_MxB[1]) and np.any(member_MxB[1] < member_MxB[0])
  update, metrics = score(rewards, [0.3, -1.0], [2.0, 0.5], aggregation='min')
  scores_B = member_MxB.min(axis=0) - 1.5 * ~ENDED
  mask = BATCH['response_mask'].astype(bool)
  np.testing.assert_allclose(update['advantages'], np.where(mask, scores_B[:, None], 0.0),
                             rtol=1e-5, atol=1e-5)
  assert float(metrics['objective/scores']) == pytest.approx(raw_MxB.mean(), rel=1e-5)
  assert float(metrics['objective/ensemble_std']) == pytest.approx(
      member_MxB.std(axis=0).mean(), rel=1e-5)


def test_ppo_with_a_reward_model_listed_twice_scores_rollouts_as_with_it_once(tmp_path):
  """The learner end to end up to one scored rollout: an ensemble of one reward model listed
  twice ('mean') is normalised member by member to the same statistics and scores alike."""
  checkpoints = save_checkpoints(tmp_path)
  scored = {}
  reward = checkpoints[1]
  for name, spec in (('once', str(reward)), ('twice', f'{reward},{reward}')):
    config = config_for('ppo.py:tiny', checkpoints)
    config.rl.reward_model = spec
    algorithm = make_algorithm(RunContext(config, str(tmp_path / name)))
    scored[name] = algorithm.batches.iterate(1, algorithm.model.params)[1:]
  (update, metrics), (twice_update, twice_metrics) = scored['once'], scored['twice']
  for key in update:  # Two programs, which XLA may fuse differently: float noise apart.
    np.testing.assert_allclose(twice_update[key], update[key], rtol=1e-5, atol=1e-5,
                               err_msg=key)
  assert twice_metrics.pop('objective/ensemble_std') == pytest.approx(0.0, abs=1e-6)
  for key in ('objective/scores', 'objective/rlhf_reward', 'objective/gold'):
    assert twice_metrics[key] == pytest.approx(metrics[key], rel=1e-6), key


def test_best_of_n_with_a_reward_model_listed_twice_chooses_as_with_it_once(tmp_path):
  """Each member standardised over the policy's first answers, the 'mean' of one model listed
  twice ranks the answers as the model does: the same gold reward, the proxy reward an
  increasing affine map of the model's."""
  policy, reward = map(str, save_checkpoints(tmp_path))
  records = {}
  for name, spec in (('once', reward), ('twice', f'{reward},{reward}')):
    config = load_config('bon.py:tiny')
    config.model.hf_path, config.data.tokenizer = policy, ''
    config.bon.update(reward_model=spec, n_max=4, num_prompts=8)
    config.train.batch_size = 8
    config.eval.max_new_tokens = 6
    records[name] = best_of_n.run(RunContext(config, str(tmp_path / name)))
  gold, twice_gold = ([r['gold_reward'] for r in records[k]] for k in ('once', 'twice'))
  np.testing.assert_allclose(twice_gold, gold, rtol=1e-6)
  proxy, twice_proxy = (np.array([r['proxy_reward'] for r in records[k]])
                        for k in ('once', 'twice'))
  assert np.all(np.diff(proxy) > 0)
  slope = (twice_proxy[1:] - twice_proxy[0]) / (proxy[1:] - proxy[0])
  np.testing.assert_allclose(slope, slope[0], rtol=1e-4)
  assert slope[0] > 0
