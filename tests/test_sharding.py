"""Sharded training on a (data=2, fsdp=2, tensor=2) mesh equals the single-device run.

Runs in-process on the 8 virtual CPU devices that conftest.py asks XLA for. Each training run
is cached per (model, mesh, accumulation), so the tests share their compilations.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel
from rlhf_jax.playground.sorting import SortingTask
from rlhf_jax.models import Transformer
from rlhf_jax.models.presets import get_preset
from rlhf_jax.algorithms import sft
from rlhf_jax.config import base_config
from rlhf_jax.engine.optimizer import make_optimizer
from rlhf_jax.engine.state import init_train_state, train_state_shardings
from rlhf_jax.engine.step import make_train_step

RULES = parallel.DEFAULT_RULES
# D=32, F=64, 4 query heads x 8, 2 KV heads (grouped-query attention), 2 layers.
LLAMA = get_preset('tiny').replace(vocab_size=48, d_model=32, d_ff=64)
GPT2 = LLAMA.replace(norm='layer', position='learned', mlp='gelu', qkv_bias=True,
                     out_bias=True, tie_embeddings=True, n_kv_heads=4, max_position=32)
MODELS = {'llama': LLAMA, 'gpt2': GPT2}
STEPS, BATCH, SEQ_LEN = 3, 8, 16


def make_mesh(name: str):
  if name == 'one':
    return parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  return parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})


@functools.cache
def train(model: str, mesh_name: str, grad_accum_steps: int = 1):
  """(initial params, losses, grad norms, final state) of STEPS SFT steps on a mesh.

  Every run sees the same global batches; only their placement differs.
  """
  mesh, model_config = make_mesh(mesh_name), MODELS[model]
  graphdef, params, param_shardings = parallel.create_sharded(
      lambda: Transformer(model_config, rngs=nnx.Rngs(0)), mesh, RULES)
  initial_params = jax.device_get(params)  # init_train_state donates `params`.
  optim = base_config().optim
  # No warmup and a large rate, so each step moves the weights by ~1e-3 and comparing the
  # final params to 1e-5 checks the updates, not just the initialisation.
  optim.update(lr=1e-3, warmup_steps=0)
  optimizer, schedule = make_optimizer(optim, total_steps=STEPS)
  state_shardings = train_state_shardings(param_shardings, optimizer, params, mesh)
  state = init_train_state(params, optimizer, 0, state_shardings)
  data = SortingTask(seq_len=SEQ_LEN, vocab_size=model_config.vocab_size, min_items=2,
                     max_items=6, seed=0)
  batch_shardings = {k: parallel.batch_sharding(mesh, RULES) for k in
                     ('tokens', 'attention_mask', 'loss_mask')}
  # normalize='sequence': see test_gradient_accumulation_equals_the_full_batch.
  loss_fn = functools.partial(sft.sft_loss_fn, normalize='sequence', chunk_size=8)
  step = make_train_step(loss_fn, optimizer, graphdef, state_shardings=state_shardings,
                         batch_shardings=batch_shardings, schedule=schedule,
                         grad_accum_steps=grad_accum_steps)
  losses, grad_norms = [], []
  for i in range(STEPS):
    batch = parallel.shard_batch(data.batch('train', i, range(BATCH)), mesh, RULES)
    state, metrics = step(state, batch)  # Under the mesh: the activations' constraints apply.
    losses.append(float(metrics['loss']))
    grad_norms.append(float(metrics['grad_norm']))
  return initial_params, losses, grad_norms, state


def assert_trees_close(tree, ref, atol):
  leaves, ref_leaves = jax.tree.leaves(tree), jax.tree.leaves(ref)
  assert len(leaves) == len(ref_leaves)
  for x, y in zip(leaves, ref_leaves):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_make_mesh_fills_minus_one_and_names_the_key_on_error():
  assert dict(parallel.make_mesh({'data': -1, 'tensor': 2}).shape) == {
      'data': 4, 'fsdp': 1, 'tensor': 2}
  assert dict(parallel.make_mesh({'fsdp': -1}).shape) == {'data': 1, 'fsdp': 8, 'tensor': 1}
  for bad, match in [({'data': 3}, r'config\.mesh.*needs 3 devices, but 8'),
                     ({'data': 2, 'fsdp': 2, 'tensor': 4}, r'config\.mesh.*needs 16 devices'),
                     ({'data': -1, 'fsdp': -1}, r'config\.mesh: at most one axis'),
                     ({'data': -1, 'tensor': 3}, r'config\.mesh.*do not divide'),
                     ({'model': 2}, r'config\.mesh: unknown axes \[.model.\]')]:
    with pytest.raises(ValueError, match=match):
      parallel.make_mesh(bad)


def test_logical_to_spec_replicates_what_does_not_divide():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  spec = lambda axes, shape, rules=RULES: parallel.logical_to_spec(axes, shape, mesh, rules)
  assert spec(('embed', 'mlp'), (32, 64)) == P('fsdp', 'tensor')
  # 3 KV heads do not split over tensor=2: that dimension is replicated, the other still sharded.
  assert spec(('embed', 'kv_heads'), (32, 3)) == P('fsdp', None)
  assert spec(('norm',), (32,)) == P(None)
  # A multi-axis rule keeps the axes that divide: batch 8 over data x fsdp, batch 2 over data.
  assert spec(('batch', None), (8, 5)) == P(('data', 'fsdp'), None)
  assert spec(('batch', None), (2, 5)) == P('data', None)
  # One mesh axis serves at most one dimension of an array.
  rules = (('embed', 'tensor'), ('mlp', 'tensor'))
  assert spec(('embed', 'mlp'), (32, 64), rules) == P('tensor', None)
  assert spec(('mlp', 'embed'), (64, 32), rules) == P('tensor', None)


@pytest.mark.parametrize('model', ['llama', 'gpt2'])
def test_sharded_training_equals_single_device(model):
  initial, losses, grad_norms, state = train(model, 'data2_fsdp2_tensor2')
  ref_initial, ref_losses, ref_grad_norms, ref_state = train(model, 'one')
  assert_trees_close(initial, ref_initial, atol=0)  # Same seed, same values on any mesh.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=1e-5)
  # Adam's step g/(√v + ε) turns float-order differences of near-zero gradients into
  # differences of a few % of one step (lr = 1e-3): the largest seen is 1.8e-5, on one of 2048
  # weights whose gradient changed sign. A sharding error moves whole tensors by ~lr.
  assert_trees_close(state.params, ref_state.params, atol=5e-5)
  # The weights did move, by 20x the tolerance (losses and grad norms agree to ~1e-7).
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), state.params,
                       initial)
  assert max(jax.tree.leaves(moved)) > 1e-3
  assert int(state.step) == int(ref_state.step) == STEPS


def test_parameters_and_optimizer_moments_are_sharded():
  _, _, _, state = train('llama', 'data2_fsdp2_tensor2')
  block = state.params['blocks'][0]
  # (param, spec, per-device shard shape); LLAMA: D=32, F=64, q 4x8=32, k 2x8=16, V=48.
  expected = {
      'q': (block['attn']['q']['kernel'], P('fsdp', 'tensor'), (16, 16)),
      'k': (block['attn']['k']['kernel'], P('fsdp', 'tensor'), (16, 8)),
      'o': (block['attn']['o']['kernel'], P('tensor', 'fsdp'), (16, 16)),
      'down': (block['mlp']['down']['kernel'], P('tensor', 'fsdp'), (32, 16)),
      'embed': (state.params['embed'], P('tensor', 'fsdp'), (24, 16)),
      'norm': (block['attn_norm']['scale'], P(None), (32,)),
  }
  for name, (param, spec, shard_shape) in expected.items():
    array = param[...]
    assert array.sharding.spec == spec, name
    assert len(array.addressable_shards) == 8, name
    assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, name

  adam_state = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState.
  assert int(adam_state.count) == STEPS
  params = jax.tree.leaves(state.params)
  for moments in (adam_state.mu, adam_state.nu):
    leaves = jax.tree.leaves(moments)
    assert len(leaves) == len(params)
    for moment, param in zip(leaves, params):
      assert moment.shape == param.shape
      assert moment.sharding == param.sharding
      assert moment.addressable_shards[0].data.shape == param.addressable_shards[0].data.shape
    q_moment = moments['blocks'][0]['attn']['q']['kernel'][...]
    assert q_moment.sharding.spec == P('fsdp', 'tensor')
    assert q_moment.addressable_shards[0].data.shape == (16, 16)


def test_gradient_accumulation_equals_the_full_batch():
  # Two micro-batches of 4 rows vs one batch of 8 rows, both on the 8-device mesh. With
  # normalize='sequence' the loss is a mean over rows of per-row means, so the mean of two
  # equal-sized micro-batch losses (what accumulation computes) is the full-batch loss itself
  # (up to float rounding), and so are the gradients. With normalize='token' the two halves
  # would weigh by their target-token counts, which differ, and the losses would not match.
  _, losses, grad_norms, state = train('llama', 'data2_fsdp2_tensor2', grad_accum_steps=2)
  _, ref_losses, ref_grad_norms, ref_state = train('llama', 'data2_fsdp2_tensor2')
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(grad_norms, ref_grad_norms, rtol=1e-5)
  assert_trees_close(state.params, ref_state.params, atol=5e-5)  # Adam: see above.
