"""Attention's forward and backward time: dense against chunked (and cuDNN), on this device.

  python benchmarks/attention_speed.py                   # the `small` shape: 16 × 512 tokens
  python benchmarks/attention_speed.py --batch_size=4 --length=2048 --blocks=64,128
  python benchmarks/attention_speed.py --length=4096 --dtype=bfloat16     # an NVIDIA GPU

The gradient of sum(attention(q, k, v)²) with respect to q, k and v for causal rows of real
tokens (6 query heads and 2 key/value heads of 64, as the `small` preset), with 'dense'
attention, with 'chunked' in each block size given (`rlhf_jax.models.attention`) and, on a
CUDA GPU in bfloat16 or float16, with 'cudnn'; the best of `repeats` runs after one that
compiles. This is what chose 'auto's CPU_BLOCK and CHUNKED_FROM. The last line printed is one
JSON object for scripts.
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import attention
from rlhf_jax.models.attention import AttentionMask, attend, chunked_attention
from rlhf_jax.models.layers import positions_from_mask
from train_step import time_fn  # Same folder: the benchmarks' one timer.


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--length', type=int, default=512)
  parser.add_argument('--heads', type=int, default=6)
  parser.add_argument('--kv_heads', type=int, default=2)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--blocks', default='64,512', help='Chunked block sizes (query = key).')
  parser.add_argument('--dtype', default='float32', help="Of q, k and v; 'cudnn' takes 16 bits.")
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  draw = lambda heads: jnp.asarray(
      rng.standard_normal((args.batch_size, args.length, heads, args.head_dim)), args.dtype)
  q, k, v = draw(args.heads), draw(args.kv_heads), draw(args.kv_heads)
  valid = jnp.ones((args.batch_size, args.length), jnp.bool_)
  mask = AttentionMask(positions_from_mask(valid), positions_from_mask(valid), valid)
  implementations = {'dense': functools.partial(attend, mask=mask, implementation='dense')}
  for block in map(int, args.blocks.split(',')):
    implementations[f'chunked_{block}'] = functools.partial(
        chunked_attention, mask=mask, q_block=block, kv_block=block)
  if attention.current_platform() == 'cuda' and not attention.cudnn_unsupported(q):
    implementations['cudnn'] = functools.partial(attend, mask=mask, implementation='cudnn')

  seconds = {}
  for name, attend_qkv in implementations.items():
    loss = lambda q, k, v: jnp.sum(attend_qkv(q, k, v).astype(jnp.float32) ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    seconds[name] = time_fn(grads, q, k, v, repeats=args.repeats)
    print(f'{name:<12} forward + backward {1e3 * seconds[name]:8.1f} ms')
  print(json.dumps({'ms': {name: 1e3 * s for name, s in seconds.items()}, **vars(args),
                    'device': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  main()
