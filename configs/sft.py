"""Supervised fine-tuning on the built-in sorting task (no download needed).

  python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny
  python -m rlhf_jax.main --config=configs/sft.py:small --workdir=/tmp/sft_small \
      --config.optim.lr=1e-3 --config.mesh.fsdp=2

Presets: tiny (CPU, about a minute), small (~20M parameters), gpt2, llama-1b (accelerators).
"""

import ml_collections

from rlhf_jax.training.config import base_config, model_config_dict

PRESETS = {
    'tiny': dict(model='tiny', steps=300, batch_size=32, seq_len=32, lr=3e-3, max_items=12),
    'small': dict(model='small', steps=2000, batch_size=32, seq_len=512, lr=1e-3,
                  max_items=200),
    'gpt2': dict(model='gpt2', steps=5000, batch_size=64, seq_len=1024, lr=3e-4,
                 max_items=400),
    'llama-1b': dict(model='llama-1b', steps=5000, batch_size=128, seq_len=2048, lr=1e-4,
                     max_items=800),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'Unknown preset {preset!r} for configs/sft.py; choose from '
                     f'{sorted(PRESETS)}.')
  p = PRESETS[preset]
  c = base_config()
  c.algorithm = 'sft'
  c.model = model_config_dict(p['model'])
  c.train.steps = p['steps']
  c.train.batch_size = p['batch_size']
  c.train.seq_len = p['seq_len']
  c.train.eval_every = max(p['steps'] // 4, 1)
  c.train.checkpoint_every = max(p['steps'] // 4, 1)
  c.optim.lr = p['lr']
  c.optim.warmup_steps = max(p['steps'] // 20, 1)
  c.loss = ml_collections.ConfigDict({'normalize': 'token'})  # 'token' | 'sequence'
  c.data = ml_collections.ConfigDict({
      'name': 'sorting', 'min_items': 2, 'max_items': p['max_items'], 'seed': 0})
  return c
