"""MetricWriter: JSONL round trip, resume truncation, TensorBoard events, process 0 only; the
other files of a workdir (samples, plots, HF export, reference log-probs) on a URL (storage)."""

import glob
import json
import os
import pathlib
import struct
import tempfile
import time
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
from rlhf_jax.engine.metrics import (MetricWriter, WandbOptions, log_media, progress_bar,
                                     read_metrics, wandb_run_id, write_config)
from rlhf_jax.evals.media import Table


def read_events(logdir) -> list[list[event_pb2.Event]]:
  """The events of each file in a TensorBoard logdir, local or a URL (TFRecords: length, crc,
  data, crc)."""
  files = []
  fs, path = fsspec.core.url_to_fs(os.fspath(logdir))
  for name in fs.ls(path, detail=False):
    with fs.open(name, 'rb') as f:
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
  writer = MetricWriter(remote_workdir, tensorboard=False)
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
      f'/{tmp_path.name}/run/metrics.jsonl', f'/{tmp_path.name}/run/tensorboard']
  assert len(read_events(f'{remote_workdir}/tensorboard')) == 2  # A file per writer, no temp.


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


def test_tensorboard_in_a_remote_workdir_is_uploaded_and_resumes_like_a_local_one(
    remote_workdir, tmp_path):
  writer = MetricWriter(remote_workdir, upload_every_s=0)
  writer.write(1, {'loss': 0.5})
  [events] = read_events(f'{remote_workdir}/tensorboard')  # Uploaded before close().
  assert scalars(events) == [(1, 'loss', 0.5)]
  writer.close()
  fsspec.filesystem('memory').rm(remote_workdir, recursive=True)

  for workdir in (remote_workdir, tmp_path):  # Uploaded at the first write and at close.
    write_steps(workdir, range(1, 7))
    write_steps(workdir, (5, 6), start_step=4, scale=2.0)
  remote, local = ([(scalars(events), [e.step for e in events if e.session_log.status])
                    for events in sorted(read_events(f'{workdir}/tensorboard'), key=len)]
                   for workdir in (remote_workdir, tmp_path))
  assert remote == local
  assert local[0] == ([(5, 'loss', np.float32(0.4)), (5, 'tokens', 5.0),
                       (6, 'loss', np.float32(2 / 6)), (6, 'tokens', 6.0)],
                      [5])  # The resumed writer hides steps 5 on.


def test_figures_and_tables_go_to_tensorboard_and_numbers_alone_to_jsonl(tmp_path):
  figure = reliability_diagram([0.2, 0.9, 0.6], [0, 1, 0])  # 4 × 5 inches at 100 dpi.
  table = Table(('prompt', 'answer', 'gold'), [('2+2?', 'a | b\nc', 0.123456)])
  assert table.markdown() == ('| prompt | answer | gold |\n| --- | --- | --- |\n'
                              '| 2+2? | a \\| b c | 0.1235 |')
  writer = MetricWriter(str(tmp_path))
  writer.write(3, {'loss': 1.0, 'eval/pairs/reliability': figure, 'eval/answers': table})
  writer.close()
  assert read_metrics(tmp_path / 'metrics.jsonl') == [{'step': 3, 'loss': 1.0}]
  [events] = read_events(tmp_path / 'tensorboard')
  values = {v.tag: v for e in events for v in e.summary.value}
  image = values['eval/pairs/reliability'].image
  assert (image.height, image.width) == (500, 400)
  assert image.encoded_image_string[:8] == b'\x89PNG\r\n\x1a\n'
  [text] = values['eval/answers/text_summary'].tensor.string_val
  assert text.decode() == table.markdown()
  assert values['loss'].simple_value == 1.0

  log_media(str(tmp_path / 'experiment'), {'plots/rl': figure})  # No metrics.jsonl there.
  assert os.listdir(tmp_path / 'experiment') == ['tensorboard']
  [events] = read_events(tmp_path / 'experiment' / 'tensorboard')
  assert [(e.step, v.tag) for e in events for v in e.summary.value] == [(0, 'plots/rl')]


def wandb_records(path) -> list:
  """The records of a W&B run file: a 7-byte header, then LevelDB-log blocks of 32 KiB, each
  record with a 7-byte header (crc, length, type: 1 whole, 2 first, 3 middle, 4 last part)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  offset, parts, records = 7, b'', []
  while offset + 7 <= len(data):
    if 32768 - offset % 32768 < 7:  # A block's tail too short for a header is padding.
      offset += 32768 - offset % 32768
      continue
    _, length, kind = struct.unpack('<IHB', data[offset:offset + 7])
    if offset + 7 + length > len(data):  # A record still being written.
      break
    parts += data[offset + 7:offset + 7 + length]
    offset += 7 + length
    if kind in (1, 4):
      records.append(wandb_internal_pb2.Record.FromString(parts))
      parts = b''
  return records


def finished_wandb_records(path, timeout_s: float = 60.0) -> list:
  """The records of a W&B run file once its 'exit' record is there: W&B's service process
  writes the file, and on a loaded machine it may still be writing after `finish()` returns."""
  deadline = time.monotonic() + timeout_s
  while True:
    records = wandb_records(path)
    kinds = [r.WhichOneof('record_type') for r in records]
    if 'exit' in kinds or time.monotonic() > deadline:
      assert 'exit' in kinds, (path, kinds)
      return records
    time.sleep(0.5)


def test_wandb_offline_logs_numbers_and_tables_and_a_resumed_run_continues_it(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  options = WandbOptions('rlhf_jax-tests', {'optim': {'lr': 1e-3}})
  table = Table(('prompt', 'answer', 'gold'), [('2+2?', '4', 1.0)])
  writer = MetricWriter(str(tmp_path), tensorboard=False, wandb=options)
  writer.write(1, {'loss': 0.5, 'eval/answers': table})
  writer.write(2, {'loss': 0.25, 'eval/reliability': reliability_diagram([0.2, 0.9], [0, 1])})
  writer.close()
  writer = MetricWriter(str(tmp_path), start_step=2, tensorboard=False, wandb=options)
  writer.write(3, {'loss': 0.125})
  writer.close()

  run_id = wandb_run_id(str(tmp_path))
  assert run_id == wandb_run_id(str(tmp_path) + '/') != wandb_run_id(str(tmp_path / 'other'))
  runs = sorted(glob.glob(str(tmp_path / 'wandb' / 'offline-run-*')))
  assert len(runs) == 2 and all(run.endswith(f'-{run_id}') for run in runs)
  logged = []
  for run in runs:
    [path] = glob.glob(os.path.join(run, '*.wandb'))
    records = finished_wandb_records(path)
    [start] = [r.run for r in records if r.WhichOneof('record_type') == 'run']
    assert (start.run_id, start.project, start.display_name) == (
        run_id, 'rlhf_jax-tests', tmp_path.name)
    assert {u.key: json.loads(u.value_json) for u in start.config.update}['optim'] == {
        'lr': 1e-3}
    logged.append([{item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                    for item in r.history.item}
                   for r in records if r.WhichOneof('record_type') == 'history'])
  assert [[(h['_step'], h['loss']) for h in run] for run in logged] == [
      [(1, 0.5), (2, 0.25)], [(3, 0.125)]]
  shown = logged[0][0]
  assert shown['eval/answers/_type'] == 'table-file'
  with open(os.path.join(runs[0], 'files', shown['eval/answers/path'])) as f:
    assert json.load(f) == {'columns': ['prompt', 'answer', 'gold'], 'data': [['2+2?', '4', 1.0]]}
  image = logged[0][1]
  assert (image['eval/reliability/_type'], image['eval/reliability/format']) == ('image-file', 'png')
  assert (image['eval/reliability/height'], image['eval/reliability/width']) == (500, 400)
