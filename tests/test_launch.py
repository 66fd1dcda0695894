"""rlhf_jax.launch: slice topologies, workdir checks, and the gcloud commands it prints."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from rlhf_jax.launch import (check_workdir, read_sweep_points, remote_path, runs,
                             setup_commands, topology, train_command)

LAUNCH = [sys.executable, '-m', 'rlhf_jax.launch', '--tpu=my-v4', '--zone=us-central2-b',
          '--config=configs/sft.py:small', '--dry_run']
SPACED = '--config.data.sources.sft=jsonl:/data/my sft-{split}.jsonl'  # Needs quoting.


def launch(*args) -> subprocess.CompletedProcess:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, cwd=root)


@pytest.mark.parametrize('accelerator, hosts, devices', [
    ('v4-8', 1, 4),  # 8 TensorCores = 4 chips (one device each, megacore) on one VM.
    ('v4-32', 4, 16),  # 16 chips, 4 a VM.
    ('v5p-16', 2, 8),  # Cloud TPU docs: 2x2x2, 16 cores, 8 chips, 2 hosts.
    ('v5p-128', 16, 64),  # 4x4x4: 128 cores, 64 chips, 16 hosts.
    ('v3-32', 4, 32),  # No megacore: a device per TensorCore.
    ('v2-8', 1, 8),
    ('v5litepod-8', 1, 8),  # v5e: the number counts chips; 8 on one VM.
    ('v5litepod-16', 4, 16),  # Beyond one VM: 4 chips a VM.
    ('v6e-4', 1, 4),
    ('v6e-256', 64, 256),  # Docs: 16x16, 256 chips, 64 VMs.
])
def test_topology_of_accelerator_types(accelerator, hosts, devices):
  assert (topology(accelerator).hosts, topology(accelerator).devices) == (hosts, devices)


@pytest.mark.parametrize('accelerator', ['v9-32', 'tpu-v4-32', 'v4', 'v4-x', 'v5e-16'])
def test_unknown_accelerator_lists_the_known_ones(accelerator):
  with pytest.raises(ValueError, match=f"Unknown --accelerator='{accelerator}'; known types: "
                     'v2-N, v3-N, v4-N, v5p-N, v5litepod-N, v6e-N'):
    topology(accelerator)


@pytest.mark.parametrize('accelerator', ['v4-7', 'v4-12', 'v4-0', 'v6e-10'])
def test_sizes_that_are_no_slice_are_refused(accelerator):
  with pytest.raises(ValueError, match='is not a v[46]e? slice'):
    topology(accelerator)


def test_a_multi_host_slice_needs_a_gs_workdir():
  with pytest.raises(ValueError, match=r"--workdir='runs/sft' is not on Cloud Storage.*4 hosts"):
    check_workdir('runs/sft', hosts=4)
  check_workdir('gs://bucket/sft', hosts=4)
  check_workdir('runs/sft', hosts=1)


def test_dry_run_for_a_v4_32_slice():
  result = launch('--accelerator=v4-32', '--workdir=gs://bucket/sft small', '--project=proj',
                  '--env=XLA_FLAGS=--xla_a=1 --xla_b', '--', '--config.optim.lr=1e-4', SPACED)
  assert result.returncode == 0, result.stderr
  header, command = result.stdout.splitlines()
  assert header == '# v4-32: hosts (JAX processes): 4, devices: 16'
  *gcloud, remote = shlex.split(command)
  assert gcloud == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v4',
                    '--zone=us-central2-b', '--project=proj', '--worker=all']
  assert remote.startswith('--command=')
  assert shlex.split(remote.removeprefix('--command=')) == [
      'cd', 'rlhf_jax', '&&', 'env', 'XLA_FLAGS=--xla_a=1 --xla_b', 'python3', '-m',
      'rlhf_jax.main', '--config=configs/sft.py:small', '--workdir=gs://bucket/sft small',
      '--config.distributed.enabled=True', '--config.optim.lr=1e-4', SPACED]


def test_dry_run_refuses_a_local_workdir_on_several_hosts_and_unknown_types():
  result = launch('--accelerator=v4-32', '--workdir=runs/sft')
  assert result.returncode == 1 and not result.stdout
  assert "--workdir='runs/sft' is not on Cloud Storage" in result.stderr
  result = launch('--accelerator=v4_32', '--workdir=gs://bucket/sft')
  assert result.returncode == 1 and 'known types: v2-N' in result.stderr


def test_a_single_host_slice_takes_a_local_workdir_and_no_distributed_flag():
  result = launch('--accelerator=v5litepod-8', '--workdir=runs/sft')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == '# v5litepod-8: hosts (JAX processes): 1, devices: 8'
  assert 'distributed' not in result.stdout


def test_the_host_command_survives_a_real_shell(tmp_path):
  """bash runs the command as ssh would: a stand-in python prints its argv and environment."""
  fake_python = tmp_path / 'python'
  fake_python.write_text(f'#!{sys.executable}\nimport json, os, sys\nprint(json.dumps('
                         "[os.getcwd(), os.environ['XLA_FLAGS'], *sys.argv[1:]]))\n")
  fake_python.chmod(0o755)
  command = train_command(repo_dir=str(tmp_path), python=str(fake_python), config='c.py:x',
                          workdir="gs://b/it's", overrides=[SPACED, '--config.seed=$HOME'],
                          env=['XLA_FLAGS=--a "b" $c'], distributed=True)
  output = subprocess.run(['bash', '-c', command], capture_output=True, text=True, check=True)
  assert json.loads(output.stdout) == [
      str(tmp_path), '--a "b" $c', '-m', 'rlhf_jax.main', '--config=c.py:x',
      "--workdir=gs://b/it's", '--config.distributed.enabled=True', SPACED,
      '--config.seed=$HOME']


def test_env_entries_must_be_assignments():
  with pytest.raises(ValueError, match="--env='1X=2' is not NAME=VALUE"):
    train_command(repo_dir='r', python='p', config='c', workdir='w', overrides=[],
                  env=['1X=2'], distributed=False)


def test_repo_dir_under_home_is_made_relative():
  assert [remote_path(p) for p in ('~/rlhf_jax', '~', 'code/rlhf', '/opt/rlhf')] == [
      'rlhf_jax', '.', 'code/rlhf', '/opt/rlhf']


def test_setup_copies_the_code_then_installs_it(tmp_path):
  mkdir, scp, install = setup_commands(repo_dir='~/my code', python='python3',
                                       source_dir=tmp_path, tpu='t', zone='z', project=None)
  where = ['--zone=z', '--worker=all']
  assert mkdir == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 't', *where,
                   "--command=mkdir -p 'my code'"]
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse',
                 str(tmp_path / 'setup.py'), str(tmp_path / 'rlhf_jax'),
                 str(tmp_path / 'configs'), 't:my code', *where]
  assert install[:-1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 't', *where]
  assert shlex.split(install[-1].removeprefix('--command=')) == [
      'cd', 'my code', '&&', 'python3', '-m', 'pip', 'install', '-e', '.[gcs]', 'jax[tpu]']


def test_sweep_points_give_one_run_each_in_its_own_workdir(tmp_path):
  path = tmp_path / 'points.txt'
  path.write_text('# lr sweep\n--config.optim.lr=1e-4 --config.seed=1\n\n'
                  f"--config.optim.lr=3e-4 '{SPACED}'  # quoted\n")
  points = read_sweep_points(str(path))
  assert runs('gs://b/sweep', ['--config.train.steps=10'], points) == [
      ('gs://b/sweep/0', ['--config.train.steps=10', '--config.optim.lr=1e-4',
                          '--config.seed=1']),
      ('gs://b/sweep/1', ['--config.train.steps=10', '--config.optim.lr=3e-4', SPACED])]
  assert runs('gs://b/run', ['--x=1'], None) == [('gs://b/run', ['--x=1'])]
  path.write_text('# nothing\n\n')
  with pytest.raises(ValueError, match='lists no points'):
    read_sweep_points(str(path))


def test_dry_run_of_a_sweep_prints_one_command_per_point(tmp_path):
  path = tmp_path / 'points.txt'
  path.write_text('--config.seed=1\n--config.seed=2\n')
  result = launch('--accelerator=v4-16', '--workdir=gs://b/sweep', f'--sweep_points={path}')
  assert result.returncode == 0, result.stderr
  header, *commands = result.stdout.splitlines()
  assert header == '# v4-16: hosts (JAX processes): 2, devices: 8'
  inner = [shlex.split(shlex.split(c)[-1].removeprefix('--command=')) for c in commands]
  assert [(words[7], words[-1]) for words in inner] == [
      ('--workdir=gs://b/sweep/0', '--config.seed=1'),
      ('--workdir=gs://b/sweep/1', '--config.seed=2')]
