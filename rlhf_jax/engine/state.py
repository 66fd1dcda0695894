"""Train state: everything a resumed run needs besides the data position."""

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer updates done.
  params: nnx.State  # f32 master weights.
  opt_state: optax.OptState
  rng: jax.Array  # Raw key data (uint32), so it checkpoints and shards as a plain array.


def train_state_shardings(params_shardings, optimizer: optax.GradientTransformation,
                          abstract_params, mesh: Mesh):
  """Shardings of a TrainState: optimizer moments follow their parameters; scalars replicate."""
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params_shardings, opt_state=opt_shardings,
                    rng=replicated)


def init_train_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int,
                     shardings: TrainState) -> TrainState:
  """Optimizer state made on device, directly in its sharded layout."""

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings,
                 donate_argnums=0)(params)


def abstract_like(tree):
  """ShapeDtypeStructs with shardings, the target layout for a checkpoint restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)
