"""Remat and mixed precision change memory and speed, not the function computed."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import Transformer
from rlhf_jax.models.presets import get_preset


def loss_and_grads(cfg, tokens):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_gives_the_same_loss_and_gradients():
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  cfg = get_preset('tiny')
  loss, grads = loss_and_grads(cfg, tokens)
  remat_loss, remat_grads = loss_and_grads(cfg.replace(remat=True), tokens)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(rg, g, atol=1e-6)


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
