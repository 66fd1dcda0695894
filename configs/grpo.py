"""GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024): online RL without a critic.

  python -m rlhf_jax.main --config=configs/grpo.py:tiny --workdir=runs/grpo \
      --config.model.hf_path=runs/sft/hf --config.rl.reward_model=runs/rm/hf
  python -m rlhf_jax.main --config=configs/grpo.py:rloo-tiny --workdir=runs/rloo ...

G samples per prompt; a sample's advantage is its reward against the group's: (R − mean) / std
for GRPO, R minus the mean of the other G − 1 for RLOO. Both reuse PPO's rollout and clipped
loss. GRPO keeps the KL out of the reward and adds β · KL_k3(π ‖ π_ref) to the loss; RLOO
subtracts β · Σ_t KL_t from the reward, as PPO does.
"""

import ml_collections

from rlhf_jax.config import pod_presets, rl_run_config

PRESETS = {
    # 16 prompts × G = 8 samples per rollout.
    'tiny': dict(model='playground', steps=60, batch_size=128, seq_len=56, lr=3e-5),
    'rloo-tiny': dict(model='playground', steps=60, batch_size=128, seq_len=56, lr=3e-5),
    'small': dict(model='small', steps=500, batch_size=64, seq_len=512, lr=3e-6),
    **pod_presets(sequences_per_chip=8, steps=500, seq_len=2048, lr=1e-6),
}
ALGORITHMS = {'tiny': 'grpo', 'rloo-tiny': 'rloo', 'small': 'grpo'}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  algorithm = ALGORITHMS.get(preset, 'grpo')
  if algorithm == 'rloo':
    rl = dict(kl_coef=0.05, kl_in_loss=False)
  else:
    rl = dict(kl_coef=0.04, kl_in_loss=True, whiten_advantages=False)
  return rl_run_config(PRESETS, preset, 'configs/grpo.py', algorithm=algorithm,
                       critic='none', group_size=8, num_minibatches=2, **rl)
