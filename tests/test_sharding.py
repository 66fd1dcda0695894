"""Sharded training on a (data=2, fsdp=2, tensor=2) mesh equals the single-device run."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel
from rlhf_jax.data.synthetic import SortingTask
from rlhf_jax.models import Transformer
from rlhf_jax.models.presets import get_preset
from rlhf_jax.training import sft
from rlhf_jax.training.config import base_config
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.state import init_train_state, train_state_shardings
from rlhf_jax.training.step import make_train_step

RULES = parallel.DEFAULT_RULES
LLAMA = get_preset('tiny').replace(vocab_size=48, d_model=32, d_ff=64)
GPT2 = LLAMA.replace(norm='layer', position='learned', mlp='gelu', qkv_bias=True,
                     out_bias=True, tie_embeddings=True, n_kv_heads=4, max_position=32)


def one_device_mesh():
  return parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


def train(model_config, mesh, *, steps=3, grad_accum_steps=1, batch_size=8):
  """Losses, grad norms and final params of `steps` SFT steps on `mesh`."""
  graphdef, params, param_shardings = parallel.create_sharded(
      lambda: Transformer(model_config, rngs=nnx.Rngs(0)), mesh, RULES)
  optimizer, schedule = make_optimizer(base_config().optim, total_steps=steps)
  state_shardings = train_state_shardings(param_shardings, optimizer, params, mesh)
  state = init_train_state(params, optimizer, 0, state_shardings)
  data = SortingTask(seq_len=16, vocab_size=model_config.vocab_size, min_items=2, max_items=6,
                     seed=0)
  batch_shardings = {k: parallel.batch_sharding(mesh, RULES) for k in
                     ('tokens', 'attention_mask', 'loss_mask')}
  loss_fn = functools.partial(sft.sft_loss_fn, normalize='sequence', chunk_size=8)
  step = make_train_step(loss_fn, optimizer, graphdef, state_shardings=state_shardings,
                         batch_shardings=batch_shardings, schedule=schedule,
                         grad_accum_steps=grad_accum_steps)
  losses, grad_norms = [], []
  for i in range(steps):
    batch = parallel.shard_batch(data.batch('train', i, range(batch_size)), mesh, RULES)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    grad_norms.append(float(metrics['grad_norm']))
  return losses, grad_norms, state


def test_make_mesh_fills_minus_one_and_names_the_key_on_error():
  assert dict(parallel.make_mesh({'data': -1, 'tensor': 2}).shape) == {
      'data': 4, 'fsdp': 1, 'tensor': 2}
  for bad, match in [({'data': 3}, 'config.mesh.*needs 3 devices'),
                     ({'data': -1, 'fsdp': -1}, 'config.mesh: at most one'),
                     ({'data': -1, 'tensor': 3}, 'config.mesh.*do not divide'),
                     ({'model': 2}, 'config.mesh: unknown axes')]:
    with pytest.raises(ValueError, match=match):
      parallel.make_mesh(bad)


def test_logical_to_spec_replicates_what_does_not_divide():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert parallel.logical_to_spec(('embed', 'mlp'), (32, 64), mesh, RULES) == P('fsdp', 'tensor')
  assert parallel.logical_to_spec(('embed', 'kv_heads'), (32, 3), mesh, RULES) == P('fsdp', None)
  # One mesh axis serves at most one dimension.
  rules = (('embed', 'tensor'), ('mlp', 'tensor'))
  assert parallel.logical_to_spec(('embed', 'mlp'), (32, 64), mesh, rules) == P('tensor', None)
  assert parallel.logical_to_spec(('batch', None), (8, 5), mesh, RULES) == P(('data', 'fsdp'),
                                                                            None)


@pytest.mark.parametrize('model_config', [LLAMA, GPT2], ids=['llama', 'gpt2'])
def test_sharded_training_equals_single_device(model_config):
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  losses, grad_norms, state = train(model_config, mesh)
  ref_losses, ref_grad_norms, ref_state = train(model_config, one_device_mesh())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=1e-5)
  for x, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref), atol=1e-5)


def test_parameters_and_optimizer_moments_are_sharded():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  _, _, state = train(LLAMA, mesh, steps=1)
  block = state.params['blocks'][0]
  expected = {  # (spec, per-device shard shape); LLAMA: D=32, F=64, 4 heads x 8, 2 kv heads.
      'q': (block['attn']['q']['kernel'], P('fsdp', 'tensor'), (16, 16)),
      'k': (block['attn']['k']['kernel'], P('fsdp', 'tensor'), (16, 8)),
      'down': (block['mlp']['down']['kernel'], P('tensor', 'fsdp'), (32, 16)),
      'embed': (state.params['embed'], P('tensor', 'fsdp'), (24, 16)),
      'norm': (block['attn_norm']['scale'], P(None), (32,)),
  }
  for name, (param, spec, shard_shape) in expected.items():
    array = param[...]
    assert array.sharding.spec == spec, name
    assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, name
  adam_state = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState.
  for moments in (adam_state.mu, adam_state.nu):
    for moment, param in zip(jax.tree.leaves(moments), jax.tree.leaves(state.params)):
      assert moment.sharding == param.sharding


def test_gradient_accumulation_equals_the_full_batch():
  # Sequence-normalised losses of equal-sized micro-batches average to the full-batch loss
  # exactly, so accumulated gradients must equal full-batch gradients.
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  losses, grad_norms, state = train(LLAMA, mesh, grad_accum_steps=2, batch_size=16)
  ref_losses, ref_grad_norms, ref_state = train(LLAMA, mesh, batch_size=16)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=1e-5)
  for x, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref), atol=1e-5)
