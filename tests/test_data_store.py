"""Tokenized sources on disk: the store, its cache key, tokenizing in worker processes, and
Hugging Face parquet/arrow sources."""

import json
import os

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import tiny_tokenizer, write_jsonl
from rlhf_jax import config as config_lib
from rlhf_jax.data import tokenized
from rlhf_jax.data.datasets import BatchShape, TokenData
from rlhf_jax.data.mixture import Mixture, global_batch_units
from rlhf_jax.data.encoding import encode_sft
from rlhf_jax.data.records import InvalidExample, Message, Origin, SFTRecord
from rlhf_jax.data.batching import pad_pairs, pad_rows
from rlhf_jax.data.store import Examples, Store, StoreWriter, empty_batch, finish_batch
from rlhf_jax.data.tokenized import tokenized_source
from rlhf_jax.errors import NotFound


def _examples(n, seed, paired=False):
  rng = np.random.default_rng(seed)

  def piece():
    ids = rng.integers(5, 50, size=rng.integers(2, 9)).astype(np.int32)
    return ids, rng.integers(0, 2, size=len(ids)).astype(np.int32)  # Any mask, e.g. 2 turns.
  return [(piece(), piece()) if paired else (piece(),) for _ in range(n)]


def _store(path, splits, paired, labels=None):
  """A store of {split: examples} written in chunks of 7; record i of example i; with
  `labels` ({split: labels}) of unpaired examples."""
  kind = 'unpaired' if labels else 'preference' if paired else 'sft'
  writer = StoreWriter(str(path), kind=kind, pieces_per_example=2 if paired else 1)
  for split, examples in splits.items():
    writer.write_split(split, ((examples[i:i + 7], range(i, i + len(examples[i:i + 7])),
                                labels[split][i:i + 7] if labels else [])
                               for i in range(0, len(examples), 7)))
  writer.close({'truncated/response': 3})
  return Store(str(path))


@pytest.mark.parametrize('paired', [False, True])
def test_a_store_reads_back_every_piece_and_length(tmp_path, paired):
  examples = _examples(30, 0, paired)
  store = _store(tmp_path / 's', {'train': examples, 'eval': examples[:3]}, paired)
  stored = store.split('train')
  assert len(stored) == 30 and store.stats == {'truncated/response': 3}
  for got, want in zip(stored, examples):
    for (ids, mask), (want_ids, want_mask) in zip(got, want, strict=True):
      np.testing.assert_array_equal(ids, want_ids)
      np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_array_equal(stored.lengths, [max(len(p[0]) for p in ex) for ex in examples])
  np.testing.assert_array_equal(stored.record_index, np.arange(30))
  assert not [p for p in os.listdir(tmp_path) if 'partial' in p]


@pytest.mark.parametrize('paired,packing', [(False, False), (False, True), (True, False)])
def test_batches_from_a_store_equal_batches_from_memory(tmp_path, paired, packing):
  sources = {'a': _examples(40, 0, paired), 'b': _examples(9, 1, paired)}
  stores = {name: _store(tmp_path / name, {'train': ex}, paired).split('train')
            for name, ex in sources.items()}

  def data(splits):
    return TokenData({'train': splits}, Mixture({'a': 3, 'b': 1}, 8, seed=0),
                     BatchShape(batch_size=8, buckets=(8, 16, 24), pad_id=0, packing=packing),
                     seed=0)
  in_memory, on_disk = data(sources), data(stores)
  for step in (0, 5, 17):
    for rows in (range(8), range(4, 8)):
      want, got = in_memory.batch('train', step, rows), on_disk.batch('train', step, rows)
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def _unpaired(n, seed, seq_len=12):
  """n (prompt, completion) examples that fit seq_len, with labels: prompts of 1–6 tokens
  (loss mask 0), completions of the rest (mask 1)."""
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(n):
    prompt = rng.integers(5, 50, size=rng.integers(1, 7)).astype(np.int32)
    completion = rng.integers(5, 50, size=rng.integers(1, seq_len + 1 - len(prompt)))
    examples.append(((prompt, np.zeros_like(prompt)),
                     (completion.astype(np.int32), np.ones_like(completion, np.int32))))
  return examples, rng.integers(0, 2, size=n).astype(np.int8)


def test_unpaired_rows_hold_each_example_and_the_previous_rows_completion(tmp_path):
  """KTO's batches: row b = [prompt_b + completion_b, prompt_b + completion of the previous row
  of the same source (cyclic)], 'labels' the examples' labels; from a store as from memory; a
  host's rows are the global batch's; the mismatched completion is cut to seq_len."""
  a, labels_a = _unpaired(30, 0)
  b, labels_b = _unpaired(11, 1)
  stored = {'a': _store(tmp_path / 'a', {'train': a}, True, {'train': labels_a}).split('train'),
            'b': _store(tmp_path / 'b', {'train': b}, True, {'train': labels_b}).split('train')}
  np.testing.assert_array_equal(stored['a'].labels, labels_a)
  np.testing.assert_array_equal(stored['a'].lengths, [len(p) + len(c) for (p, _), (c, _) in a])
  shape = BatchShape(batch_size=8, buckets=(8, 12), pad_id=0)
  mixture = Mixture({'a': 3, 'b': 1}, 8, seed=0)
  in_memory = TokenData({'train': {'a': Examples.from_list(a, labels_a),
                                   'b': Examples.from_list(b, labels_b)}}, mixture, shape,
                        seed=0)
  on_disk = TokenData({'train': stored}, mixture, shape, seed=0)
  examples = {0: (a, labels_a), 1: (b, labels_b)}
  cut = 0
  for step in range(6):
    units, _ = global_batch_units(mixture, in_memory._streams['train'], step)
    batch = in_memory.batch('train', step, range(8))
    t = batch['tokens'].shape[-1]
    for row, (source, (i,)) in enumerate(units):
      rows = [r for r, (s, _) in enumerate(units) if s == source]
      previous = units[rows[rows.index(row) - 1]][1][0]
      data, labels = examples[source]
      (prompt, _), (completion, _) = data[i]
      other = data[previous][1][0]
      matched, mismatched = np.concatenate([prompt, completion]), np.concatenate(
          [prompt, other])[:12]
      cut += len(prompt) + len(other) > 12
      for slot, want in enumerate((matched, mismatched)):
        np.testing.assert_array_equal(batch['tokens'][row, slot, :len(want)], want)
        assert (batch['tokens'][row, slot, len(want):] == 0).all()
        np.testing.assert_array_equal(batch['attention_mask'][row, slot],
                                      np.arange(t) < len(want))
        np.testing.assert_array_equal(batch['loss_mask'][row, slot],
                                      (np.arange(t) >= len(prompt)) & (np.arange(t) < len(want)))
      assert batch['labels'][row] == labels[i]
    for rows in (range(8), range(5, 8)):
      got = on_disk.batch('train', step, rows)
      assert got.keys() == batch.keys()
      for key in batch:
        np.testing.assert_array_equal(got[key], batch[key][rows.start:], err_msg=key)
  assert cut, 'no mismatched pair was cut to seq_len: the case is untested'


def gathered(examples, units, length, *, pad_id, packed):
  batch = empty_batch(len(units), 2 if examples[0][1:] else 1, length, pad_id)
  examples.fill(batch, range(len(units)), units)
  return finish_batch(batch, packed=packed)


@pytest.mark.parametrize('paired,packed', [(False, False), (False, True), (True, False)])
def test_gathered_rows_equal_rows_padded_piece_by_piece(paired, packed):
  """Examples.fill (a slice copy per piece) and finish_batch (whole-batch segment ids and
  positions) against batching.pad_rows / pad_pairs (a loop over pieces)."""
  examples = _examples(30, 2, paired)
  units = [[4, 0, 7], [3], [29, 1]] if packed else [[4], [0], [29], [13]]
  got = gathered(Examples.from_list(examples), units, 32, pad_id=99, packed=packed)
  if paired:
    want = pad_pairs([examples[unit[0]] for unit in units], 32, pad_id=99)
  else:
    want = pad_rows([[examples[i][0] for i in unit] for unit in units], 32, pad_id=99,
                    packed=packed)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  with pytest.raises(ValueError, match='row length is 4'):
    gathered(Examples.from_list(examples), units, 4, pad_id=0, packed=packed)


def _config(tmp_path, **data):
  config = ml_collections.ConfigDict({
      'data': config_lib.data_config({'sft': 'unused'}), 'train': {'seq_len': 48}})
  config.data.update(data)
  return config


def _sft_lines(n, offset=0):
  return [{'prompt': f'p{(i + offset) % 20}', 'response': ' '.join(
      f'r{(i + j) % 20}' for j in range(1 + i % 5))} for i in range(n)]


def _tokenize(tmp_path, spec, tokenizer, **data):
  return tokenized_source(spec, ('sft', 'preference', 'text'), tokenizer,
                          config=_config(tmp_path, **data), cache_dir=str(tmp_path / 'cache'),
                          key='config.data.sources.sft')


def test_a_source_is_tokenized_once_per_content_tokenizer_and_options(tmp_path, monkeypatch):
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  path = write_jsonl(tmp_path / 'sft.jsonl', _sft_lines(40))
  first = _tokenize(tmp_path, f'jsonl:{path}', tokenizer)
  assert len(first.examples['train']) + len(first.examples['eval']) == 40
  records = first.records('eval')
  assert len(records) == len(first.examples['eval'])
  for record, (piece,) in zip(records, first.examples['eval']):
    assert piece[0][piece[1] == 1].tolist() == tokenizer.encode(
        record.response, add_special_tokens=False) + [tokenizer.eos_token_id]

  built = []
  monkeypatch.setattr(tokenized, '_build', lambda path, *a, **k: built.append(path) or
                      pytest.fail('rebuilt a store that exists'))
  _tokenize(tmp_path, f'jsonl:{path}', tokenizer)  # Read back.
  assert not built
  monkeypatch.undo()

  def store_count():
    return len(os.listdir(tmp_path / 'cache'))
  _tokenize(tmp_path, f'jsonl:{path}', tokenizer, max_prompt_len=8)  # Another option.
  assert store_count() == 2
  write_jsonl(path, _sft_lines(40, offset=1))  # Other content, same file name.
  changed = _tokenize(tmp_path, f'jsonl:{path}', tokenizer)
  assert store_count() == 3
  assert not np.array_equal(changed.examples['train'][0][0][0], first.examples['train'][0][0][0])
  other = tiny_tokenizer(tmp_path / 'tok2', chat_template=None)  # Another tokenizer.
  assert tokenized.tokenizer_fingerprint(other) != tokenized.tokenizer_fingerprint(tokenizer)
  _tokenize(tmp_path, f'jsonl:{path}', other)
  assert store_count() == 4


def test_worker_processes_write_the_same_store(tmp_path, monkeypatch):
  monkeypatch.setattr(tokenized, 'CHUNK', 7)  # Several chunks per split.
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  words = [5 + 7 * i for i in range(30)]  # Documents over seq_len=48 are cut into rows.
  for split in ('train', 'eval'):
    write_jsonl(tmp_path / f'text_{split}.jsonl',
                [{'text': ' '.join(f'r{j % 20}' for j in range(n))} for n in words])
  spec = f'jsonl:{tmp_path}/text_{{split}}.jsonl'
  one = _tokenize(tmp_path / 'one', spec, tokenizer, tokenize_workers=1)
  two = _tokenize(tmp_path / 'two', spec, tokenizer, tokenize_workers=2)
  for split in ('train', 'eval'):
    for a, b in zip(one.examples[split], two.examples[split], strict=True):
      np.testing.assert_array_equal(a[0][0], b[0][0])
    np.testing.assert_array_equal(one.examples[split].record_index,
                                  two.examples[split].record_index)
  # Each row points to the document it was cut from: ⌈(words + EOS) / seq_len⌉ rows each.
  lines = [r.origin.line for r in two.records('train')]
  assert lines == [i + 1 for i, n in enumerate(words) for _ in range(-(-(n + 1) // 48))]


def test_an_invalid_example_in_a_worker_names_its_file_and_line(tmp_path, monkeypatch):
  monkeypatch.setattr(tokenized, 'CHUNK', 4)
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  lines = _sft_lines(12)
  lines[9]['prompt'] = ' '.join(['p1'] * 40)  # Over max_prompt_len.
  for split in ('train', 'eval'):
    write_jsonl(tmp_path / f'sft_{split}.jsonl', lines)
  with pytest.raises(InvalidExample, match=r'sft_train.jsonl:10: prompt has \d+ tokens'):
    _tokenize(tmp_path, f'jsonl:{tmp_path}/sft_{{split}}.jsonl', tokenizer, tokenize_workers=2)
  assert not os.listdir(tmp_path / 'cache')  # Nothing half-written is left to be read.


def _hf_dataset(root, rows_per_split, fmt):
  """A dataset laid out as the Hub stores it (parquet) or as save_to_disk writes it (arrow)."""
  for split, rows in rows_per_split.items():
    table = pa.Table.from_pylist(rows)
    if fmt == 'parquet':
      os.makedirs(root / 'data', exist_ok=True)
      half = len(rows) // 2
      pq.write_table(table.slice(0, half), root / 'data' / f'{split}-00000-of-00002.parquet')
      pq.write_table(table.slice(half), root / 'data' / f'{split}-00001-of-00002.parquet')
    else:
      os.makedirs(root / split, exist_ok=True)
      with pa.ipc.new_stream(root / split / 'data-00000-of-00001.arrow', table.schema) as w:
        w.write_table(table)
  return root


@pytest.mark.parametrize('fmt', ['parquet', 'arrow'])
def test_hf_parquet_and_arrow_sources_read_like_jsonl(tmp_path, fmt):
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  rows = [{'prompt': [{'role': 'user', 'content': f'p{i}'}], 'chosen': f'r{i}',
           'rejected': f'r{i + 1}'} for i in range(10)]
  root = _hf_dataset(tmp_path / 'hf', {'train': rows, 'test': rows[:4]}, fmt)
  for split, name in (('train', 'train'), ('eval', 'test')):
    write_jsonl(tmp_path / f'pairs_{split}.jsonl', rows if name == 'train' else rows[:4])
  from_hf = _tokenize(tmp_path, f'hf:{root}', tokenizer)
  from_jsonl = _tokenize(tmp_path, f'jsonl:{tmp_path}/pairs_{{split}}.jsonl', tokenizer)
  assert from_hf.kind == 'preference'
  for split in ('train', 'eval'):
    assert len(from_hf.examples[split]) == len(from_jsonl.examples[split])
    for a, b in zip(from_hf.examples[split], from_jsonl.examples[split]):
      for piece_a, piece_b in zip(a, b, strict=True):
        np.testing.assert_array_equal(piece_a[0], piece_b[0])
  assert str(from_hf.records('train')[6].origin).endswith(
      'train-00001-of-00002.parquet:2' if fmt == 'parquet' else 'data-00000-of-00001.arrow:7')


def test_unpaired_files_and_preference_pairs_read_as_unpaired_examples(tmp_path):
  """A KTO file's examples are (prompt, completion) with its labels; a preference source read
  by an unpaired trainer gives two examples a pair, chosen desirable and rejected not."""
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  pairs = [{'prompt': f'p{i}', 'chosen': f'r{i}', 'rejected': f'r{i + 1} r{i}'}
           for i in range(6)]
  unpaired = [{'prompt': line['prompt'], 'completion': line[key], 'label': key == 'chosen'}
              for line in pairs for key in ('chosen', 'rejected')]
  for name, lines in (('pairs', pairs), ('kto', unpaired)):
    for split in ('train', 'eval'):
      write_jsonl(tmp_path / f'{name}_{split}.jsonl', lines)
  sources = [tokenized_source(f'jsonl:{tmp_path}/{name}_{{split}}.jsonl', ('unpaired',),
                              tokenizer, config=_config(tmp_path),
                              cache_dir=str(tmp_path / 'cache'), key='config.data.sources.kto')
             for name in ('pairs', 'kto')]
  for source in sources:
    assert source.kind == 'unpaired'
    examples = source.examples['train']
    assert len(examples) == 12 and examples.labels.tolist() == [1, 0] * 6
    for (prompt, completion), line in zip(examples, unpaired):
      sft = encode_sft(SFTRecord((Message('user', line['prompt']),), line['completion'],
                                 Origin('', 0)), tokenizer, seq_len=48, max_prompt_len=32)
      assert prompt[0].tolist() == sft.prompt_ids and completion[0].tolist() == sft.response_ids
      assert not prompt[1].any() and completion[1].all()
  assert [r.origin.line for r in sources[0].records('train')] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5,
                                                                  6, 6]


def test_preference_pairs_read_by_an_sft_trainer_train_on_the_chosen_response(tmp_path):
  """Preferred-FT (Rafailov et al. 2023): one SFT example a pair, its prompt and chosen."""
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  pairs = [{'prompt': f'p{i}', 'chosen': f'r{i}', 'rejected': f'r{i + 1} r{i}'}
           for i in range(5)]
  for split in ('train', 'eval'):
    write_jsonl(tmp_path / f'pairs_{split}.jsonl', pairs)
  source = tokenized_source(f'jsonl:{tmp_path}/pairs_{{split}}.jsonl', ('sft', 'text'),
                            tokenizer, config=_config(tmp_path),
                            cache_dir=str(tmp_path / 'cache'), key='config.data.sources.sft')
  assert source.kind == 'sft'
  examples = source.examples['train']
  assert len(examples) == len(pairs)
  for (piece,), line in zip(examples, pairs):
    sft = encode_sft(SFTRecord((Message('user', line['prompt']),), line['chosen'],
                               Origin('', 0)), tokenizer, seq_len=48, max_prompt_len=32)
    assert piece[0].tolist() == sft.prompt_ids + sft.response_ids
    assert piece[1].tolist() == [0] * len(sft.prompt_ids) + [1] * len(sft.response_ids)


def test_hf_source_errors_name_what_was_looked_for(tmp_path):
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  with pytest.raises(NotFound, match='no such directory'):
    _tokenize(tmp_path, f'hf:{tmp_path}/missing', tokenizer)
  root = _hf_dataset(tmp_path / 'hf', {'train': _sft_lines(4)}, 'parquet')
  with pytest.raises(NotFound, match="no .parquet or .arrow files of split 'test'"):
    _tokenize(tmp_path, f'hf:{root}', tokenizer)
  bad = _hf_dataset(tmp_path / 'bad', {'train': [{'prompt': 'p1', 'answer': 'r1'}],
                                       'test': [{'prompt': 'p1', 'answer': 'r1'}]}, 'parquet')
  with pytest.raises(InvalidExample, match=r'train-00001-of-00002.parquet:1: missing key '
                                           r'"response" \(keys: prompt, answer\)'):
    _tokenize(tmp_path, f'hf:{bad}', tokenizer)


def test_store_meta_names_the_kind_and_counts(tmp_path):
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  path = write_jsonl(tmp_path / 'sft.jsonl', _sft_lines(40))
  source = _tokenize(tmp_path, f'jsonl:{path}', tokenizer)
  [store] = os.listdir(tmp_path / 'cache')
  with open(tmp_path / 'cache' / store / 'meta.json') as f:
    meta = json.load(f)
  assert meta['kind'] == source.kind == 'sft' and store.startswith('sft-')
  assert meta['examples'] == {split: len(source.examples[split]) for split in ('train', 'eval')}


def test_trl_formats_through_a_field_map_train_every_assistant_turn(tmp_path):
  tokenizer = tiny_tokenizer(tmp_path / 'tok')
  chat = lambda *turns: [{'role': r, 'content': c} for r, c in turns]
  lines = [{'question': 'p1', 'answer': chat(('assistant', 'r1 r2'))},
           {'question': chat(('user', 'p2'), ('assistant', 'r3'), ('user', 'p4')),
            'answer': 'r5'}]
  for split in ('train', 'eval'):
    write_jsonl(tmp_path / f'qa_{split}.jsonl', lines)
  source = _tokenize(tmp_path, f'jsonl:{tmp_path}/qa_{{split}}.jsonl', tokenizer,
                     field_map={'prompt': 'question', 'completion': 'answer'})
  assert source.kind == 'sft'
  trained = [tokenizer.convert_ids_to_tokens(ids[mask == 1])
             for ((ids, mask),) in source.examples['train']]
  assert trained == [['r1', 'r2', '<|end|>'], ['r3', '<|end|>', 'r5', '<|end|>']]
  last = _tokenize(tmp_path / 'last', f'jsonl:{tmp_path}/qa_{{split}}.jsonl', tokenizer,
                   field_map={'prompt': 'question', 'completion': 'answer'}, train_turns='last')
  ((ids, mask),) = last.examples['train'][1]
  assert tokenizer.convert_ids_to_tokens(ids[mask == 1]) == ['r5', '<|end|>']
  with pytest.raises(ValueError, match=r"config.data.field_map names \['answer'\]"):
    _tokenize(tmp_path, f'jsonl:{tmp_path}/qa_{{split}}.jsonl', tokenizer,
              field_map={'answer': 'response'})
