"""Checkpoints restore bit for bit into their shardings (the params alone too), keep the last K
and a run's evaluation steps, and never surface a half-written step: neither one cut short by a
real SIGKILL nor a manufactured leftover."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import algorithms, parallel
from rlhf_jax.config import load_config
from rlhf_jax.engine.checkpoint import Checkpointer
from rlhf_jax.engine.state import abstract_like

TMP_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax 0.12's name for a step still being written.


def make_state(seed: int):
  """A train-state-like pytree sharded over the 8 virtual devices (fsdp=4, tensor=2)."""
  mesh = parallel.make_mesh({'fsdp': 4, 'tensor': 2})
  kernel = jax.random.normal(jax.random.key(seed), (8, 6))
  return {'params': {'kernel': jax.device_put(kernel, NamedSharding(mesh, P('fsdp', 'tensor')))},
          'step': jnp.array(seed, jnp.int32),
          'rng': jax.random.key_data(jax.random.key(seed))}


def assert_same(restored, expected):
  """Same tree, bitwise-equal arrays, same dtypes and shardings."""
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for x, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert x.dtype == want.dtype and x.sharding == want.sharding
    assert np.asarray(x).tobytes() == np.asarray(want).tobytes()


def steps_on_disk(directory) -> list[str]:
  return sorted(os.listdir(directory))


def test_restore_is_exact_and_keeps_the_last_k(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), save_every=2, keep=2, async_save=False)
  saved = [checkpointer.save(step, make_state(step), {'step': step}) for step in range(5)]
  assert saved == [True, False, True, False, True]
  assert checkpointer.latest_step() == 4
  assert steps_on_disk(tmp_path) == ['2', '4']
  checkpointer.close()

  checkpointer = Checkpointer(str(tmp_path), save_every=2, keep=2)
  target = abstract_like(make_state(0))
  for step in (None, 2):
    restored, data_state = checkpointer.restore(step, target)
    assert data_state == {'step': step or 4}
    assert_same(restored, make_state(step or 4))
  checkpointer.close()


def test_async_save_then_wait_restores_typed_keys_too(tmp_path):
  mesh = parallel.make_mesh({'fsdp': 4, 'tensor': 2})
  keys = jax.device_put(jax.random.split(jax.random.key(7), 8), NamedSharding(mesh, P('fsdp')))
  state = {**make_state(3), 'keys': keys}
  checkpointer = Checkpointer(str(tmp_path), save_every=3, keep=1, async_save=True)
  assert checkpointer.save(3, state, {'step': 3, 'epoch': 1})
  checkpointer.wait()
  assert steps_on_disk(tmp_path) == ['3']
  restored, data_state = Checkpointer(str(tmp_path), save_every=3, keep=1).restore(
      None, abstract_like(state))
  assert data_state == {'step': 3, 'epoch': 1}
  restored_keys = restored.pop('keys')
  assert restored_keys.dtype == keys.dtype and restored_keys.sharding == keys.sharding
  assert np.array_equal(jax.random.key_data(restored_keys), jax.random.key_data(keys))
  assert_same(restored, make_state(3))
  checkpointer.close()


def test_saves_only_due_steps_unless_forced(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  checkpointer = Checkpointer('relative/dir', save_every=5, keep=3, async_save=False)
  assert checkpointer.latest_step() is None
  with pytest.raises(FileNotFoundError):
    checkpointer.restore(None, abstract_like(make_state(0)))
  assert not checkpointer.save(3, make_state(3), {'step': 3})  # Even as the first of a run.
  assert checkpointer.save(3, make_state(3), {'step': 3}, force=True)
  assert not checkpointer.save(3, make_state(3), {'step': 3})  # Not above the latest.
  with pytest.raises(ValueError, match='already exists'):
    checkpointer.save(3, make_state(3), {'step': 3}, force=True)
  assert checkpointer.save(5, make_state(5), {'step': 5})
  assert steps_on_disk(tmp_path / 'relative/dir') == ['3', '5']
  checkpointer.close()


def test_keeps_every_keep_every_th_step_besides_the_last_k(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), save_every=4, keep=2, keep_every=3,
                              async_save=False)
  saved = [step for step in range(1, 10) if checkpointer.save(step, make_state(step),
                                                               {'step': step})]
  assert saved == [3, 4, 6, 8, 9]  # Due every 4 steps, and every 3.
  assert checkpointer.save(10, make_state(10), {'step': 10}, force=True)
  assert steps_on_disk(tmp_path) == ['10', '3', '6', '9']  # The last two, and every third.
  checkpointer.close()


def test_restore_params_reads_a_subtree_of_the_params_alone(tmp_path):
  """Into the shardings asked for, bit for bit, and nothing else of the train state; a step
  that is not there is an error listing those that are."""
  checkpointer = Checkpointer(str(tmp_path), save_every=2, keep=5, async_save=False)
  for step in (2, 4):
    state = make_state(step)
    state['params'] = {'policy': state['params'], 'critic': make_state(step + 1)['params']}
    checkpointer.save(step, state, {'step': step})
  replicated = NamedSharding(parallel.make_mesh({'data': -1}), P())
  target = {'kernel': jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=replicated)}
  for step in (None, 2):
    restored_step, params = checkpointer.restore_params(step, target, within=('policy',))
    assert restored_step == (step or 4)
    assert_same(params, jax.device_put(make_state(step or 4)['params'], replicated))
  with pytest.raises(FileNotFoundError, match=r'No checkpoint of step 3 in .*; it has steps '
                     r'2, 4\.'):
    checkpointer.restore_params(3, target, within=('policy',))
  checkpointer.close()


@pytest.mark.parametrize('keep_eval', [True, False])
def test_a_run_keeps_its_evaluation_steps_and_the_last_k(tmp_path, keep_eval):
  """10 steps, evaluations at 3, 6, 9 and the end, checkpoints due every 4, the last 2 kept:
  the policies of every evaluation remain too, unless config.train.keep_eval_checkpoints is
  off."""
  config = load_config('sft.py:sorting')
  config.train.update(steps=10, eval_every=3, eval_batches=1, checkpoint_every=4,
                      keep_checkpoints=2, keep_eval_checkpoints=keep_eval, batch_size=8,
                      seq_len=16, progress_bar=False, tensorboard=False)
  config.data.max_items = 6
  algorithms.run(config, str(tmp_path))
  kept = sorted(int(step) for step in steps_on_disk(tmp_path / 'checkpoints'))
  assert kept == ([3, 6, 9, 10] if keep_eval else [8, 10])


def assert_resumes_from_step_4(directory):
  """A fresh Checkpointer ignores the unfinished step 6 and saves a new step 6 over it."""
  checkpointer = Checkpointer(str(directory), save_every=2, keep=5)
  assert checkpointer.latest_step() == 4
  restored, data_state = checkpointer.restore(None, abstract_like(make_state(4)))
  assert data_state == {'step': 4}
  assert_same(restored, make_state(4))
  assert checkpointer.save(6, make_state(60), {'step': 6})  # Training goes on.
  checkpointer.wait()
  assert steps_on_disk(directory) == ['4', '6']
  restored, data_state = checkpointer.restore(None, abstract_like(make_state(0)))
  assert data_state == {'step': 6}
  assert_same(restored, make_state(60))  # Nothing of the dead write mixed in.
  checkpointer.close()


KILLED_WRITER = textwrap.dedent(f'''
    import os, signal, sys, time
    import jax, jax.numpy as jnp
    from rlhf_jax.engine.checkpoint import Checkpointer

    directory = sys.argv[1]
    checkpointer = Checkpointer(directory, save_every=2, keep=5, async_save=True)
    big = {{'big': jnp.arange(4 * 2**20, dtype=jnp.float32)}}  # 16 MB.
    checkpointer.save(6, jax.block_until_ready(big), {{'step': 6}})
    # save() returns once the arrays are on the host; the directory and files are written by a
    # background thread. Kill as soon as the write has begun, so that it is surely cut short.
    deadline = time.time() + 30
    while not os.path.exists(os.path.join(directory, '6{TMP_SUFFIX}')) and time.time() < deadline:
      time.sleep(1e-4)
    os.kill(os.getpid(), signal.SIGKILL)
''')


def save_step_4(directory):
  checkpointer = Checkpointer(str(directory), save_every=2, keep=5, async_save=False)
  checkpointer.save(4, make_state(4), {'step': 4})
  checkpointer.close()


def test_a_write_cut_short_by_sigkill_is_never_the_latest_step(tmp_path):
  save_step_4(tmp_path)
  result = subprocess.run([sys.executable, '-c', KILLED_WRITER, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  assert steps_on_disk(tmp_path) == ['4', '6' + TMP_SUFFIX]  # The kill did cut a write short.
  assert_resumes_from_step_4(tmp_path)


def test_a_leftover_unfinished_step_is_never_the_latest_step(tmp_path):
  """Deterministic: a step 6 with all its files, one of them cut in half, but not renamed."""
  save_step_4(tmp_path)
  checkpointer = Checkpointer(str(tmp_path / 'scratch'), save_every=2, keep=5, async_save=False)
  checkpointer.save(6, make_state(6), {'step': 6})
  checkpointer.close()
  leftover = tmp_path / f'6{TMP_SUFFIX}'
  os.rename(tmp_path / 'scratch' / '6', leftover)
  os.rmdir(tmp_path / 'scratch')
  largest = max((os.path.join(root, name) for root, _, names in os.walk(leftover)
                 for name in names), key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  assert_resumes_from_step_4(tmp_path)
