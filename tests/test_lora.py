"""LoRA: adapters on the base model, exported for PEFT or merged, trained alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from flax import nnx

from rlhf_jax import aot, parallel
from rlhf_jax.algorithms import dpo, kto
from rlhf_jax.algorithms.rl.actor_critic import ActorCritic, ValueHead
from rlhf_jax.config import base_config, load_config
from rlhf_jax.engine.optimizer import make_optimizer
from rlhf_jax.engine.state import init_train_state, train_state_shardings
from rlhf_jax.engine.step import make_train_step
from rlhf_jax.errors import InputError
from rlhf_jax.models import ModelConfig, Transformer, load_hf, lora, save_hf
from rlhf_jax.models.hf import save_peft_adapter
from rlhf_jax.models.loading import build_model
from rlhf_jax.models.layers import LoRAParam
from rlhf_jax.models.presets import get_preset
from hf_fixtures import hf_forward, padded_batch, tiny_model

TARGETS = ('q', 'v', 'down')


def moved_adapters(model, seed=1):
  """`model` with every adapter factor drawn at random (B is zero at initialisation)."""
  graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
  adapters = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters)
  return nnx.merge(graphdef, adapters, rest)


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def logits(model, tokens, mask):
  return np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize('scan_layers', [False, True], ids=['unrolled', 'scanned'])
def test_peft_loads_our_adapter_and_merging_keeps_the_function(tmp_path, scan_layers):
  base = tiny_model('llama')
  base.save_pretrained(tmp_path / 'base')
  model = load_hf(tmp_path / 'base', lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS,
                  scan_layers=scan_layers)
  tokens, mask = padded_batch()
  real = mask.astype(bool)
  want_base = hf_forward(base, tokens, mask)
  # Freshly loaded, the adapters add nothing: B = 0.
  np.testing.assert_allclose(logits(model, tokens, mask)[real], want_base[real], atol=1e-4)
  model = moved_adapters(model)
  ours = logits(model, tokens, mask)
  assert np.abs(ours - want_base)[real].max() > 0.1  # The adapters change the function.
  np.testing.assert_allclose(logits(lora.without_adapters(model), tokens, mask)[real],
                             want_base[real], atol=1e-4)

  save_peft_adapter(model, tmp_path / 'adapter')
  with_adapter = peft.PeftModel.from_pretrained(tiny_model('llama'), tmp_path / 'adapter')
  assert sorted(with_adapter.peft_config['default'].target_modules) == [
      'down_proj', 'q_proj', 'v_proj']
  np.testing.assert_allclose(hf_forward(with_adapter.eval(), tokens, mask)[real], ours[real],
                             atol=1e-4)
  save_hf(model, tmp_path / 'merged')
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged').eval()
  np.testing.assert_allclose(hf_forward(merged, tokens, mask)[real], ours[real], atol=1e-4)


def test_a_train_step_moves_the_adapters_alone():
  """The train state holds the adapters and their moments only; the base weights, an argument
  of the step, come out as they went in; and the loss of the LoRA model at its start is the
  base model's."""
  cfg = get_preset('tiny').replace(lora_rank=4, lora_targets=TARGETS)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  adapters, base = lora.split_trained(params)
  assert {type(v) for v in jax.tree.leaves(adapters, is_leaf=_is_variable)} == {LoRAParam}
  assert not any(isinstance(v, LoRAParam) for v in jax.tree.leaves(base, is_leaf=_is_variable))
  base_before = jax.tree.map(np.asarray, base)

  mesh = parallel.make_mesh({'data': -1}, jax.devices()[:1])
  shardings = jax.tree.map(lambda _: jax.NamedSharding(mesh, jax.P()), params)
  adapter_shardings, base_shardings = lora.split_trained(shardings)
  optim = base_config().optim
  optim.warmup_steps, optim.lr = 0, 1e-2
  optimizer, _ = make_optimizer(optim, 10)
  state_shardings = train_state_shardings(adapter_shardings, optimizer, adapters, mesh)
  state = init_train_state(adapters, optimizer, 0, state_shardings)
  moments = state.opt_state[1][0].mu
  assert len(jax.tree.leaves(moments)) == len(jax.tree.leaves(adapters)) == 2 * 3 * cfg.n_layers

  def loss_fn(model, batch, rng, frozen):
    logps = jax.nn.log_softmax(model(batch['tokens']))
    return -jnp.mean(logps[..., 1]), {}
  step = make_train_step(loss_fn, optimizer, graphdef, state_shardings=state_shardings,
                         batch_shardings=None, fixed_shardings=base_shardings)
  batch = {'tokens': jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)}
  plain_graphdef = nnx.graphdef(Transformer(cfg.replace(lora_rank=0), rngs=nnx.Rngs(0)))
  plain_loss, _ = loss_fn(nnx.merge(plain_graphdef, base), batch, None, None)
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, batch, None, base)
  np.testing.assert_allclose(metrics['loss'], plain_loss, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base_before)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                         state.params, before))
  assert all(changed)  # A moves by its gradient, B leaves zero.


def test_lora_flops_leave_out_the_base_weight_gradients():
  cfg = ModelConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=6)
  n = cfg.num_params(embeddings=False)
  attention = 4 * 1 * 5 * 2 * 2  # 4·L·T·H·Dh at T = 5.
  assert cfg.flops_per_token(5, forward_only=True) == 2 * n + attention
  assert cfg.flops_per_token(5) == 6 * n + 3 * attention
  assert cfg.replace(lora_rank=2).flops_per_token(5) == 4 * n + 3 * attention


def test_a_lora_dpo_step_keeps_no_reference_copy():
  """Compiled for a TPU slice: the LoRA step's arguments (adapters, their moments, the base)
  weigh less than the full step's (parameters, moments, the frozen reference), and its HLO
  FLOPs count the reference's forward pass."""
  full = load_config('dpo.py:tiny')
  with_lora = load_config('dpo.py:tiny')
  with_lora.model.lora_rank = 4
  reports = {name: aot.report(config, 'v5p-8') for name, config in
             (('full', full), ('lora', with_lora))}
  assert reports['lora']['fits'] and reports['full']['fits']
  assert reports['lora']['argument_gib'] < 0.3 * reports['full']['argument_gib']
  assert aot.reference_kind(with_lora) == 'adapters'
  assert reports['lora']['hlo_tflops_per_chip'] > 0.9 * reports['lora']['model_tflops_per_chip']


def test_a_lora_models_reference_is_its_own_base_not_a_copy():
  """What DPO, KTO and online RL train and refer to: a LoRA model is trained as it is (its
  train state takes only the adapters) and its reference shares its base arrays, the
  adapters zero, so it computes the base model; a plain model is trained as a copy."""
  mesh = parallel.make_mesh({'data': -1}, jax.devices()[:1])
  cfg = get_preset('tiny').replace(lora_rank=4, lora_targets=TARGETS)
  rules = base_config().sharding_rules
  loaded = build_model(cfg, mesh, rules, seed=0)
  loaded = loaded._replace(params=nnx.state(moved_adapters(loaded.module())))
  trained, reference = loaded.trained_and_reference()
  assert trained is loaded
  flat = lambda model: dict(nnx.to_flat_state(model.params))
  for path, variable in flat(reference).items():
    if isinstance(variable, LoRAParam):
      assert not np.any(np.asarray(variable[...])), path
    else:
      assert variable[...] is flat(trained)[path][...], path
  tokens = jnp.asarray([[3, 8, 1, 5]])
  plain = Transformer(cfg.replace(lora_rank=0), rngs=nnx.Rngs(0))
  nnx.update(plain, lora.split_trained(loaded.params)[1])
  np.testing.assert_allclose(reference.module()(tokens), plain(tokens), atol=1e-6)
  assert not np.allclose(trained.module()(tokens), plain(tokens), atol=1e-3)

  full = build_model(cfg.replace(lora_rank=0), mesh, rules, seed=0)
  copy, same = full.trained_and_reference()
  assert same is full
  for a, b in zip(jax.tree.leaves(copy.params), jax.tree.leaves(full.params)):
    assert a is not b and np.array_equal(a, b)


@pytest.mark.parametrize('algorithm', ['dpo', 'kto'])
def test_preference_losses_take_a_lora_policys_base_as_its_reference(algorithm):
  """Without frozen parameters, DPO's and KTO's losses of a LoRA policy refer to its base:
  the same loss as with the base given as the frozen reference, not the policy's own."""
  cfg = get_preset('tiny').replace(lora_rank=4, lora_targets=TARGETS)
  policy = moved_adapters(Transformer(cfg, rngs=nnx.Rngs(0)))
  b, t = 4, 12
  tokens = jax.random.randint(jax.random.key(3), (b, 2, t), 3, cfg.vocab_size)
  loss_mask = jnp.broadcast_to(jnp.arange(t) >= 5, (b, 2, t))
  batch = {'tokens': tokens, 'attention_mask': jnp.ones((b, 2, t), bool), 'loss_mask': loss_mask,
           'labels': jnp.array([True, False, True, False])}
  if algorithm == 'dpo':
    loss_fn = functools.partial(dpo.dpo_loss_fn, chunk_size=4, loss_options=dpo.loss_options(
        load_config('dpo.py:tiny').loss))
  else:
    loss_fn = functools.partial(kto.kto_loss_fn, chunk_size=4, loss_options=dict(
        beta=0.1, loss_type='kto', desirable_weight=1.0, undesirable_weight=1.0))
  own_base, _ = loss_fn(policy, batch)
  given_base, _ = loss_fn(policy, batch, frozen=nnx.state(lora.without_adapters(policy)))
  itself, _ = loss_fn(policy, batch, frozen=nnx.state(policy))
  assert own_base == pytest.approx(float(given_base), rel=1e-6)
  assert abs(float(own_base) - float(itself)) > 1e-4


def test_lora_options_are_checked():
  with pytest.raises(InputError, match='lora_targets'):
    get_preset('tiny').replace(lora_rank=4, lora_targets=('qkv',))
  with pytest.raises(InputError, match='one at least'):  # Not a full fine-tune in disguise.
    get_preset('tiny').replace(lora_rank=4, lora_targets=())


def test_a_lora_reward_model_trains_its_scalar_head_too():
  """A scalar head is a new layer (zero from a causal LM's checkpoint): LoRA trains it with the
  adapters, or the reward model could not learn."""
  cfg = get_preset('tiny').replace(lora_rank=4, head='scalar')
  trained, base = lora.split_trained(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
  trained = dict(nnx.to_flat_state(trained))
  assert ('head', 'kernel') in trained
  assert all(path == ('head', 'kernel') or path[-1] in ('lora_a', 'lora_b') for path in trained)
  lm_trained, _ = lora.split_trained(nnx.state(Transformer(cfg.replace(head='lm'),
                                                           rngs=nnx.Rngs(0))))
  assert all(path[-1] in ('lora_a', 'lora_b') for path, _ in nnx.to_flat_state(lm_trained))


def test_a_lora_policy_trains_its_value_head_in_full():
  """PPO's value head on a LoRA policy is new, as a reward model's head: trained whole."""
  policy = Transformer(get_preset('tiny').replace(lora_rank=4), rngs=nnx.Rngs(0))
  trained, _ = lora.split_trained(nnx.state(ActorCritic(policy, ValueHead(policy.cfg.d_model))))
  paths = [path for path, _ in nnx.to_flat_state(trained)]
  assert ('critic', 'kernel') in paths and ('critic', 'bias') in paths
  assert all(path[0] == 'critic' or path[-1] in ('lora_a', 'lora_b') for path in paths)
