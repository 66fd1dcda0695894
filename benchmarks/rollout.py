"""Rollout throughput: generated tokens/s of our jitted KV-cache sampler vs transformers.

  python benchmarks/rollout.py                              # `small` preset, this CPU
  python benchmarks/rollout.py --preset=playground --batch_size=64 --new_tokens=24

The same randomly initialised model (our parameters, exported with `save_hf`) generates
`new_tokens` tokens for `batch_size` prompts of `prompt_len` tokens, by sampling at
temperature 1 with no early stop, once with `rlhf_jax.sampling` (prefill, then a
`lax.while_loop` over tokens, compiled once) and once with transformers' PyTorch `generate()`
(with its KV cache) in the same process on the same CPU threads. Needs the test extras (torch).
The last line printed is one JSON object for scripts.
"""

import argparse
import json
import tempfile

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from rlhf_jax.models import Transformer, save_hf
from rlhf_jax.models.presets import get_preset
from rlhf_jax.sampling import make_sampler
from train_step import time_fn  # Same folder: the benchmarks' one timer.


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--prompt_len', type=int, default=64)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  config = get_preset(args.preset)
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  prompts = np.random.default_rng(0).integers(1, config.vocab_size,
                                              (args.batch_size, args.prompt_len))
  mask = np.ones_like(prompts)
  # eos_id -1: no token ends a row, so both generate exactly new_tokens tokens.
  sampler = make_sampler(graphdef, max_new_tokens=args.new_tokens, eos_id=-1, pad_id=0)
  ours = time_fn(lambda: sampler(params, prompts, mask, jax.random.key(0)).tokens_BxN,
                 repeats=args.repeats)

  with tempfile.TemporaryDirectory() as directory:
    save_hf(model, directory)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  hf_prompts = torch.as_tensor(prompts)

  def hf_generate():
    with torch.no_grad():
      hf_model.generate(hf_prompts, attention_mask=torch.ones_like(hf_prompts),
                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                        pad_token_id=0)
  theirs = time_fn(hf_generate, repeats=args.repeats)

  generated = args.batch_size * args.new_tokens
  result = {'ours_tokens_per_s': generated / ours, 'transformers_tokens_per_s': generated / theirs,
            'speedup': theirs / ours, 'preset': args.preset, 'batch_size': args.batch_size,
            'prompt_len': args.prompt_len, 'new_tokens': args.new_tokens,
            'params_m': config.num_params() / 1e6,
            'device': f'{jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}'}
  print(f'{args.preset} ({result["params_m"]:.1f}M params), {args.batch_size} prompts x '
        f'{args.prompt_len} tokens, {args.new_tokens} new tokens each, {result["device"]}')
  print(f'  rlhf_jax sampler      {result["ours_tokens_per_s"]:10.0f} generated tokens/s')
  print(f'  transformers generate {result["transformers_tokens_per_s"]:10.0f} generated tokens/s')
  print(f'  ratio                 {result["speedup"]:10.2f} x')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
