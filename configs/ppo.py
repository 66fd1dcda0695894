"""PPO with GAE against a reward model, from an SFT policy (InstructGPT's step 3).

  python -m rlhf_jax.main --config=configs/ppo.py:tiny --workdir=runs/ppo \
      --config.model.hf_path=runs/sft/hf --config.rl.reward_model=runs/rm/hf

Options (config.rl, rlhf_jax/config.py:rl_config): `reward_model` may list several
directories separated by commas, an ensemble aggregated by `reward_aggregation` (mean, min,
uncertainty); `reward_fns` adds Python reward functions (or replaces the model: set
`reward_model=` and a `'head'` critic); the critic is a copy of the (first) reward model (`critic='model'`) or a value
head on the policy (`'head'`); β = kl_coef, fixed or adaptive (`adaptive_kl`, `kl_target`);
`kl_coef=0` for the overoptimization regime; `stop_kl`, a KL budget, ends the run at the first
evaluation that measures that KL to the initial policy. Each iteration logs
objective/{scores,kl,entropy,rlhf_reward,gold} (and ensemble_std, the members' disagreement;
function_scores, the reward functions' sum),
policy/{approxkl,clipfrac}, loss/{policy,value} (the progress bar: rollout / scoring / update
seconds); evaluations add gold and proxy reward, win rate and KL to the SFT policy on held-out
prompts.
"""

import ml_collections

from rlhf_jax.config import pod_presets, rl_run_config

PRESETS = {
    # steps: iterations (a rollout, then ppo_epochs × num_minibatches updates); batch_size:
    # responses per rollout.
    'tiny': dict(model='playground', steps=60, batch_size=128, seq_len=56, lr=3e-5),
    'small': dict(model='small', steps=500, batch_size=64, seq_len=512, lr=3e-6),
    'llama-1b': dict(model='llama-1b', steps=500, batch_size=128, seq_len=1024, lr=1e-6),
    **pod_presets(sequences_per_chip=8, steps=500, seq_len=2048, lr=1e-6),
}


# On the playground, 8 updates per rollout of 128 and β = 0.2 keep the tiny policy near the
# reward model's data; with 16 updates per rollout of 64 or lr 1e-4 it drifts to KL > 1 within
# ten iterations and the gold reward falls.
RL = {'tiny': dict(num_minibatches=4, ppo_epochs=2, kl_coef=0.2)}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  return rl_run_config(PRESETS, preset, 'configs/ppo.py', **RL.get(preset, {}))
