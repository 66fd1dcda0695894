"""Online RL end to end (PPO, GRPO) on tiny random models, in-process on 8 CPU devices.

The policy and reward model are random one-layer transformers over the playground tokenizer,
saved as Hugging Face checkpoints, as an SFT and an RM run would export them. Runs are two
iterations long; the checks are on what every run must get right whatever it learns: the KL to
the reference is 0 before the first update, metrics are complete, a resumed run equals an
uninterrupted one, and the sharding layout does not change the numbers.
"""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from rlhf_jax.data.tokenizer import build_playground_tokenizer
from rlhf_jax.models import ModelConfig, Transformer, save_hf
from rlhf_jax.training import trainers
from rlhf_jax.training.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                   max_position=128)
NEW_TOKENS = 6


def save_checkpoints(directory) -> tuple:
  """(policy, reward model) HF directories of random models, the tokenizer with the policy."""
  tokenizer = build_playground_tokenizer(TINY.vocab_size, num_documents=500)
  ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  save_hf(Transformer(TINY, rngs=nnx.Rngs(0)), directory / 'policy', **ids)
  tokenizer.save_pretrained(directory / 'policy')
  reward = Transformer(TINY.replace(head='scalar'), rngs=nnx.Rngs(1))
  reward.head.kernel[...] = jax.random.normal(jax.random.key(2), reward.head.kernel.shape)
  save_hf(reward, directory / 'reward', **ids)
  return directory / 'policy', directory / 'reward'


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  return save_checkpoints(tmp_path_factory.mktemp('rl_models'))


def load_config(name: str):
  file_name, _, preset = name.partition(':')
  spec = importlib.util.spec_from_file_location(file_name[:-3], ROOT / 'configs' / file_name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def config_for(name, checkpoints, **rl):
  c = load_config(name)
  c.model.hf_path, c.rl.reward_model = map(str, checkpoints)
  c.train.update(steps=2, batch_size=16, seq_len=c.data.max_prompt_len + NEW_TOKENS,
                 eval_every=2, checkpoint_every=1, async_checkpoint=False, progress_bar=False,
                 tensorboard=False)
  c.rl.update(rollout_batch_size=16, num_minibatches=2, ppo_epochs=2,
              max_new_tokens=NEW_TOKENS, num_prompts=64, **rl)
  c.eval.update(num_prompts=16, max_new_tokens=NEW_TOKENS)
  return c


def iterations(workdir) -> dict[int, dict]:
  return {m['step']: m for m in read_metrics(workdir / 'metrics.jsonl') if 'loss' in m}


def evaluations(workdir) -> dict[int, dict]:
  return {m['step']: m for m in read_metrics(workdir / 'metrics.jsonl')
          if 'eval/samples/gold_reward' in m}


@pytest.fixture(scope='module')
def ppo_run(checkpoints, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ppo')
  trainers.run(config_for('ppo.py:tiny', checkpoints), str(workdir))
  return workdir


def test_ppo_logs_every_metric_and_starts_at_the_reference(ppo_run):
  logged = iterations(ppo_run)
  assert sorted(logged) == [1, 2]
  for record in logged.values():
    for key in ('objective/scores', 'objective/kl', 'objective/entropy', 'objective/gold',
                'policy/approxkl', 'policy/clipfrac', 'loss/policy', 'loss/value',
                'response_length', 'ended_with_eos', 'kl_coef'):
      assert np.isfinite(record[key]), key
    assert 0 < record['response_length'] <= NEW_TOKENS
    assert 0 <= record['objective/gold'] <= 1
    assert not any(k.startswith('time/') for k in record)  # Wall times: the progress bar's.
  # Before any update the policy is the reference: log π − log π_ref = 0 on every token.
  assert logged[1]['objective/kl'] == 0
  assert logged[2]['objective/kl'] != 0
  assert logged[1]['objective/entropy'] > 0

  evals = evaluations(ppo_run)
  assert sorted(evals) == [0, 2]
  assert evals[0]['eval/samples/kl'] == 0 and evals[0]['eval/samples/win_rate'] == 0.5
  assert np.isfinite(evals[2]['eval/samples/proxy_reward'])


def test_ppo_exports_the_policy_for_transformers(ppo_run, checkpoints):
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(ppo_run / 'hf')
  initial = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[0])
  moved = [not np.allclose(a.detach().numpy(), b.detach().numpy())
           for a, b in zip(hf_model.parameters(), initial.parameters())]
  assert any(moved)
  assert transformers.AutoTokenizer.from_pretrained(ppo_run / 'hf').eos_token is not None


def test_a_resumed_run_equals_the_uninterrupted_one(ppo_run, checkpoints, tmp_path):
  workdir = tmp_path / 'resumed'
  first = config_for('ppo.py:tiny', checkpoints)
  first.train.steps = 1
  trainers.run(first, str(workdir))
  trainers.run(config_for('ppo.py:tiny', checkpoints), str(workdir))
  resumed, uninterrupted = iterations(workdir), iterations(ppo_run)
  assert sorted(resumed) == [1, 2]
  for key in ('objective/scores', 'objective/kl', 'loss/policy', 'loss/value', 'param_norm'):
    assert resumed[2][key] == pytest.approx(uninterrupted[2][key], rel=1e-5), key
  assert evaluations(workdir)[2]['eval/samples/gold_reward'] == pytest.approx(
      evaluations(ppo_run)[2]['eval/samples/gold_reward'])


def test_a_kl_budget_ends_the_run_at_the_first_evaluation_that_reaches_it(checkpoints, tmp_path):
  free = config_for('ppo.py:tiny', checkpoints)
  free.train.update(steps=3, eval_every=1, export_hf=False)
  trainers.run(free, str(tmp_path / 'free'))
  kl = {step: m['eval/samples/kl'] for step, m in evaluations(tmp_path / 'free').items()}
  assert 0 == kl[0] < kl[1] < kl[2]
  budget = config_for('ppo.py:tiny', checkpoints, stop_kl=(kl[1] + kl[2]) / 2)
  budget.train.update(steps=3, eval_every=1)
  workdir = tmp_path / 'budget'
  trainers.run(budget, str(workdir))
  assert sorted(iterations(workdir)) == [1, 2] and sorted(evaluations(workdir)) == [0, 1, 2]
  assert evaluations(workdir)[2]['eval/samples/kl'] == pytest.approx(kl[2], rel=1e-5)
  assert (workdir / 'hf' / 'config.json').exists()  # The policy it stopped at.
  trainers.run(budget, str(workdir))  # A rerun stays stopped.
  assert sorted(iterations(workdir)) == [1, 2] and sorted(evaluations(workdir)) == [0, 1, 2]


def test_the_sharding_layout_does_not_change_the_numbers(ppo_run, checkpoints, tmp_path):
  config = config_for('ppo.py:tiny', checkpoints)
  config.train.update(steps=1, eval_every=0, export_hf=False)
  config.mesh.update(data=1, fsdp=8)  # Parameters sharded over 8 devices instead of copied.
  trainers.run(config, str(tmp_path))
  fsdp, data = iterations(tmp_path)[1], iterations(ppo_run)[1]
  for key in ('objective/scores', 'objective/entropy', 'loss/policy', 'loss/value',
              'grad_norm', 'param_norm'):
    assert fsdp[key] == pytest.approx(data[key], rel=1e-4, abs=1e-6), key


def test_grpo_runs_without_a_critic(checkpoints, tmp_path):
  """GRPO: G samples per prompt, no critic, β·KL_k3 in the loss (RLOO's advantages differ only
  in the pure estimator, tested in test_rl_units.py)."""
  config = config_for('grpo.py:tiny', checkpoints, group_size=4)
  config.train.update(steps=1, eval_every=0, export_hf=False)
  trainers.run(config, str(tmp_path))
  record = iterations(tmp_path)[1]
  assert 'loss/value' not in record and 'value/clipfrac' not in record
  assert np.isfinite(record['loss/policy']) and record['objective/kl'] == 0
  assert record['loss/kl'] >= 0  # 0 at the first minibatch, > 0 once the policy has moved.
