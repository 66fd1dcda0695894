"""Mesh, logical sharding rules, sharded initialisation, batch placement, multi-host start."""

from rlhf_jax.parallel.batched import map_batches
from rlhf_jax.parallel.sharding import (DEFAULT_RULES, MESH_AXES, barrier, batch_sharding,
                                        constrain, create_sharded, local_rows,
                                        logical_to_spec, make_mesh,
                                        maybe_initialize_distributed, shard_batch,
                                        state_shardings)
