"""Remat and mixed precision change memory and speed, not the function computed."""

import functools

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.config import base_config
from rlhf_jax.engine.optimizer import make_optimizer
from rlhf_jax.models import Transformer
from rlhf_jax.models.layers import Dense, shared_input_projections
from rlhf_jax.models.presets import get_preset
from rlhf_jax.parallel import DEFAULT_RULES


def loss_and_grads(cfg, tokens):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('remat', ['full', 'minimal', 'save_qkv_proj'])
@pytest.mark.parametrize('scan_layers', [False, True], ids=['unrolled', 'scanned'])
def test_remat_gives_the_same_loss_and_gradients(remat, scan_layers):
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  cfg = get_preset('tiny').replace(scan_layers=scan_layers)
  loss, grads = loss_and_grads(cfg, tokens)
  remat_loss, remat_grads = loss_and_grads(cfg.replace(remat=remat), tokens)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(rg, g, atol=1e-6)


def test_scanned_layers_compute_and_train_as_the_unrolled_model():
  """The same weights stacked on a 'layers' axis give the same loss, layer by layer the same
  gradients, and after one AdamW update with weight decay (which skips norm scales, stacked
  or not) the same weights."""
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  cfg = get_preset('tiny').replace(n_layers=3)
  unrolled = Transformer(cfg, rngs=nnx.Rngs(0))
  scanned_graphdef, scanned_abstract = nnx.split(nnx.eval_shape(
      lambda: Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))))
  unrolled_flat = dict(nnx.to_flat_state(nnx.state(unrolled)))
  layer = lambda path, i: unrolled_flat[(path[0], i, *path[1:])][...]
  stacked = nnx.from_flat_state([
      (path, v.replace(jnp.stack([layer(path, i) for i in range(3)]) if path[0] == 'blocks'
                       else unrolled_flat[path][...]))
      for path, v in nnx.to_flat_state(scanned_abstract)])
  optim = base_config().optim
  optim.weight_decay, optim.lr, optim.warmup_steps = 0.5, 1e-2, 0
  optimizer, _ = make_optimizer(optim, total_steps=10)

  @functools.partial(jax.jit, static_argnums=0)
  def loss_grads_and_update(graphdef, params):
    loss = lambda p: -jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens))[..., 0])
    value, grads = jax.value_and_grad(loss)(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return value, grads, optax.apply_updates(params, updates)

  loss, *unrolled_trees = loss_grads_and_update(*nnx.split(unrolled))
  scanned_loss, *scanned_trees = loss_grads_and_update(scanned_graphdef, stacked)
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6)
  for unrolled_tree, scanned_tree in zip(unrolled_trees, scanned_trees):
    unrolled_tree = dict(nnx.to_flat_state(unrolled_tree))
    for path, x in nnx.to_flat_state(scanned_tree):
      if path[0] == 'blocks':
        for i in range(3):
          np.testing.assert_allclose(x[...][i], unrolled_tree[(path[0], i, *path[1:])][...],
                                     atol=1e-6)
      else:
        np.testing.assert_allclose(x[...], unrolled_tree[path][...], atol=1e-6)


def test_stacked_parameters_name_their_layers_axis():
  """Every stacked parameter's first logical axis is 'layers', which no default rule shards."""
  cfg = get_preset('tiny').replace(scan_layers=True)
  state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  blocks = nnx.to_flat_state(state['blocks'])
  assert blocks
  for path, v in blocks:
    assert v.get_metadata()['logical_axes'][0] == 'layers' and v.shape[0] == cfg.n_layers, path
  assert 'layers' not in dict(DEFAULT_RULES)


def test_bfloat16_compute_keeps_float32_master_weights_and_tracks_float32():
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  cfg = get_preset('tiny')
  loss, grads = loss_and_grads(cfg, tokens)
  bf16_loss, bf16_grads = loss_and_grads(cfg.replace(dtype='bfloat16'), tokens)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf16_grads))
  np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)
  flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
  cosine = jnp.dot(flat(grads), flat(bf16_grads)) / (
      jnp.linalg.norm(flat(grads)) * jnp.linalg.norm(flat(bf16_grads)))
  assert cosine > 0.99


@pytest.mark.parametrize('lora_rank,bias', [(0, False), (4, True)])
def test_shared_input_projections_equal_the_projections_one_by_one(lora_rank, bias):
  """SwiGLU's gate and up as one matmul over stacked kernels: each output and each gradient is
  that of its own Dense (with an adapter whose B is not zero, and a bias)."""
  cfg = get_preset('tiny')
  rngs = nnx.Rngs(0)
  denses = [Dense(16, 24, ('embed', 'mlp'), bias=bias, cfg=cfg, rngs=rngs, lora_rank=lora_rank)
            for _ in range(2)]
  for dense in denses:
    if lora_rank:
      dense.lora_b[...] = jax.random.normal(rngs.params(), dense.lora_b.shape)
    if bias:
      dense.bias[...] = jax.random.normal(rngs.params(), dense.bias.shape)
  x = jax.random.normal(rngs.params(), (2, 5, 16))
  graphdef, params = nnx.split(nnx.List(denses))

  def outputs(params, shared):
    merged = nnx.merge(graphdef, params)
    return (shared_input_projections(x, tuple(merged)) if shared else
            [dense(x) for dense in merged])

  for expected, got in zip(outputs(params, False), outputs(params, True)):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  loss = lambda params, shared: sum(jnp.sum(jnp.sin(y) * (i + 1))
                                    for i, y in enumerate(outputs(params, shared)))
  for expected, got in zip(jax.tree.leaves(jax.grad(loss)(params, False)),
                           jax.tree.leaves(jax.grad(loss)(params, True))):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
