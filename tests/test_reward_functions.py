"""Python reward functions (rlhf_jax.rewards.functions): TRL's `fn(prompts, completions)`,
weighted and summed in order, None adding nothing, and errors that name the function and the
example; in best-of-n, the playground's gold as the only reward."""

import numpy as np
import pytest

from rlhf_jax.context import RunContext
from rlhf_jax.errors import InputError
from rlhf_jax.evals import best_of_n
from rlhf_jax.rewards.functions import FunctionReward, add_rewards
from test_rl_runs import load_config, save_checkpoints

HERE = 'test_reward_functions'


def length(prompts, completions):
  return [len(c) for c in completions]


def only_digits(prompts, completions):
  """1 for an all-digit completion; None (does not apply) for an empty one."""
  return [None if not c else float(c.isdigit()) for c in completions]


def picky(prompts, completions):
  if 'boom' in completions:
    raise ValueError('cannot score this')
  return [0.0] * len(completions)


def infinite(prompts, completions):
  return [float('inf') if c == 'x' else 0.0 for c in completions]


def short(prompts, completions):
  return [0.0]


def test_weighted_sum_in_order_across_chunks_with_none_as_zero():
  completions = [str(i) if i % 3 else ('' if i % 2 else f'a{i}') for i in range(37)]
  prompts = [f'q{i}' for i in range(37)]
  reward = FunctionReward([f'{HERE}:length', f'{HERE}:only_digits'], [0.5, 2.0],
                          key='config.rl.reward_fns', max_workers=4)  # Chunks of 10 rows.
  expected = [0.5 * len(c) + (2.0 * c.isdigit() if c else 0.0) for c in completions]
  np.testing.assert_allclose(reward(prompts, completions), expected)
  scores = reward.scores(prompts, completions)
  assert np.isnan(scores[f'{HERE}:only_digits'][3])  # '' : None, 'does not apply'.
  assert FunctionReward([f'{HERE}:length'], key='k')(['p'], ['abc']).tolist() == [3.0]


def test_an_exception_names_the_function_and_the_example():
  completions = ['fine'] * 5 + ['boom'] + ['fine'] * 4
  reward = FunctionReward([f'{HERE}:picky'], key='config.rl.reward_fns', max_workers=2)
  with pytest.raises(InputError, match=r"config\.rl\.reward_fns: test_reward_functions:picky "
                                       r"raised ValueError: cannot score this on example 5 "
                                       r"\(prompt 'p5', completion 'boom'\)"):
    reward([f'p{i}' for i in range(10)], completions)


@pytest.mark.parametrize('name, match', [
    ('infinite', r"infinite returned inf for example 1 \(prompt 'p', completion 'x'\)"),
    ('short', r'short returned 1 values for 2 completions'),
])
def test_a_bad_value_or_length_is_an_error(name, match):
  with pytest.raises(InputError, match=match):
    FunctionReward([f'{HERE}:{name}'], key='k', max_workers=1)(['p', 'p'], ['y', 'x'])


@pytest.mark.parametrize('names, weights, match', [
    (['no_colon'], (), r'not "package\.module:function"'),
    (['no_such_module_here:f'], (), r"cannot import 'no_such_module_here'"),
    ([f'{HERE}:missing'], (), r"has no function 'missing'"),
    ([f'{HERE}:length', f'{HERE}:picky'], (1.0,), r'names 2 functions but its weights'),
    ([], (), r'is empty'),
])
def test_bad_names_and_weights_are_errors(names, weights, match):
  with pytest.raises(InputError, match=match):
    FunctionReward(names, weights, key='config.bon.reward_fns')


def test_add_rewards_sums_what_is_given():
  one = lambda p, r: np.ones(len(p))  # pylint: disable=unnecessary-lambda-assignment
  assert add_rewards(None, one) is one
  np.testing.assert_allclose(add_rewards(one, one)(['a', 'b'], ['c', 'd']), [2.0, 2.0])


def test_best_of_n_with_the_gold_as_its_reward_function_chooses_the_gold_best(tmp_path):
  """Best-of-n with the playground's gold (a verifiable reward) as the proxy: the proxy and the
  gold reward of the choice are the same numbers, and they rise with n."""
  policy, _ = map(str, save_checkpoints(tmp_path))
  config = load_config('bon.py:tiny')
  config.model.hf_path, config.data.tokenizer = policy, ''
  config.bon.update(reward_fns=('rlhf_jax.playground.tasks:program_gold',), n_max=4,
                    num_prompts=8)
  config.train.batch_size = 8
  config.eval.max_new_tokens = 6
  records = best_of_n.run(RunContext(config, str(tmp_path / 'bon')))
  proxy, gold = ([r[k] for r in records] for k in ('proxy_reward', 'gold_reward'))
  np.testing.assert_allclose(proxy, gold, rtol=1e-12)
  assert gold == sorted(gold)
