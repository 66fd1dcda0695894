"""Best-of-n: a policy's n answers per prompt, the best under a reward model, judged by gold.

  python -m rlhf_jax.main --config=configs/bon.py:tiny --workdir=runs/bon \
      --config.model.hf_path=runs/sft150/hf --config.bon.reward_model=runs/rm/hf

Writes <workdir>/best_of_n.jsonl (per n = 1, 2, 4, …, n_max: KL_bon = log n − (n−1)/n, the
expected proxy and gold rewards of the chosen answer) and best_of_n.png.
"""

import ml_collections

from rlhf_jax.config import data_config, preset_config, sample_eval_config

PRESETS = {
    'tiny': dict(model='playground', steps=0, batch_size=32, seq_len=48, lr=0.0),
    'small': dict(model='small', steps=0, batch_size=64, seq_len=512, lr=0.0),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  c = preset_config(PRESETS, preset, 'configs/bon.py')
  c.procedure = 'best_of_n'  # An evaluation: nothing is trained.
  c.data = data_config({})
  c.eval = sample_eval_config()
  # reward_model: an HF directory, or several separated by commas (an ensemble, aggregated as
  # config.rl's are: rlhf_jax.config.rl_config); reward_fns: Python reward functions added to
  # it, or alone (as config.rl's).
  c.bon = ml_collections.ConfigDict({'reward_model': '', 'reward_fns': (),
                                     'reward_fn_weights': (), 'reward_aggregation': 'mean',
                                     'uncertainty_weight': 0.5, 'n_max': 16,
                                     'num_prompts': 256})
  return c
