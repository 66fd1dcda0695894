"""Train-step throughput and MFU of the generic step, on whatever device JAX sees.

  python benchmarks/train_step.py                       # SFT step, ~20M model, seq 512, this CPU
  python benchmarks/train_step.py --algorithm=rm        # reward-model step: [B, 2, T] pairs
  python benchmarks/train_step.py --algorithm=dpo       # DPO step with the reference on the mesh
  python benchmarks/train_step.py --preset=gpt2 --batch_size=16 --dtype=bfloat16   # a GPU
  python benchmarks/train_step.py --preset=llama-1b --seq_len=2048 --dtype=bfloat16 \
      --remat --attention=cudnn                         # an NVIDIA GPU: cuDNN flash attention

The SFT step is next-token cross-entropy through the chunked log-probs; the RM step is the
Bradley-Terry loss on chosen and rejected sequences in one [2B, T] forward (tokens counted over
both), with the scalar head; the DPO step is the same pairs through the policy (forward and
backward) and a frozen reference (forward only: 2·N + 4·L·T·H·Dh more FLOPs per token, so the
model FLOPs are 4/3 of a training step's).

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token are PaLM's 6·N + 12·L·T·H·Dh
(`ModelConfig.flops_per_token`, no credit for rematerialisation). Peak is measured here, in the
same run on the same device: the best of several large square matmuls in the step's dtype.
The last line printed is one JSON object for scripts.
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import parallel
from rlhf_jax.playground.sorting import SortingTask
from rlhf_jax.models import Transformer
from rlhf_jax.models.presets import get_preset
from rlhf_jax.algorithms import dpo, rm, sft
from rlhf_jax.config import base_config
from rlhf_jax.engine.optimizer import make_optimizer
from rlhf_jax.engine.state import init_train_state, train_state_shardings
from rlhf_jax.engine.step import make_train_step


def time_fn(fn, *args, repeats: int) -> float:
  """Best wall time of `repeats` calls, after one call that compiles."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def peak_matmul_flops(n: int, dtype, repeats: int = 5) -> float:
  """FLOP/s of an n×n by n×n matmul (2n³ FLOPs), the device's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
  return 2 * n**3 / time_fn(matmul, a, b, repeats=repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--algorithm', choices=('sft', 'rm', 'dpo'), default='sft')
  parser.add_argument('--preset', default='small', help='Model preset (rlhf_jax.models.presets).')
  parser.add_argument('--seq_len', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5, help='Timed steps after warm-up.')
  parser.add_argument('--dtype', default='float32', help='Compute dtype (params stay f32).')
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--attention', default='auto',
                      help="config.model.attention: dense, chunked, splash, cudnn or auto.")
  parser.add_argument('--chunk_size', type=int, default=512, help='Log-prob sequence chunk.')
  parser.add_argument('--matmul_size', type=int, default=4096)
  args = parser.parse_args()

  head = 'scalar' if args.algorithm == 'rm' else 'lm'
  model_config = get_preset(args.preset).replace(dtype=args.dtype, remat=args.remat, head=head,
                                                 attention=args.attention)
  config = base_config()
  mesh = parallel.make_mesh({'data': -1})
  rules = config.sharding_rules
  graphdef, params, param_shardings = parallel.create_sharded(
      lambda: Transformer(model_config, rngs=nnx.Rngs(0)), mesh, rules)
  optimizer, schedule = make_optimizer(config.optim, total_steps=1000)
  state_shardings = train_state_shardings(param_shardings, optimizer, params, mesh)
  state = init_train_state(params, optimizer, 0, state_shardings)

  data = SortingTask(seq_len=args.seq_len, vocab_size=model_config.vocab_size, min_items=2,
                     max_items=(args.seq_len - 3) // 2, seed=0)
  host_batch = data.batch('train', 0, range(args.batch_size))
  host_batch['loss_mask'] = host_batch['attention_mask'] = np.ones_like(host_batch['tokens'])
  frozen = frozen_shardings = None
  flops_per_token = model_config.flops_per_token(args.seq_len)
  if args.algorithm in ('rm', 'dpo'):  # Pairs: this batch as chosen, the next as rejected.
    rejected = data.batch('train', 1, range(args.batch_size))['tokens']
    host_batch = {k: np.stack([v, rejected if k == 'tokens' else v], axis=1)
                  for k, v in host_batch.items()}
  if args.algorithm == 'rm':
    loss_fn = functools.partial(rm.rm_loss_fn, center_coef=0.0)
  elif args.algorithm == 'dpo':
    loss_fn = functools.partial(dpo.dpo_loss_fn, chunk_size=args.chunk_size,
                                loss_options=dict(beta=0.1, loss_type='sigmoid'))
    frozen, frozen_shardings = jax.tree.map(jnp.copy, state.params), param_shardings
    flops_per_token *= 4 / 3  # The reference's forward pass: a third of a training step.
  else:
    loss_fn = functools.partial(sft.sft_loss_fn, normalize='token', chunk_size=args.chunk_size)
  batch = parallel.shard_batch(host_batch, mesh, rules)
  batch_shardings = {k: v.sharding for k, v in batch.items()}
  train_step = make_train_step(loss_fn, optimizer, graphdef, state_shardings=state_shardings,
                               batch_shardings=batch_shardings,
                               frozen_shardings=frozen_shardings, schedule=schedule)

  state, _ = train_step(state, batch, frozen)  # Compile.
  jax.block_until_ready(state)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batch, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_time = float(np.median(times))

  tokens_per_s = host_batch['tokens'].size / step_time
  model_flops = flops_per_token * tokens_per_s
  peak = peak_matmul_flops(args.matmul_size, jnp.dtype(args.dtype))
  result = {
      'tokens_per_s': tokens_per_s,
      'model_tflops': model_flops / 1e12,
      'peak_tflops': peak / 1e12,
      'mfu': model_flops / peak,
      'step_time_s': step_time,
      'params_m': model_config.num_params() / 1e6,
      'algorithm': args.algorithm,
      'preset': args.preset,
      'seq_len': args.seq_len,
      'batch_size': args.batch_size,
      'dtype': args.dtype,
      'device': f'{jax.devices()[0].device_kind} x{jax.device_count()}',
  }
  pairs = ' pairs' if args.algorithm in ('rm', 'dpo') else ''
  print(f'{args.algorithm} step, {args.preset} ({result["params_m"]:.1f}M params), batch '
        f'{args.batch_size}{pairs} x {args.seq_len} tokens, {args.dtype}, {result["device"]}')
  print(f'  step time    {step_time * 1e3:10.1f} ms (median of {args.steps})')
  print(f'  throughput   {tokens_per_s:10.0f} tokens/s')
  print(f'  model        {model_flops / 1e12:10.4f} TFLOP/s')
  print(f'  peak matmul  {peak / 1e12:10.4f} TFLOP/s ({args.matmul_size}² {args.dtype})')
  print(f'  MFU          {100 * model_flops / peak:10.1f} %')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
