"""LoRA (Hu et al. 2021): train the low-rank A and B of W + (α / r)·A·B, keep W frozen.

`config.model.lora_rank` = r > 0 gives each of `lora_targets`' projections an adapter
(`layers.Dense`, its factors `LoRAParam`s). A run then trains the adapters (and a new scalar
or value head, `HeadParam`) alone: the train step differentiates them only (`split_trained`),
the optimizer keeps moments for them only,
and the base weights (which may be stored in bfloat16) enter the step as an argument that is
never donated. The reference model of DPO, KTO and online RL is the same base with the
adapters switched off (`without_adapters`), not a second copy. The exported checkpoint has the
adapters folded into its kernels (`merged`); `hf.save_peft_adapter` writes them for PEFT as
well.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models import quantization
from rlhf_jax.models.config import NO_ADAPTERS, ModelConfig
from rlhf_jax.models.layers import HeadParam, LoRAParam
from rlhf_jax.models.transformer import Transformer


def has_adapters(model_or_state) -> bool:
  state = (nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return bool(jax.tree.leaves(nnx.filter_state(state, LoRAParam)))


def split_trained(params: nnx.State) -> tuple[nnx.State, nnx.State | None]:
  """(what a run trains, what it does not): for a LoRA model its adapters and its scalar
  output layers (`HeadParam`s: a reward model's head, a critic's, a policy's value head),
  against the rest; for any other model (params, None). Types, not values, decide, so that it
  splits a state's shardings too."""
  if not has_adapters(params):
    return params, None
  return nnx.split_state(params, (LoRAParam, HeadParam), ...)


def join(trained: nnx.State, fixed: nnx.State | None) -> nnx.State:
  """The whole model state again (`split_trained`'s inverse)."""
  return trained if fixed is None else nnx.merge_state(trained, fixed)


def adapters_off(params: nnx.State) -> nnx.State:
  """`params` with the adapters replaced by new zeros and the base arrays shared: the base
  model's parameters (`without_adapters`), which outlive the train state's donation of the
  adapters."""
  return jax.tree.map(
      lambda v: v.replace(jnp.zeros_like(v[...])) if isinstance(v, LoRAParam) else v,
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def without_adapters(model: Transformer) -> Transformer:
  """The base model under a LoRA model: the same base arrays, the adapters zero (x·0·0 adds
  exactly 0)."""
  graphdef, params = nnx.split(model)
  return nnx.merge(graphdef, adapters_off(params))


def reference_model(model: Transformer, frozen: nnx.State | None) -> Transformer:
  """A loss's frozen reference for the trained `model`: the reference's parameters `frozen` in
  the model's graph or, without them, a LoRA model's own base (`without_adapters`)."""
  if frozen is not None:
    return nnx.merge(nnx.graphdef(model), frozen)
  return without_adapters(model)


@functools.cache
def _plain_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
  return nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def merged(model: Transformer) -> Transformer:
  """The plain model (no adapters, no NF4) whose kernels are W + (α / r)·A·B, in W's dtype
  (param_dtype for a QLoRA base, W dequantized)."""
  cfg = model.cfg
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  weights = {}  # Each Dense's path: (its kernel's variable, W).
  for path, variable in flat.items():
    if path[-1] == 'kernel':
      weights[path[:-1]] = variable, variable[...]
    elif path[-1] == 'kernel_codes':
      scales = flat[(*path[:-1], 'kernel_scales')][...]
      weights[path[:-1]] = variable, quantization.dequantize(variable[...], scales,
                                                             cfg.param_dtype)
  kernels = {}
  for dense, (variable, kernel) in weights.items():
    if (*dense, 'lora_a') in flat:
      update = jnp.matmul(flat[(*dense, 'lora_a')][...], flat[(*dense, 'lora_b')][...])
      kernel = (kernel.astype(jnp.float32) + cfg.lora_alpha / cfg.lora_rank * update).astype(
          kernel.dtype)  # Stacked layers too.
    kernels[(*dense, 'kernel')] = variable.replace(kernel)
  rest = [(path, v) for path, v in flat.items() if not isinstance(v, LoRAParam)
          and path[-1] not in ('kernel', 'kernel_codes', 'kernel_scales')]
  return nnx.merge(_plain_graphdef(cfg.replace(**NO_ADAPTERS)),
                   nnx.from_flat_state(rest + list(kernels.items())))


def init_adapters(abstract: dict, seed: int = 0) -> dict:
  """{path: array} for the `LoRAParam`s among `abstract` ({path: abstract variable}): A drawn
  N(0, 1/in), B zero, as `layers.Dense` initialises them."""
  arrays, key = {}, jax.random.key(seed)
  for i, (path, variable) in enumerate(sorted(abstract.items())):
    if not isinstance(variable, LoRAParam):
      continue
    if path[-1] == 'lora_a':
      fan_in = variable.shape[-2]
      arrays[path] = (jax.random.normal(jax.random.fold_in(key, i), variable.shape) *
                      fan_in ** -0.5).astype(variable.dtype)
    else:
      arrays[path] = jnp.zeros(variable.shape, variable.dtype)
  return arrays
