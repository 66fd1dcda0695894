"""KTO on unpaired desirable / undesirable examples, from an SFT model (the reference).

  python -m rlhf_jax.main --config=configs/kto.py:tiny --workdir=runs/kto \
      --config.model.hf_path=runs/sft/hf
  python -m rlhf_jax.main --config=configs/kto.py:tiny --workdir=runs/kto_file \
      --config.model.hf_path=runs/sft/hf --config.data.sources="{'kto': 'jsonl:kto.jsonl'}" \
      --config.data.weights="{'kto': 1.0}"

Data: TRL's unpaired form, {"prompt", "completion", "label": true | false}, or preference pairs,
each read as its chosen (desirable) and rejected (undesirable) answer; on the playground, the
same pairs as DPO's (two samples of the SFT model per prompt, labelled by the simulated
labelers), so KTO and DPO can be compared on one dataset. loss_type: kto (Ethayarajh 2024) or
apo_zero_unpaired (rlhf_jax/losses/kto.py). The paper advises desirable_weight ·
n_desirable / (undesirable_weight · n_undesirable) in [1, 4/3].
"""

import ml_collections

from rlhf_jax.config import preference_run_config


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  return preference_run_config(preset, 'configs/kto.py', algorithm='kto', loss_type='kto',
                               desirable_weight=1.0,  # λ_D
                               undesirable_weight=1.0)  # λ_U
