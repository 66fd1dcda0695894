"""Compiles a run's programs for a TPU slice on a machine without one (`pip install libtpu`).

  python -m rlhf_jax.aot --config=configs/sft.py:llama3-8b          # its slice: v5p-64
  python -m rlhf_jax.aot --config=configs/ppo.py:llama3-8b
  python -m rlhf_jax.aot --config=configs/sft.py:llama-1b --topology=v5p-8 \
      [--config.mesh.fsdp=-1 --config.mesh.data=1 ...]

builds the models, train state and batches abstractly (shapes, dtypes and shardings on a mesh
over the slice's abstract devices, config.mesh as a run makes it), lowers and compiles the
jitted train step (online RL: also the sampler and the scoring pass) for the slice, and prints
per-chip memory against the chip's HBM, the compile time and the HLO FLOPs against the model's.
The last line is one JSON object; the exit status is 1 when a program does not fit in HBM (or
on an error). SFT, RM, DPO and KTO (LoRA too), PPO, GRPO and RLOO.

Slice names are Cloud TPU accelerator types (`rlhf_jax.tpu.parse_slice`): for v4 and v5p the
number counts TensorCores (2 a chip: v5p-64 is 32 chips, a 2x4x4 torus), for v5e (v5litepod)
and v6e chips (v5e-256 is 16x16).
"""

import dataclasses
import functools
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
from rlhf_jax.algorithms import dpo, kto, rm, sft
from rlhf_jax.algorithms.rl.actor_critic import ActorCritic, ValueHead
from rlhf_jax.algorithms.rl.learner import make_loss_fn as rl_loss_fn
from rlhf_jax.algorithms.rl.learner import make_rollout_sampler, scoring_options
from rlhf_jax.algorithms.rl.rollout import merge_and_score
from rlhf_jax.config import architecture, check_batch_sizes
from rlhf_jax.data.store import empty_batch, finish_batch
from rlhf_jax.engine.optimizer import make_optimizer
from rlhf_jax.engine.state import TrainState, train_state_shardings
from rlhf_jax.engine.step import jit_train_step
from rlhf_jax.errors import InputError
from rlhf_jax.losses.dpo import REFERENCE_FREE
from rlhf_jax.models import ModelConfig, Transformer, attention, lora
from rlhf_jax.models.config import NO_ADAPTERS
from rlhf_jax.sampling.text import left_pad
from rlhf_jax.tpu import Slice, parse_slice

LOSS_FNS = {'sft': sft.make_loss_fn, 'rm': rm.make_loss_fn, 'dpo': dpo.make_loss_fn,
            'kto': kto.make_loss_fn}
RL_ALGORITHMS = ('ppo', 'grpo', 'rloo')
GIB = 2**30


def reference_kind(config) -> str | None:
  """How a DPO or KTO run's loss gets the reference: 'frozen' params, 'precomputed' log-probs
  (DPO), the LoRA policy's own base with its 'adapters' off, or None."""
  if config.algorithm not in ('dpo', 'kto'):
    return None
  if config.algorithm == 'dpo' and config.loss.loss_type in REFERENCE_FREE:
    return None
  if config.algorithm == 'dpo' and config.loss.precompute_ref:
    return 'precomputed'
  return 'adapters' if config.model.lora_rank else 'frozen'


def abstract_batch(config, mesh) -> dict:
  """One global train batch as ShapeDtypeStructs, with the keys and dtypes of the data path's
  batches (`store.finish_batch` of one padding row) and sharded as `DataBatches` shards them:
  SFT rows [B, T] (packed: with segment_ids and positions), RM and DPO pairs [B, 2, T], KTO's
  examples and mismatched pairs [B, 2, T] with their labels [B]; T = seq_len, the longest
  bucket."""
  train = config.train
  pieces = 1 if config.algorithm == 'sft' else 2
  packed = config.algorithm == 'sft' and bool(config.data.get('packing'))
  one_row = finish_batch(empty_batch(1, pieces, train.seq_len, pad_id=0), packed=packed)
  shapes = {k: ((train.batch_size, *x.shape[1:]), x.dtype) for k, x in one_row.items()}
  if reference_kind(config) == 'precomputed':
    shapes['ref_logps'] = ((train.batch_size, pieces), jnp.float32)
  if config.algorithm == 'kto':
    shapes['labels'] = ((train.batch_size,), jnp.int8)  # As the data store keeps them.
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(
      mesh, config.sharding_rules, len(shape))) for k, (shape, dtype) in shapes.items()}


def with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


@dataclasses.dataclass
class Compiled:
  executable: object | None  # None when XLA found that the step does not fit in HBM.
  seconds: float
  model_flops: float | None  # Of one step, all chips together (None: not counted).
  argument_bytes: int  # Per chip: the shards of the state, batch and frozen parameters.
  oom: str | None = None  # XLA's message when it does not fit.
  # Per chip: what the run keeps in HBM beside this program's arguments (online RL's other
  # models while one program runs).
  resident_bytes: int = 0


def compile_train_step(config, devices: list, cfg: ModelConfig | None = None) -> Compiled:
  """The train step of `config` compiled for `devices` (a slice's: `Slice.devices`), from
  abstract inputs only; `cfg` replaces the architecture config.model describes."""
  if config.get('algorithm') not in LOSS_FNS:
    raise InputError(f'config.algorithm={config.get("algorithm")!r}: rlhf_jax.aot compiles '
                     f'{sorted(LOSS_FNS) + sorted(RL_ALGORITHMS)}.')
  mesh = parallel.make_mesh(config.mesh, devices)
  check_batch_sizes(config, mesh)
  cfg = cfg or architecture(config.model)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  param_shardings = parallel.state_shardings(params, mesh, config.sharding_rules)
  state, fixed, make_step = abstract_train_state(config, mesh, graphdef, params,
                                                 param_shardings)
  frozen = frozen_shardings = None
  if reference_kind(config) == 'frozen':
    frozen, frozen_shardings = with_shardings(params, param_shardings), param_shardings
  batch = abstract_batch(config, mesh)
  step = make_step(LOSS_FNS[config.algorithm](config), batch, frozen_shardings)
  # PaLM's count (`ModelConfig.flops_per_token`) for the tokens trained on, and its forward
  # pass for the others: KTO's mismatched pairs through the policy; a reference's log-probs.
  tokens, seq_len = math.prod(batch['tokens'].shape), config.train.seq_len
  trained = tokens // 2 if config.algorithm == 'kto' else tokens
  forward_only = (tokens - trained) + (tokens if reference_kind(config) in ('frozen', 'adapters')
                                       else 0)
  model_flops = (cfg.flops_per_token(seq_len) * trained +
                 cfg.flops_per_token(seq_len, forward_only=True) * forward_only)
  return compile_program(step, (state, batch, frozen, fixed), mesh, model_flops=model_flops)


def abstract_train_state(config, mesh, graphdef, params, param_shardings):
  """(TrainState of ShapeDtypeStructs, a LoRA model's base or None, make_step), as a run makes
  them: a LoRA model trains its adapters and its base enters the step apart.
  make_step(loss_fn, batch, frozen_shardings) is the jitted train step."""
  params, fixed = lora.split_trained(params)
  param_shardings, fixed_shardings = lora.split_trained(param_shardings)
  optimizer, schedule = make_optimizer(config.optim, config.train.steps)
  state_shardings = train_state_shardings(param_shardings, optimizer, params, mesh)
  state = with_shardings(TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      opt_state=jax.eval_shape(optimizer.init, params),
      rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))), state_shardings)
  if fixed is not None:
    fixed = with_shardings(fixed, fixed_shardings)

  def make_step(loss_fn, batch, frozen_shardings=None):
    return jit_train_step(loss_fn, optimizer, graphdef, state_shardings=state_shardings,
                          batch_shardings=jax.tree.map(lambda x: x.sharding, batch),
                          frozen_shardings=frozen_shardings, fixed_shardings=fixed_shardings,
                          schedule=schedule, grad_accum_steps=config.optim.grad_accum_steps)
  return state, fixed, make_step


def compile_program(jitted, args: tuple, mesh, *, model_flops: float | None = None,
                    resident_bytes: int = 0) -> Compiled:
  """`jitted` lowered on the abstract `args` and compiled, timed; an HBM overflow is kept as
  `oom`, not raised. 'auto' attention chooses for the mesh's devices (splash on TPU)."""
  result = Compiled(None, 0.0, model_flops, shard_bytes(args), resident_bytes=resident_bytes)
  start = time.perf_counter()
  try:
    with jax.set_mesh(mesh), attention.compiling_for(mesh.devices.flat[0].platform):
      result.executable = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as error:
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    result.oom = errors.one_line(error)
  result.seconds = time.perf_counter() - start
  return result


def compile_rl_programs(config, devices: list) -> dict[str, Compiled]:
  """Online RL's three programs compiled for `devices` (a slice's): 'sampling' (the policy's rollout with
  its KV cache), 'scoring' (the trained model, the reference and the reward model over the
  rollout) and 'train' (one minibatch update of policy and critic).

  The reward model, and a critic model (`rl.critic='model'`), have the policy's architecture
  with a scalar head (what they are when cut from the same base). All four models stay in HBM
  through the run; each program's memory counts those it does not take as arguments. With
  LoRA the reference is the policy's base and the reward model has no adapters, as in a run.
  """
  rl = config.rl
  mesh = parallel.make_mesh(config.mesh, devices)
  check_batch_sizes(config, mesh)
  cfg = architecture(config.model, head='lm')
  scalar = cfg.replace(head='scalar')
  critic = {'model': lambda: Transformer(scalar, rngs=nnx.Rngs(0)),
            'head': lambda: ValueHead(cfg.d_model), 'none': lambda: None}[rl.critic]

  def placed(make):
    graphdef, params = nnx.split(nnx.eval_shape(make))
    shardings = parallel.state_shardings(params, mesh, config.sharding_rules)
    return graphdef, with_shardings(params, shardings), shardings

  graphdefs, params = {}, {}
  graphdefs['trained'], trained, trained_shardings = placed(
      lambda: ActorCritic(Transformer(cfg, rngs=nnx.Rngs(0)), critic()))
  if not cfg.lora_rank:  # A LoRA policy's reference is its own base.
    graphdefs['reference'], params['reference'], _ = placed(
        lambda: ActorCritic(Transformer(cfg, rngs=nnx.Rngs(0)), None))
  reward_graphdef, reward, _ = placed(
      lambda: Transformer(scalar.replace(**NO_ADAPTERS), rngs=nnx.Rngs(0)))
  graphdefs['reward'], params['reward'] = (reward_graphdef,), [reward]
  state, fixed, make_step = abstract_train_state(config, mesh, graphdefs['trained'], trained,
                                                 trained_shardings)
  resident = shard_bytes((state, fixed, params))
  trained = lora.join(state.params, fixed)

  sharded = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.
                                                      batch_sharding(mesh, config.sharding_rules,
                                                                     len(shape)))
  tokens, mask = left_pad([[1]], config.data.max_prompt_len, 0)
  prompts = {'prompt_tokens': sharded((rl.rollout_batch_size, tokens.shape[1]), tokens.dtype),
             'prompt_mask': sharded((rl.rollout_batch_size, mask.shape[1]), mask.dtype)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=jax.NamedSharding(mesh, jax.P()))
  policy_graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  sample = make_rollout_sampler(config, policy_graphdef, _StandInTokenizer)
  programs = {'sampling': compile_program(
      jax.jit(sample), (trained['policy'], prompts, key), mesh,
      resident_bytes=resident - shard_bytes(trained['policy']))}

  samples = jax.eval_shape(sample, trained['policy'], prompts, key)
  samples = {k: sharded(x.shape, x.dtype) for k, x in samples.items()}
  replicated = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32,
                                                  sharding=jax.NamedSharding(mesh, jax.P()))
  controls = {'kl_coef': replicated(()), 'score_shift': replicated((1,)),
              'score_scale': replicated((1,))}
  score = jax.jit(functools.partial(merge_and_score, graphdefs, options=scoring_options(
      config, eos_id=_StandInTokenizer.eos_token_id)))
  scoring_params = {**params, 'trained': trained}
  programs['scoring'] = compile_program(
      score, (scoring_params, samples, controls), mesh,
      resident_bytes=resident - shard_bytes(scoring_params))

  update, _ = jax.eval_shape(score, scoring_params, samples, controls)
  minibatch = rl.rollout_batch_size // rl.num_minibatches
  batch = {k: sharded((minibatch, *x.shape[1:]), x.dtype) for k, x in update.items()}
  programs['train'] = compile_program(
      make_step(rl_loss_fn(config), batch), (state, batch, None, fixed), mesh,
      resident_bytes=resident - shard_bytes((state, fixed)))
  return programs


class _StandInTokenizer:
  """The token ids a compiled sampler bakes in; any ids compile to the same program."""
  eos_token_id, pad_token_id = 1, 0


def shard_bytes(tree) -> int:
  """Bytes of one device's shards of the ShapeDtypeStructs in `tree` (the largest shards;
  4-bit types packed two to a byte, as a TPU stores them)."""
  bits = lambda dtype: 4 if dtype in (jnp.int4, jnp.uint4) else 8 * dtype.itemsize
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * bits(x.dtype) // 8
             for x in jax.tree.leaves(tree))


def memory_gib(compiled: Compiled) -> dict:
  """Per-chip argument, output, alias, temp and resident GiB; total = argument + output −
  alias + temp + resident.

  When XLA stops at its HBM check, the temporaries it reports (all of them, in GiB) and the
  arguments' shards, a lower bound of the total.
  """
  resident = compiled.resident_bytes / GIB
  if compiled.executable is None:
    needed = re.search(r'temporaries \(([\d.]+)G\)', compiled.oom)
    sizes = {'argument': compiled.argument_bytes / GIB, 'output': None, 'alias': None,
             'temp': float(needed.group(1)) if needed else None, 'resident': resident}
    return {**sizes, 'total': sizes['argument'] + (sizes['temp'] or 0.0) + resident}
  memory = compiled.executable.memory_analysis()
  sizes = {k: getattr(memory, f'{k}_size_in_bytes') / GIB
           for k in ('argument', 'output', 'alias', 'temp')}
  return {**sizes, 'resident': resident, 'total': sizes['argument'] + sizes['output'] -
          sizes['alias'] + sizes['temp'] + resident}


def hlo_flops(compiled: Compiled) -> float | None:
  """XLA's FLOPs of one step on one chip."""
  if compiled.executable is None:
    return None
  cost = compiled.executable.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost).get('flops', 0.0)) or None


def chip_hlo_flops(config, slice_: Slice) -> float | None:
  """XLA's FLOPs of one chip's share of a train step, counted where no loop hides work.

  XLA's cost analysis counts a loop's body once and a Pallas kernel (splash) as next to
  nothing, and the step compiled for the slice has both, and loops of XLA's own (collective
  matmuls that overlap FSDP's gathers with compute). So the count is of the same step compiled
  for this machine's CPU on one chip's rows (batch_size / chips: data parallelism and FSDP split
  the batch, tensor parallelism each matmul), in the step's numerics and remat, with dense
  attention, log-probs in one chunk, no gradient accumulation and unrolled layers; each layer
  costs the same, so from one and two of them, f(L) = f(1) + (L − 1)·(f(2) − f(1)). Dense
  attention computes every [T, S] score, as the model's count has it; a causal kernel computes
  about half. The optimizer's update counts for every parameter, not a chip's shard (a few
  FLOPs a parameter against thousands a parameter for the step).
  """
  one, two = (step_flops_on_cpu(config, slice_, n_layers) for n_layers in (1, 2))
  layers = architecture(config.model).n_layers
  return None if one is None or two is None else one + (layers - 1) * (two - one)


def step_flops_on_cpu(config, slice_: Slice, n_layers: int) -> float | None:
  """XLA's FLOPs of one chip's share of `config`'s train step with `n_layers` unrolled layers,
  compiled for this machine's CPU (see `chip_hlo_flops`)."""
  rows = config.train.batch_size / slice_.chips
  counted = config.copy_and_resolve_references()
  counted.train.batch_size = math.ceil(rows)
  counted.train.logprob_chunk_size = counted.train.seq_len
  counted.optim.grad_accum_steps = 1
  counted.mesh.update(data=1, fsdp=1, tensor=1)
  cfg = architecture(config.model).replace(n_layers=n_layers, scan_layers=False,
                                           attention='dense')
  flops = hlo_flops(compile_train_step(counted, jax.devices('cpu')[:1], cfg))
  return flops and flops * rows / counted.train.batch_size


def report(config, topology: str | None = None) -> dict:
  """Per-chip memory, compile time and FLOPs of `config`'s programs on the slice `topology`
  (default: config.slice, the slice a pod-scale preset is sized for): the train step, and for
  online RL also the sampling and scoring programs (`compile_rl_programs`).

  Memory is per chip, from XLA's analysis of the partitioned step; HLO FLOPs are one chip's
  share of the step (`chip_hlo_flops`). A step takes at least HLO FLOPs / peak seconds, so
  MFU <= model FLOPs / HLO FLOPs (what remat and other extra work cost), with attention
  counted in full on both sides. Online RL reports memory and compile time only.
  """
  topology = topology or config.get('slice')
  if not topology:
    raise InputError('No TPU slice to compile for: pass --topology (e.g. v5p-64), or use a '
                     'preset that sets config.slice.')
  slice_ = parse_slice(topology)
  if config.get('algorithm') in RL_ALGORITHMS:
    programs = compile_rl_programs(config, slice_.devices())
  else:
    programs = {'train': compile_train_step(config, slice_.devices())}
  memory = {name: memory_gib(program) for name, program in programs.items()}
  fits = {name: programs[name].oom is None and m['total'] <= slice_.chip.hbm_gib
          for name, m in memory.items()}
  largest = max(memory, key=lambda name: memory[name]['total'])
  train = programs['train']
  flops = chip_hlo_flops(config, slice_) if train.model_flops else None
  model_flops = train.model_flops / slice_.chips if train.model_flops else None
  result = {
      'topology': topology, 'libtpu_topology': slice_.topology, 'chips': slice_.chips,
      **{f'{k}_gib': v for k, v in memory[largest].items() if k != 'total'},
      'per_chip_gib': memory[largest]['total'], 'hbm_gib': slice_.chip.hbm_gib,
      'fits': all(fits.values()),
      'compile_s': round(sum(program.seconds for program in programs.values()), 2),
      'hlo_tflops_per_chip': flops / 1e12 if flops else None,
      'model_tflops_per_chip': model_flops / 1e12 if model_flops else None,
      'min_step_s': flops / slice_.chip.peak_bf16_flops if flops else None,
      # None where XLA counts less than the model: a count that missed work.
      'mfu_bound': model_flops / flops if flops and flops >= model_flops else None,
      'xla_error': next((p.oom for p in programs.values() if p.oom), None),
  }
  if len(programs) > 1:
    result['programs'] = {name: {'per_chip_gib': memory[name]['total'],
                                 'resident_gib': memory[name]['resident'], 'fits': fits[name],
                                 'compile_s': round(programs[name].seconds, 2)}
                          for name in programs}
  return result


def print_report(result: dict) -> None:
  """Lines for people, then the JSON line."""
  r = result
  where = f'{r["topology"]} ({r["libtpu_topology"]}, {r["chips"]} chips), per chip: '
  for name, program in r.get('programs', {}).items():
    print(f'{name}: {program["per_chip_gib"]:.2f} GiB a chip, compiled in '
          f'{program["compile_s"]:.1f} s' + ('' if program['fits'] else ': DOES NOT FIT'))
  if r['xla_error']:
    print(f'{where}at least {r["per_chip_gib"]:.2f} GiB of {r["hbm_gib"]} GiB HBM: DOES NOT '
          f'FIT\n  XLA, after {r["compile_s"]:.1f} s: {r["xla_error"]}')
  else:
    resident = f' + other models {r["resident_gib"]:.2f}' if r['resident_gib'] else ''
    print(f'{where}arguments {r["argument_gib"]:.2f} + outputs {r["output_gib"]:.2f} - aliased '
          f'{r["alias_gib"]:.2f} + temporaries {r["temp_gib"]:.2f}{resident} = '
          f'{r["per_chip_gib"]:.2f} GiB of {r["hbm_gib"]} GiB HBM: ' +
          ('fits' if r['fits'] else 'DOES NOT FIT'))
    if r['hlo_tflops_per_chip']:
      bound = (f'at least {r["min_step_s"] * 1e3:.3g} ms at peak bf16, MFU at most '
               f'{r["mfu_bound"]:.0%}' if r['mfu_bound'] else
               'XLA counts fewer than the model: no MFU bound')
      print(f'compiled in {r["compile_s"]:.1f} s; per chip and step '
            f'{r["hlo_tflops_per_chip"]:.4g} HLO TFLOPs, {r["model_tflops_per_chip"]:.4g} model '
            f'TFLOPs: {bound}')
    else:
      print(f'compiled in {r["compile_s"]:.1f} s')
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
  flags.DEFINE_string('topology', None, 'TPU slice, e.g. v5p-64, v4-32, v5e-16 (default: '
                      'config.slice, set by the pod-scale presets).')
  flags.mark_flags_as_required(['config'])
  app.run(main, argv=installed_config_args(sys.argv), flags_parser=parse_flags)
