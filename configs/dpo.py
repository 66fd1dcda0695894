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

from rlhf_jax.config import preference_run_config


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  return preference_run_config(
      preset, 'configs/dpo.py', algorithm='dpo', loss_type='sigmoid', label_smoothing=0.0,
      precompute_ref=False,
      alpha=0.0,  # rdpo: length regulariser α (Park 2024).
      gamma=0.5)  # simpo: target reward margin γ (Meng 2024).
