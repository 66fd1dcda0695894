"""Models in and out of a run: built from a config or loaded from an HF checkpoint straight into
their sharded layout, and exported back to Hugging Face format."""

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils

from rlhf_jax import parallel, storage
from rlhf_jax.models import lora
from rlhf_jax.models.config import NO_ADAPTERS, RUN_FIELDS, ModelConfig
from rlhf_jax.models.hf import (has_peft_adapter, load_hf, read_hf_config, save_hf,
                                save_peft_adapter)
from rlhf_jax.models.sources import local_dir
from rlhf_jax.models.transformer import Transformer


class LoadedModel(NamedTuple):
  """A model on the mesh: its graph, its parameter state and that state's shardings."""
  graphdef: nnx.GraphDef
  params: nnx.State
  shardings: object

  def module(self) -> Transformer:
    return nnx.merge(self.graphdef, self.params)

  def copy(self) -> 'LoadedModel':
    """The same model in new buffers (a train state donates, and so consumes, its params)."""
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.shardings)
    return self._replace(params=copy(self.params))

  def trained_and_reference(self) -> tuple['LoadedModel', 'LoadedModel']:
    """(the model a run trains, its frozen reference), both this model at the start. The
    trained one is a copy, as a train state donates its params; but a LoRA model's train
    state holds only its adapters, so it is this model itself and the reference its base with
    the adapters switched off (`lora.adapters_off`): one base in memory, no copy."""
    if lora.has_adapters(self.params):
      return self, self._replace(params=lora.adapters_off(self.params))
    return self.copy(), self


def build_model(cfg: ModelConfig, mesh, rules, *, seed: int) -> LoadedModel:
  """A randomly initialised `Transformer`, created directly in its shards."""
  return LoadedModel(*parallel.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)),
                                              mesh, rules))


def load_model(path: str, mesh, rules, *, head: str, numerics=None,
               adapters: bool = True) -> LoadedModel:
  """The HF checkpoint at `path` (a directory, a URL or a Hub id) with a `head` head ('lm' or
  'scalar'), each host reading only its shards. `numerics` (a config.model) sets the
  fields a checkpoint has not (`RUN_FIELDS`: dtype, remat, scan_layers, LoRA, ...); None: their
  defaults (float32, 'auto' attention, unscanned, no adapters). adapters=False: without
  numerics' LoRA adapters or NF4 base (a model that stays frozen)."""
  path = local_dir(path)
  options = {}
  if numerics is not None:
    options = dict(dtype=numerics.param_dtype, compute_dtype=numerics.dtype,
                   **{field: getattr(numerics, field)
                      for field in RUN_FIELDS if field not in ('dtype', 'param_dtype')})
    if not adapters:
      options.update(NO_ADAPTERS)
  # The abstract state that the shardings follow: scan_layers and LoRA shape it.
  run_fields = {k: v for k, v in options.items() if k not in ('dtype', 'compute_dtype')}
  cfg = read_hf_config(path, head=head).replace(**run_fields)
  abstract_state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  shardings = parallel.state_shardings(abstract_state, mesh, rules)
  graphdef, params = nnx.split(load_hf(path, head=head, shardings=shardings, **options))
  return LoadedModel(graphdef, params, shardings)


def is_export(path: str) -> bool:
  """Whether `path` (a local directory or a URL) holds a whole HF checkpoint: config.json and
  every weights file it lists (model.safetensors, or each shard of
  model.safetensors.index.json)."""
  if not storage.exists(os.path.join(path, 'config.json')):
    return False
  index = os.path.join(path, 'model.safetensors.index.json')
  if storage.exists(index):
    with storage.open_file(index) as f:
      shards = set(json.load(f)['weight_map'].values())
  else:
    shards = {'model.safetensors'}
  return all(storage.exists(os.path.join(path, shard)) for shard in shards)


def export_hf(graphdef, params, path: str, tokenizer=None, *, dtype=None,
              max_shard_size: int | str = '5GB') -> None:
  """The model (and its tokenizer) as a Hugging Face checkpoint directory, its weights in
  `dtype` (default: the parameters') and sharded over `max_shard_size` (`save_hf`). A LoRA
  model's adapters are folded into it, and for a Llama-style LM written for PEFT in
  `path`/adapter too.

  The next stage of a pipeline starts from it with `--config.model.hf_path=<workdir>/hf`. Its
  parameters are gathered to every host (save_hf writes from one host's memory). It is written
  beside `path` and renamed into place once whole (`staged_dir`), so a failed export (a full
  disk) leaves no partial `path`; a URL is written locally first, then uploaded. Every process
  returns once it is whole, so any of them may read it next.
  """
  params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    token_ids = {}
    if tokenizer is not None:
      token_ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with storage.staged_dir(path) as local_path:
      model = nnx.merge(graphdef, params)
      save_hf(model, local_path, dtype=dtype, max_shard_size=max_shard_size, **token_ids)
      if has_peft_adapter(model):
        save_peft_adapter(model, os.path.join(local_path, 'adapter'))
      if tokenizer is not None:
        tokenizer.save_pretrained(local_path)
  parallel.barrier(f'export_hf {path}')
