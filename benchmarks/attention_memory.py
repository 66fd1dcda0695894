"""Memory of attention's gradient, dense against chunked, at long sequence lengths.

  python benchmarks/attention_memory.py [--length=8192] [--heads=8] [--head_dim=64]
      [--budget_gib=4]

Compiles the gradient of sum(attention(q, k, v)²) for one causal row of `length` tokens with
'dense' and 'chunked' attention (`rlhf_jax.models.attention`) and prints XLA's temporaries for
each (`memory_analysis`, GiB) against the budget; then runs every implementation that fits the
budget once (seconds), and checks at T = 512 that chunked equals dense to 1e-5 (forward and
gradients). The last line is JSON.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.attention import AttentionMask, attend
from rlhf_jax.models.layers import positions_from_mask

GIB = 2**30


def inputs(length: int, heads: int, head_dim: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((1, length, heads, head_dim)), jnp.float32)
             for _ in range(3))
  valid = jnp.ones((1, length), jnp.bool_)
  return q, k, v, positions_from_mask(valid), valid


def gradient(implementation: str):
  def loss(q, k, v, positions, valid):
    mask = AttentionMask(positions, positions, valid)
    return jnp.sum(attend(q, k, v, mask, implementation=implementation) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--length', type=int, default=8192)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--budget_gib', type=float, default=4.0)
  args = parser.parse_args()
  long = inputs(args.length, args.heads, args.head_dim)
  result = {'length': args.length, 'budget_gib': args.budget_gib}
  for implementation in ('dense', 'chunked'):
    compiled = gradient(implementation).lower(*long).compile()
    temp_gib = compiled.memory_analysis().temp_size_in_bytes / GIB
    fits = temp_gib <= args.budget_gib
    seconds = None
    if fits:
      start = time.perf_counter()
      jax.block_until_ready(compiled(*long))
      seconds = time.perf_counter() - start
    result[implementation] = {'temp_gib': temp_gib, 'fits': fits, 'seconds': seconds}
    print(f'{implementation}: temporaries {temp_gib:.3f} GiB of a {args.budget_gib} GiB '
          f'budget: ' + (f'ran in {seconds:.1f} s' if fits else 'does not fit, not run'))
  short = inputs(512, args.heads, args.head_dim, seed=1)
  q, k, v, positions, valid = short
  mask = AttentionMask(positions, positions, valid)
  outputs = [attend(q, k, v, mask, implementation=name) for name in ('dense', 'chunked')]
  grads = [gradient(name)(*short)[1] for name in ('dense', 'chunked')]
  error = max(float(jnp.abs(a - b).max()) for a, b in zip(
      [outputs[0], *grads[0]], [outputs[1], *grads[1]]))
  result['max_abs_difference_at_512'] = error
  print(f'T = 512: chunked − dense, forward and gradients, at most {error:.2e}')
  print(json.dumps(result))


if __name__ == '__main__':
  main()
