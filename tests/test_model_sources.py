"""Models from anywhere (`models.sources.local_dir`): a local directory as it is, a directory on
shared storage copied to each host once per version of its files, a Hugging Face Hub id from
the HF cache (offline here: a cache laid out as `snapshot_download` leaves it), and errors that
name the config key and what was tried."""

import os
import re
import shutil
import tempfile
import threading

import fsspec
import huggingface_hub
import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import storage
from rlhf_jax.config import base_config, check_paths, data_config
from rlhf_jax.context import RunContext
from rlhf_jax.errors import NotFound
from rlhf_jax.models import ModelConfig, Transformer, load_hf, save_hf
from rlhf_jax.models.sources import local_dir
from rlhf_jax.playground.tokenizer import build_playground_tokenizer

CFG = ModelConfig(vocab_size=512, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
REVISION = '0123456789abcdef0123456789abcdef01234567'  # A commit hash, as the Hub names them.


@pytest.fixture(autouse=True)
def local_tmp(tmp_path, monkeypatch):
  """This host's temporary space (where URL copies go) and working directory in tmp_path."""
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  monkeypatch.chdir(tmp_path)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An empty Hugging Face cache, offline (huggingface_hub reads both at import)."""
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  return tmp_path / 'hub'


def save_model(path, seed: int):
  save_hf(Transformer(CFG, rngs=nnx.Rngs(seed)), path)
  return path


def assert_same_params(model, expected):
  leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
  for leaf, want in zip(leaves, jax.tree.leaves(nnx.state(expected)), strict=True):
    np.testing.assert_array_equal(leaf, np.asarray(want))


def run_config(model: str, tokenizer: str = 'playground'):
  config = base_config()
  config.data = data_config({})
  config.model.hf_path, config.data.tokenizer = model, tokenizer
  return config


def test_a_local_directory_is_used_where_it_is(tmp_path):
  path = str(save_model(tmp_path / 'hf', 0))
  assert local_dir(path) == path
  assert local_dir('hf') == 'hf'  # Relative, and shaped like a Hub id: still the directory.


def test_a_url_loads_like_the_local_directory_and_is_copied_once_per_version(tmp_path):
  url = f'memory://sources/{tmp_path.name}/hf'
  storage.upload_dir(save_model(tmp_path / 'hf', 0), url)
  assert_same_params(load_hf(url), load_hf(tmp_path / 'hf'))
  copy = local_dir(url)
  assert copy.startswith(str(tmp_path)) and local_dir(url) == copy  # Reused.
  # The stage that wrote it ran again: new files at the same URL make a new copy.
  storage.upload_dir(save_model(tmp_path / 'hf1', 1), url)
  assert local_dir(url) != copy
  assert_same_params(load_hf(url), load_hf(tmp_path / 'hf1'))


def test_processes_copying_at_once_all_get_one_whole_copy(tmp_path, monkeypatch):
  """Four copies of one URL at once, each held until all have copied, so that every one
  renames into place after the first: all use the first, and no partial copy is left."""
  url = f'memory://sources/{tmp_path.name}/hf'
  storage.upload_dir(save_model(tmp_path / 'hf', 0), url)
  all_copied = threading.Barrier(4)
  memory = type(fsspec.filesystem('memory'))
  get = memory.get

  def get_then_wait(self, *args, **kwargs):
    get(self, *args, **kwargs)
    all_copied.wait(timeout=30)
  monkeypatch.setattr(memory, 'get', get_then_wait)
  copies = []
  threads = [threading.Thread(target=lambda: copies.append(storage.local_copy(url)))
             for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(copies) == 4 and len(set(copies)) == 1
  assert sorted(os.listdir(copies[0])) == sorted(os.listdir(tmp_path / 'hf'))
  assert os.listdir(os.path.dirname(copies[0])) == [os.path.basename(copies[0])]


def test_a_hub_id_loads_offline_from_the_cache(tmp_path, hub_cache):
  save_model(tmp_path / 'hf', 0)
  build_playground_tokenizer(CFG.vocab_size).save_pretrained(tmp_path / 'hf')
  repo = hub_cache / 'models--rlhf-jax-tests--tiny'
  shutil.copytree(tmp_path / 'hf', repo / 'snapshots' / REVISION)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(REVISION)

  assert local_dir('rlhf-jax-tests/tiny') == str(repo / 'snapshots' / REVISION)
  assert_same_params(load_hf('rlhf-jax-tests/tiny'), load_hf(tmp_path / 'hf'))
  config = run_config('rlhf-jax-tests/tiny', tokenizer='')  # The model's tokenizer.
  check_paths(config)
  assert len(RunContext(config, str(tmp_path / 'run')).tokenizer) == CFG.vocab_size


def test_an_absent_hub_id_offline_names_the_key_and_what_was_tried(hub_cache):
  with pytest.raises(NotFound, match=re.escape(
      "config.model.hf_path='rlhf-jax-tests/absent': no such local directory; as a Hugging "
      f'Face Hub id: HF_HUB_OFFLINE=1 and the cache {hub_cache} does not hold it.')):
    check_paths(run_config('rlhf-jax-tests/absent'))
  with pytest.raises(NotFound, match=r"config\.data\.tokenizer='rlhf-jax-tests/absent': no "):
    check_paths(run_config('', tokenizer='rlhf-jax-tests/absent'))


def test_a_missing_local_path_or_url_is_never_looked_up_on_the_hub(tmp_path, monkeypatch):
  def no_hub(*args, **kwargs):
    raise AssertionError(f'asked the Hub for {args}')
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', no_hub)
  for path in ('runs/sft/hf', './hf', '../hf', str(tmp_path / 'absent')):
    with pytest.raises(NotFound, match=re.escape(
        f'config.model.hf_path={path!r}: no such directory (give a local directory, a URL')):
      check_paths(run_config(path))
  url = f'memory://sources/{tmp_path.name}/absent'
  with pytest.raises(NotFound, match=re.escape(
      f'config.model.hf_path={url!r}: no such directory at that URL.')):
    check_paths(run_config(url))
