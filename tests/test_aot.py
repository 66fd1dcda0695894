"""rlhf_jax.aot: a run's train step compiled for a TPU slice on this CPU machine (libtpu)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax import aot, parallel
from rlhf_jax.config import (POD_SLICES, architecture, check_batch_sizes, load_config,
                             to_model_config)
from rlhf_jax.errors import InputError
from rlhf_jax.models import attention
from rlhf_jax.models.attention import AttentionMask, splash_attention
from rlhf_jax.models.layers import positions_from_mask
from rlhf_jax.tpu import parse_slice


@pytest.mark.parametrize('name, topology, chips, bounds', [
    ('v5p-8', 'v5p:2x2x1', 4, (2, 2, 1)),
    ('v5p-64', 'v5p:2x4x4', 32, (2, 2, 1)),
    ('v5p-128', 'v5p:4x4x4', 64, (2, 2, 1)),
    ('v4-32', 'v4:2x2x4', 16, (2, 2, 1)),
    ('v5e-4', 'v5e:2x2', 4, (2, 2, 1)),
    ('v5litepod-8', 'v5e:2x4', 8, (2, 4, 1)),
    ('v5e-256', 'v5e:16x16', 256, (2, 2, 1)),
    ('v6e-1', 'v6e:1x1', 1, (1, 1, 1)),
    ('v6e-32', 'v6e:4x8', 32, (2, 2, 1)),
])
def test_slice_names_map_to_libtpu_topologies(name, topology, chips, bounds):
  slice_ = parse_slice(name)
  assert (slice_.topology, slice_.chips, slice_.chips_per_host_bounds) == (
      topology, chips, bounds)


@pytest.mark.parametrize('name', ['v9-8', 'v5p', 'v5p-6', 'v5e-24', 'v4-4', 'tpu-8'])
def test_unknown_slice_names_are_errors(name):
  with pytest.raises(InputError, match='--topology'):
    parse_slice(name)


def test_libtpu_gives_one_device_a_chip():
  assert len(parse_slice('v4-16').devices()) == 8


def sorting_config(batch_size: int):
  config = load_config('sft.py:sorting')
  config.train.batch_size = batch_size
  return config


def test_sft_step_fits_and_memory_grows_with_the_batch():
  small, large = (aot.report(sorting_config(b), 'v5p-8') for b in (32, 64))
  assert small['chips'] == 4 and small['hbm_gib'] == 95 and small['fits']
  assert 0 < small['per_chip_gib'] < small['hbm_gib']
  assert small['per_chip_gib'] == pytest.approx(
      small['argument_gib'] + small['output_gib'] - small['alias_gib'] + small['temp_gib'])
  assert small['compile_s'] > 0 and 0 < small['mfu_bound'] <= 1
  assert large['per_chip_gib'] > small['per_chip_gib']
  assert large['model_tflops_per_chip'] == pytest.approx(2 * small['model_tflops_per_chip'])


def test_scanned_layers_compile_one_block():
  """The scanned step's program does not grow with depth, where the unrolled one does."""
  def lowered_size(n_layers, scan_layers):
    config = sorting_config(32)
    config.model.n_layers, config.model.scan_layers = n_layers, scan_layers
    return len(aot.compile_train_step(config, parse_slice('v5p-8').devices()).executable.as_text())
  assert lowered_size(6, True) < 1.05 * lowered_size(2, True)
  assert lowered_size(6, False) > 1.5 * lowered_size(2, False)


@pytest.mark.parametrize('config_file', ['sft.py:sorting', 'dpo.py:tiny'])
def test_a_chip_flops_are_those_of_its_rows_every_layer_counted(config_file):
  """chip_hlo_flops, from one and two layers of the step on this CPU for one chip's rows,
  equals the CPU's count of all four layers, and XLA's count of the TPU step when nothing
  hides work there (data parallelism, layers unrolled, sequences in one log-prob chunk); the
  same FSDP step with scanned layers, counted on the TPU, misses most of it."""
  config = load_config(config_file)
  config.train.batch_size, config.model.n_layers, config.model.scan_layers = 32, 4, False
  slice_ = parse_slice('v5p-8')
  counted = aot.chip_hlo_flops(config, slice_)
  assert counted == pytest.approx(aot.step_flops_on_cpu(config, slice_, 4), rel=1e-4)
  assert counted == pytest.approx(aot.hlo_flops(aot.compile_train_step(config, slice_.devices())),
                                  rel=0.03)
  config.model.scan_layers, config.mesh.data, config.mesh.fsdp = True, 1, -1
  assert aot.hlo_flops(aot.compile_train_step(config, slice_.devices())) < 0.6 * counted
  report = aot.report(config, 'v5p-8')
  assert report['hlo_tflops_per_chip'] * 1e12 == pytest.approx(counted)
  assert report['fits'] and 0 < report['mfu_bound'] <= 1


def test_splash_attention_compiles_into_the_sharded_scanned_step(monkeypatch):
  """The Pallas kernel itself (not its interpreter) lowered for TPU, once per device under
  shard_map, inside the scanned FSDP train step, where 'auto' chooses it for the TPU compiled
  for (not 'chunked', this CPU's choice)."""
  config = sorting_config(32)
  config.train.seq_len, config.model.attention, config.model.scan_layers = 256, 'auto', True
  config.mesh.data, config.mesh.fsdp = 1, -1
  called = []
  monkeypatch.setattr(attention, 'splash_attention',
                      lambda *args: called.append(1) or splash_attention(*args))
  assert aot.compile_train_step(config, parse_slice('v5p-8').devices()).oom is None
  assert called  # Traced once for the scanned block (and its rematerialization).

  mesh = parallel.make_mesh({'data': 1, 'fsdp': -1}, parse_slice('v5p-8').devices())
  rows = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
      shape, dtype, sharding=parallel.batch_sharding(mesh, parallel.DEFAULT_RULES, len(shape)))
  splash = jax.jit(lambda q, k, v, valid: splash_attention(
      q, k, v, AttentionMask(positions_from_mask(valid), positions_from_mask(valid), valid)))
  with jax.set_mesh(mesh):
    lowered = splash.lower(rows(4, 256, 4, 8), rows(4, 256, 2, 8), rows(4, 256, 2, 8),
                           rows(4, 256, dtype=jnp.bool_))
  assert lowered.as_text().count('tpu_custom_call') >= 1  # The kernel, not an emulation.
  lowered.compile()


def test_a_slice_comes_from_the_flag_or_the_preset():
  with pytest.raises(InputError, match='--topology'):
    aot.report(sorting_config(32))
  assert load_config('sft.py:llama3-8b').slice == 'v5p-64'


@pytest.mark.parametrize('model', sorted(POD_SLICES))
@pytest.mark.parametrize('config_file', ['sft.py', 'rm.py', 'dpo.py', 'ppo.py', 'grpo.py'])
def test_pod_presets_split_over_their_slice(config_file, model):
  config = load_config(f'{config_file}:{model}')
  assert config.slice == POD_SLICES[model] and config.model.scan_layers
  check_batch_sizes(config, parallel.make_mesh(config.mesh, parse_slice(config.slice).devices()))


def test_dpo_step_counts_the_frozen_reference():
  config = load_config('dpo.py:tiny')
  result = aot.report(config, 'v5e-4')
  train = config.train
  tokens = train.batch_size * 2 * train.seq_len  # Pairs.
  step_flops = to_model_config(config.model).flops_per_token(train.seq_len) * tokens
  assert result['fits'] and result['model_tflops_per_chip'] == pytest.approx(
      step_flops * 4 / 3 / 4 / 1e12)
  assert result['hlo_tflops_per_chip'] > result['model_tflops_per_chip'] * 0.9


@pytest.mark.parametrize('lora_rank', [0, 4], ids=['full', 'lora'])
def test_kto_step_counts_its_mismatched_pairs_and_the_reference(lora_rank):
  """KTO trains on its examples and runs forward only the mismatched pairs through the policy
  and both through the reference (a frozen copy, or with LoRA the policy's base)."""
  config = load_config('kto.py:tiny')
  config.model.lora_rank = lora_rank
  result = aot.report(config, 'v5e-4')
  train, cfg = config.train, to_model_config(config.model)
  rows = train.batch_size * train.seq_len
  model_flops = (cfg.flops_per_token(train.seq_len) * rows +
                 cfg.flops_per_token(train.seq_len, forward_only=True) * 3 * rows)
  assert aot.reference_kind(config) == ('adapters' if lora_rank else 'frozen')
  assert result['fits'] and result['model_tflops_per_chip'] == pytest.approx(
      model_flops / 4 / 1e12)
  assert result['hlo_tflops_per_chip'] > result['model_tflops_per_chip'] * 0.9


@pytest.mark.parametrize('lora_rank', [0, 4], ids=['full', 'lora'])
def test_online_rl_compiles_sampling_scoring_and_the_update(lora_rank):
  """GRPO's three programs fit; each counts the models it does not take as arguments (the
  update: the reference and the reward model; with LoRA the reward model alone, the reference
  being the policy's base), and the report's total is the largest program's."""
  config = load_config('grpo.py:tiny')
  config.model.hf_path = None  # The architecture of config.model.
  config.model.lora_rank = lora_rank
  config.rl.rollout_batch_size, config.rl.max_new_tokens = 16, 8
  config.train.seq_len = config.data.max_prompt_len + 8
  result = aot.report(config, 'v5p-8')
  programs = result['programs']
  assert set(programs) == {'sampling', 'scoring', 'train'} and result['fits']
  assert result['per_chip_gib'] == max(p['per_chip_gib'] for p in programs.values())
  assert result['compile_s'] == pytest.approx(sum(p['compile_s'] for p in programs.values()),
                                              abs=0.05)
  cfg = to_model_config(config.model).replace(lora_rank=0)  # Replicated (data=-1), float32.
  reference = 0 if lora_rank else cfg.num_params()
  other_models = 4 * (reference + cfg.replace(head='scalar').num_params())
  assert programs['train']['resident_gib'] * aot.GIB == pytest.approx(other_models)


def test_the_architecture_has_the_head_asked_for_with_or_without_a_checkpoint():
  """What aot and export rebuild: an RL policy is an LM even where config.model says 'scalar'."""
  config = load_config('rm.py:tiny')
  config.model.hf_path = None
  assert architecture(config.model).head == 'scalar'
  assert architecture(config.model, head='lm').head == 'lm'


def test_a_step_that_does_not_fit_exits_with_status_1():
  command = [sys.executable, '-m', 'rlhf_jax.aot', '--config=configs/sft.py:sorting',
             '--topology=v5e-4', '--config.train.batch_size=4194304']
  done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 1, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['fits'] is False and result['chips'] == 4 and result['hbm_gib'] == 16
  assert result['per_chip_gib'] > 16 and 'HBM' in result['xla_error']
