"""Defaults shared by every experiment config, and the bridge from config to ModelConfig."""

import dataclasses

import ml_collections
from ml_collections import config_dict

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.presets import get_preset
from rlhf_jax.parallel import DEFAULT_RULES

# ModelConfig fields that default to None, with the type a command-line override may give them.
_OPTIONAL_MODEL_FIELDS = {'head_dim': int, 'sliding_window': int, 'rope_llama3_scaling': tuple}


def model_config_dict(preset: str, **overrides) -> ml_collections.ConfigDict:
  """A model preset as a ConfigDict, so every field can be overridden from the command line."""
  fields = dataclasses.asdict(get_preset(preset).replace(**overrides))
  for name, kind in _OPTIONAL_MODEL_FIELDS.items():
    if fields[name] is None:
      fields[name] = config_dict.placeholder(kind)
  fields['hf_path'] = config_dict.placeholder(str)  # Load weights (and shape) from HF instead.
  return ml_collections.ConfigDict(fields)


def to_model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  fields = model.to_dict()
  fields.pop('hf_path', None)
  if fields.get('rope_llama3_scaling') is not None:
    fields['rope_llama3_scaling'] = tuple(fields['rope_llama3_scaling'])
  try:
    return ModelConfig(**fields)
  except TypeError as e:
    raise ValueError(f'config.model: {e}') from e


def base_config() -> ml_collections.ConfigDict:
  """Every key a trainer reads, with defaults; experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config_dict('tiny')

  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  c.sharding_rules = tuple(DEFAULT_RULES)
  c.distributed = ml_collections.ConfigDict({
      'enabled': 'auto',  # 'auto': start jax.distributed on detected multi-host launches.
      'coordinator_address': config_dict.placeholder(str),
      'num_processes': config_dict.placeholder(int),
      'process_id': config_dict.placeholder(int),
      'cpu_collectives': config_dict.placeholder(str),  # 'gloo' for several CPU processes.
  })

  c.optim = ml_collections.ConfigDict({
      'name': 'adamw',
      'lr': 3e-4,
      'schedule': 'warmup_cosine',  # constant | warmup_cosine | warmup_stable_decay
      'warmup_steps': 10,
      'decay_fraction': 0.2,  # warmup_stable_decay: share of steps spent decaying.
      'final_lr_fraction': 0.1,
      'b1': 0.9,
      'b2': 0.95,
      'eps': 1e-8,
      'weight_decay': 0.1,
      'grad_clip_norm': 1.0,
      'grad_accum_steps': 1,
  })

  c.train = ml_collections.ConfigDict({
      'steps': 100,
      'batch_size': 16,  # Global batch, over all processes and micro-batches.
      'seq_len': 64,
      'log_every': 10,
      'eval_every': 50,
      'eval_batches': 4,
      'eval_at_start': False,  # Also evaluate the initial model (step 0).
      'checkpoint_every': 50,
      'keep_checkpoints': 2,
      'async_checkpoint': True,
      'progress_bar': True,
      'tensorboard': True,
      'logprob_chunk_size': 256,  # Sequence chunk for log-probs without [B, T, V] logits.
      'export_hf': False,  # Write the final model (+ tokenizer) to <workdir>/hf.
  })
  return c


def preset_config(presets: dict[str, dict], preset: str, config_file: str, *,
                  head: str = 'lm') -> ml_collections.ConfigDict:
  """base_config() sized by a named preset: model, steps, batch_size, seq_len, lr.

  Evaluations and checkpoints come every quarter of the run, warmup takes its first 5 %.
  """
  if preset not in presets:
    raise ValueError(f'Unknown preset {preset!r} for {config_file}; choose from '
                     f'{sorted(presets)}.')
  p = presets[preset]
  c = base_config()
  c.model = model_config_dict(p['model'], head=head)
  c.train.steps = p['steps']
  c.train.batch_size = p['batch_size']
  c.train.seq_len = p['seq_len']
  c.train.eval_every = max(p['steps'] // 4, 1)
  c.train.checkpoint_every = max(p['steps'] // 4, 1)
  c.optim.lr = p['lr']
  c.optim.warmup_steps = max(p['steps'] // 20, 1)
  return c


def data_config(sources: dict[str, str]) -> ml_collections.ConfigDict:
  """The `data` entry of tokenized training: sources, mixture, tokenizer, batching, playground.

  sources: name -> spec (see rlhf_jax.data.sources), mixed by `weights` (default equal).
  """
  return ml_collections.ConfigDict({
      'name': 'tokenized',
      'sources': sources,
      'weights': {name: 1.0 for name in sources},
      # Weights from the decay stage of a warmup_stable_decay run on ("midtraining"), or None.
      'decay_weights': None,
      'tokenizer': 'playground',  # A tokenizer directory, 'playground', or '' (model.hf_path's).
      'seed': 0,
      'eval_fraction': 0.05,  # Held out of a single-file JSONL source.
      'skip_invalid': False,  # Count and skip bad examples instead of stopping at the first.
      'max_prompt_len': 32,
      'truncation': 'response',  # 'error' | 'response' | 'prompt_and_response'
      'packing': False,  # Several SFT/text examples per row, kept apart by segment ids.
      'buckets': (),  # Row lengths below seq_len to pad short batches to.
      'tfds_splits': {'train': 'train', 'eval': 'test'},
      'tfds_data_dir': config_dict.placeholder(str),
      'playground': {'seed': 0, 'train_size': 20000, 'eval_size': 512,
                     'label_temperature': 0.1, 'length_bias': 0.0,
                     # 'program' | 'teacher:random' | 'teacher:<HF reward model dir>'
                     'gold': 'program', 'teacher_preset': 'playground-teacher',
                     # Preference pairs: 'corruptions' of the best answer, two samples of
                     # 'policy' (the run's initial model, config.model.hf_path) or of the
                     # policy in an HF directory.
                     'pairs': 'corruptions'},
  })


def sample_eval_config(**overrides) -> ml_collections.ConfigDict:
  """The `eval` entry: gold reward of sampled answers to held-out playground prompts."""
  return ml_collections.ConfigDict({'gold': 'playground', 'num_prompts': 256,
                                    'max_new_tokens': 24, 'temperature': 1.0, **overrides})
