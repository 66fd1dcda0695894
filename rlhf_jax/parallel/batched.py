"""Runs a jitted function over many host rows, a global batch at a time, on the mesh."""

from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.errors import InputError
from rlhf_jax.parallel.sharding import shard_batch


def map_batches(fn: Callable, arrays: Mapping[str, np.ndarray], *, batch_size: int, mesh,
                rules) -> object:
  """fn(global batch dict) for consecutive rows of `arrays`, outputs concatenated on the host.

  Every process holds all N rows and passes its own share of each global batch; the last batch
  is filled up by repeating the final row (those outputs are dropped). Returns fn's output
  pytree with N rows per leaf.
  """
  n = len(next(iter(arrays.values())))
  count = jax.process_count()
  per_process = batch_size // count
  if per_process * count != batch_size:
    raise InputError(f'Batch of {batch_size} rows does not split over {count} processes.')
  outputs = []
  for start in range(0, n, batch_size):
    rows = np.minimum(np.arange(start, start + batch_size), n - 1)
    local = rows[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    batch = shard_batch({k: v[local] for k, v in arrays.items()}, mesh, rules)
    outputs.append(multihost_utils.process_allgather(fn(batch), tiled=True))
  return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)
