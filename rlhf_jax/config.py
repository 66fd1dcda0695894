"""Defaults shared by every experiment config, and the bridge from config to ModelConfig."""

import dataclasses
import importlib.util
import os
import pathlib

import jax
import ml_collections
from ml_collections import config_dict

from rlhf_jax.errors import InputError, NotFound
from rlhf_jax.models.config import RUN_FIELDS, ModelConfig
from rlhf_jax.models.hf import read_hf_config
from rlhf_jax.models.presets import get_preset
from rlhf_jax.models.sources import local_dir
from rlhf_jax.parallel import DEFAULT_RULES
from rlhf_jax.playground import tasks
from rlhf_jax.tpu import parse_slice

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
    raise InputError(f'config.model: {e}') from e


def architecture(model: ml_collections.ConfigDict, *, head: str | None = None) -> ModelConfig:
  """The architecture config.model trains: its own fields, or the config.json of
  config.model.hf_path (no weights read) with a `head` head (default config.model.head), in
  config.model's numerics. What `export` and `aot` rebuild abstractly."""
  if not model.hf_path:
    return to_model_config(model).replace(head=head or model.head)
  cfg = read_hf_config(local_dir(model.hf_path, key='config.model.hf_path'),
                       head=head or model.head)
  return cfg.replace(**{field: model[field] for field in RUN_FIELDS})


def base_config() -> ml_collections.ConfigDict:
  """Every key a trainer reads, with defaults; experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config_dict('tiny')

  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  c.slice = ''  # The TPU slice the sizes were chosen for (e.g. 'v5p-64'); '' for any machine.
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
      'keep_checkpoints': 2,  # The last K checkpoints; older ones are deleted, except:
      # Also save and keep the checkpoint of every evaluation step (eval_every), so that the
      # policy at each point of a curve can be exported later (python -m rlhf_jax.export).
      'keep_eval_checkpoints': True,
      'async_checkpoint': True,
      'progress_bar': True,
      'tensorboard': True,  # Also on a URL workdir: staged locally, uploaded every minute.
      # Weights & Biases (pip install wandb, the `wandb` extra): a run whose id is derived from
      # the workdir, so a resumed run continues it; WANDB_MODE=offline writes <workdir>/wandb.
      'wandb': False,
      'wandb_project': 'rlhf_jax',
      'logprob_chunk_size': 256,  # Sequence chunk for log-probs without [B, T, V] logits.
      'export_hf': False,  # Write the final model (+ tokenizer) to <workdir>/hf.
      'export_dtype': 'float32',  # Of its weights: float32 | bfloat16 (half the size) | float16.
      # A step whose loss or gradient norm is not finite: 'stop' the run there (nothing after
      # the last checkpoint is saved or exported) or 'skip' its update and go on (counted as
      # update_skipped in metrics.jsonl).
      'nonfinite': 'stop',
  })

  # What `python -m rlhf_jax.sweep` runs (trainers ignore it). grid and random follow the
  # config's nesting: grid={'optim': {'lr': [1e-3, 3e-3]}} (product of the lists), random=
  # {'rl': {'kl_coef': {'log_uniform': [0.01, 0.1]}}} (num_random draws per grid point).
  c.sweep = ml_collections.ConfigDict({'grid': {}, 'random': {}, 'num_random': 0, 'seed': 0})
  return c


# How the pod-scale presets run (`pod_presets`): bfloat16 matmuls over float32 master weights,
# every block rematerialised, layers scanned, and parameters, gradients and optimizer state
# sharded over every chip (FSDP). Attention is the default 'auto': the hardware's flash kernel
# (splash on TPU, cuDNN on CUDA), else chunked; never [T, S] scores for whole sequences.
POD_NUMERICS = dict(dtype='bfloat16', remat='full', scan_layers=True)
POD_MESH = {'data': 1, 'fsdp': -1, 'tensor': 1}


# The pod-scale models and the TPU slice each preset is sized for.
POD_SLICES = {'llama3-8b': 'v5p-64', 'qwen2.5-7b': 'v5p-64', 'qwen3-8b': 'v5p-64',
              'llama3-70b': 'v5p-256'}


def pod_presets(*, sequences_per_chip: int, **sizes) -> dict[str, dict]:
  """A preset (`preset_config`) per pod-scale model, sized for its slice (`POD_SLICES`):
  batch_size = sequences_per_chip × chips, POD_NUMERICS, POD_MESH and `sizes` (steps,
  seq_len, lr, ...)."""
  return {model: dict(model=model, slice=slice_, numerics=POD_NUMERICS, mesh=POD_MESH,
                      batch_size=sequences_per_chip * parse_slice(slice_).chips, **sizes)
          for model, slice_ in POD_SLICES.items()}


def preset_config(presets: dict[str, dict], preset: str, config_file: str, *,
                  head: str = 'lm') -> ml_collections.ConfigDict:
  """base_config() sized by a named preset: model, steps, batch_size, seq_len, lr; and, for
  the pod-scale ones (`pod_presets`), the model's numerics, the mesh and the slice (config.slice,
  `rlhf_jax.aot`'s default topology).

  Evaluations and checkpoints come every quarter of the run, warmup takes its first 5 %.
  """
  if preset not in presets:
    raise InputError(f'Unknown preset {preset!r} for {config_file}; choose from '
                     f'{sorted(presets)}.')
  p = presets[preset]
  c = base_config()
  c.model = model_config_dict(p['model'], head=head, **p.get('numerics', {}))
  c.mesh.update(p.get('mesh', {}))
  c.slice = p.get('slice', '')
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
      # Our field names -> the data's, e.g. {'prompt': 'question', 'response': 'answer'}.
      'field_map': {},
      'max_prompt_len': 32,
      'truncation': 'response',  # 'error' | 'response' | 'prompt_and_response'
      # SFT conversations: train every assistant turn ('all') or only the last ('last').
      'train_turns': 'all',
      'packing': False,  # Several SFT/text examples per row, kept apart by segment ids.
      'buckets': (),  # Row lengths below seq_len to pad short batches to.
      # Where tokenized sources are stored, once per source + tokenizer + options
      # (rlhf_jax.data.tokenized); '' = <workdir>/data/tokens (per host for a URL workdir).
      # Point runs on the same data at one directory to tokenize it once for all of them.
      'token_cache': '',
      'tokenize_workers': 0,  # Processes that tokenize; 0: one per CPU from 50k records.
      # The source's split names for our train/eval splits (tfds: and hf: sources).
      'splits': {'train': 'train', 'eval': 'test'},
      'tfds_data_dir': config_dict.placeholder(str),
      # The prompts of every playground split (instructions, pairs, RL, evaluation) are of
      # `tasks`, in turn; pretraining text states facts of all of them.
      'playground': {'seed': 0, 'train_size': 20000, 'eval_size': 512, 'tasks': tasks.TASKS,
                     'label_temperature': 0.1, 'length_bias': 0.0,
                     # Pairs' answers hedged ("I think …") with probability hedge_share, and
                     # the labelers' bias toward confident ones (rlhf_jax/playground/labelers.py).
                     'hedge_share': 0.0, 'assertiveness_bias': 0.0,
                     # 'program' | 'teacher:random' | 'teacher:<HF reward model dir>'
                     'gold': 'program', 'teacher_preset': 'playground-teacher',
                     # Preference pairs: 'corruptions' of the best answer, two samples of
                     # 'policy' (the run's initial model, config.model.hf_path) or of the
                     # policy in an HF directory, its answers sampled at pair_temperature.
                     'pairs': 'corruptions', 'pair_temperature': 1.0},
  })


def sample_eval_config(**overrides) -> ml_collections.ConfigDict:
  """The `eval` entry: gold reward of sampled answers to held-out playground prompts."""
  return ml_collections.ConfigDict({'gold': 'playground', 'num_prompts': 256,
                                    'max_new_tokens': 24, 'temperature': 1.0, **overrides})


def rl_config(**overrides) -> ml_collections.ConfigDict:
  """The `rl` entry of online RL (rlhf_jax.algorithms.rl): PPO's defaults, Huang et al. 2024."""
  return ml_collections.ConfigDict({
      # HF directory of a reward model (an RM run's <workdir>/hf), or several separated by
      # commas: an ensemble whose members' normalised scores are aggregated by
      # reward_aggregation, 'mean' | 'min' | 'uncertainty' (rlhf_jax.rewards.ensemble).
      'reward_model': '',
      # Python reward functions 'package.module:function', fn(prompts, completions) ->
      # list[float] as in TRL, weighted by reward_fn_weights (empty: 1 each) and added to the
      # reward model's normalised score, or alone (rlhf_jax.rewards.functions). E.g.
      # ('rlhf_jax.playground.tasks:program_gold',): the playground's gold, a verifiable reward.
      'reward_fns': (),
      'reward_fn_weights': (),
      'reward_aggregation': 'mean',
      # λ of 'uncertainty', mean − λ·var over members of std 1: a response on which they
      # disagree by one std loses half a std of reward (Coste et al. 2023 find UWO robust to λ).
      'uncertainty_weight': 0.5,
      'prompts': 'playground',  # 'playground', a jsonl:/tfds:/hf: source, or a text file.
      'num_prompts': 8192,  # The playground prompts that rollouts draw from.
      'critic': 'model',  # 'model' (from value_model or the RM) | 'head' | 'none'
      'value_model': '',  # HF reward-model directory for the critic; '' = reward_model's first.
      'rollout_batch_size': 64,  # Responses per iteration (prompts × group_size).
      'group_size': 1,  # Samples per prompt (≥ 2 for grpo and rloo).
      'num_minibatches': 4,
      'ppo_epochs': 4,
      'max_new_tokens': 24,
      'temperature': 1.0,
      'kl_coef': 0.05,  # β; in the reward (PPO, RLOO) or the loss (kl_in_loss, GRPO).
      'kl_estimator': 'k1',  # Of the KL in the reward: k1 | k2 | k3.
      'kl_in_loss': False,
      'adaptive_kl': False,  # Ziegler et al. 2019's controller for β.
      'kl_target': 6.0,
      'kl_horizon': 10000,
      'gamma': 1.0,
      'lam': 0.95,
      'clip_eps': 0.2,
      # ε_high of the ratio's upper clip, 1 + ε_high (None: clip_eps); DAPO's clip-higher: 0.28.
      'clip_eps_high': config_dict.placeholder(float),
      # How the policy loss (and a KL in the loss) is averaged over a minibatch's tokens:
      # 'token_mean' | 'sequence_mean' (GRPO's paper) | 'max_length' (Dr. GRPO), see
      # rlhf_jax.losses.ppo.aggregate_tokens.
      'loss_aggregation': 'token_mean',
      'value_clip_eps': 0.2,
      'vf_coef': 0.1,
      'whiten_rewards': False,
      'whiten_advantages': True,
      # GRPO: divide each group's centred rewards by their std (False: Dr. GRPO, Liu et al. 2025,
      # with whiten_advantages=False and loss_aggregation='max_length').
      'normalize_group_std': True,
      'normalize_scores': True,  # Scores of the initial policy's responses: mean 0, std 1.
      'missing_eos_penalty': 1.0,  # Subtracted from the score of a response without EOS.
      # A KL budget: stop after the first evaluation whose KL to the initial policy reaches it
      # (0: run every step), so that runs are compared over the same range of d = √KL.
      'stop_kl': 0.0,
      # PPO-ptx (Ouyang et al. 2022): γ, the weight of the next-token NLL of pretraining text
      # (ptx_source: 'playground:text' or a jsonl:/tfds:/hf: text source, read as training
      # data is; one minibatch of rows per update) added to the loss. With a source,
      # evaluations measure that NLL on its held-out split ('eval/loss/ptx') whatever γ.
      'ptx_coef': 0.0,
      'ptx_source': '',
      **overrides,
  })


def rl_run_config(presets: dict[str, dict], preset: str, config_file: str, *,
                  algorithm: str = 'ppo', **rl_overrides) -> ml_collections.ConfigDict:
  """A whole online-RL config (`algorithm`: ppo, grpo or rloo): a preset whose `steps` are
  iterations and whose `batch_size` is the rollout's number of responses; responses fill
  seq_len after the prompt. The eval loss is that of one minibatch of held-out prompts."""
  c = preset_config(presets, preset, config_file)
  c.algorithm = algorithm
  c.train.eval_batches = 1
  c.train.eval_at_start = True
  c.train.export_hf = True
  c.train.log_every = 1
  c.optim.weight_decay = 0.0
  c.optim.schedule = 'constant'
  c.data = data_config({})
  c.data.tokenizer = ''  # The policy's (config.model.hf_path).
  c.rl = rl_config(rollout_batch_size=presets[preset]['batch_size'], **rl_overrides)
  c.rl.max_new_tokens = c.train.seq_len - c.data.max_prompt_len
  c.eval = sample_eval_config(num_prompts=256, max_new_tokens=c.rl.max_new_tokens)
  return c


# Sizes of the offline preference runs (DPO and its family, KTO); `beta` is the loss's β.
PREFERENCE_PRESETS = {
    'tiny': dict(model='playground', steps=300, batch_size=32, seq_len=48, lr=3e-5, beta=0.3),
    'small': dict(model='small', steps=2000, batch_size=64, seq_len=512, lr=5e-6, beta=0.1),
    'llama-1b': dict(model='llama-1b', steps=2000, batch_size=128, seq_len=2048, lr=5e-7,
                     beta=0.1),
    # Pairs: 2 sequences of seq_len each.
    **pod_presets(sequences_per_chip=1, steps=2000, seq_len=2048, lr=5e-7, beta=0.1),
}


def preference_run_config(preset: str, config_file: str, *, algorithm: str,
                          **loss) -> ml_collections.ConfigDict:
  """An offline preference run (`algorithm`: dpo or kto) from an SFT model, its reference:
  evaluated at its start, exported at its end. On the playground, as in the DPO paper, the
  pairs are two samples of the SFT model per prompt labelled by the simulated labelers.
  `loss`: config.loss's entries besides beta."""
  c = preset_config(PREFERENCE_PRESETS, preset, config_file)
  c.algorithm = algorithm
  c.train.eval_at_start = True
  c.train.export_hf = True
  c.optim.weight_decay = 0.0
  c.loss = ml_collections.ConfigDict({'beta': PREFERENCE_PRESETS[preset]['beta'], **loss})
  c.data = data_config({'pairs': 'playground:preference'})
  c.data.playground.pairs = 'policy'
  c.data.playground.train_size = 12000
  c.eval = sample_eval_config(num_prompts=512)
  return c


def configs_dir() -> pathlib.Path:
  """The experiment configs (`configs/` of the repository), installed as `rlhf_jax.configs`."""
  spec = importlib.util.find_spec('rlhf_jax.configs')
  if spec is None or not spec.submodule_search_locations:
    raise NotFound('The experiment configs are not installed (rlhf_jax.configs); '
                            'install the project with `pip install .`.')
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def config_path(path: str) -> str:
  """A `--config` path as given (`configs/sft.py:tiny`); when it names no file from here, the
  installed config of that name, so commands work from any working directory."""
  file_name, colon, preset = path.partition(':')
  if os.path.exists(file_name) or pathlib.Path(file_name).parent.name != 'configs':
    return path
  installed = configs_dir() / pathlib.Path(file_name).name
  return f'{installed}{colon}{preset}' if installed.exists() else path


def load_config(name: str) -> ml_collections.ConfigDict:
  """`configs/<file>.py:<preset>`, e.g. load_config('rm.py:tiny'), unlocked, as
  `python -m rlhf_jax.main --config=configs/rm.py:tiny` would build it."""
  file_name, _, preset = name.partition(':')
  path = configs_dir() / file_name
  if not path.exists():
    raise NotFound(f'No config file {path}.')
  spec = importlib.util.spec_from_file_location(f'configs.{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


NONFINITE = ('stop', 'skip')
EXPORT_DTYPES = ('float32', 'bfloat16', 'float16')


def check_run_config(config) -> None:
  """Checks a training run's config before any expensive work: ranges, and the local paths it
  names; each error names its key. (Shapes against the devices: `check_batch_sizes`.)"""
  train, optim = config.train, config.optim
  positive = {'config.train.steps': train.steps, 'config.train.batch_size': train.batch_size,
              'config.train.seq_len': train.seq_len, 'config.train.log_every': train.log_every,
              'config.train.checkpoint_every': train.checkpoint_every,
              'config.train.keep_checkpoints': train.keep_checkpoints,
              'config.optim.lr': optim.lr, 'config.optim.grad_accum_steps':
              optim.grad_accum_steps}
  for key, value in positive.items():
    if not value > 0:
      raise InputError(f'{key}={value} must be > 0.')
  for key, value in {'config.train.eval_every': train.eval_every,
                     'config.train.eval_batches': train.eval_batches,
                     'config.optim.warmup_steps': optim.warmup_steps,
                     'config.optim.weight_decay': optim.weight_decay}.items():
    if value < 0:
      raise InputError(f'{key}={value} must be ≥ 0.')
  if train.nonfinite not in NONFINITE:
    raise InputError(f'config.train.nonfinite={train.nonfinite!r}; choose one of {NONFINITE}.')
  if train.export_dtype not in EXPORT_DTYPES:
    raise InputError(f'config.train.export_dtype={train.export_dtype!r}; choose one of '
                     f'{EXPORT_DTYPES}.')
  check_paths(config)


def reward_model_paths(spec: str) -> list[str]:
  """The directories of a `reward_model` entry: one, or several separated by commas (an
  ensemble); blanks around each are dropped."""
  return [path.strip() for path in spec.split(',') if path.strip()]


def check_paths(config) -> None:
  """Every model or tokenizer the config names is there: a local directory, a URL's directory
  (copied to this host now) or a Hub id (downloaded into the Hugging Face cache now), so that
  a missing one stops the run before anything else, naming its key (`models.sources`); the
  loaders then find each in place."""
  data = config.get('data', {})
  paths = [('config.model.hf_path', config.model.get('hf_path')),
           ('config.data.tokenizer', data.get('tokenizer'))]
  playground = data.get('playground', {})
  if playground.get('pairs') not in (None, 'corruptions', 'policy'):
    paths.append(('config.data.playground.pairs', playground.pairs))
  scheme, _, teacher = (playground.get('gold') or '').partition(':')
  if scheme == 'teacher' and teacher != 'random':
    paths.append(('config.data.playground.gold', teacher))
  for entry in ('rl', 'bon'):
    if entry in config:
      paths += [(f'config.{entry}.reward_model', path)
                for path in reward_model_paths(config[entry].get('reward_model') or '')]
  if 'rl' in config:
    paths.append(('config.rl.value_model', config.rl.get('value_model')))
  for key, path in paths:
    if path and path != 'playground':
      local_dir(path, key=key)


def check_batch_sizes(config, mesh) -> None:
  """Each global batch splits over the processes and the batch-sharded devices (data × fsdp),
  micro-batch by micro-batch."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  batches = {'config.train.batch_size': (config.train.batch_size,
                                         config.optim.grad_accum_steps)}
  if 'rl' in config and config.get('algorithm') in ('ppo', 'grpo', 'rloo'):
    batches = {'config.rl.rollout_batch_size': (config.rl.rollout_batch_size,
                                                config.rl.num_minibatches *
                                                config.optim.grad_accum_steps)}
  for key, (size, parts) in batches.items():
    if size % parts or (size // parts) % shards or size % jax.process_count():
      raise InputError(
          f'{key}={size} does not split into {parts} micro-batch(es) over the {shards} '
          f'batch-sharded devices (config.mesh data × fsdp) and {jax.process_count()} '
          f'process(es); choose a multiple of {parts * shards}.')
