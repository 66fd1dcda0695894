"""Optimizer and learning-rate schedule from the config's `optim` entry."""

import jax
import optax
from flax import nnx

from rlhf_jax.errors import InputError

SCHEDULES = ('constant', 'warmup_cosine', 'warmup_stable_decay')


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  """Learning rate per step.

  constant:            lr after a linear warmup.
  warmup_cosine:       linear warmup, then cosine decay to lr·final_lr_fraction.
  warmup_stable_decay: linear warmup, constant lr, then a linear decay over the last
                       `decay_fraction` of training to lr·final_lr_fraction (Hu 2024, MiniCPM).
  """
  lr, warmup = optim.lr, optim.warmup_steps
  final = lr * optim.final_lr_fraction
  warmup_fn = optax.linear_schedule(0.0, lr, max(warmup, 1))
  if optim.schedule == 'constant':
    rest = optax.constant_schedule(lr)
  elif optim.schedule == 'warmup_cosine':
    rest = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), final / lr if lr else 0)
  elif optim.schedule == 'warmup_stable_decay':
    decay_steps = max(int(total_steps * optim.decay_fraction), 1)
    stable_steps = max(total_steps - warmup - decay_steps, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, final, decay_steps)],
        [stable_steps])
  else:
    raise InputError(f'config.optim.schedule={optim.schedule!r}; choose from {SCHEDULES}.')
  return optax.join_schedules([warmup_fn, rest], [warmup]) if warmup else rest


def decay_start_step(optim, total_steps: int) -> int:
  """First step of warmup_stable_decay's decay stage (where midtraining switches weights)."""
  if optim.schedule != 'warmup_stable_decay':
    raise InputError('config.data.decay_weights switches the mixture at the decay stage; set '
                     f'config.optim.schedule="warmup_stable_decay" (it is {optim.schedule!r}).')
  return total_steps - max(int(total_steps * optim.decay_fraction), 1)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation,
                                                      optax.Schedule]:
  """AdamW (Loshchilov & Hutter 2019) after global-norm gradient clipping.

  Weight decay skips vectors (norm scales, biases), as is standard for transformers; a
  scanned model's stacked 'layers' axis does not count as a dimension.
  """
  if optim.name != 'adamw':
    raise InputError(f'config.optim.name={optim.name!r}; only "adamw" is implemented.')
  schedule = make_schedule(optim, total_steps)
  decay_mask = lambda params: jax.tree.map(_is_matrix, params, is_leaf=_is_variable)
  chain = [optax.clip_by_global_norm(optim.grad_clip_norm)] if optim.grad_clip_norm else []
  chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _is_matrix(param) -> bool:
  """Whether a parameter has 2 or more dimensions besides a scanned model's 'layers' axis."""
  axes = param.get_metadata().get('logical_axes', ()) if _is_variable(param) else ()
  return param.ndim - (tuple(axes[:1]) == ('layers',)) > 1
