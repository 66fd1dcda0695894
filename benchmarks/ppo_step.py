"""PPO iteration time, split into rollout / scoring / update, and the rollout vs transformers.

  python benchmarks/ppo_step.py                             # `small` preset, this CPU
  python benchmarks/ppo_step.py --preset=playground --batch_size=64 --new_tokens=24

A randomly initialised policy (LM head) and reward model (scalar head) of one preset, exported
with `save_hf`, are loaded the way a PPO run loads them (`rlhf_jax.algorithms.rl.learner`; GAE, the
critic a copy of the reward model, `rl_run_config`'s defaults) and run its iterations on
playground prompts: rollout (`Rollout.sample`: `batch_size` responses of up to `new_tokens`
tokens after `data.max_prompt_len` prompt tokens), scoring (`Rollout.score`: log-probs, values,
reference log-probs, rewards, GAE) and update (the engine's `update`: ppo_epochs ×
num_minibatches train steps). Each phase's time is the mean (and the best) over `repeats` iterations after one
that compiles; on a shared CPU the best is the steadier figure.
In every iteration transformers' PyTorch `generate()` (with its KV cache) of the exported policy
samples the same number of tokens from the same left-padded prompts (temperature 1, no EOS
stop) in the same process, with torch's default number of threads and with one (where other
processes load the CPU, torch's threads can wait on each other many times longer than they
compute); the ratio is against the faster. Our tokens/s counts the tokens sampled up to and
including EOS (the response mask); a random policy rarely ends a row. Needs the test extras
(torch).
The last line printed is one JSON object for scripts.
"""

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from rlhf_jax.models import Transformer, save_hf
from rlhf_jax.models.presets import get_preset
from rlhf_jax.config import data_config, rl_run_config
from rlhf_jax.algorithms.rl import learner
from rlhf_jax.context import RunContext
from rlhf_jax.engine.loop import Engine

PHASES = ('rollout', 'scoring', 'update')


def timed(fn, *args, **kwargs):
  """(fn's result, blocked on, and its wall time in seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def ppo_config(args, workdir: str):
  """configs/ppo.py's config for a model preset, loading the exported models in `workdir`."""
  seq_len = data_config({}).max_prompt_len + args.new_tokens  # rl.max_new_tokens = new_tokens.
  presets = {args.preset: dict(model=args.preset, steps=args.repeats + 1,
                               batch_size=args.batch_size, seq_len=seq_len, lr=1e-6)}
  config = rl_run_config(presets, args.preset, 'benchmarks/ppo_step.py')
  config.model.hf_path = os.path.join(workdir, 'policy')
  config.rl.reward_model = os.path.join(workdir, 'reward')
  config.rl.num_prompts = args.batch_size * (args.repeats + 1)
  config.data.tokenizer = 'playground'  # An SFT export's own; built into workdir/data.
  config.eval.gold = ''
  config.train.progress_bar = False
  return config


def benchmark(args, workdir: str) -> dict:
  """The figures of the module docstring, in seconds and tokens/s."""
  model_config = get_preset(args.preset)
  save_hf(Transformer(model_config, rngs=nnx.Rngs(0)), os.path.join(workdir, 'policy'))
  save_hf(Transformer(model_config.replace(head='scalar'), rngs=nnx.Rngs(1)),
          os.path.join(workdir, 'reward'))
  config = ppo_config(args, workdir)
  rl = config.rl
  ctx = RunContext(config, workdir)
  engine = Engine(ctx, learner.make_algorithm(ctx))  # As a run builds it; no loop around it.
  updates = rl.ppo_epochs * rl.num_minibatches
  tokenizer = ctx.tokenizer

  hf_policy = transformers.AutoModelForCausalLM.from_pretrained(config.model.hf_path).eval()

  def hf_generate(samples):  # min_new_tokens: no row ends before max_new_tokens.
    prompts, mask = (torch.from_numpy(np.array(samples[k])) for k in ('prompt_tokens',
                                                                         'prompt_mask'))
    with torch.no_grad():
      hf_policy.generate(prompts, attention_mask=mask, do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=rl.max_new_tokens,
                         min_new_tokens=rl.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)

  default_threads = torch.get_num_threads()
  thread_counts = sorted({1, default_threads})
  hf_phases = tuple(f'transformers_{n}_threads' for n in thread_counts)
  times = {phase: [] for phase in PHASES + hf_phases}
  response_tokens = []
  for iteration in range(args.repeats + 1):  # Iteration 0 compiles.
    metrics = jax.device_get(engine.update(iteration))
    samples = engine.batches.last_samples
    iteration_times = [metrics[f'time/{phase}'] for phase in PHASES]
    for n in thread_counts:
      torch.set_num_threads(n)
      iteration_times.append(timed(hf_generate, samples)[1])
    torch.set_num_threads(default_threads)
    if iteration:
      for phase, t in zip(times, iteration_times):
        times[phase].append(t)
      response_tokens.append(int(np.asarray(samples['response_mask']).sum()))

  mean = {phase: float(np.mean(t)) for phase, t in times.items()}
  best = {phase: min(t) for phase, t in times.items()}
  ours_tokens, hf_tokens = float(np.mean(response_tokens)), args.batch_size * rl.max_new_tokens
  hf_fastest = min(hf_phases, key=mean.get)
  return {
      **{f'{phase}_s': t for phase, t in mean.items()},
      **{f'{phase}_best_s': t for phase, t in best.items()},
      'iteration_s': sum(mean[phase] for phase in PHASES),
      'ours_tokens_per_s': ours_tokens / mean['rollout'],
      **{f'{phase}_tokens_per_s': hf_tokens / mean[phase] for phase in hf_phases},
      'transformers_tokens_per_s': hf_tokens / mean[hf_fastest],
      'transformers_fastest': hf_fastest, 'torch_threads': thread_counts,
      'speedup': (ours_tokens / mean['rollout']) / (hf_tokens / mean[hf_fastest]),
      'speedup_best': (ours_tokens / best['rollout']) / (
          hf_tokens / min(best[phase] for phase in hf_phases)),
      'response_tokens': ours_tokens,
      'preset': args.preset, 'batch_size': args.batch_size,
      'prompt_len': config.data.max_prompt_len, 'new_tokens': rl.max_new_tokens,
      'updates': updates, 'repeats': args.repeats,
      'params_m': model_config.num_params() / 1e6,
      'device': f'{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs',
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--batch_size', type=int, default=16, help='Responses per rollout.')
  parser.add_argument('--new_tokens', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3, help='Timed iterations after warm-up.')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    r = benchmark(args, workdir)
  print(f'PPO iteration, {r["preset"]} ({r["params_m"]:.1f}M params), {r["batch_size"]} '
        f'prompts x {r["prompt_len"]} tokens, up to {r["new_tokens"]} new tokens each, then '
        f'{r["updates"]} minibatch updates; {r["device"]}; {r["repeats"]} iterations after a '
        'warm-up')
  print(f'  {"":<22}{"mean":>10}   {"share":>6}   {"best":>8}')
  for phase in PHASES:
    seconds = r[f'{phase}_s']
    print(f'  {phase:<22}{seconds:10.3f} s {100 * seconds / r["iteration_s"]:6.1f} % '
          f'{r[f"{phase}_best_s"]:8.3f} s')
  print(f'  {"iteration":<22}{r["iteration_s"]:10.3f} s')
  print(f'  rollout (ours)        {r["ours_tokens_per_s"]:10.0f} generated tokens/s '
        f'({r["response_tokens"]:.0f} of {r["batch_size"] * r["new_tokens"]} in the mask)')
  for n in r['torch_threads']:
    phase = f'transformers_{n}_threads'
    print(f'  {f"transformers, {n} thr.":<22}{r[f"{phase}_tokens_per_s"]:10.0f} generated '
          f'tokens/s ({r[f"{phase}_s"]:.3f} s)')
  print(f'  ratio ours / fastest  {r["speedup"]:10.2f} x   (of the best times: '
        f'{r["speedup_best"]:.2f} x)')
  print(json.dumps(r))


if __name__ == '__main__':
  main()
