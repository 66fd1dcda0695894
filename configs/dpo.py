"""DPO and its family on preference pairs, from an SFT model (the reference).

  python -m rlhf_jax.main --config=configs/dpo.py:tiny --workdir=runs/dpo \
      --config.model.hf_path=runs/sft/hf
  python -m rlhf_jax.main --config=configs/dpo.py:tiny --workdir=runs/simpo \
      --config.model.hf_path=runs/sft/hf --config.loss.loss_type=simpo --config.loss.beta=2.0
  python -m rlhf_jax.main --config=configs/dpo.py:tiny --workdir=runs/ipo \
      --config.model.hf_path=runs/sft/hf --config.loss.loss_type=ipo --config.loss.beta=0.5

loss_type: sigmoid (DPO; label_smoothing = cDPO), robust, ipo, hinge, simpo, length_normalized,
rdpo, orpo (rlhf_jax/losses/dpo.py). `--config.loss.precompute_ref=True` computes the
reference log-probs once, before training, instead of keeping the reference on the mesh. The
eval reports the gold reward of sampled answers, the gold win rate against the reference's
answers and the KL to the reference, at step 0 and after. Playground pairs are two samples of
the SFT model per prompt (pairs with the same answer twice are left out), labelled by the
simulated labelers; `--config.data.playground.pairs=corruptions` uses graded corruptions of
the best answer instead.
"""

import ml_collections

from rlhf_jax.config import data_config, preset_config, sample_eval_config

PRESETS = {
    'tiny': dict(model='playground', steps=300, batch_size=32, seq_len=48, lr=3e-5, beta=0.3),
    'small': dict(model='small', steps=2000, batch_size=64, seq_len=512, lr=5e-6, beta=0.1),
    'llama-1b': dict(model='llama-1b', steps=2000, batch_size=128, seq_len=2048, lr=5e-7,
                     beta=0.1),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  c = preset_config(PRESETS, preset, 'configs/dpo.py')
  c.algorithm = 'dpo'
  c.train.eval_at_start = True
  c.train.export_hf = True
  c.optim.weight_decay = 0.0
  c.loss = ml_collections.ConfigDict({
      'loss_type': 'sigmoid',
      'beta': PRESETS[preset]['beta'],
      'label_smoothing': 0.0,
      'precompute_ref': False,
      'alpha': 0.0,  # rdpo: length regulariser α (Park 2024).
      'gamma': 0.5,  # simpo: target reward margin γ (Meng 2024).
  })
  c.data = data_config({'pairs': 'playground:preference'})
  # As in the DPO paper: pairs are two samples of the SFT model, labelled by the labelers.
  c.data.playground.pairs = 'policy'
  c.data.playground.train_size = 12000
  c.eval = sample_eval_config(num_prompts=512)
  return c
