"""The train step on the (data=2, fsdp=2, tensor=2) mesh compiles without XLA's "involuntary
full rematerialization" of an activation.

XLA prints that warning from C++ to stderr while it partitions the program, so each compile
runs in a process of its own (`python tests/test_activation_sharding.py`), without the
persistent compilation cache (a cached program is not partitioned again, and would warn
nothing).
"""

import functools
import os
import subprocess
import sys

from devices import xla_flags

WARNING = 'Involuntary full rematerialization'
MODELS = ('llama', 'gpt2')
MESH_SET = '--- jax.set_mesh ---'


def compile_logs() -> tuple[str, str]:
  """stderr of one SFT step traced without `jax.set_mesh` (llama), then of each model under
  it."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  env.update(XLA_FLAGS=xla_flags(8), TF_CPP_MIN_LOG_LEVEL='0')
  result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  without_mesh, _, with_mesh = result.stderr.partition(MESH_SET)
  return without_mesh, with_mesh


def test_train_step_compiles_without_involuntary_rematerialization():
  without_mesh, with_mesh = compile_logs()
  # Without a mesh set the sharding constraints are no-ops (the step as it compiled before
  # they existed): XLA moves a [B, T, D] activation between batch- and embed-sharded layouts
  # through a full copy, once for llama (twice for gpt2, whose learned positions are a second
  # embedding lookup). This control shows that the test sees the warning when it is there.
  assert WARNING in without_mesh
  assert WARNING not in with_mesh, with_mesh[-3000:]


def one_step(model: str, use_mesh: bool) -> None:
  """One SFT step of a tiny model on the 2x2x2 mesh (tests/test_sharding.py's set-up)."""
  from flax import nnx

  from rlhf_jax import parallel
  from rlhf_jax.algorithms import sft
  from rlhf_jax.config import base_config
  from rlhf_jax.engine.optimizer import make_optimizer
  from rlhf_jax.engine.state import init_train_state, train_state_shardings
  from rlhf_jax.engine.step import jit_train_step, make_train_step
  from rlhf_jax.models import Transformer
  from rlhf_jax.playground.sorting import SortingTask
  from tests.test_sharding import MODELS as CONFIGS, RULES

  config = CONFIGS[model]
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  graphdef, params, param_shardings = parallel.create_sharded(
      lambda: Transformer(config, rngs=nnx.Rngs(0)), mesh, RULES)
  optimizer, _ = make_optimizer(base_config().optim, total_steps=1)
  shardings = train_state_shardings(param_shardings, optimizer, params, mesh)
  state = init_train_state(params, optimizer, 0, shardings)
  batch_shardings = {k: parallel.batch_sharding(mesh, RULES)
                     for k in ('tokens', 'attention_mask', 'loss_mask')}
  loss_fn = functools.partial(sft.sft_loss_fn, normalize='sequence', chunk_size=8)
  options = dict(state_shardings=shardings, batch_shardings=batch_shardings)
  if use_mesh:  # The engine's step: traced under the mesh.
    step = make_train_step(loss_fn, optimizer, graphdef, **options)
  else:  # The bare jitted step, traced without one: the control.
    jitted = jit_train_step(loss_fn, optimizer, graphdef, **options)
    step = lambda state, batch: jitted(state, batch, None, None)  # noqa: E731
  data = SortingTask(seq_len=16, vocab_size=config.vocab_size, min_items=2, max_items=6,
                     seed=0)
  batch = parallel.shard_batch(data.batch('train', 0, range(8)), mesh, RULES)
  step(state, batch)


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  one_step('llama', use_mesh=False)
  print(MESH_SET, file=sys.stderr, flush=True)
  for name in MODELS:
    one_step(name, use_mesh=True)
