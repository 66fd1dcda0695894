"""Pretraining from scratch on the playground's generated corpus (or any JSONL/TFDS text).

  python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain

The same loss as SFT with every token a target. The final model is exported to
<workdir>/hf (with its tokenizer) for `configs/sft.py --config.model.hf_path=...`.
"""

import ml_collections

from rlhf_jax.config import data_config, preset_config, sample_eval_config

PRESETS = {
    'tiny': dict(model='playground', steps=800, batch_size=32, seq_len=48, lr=2e-3),
    'small': dict(model='small', steps=5000, batch_size=64, seq_len=512, lr=1e-3),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  c = preset_config(PRESETS, preset, 'configs/pretrain.py')
  c.algorithm = 'sft'
  c.train.export_hf = True
  c.loss = ml_collections.ConfigDict({'normalize': 'token'})
  c.data = data_config({'text': 'playground:text'})
  c.data.packing = True
  c.data.playground.train_size = 50000
  c.eval = sample_eval_config(gold='')
  return c
