"""Hugging Face checkpoints <-> `Transformer`: config translation, safetensors load and save.

Covers Llama, Mistral, Qwen2, Qwen3 and GPT-2 causal LMs, and their *ForSequenceClassification
reward models (`head='scalar'`). One table, `_name_table`, pairs every HF tensor with the
parameters it holds; loading and saving both read it. A checkpoint is read from a local
directory, a URL or a Hub id (`sources.local_dir`). Tokenizers need nothing from here:
`transformers.AutoTokenizer.from_pretrained(local_dir)`.

`transformers` is imported inside the functions that build HF configs, so importing this
module stays cheap.
"""

import collections
import contextlib
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from rlhf_jax.errors import InputError, NotFound
from rlhf_jax.models import lora, quantization
from rlhf_jax.models.config import RUN_FIELDS, ModelConfig
from rlhf_jax.models.sources import local_dir
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.storage import staged_dir

ParamPath = tuple[str | int, ...]  # A parameter's path in `nnx.state(model)`.

# model_type -> (config class, causal LM class, sequence classifier class) in transformers.
_FAMILIES = {
    'llama': ('LlamaConfig', 'LlamaForCausalLM', 'LlamaForSequenceClassification'),
    'mistral': ('MistralConfig', 'MistralForCausalLM', 'MistralForSequenceClassification'),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', 'Qwen2ForSequenceClassification'),
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', 'Qwen3ForSequenceClassification'),
    'gpt2': ('GPT2Config', 'GPT2LMHeadModel', 'GPT2ForSequenceClassification'),
}
# Buffers some checkpoints carry that are no parameters: GPT-2's causal masks, old RoPE tables.
_IGNORED = re.compile(r'.*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$')


def _check(field: str, value, allowed: tuple):
  if value not in allowed:
    raise InputError(f'Unsupported {field}={value!r}; supported: {allowed}.')


def config_from_hf(hf_config, *, head: str = 'lm') -> ModelConfig:
  """`ModelConfig` of a transformers config (llama, mistral, qwen2, qwen3 or gpt2)."""
  _check('model_type', hf_config.model_type, tuple(_FAMILIES))
  if hf_config.model_type == 'gpt2':
    return _gpt2_config(hf_config, head)
  return _llama_config(hf_config, head)


def _gpt2_config(c, head: str) -> ModelConfig:
  _check('activation_function', c.activation_function, ('gelu_new', 'gelu_pytorch_tanh'))
  _check('scale_attn_weights', c.scale_attn_weights, (True,))
  _check('scale_attn_by_inverse_layer_idx', c.scale_attn_by_inverse_layer_idx, (False,))
  _check('add_cross_attention', c.add_cross_attention, (False,))
  return ModelConfig(
      vocab_size=c.vocab_size, d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
      n_kv_heads=c.n_head, d_ff=c.n_inner or 4 * c.n_embd, norm='layer',
      norm_eps=c.layer_norm_epsilon, position='learned', max_position=c.n_positions,
      mlp='gelu', qkv_bias=True, out_bias=True, tie_embeddings=c.tie_word_embeddings,
      head=head)


def _llama_config(c, head: str) -> ModelConfig:
  _check('hidden_act', c.hidden_act, ('silu',))
  _check('attention_bias', getattr(c, 'attention_bias', False), (False,))
  _check('mlp_bias', getattr(c, 'mlp_bias', False), (False,))
  rope = c.rope_parameters
  _check('rope_type', rope.get('rope_type', 'default'), ('default', 'llama3'))
  _check('partial_rotary_factor', rope.get('partial_rotary_factor', 1.0), (1.0,))
  llama3 = None
  if rope.get('rope_type') == 'llama3':
    llama3 = (float(rope['factor']), float(rope['low_freq_factor']),
              float(rope['high_freq_factor']), int(rope['original_max_position_embeddings']))
  return ModelConfig(
      vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
      d_ff=c.intermediate_size,
      head_dim=getattr(c, 'head_dim', None) or c.hidden_size // c.num_attention_heads,
      norm='rms', norm_eps=c.rms_norm_eps, rope_theta=float(rope['rope_theta']),
      rope_llama3_scaling=llama3, max_position=c.max_position_embeddings,
      qkv_bias=c.model_type == 'qwen2', qk_norm=c.model_type == 'qwen3',
      tie_embeddings=c.tie_word_embeddings,
      sliding_window=_sliding_window(c), head=head)


def _sliding_window(c) -> int | None:
  if c.model_type not in ('qwen2', 'qwen3'):
    return getattr(c, 'sliding_window', None)  # Mistral's; Llama has none.
  kinds = set(c.layer_types)  # Qwen slides only from layer max_window_layers on.
  if len(kinds) > 1:
    raise InputError(f'Unsupported layer_types={c.layer_types!r}: one attention kind for all '
                     'layers is supported.')
  return c.sliding_window if kinds == {'sliding_attention'} else None


def hf_config_from(cfg: ModelConfig, **fields):
  """The transformers config (with `architectures`) of `cfg`; `fields` adds e.g. token ids."""
  import transformers
  model_type = ('gpt2' if cfg.position == 'learned' else 'qwen2' if cfg.qkv_bias else
                'qwen3' if cfg.qk_norm else 'mistral' if cfg.sliding_window else 'llama')
  config_class, lm_class, classifier_class = _FAMILIES[model_type]
  if cfg.head == 'scalar':
    fields |= dict(num_labels=1)
  if model_type == 'gpt2':
    fields |= dict(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                   n_inner=cfg.d_ff, n_positions=cfg.max_position,
                   layer_norm_epsilon=cfg.norm_eps, activation_function='gelu_new')
  else:
    rope = dict(rope_type='default', rope_theta=cfg.rope_theta)
    if cfg.rope_llama3_scaling:
      rope |= dict(zip(('factor', 'low_freq_factor', 'high_freq_factor',
                        'original_max_position_embeddings'), cfg.rope_llama3_scaling),
                   rope_type='llama3')
    fields |= dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                   num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                   intermediate_size=cfg.d_ff, head_dim=cfg.resolved_head_dim,
                   rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
                   max_position_embeddings=cfg.max_position)
    if model_type == 'mistral':
      fields |= dict(sliding_window=cfg.sliding_window)
    if model_type in ('qwen2', 'qwen3') and cfg.sliding_window:
      fields |= dict(use_sliding_window=True, sliding_window=cfg.sliding_window,
                     max_window_layers=0)
  hf_config = getattr(transformers, config_class)(
      vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
      architectures=[lm_class if cfg.head == 'lm' else classifier_class],
      dtype=jnp.dtype(cfg.param_dtype).name, **fields)
  # The HF config must describe the same architecture, or `cfg` has no HF equivalent.
  described = config_from_hf(hf_config, head=cfg.head)
  run_fields = {field: getattr(cfg, field) for field in RUN_FIELDS}
  if described.replace(**run_fields, head_dim=described.resolved_head_dim) != cfg.replace(
      head_dim=cfg.resolved_head_dim):
    raise InputError(f'{cfg} has no {config_class} equivalent.')
  return hf_config


def _name_table(cfg: ModelConfig) -> list[tuple[str, tuple[ParamPath, ...], str]]:
  """(HF tensor name, parameter paths it holds, layout) for every tensor of a checkpoint.

  Layouts: 'same'; 'transpose' (torch Linear weights are [out, in], our kernels [in, out]);
  'split' (GPT-2's Conv1D c_attn holds the q, k and v projections side by side).
  """
  rows = []

  def add(name, layout, *paths):
    rows.append((name, paths, layout))

  def dense(name, path, bias, layout='transpose'):
    add(f'{name}.weight', layout, path + ('kernel',))
    if bias:
      add(f'{name}.bias', 'same', path + ('bias',))

  def norm(name, path):
    add(f'{name}.weight', 'same', path + ('scale',))
    if cfg.norm == 'layer':
      add(f'{name}.bias', 'same', path + ('bias',))

  if cfg.position == 'learned':  # GPT-2: Conv1D weights are already [in, out].
    add('transformer.wte.weight', 'same', ('embed',))
    add('transformer.wpe.weight', 'same', ('pos_embed',))
    for i in range(cfg.n_layers):
      hf, ours = f'transformer.h.{i}', ('blocks', i)
      norm(f'{hf}.ln_1', ours + ('attn_norm',))
      qkv = [ours + ('attn', x) for x in 'qkv']
      add(f'{hf}.attn.c_attn.weight', 'split', *(p + ('kernel',) for p in qkv))
      add(f'{hf}.attn.c_attn.bias', 'split', *(p + ('bias',) for p in qkv))
      dense(f'{hf}.attn.c_proj', ours + ('attn', 'o'), True, 'same')
      norm(f'{hf}.ln_2', ours + ('mlp_norm',))
      dense(f'{hf}.mlp.c_fc', ours + ('mlp', 'up'), True, 'same')
      dense(f'{hf}.mlp.c_proj', ours + ('mlp', 'down'), True, 'same')
    norm('transformer.ln_f', ('final_norm',))
  else:
    add('model.embed_tokens.weight', 'same', ('embed',))
    for i in range(cfg.n_layers):
      hf, ours = f'model.layers.{i}', ('blocks', i)
      norm(f'{hf}.input_layernorm', ours + ('attn_norm',))
      for x in 'qkvo':
        dense(f'{hf}.self_attn.{x}_proj', ours + ('attn', x),
              cfg.qkv_bias if x != 'o' else cfg.out_bias)
      if cfg.qk_norm:
        norm(f'{hf}.self_attn.q_norm', ours + ('attn', 'q_norm'))
        norm(f'{hf}.self_attn.k_norm', ours + ('attn', 'k_norm'))
      norm(f'{hf}.post_attention_layernorm', ours + ('mlp_norm',))
      for x in ('gate', 'up', 'down'):
        dense(f'{hf}.mlp.{x}_proj', ours + ('mlp', x), cfg.out_bias)
    norm('model.norm', ('final_norm',))
  if cfg.head == 'scalar':
    add('score.weight', 'transpose', ('head', 'kernel'))
  elif not cfg.tie_embeddings:
    add('lm_head.weight', 'transpose', ('head', 'kernel'))
  return rows


def _state_path(param_path: ParamPath, cfg: ModelConfig) -> tuple[ParamPath, int | None]:
  """Where a `_name_table` parameter lives in the model's state, and at which layer of a
  stacked ('layers'-axis) array: ('blocks', i, ...) is ('blocks', ...)[i] when scanned."""
  if cfg.scan_layers and param_path[0] == 'blocks':
    return ('blocks', *param_path[2:]), param_path[1]
  return param_path, None


def _to_ours(tensor: np.ndarray, layout: str, n: int) -> list[np.ndarray]:
  if layout == 'split':
    return np.split(tensor, n, axis=-1)
  return [tensor.T if layout == 'transpose' else tensor]


def _to_hf(arrays: list[np.ndarray], layout: str) -> np.ndarray:
  if layout == 'split':
    return np.concatenate(arrays, axis=-1)
  return arrays[0].T if layout == 'transpose' else arrays[0]


@contextlib.contextmanager
def _naming_the_file(file):
  """Reading a safetensors file that is cut short or not one raises an error naming it."""
  try:
    yield
  except (safetensors.SafetensorError, OSError) as error:
    raise InputError(f'{file}: not a readable safetensors file ({error}); export or copy the '
                     'checkpoint again.') from error


def _locate_tensors(path: pathlib.Path, cfg: ModelConfig):
  """({table name: (safetensors file, name stored there)}, the file or index listing them)."""
  index = path / 'model.safetensors.index.json'
  single = path / 'model.safetensors'
  if index.exists():
    weight_map = json.loads(index.read_text())['weight_map']
    files, source = {name: path / file for name, file in weight_map.items()}, index
  elif single.exists():
    with _naming_the_file(single), safetensors.safe_open(single, framework='np') as f:
      files, source = dict.fromkeys(f.keys(), single), single
  else:
    raise NotFound(f'No model.safetensors or model.safetensors.index.json in {path}.')

  def table_name(name):  # GPT-2 checkpoints may lack the `transformer.` prefix.
    if cfg.position != 'learned' or name.startswith(('transformer.', 'lm_head.', 'score.')):
      return name
    return f'transformer.{name}'
  return {table_name(name): (file, name) for name, file in files.items()}, source


def _tensor_reader(locations: dict, stack: contextlib.ExitStack):
  """read(table name) -> the tensor as a NumPy array, each file opened once, until `stack`
  closes."""
  opened = {}

  def read(name):
    file, stored = locations[name]
    with _naming_the_file(file):
      if file not in opened:
        opened[file] = stack.enter_context(safetensors.safe_open(file, framework='np'))
      return opened[file].get_tensor(stored)
  return read


def _check_names(locations: dict, table: list, cfg: ModelConfig):
  """Raises on a checkpoint tensor that no parameter takes (known buffers aside)."""
  expected = {name for name, _, _ in table}
  if cfg.head == 'scalar' or cfg.tie_embeddings:
    expected.add('lm_head.weight')  # Tied to the embedding, or unused by a scalar head.
  for name, (file, stored) in locations.items():
    if name not in expected and not _IGNORED.match(name):
      raise InputError(f'Unexpected tensor {stored!r} in {file}: no parameter of this '
                       f'{cfg.head!r}-head model corresponds to it.')


def _unbox(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def read_hf_config(path, *, head: str = 'lm') -> ModelConfig:
  """`ModelConfig` of the checkpoint at `path` (a directory, a URL or a Hub id)."""
  import transformers
  return config_from_hf(transformers.AutoConfig.from_pretrained(local_dir(str(path))),
                        head=head)


def load_hf(path, dtype=jnp.float32, *, head: str = 'lm', shardings=None,
            compute_dtype: str | None = None, **run_fields) -> Transformer:
  """Loads an HF checkpoint (config.json + safetensors, single or sharded) from a directory,
  a URL or a Hub id (`sources.local_dir`).

  Parameters are stored in `dtype`; matmuls run in `compute_dtype` (default: `dtype`).
  `run_fields` set the rest of `config.RUN_FIELDS` (remat, attention, scan_layers: the blocks
  stacked for `jax.lax.scan`, one stacked tensor at a time in host memory; lora_rank,
  lora_alpha, lora_targets: adapters initialised as `lora.init_adapters` does). The model is built
  abstractly and filled tensor by tensor; with `shardings` (a pytree shaped like
  `nnx.state(model)` of `jax.sharding.Sharding`) each tensor goes straight to its devices.
  `head='scalar'` takes `score.weight` of a sequence classifier, or zeros if there is none.
  """
  path = pathlib.Path(local_dir(str(path)))
  param_dtype = jnp.dtype(dtype).name
  cfg = read_hf_config(path, head=head).replace(
      param_dtype=param_dtype, dtype=compute_dtype or param_dtype, **run_fields)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  variables = dict(nnx.to_flat_state(abstract))
  placements = ({} if shardings is None else
                {p: _unbox(s) for p, s in nnx.to_flat_state(shardings)})
  table = _name_table(cfg)
  locations, source = _locate_tensors(path, cfg)
  _check_names(locations, table, cfg)

  if cfg.scan_layers:  # Each stacked parameter's layers one after another.
    table.sort(key=lambda row: [_state_path(p, cfg)[0] for p in row[1]])
  arrays, layers_read = {}, collections.defaultdict(dict)
  with contextlib.ExitStack() as stack:
    read = _tensor_reader(locations, stack)
    for name, paths, layout in table:
      if name in locations:
        parts = _to_ours(read(name), layout, len(paths))
      elif name == 'score.weight':  # A causal LM becoming a reward model: fresh head.
        parts = [np.zeros(variables[paths[0]].shape)]
      else:
        raise InputError(f'Tensor {name!r} (for {paths}) is missing from {source}.')
      for param_path, array in zip(paths, parts):
        state_path, layer = _state_path(param_path, cfg)
        codes_path = state_path[:-1] + ('kernel_codes',)  # A kernel kept in NF4 (QLoRA).
        quantized = state_path[-1] == 'kernel' and codes_path in variables
        want = variables[codes_path if quantized else state_path]
        want_shape = want.shape if layer is None else want.shape[1:]
        if array.shape != want_shape:
          raise InputError(f'Tensor {name!r} in {locations[name][0]} gives {param_path} the '
                           f'shape {array.shape}; expected {want_shape}.')
        array = array.astype(np.float32 if quantized else want.dtype, copy=False)
        if layer is not None:  # Stacked once all its layers are read.
          layers_read[state_path][layer] = array
          if len(layers_read[state_path]) < cfg.n_layers:
            continue
          layers = layers_read.pop(state_path)
          array = np.stack([layers[i] for i in range(cfg.n_layers)])
        if quantized:
          scales_path = state_path[:-1] + ('kernel_scales',)
          arrays[codes_path], arrays[scales_path] = _quantized(
              array, placements.get(codes_path), placements.get(scales_path))
        else:
          arrays[state_path] = jax.device_put(array, placements.get(state_path))
  for state_path, array in lora.init_adapters(variables).items():
    arrays[state_path] = jax.device_put(array, placements.get(state_path))
  state = nnx.from_flat_state([(p, v.replace(arrays[p])) for p, v in variables.items()])
  return nnx.merge(graphdef, state)


def _quantized(kernel: np.ndarray, codes_sharding, scales_sharding):
  """(NF4 codes, block scales) of a kernel, each device quantizing its own shard."""
  if codes_sharding is None:
    return quantization.quantize(kernel)
  return jax.jit(quantization.quantize, out_shardings=(codes_sharding, scales_sharding))(
      jax.device_put(kernel, codes_sharding))


def save_hf(model: Transformer, path, *, dtype=None, max_shard_size: int | str = '5GB',
            **config_fields):
  """Writes config.json and the safetensors weights that transformers' `from_pretrained` loads.

  LoRA adapters are folded into the kernels (`lora.merged`). The weights are stored in `dtype`
  (default: the model's param_dtype), which the config names too; over `max_shard_size`
  (bytes, or '500MB', '5GB') they are split into shards with an index (`_write_weights`). `config_fields` go to the transformers config (e.g.
  `eos_token_id`, `pad_token_id`).
  """
  path = pathlib.Path(path)
  if lora.has_adapters(model):
    model = lora.merged(model)
  dtype = jnp.dtype(dtype or model.cfg.param_dtype)
  hf_config = hf_config_from(model.cfg.replace(param_dtype=dtype.name), **config_fields)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

  def value(param_path):
    state_path, layer = _state_path(param_path, model.cfg)
    array = params[state_path][...]
    return np.asarray(array if layer is None else array[layer])

  tensors = {}
  for name, paths, layout in _name_table(model.cfg):
    tensor = _to_hf([value(p) for p in paths], layout)
    tensors[name] = np.ascontiguousarray(tensor.astype(dtype, copy=False))
  path.mkdir(parents=True, exist_ok=True)
  hf_config.save_pretrained(path)
  _write_weights(tensors, path, max_shard_size)


def has_peft_adapter(model: Transformer) -> bool:
  """Whether `save_peft_adapter` writes `model`'s adapters: a LoRA language model of a
  Llama-style family."""
  cfg = model.cfg
  return lora.has_adapters(model) and cfg.position != 'learned' and cfg.head == 'lm'


def save_peft_adapter(model: Transformer, path, *, base_model: str = '') -> None:
  """Writes the LoRA adapters of `model` as PEFT saves them (adapter_config.json and
  adapter_model.safetensors), for `peft.PeftModel.from_pretrained(<HF base>, path)`.

  PEFT's lora_A.weight is [r, in] and lora_B.weight [out, r] (torch Linear layout), its
  scaling lora_alpha / r, as ours. Llama-style language models only: GPT-2 fuses q, k, v in
  one Conv1D, and a reward model's trained head is no adapter (its merged export has it).
  """
  cfg = model.cfg
  if not has_peft_adapter(model):
    raise InputError('save_peft_adapter needs a LoRA language model (config.model.lora_rank > '
                     '0, an LM head) of a Llama-style family (not GPT-2).')
  params = dict(nnx.to_flat_state(nnx.state(model)))
  tensors, modules = {}, set()
  for name, (param_path,), _ in [row for row in _name_table(cfg) if row[2] == 'transpose']:
    state_path, layer = _state_path(param_path[:-1] + ('lora_a',), cfg)
    if state_path not in params:  # Not a target (or the head).
      continue
    for factor, suffix in (('lora_a', 'lora_A'), ('lora_b', 'lora_B')):
      array = params[(*state_path[:-1], factor)][...]
      array = np.asarray(array if layer is None else array[layer], np.float32)
      tensors[f'base_model.model.{name.removesuffix(".weight")}.{suffix}.weight'] = (
          np.ascontiguousarray(array.T))
    modules.add(name.split('.')[-2])
  adapter_config = dict(
      peft_type='LORA', task_type='CAUSAL_LM',
      r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=sorted(modules),
      lora_dropout=0.0, bias='none', fan_in_fan_out=False, use_rslora=False,
      inference_mode=True, base_model_name_or_path=base_model)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'adapter_config.json').write_text(json.dumps(adapter_config, indent=2) + '\n')
  safetensors.numpy.save_file(tensors, path / 'adapter_model.safetensors',
                              metadata={'format': 'pt'})


def _write_weights(tensors: dict[str, np.ndarray], path: pathlib.Path,
                   max_shard_size: int | str = '5GB') -> None:
  """`tensors` as transformers' `save_pretrained` writes them: model.safetensors, or, over
  `max_shard_size`, model-00001-of-0000N.safetensors files (filled in order, a tensor larger
  than the limit alone in its file) and model.safetensors.index.json mapping each tensor to
  its file."""
  from huggingface_hub.serialization import split_state_dict_into_shards_factory
  try:
    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda tensor: tensor.nbytes,
        filename_pattern='model{suffix}.safetensors', max_shard_size=max_shard_size)
  except ValueError as error:
    raise InputError(f'max_shard_size={max_shard_size!r}: {error}') from error
  for file, names in split.filename_to_tensors.items():
    safetensors.numpy.save_file({name: tensors[name] for name in names}, path / file,
                                metadata={'format': 'pt'})
  if split.is_sharded:
    index = {'metadata': split.metadata, 'weight_map': dict(sorted(
        split.tensor_to_filename.items()))}
    (path / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2) + '\n')


def save_first_layers(path, out_path, n_layers: int) -> None:
  """Writes at `out_path` the checkpoint at `path` cut to its first `n_layers` blocks: the
  embedding, those blocks, the final norm and the head as they are, a config that says
  n_layers, and the directory's other files (the tokenizer's) copied. Smaller models that share
  one pretraining, e.g. reward models of several sizes (Gao et al. 2022 §3.2 on a budget). The
  output appears whole or not at all (`storage.staged_dir`)."""
  import transformers
  path = pathlib.Path(local_dir(str(path)))
  hf_config = transformers.AutoConfig.from_pretrained(path)
  classifier = any(a.endswith('ForSequenceClassification')
                   for a in hf_config.architectures or ())
  cfg = config_from_hf(hf_config, head='scalar' if classifier else 'lm')
  if not 1 <= n_layers <= cfg.n_layers:
    raise InputError(f'{path} has {cfg.n_layers} layers; cannot keep the first {n_layers}.')
  hf_config.num_hidden_layers = n_layers
  if getattr(hf_config, 'layer_types', None):  # Per-layer attention kinds (Qwen2, Mistral).
    hf_config.layer_types = hf_config.layer_types[:n_layers]
  locations, _ = _locate_tensors(path, cfg)
  with contextlib.ExitStack() as stack:
    read = _tensor_reader(locations, stack)
    # A tied lm_head, or a causal LM's score, is not stored and stays so.
    tensors = {name: read(name) for name, _, _ in _name_table(cfg.replace(n_layers=n_layers))
               if name in locations}
  with staged_dir(str(out_path)) as staged:
    hf_config.save_pretrained(staged)
    _write_weights(tensors, pathlib.Path(staged))
    for file in path.iterdir():  # Not the source's weights (its shards too) nor its config.
      if (file.is_file() and file.suffix != '.safetensors'
          and file.name not in ('config.json', 'model.safetensors.index.json')):
        shutil.copy2(file, staged)
