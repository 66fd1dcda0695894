"""MetricWriter: JSONL round trip, resume truncation, TensorBoard events, process 0 only; the
other files of a workdir (samples, plots, HF export, reference log-probs) on a URL (storage)."""

import json
import os
import pathlib
import struct
import tempfile
import types

import fsspec
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx
from tensorboardX.proto import event_pb2

from rlhf_jax import parallel
from rlhf_jax.evals import best_of_n
from rlhf_jax.evals.calibration import reliability_diagram
from rlhf_jax.evals.samples import GoldRewardOfSamples
from rlhf_jax.models import Transformer, load_hf
from rlhf_jax.models.presets import get_preset
from rlhf_jax.parallel import DEFAULT_RULES
from rlhf_jax.storage import (exists, is_remote, local_cache_dir, open_file, replace_file,
                              staged_dir, upload_dir)
from rlhf_jax.algorithms.dpo import attach_reference_logps
from rlhf_jax.models.loading import LoadedModel, export_hf
from rlhf_jax.engine.metrics import MetricWriter, progress_bar, read_metrics, write_config


def read_events(logdir) -> list[list[event_pb2.Event]]:
  """The events of each file in a TensorBoard logdir (TFRecords: length, crc, data, crc)."""
  files = []
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    events, offset = [], 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
    files.append(events)
  return files


def scalars(events) -> list[tuple[int, str, float]]:
  return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def test_round_trip_of_jax_numpy_and_python_values(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(np.int64(3), {'loss': jnp.float32(0.25), 'tokens': jnp.int32(7),
                             'lr': np.float64(1e-3), 'grad_norm': np.float32(2.5),
                             'seqs': np.int64(4), 'frac': 0.5, 'hist': jnp.arange(3)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    assert f.read() == ('{"frac": 0.5, "grad_norm": 2.5, "hist": [0, 1, 2], "loss": 0.25, '
                        '"lr": 0.001, "seqs": 4, "step": 3, "tokens": 7}\n')
  [record] = read_metrics(tmp_path / 'metrics.jsonl')
  assert all(type(record[k]) is int for k in ('step', 'tokens', 'seqs'))
  assert all(type(record[k]) is float for k in ('loss', 'lr', 'grad_norm'))
  assert not os.path.exists(tmp_path / 'tensorboard')


def write_steps(workdir, steps, *, start_step=0, scale=1.0):
  writer = MetricWriter(str(workdir), start_step=start_step)
  for step in steps:
    writer.write(step, {'loss': jnp.float32(scale / step), 'tokens': np.int32(step)})
  writer.close()


def test_resume_drops_what_was_logged_after_the_checkpoint(tmp_path):
  write_steps(tmp_path, range(1, 7))
  write_steps(tmp_path, (5, 6), start_step=4, scale=2.0)  # Resumed from the step 4 checkpoint.
  records = read_metrics(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[3] == {'step': 4, 'loss': 0.25, 'tokens': 4}
  assert records[5] == {'step': 6, 'loss': np.float32(2 / 6).item(), 'tokens': 6}
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tensorboard']

  resumed, first = sorted(read_events(tmp_path / 'tensorboard'), key=len)
  assert [(step, tag) for step, tag, _ in scalars(first)] == [
      (step, tag) for step in range(1, 7) for tag in ('loss', 'tokens')]
  assert [s for s in scalars(resumed) if s[1] == 'tokens'] == [(5, 'tokens', 5), (6, 'tokens', 6)]
  # The resumed file tells TensorBoard to hide the first file's events from step 5 on.
  [purge] = [e for e in resumed if e.session_log.status == event_pb2.SessionLog.START]
  assert purge.step == 5


def test_a_line_cut_short_by_a_crash_is_dropped(tmp_path):
  write_steps(tmp_path, range(1, 4))
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"loss": 0.1, "st')
  assert [r['step'] for r in read_metrics(tmp_path / 'metrics.jsonl')] == [1, 2, 3]
  write_steps(tmp_path, [4], start_step=3)
  assert [r['step'] for r in read_metrics(tmp_path / 'metrics.jsonl')] == [1, 2, 3, 4]


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  writer = MetricWriter(str(tmp_path / 'workdir'))
  writer.write(1, {'loss': 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / 'workdir')
  assert progress_bar(10, 2, enabled=True).disable


def test_progress_bar_counts_steps_from_the_resumed_one():
  bar = progress_bar(10, 4, enabled=True)
  assert not bar.disable and (bar.n, bar.total, bar.unit) == (4, 10, 'step')
  bar.close()
  assert progress_bar(10, 4, enabled=False).disable


@pytest.fixture
def remote_workdir(tmp_path):
  """A workdir URL on fsspec's in-memory filesystem (standing in for gs://), removed after."""
  url = f'memory://{tmp_path.name}/run'
  yield url
  fs = fsspec.filesystem('memory')
  if fs.exists(url):
    fs.rm(url, recursive=True)


def test_remote_writer_uploads_every_record_and_resumes_like_a_local_one(remote_workdir,
                                                                         tmp_path):
  path = f'{remote_workdir}/metrics.jsonl'
  writer = MetricWriter(remote_workdir)  # TensorBoard asked for, skipped with a warning.
  writer.write(1, {'loss': jnp.float32(0.5)})
  assert read_metrics(path) == [{'step': 1, 'loss': 0.5}]  # Readable before close().
  writer.write(2, {'loss': 0.25})
  assert read_metrics(path) == [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25}]
  writer.close()

  write_steps(remote_workdir, range(3, 7), start_step=2)
  write_steps(remote_workdir, (5, 6), start_step=4, scale=2.0)  # Resumed from step 4.
  records = read_metrics(path)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[3] == {'step': 4, 'loss': 0.25, 'tokens': 4}
  assert records[5] == {'step': 6, 'loss': np.float32(2 / 6).item(), 'tokens': 6}
  assert fsspec.filesystem('memory').ls(remote_workdir, detail=False) == [
      f'/{tmp_path.name}/run/metrics.jsonl']  # No TensorBoard events, no temporary files.


def test_remote_and_local_files_are_byte_for_byte_equal(remote_workdir, tmp_path):
  for workdir in (remote_workdir, tmp_path):
    write_steps(workdir, range(1, 5))
    write_steps(workdir, [4], start_step=3, scale=3.0)
  with fsspec.open(f'{remote_workdir}/metrics.jsonl') as remote, \
      open(tmp_path / 'metrics.jsonl', 'rb') as local:
    assert remote.read() == local.read()


def test_a_resumed_remote_writer_drops_later_records_before_writing_any(remote_workdir):
  write_steps(remote_workdir, range(1, 5))
  MetricWriter(remote_workdir, start_step=2, tensorboard=False).close()
  assert [r['step'] for r in read_metrics(f'{remote_workdir}/metrics.jsonl')] == [1, 2]


@pytest.mark.parametrize('remote', [False, True])
def test_write_config_writes_sorted_json(remote, remote_workdir, tmp_path):
  workdir = remote_workdir if remote else str(tmp_path / 'new' / 'run')
  config = ml_collections.ConfigDict({'seed': 3, 'optim': {'lr': 1e-3, 'name': 'adamw'}})
  write_config(config, workdir)
  with fsspec.open(f'{workdir}/config.json', 'r') as f:
    text = f.read()
  assert text == ('{\n  "optim": {\n    "lr": 0.001,\n    "name": "adamw"\n  },\n'
                  '  "seed": 3\n}')


# Writers of other files in a workdir, through rlhf_jax.storage: local paths or URLs alike.


def test_storage_helpers_on_local_paths_and_urls(remote_workdir, tmp_path):
  assert is_remote('gs://bucket/run') and is_remote(remote_workdir)
  assert not is_remote(tmp_path) and not is_remote('runs/gs:/x')
  for root in (remote_workdir, str(tmp_path / 'run')):
    path = f'{root}/deep/er/file.txt'
    assert not exists(path)
    with open_file(path, 'w') as f:  # Local parent directories are created.
      f.write('one\ntwo\n')
    with open_file(path) as f:
      assert exists(path) and f.read() == 'one\ntwo\n'
    replace_file(f'{root}/blob.bin', b'\x00\x01')
    replace_file(f'{root}/blob.bin', b'\x02')
    with fsspec.open(f'{root}/blob.bin', 'rb') as f:
      assert f.read() == b'\x02'
    assert not exists(f'{root}/blob.bin.tmp')


def test_upload_dir_and_staged_dir_copy_a_tree(remote_workdir, tmp_path):
  (tmp_path / 'src' / 'sub').mkdir(parents=True)
  (tmp_path / 'src' / 'a.txt').write_text('a')
  (tmp_path / 'src' / 'sub' / 'b.txt').write_text('b')
  upload_dir(tmp_path / 'src', f'{remote_workdir}/copy')
  fs = fsspec.filesystem('memory')
  root = f'/{tmp_path.name}/run'
  assert sorted(fs.find(f'{root}/copy')) == [f'{root}/copy/a.txt', f'{root}/copy/sub/b.txt']
  assert fs.cat(f'{root}/copy/sub/b.txt') == b'b'

  target = tmp_path / 'local'
  with staged_dir(str(target)) as local:  # Written beside the target, renamed into place.
    assert os.path.dirname(local) == str(tmp_path) and not target.exists()
    pathlib.Path(local, 'd.txt').write_text('d')
  assert (target / 'd.txt').read_text() == 'd' and os.listdir(tmp_path).count('local') == 1
  with pytest.raises(OSError):  # E.g. a full disk: the target stays as it was.
    with staged_dir(str(target)) as local:
      pathlib.Path(local, 'e.txt').write_text('e')
      raise OSError(28, 'No space left on device')
  assert os.listdir(target) == ['d.txt'] and sorted(os.listdir(tmp_path)) == ['local', 'src']
  with staged_dir(f'{remote_workdir}/staged') as local:
    assert not is_remote(local)
    with open(os.path.join(local, 'c.txt'), 'w') as f:
      f.write('c')
    assert not exists(f'{remote_workdir}/staged/c.txt')  # Uploaded on leaving the block.
  assert fs.cat(f'{root}/staged/c.txt') == b'c' and not os.path.exists(local)


def test_local_cache_dir_is_the_path_or_one_local_directory_per_url(tmp_path):
  assert local_cache_dir(str(tmp_path / 'data')) == str(tmp_path / 'data')
  cache = local_cache_dir('gs://bucket/run/data')
  assert not is_remote(cache) and os.path.dirname(cache) == tempfile.gettempdir()
  assert cache == local_cache_dir('gs://bucket/run/data')
  assert cache != local_cache_dir('gs://bucket/other/data')


def test_samples_and_plots_reach_a_remote_workdir(remote_workdir):
  evaluation = types.SimpleNamespace(workdir=remote_workdir, prompts=['p0', 'p1'])
  GoldRewardOfSamples._write_samples(evaluation, 7, ['r0', 'r1'],
                                     {'gold': np.array([0.5, -1.0]), 'kl': np.array([0.0, 2.5])})
  with fsspec.open(f'{remote_workdir}/samples/step_7.jsonl', 'r') as f:
    assert [json.loads(line) for line in f] == [
        {'prompt': 'p0', 'response': 'r0', 'gold': 0.5, 'kl': 0.0},
        {'prompt': 'p1', 'response': 'r1', 'gold': -1.0, 'kl': 2.5}]
  reliability_diagram([0.2, 0.9], [0, 1], f'{remote_workdir}/plots/reliability_step_7.png')
  best_of_n.plot([{'n': 1, 'd': 0.0, 'gold_reward': 0.1, 'proxy_reward': 0.2}],
                 f'{remote_workdir}/best_of_n.png')
  for name in ('plots/reliability_step_7.png', 'best_of_n.png'):
    with fsspec.open(f'{remote_workdir}/{name}', 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def word_tokenizer():
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {'<pad>': 0, '<eos>': 1, 'a': 2, 'b': 3}, '<pad>'))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token='<pad>',
                                              eos_token='<eos>')


def test_export_hf_to_a_remote_path_loads_back_with_the_same_logits(remote_workdir, tmp_path):
  model = Transformer(get_preset('tiny'), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  export_hf(graphdef, params, f'{remote_workdir}/hf', word_tokenizer())
  fsspec.filesystem('memory').get(f'/{tmp_path.name}/run/hf/', str(tmp_path / 'hf'),
                                  recursive=True)
  logits = nnx.jit(lambda model: model(np.array([[5, 17, 3, 60, 1, 9]])))
  np.testing.assert_allclose(logits(load_hf(tmp_path / 'hf')), logits(model), atol=1e-6)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
  assert (tokenizer.eos_token, tokenizer('a b')['input_ids']) == ('<eos>', [2, 3])


def test_reference_logps_are_written_to_a_remote_workdir_and_read_back(remote_workdir):
  model = Transformer(get_preset('tiny'), rngs=nnx.Rngs(0))
  config = ml_collections.ConfigDict({
      'train': {'seq_len': 8, 'batch_size': 8, 'logprob_chunk_size': 4},
      'sharding_rules': DEFAULT_RULES})
  rng = np.random.default_rng(0)
  piece = lambda n: (rng.integers(1, 64, n), np.r_[np.zeros(2, int), np.ones(n - 2, int)])
  examples = {'train': [(piece(5), piece(7)) for _ in range(3)], 'eval': [(piece(4), piece(6))]}

  attached = []
  data = types.SimpleNamespace(shape=types.SimpleNamespace(pad_id=0), examples=examples.get,
                               attach=lambda name, values: attached.append((name, values)))
  ctx = types.SimpleNamespace(config=config, workdir=remote_workdir, rules=DEFAULT_RULES,
                              mesh=parallel.make_mesh({'data': -1}))
  attach_reference_logps(ctx, data, LoadedModel(*nnx.split(model), None))
  attach_reference_logps(ctx, data, None)  # Read back: no model needed.
  [(name, values), (read_name, read_values)] = attached
  assert name == read_name == 'ref_logps'
  # Row i holds log π(chosen), log π(rejected) of pair i, summed over loss-masked targets; a
  # causal model scores each piece alone, right-padded to 8 in one batch.
  pieces = [side for pairs in examples.values() for pair in pairs for side in pair]
  tokens = np.stack([np.pad(ids, (0, 8 - len(ids))) for ids, _ in pieces])
  logps = np.asarray(jax.nn.log_softmax(model(tokens)[:, :-1]))
  expected = [sum(logps[i, t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1])
              for i, (ids, mask) in enumerate(pieces)]
  np.testing.assert_allclose(np.concatenate([values['train'], values['eval']]).ravel(),
                             expected, rtol=1e-5)
  for split in examples:
    np.testing.assert_array_equal(read_values[split], values[split])
