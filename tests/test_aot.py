"""rlhf_jax.aot: a run's train step compiled for a TPU slice on this CPU machine (libtpu)."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_jax import aot
from rlhf_jax.config import load_config, to_model_config
from rlhf_jax.errors import InputError
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


def test_dpo_step_counts_the_frozen_reference():
  config = load_config('dpo.py:tiny')
  result = aot.report(config, 'v5e-4')
  train = config.train
  tokens = train.batch_size * 2 * train.seq_len  # Pairs.
  step_flops = to_model_config(config.model).flops_per_token(train.seq_len) * tokens
  assert result['fits'] and result['model_tflops_per_chip'] == pytest.approx(
      step_flops * 4 / 3 / 4 / 1e12)
  assert result['hlo_tflops_per_chip'] > result['model_tflops_per_chip'] * 0.9


def test_online_rl_is_not_compiled_yet():
  with pytest.raises(InputError, match='config.algorithm'):
    aot.report(load_config('ppo.py:tiny'), 'v5p-8')


def test_a_step_that_does_not_fit_exits_with_status_1():
  command = [sys.executable, '-m', 'rlhf_jax.aot', '--config=configs/sft.py:sorting',
             '--topology=v5e-4', '--config.train.batch_size=4194304']
  done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 1, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['fits'] is False and result['chips'] == 4 and result['hbm_gib'] == 16
  assert result['per_chip_gib'] > 16 and 'HBM' in result['xla_error']
