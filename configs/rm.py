"""Bradley-Terry reward model on preference pairs (playground labelers, JSONL or TFDS).

  python -m rlhf_jax.main --config=configs/rm.py:tiny --workdir=runs/rm \
      --config.model.hf_path=runs/sft/hf        # backbone from the SFT model, head from zero
  python -m rlhf_jax.main --config=configs/rm.py:tiny --workdir=runs/rm_noisy \
      --config.data.playground.label_temperature=0.3 --config.data.playground.length_bias=0.05

Without hf_path the model starts from scratch. The playground's pairs are labelled by
simulated labelers (Bradley-Terry on the gold reward with temperature T and a length bias);
the eval reports held-out accuracy, the labelers' own ceiling, agreement with the gold reward
and calibration (ECE, reliability diagram under <workdir>/plots).
"""

import ml_collections

from rlhf_jax.config import data_config, pod_presets, preset_config

PRESETS = {
    'tiny': dict(model='playground', steps=400, batch_size=32, seq_len=48, lr=1e-3),
    'small': dict(model='small', steps=2000, batch_size=64, seq_len=512, lr=3e-4),
    'llama-1b': dict(model='llama-1b', steps=2000, batch_size=128, seq_len=2048, lr=1e-5),
    # Pairs: 2 sequences of seq_len each.
    **pod_presets(sequences_per_chip=1, steps=2000, seq_len=2048, lr=5e-6),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  c = preset_config(PRESETS, preset, 'configs/rm.py', head='scalar')
  c.algorithm = 'rm'
  c.train.eval_at_start = True
  c.train.export_hf = True
  c.loss = ml_collections.ConfigDict({'center_coef': 0.0})  # Eisenstein 2023: try 0.01.
  c.data = data_config({'pairs': 'playground:preference'})
  c.eval = ml_collections.ConfigDict({'gold': 'playground'})  # '' for data with no gold.
  return c
