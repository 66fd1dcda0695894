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

from rlhf_jax.playground.tokenizer import build_playground_tokenizer
from rlhf_jax.models import ModelConfig, Transformer, load_hf, save_hf
from rlhf_jax import algorithms
from rlhf_jax.engine.metrics import read_metrics
from rlhf_jax.errors import InputError

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


def config_for(name, checkpoints, lora_rank=0, **rl):
  """`name`'s config on these checkpoints for two short iterations; lora_rank > 0: LoRA on
  the attention's q and v and the MLP's up projection."""
  c = load_config(name)
  c.model.hf_path, c.rl.reward_model = map(str, checkpoints)
  if lora_rank:
    c.model.update(lora_rank=lora_rank, lora_targets=('q', 'v', 'up'))
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
  algorithms.run(config_for('ppo.py:tiny', checkpoints), str(workdir))
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


def records(workdir) -> list[dict]:
  return read_metrics(workdir / 'metrics.jsonl')


RESUMED = {  # id: (config, its options in config_for)
    'ppo': ('ppo.py:tiny', {}),
    'grpo': ('grpo.py:tiny', {'group_size': 4}),
    'rloo': ('grpo.py:rloo-tiny', {'group_size': 4, 'adaptive_kl': True}),
    'grpo-lora': ('grpo.py:tiny', {'group_size': 4, 'lora_rank': 4}),
}


@pytest.mark.parametrize('case', RESUMED)
def test_a_resumed_run_equals_the_uninterrupted_one(case, ppo_run, checkpoints, tmp_path):
  """Through the engine's one loop: step 0 logs the prompts' statistics and the eval loss, and
  a run stopped after one iteration and resumed logs exactly the records of one never stopped
  (RLOO's adaptive KL coefficient, checkpointed with the run, and LoRA's train state of
  adapters alone included)."""
  name, options = RESUMED[case]
  if case == 'ppo':
    uninterrupted = ppo_run
  else:
    uninterrupted = tmp_path / 'uninterrupted'
    algorithms.run(config_for(name, checkpoints, **options), str(uninterrupted))
  workdir = tmp_path / 'resumed'
  first = config_for(name, checkpoints, **options)
  first.train.steps = 1
  algorithms.run(first, str(workdir))
  algorithms.run(config_for(name, checkpoints, **options), str(workdir))
  # Its first part ended at step 1 with an evaluation of its own; every other record is the
  # uninterrupted run's, to the bit.
  resumed = [r for r in records(workdir) if not (r['step'] == 1 and 'eval/loss' in r)]
  assert resumed == records(uninterrupted)
  start = {k: v for record in records(workdir) if record['step'] == 0 for k, v in record.items()}
  assert start['data/prompts/train'] == 64 and start['data/prompts/eval'] > 0
  for step in (0, 2):
    evaluation = evaluations(workdir)[step]
    assert np.isfinite(evaluation['eval/loss']) and np.isfinite(evaluation['eval/policy/clipfrac'])
    assert ('eval/loss/value' in evaluation) == name.startswith('ppo')


def test_a_lora_ppo_run_trains_adapters_over_the_initial_policy(ppo_run, checkpoints, tmp_path):
  """PPO with LoRA on the policy and on its critic model (cut from the reward model), the
  reward model frozen without adapters: the first rollout is the full run's (the adapters add
  exactly 0 at the start), the reference is the policy's own base with its adapters off (KL 0
  before the first update, then moving), and the exported policy is the initial one with the
  adapted kernels alone changed, the adapters beside it for PEFT."""
  algorithms.run(config_for('ppo.py:tiny', checkpoints, lora_rank=4), str(tmp_path))
  logged, full = iterations(tmp_path), iterations(ppo_run)
  for key in ('objective/scores', 'objective/entropy', 'response_length'):
    assert logged[1][key] == pytest.approx(full[1][key], rel=1e-6), key
  assert logged[1]['objective/kl'] == 0 and logged[2]['objective/kl'] != 0
  assert np.isfinite(logged[2]['loss/value']) and logged[2]['grad_norm'] > 0
  evals = evaluations(tmp_path)
  assert evals[0]['eval/samples/kl'] == 0 and evals[2]['eval/samples/kl'] > 0

  exported, initial = (dict(nnx.to_flat_state(nnx.state(load_hf(path))))
                       for path in (tmp_path / 'hf', checkpoints[0]))
  adapted = {('attn', 'q'), ('attn', 'v'), ('mlp', 'up')}
  for path, value in initial.items():
    same = np.array_equal(np.asarray(exported[path][...]), np.asarray(value[...]))
    assert same != (path[0] == 'blocks' and path[2:4] in adapted and path[-1] == 'kernel'), path
  assert (tmp_path / 'hf' / 'adapter' / 'adapter_model.safetensors').exists()


def with_pretraining_text(config, ptx_coef: float):
  config.data.playground.update(train_size=256, eval_size=32)
  config.rl.update(ptx_coef=ptx_coef, ptx_source='playground:text')
  config.optim.lr = 3e-3  # Large enough for 8 updates to move the random model's NLL.
  return config


def test_ppo_ptx_lowers_the_pretraining_nll_and_resumes_exactly(checkpoints, tmp_path):
  """PPO-ptx: with a text source, evaluations measure the NLL of held-out text at any γ; γ > 0
  adds it to every update (the same rows at any restart), and lowers it."""
  runs = {gamma: tmp_path / f'gamma{gamma:g}' for gamma in (0.0, 10.0)}
  for gamma, workdir in runs.items():
    algorithms.run(with_pretraining_text(config_for('ppo.py:tiny', checkpoints), gamma),
                   str(workdir))
  plain, ptx = (evaluations(runs[gamma]) for gamma in (0.0, 10.0))
  assert plain[0]['eval/loss/ptx'] == ptx[0]['eval/loss/ptx'] > 0  # The same initial policy.
  assert ptx[2]['eval/loss/ptx'] < plain[2]['eval/loss/ptx'] - 0.1
  assert 'loss/ptx' not in iterations(runs[0.0])[1] and 'loss/ptx' in iterations(runs[10.0])[1]
  workdir = tmp_path / 'resumed'
  first = with_pretraining_text(config_for('ppo.py:tiny', checkpoints), 10.0)
  first.train.steps = 1
  algorithms.run(first, str(workdir))
  algorithms.run(with_pretraining_text(config_for('ppo.py:tiny', checkpoints), 10.0),
                 str(workdir))
  resumed = [r for r in records(workdir) if not (r['step'] == 1 and 'eval/loss' in r)]
  assert resumed == records(runs[10.0])


def test_a_kl_budget_ends_the_run_at_the_first_evaluation_that_reaches_it(checkpoints, tmp_path):
  free = config_for('ppo.py:tiny', checkpoints)
  free.train.update(steps=3, eval_every=1, export_hf=False)
  algorithms.run(free, str(tmp_path / 'free'))
  kl = {step: m['eval/samples/kl'] for step, m in evaluations(tmp_path / 'free').items()}
  assert 0 == kl[0] < kl[1] < kl[2]
  budget = config_for('ppo.py:tiny', checkpoints, stop_kl=(kl[1] + kl[2]) / 2)
  budget.train.update(steps=3, eval_every=1)
  workdir = tmp_path / 'budget'
  algorithms.run(budget, str(workdir))
  assert sorted(iterations(workdir)) == [1, 2] and sorted(evaluations(workdir)) == [0, 1, 2]
  assert evaluations(workdir)[2]['eval/samples/kl'] == pytest.approx(kl[2], rel=1e-5)
  assert (workdir / 'hf' / 'config.json').exists()  # The policy it stopped at.
  algorithms.run(budget, str(workdir))  # A rerun stays stopped.
  assert sorted(iterations(workdir)) == [1, 2] and sorted(evaluations(workdir)) == [0, 1, 2]


def test_the_sharding_layout_does_not_change_the_numbers(ppo_run, checkpoints, tmp_path):
  config = config_for('ppo.py:tiny', checkpoints)
  config.train.update(steps=1, eval_every=0, export_hf=False)
  config.mesh.update(data=1, fsdp=8)  # Parameters sharded over 8 devices instead of copied.
  algorithms.run(config, str(tmp_path))
  fsdp, data = iterations(tmp_path)[1], iterations(ppo_run)[1]
  for key in ('objective/scores', 'objective/entropy', 'loss/policy', 'loss/value',
              'grad_norm', 'param_norm'):
    assert fsdp[key] == pytest.approx(data[key], rel=1e-4, abs=1e-6), key


def test_grpo_runs_without_a_critic_on_a_python_reward_function(checkpoints, tmp_path):
  """GRPO: G samples per prompt, no critic, β·KL_k3 in the loss (RLOO's advantages differ only
  in the pure estimator, tested in test_rl_units.py); here against the playground's gold as a
  Python reward function, without a reward model: the rollout's scores are the function's on
  the decoded responses, which the run's gold metric measures independently."""
  config = config_for('grpo.py:tiny', checkpoints, group_size=4, reward_model='',
                      reward_fns=('rlhf_jax.playground.tasks:program_gold',))
  config.train.update(steps=1, eval_every=0, export_hf=False)
  algorithms.run(config, str(tmp_path))
  record = iterations(tmp_path)[1]
  assert 'loss/value' not in record and 'value/clipfrac' not in record
  assert np.isfinite(record['loss/policy']) and record['objective/kl'] == 0
  assert record['loss/kl'] >= 0  # 0 at the first minibatch, > 0 once the policy has moved.
  assert record['objective/scores'] == pytest.approx(record['objective/gold'], rel=1e-6)
  assert record['objective/function_scores'] == record['objective/scores']


def test_ppo_needs_a_reward_and_a_critic_to_start_from(checkpoints, tmp_path):
  with pytest.raises(InputError, match='and a reward: a reward model'):
    algorithms.run(config_for('ppo.py:tiny', checkpoints, reward_model=''), str(tmp_path))
  config = config_for('ppo.py:tiny', checkpoints, reward_model='',
                      reward_fns=('rlhf_jax.playground.tasks:program_gold',))
  with pytest.raises(InputError, match='critic="model" starts the critic'):
    algorithms.run(config, str(tmp_path))


def test_ppo_raises_the_proxy_score(checkpoints, tmp_path):
  """What RL is for: the reward model's score of the policy's answers rises. Answers of two
  tokens make the random reward model a contextual bandit that a few iterations can learn."""
  config = config_for('ppo.py:tiny', checkpoints, kl_coef=0.0)
  config.rl.update(max_new_tokens=2, rollout_batch_size=64, ppo_epochs=4)
  config.train.update(steps=6, eval_every=0, export_hf=False, checkpoint_every=6,
                      seq_len=config.data.max_prompt_len + 2, batch_size=64)
  config.optim.lr = 3e-2
  algorithms.run(config, str(tmp_path))
  scores = [iterations(tmp_path)[step]['objective/scores'] for step in range(1, 7)]
  # Rollouts of 64 answers to fresh prompts: their mean score moves by about 1 between
  # iterations by chance (the first ones: -1.95, -1.35); a learning policy gains several.
  assert np.mean(scores[-2:]) > np.mean(scores[:2]) + 3, scores
