"""QLoRA: a frozen base in 4-bit NormalFloat under LoRA adapters (Dettmers et al. 2023)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from rlhf_jax import aot, parallel
from rlhf_jax.config import base_config, load_config
from rlhf_jax.errors import InputError
from rlhf_jax.models import Transformer, load_hf, lora, quantization, read_hf_config, save_hf
from rlhf_jax.models.loading import load_model
from rlhf_jax.models.presets import get_preset
from hf_fixtures import hf_forward, padded_batch, tiny_model
from test_lora import logits, moved_adapters

# The NF4 levels as bitsandbytes 0.45 publishes them (functional.py, get_4bit_type('nf4')).
BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_the_levels_are_the_papers_normal_quantiles():
  np.testing.assert_allclose(quantization.nf4_levels(), BITSANDBYTES_NF4, atol=2e-7)


@pytest.mark.parametrize('shape', [(128, 24), (3, 100, 8)], ids=['matrix', 'stacked-ragged'])
def test_each_weight_becomes_its_nearest_level_times_its_blocks_absmax(shape):
  """Every weight's code is the level nearest to w / s (s: the absolute maximum of its block
  of 64 input rows, a last block of 36 rows included), and the block's largest weight comes
  back exactly."""
  kernel = np.asarray(jax.random.normal(jax.random.key(0), shape)) * 0.02
  codes, scales = quantization.quantize(kernel)
  assert codes.dtype == jnp.uint4 and codes.shape == shape
  assert scales.shape == quantization.scales_shape(shape)
  levels = quantization.nf4_levels()
  d_in = shape[-2]
  per_row = np.repeat(np.asarray(scales), quantization.BLOCK, axis=-2)[..., :d_in, :]
  block = np.arange(d_in) // quantization.BLOCK
  for *lead, b, column in np.ndindex(scales.shape):
    rows = kernel[(*lead, block == b, column)]
    assert scales[(*lead, b, column)] == np.abs(rows).max()
  nearest = np.abs(kernel[..., None] / per_row[..., None] - levels).argmin(-1)
  np.testing.assert_array_equal(np.asarray(codes).astype(int), nearest)
  restored = np.asarray(quantization.dequantize(codes, scales, jnp.float32))
  np.testing.assert_allclose(restored, levels[nearest] * per_row, rtol=1e-6)
  largest = np.abs(kernel) == per_row
  np.testing.assert_allclose(restored[largest], kernel[largest], rtol=1e-6)


@pytest.mark.parametrize('scan_layers', [False, True], ids=['unrolled', 'scanned'])
def test_a_qlora_model_computes_its_dequantized_base_and_exports_merged(tmp_path, scan_layers):
  """Loaded from an HF checkpoint with quantize_base='nf4', every block projection is NF4
  codes and scales, each within NF4's error of the checkpoint's kernel; the model computes
  what the plain model with those kernels dequantized computes; with adapters trained, the
  merged export (dequantized kernels + (α / r)·A·B) gives transformers our logits."""
  base = tiny_model('llama')
  base.save_pretrained(tmp_path / 'base')
  model = load_hf(tmp_path / 'base', lora_rank=4, lora_targets=('q', 'v', 'down'),
                  quantize_base='nf4', scan_layers=scan_layers)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  codes = [path for path in flat if path[-1] == 'kernel_codes']
  assert len(codes) == 7 * (1 if scan_layers else model.cfg.n_layers)
  assert not any(path[-1] == 'kernel' and path[0] == 'blocks' for path in flat)
  tokens, mask = padded_batch()
  real = mask.astype(bool)
  merged = lora.merged(model)  # B = 0: the dequantized base.
  np.testing.assert_allclose(logits(model, tokens, mask)[real],
                             logits(merged, tokens, mask)[real], atol=1e-5)
  plain = dict(nnx.to_flat_state(nnx.state(load_hf(tmp_path / 'base',
                                                    scan_layers=scan_layers))))
  for path in codes:  # NF4's error on normal weights: about a tenth of their RMS.
    kernel = np.asarray(plain[(*path[:-1], 'kernel')][...])
    restored = quantization.dequantize(flat[path][...], flat[(*path[:-1], 'kernel_scales')][...],
                                       jnp.float32)
    relative = np.sqrt(np.mean((restored - kernel) ** 2) / np.mean(kernel ** 2))
    assert 0.05 < relative < 0.12, (path, relative)

  model = moved_adapters(model)
  save_hf(model, tmp_path / 'merged')
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged').eval()
  np.testing.assert_allclose(hf_forward(exported, tokens, mask)[real],
                             logits(model, tokens, mask)[real], atol=1e-4)


def test_a_sharded_load_equals_a_load_on_one_host(tmp_path):
  """Loaded straight into shards (fsdp 4 × tensor 2), each kernel quantized on the devices
  that hold it: the same codes and scales as a load without shardings."""
  tiny_model('llama').save_pretrained(tmp_path)
  options = dict(lora_rank=4, quantize_base='nf4')
  cfg = read_hf_config(tmp_path).replace(**options)
  mesh = parallel.make_mesh({'fsdp': 4, 'tensor': 2})
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  shardings = parallel.state_shardings(abstract, mesh, base_config().sharding_rules)
  sharded, whole = (dict(nnx.to_flat_state(nnx.state(load_hf(tmp_path, **options, **extra))))
                    for extra in ({'shardings': shardings}, {}))
  quantized = [path for path in whole if path[-1] in ('kernel_codes', 'kernel_scales')]
  assert any(not sharded[path].get_value().sharding.is_fully_replicated for path in quantized)
  for path in quantized:
    np.testing.assert_array_equal(np.asarray(sharded[path][...]), np.asarray(whole[path][...]))


def test_a_qlora_dpo_step_holds_a_quarter_of_loras_base():
  """Compiled for a TPU slice: the QLoRA DPO step's arguments are well under the LoRA step's
  over a float32 base (4-bit codes and a float32 scale per 64 weights: 4.5 bits a weight of
  the block projections, against 32)."""
  reports = {}
  for name, quantize_base in (('lora', ''), ('qlora', 'nf4')):
    config = load_config('dpo.py:tiny')
    config.model.update(lora_rank=4, quantize_base=quantize_base)
    reports[name] = aot.report(config, 'v5p-8')
  assert reports['qlora']['fits']
  assert reports['qlora']['argument_gib'] < 0.6 * reports['lora']['argument_gib']


def test_a_qlora_runs_frozen_models_load_plain(tmp_path):
  """A QLoRA run's reward models load without adapters, so without an NF4 base too."""
  tiny_model('llama').save_pretrained(tmp_path)
  numerics = load_config('dpo.py:tiny').model
  numerics.update(lora_rank=4, quantize_base='nf4')
  mesh = parallel.make_mesh({'data': -1})
  rules = base_config().sharding_rules
  frozen, trained = (load_model(str(tmp_path), mesh, rules, head='scalar', numerics=numerics,
                                adapters=adapters) for adapters in (False, True))
  assert frozen.module().cfg.quantize_base == '' and not lora.has_adapters(frozen.params)
  assert trained.module().cfg.quantize_base == 'nf4' and lora.has_adapters(trained.params)


def test_quantize_base_needs_adapters():
  with pytest.raises(InputError, match='quantize_base'):
    get_preset('tiny').replace(quantize_base='nf4')
  with pytest.raises(InputError, match='quantize_base'):
    get_preset('tiny').replace(lora_rank=4, quantize_base='int8')
