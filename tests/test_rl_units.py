"""Online RL's pieces (actor-critic forward, rollout scoring, advantages, the RL loss, config
checks, prompts, the KL to a reference) against dense forwards, NumPy transcriptions of the
formulas, exact enumerations and hand values."""

import importlib.util
import itertools
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import write_jsonl
from flax import nnx
from test_ppo import numpy_gae

from rlhf_jax.losses import token_logprobs
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.algorithms.rl.actor_critic import ActorCritic, ValueHead
from rlhf_jax.algorithms.rl import learner
from rlhf_jax.algorithms.rl.learner import check_config, make_loss_fn
from rlhf_jax.algorithms.rl.loss import rl_loss_fn
from rlhf_jax.algorithms.rl.prompts import prompt_pool, rollout_prompts
from rlhf_jax.data.encoding import encode_prompt
from rlhf_jax.data.records import Message
from rlhf_jax.playground.tokenizer import build_playground_tokenizer
from rlhf_jax.rewards.functions import FunctionReward
from rlhf_jax.sampling.text import encode_prompts
from rlhf_jax.algorithms.rl.rollout import (advantages_and_returns, reward_model_scores,
                                       score_rollout, sequences)
from rlhf_jax.models.scoring import sequence_kl, sequence_logps

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32)
EOS = 2
# Four rows: left-padded prompts of P = 4 and right-padded responses of N = 5. Rows 0 and 3
# end with EOS; row 1 runs out of tokens; row 2 has an EOS only after its last real token.
BATCH = {
    'prompt_tokens': np.array([[5, 6, 7, 8], [0, 9, 10, 11], [0, 0, 12, 13], [0, 0, 0, 14]]),
    'prompt_mask': np.array([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]),
    'response_tokens': np.array([[15, 16, EOS, 0, 0], [17, 18, 19, 20, 21],
                                 [22, 23, 0, EOS, 0], [EOS, 0, 0, 0, 0]]),
    'response_mask': np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0],
                               [1, 0, 0, 0, 0]]),
}
ENDED = np.array([True, False, False, True])
P, N = BATCH['prompt_tokens'].shape[1], BATCH['response_tokens'].shape[1]


def model(seed=0, head='lm'):
  return Transformer(CONFIG.replace(head=head), rngs=nnx.Rngs(seed))


def value_head(seed=0):
  """A ValueHead with known nonzero weights (it starts at V ≡ 0)."""
  head = ValueHead(CONFIG.d_model)
  head.kernel[...] = jnp.asarray(np.random.default_rng(seed).normal(size=CONFIG.d_model),
                                 jnp.float32)
  head.bias[...] = jnp.float32(0.7)
  return head


def full_sequences():
  tokens = np.concatenate([BATCH['prompt_tokens'], BATCH['response_tokens']], axis=1)
  mask = np.concatenate([BATCH['prompt_mask'], BATCH['response_mask']], axis=1).astype(bool)
  return jnp.asarray(tokens), jnp.asarray(mask)


def np_log_softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(axis=axis, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def dense_response_logps(policy, temperature):
  """log softmax(logits / T) of the full forward, at position P − 1 + j for token P + j."""
  tokens, mask = full_sequences()
  logits = np.asarray(policy(tokens, attention_mask=mask), np.float64) / temperature
  logps = np_log_softmax(logits)
  before = P - 1 + np.arange(N)
  rows = np.arange(tokens.shape[0])[:, None]
  return logps[rows, before[None], np.asarray(tokens)[:, P + np.arange(N)]]


def load_config(name, preset):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset)
  config.model.hf_path, config.rl.reward_model = 'runs/sft/hf', 'runs/rm/hf'
  return config


# token_logprobs at a temperature.


@pytest.mark.parametrize('temperature, chunk_size', [(0.5, 2), (2.5, 16)])
def test_token_logprobs_at_temperature_equal_log_softmax_of_scaled_logits(temperature,
                                                                         chunk_size):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 5, 8)).astype(np.float32)
  unembed = rng.normal(size=(8, 11)).astype(np.float32)
  targets = rng.integers(0, 11, size=(2, 5))
  logps = token_logprobs(jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(targets),
                         chunk_size=chunk_size, temperature=temperature)
  dense = np_log_softmax(hidden.astype(np.float64) @ unembed / temperature)
  expected = np.take_along_axis(dense, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(logps, expected, atol=1e-5)


# ActorCritic.


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_response_logprobs_align_with_the_full_forward_on_left_padded_prompts(temperature):
  policy = model()
  tokens, mask = full_sequences()
  logps, values = ActorCritic(policy, None).response_logprobs_and_values(
      tokens, mask, prompt_len=P, temperature=temperature, chunk_size=2)
  assert values is None
  np.testing.assert_allclose(logps, dense_response_logps(policy, temperature), atol=1e-5)


def test_value_head_reads_h_dot_w_plus_b_before_each_response_token():
  policy, head = model(), value_head()
  tokens, mask = full_sequences()
  _, values = ActorCritic(policy, head).response_logprobs_and_values(
      tokens, mask, prompt_len=P, temperature=1.0, chunk_size=4)
  hidden, _ = policy.hidden_states(tokens, attention_mask=mask)
  hidden = np.asarray(hidden, np.float64)[:, P - 1 + np.arange(N)]
  expected = hidden @ np.asarray(head.kernel[...], np.float64) + 0.7
  np.testing.assert_allclose(values, expected, atol=1e-5)


def test_critic_model_values_are_its_outputs_before_each_response_token():
  critic = model(seed=1, head='scalar')
  tokens, mask = full_sequences()
  _, values = ActorCritic(model(), critic).response_logprobs_and_values(
      tokens, mask, prompt_len=P, temperature=1.0, chunk_size=4)
  full = np.asarray(critic(tokens, attention_mask=mask))
  np.testing.assert_allclose(values, full[:, P - 1 + np.arange(N)], atol=1e-5)


def test_actor_critic_rejects_wrong_heads():
  with pytest.raises(ValueError, match='policy needs an LM head'):
    ActorCritic(model(head='scalar'), None)
  with pytest.raises(ValueError, match='critic model needs a scalar head'):
    ActorCritic(model(), model(seed=1))


# advantages_and_returns.

LENGTHS = np.array([5, 3, 1, 0, 4, 2])


def rollout_arrays(seed):
  rng = np.random.default_rng(seed)
  mask = np.arange(6)[None] < LENGTHS[:, None]
  scores = rng.normal(size=len(LENGTHS)).astype(np.float32)
  kl, values = rng.normal(size=(2, len(LENGTHS), 6)).astype(np.float32)
  return scores, kl, values, mask


def options(estimator, **changes):
  return dict(estimator=estimator, group_size=1, gamma=0.9, lam=0.8, whiten_rewards=False,
              whiten_advantages=False) | changes


def numpy_token_rewards(scores, kl, lengths, beta):
  rewards = np.zeros(kl.shape)
  for b, length in enumerate(lengths):
    rewards[b, :length] = -beta * kl[b, :length]
    if length:
      rewards[b, length - 1] += scores[b]
  return rewards


@pytest.mark.parametrize('whiten_rewards', [False, True])
def test_gae_estimator_is_token_rewards_then_gae(whiten_rewards):
  scores, kl, values, mask = rollout_arrays(0)
  adv, returns = advantages_and_returns(scores, kl, values, mask, kl_coef=0.3,
                                        **options('gae', whiten_rewards=whiten_rewards))
  rewards = numpy_token_rewards(scores, kl, LENGTHS, 0.3)
  if whiten_rewards:  # Scaled to unit variance, mean kept (Huang et al. 2024).
    real = rewards[mask]
    rewards = np.where(mask, (rewards - real.mean()) / real.std() + real.mean(), 0.0)
  expected = numpy_gae(rewards, values, LENGTHS, 0.9, 0.8)
  np.testing.assert_allclose(adv, expected, atol=1e-5)
  np.testing.assert_allclose(returns, np.where(mask, expected + values, 0.0), atol=1e-5)


def numpy_sequence_rewards(scores, kl, mask, beta):
  return scores - beta * np.where(mask, kl, 0.0).sum(-1)


@pytest.mark.parametrize('group_size', [2, 3])
@pytest.mark.parametrize('normalize_group_std', [True, False])
def test_grpo_is_the_group_normalised_sequence_reward_on_every_response_token(
    group_size, normalize_group_std):
  """(r − mean_g r) / (std_g r + 1e-4), or without the std (Dr. GRPO)."""
  scores, kl, _, mask = rollout_arrays(1)
  adv, returns = advantages_and_returns(
      scores, kl, None, mask, kl_coef=0.2,
      **options('grpo', group_size=group_size, normalize_group_std=normalize_group_std))
  assert returns is None
  rewards = numpy_sequence_rewards(scores, kl, mask, 0.2)
  expected = np.zeros(len(rewards))
  for start in range(0, len(rewards), group_size):  # Consecutive rows form a group.
    group = rewards[start:start + group_size]
    scale = group.std(ddof=1) + 1e-4 if normalize_group_std else 1.0
    expected[start:start + group_size] = (group - group.mean()) / scale
  np.testing.assert_allclose(adv, np.where(mask, expected[:, None], 0.0), atol=1e-4)


@pytest.mark.parametrize('group_size', [2, 3])
def test_rloo_is_the_reward_minus_the_mean_of_the_others(group_size):
  scores, kl, _, mask = rollout_arrays(2)
  adv, returns = advantages_and_returns(scores, kl, None, mask, kl_coef=0.2,
                                        **options('rloo', group_size=group_size))
  assert returns is None
  rewards = numpy_sequence_rewards(scores, kl, mask, 0.2)
  expected = np.zeros(len(rewards))
  for i, reward in enumerate(rewards):
    start = i // group_size * group_size
    others = [rewards[j] for j in range(start, start + group_size) if j != i]
    expected[i] = reward - np.mean(others)
  np.testing.assert_allclose(adv, np.where(mask, expected[:, None], 0.0), atol=1e-5)


@pytest.mark.parametrize('estimator', ['gae', 'grpo', 'rloo'])
def test_whitened_advantages_have_masked_mean_zero_and_std_one(estimator):
  scores, kl, values, mask = rollout_arrays(3)
  adv, _ = advantages_and_returns(scores, kl, values, mask, kl_coef=0.1,
                                  **options(estimator, group_size=2, whiten_advantages=True))
  adv = np.asarray(adv)
  assert adv[mask].mean() == pytest.approx(0.0, abs=1e-5)
  assert adv[mask].std() == pytest.approx(1.0, rel=1e-4)
  np.testing.assert_array_equal(adv[~mask], 0.0)


def test_unknown_estimator_is_rejected():
  scores, kl, values, mask = rollout_arrays(4)
  with pytest.raises(ValueError, match="Advantage estimator 'ppo'"):
    advantages_and_returns(scores, kl, values, mask, kl_coef=0.1, **options('ppo'))


# Rollout scoring.

CONTROLS = {'kl_coef': jnp.float32(0.1), 'score_shift': jnp.float32(0.3),
            'score_scale': jnp.float32(2.0)}


def scoring_options(estimator, **changes):
  return dict(temperature=0.8, chunk_size=2, kl_estimator='k1', eos_id=EOS,
              missing_eos_penalty=1.5) | options(estimator, gamma=1.0, lam=1.0) | changes


def raw_rewards(reward_model):
  """The scalar head's full-forward output at each row's last real token."""
  tokens, mask = full_sequences()
  outputs = np.asarray(reward_model(tokens, attention_mask=mask))
  last = [np.nonzero(row)[0].max() for row in np.asarray(mask)]
  return outputs[np.arange(len(last)), last]


def jnp_batch():
  return {k: jnp.asarray(v) for k, v in BATCH.items()}


def test_sequences_and_reward_model_scores():
  reward_model = model(seed=2, head='scalar')
  tokens, mask = sequences(jnp_batch())
  expected_tokens, expected_mask = full_sequences()
  np.testing.assert_array_equal(tokens, expected_tokens)
  assert mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask, expected_mask)
  graphdef, params = nnx.split(reward_model)
  np.testing.assert_allclose(reward_model_scores(graphdef, params, jnp_batch()),
                             raw_rewards(reward_model), atol=1e-5)


def test_score_rollout_against_its_own_policy_scores_each_row():
  """Policy = reference: KL = 0. With V ≡ 0 and γ = λ = 1, GAE gives every response token its
  row's score s = (r − shift) / scale − penalty · [no EOS]."""
  reward_model = model(seed=2, head='scalar')
  trained = ActorCritic(model(), ValueHead(CONFIG.d_model))
  reference = ActorCritic(model(), None)
  update, metrics = score_rollout(trained, reference, reward_model, jnp_batch(), CONTROLS,
                                  options=scoring_options('gae'))
  raw = raw_rewards(reward_model)
  scores = (raw - 0.3) / 2.0 - 1.5 * ~ENDED
  mask = BATCH['response_mask'].astype(bool)
  np.testing.assert_allclose(update['advantages'], np.where(mask, scores[:, None], 0.0),
                             atol=1e-5)
  np.testing.assert_allclose(update['returns'], update['advantages'], atol=1e-6)
  np.testing.assert_allclose(update['old_values'], 0.0)
  np.testing.assert_allclose(update['old_logps'], update['ref_logps'])
  np.testing.assert_allclose(update['old_logps'], dense_response_logps(trained.policy, 0.8),
                             atol=1e-5)
  np.testing.assert_array_equal(update['response_mask'], mask)
  assert float(metrics['objective/scores']) == pytest.approx(raw.mean(), abs=1e-5)
  assert float(metrics['objective/kl']) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics['objective/non_score_reward']) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics['objective/rlhf_reward']) == pytest.approx(scores.mean(), abs=1e-5)
  assert float(metrics['ended_with_eos']) == pytest.approx(0.5)
  assert float(metrics['response_length']) == pytest.approx(np.mean([3, 5, 2, 1]))
  assert 'value/mean' in metrics


def test_score_rollout_with_a_different_reference_penalises_the_kl():
  """RLOO, no critic: R = s − β Σ KL_k3 against the reference; no values or returns."""
  reward_model = model(seed=2, head='scalar')
  trained, reference = ActorCritic(model(), None), ActorCritic(model(seed=1), None)
  update, metrics = score_rollout(trained, reference, reward_model, jnp_batch(), CONTROLS,
                                  options=scoring_options('rloo', group_size=2,
                                                          kl_estimator='k3'))
  assert 'old_values' not in update and 'returns' not in update
  assert 'value/mean' not in metrics
  mask = BATCH['response_mask'].astype(bool)
  logps, ref_logps = (np.asarray(update[k], np.float64) for k in ('old_logps', 'ref_logps'))
  np.testing.assert_allclose(ref_logps, dense_response_logps(reference.policy, 0.8), atol=1e-5)
  log_r = ref_logps - logps
  k3_sum = np.where(mask, np.expm1(log_r) - log_r, 0.0).sum(-1)
  assert np.all(k3_sum > 0)
  k1_sum = np.where(mask, -log_r, 0.0).sum(-1)
  assert float(metrics['objective/kl']) == pytest.approx(k1_sum.mean(), abs=1e-5)
  assert abs(k1_sum.mean()) > 1e-3
  assert float(metrics['objective/non_score_reward']) == pytest.approx(-0.1 * k3_sum.mean(),
                                                                       abs=1e-5)
  scores = (raw_rewards(reward_model) - 0.3) / 2.0 - 1.5 * ~ENDED
  assert float(metrics['objective/rlhf_reward']) == pytest.approx(
      (scores - 0.1 * k3_sum).mean(), abs=1e-5)
  rewards = scores - 0.1 * k3_sum
  expected = rewards - rewards.reshape(2, 2)[:, ::-1].reshape(4)  # G = 2: the other one.
  np.testing.assert_allclose(update['advantages'], np.where(mask, expected[:, None], 0.0),
                             atol=1e-5)


# The RL loss.

LOSS_OPTIONS = dict(temperature=0.8, chunk_size=2, clip_eps=0.2, value_clip_eps=0.2,
                    vf_coef=0.1)


def loss_batch(trained, seed=0):
  """A minibatch at the model's own parameters: old log-probs and values from the model."""
  tokens, mask = full_sequences()
  logps, values = trained.response_logprobs_and_values(tokens, mask, prompt_len=P,
                                                       temperature=0.8, chunk_size=2)
  rng = np.random.default_rng(seed)
  batch = {'tokens': tokens, 'attention_mask': mask,
           'response_mask': jnp.asarray(BATCH['response_mask'].astype(bool)),
           'old_logps': logps, 'ref_logps': logps,
           'advantages': jnp.asarray(rng.normal(0.5, 1.0, size=(4, N)), jnp.float32)}
  if values is not None:
    batch |= {'old_values': values,
              'returns': values + jnp.asarray(rng.normal(size=(4, N)), jnp.float32)}
  return batch


def masked_np_mean(x, mask):
  return np.asarray(x, np.float64)[np.asarray(mask, bool)].mean()


def test_rl_loss_at_the_rollout_parameters_is_minus_the_mean_advantage():
  trained = ActorCritic(model(), None)
  batch = loss_batch(trained)
  loss, metrics = rl_loss_fn(trained, batch, **LOSS_OPTIONS, kl_loss_coef=0.0)
  expected = -masked_np_mean(batch['advantages'], batch['response_mask'])
  assert float(metrics['loss/policy']) == pytest.approx(expected, abs=1e-5)
  assert float(loss) == pytest.approx(expected, abs=1e-5)
  assert float(metrics['policy/clipfrac']) == 0.0
  assert float(metrics['policy/approxkl']) == pytest.approx(0.0, abs=1e-10)
  assert 'loss/value' not in metrics and 'loss/kl' not in metrics


def test_rl_loss_adds_the_value_loss_with_a_critic():
  trained = ActorCritic(model(), value_head())
  batch = loss_batch(trained)
  loss, metrics = rl_loss_fn(trained, batch, **LOSS_OPTIONS, kl_loss_coef=0.0)
  mask = batch['response_mask']
  policy = -masked_np_mean(batch['advantages'], mask)
  value = 0.5 * masked_np_mean(np.square(batch['old_values'] - batch['returns']), mask)
  assert float(metrics['loss/value']) == pytest.approx(value, rel=1e-5)
  assert float(metrics['value/clipfrac']) == 0.0
  assert float(loss) == pytest.approx(policy + 0.1 * value, rel=1e-5)


def test_rl_loss_kl_term_is_k3_to_the_reference():
  trained = ActorCritic(model(), None)
  batch = loss_batch(trained)
  policy = -masked_np_mean(batch['advantages'], batch['response_mask'])
  loss, metrics = rl_loss_fn(trained, batch, **LOSS_OPTIONS, kl_loss_coef=0.5)
  assert float(metrics['loss/kl']) == pytest.approx(0.0, abs=1e-6)
  assert float(loss) == pytest.approx(policy, abs=1e-5)
  # log π_ref = log π − 0.3 on every token: k3 = e^{−0.3} − 1 + 0.3.
  shifted = batch | {'ref_logps': batch['old_logps'] - 0.3}
  loss, metrics = rl_loss_fn(trained, shifted, **LOSS_OPTIONS, kl_loss_coef=0.5)
  k3 = np.exp(-0.3) - 1 + 0.3
  assert float(metrics['loss/kl']) == pytest.approx(k3, rel=1e-4)
  assert float(loss) == pytest.approx(policy + 0.5 * k3, abs=1e-5)


@pytest.mark.parametrize('aggregation', ['sequence_mean', 'max_length'])
def test_rl_loss_aggregates_the_policy_loss_and_the_kl_alike(aggregation):
  """At the rollout's parameters with log π_ref = log π − 0.3: −A and k3 per token, each
  aggregated over the minibatch's tokens as `aggregation` says."""
  trained = ActorCritic(model(), None)
  batch = loss_batch(trained)
  shifted = batch | {'ref_logps': batch['old_logps'] - 0.3}
  loss, metrics = rl_loss_fn(trained, shifted, **LOSS_OPTIONS, kl_loss_coef=0.5,
                             loss_aggregation=aggregation)
  mask = np.asarray(batch['response_mask'], bool)
  k3 = np.full(mask.shape, np.exp(-0.3) - 1 + 0.3)
  if aggregation == 'sequence_mean':
    aggregate = lambda x: np.mean([row[real].mean() for row, real in zip(x, mask)])
  else:
    aggregate = lambda x: np.where(mask, x, 0).sum() / mask.size
  policy = aggregate(-np.asarray(batch['advantages'], np.float64))
  assert float(metrics['loss/policy']) == pytest.approx(policy, abs=1e-5)
  assert float(metrics['loss/kl']) == pytest.approx(aggregate(k3), rel=1e-4)
  assert float(loss) == pytest.approx(policy + 0.5 * aggregate(k3), abs=1e-5)


def test_the_rl_config_sets_clip_higher_the_aggregation_and_the_group_std():
  config = load_config('grpo', 'tiny')
  assert make_loss_fn(config).keywords['clip_eps_high'] is None
  assert learner.scoring_options(config, eos_id=2)['normalize_group_std']
  config.rl.clip_eps_high, config.rl.loss_aggregation = 0.28, 'max_length'
  config.rl.normalize_group_std = False
  options = make_loss_fn(config).keywords
  assert options['clip_eps_high'] == 0.28 and options['loss_aggregation'] == 'max_length'
  assert not learner.scoring_options(config, eos_id=2)['normalize_group_std']


def test_rl_loss_ptx_term_is_gamma_times_the_pretraining_nll():
  """PPO-ptx (Ouyang et al. 2022, eq. 2): + γ · the mean next-token NLL of the text rows, by
  hand from the policy's full logits; padding (mask 0) is neither scored nor a target."""
  trained = ActorCritic(model(), None)
  batch = loss_batch(trained)
  tokens = np.random.default_rng(3).integers(3, CONFIG.vocab_size, size=(2, 7))
  mask = np.ones_like(tokens, bool)
  mask[1, 5:] = False
  text = {'tokens': jnp.asarray(tokens), 'attention_mask': jnp.asarray(mask),
          'loss_mask': jnp.asarray(mask)}
  logps = np_log_softmax(np.asarray(trained.policy(text['tokens'],
                                                   attention_mask=text['attention_mask']),
                                    np.float64))
  targets = np.take_along_axis(logps[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  nll = -targets[mask[:, 1:]].mean()
  policy, _ = rl_loss_fn(trained, batch, **LOSS_OPTIONS, kl_loss_coef=0.0)
  loss, metrics = rl_loss_fn(trained, batch | {'ptx': text}, **LOSS_OPTIONS, kl_loss_coef=0.0,
                             ptx_coef=27.8)
  assert float(metrics['loss/ptx']) == pytest.approx(nll, rel=1e-5)
  assert float(loss) == pytest.approx(float(policy) + 27.8 * nll, rel=1e-5)
  _, measured = rl_loss_fn(trained, batch | {'ptx': text}, **LOSS_OPTIONS, kl_loss_coef=0.0)
  assert float(measured['loss/ptx']) == pytest.approx(nll, rel=1e-5)  # γ = 0: measured only.


# Config checks.


@pytest.mark.parametrize('name, preset', [('ppo', 'tiny'), ('grpo', 'tiny'),
                                          ('grpo', 'rloo-tiny')])
def test_shipped_configs_pass_the_checks(name, preset):
  check_config(load_config(name, preset))


def gae_without_critic(c):
  c.rl.critic = 'none'


def grpo_with_one_sample(c):
  c.rl.group_size = 1


def indivisible_rollout(c):
  c.rl.rollout_batch_size = 24  # A multiple of G = 8, not of G × num_minibatches = 16.


def adaptive_kl_in_loss(c):
  c.rl.adaptive_kl = True


def short_seq_len(c):
  c.train.seq_len = c.data.max_prompt_len + c.rl.max_new_tokens - 1


def no_policy(c):
  c.model.hf_path = ''


def no_reward_model(c):
  c.rl.reward_model = ''


def unknown_kl_estimator(c):
  c.rl.kl_estimator = 'k4'


def kl_budget_without_evaluations(c):
  c.rl.stop_kl, c.train.eval_every = 4.5, 0


def negative_kl_budget(c):
  c.rl.stop_kl = -1.0


def ptx_without_text(c):
  c.rl.ptx_coef = 1.0


def unknown_loss_aggregation(c):
  c.rl.loss_aggregation = 'seq_mean'


@pytest.mark.parametrize('name, preset, change, key', [
    ('ppo', 'tiny', gae_without_critic, 'config.rl.critic'),
    ('grpo', 'tiny', grpo_with_one_sample, 'config.rl.group_size'),
    ('grpo', 'tiny', indivisible_rollout, 'config.rl.rollout_batch_size'),
    ('grpo', 'tiny', adaptive_kl_in_loss, 'config.rl.adaptive_kl'),
    ('ppo', 'tiny', short_seq_len, 'config.train.seq_len'),
    ('ppo', 'tiny', no_policy, 'config.model.hf_path'),
    ('ppo', 'tiny', no_reward_model, 'config.rl.reward_model'),
    ('ppo', 'tiny', unknown_kl_estimator, 'config.rl.kl_estimator'),
    ('ppo', 'tiny', kl_budget_without_evaluations, 'config.rl.stop_kl'),
    ('ppo', 'tiny', negative_kl_budget, 'config.rl.stop_kl'),
    ('ppo', 'tiny', ptx_without_text, 'config.rl.ptx_coef'),
    ('grpo', 'tiny', unknown_loss_aggregation, 'config.rl.loss_aggregation'),
])
def test_check_config_names_the_offending_key(name, preset, change, key):
  config = load_config(name, preset)
  change(config)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    check_config(config)


# Prompts.


def test_rollout_prompts_are_a_function_of_seed_and_iteration():
  config = load_config('grpo', 'tiny')
  config.rl.rollout_batch_size = 64  # 8 prompts × G = 8.
  pool = [f'prompt {i}' for i in range(50)]
  rows = rollout_prompts(pool, config, 3)
  assert len(rows) == 64
  assert rows == rollout_prompts(pool, config, 3)
  assert rows != rollout_prompts(pool, config, 4)
  chosen = rows[::8]
  assert len(set(chosen)) == 8  # Without replacement.
  assert rows == [p for p in chosen for _ in range(8)]  # Each prompt's G rows are consecutive.
  config.seed += 1
  assert rows != rollout_prompts(pool, config, 3)


def test_rollout_prompts_from_a_small_pool():
  config = load_config('ppo', 'tiny')  # G = 1: 64 rows from 5 prompts, with replacement.
  config.rl.rollout_batch_size = 64
  rows = rollout_prompts(['a', 'b', 'c', 'd', 'e'], config, 0)
  assert len(rows) == 64 and set(rows) <= {'a', 'b', 'c', 'd', 'e'}


def test_prompt_pool_from_a_text_file(tmp_path):
  config = load_config('ppo', 'tiny')
  path = tmp_path / 'prompts.txt'
  path.write_text('Sort 3 1 2.\n\nAdd 4 and 5.\n   \nName a colour.\n', encoding='utf-8')
  config.rl.prompts = str(path)
  assert prompt_pool(config) == ['Sort 3 1 2.', 'Add 4 and 5.', 'Name a colour.']
  path.write_text('\n  \n', encoding='utf-8')
  with pytest.raises(ValueError, match='no prompt'):
    prompt_pool(config)
  config.rl.prompts = str(tmp_path / 'missing.txt')
  with pytest.raises(FileNotFoundError, match=r'config\.rl\.prompts'):
    prompt_pool(config)


def test_prompt_pool_from_jsonl_and_parquet_sources(tmp_path):
  """A "prompt" column (a string or messages) or a "messages" column (its final assistant turn
  dropped), per split; one user message is its string, a conversation stays messages, which
  the sampler renders through the chat template and reward functions get as TRL's dicts."""
  config = load_config('ppo', 'tiny')
  system = {'role': 'system', 'content': 'Be brief.'}
  lines = {'train': [{'prompt': 'Sort 3 1 2.'},
                     {'prompt': [system, {'role': 'user', 'content': 'Add 4 and 5.'}]},
                     {'messages': [{'role': 'user', 'content': 'Hi'},
                                   {'role': 'assistant', 'content': 'Hello!'}]}],
           'eval': [{'prompt': 'Name a colour.'}]}
  for split, rows in lines.items():
    write_jsonl(tmp_path / f'prompts_{split}.jsonl', rows)
    os.makedirs(tmp_path / 'hf' / split)
    pq.write_table(pa.Table.from_pylist([{'question': f'{split} prompt'}]),
                   tmp_path / 'hf' / split / 'part-0.parquet')
  config.rl.prompts = f'jsonl:{tmp_path}/prompts_{{split}}.jsonl'
  config.data.field_map = {'prompt': 'question'}
  with pytest.raises(ValueError, match='prompts_train.jsonl:1: missing key "question"'):
    prompt_pool(config)
  config.data.field_map = {}
  train = prompt_pool(config)
  assert train[0] == 'Sort 3 1 2.' and train[2] == 'Hi'
  assert train[1] == (Message('system', 'Be brief.'), Message('user', 'Add 4 and 5.'))
  assert prompt_pool(config, 'eval') == ['Name a colour.']
  config.data.field_map = {'prompt': 'question'}
  config.rl.prompts = f'hf:{tmp_path}/hf'
  config.data.splits = {'train': 'train', 'eval': 'eval'}
  assert prompt_pool(config, 'eval') == ['eval prompt']

  tokenizer = build_playground_tokenizer(512)
  tokens, mask = encode_prompts(tokenizer, train[:2], 24)
  want = encode_prompt(tokenizer, train[1])
  assert tokens[1][mask[1].astype(bool)].tolist() == want
  reward = FunctionReward(['test_rl_units:prompt_kinds'], key='config.rl.reward_fns')
  assert reward(train[:2], ['a', 'b']).tolist() == [0.0, 1.0]


def prompt_kinds(prompts, completions):
  """A reward function that tells TRL's two prompt forms apart."""
  del completions
  assert all(isinstance(p, str) or all(set(m) == {'role', 'content'} for m in p)
             for p in prompts)
  return [0.0 if isinstance(p, str) else 1.0 for p in prompts]


# The KL of sampled answers to a reference (evaluations).


def every_answer(vocab_size, eos, max_new_tokens):
  """Every answer a sampler can draw, right-padded to max_new_tokens: tokens, mask [A, N]."""
  answers = []
  for length in range(1, max_new_tokens + 1):
    for prefix in itertools.product([v for v in range(vocab_size) if v != eos],
                                    repeat=length - 1):
      last = [eos] if length < max_new_tokens else range(vocab_size)
      answers += [(*prefix, token) for token in last]
  tokens = np.array([a + (0,) * (max_new_tokens - len(a)) for a in answers])
  mask = np.array([[1] * len(a) + [0] * (max_new_tokens - len(a)) for a in answers])
  return tokens, mask


def test_sequence_kl_averaged_over_every_answer_is_the_exact_kl_of_the_answer_distributions():
  """E_{y~π} Σ_t KL(π(·|y_<t) ‖ π_ref(·|y_<t)) = Σ_y π(y) log π(y)/π_ref(y), enumerating y
  (answers stop at EOS or after N tokens)."""
  config = CONFIG.replace(vocab_size=5)
  policy, reference = (Transformer(config, rngs=nnx.Rngs(seed)) for seed in (0, 1))
  answers, answer_mask = every_answer(5, eos=1, max_new_tokens=3)
  prompt = np.broadcast_to([0, 3, 4], (len(answers), 3))
  prompt_mask = np.broadcast_to([0, 1, 1], (len(answers), 3))
  rows = (jnp.asarray(np.concatenate([prompt, answers], 1)),
          jnp.asarray(np.concatenate([prompt_mask, answer_mask], 1)),
          jnp.asarray(np.concatenate([np.zeros_like(prompt_mask), answer_mask], 1)))
  logps = nnx.jit(lambda model, rows: sequence_logps(model, *rows, chunk_size=2)[0])
  kls = nnx.jit(lambda policy, reference, rows: sequence_kl(policy, reference, *rows,
                                                            chunk_size=2))
  logp = np.asarray(logps(policy, rows), np.float64)
  reference_logp = np.asarray(logps(reference, rows), np.float64)
  probability = np.exp(logp)
  assert probability.sum() == pytest.approx(1.0, abs=1e-5)  # The enumeration is complete.
  exact = (probability * (logp - reference_logp)).sum()
  kl = np.asarray(kls(policy, reference, rows), np.float64)
  assert (kl > 0).all()  # Unlike log π(y)/π_ref(y), which is negative for some answers:
  assert (logp < reference_logp).any()
  assert (probability * kl).sum() == pytest.approx(exact, rel=1e-4)
  np.testing.assert_allclose(kls(policy, policy, rows), 0.0, atol=1e-6)
