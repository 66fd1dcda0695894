"""`python -m rlhf_jax.export`: any checkpoint of a run to Hugging Face safetensors, in bfloat16
and sharded with an index, that transformers loads with our logits; to a URL and on to the Hub;
the end-of-run export in config.train.export_dtype; a missing step named with those there are.

One micro SFT run on the playground (in-process, on the 8 virtual devices of conftest.py):
4 steps, checkpoints at 2 and 4.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
import torch
import transformers
from flax import nnx

from rlhf_jax import algorithms, export, storage
from rlhf_jax.config import load_config, to_model_config
from rlhf_jax.models import Transformer, load_hf, loading
from rlhf_jax.models.loading import is_export
from rlhf_jax.engine.metrics import read_metrics
from rlhf_jax.playground import tasks
from devices import environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO = {'model.n_layers': 1, 'model.d_model': 32, 'model.n_heads': 2, 'model.n_kv_heads': 1,
         'model.d_ff': 64, 'train.steps': 4, 'train.checkpoint_every': 2,
         'train.batch_size': 8, 'train.seq_len': 48, 'train.eval_every': 0,
         'train.export_hf': True, 'train.export_dtype': 'bfloat16',
         'train.progress_bar': False, 'train.tensorboard': False, 'eval.gold': '',
         'data.playground.train_size': 200, 'data.playground.eval_size': 32,
         'optim.lr': 1e-2, 'optim.warmup_steps': 1}


def micro_config():
  config = load_config('sft.py:tiny')
  config.update_from_flattened_dict(MICRO)
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('sft')
  algorithms.run(micro_config(), str(workdir))
  return workdir


def checkpoint_model(workdir, step: int, rounding=jnp.bfloat16) -> Transformer:
  """Our model with the parameters of checkpoint `step` rounded to `rounding` (float32
  arrays), read with orbax alone."""
  params = ocp.StandardCheckpointer().restore(
      workdir / 'checkpoints' / str(step) / 'state')['params']
  cfg = to_model_config(micro_config().model)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

  def rounded(path, variable):
    node = params
    for key in path:
      node = node[str(key)]
    return variable.replace(jnp.asarray(node['value']).astype(rounding).astype(jnp.float32))
  state = nnx.from_flat_state([(p, rounded(p, v)) for p, v in nnx.to_flat_state(abstract)])
  return nnx.merge(graphdef, state)


def stored_dtypes(directory) -> set[str]:
  dtypes = set()
  for file in pathlib.Path(directory).glob('*.safetensors'):
    with safetensors.safe_open(file, framework='np') as f:
      dtypes |= {str(f.get_tensor(name).dtype) for name in f.keys()}
  return dtypes


def test_an_intermediate_step_exports_to_sharded_bfloat16_that_transformers_loads(run, tmp_path):
  out = tmp_path / 'step2'
  assert export.export(str(run), str(out), step=2, max_shard_size='40KB') == 2  # bf16 default.
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  files = sorted(set(index['weight_map'].values()))
  assert len(files) >= 2
  assert files == [f'model-{i:05d}-of-{len(files):05d}.safetensors'
                   for i in range(1, len(files) + 1)]
  assert sorted(p.name for p in out.glob('*.safetensors')) == files
  total = 0
  for file in files:
    with safetensors.safe_open(out / file, framework='np') as f:
      assert all(index['weight_map'][name] == file for name in f.keys())
      total += sum(f.get_tensor(name).nbytes for name in f.keys())
  assert index['metadata']['total_size'] == total
  assert stored_dtypes(out) == {'bfloat16'}
  assert json.loads((out / 'config.json').read_text())['dtype'] == 'bfloat16'
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(
      run / 'data' / 'tokenizer').get_vocab()

  # transformers in float32 on the bf16 weights against our model on the checkpoint's
  # parameters rounded to bf16: the same weights in float32 arithmetic, so only the order of
  # float32 operations differs (here 1e-7 on logits of size 0.5; the parity tests find ~5e-6
  # on larger random models), far below bf16's rounding of the weights (2^-9 relative).
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ids = tokenizer(tasks.sample_prompts(0, 'eval', 1)[0])['input_ids']
  with torch.no_grad():
    torch_logits = torch_model.eval()(torch.tensor([ids])).logits.numpy()
  ours = np.asarray(checkpoint_model(run, 2)(np.array([ids])))
  np.testing.assert_allclose(torch_logits, ours, atol=1e-5)
  unrounded = np.asarray(checkpoint_model(run, 2, rounding=jnp.float32)(np.array([ids])))
  assert np.abs(unrounded - ours).max() > 1e-4  # What bf16 changes, the test would see.
  # Step 2, not the last: the end-of-run export (step 4) gives other logits.
  last = np.asarray(load_hf(run / 'hf')(np.array([ids])))
  assert np.abs(last - ours).max() > 1e-2


def test_the_end_of_run_export_takes_export_dtype(run):
  assert sorted(p.name for p in (run / 'hf').glob('*.safetensors')) == ['model.safetensors']
  assert stored_dtypes(run / 'hf') == {'bfloat16'}


def test_an_export_to_a_url_is_pushed_to_the_hub(run, tmp_path, monkeypatch):
  """The latest step, in float32: the end-of-run export's weights (it rounded them to bf16)."""
  calls = []

  class FakeHfApi:
    def create_repo(self, repo_id, **options):
      calls.append(('create_repo', repo_id, options))

    def upload_folder(self, **options):
      calls.append(('upload_folder', sorted(os.listdir(options.pop('folder_path'))), options))
  monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # Where the URL's copy goes.
  url = f'memory://export/{tmp_path.name}/hf'
  assert export.export(str(run), url, dtype='float32', push_to_hub='me/micro-sft') == 4
  assert is_export(url)
  exported, at_the_end = (jax.tree.leaves(nnx.state(load_hf(path))) for path in (url, run / 'hf'))
  for x, y in zip(exported, at_the_end, strict=True):
    np.testing.assert_array_equal(np.asarray(x).astype(jnp.bfloat16), np.asarray(y))
  assert calls[0] == ('create_repo', 'me/micro-sft', {'exist_ok': True})
  assert calls[1][0] == 'upload_folder' and 'model.safetensors' in calls[1][1]
  assert calls[1][2] == {'repo_id': 'me/micro-sft', 'commit_message': f'{run}: step 4'}


def test_a_second_stage_starts_from_the_first_stages_export_at_a_url(run, tmp_path,
                                                                    monkeypatch):
  """SFT's step 2 exported in bf16 shards to memory:// (fsspec's, standing in for gs://); a DPO
  run starts from that URL (its model and tokenizer) and is exported in bf16 shards to another
  URL, which transformers loads with our logits. The workdirs stay local: orbax writes
  checkpoints through tensorstore, which knows gs:// but not fsspec's memory://."""
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # Where the URLs' copies go.
  sft_url, dpo_url = (f'memory://pipeline/{tmp_path.name}/{name}' for name in ('sft', 'dpo'))
  export.export(str(run), sft_url, step=2, max_shard_size='40KB')
  reads = []
  load_hf_of = loading.load_hf
  monkeypatch.setattr(loading, 'load_hf', lambda path, *a, **k: reads.append(str(path)) or
                      load_hf_of(path, *a, **k))
  config = load_config('dpo.py:tiny')
  config.update_from_flattened_dict({
      'model.hf_path': sft_url, 'data.tokenizer': '', 'train.steps': 2,
      'train.checkpoint_every': 2, 'train.batch_size': 8, 'train.seq_len': 48,
      'train.eval_every': 0, 'train.progress_bar': False, 'train.tensorboard': False,
      'data.playground.train_size': 32, 'data.playground.eval_size': 8,
      'eval.num_prompts': 8, 'eval.max_new_tokens': 8, 'optim.lr': 1e-3,
      'optim.warmup_steps': 1})
  dpo_workdir = tmp_path / 'dpo'
  algorithms.run(config, str(dpo_workdir))
  assert reads == [storage.local_copy(sft_url)]  # The URL's copy on this host, read once.
  first = read_metrics(dpo_workdir / 'metrics.jsonl')[0]
  assert first['loss'] == pytest.approx(np.log(2), abs=1e-5)  # The policy is its reference.

  assert export.export(str(dpo_workdir), dpo_url, max_shard_size='40KB') == 2
  local = storage.local_copy(dpo_url)
  index = json.loads(pathlib.Path(local, 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) >= 2
  assert stored_dtypes(local) == {'bfloat16'}
  tokenizer = transformers.AutoTokenizer.from_pretrained(local)
  ids = tokenizer(tasks.sample_prompts(1, 'eval', 1)[0])['input_ids']
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
  with torch.no_grad():
    torch_logits = torch_model.eval()(torch.tensor([ids])).logits.numpy()
  ours = np.asarray(load_hf(dpo_url)(np.array([ids])))
  np.testing.assert_allclose(torch_logits, ours, atol=1e-5)
  sft = np.asarray(load_hf(sft_url)(np.array([ids])))
  assert np.abs(ours - sft).max() > 1e-3  # DPO moved the model it started from.


def test_a_step_that_is_not_there_is_an_error_listing_those_that_are(run, tmp_path):
  env = environment(1)
  done = subprocess.run(
      [sys.executable, '-m', 'rlhf_jax.export', f'--workdir={run}', '--step=3',
       f'--out={tmp_path / "out"}'], env=env, cwd=ROOT, capture_output=True, text=True,
      timeout=240, check=False)
  assert done.returncode == 1, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == (
      f'rlhf_jax.export: error: No checkpoint of step 3 in {run / "checkpoints"}; it has steps '
      '2, 4.')
  assert not (tmp_path / 'out').exists()
