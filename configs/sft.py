"""Supervised fine-tuning: the playground's instruction tasks, a JSONL/TFDS dataset, or sorting.

  python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=runs/sft
  python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=runs/sft \
      --config.model.hf_path=runs/pretrain/hf          # start from the pretrained base model
  python -m rlhf_jax.main --config=configs/sft.py:small --workdir=runs/sft_small \
      --config.data.sources.sft=jsonl:/data/sft-{split}.jsonl --config.data.tokenizer=/tok

Presets: tiny (the playground on a CPU, minutes), mix (tiny + 25 % pretraining text, switched
to pure SFT at the decay stage: "midtraining"), sorting (token-level sorting, no tokenizer; the
fastest smoke run), small (~20M), gpt2, llama-1b (accelerators). The eval reports held-out
response loss and, on playground prompts, the gold reward of sampled answers
(eval/samples/gold_reward), before training (step 0) and after.
"""

import ml_collections

from rlhf_jax.config import data_config, pod_presets, preset_config, sample_eval_config

PRESETS = {
    'tiny': dict(model='playground', steps=600, batch_size=32, seq_len=48, lr=2e-3),
    'mix': dict(model='playground', steps=600, batch_size=32, seq_len=48, lr=2e-3),
    'sorting': dict(model='tiny', steps=300, batch_size=32, seq_len=32, lr=3e-3),
    'small': dict(model='small', steps=2000, batch_size=32, seq_len=512, lr=1e-3),
    'gpt2': dict(model='gpt2', steps=5000, batch_size=64, seq_len=1024, lr=3e-4),
    'llama-1b': dict(model='llama-1b', steps=5000, batch_size=128, seq_len=2048, lr=1e-4),
    **pod_presets(sequences_per_chip=2, steps=2000, seq_len=4096, lr=1e-5),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  c = preset_config(PRESETS, preset, 'configs/sft.py')
  c.algorithm = 'sft'
  c.loss = ml_collections.ConfigDict({'normalize': 'token'})  # 'token' | 'sequence'
  if preset == 'sorting':
    c.data = ml_collections.ConfigDict({'name': 'sorting', 'min_items': 2, 'max_items': 12,
                                        'seed': 0})
    c.eval = sample_eval_config(gold='')
    return c
  c.data = data_config({'sft': 'playground:sft'})
  if preset == 'mix':
    c.data = data_config({'sft': 'playground:sft', 'text': 'playground:text'})
    c.data.weights = {'sft': 3.0, 'text': 1.0}
    c.data.decay_weights = {'sft': 1.0, 'text': 0.0}
    c.optim.schedule = 'warmup_stable_decay'
  c.train.eval_at_start = True
  c.train.export_hf = True
  # kl_to_initial: the evaluations also measure KL and win rate against the initial model (a
  # frozen copy kept on the mesh), as DPO's and RL's do against their reference.
  c.eval = sample_eval_config(kl_to_initial=False)
  return c
