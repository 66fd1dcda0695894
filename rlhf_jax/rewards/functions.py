"""Python reward functions, as in TRL: `fn(prompts, completions) -> list[float]`.

`config.rl.reward_fns` (PPO, GRPO, RLOO) and `config.bon.reward_fns` (best-of-n) name them as
'package.module:function', weighted by `reward_fn_weights` (1 each if empty), and add them to
the reward model's score, or stand alone without one:

    r(x, y) = s_RM(x, y) + Σ_k w_k · f_k(x, y)

Verifiable rewards (a unit test, an exact answer, a format check) and the playground's gold
(`rlhf_jax.playground.tasks:program_gold`) are such functions. They run on the host, on the
decoded text, in a thread pool (chunks of the batch in parallel: functions that wait on I/O
overlap). A function may return None for an example it does not apply to: it adds 0 there,
as TRL's nansum does. An exception or a non-finite value names the function and the example.
Prompts reach them as TRL passes them: a string, or a conversation as a list of
{"role", "content"} dicts.
"""

import concurrent.futures
import importlib
import math
from collections.abc import Callable, Sequence

import numpy as np

from rlhf_jax.errors import InputError

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float | None]]


def load_reward_fn(name: str, key: str) -> RewardFn:
  """The function that 'package.module:function' names (`key`: the config entry, for errors)."""
  module_name, _, attribute = name.partition(':')
  if not module_name or not attribute:
    raise InputError(f'{key}: {name!r} is not "package.module:function".')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise InputError(f'{key}: cannot import {module_name!r} for {name!r}: {e}') from e
  fn = getattr(module, attribute, None)
  if not callable(fn):
    raise InputError(f'{key}: {module_name!r} has no function {attribute!r}.')
  return fn


class FunctionReward:
  """`reward(prompts, completions) -> [N] float64`: Σ_k w_k f_k over the named functions."""

  def __init__(self, names: Sequence[str], weights: Sequence[float] = (), *, key: str,
               max_workers: int = 8):
    """key: the config entry that names them (e.g. 'config.rl.reward_fns'), for errors."""
    if not names:
      raise InputError(f'{key} is empty: name at least one "package.module:function".')
    weights = tuple(weights) or (1.0,) * len(names)
    if len(weights) != len(names):
      raise InputError(f'{key} names {len(names)} functions but its weights '
                       f'(reward_fn_weights) are {len(weights)}: {weights}.')
    self.names, self.weights, self.key = tuple(names), weights, key
    self.fns = [load_reward_fn(name, key) for name in names]
    self.max_workers = max_workers

  def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
    """Each function's rewards [N] (NaN where it returned None), by name."""
    if len(prompts) != len(completions):
      raise InputError(f'{len(prompts)} prompts but {len(completions)} completions.')
    prompts = [p if isinstance(p, str) else [m._asdict() for m in p] for p in prompts]
    n = len(prompts)
    chunk = max(1, math.ceil(n / self.max_workers))
    starts = range(0, n, chunk)
    with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
      parts = {name: [pool.submit(self._call, name, fn, prompts, completions, start,
                                  min(start + chunk, n)) for start in starts]
               for name, fn in zip(self.names, self.fns)}
      return {name: np.concatenate([f.result() for f in futures] or [np.zeros(0)])
              for name, futures in parts.items()}

  def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    total = np.zeros(len(prompts))
    for weight, values in zip(self.weights, self.scores(prompts, completions).values()):
      total += weight * np.nan_to_num(values, nan=0.0)
    return total

  def _call(self, name, fn, prompts, completions, start: int, stop: int) -> np.ndarray:
    """fn on rows [start, stop), checked; an exception is pinned on its first failing row."""
    try:
      values = fn(list(prompts[start:stop]), list(completions[start:stop]))
    except Exception as e:  # pylint: disable=broad-except
      row = next((i for i in range(start, stop) if _raises(fn, prompts[i], completions[i])),
                 None)
      where = (f'example {row} (prompt {prompts[row]!r}, completion {completions[row]!r})'
               if row is not None else f'examples {start}–{stop - 1} together')
      raise InputError(f'{self.key}: {name} raised {type(e).__name__}: {e} on {where}.') from e
    if values is None or len(values) != stop - start:
      raise InputError(f'{self.key}: {name} returned {None if values is None else len(values)} '
                       f'values for {stop - start} completions.')
    out = np.full(stop - start, np.nan)
    for j, value in enumerate(values):
      if value is None:
        continue
      try:
        out[j] = float(value)
      except (TypeError, ValueError):
        pass
      if not math.isfinite(out[j]):
        row = start + j
        raise InputError(f'{self.key}: {name} returned {value!r} for example {row} (prompt '
                         f'{prompts[row]!r}, completion {completions[row]!r}): rewards are '
                         'finite numbers, or None where a function does not apply.')
    return out


def _raises(fn, prompt: str, completion: str) -> bool:
  try:
    fn([prompt], [completion])
  except Exception:  # pylint: disable=broad-except
    return True
  return False


def add_rewards(*rewards):
  """The sum of the reward functions `(prompts, responses) -> [N]` that are not None."""
  rewards = [r for r in rewards if r is not None]
  if len(rewards) == 1:
    return rewards[0]
  return lambda prompts, responses: sum(np.asarray(r(prompts, responses), np.float64)
                                        for r in rewards)
