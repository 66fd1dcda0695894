"""Checkpoints restore exactly, keep the last K, and never surface a half-written step."""

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

from rlhf_jax import parallel
from rlhf_jax.training.checkpoint import Checkpointer
from rlhf_jax.training.metrics import MetricWriter, read_metrics
from rlhf_jax.training.state import abstract_like


def make_state(seed: int):
  mesh = parallel.make_mesh({'fsdp': 4, 'tensor': 2})
  kernel = jax.random.normal(jax.random.key(seed), (8, 6))
  return {'kernel': jax.device_put(kernel, NamedSharding(mesh, P('fsdp', 'tensor'))),
          'step': jnp.array(seed, jnp.int32),
          'rng': jax.random.key_data(jax.random.key(seed))}


def test_restore_is_exact_and_keeps_the_last_k(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), save_every=2, keep=2, async_save=True)
  for step in range(5):
    checkpointer.save(step, make_state(step), {'step': step})
  checkpointer.wait()
  assert checkpointer.latest_step() == 4
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [2, 4]

  target = make_state(0)
  restored, data_state = Checkpointer(str(tmp_path), save_every=2, keep=2).restore(
      None, abstract_like(target))
  expected = make_state(4)
  assert data_state == {'step': 4}
  for x, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want))
    assert x.sharding == want.sharding  # Restored straight into the sharded layout.
  checkpointer.close()


def test_typed_keys_are_refused_with_a_clear_error(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), save_every=1, keep=1)
  with pytest.raises(TypeError, match=r"\['rng'\] is a typed PRNG key"):
    checkpointer.save(0, {'rng': jax.random.key(0)}, {}, force=True)


WRITER = textwrap.dedent('''
    import os, signal, sys
    import jax, jax.numpy as jnp
    from rlhf_jax.training.checkpoint import Checkpointer
    checkpointer = Checkpointer(sys.argv[1], save_every=1, keep=5, async_save=True)
    checkpointer.save(4, {'x': jnp.zeros((4,))}, {'step': 4})
    checkpointer.wait()
    big = {f'x{i}': jnp.full((4_000_000,), i, jnp.float32) for i in range(8)}  # 128 MB.
    checkpointer.save(6, big, {'step': 6})
    os.kill(os.getpid(), signal.SIGKILL)  # Dies while the async write is in flight.
''')


def test_a_write_cut_short_is_never_the_latest_step(tmp_path):
  result = subprocess.run([sys.executable, '-c', WRITER, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  leftovers = [p for p in os.listdir(tmp_path) if p.startswith('6')]
  assert leftovers == ['6.orbax-checkpoint-tmp']  # The kill did cut a write short.
  checkpointer = Checkpointer(str(tmp_path), save_every=1, keep=5)
  assert checkpointer.latest_step() == 4
  _, data_state = checkpointer.restore(None, {'x': jax.ShapeDtypeStruct((4,), jnp.float32)})
  assert data_state == {'step': 4}
  # And training goes on: the next save lands, and is then the latest.
  checkpointer.save(8, {'x': jnp.ones((4,))}, {'step': 8}, force=True)
  checkpointer.wait()
  assert checkpointer.latest_step() == 8


def test_metric_writer_drops_lines_after_the_resumed_step(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=True)
  for step in range(1, 7):
    writer.write(step, {'loss': jnp.float32(1.0 / step), 'tokens': np.int32(step)})
  writer.close()
  writer = MetricWriter(str(tmp_path), start_step=4, tensorboard=False)
  for step in (5, 6):
    writer.write(step, {'loss': jnp.float32(1.0 / step), 'tokens': np.int32(step)})
  writer.close()
  lines = read_metrics(tmp_path / 'metrics.jsonl')
  assert [m['step'] for m in lines] == [1, 2, 3, 4, 5, 6]
  assert lines[1] == {'step': 2, 'loss': 0.5, 'tokens': 2}
  assert any(name.startswith('events.out.tfevents') for name in
             os.listdir(tmp_path / 'tensorboard'))
