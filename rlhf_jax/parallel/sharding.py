"""Mesh, logical-axis rules, sharded model creation and batch placement.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with
parameters and optimizer state sharded, ZeRO-3 style) and `tensor` (Megatron-style splits of
heads, MLP and vocabulary). Parameters name their dimensions logically (`embed`, `mlp`,
`heads`, `kv_heads`, `vocab`, `norm`); the config's rules table maps each name to mesh axes:

    rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...)

Activations name theirs in the same table (`activation_batch`, `activation_embed`, ...);
`constrain` pins them inside a step traced under `jax.set_mesh`.
"""

import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import InputError

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

DEFAULT_RULES: Rules = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('norm', None),
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over all devices with axes (data, fsdp, tensor); one size may be −1 (the rest).

  `shape` is the config's `mesh` entry, e.g. {'data': -1, 'fsdp': 2, 'tensor': 1}.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise InputError(f'config.mesh: unknown axes {sorted(unknown)}; use {MESH_AXES}.')
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise InputError(f'config.mesh: at most one axis may be -1, got {dict(shape)}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise InputError(f'config.mesh={dict(shape)}: {len(devices)} devices do not divide into '
                       f'the fixed axes of size {known}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices) or min(sizes) < 1:
    raise InputError(f'config.mesh={dict(shape)} needs {math.prod(sizes)} devices, but '
                     f'{len(devices)} are available.')
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions carry these logical names.

  A mesh axis is used at most once per array; a dimension that the mapped mesh axes do not
  divide is replicated over the axes that do not fit (e.g. 2 KV heads on tensor=4).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape, strict=True):
    mapped = table.get(name) if name is not None else None
    mapped = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
    kept = []
    for axis in mapped:
      if axis in used or dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None],
              rules: Rules = DEFAULT_RULES) -> jax.Array:
  """`x` pinned to the sharding its logical axes map to on the current mesh (`jax.set_mesh`);
  unchanged when no mesh is set (eager code, single-device tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
  """NamedSharding for every variable of an (abstract) model state, from `logical_axes`."""

  def sharding(variable):
    axes = variable.get_metadata().get('logical_axes')
    shape = variable.shape
    spec = (logical_to_spec(axes, shape, mesh, rules) if axes is not None
            else PartitionSpec())
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules):
  """Builds a model directly into its sharded layout: (graphdef, state, shardings).

  The initialiser runs under `jax.jit` with `out_shardings`, so every device computes only its
  own shard and the whole model never exists on one host.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
  shardings = state_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.split(make_model())[1]

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Leading dimension over the `batch` rule's mesh axes, the rest replicated."""
  axes = dict(rules).get('batch')
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules):
  """Global arrays from this process's rows of the batch (multi-host safe).

  Each process passes its own slice of the global batch (global batch / process count rows);
  `jax.make_array_from_process_local_data` assembles them without any host holding it all.
  """

  def place(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, rules, x.ndim)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return {k: place(v) for k, v in local_batch.items()}


def maybe_initialize_distributed(config) -> None:
  """Starts `jax.distributed` when the config or the environment asks for it.

  config: the `distributed` entry: `enabled` ('auto' | True | False), and for explicit set-ups
  `coordinator_address`, `num_processes`, `process_id`, `cpu_collectives` ('gloo' for CPU
  processes). 'auto' initialises on TPU pods and on clusters that JAX detects (SLURM, ...).
  """
  if jax.distributed.is_initialized():
    return
  enabled = config.get('enabled', 'auto')
  explicit = config.get('coordinator_address') is not None
  if enabled is False or (enabled == 'auto' and not explicit and not _cluster_detected()):
    return
  if config.get('cpu_collectives'):
    jax.config.update('jax_cpu_collectives_implementation', config.cpu_collectives)
  kwargs = {k: config.get(k) for k in ('coordinator_address', 'num_processes', 'process_id')
            if config.get(k) is not None}
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local devices', jax.process_index(),
               jax.process_count(), jax.local_device_count())


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (nothing to wait for in one
  process): what process 0 wrote before it is whole when any process reads it after."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _cluster_detected() -> bool:
  """A multi-host launch that `jax.distributed.initialize()` can configure by itself."""
  env = os.environ
  return ('JAX_COORDINATOR_ADDRESS' in env
          or len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
          or int(env.get('SLURM_NTASKS', '1')) > 1
          or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)


def local_rows(global_batch: int) -> range:
  """This process's rows of a global batch."""
  n = jax.process_count()
  if global_batch % n:
    raise InputError(f'config.train.batch_size={global_batch} does not split over {n} '
                     'processes.')
  per_process = global_batch // n
  return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
