"""The one train step that every algorithm uses.

An algorithm is a `loss_fn(model, batch, rng, frozen) -> (loss, metrics)`: it runs the model on
its batch and hands the arrays to a pure loss from `rlhf_jax.losses`. `frozen` holds the
parameters of models the loss reads but does not train (DPO's reference), placed on the same
mesh, or None. The train state holds what is trained: the whole model, or a LoRA model's
adapters, whose base weights come as `fixed` (`lora.split_trained`), never donated.
Everything else (gradient accumulation, the optimizer, shardings, donation) lives here once.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax.engine.state import TrainState
from rlhf_jax.errors import InputError
from rlhf_jax.models.lora import join

LossFn = Callable[[nnx.Module, dict, jax.Array, object], tuple[jax.Array, dict]]


def make_train_step(*args, **kwargs):
  """`jit_train_step`'s step with `frozen` optional: `step(state, batch, frozen=None)`, traced
  and run under the mesh of its state's shardings (`jax.set_mesh`), so that the model's
  activation constraints (`parallel.constrain`) apply."""
  jitted = jit_train_step(*args, **kwargs)
  mesh = jax.tree.leaves(kwargs['state_shardings'])[0].mesh

  def step(state, batch, frozen=None, fixed=None):
    with jax.set_mesh(mesh):
      return jitted(state, batch, frozen, fixed)
  return step


def jit_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                   graphdef: nnx.GraphDef, *, state_shardings: TrainState, batch_shardings,
                   frozen_shardings=None, fixed_shardings=None,
                   schedule: optax.Schedule | None = None, grad_accum_steps: int = 1):
  """Jitted `step(state, batch, frozen, fixed) -> (state, metrics)` with explicit shardings
  (what `rlhf_jax.aot` lowers and compiles); the model is `state.params` joined with `fixed`.

  With `grad_accum_steps` = A > 1 the global batch is split into A micro-batches that run one
  after another in a `lax.scan`; gradients and metrics are averaged over them (the mean of
  micro-batch losses, which equals the full-batch loss when micro-batches weigh the same).
  Each device's rows stay on it: row r of micro-batch a is global row r·A + a.
  """

  def loss_and_grad(params, batch, rng, frozen, fixed):
    def compute(params):
      return loss_fn(nnx.merge(graphdef, join(params, fixed)), batch, rng, frozen)
    (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(params)
    return grads, {**metrics, 'loss': loss}

  def step(state: TrainState, batch, frozen=None, fixed=None):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    if grad_accum_steps == 1:
      grads, metrics = loss_and_grad(state.params, batch, step_rng, frozen, fixed)
    else:
      micro_batches = jax.tree.map(_split_micro_batches, batch)
      rngs = jax.random.split(step_rng, grad_accum_steps)

      def accumulate(grads_sum, xs):
        grads, metrics = loss_and_grad(state.params, *xs, frozen, fixed)
        return jax.tree.map(jnp.add, grads_sum, grads), metrics

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, metrics = jax.lax.scan(accumulate, zeros, (micro_batches, rngs))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      metrics = jax.tree.map(jnp.mean, metrics)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves the parameters and the optimizer's moments as they
    # were; the loop stops there or goes on (config.train.nonfinite).
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    metrics['grad_norm'] = grad_norm
    metrics['param_norm'] = optax.tree.norm(params)
    metrics['update_skipped'] = 1.0 - finite.astype(jnp.float32)
    if schedule is not None:
      metrics['lr'] = schedule(state.step)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=jax.random.key_data(rng))
    return new_state, metrics

  def _split_micro_batches(x):
    if x.shape[0] % grad_accum_steps:
      raise InputError(f'Batch of {x.shape[0]} rows does not split into '
                       f'config.optim.grad_accum_steps={grad_accum_steps} micro-batches.')
    return x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                     *x.shape[1:]).swapaxes(0, 1)

  return jax.jit(step, in_shardings=(state_shardings, batch_shardings, frozen_shardings,
                                     fixed_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0)
