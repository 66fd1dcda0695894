"""Pretrain → SFT → reward model on the synthetic playground, from scratch, in one command.

  python experiments/playground_pipeline.py --workdir=runs/playground

Each stage is the same run a user starts by hand (`configs/pretrain.py`, `configs/sft.py`,
`configs/rm.py`, preset `--preset`), in `<workdir>/<stage>`, started from the previous stage's
`hf` export. Rerunning resumes or skips finished stages. At the end it prints and writes
`<workdir>/summary.json`:
  - SFT: held-out response loss and gold reward of sampled answers, base model vs SFT model;
  - RM: held-out accuracy against the labelers' ceiling, agreement with the gold reward, ECE.
"""

import importlib.util
import json
import os
import pathlib
import time

from absl import app, flags, logging

from rlhf_jax import algorithms
from rlhf_jax.engine.metrics import read_metrics

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
STAGES = (('pretrain', 'pretrain.py', None), ('sft', 'sft.py', 'pretrain'),
          ('rm', 'rm.py', 'sft'))

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where every stage writes its run.')
_PRESET = flags.DEFINE_string('preset', 'tiny', 'Preset of every stage.')
_PROGRESS = flags.DEFINE_bool('progress_bar', True, 'Show each stage\'s progress bar.')


def load_config(file_name: str, preset: str):
  spec = importlib.util.spec_from_file_location(file_name[:-3], CONFIGS / file_name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def run_stage(name: str, file_name: str, parent: str | None, workdir: str) -> float:
  """Trains one stage (resuming if it was cut short); returns its wall time in seconds."""
  config = load_config(file_name, _PRESET.value)
  if parent:
    config.model.hf_path = os.path.join(workdir, parent, 'hf')
  config.train.progress_bar = _PROGRESS.value
  stage_dir = os.path.join(workdir, name)
  start = time.perf_counter()
  algorithms.run(config, stage_dir)
  return time.perf_counter() - start


def first_and_last(path: str, key: str) -> tuple[float, float]:
  values = [record[key] for record in read_metrics(path) if key in record]
  return values[0], values[-1]


def summarize(workdir: str, wall_s: dict[str, float]) -> dict:
  sft, rm = (os.path.join(workdir, stage, 'metrics.jsonl') for stage in ('sft', 'rm'))
  loss = first_and_last(sft, 'eval/loss')
  gold = first_and_last(sft, 'eval/samples/gold_reward')
  last_rm = [r for r in read_metrics(rm) if 'eval/pairs/accuracy' in r][-1]
  return {
      'wall_s': wall_s,
      'sft': {'response_loss_base': loss[0], 'response_loss_sft': loss[1],
              'gold_reward_base': gold[0], 'gold_reward_sft': gold[1]},
      'rm': {key: last_rm[f'eval/pairs/{key}'] for key in
             ('accuracy', 'labeler_ceiling', 'gold_agreement', 'ece')},
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  wall_s = {name: run_stage(name, file_name, parent, workdir)
            for name, file_name, parent in STAGES}
  summary = summarize(workdir, wall_s)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  s, r = summary['sft'], summary['rm']
  print(f'SFT  held-out response loss  base {s["response_loss_base"]:.3f} -> '
        f'SFT {s["response_loss_sft"]:.3f}')
  print(f'SFT  gold reward of samples  base {s["gold_reward_base"]:.3f} -> '
        f'SFT {s["gold_reward_sft"]:.3f}')
  print(f'RM   held-out accuracy {r["accuracy"]:.3f} (labelers\' ceiling '
        f'{r["labeler_ceiling"]:.3f}), gold agreement {r["gold_agreement"]:.3f}, '
        f'ECE {r["ece"]:.3f}')
  print('wall time: ' + ', '.join(f'{k} {v:.0f} s' for k, v in wall_s.items()))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
