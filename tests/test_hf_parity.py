"""Logit parity with transformers for checkpoints loaded by `load_hf` and written by `save_hf`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from rlhf_jax.errors import InputError
from rlhf_jax.models import (ModelConfig, Transformer, config_from_hf, load_hf,
                             save_first_layers, save_hf)
from rlhf_jax.models.hf import hf_config_from
from rlhf_jax.models.presets import get_preset
from hf_fixtures import hf_forward, padded_batch, tiny_model

TOL = 1e-4


def ours(model, tokens, mask):
  return np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))


def assert_close_on_real(a, b, mask, tol=TOL):
  real = mask.astype(bool)
  np.testing.assert_allclose(a[real], b[real], atol=tol, rtol=0)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """kind -> (HF model, directory of its save_pretrained checkpoint)."""
  out = {}
  for kind in ('llama', 'llama3', 'qwen2', 'qwen3', 'mistral', 'gpt2'):
    model = tiny_model(kind)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    out[kind] = model, path
  return out


@pytest.mark.parametrize('scan_layers', [False, True], ids=['unrolled', 'scanned'])
@pytest.mark.parametrize('kind', ['llama', 'llama3', 'qwen2', 'qwen3', 'mistral', 'gpt2'])
def test_logits_match_transformers(checkpoints, kind, scan_layers):
  hf_model, path = checkpoints[kind]
  tokens, mask = padded_batch()
  model = load_hf(path, scan_layers=scan_layers)
  assert_close_on_real(ours(model, tokens, mask), hf_forward(hf_model, tokens, mask), mask)


@pytest.mark.parametrize('kind, scan_layers', [('llama', False), ('qwen2', False),
                                               ('qwen3', False), ('gpt2', False),
                                               ('llama', True), ('gpt2', True)])
def test_save_round_trip(checkpoints, kind, scan_layers, tmp_path):
  hf_model, path = checkpoints[kind]
  save_hf(load_hf(path, scan_layers=scan_layers), tmp_path)
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  tokens, mask = padded_batch(1)
  assert_close_on_real(hf_forward(reloaded.eval(), tokens, mask),
                       hf_forward(hf_model, tokens, mask), mask, tol=1e-6)


def test_gpt2_without_transformer_prefix(checkpoints, tmp_path):
  """Hub GPT-2 files name tensors `h.0...`, `wte.weight` and carry attn.bias mask buffers."""
  hf_model, path = checkpoints['gpt2']
  with safetensors.safe_open(path / 'model.safetensors', 'np') as f:
    tensors = {k.removeprefix('transformer.'): f.get_tensor(k) for k in f.keys()}
  tensors['h.0.attn.bias'] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  safetensors.numpy.save_file(tensors, tmp_path / 'model.safetensors')
  (tmp_path / 'config.json').write_text((path / 'config.json').read_text())
  tokens, mask = padded_batch()
  assert_close_on_real(ours(load_hf(tmp_path), tokens, mask),
                       hf_forward(hf_model, tokens, mask), mask)


def test_sharded_checkpoint(checkpoints, tmp_path):
  hf_model, _ = checkpoints['llama']
  hf_model.save_pretrained(tmp_path, max_shard_size='20KB')
  index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 1
  tokens, mask = padded_batch()
  assert_close_on_real(ours(load_hf(tmp_path), tokens, mask),
                       hf_forward(hf_model, tokens, mask), mask)


def test_shardings_place_each_tensor(checkpoints):
  _, path = checkpoints['qwen2']
  cfg = config_from_hf(transformers.AutoConfig.from_pretrained(path))
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  mesh = jax.make_mesh((1,), ('data',))
  sharding_of = lambda x: jax.sharding.NamedSharding(mesh, jax.P(*('data',)[:x.ndim]))
  model = load_hf(path, shardings=jax.tree.map(sharding_of, abstract))
  for x, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(abstract)):
    assert x.sharding == sharding_of(want)


def test_bfloat16_checkpoint(tmp_path):
  tiny_model('llama').to(torch.bfloat16).save_pretrained(tmp_path)
  model = load_hf(tmp_path, dtype=jnp.bfloat16)
  with safetensors.safe_open(tmp_path / 'model.safetensors', 'np') as f:
    up_proj = f.get_tensor('model.layers.1.mlp.up_proj.weight')
  kernel = model.blocks[1].mlp.up.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(kernel), up_proj.T)
  # Upcast on load: float32 parameters match HF upcasting the same checkpoint.
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  tokens, mask = padded_batch()
  assert_close_on_real(ours(load_hf(tmp_path), tokens, mask),
                       hf_forward(hf_model.eval(), tokens, mask), mask)


def test_reward_model_head(tmp_path):
  hf_model = tiny_model('llama_reward')
  hf_model.save_pretrained(tmp_path / 'hf')
  tokens, mask = padded_batch()
  tokens, mask = tokens[1:], mask[1:]  # Right padded and full rows: HF pools the last real one.
  model = load_hf(tmp_path / 'hf', head='scalar')
  last = mask.sum(-1) - 1
  want = hf_forward(hf_model, tokens, mask)[:, 0]
  np.testing.assert_allclose(ours(model, tokens, mask)[np.arange(2), last], want, atol=TOL,
                             rtol=0)
  save_hf(model, tmp_path / 'ours', pad_token_id=0)
  reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / 'ours', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  np.testing.assert_allclose(hf_forward(reloaded.eval(), tokens, mask)[:, 0], want, atol=1e-6,
                             rtol=0)


def test_causal_lm_as_reward_model_starts_at_zero(checkpoints):
  _, path = checkpoints['gpt2']
  model = load_hf(path, head='scalar')
  tokens, mask = padded_batch()
  assert model.head.kernel.shape == (32, 1)
  np.testing.assert_array_equal(ours(model, tokens, mask), 0)


def test_llama3_rope_scaling_is_read(checkpoints):
  _, path = checkpoints['llama3']
  assert load_hf(path).cfg.rope_llama3_scaling == (8.0, 1.0, 4.0, 64)


def test_unsupported_model_type():
  with pytest.raises(ValueError, match="model_type='bert'"):
    config_from_hf(transformers.BertConfig())


def test_unsupported_activation_and_rope():
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    config_from_hf(transformers.LlamaConfig(hidden_act='gelu'))
  with pytest.raises(ValueError, match="rope_type='linear'"):
    config_from_hf(transformers.LlamaConfig(rope_scaling=dict(rope_type='linear', factor=2.0)))
  with pytest.raises(ValueError, match="activation_function='relu'"):
    config_from_hf(transformers.GPT2Config(activation_function='relu'))


def test_save_rejects_configs_transformers_cannot_express(tmp_path):
  cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=16,
                    position='learned', mlp='swiglu')
  with pytest.raises(ValueError, match='no GPT2Config equivalent'):
    save_hf(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), tmp_path)


def test_missing_and_unexpected_tensors(checkpoints, tmp_path):
  _, path = checkpoints['llama']
  with safetensors.safe_open(path / 'model.safetensors', 'np') as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  (tmp_path / 'config.json').write_text((path / 'config.json').read_text())
  file = tmp_path / 'model.safetensors'

  missing = dict(tensors)
  del missing['model.layers.1.self_attn.k_proj.weight']
  safetensors.numpy.save_file(missing, file)
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight'.*"
                                       r"missing from .*model\.safetensors"):
    load_hf(tmp_path)

  safetensors.numpy.save_file(tensors | {'model.extra.weight': np.zeros(3, np.float32)}, file)
  with pytest.raises(ValueError, match=r"Unexpected tensor 'model\.extra\.weight' in "
                                       r".*model\.safetensors"):
    load_hf(tmp_path)


@pytest.mark.parametrize('kind', ['llama', 'mistral', 'gpt2'])
def test_first_layers_are_the_model_cut_after_them(checkpoints, kind, tmp_path):
  """save_first_layers(…, 1) is the source model with its later blocks removed: transformers
  loads it whole, with the logits of the source run through its first block only, and so do
  we; the tokenizer's files come along."""
  hf_model, path = checkpoints[kind]
  (path / 'tokenizer.json').write_text('{"stand-in": true}')
  save_first_layers(path, tmp_path / 'cut', 1)
  cut, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'cut', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert cut.config.num_hidden_layers == 1
  assert (tmp_path / 'cut' / 'tokenizer.json').read_text() == '{"stand-in": true}'
  truncated = tiny_model(kind)
  blocks = truncated.transformer if kind == 'gpt2' else truncated.model
  blocks_name = 'h' if kind == 'gpt2' else 'layers'
  setattr(blocks, blocks_name, getattr(blocks, blocks_name)[:1])
  tokens, mask = padded_batch()
  expected = hf_forward(truncated, tokens, mask)
  assert_close_on_real(hf_forward(cut.eval(), tokens, mask), expected, mask, tol=1e-6)
  assert_close_on_real(ours(load_hf(tmp_path / 'cut'), tokens, mask), expected, mask)
  with pytest.raises(InputError, match='has 2 layers; cannot keep the first 3'):
    save_first_layers(path, tmp_path / 'too_many', 3)
  assert not (tmp_path / 'too_many').exists()


@pytest.mark.parametrize('preset', ['llama3-8b', 'llama3-70b', 'qwen2.5-7b', 'qwen3-8b',
                                    'llama-1b', 'qwen2-0.5b'])
def test_presets_are_their_hf_architectures(preset):
  """The preset's transformers config reads back as the preset (`hf_config_from` checks), and
  transformers' model of it, built on the meta device, has the preset's parameter count."""
  cfg = get_preset(preset)
  with torch.device('meta'):
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config_from(cfg))
  assert sum(p.numel() for p in hf_model.parameters()) == cfg.num_params()
