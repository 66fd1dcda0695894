"""Compiles a run's train step for a TPU slice on a machine without one (`pip install libtpu`).

  python -m rlhf_jax.aot --config=configs/sft.py:llama-1b --topology=v5p-8 \
      [--config.mesh.fsdp=-1 --config.mesh.data=1 ...]

builds the model, train state and batch abstractly (shapes, dtypes and shardings on a mesh over
the slice's abstract devices, config.mesh as a run makes it), lowers and compiles the jitted
train step for the slice, and prints per-chip memory against the chip's HBM, the compile time
and the HLO FLOPs against the model's. The last line is one JSON object; the exit status is 1
when the step does not fit in HBM (or on an error). SFT, RM and DPO; not KTO or online RL yet.

Slice names are Cloud TPU accelerator types (`rlhf_jax.tpu.parse_slice`): for v4 and v5p the
number counts TensorCores (2 a chip: v5p-64 is 32 chips, a 2x4x4 torus), for v5e (v5litepod)
and v6e chips (v5e-256 is 16x16).
"""

import dataclasses
import json
import math
import re
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from rlhf_jax import errors, parallel
from rlhf_jax.algorithms import dpo, rm, sft
from rlhf_jax.config import architecture, check_batch_sizes
from rlhf_jax.data.store import empty_batch, finish_batch
from rlhf_jax.engine.optimizer import make_optimizer
from rlhf_jax.engine.state import TrainState, train_state_shardings
from rlhf_jax.engine.step import jit_train_step
from rlhf_jax.errors import InputError
from rlhf_jax.losses.dpo import REFERENCE_FREE
from rlhf_jax.models import Transformer
from rlhf_jax.tpu import Slice, parse_slice

LOSS_FNS = {'sft': sft.make_loss_fn, 'rm': rm.make_loss_fn, 'dpo': dpo.make_loss_fn}
GIB = 2**30


def dpo_reference(config) -> str | None:
  """How a DPO run's loss gets the reference: 'frozen' params, 'precomputed' log-probs, None."""
  if config.algorithm != 'dpo' or config.loss.loss_type in REFERENCE_FREE:
    return None
  return 'precomputed' if config.loss.precompute_ref else 'frozen'


def abstract_batch(config, mesh) -> dict:
  """One global train batch as ShapeDtypeStructs, with the keys and dtypes of the data path's
  batches (`store.finish_batch` of one padding row) and sharded as `DataBatches` shards them:
  SFT rows [B, T] (packed: with segment_ids and positions), RM and DPO pairs [B, 2, T];
  T = seq_len, the longest bucket."""
  train = config.train
  pieces = 1 if config.algorithm == 'sft' else 2
  packed = config.algorithm == 'sft' and bool(config.data.get('packing'))
  one_row = finish_batch(empty_batch(1, pieces, train.seq_len, pad_id=0), packed=packed)
  shapes = {k: ((train.batch_size, *x.shape[1:]), x.dtype) for k, x in one_row.items()}
  if dpo_reference(config) == 'precomputed':
    shapes['ref_logps'] = ((train.batch_size, pieces), jnp.float32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(
      mesh, config.sharding_rules, len(shape))) for k, (shape, dtype) in shapes.items()}


def with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


@dataclasses.dataclass
class Compiled:
  executable: object | None  # None when XLA found that the step does not fit in HBM.
  seconds: float
  model_flops: float  # Of one step, all chips together.
  argument_bytes: int  # Per chip: the shards of the state, batch and frozen parameters.
  oom: str | None = None  # XLA's message when it does not fit.


def compile_train_step(config, slice_: Slice) -> Compiled:
  """The train step of `config` compiled for `slice_`, from abstract inputs only."""
  if config.get('algorithm') not in LOSS_FNS:
    raise InputError(f'config.algorithm={config.get("algorithm")!r}: rlhf_jax.aot compiles '
                     f'{sorted(LOSS_FNS)} (not KTO or online RL yet).')
  mesh = parallel.make_mesh(config.mesh, slice_.devices())
  check_batch_sizes(config, mesh)
  cfg = architecture(config.model)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  param_shardings = parallel.state_shardings(params, mesh, config.sharding_rules)
  optimizer, schedule = make_optimizer(config.optim, config.train.steps)
  state_shardings = train_state_shardings(param_shardings, optimizer, params, mesh)
  state = with_shardings(TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      opt_state=jax.eval_shape(optimizer.init, params),
      rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))), state_shardings)
  frozen = frozen_shardings = None
  if dpo_reference(config) == 'frozen':
    frozen, frozen_shardings = with_shardings(params, param_shardings), param_shardings
  batch = abstract_batch(config, mesh)
  step = jit_train_step(LOSS_FNS[config.algorithm](config), optimizer, graphdef,
                        state_shardings=state_shardings,
                        batch_shardings={k: v.sharding for k, v in batch.items()},
                        frozen_shardings=frozen_shardings, schedule=schedule,
                        grad_accum_steps=config.optim.grad_accum_steps)
  # PaLM's 6·N + 12·L·T·H·Dh a token; a frozen reference adds its forward, a third of that
  # (as benchmarks/train_step.py counts it).
  model_flops = cfg.flops_per_token(config.train.seq_len) * math.prod(batch['tokens'].shape)
  if frozen is not None:
    model_flops *= 4 / 3
  result = Compiled(None, 0.0, model_flops, shard_bytes((state, batch, frozen)))
  start = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      result.executable = step.lower(state, batch, frozen).compile()
  except jax.errors.JaxRuntimeError as error:
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    result.oom = errors.one_line(error)
  result.seconds = time.perf_counter() - start
  return result


def shard_bytes(tree) -> int:
  """Bytes of one device's shards of the ShapeDtypeStructs in `tree` (the largest shards)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def memory_gib(compiled: Compiled) -> dict:
  """Per-chip argument, output, alias and temp GiB; total = argument + output - alias + temp.

  When XLA stops at its HBM check, the temporaries it reports (all of them, in GiB) and the
  arguments' shards, a lower bound of the total.
  """
  if compiled.executable is None:
    needed = re.search(r'temporaries \(([\d.]+)G\)', compiled.oom)
    sizes = {'argument': compiled.argument_bytes / GIB, 'output': None, 'alias': None,
             'temp': float(needed.group(1)) if needed else None}
    return {**sizes, 'total': sizes['argument'] + (sizes['temp'] or 0.0)}
  memory = compiled.executable.memory_analysis()
  sizes = {k: getattr(memory, f'{k}_size_in_bytes') / GIB
           for k in ('argument', 'output', 'alias', 'temp')}
  return {**sizes,
          'total': sizes['argument'] + sizes['output'] - sizes['alias'] + sizes['temp']}


def hlo_flops(compiled: Compiled) -> float | None:
  """XLA's FLOPs of one step on one chip."""
  if compiled.executable is None:
    return None
  cost = compiled.executable.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost).get('flops', 0.0)) or None


def report(config, topology: str) -> dict:
  """Per-chip memory, compile time and FLOPs of `config`'s train step on the slice `topology`.

  Memory and HLO FLOPs are per chip (XLA's analyses of the partitioned step). A step takes at
  least HLO FLOPs / peak seconds, so MFU <= model FLOPs / HLO FLOPs (what remat and other
  extra work cost).
  """
  slice_ = parse_slice(topology)
  compiled = compile_train_step(config, slice_)
  memory, flops = memory_gib(compiled), hlo_flops(compiled)
  model_flops = compiled.model_flops / slice_.chips
  return {
      'topology': topology, 'libtpu_topology': slice_.topology, 'chips': slice_.chips,
      **{f'{k}_gib': v for k, v in memory.items() if k != 'total'},
      'per_chip_gib': memory['total'], 'hbm_gib': slice_.chip.hbm_gib,
      'fits': compiled.oom is None and memory['total'] <= slice_.chip.hbm_gib,
      'compile_s': round(compiled.seconds, 2),
      'hlo_tflops_per_chip': flops / 1e12 if flops else None,
      'model_tflops_per_chip': model_flops / 1e12,
      'min_step_s': flops / slice_.chip.peak_bf16_flops if flops else None,
      'mfu_bound': model_flops / flops if flops else None,
      'xla_error': compiled.oom,
  }


def print_report(result: dict) -> None:
  """Two lines for people, then the JSON line."""
  r = result
  where = f'{r["topology"]} ({r["libtpu_topology"]}, {r["chips"]} chips), per chip: '
  if r['xla_error']:
    print(f'{where}at least {r["per_chip_gib"]:.2f} GiB of {r["hbm_gib"]} GiB HBM: DOES NOT '
          f'FIT\n  XLA, after {r["compile_s"]:.1f} s: {r["xla_error"]}')
  else:
    print(f'{where}arguments {r["argument_gib"]:.2f} + outputs {r["output_gib"]:.2f} - aliased '
          f'{r["alias_gib"]:.2f} + temporaries {r["temp_gib"]:.2f} = {r["per_chip_gib"]:.2f} '
          f'GiB of {r["hbm_gib"]} GiB HBM: ' + ('fits' if r['fits'] else 'DOES NOT FIT'))
    print(f'compiled in {r["compile_s"]:.1f} s; per chip and step {r["hlo_tflops_per_chip"]:.4g}'
          f' HLO TFLOPs, {r["model_tflops_per_chip"]:.4g} model TFLOPs: at least '
          f'{r["min_step_s"] * 1e3:.3g} ms at peak bf16, MFU at most {r["mfu_bound"]:.0%}')
  print(json.dumps(result))


def main(argv):
  from rlhf_jax.main import fail
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    result = report(flags.FLAGS.config, flags.FLAGS.topology)
  except errors.Error as error:
    fail(f'rlhf_jax.aot: error: {errors.one_line(error)}')
  print_report(result)
  sys.exit(0 if result['fits'] else 1)


if __name__ == '__main__':
  # Flags only here: rlhf_jax.main defines --config (and --workdir) on import, as does
  # rlhf_jax.launch, so importing this module (tests) defines none.
  from rlhf_jax.main import installed_config_args, parse_flags
  flags.DEFINE_string('topology', None, 'TPU slice, e.g. v5p-64, v4-32, v5e-16.')
  flags.mark_flags_as_required(['config', 'topology'])
  app.run(main, argv=installed_config_args(sys.argv), flags_parser=parse_flags)
