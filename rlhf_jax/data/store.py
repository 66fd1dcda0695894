"""Tokenized examples on disk, read through a memory map: RAM does not grow with the data.

One directory holds one source's examples (`datasets.Example`: one token piece, or two: a
preference pair's chosen and rejected sequences, an unpaired example's prompt and completion)
for every split:

    meta.json              kind, pieces per example, example counts, skip/truncation counts
    {split}.tokens         every piece's token ids end to end (int32, raw)
    {split}.mask           their loss masks (uint8, raw): 1 on the tokens trained on
    {split}.pieces.npy     [n_pieces, 2] int64: start in .tokens and .mask, length
    {split}.records.npy    [n_examples] index of the record each example came from, in the
                           source's split (a text document can give several examples)
    {split}.labels.npy     [n_examples] int8, unpaired examples only: 1 desirable, 0 not

A piece is a slice of the memory map, so reading a row costs the same at 10k examples as at
10M, and only the pages read are resident. Why not array_record (what grain reads): a record
there is a serialised blob found through a chunk index, decoded per read; here a piece is one
contiguous slice with no decoding, and the example lengths that batching needs are a column of
an array, not a read of every record.

`StoreWriter` writes a directory to a temporary name and renames it when complete, so readers
(other stages, other hosts on a shared disk) never see half a store; when two processes build
the same store, the last rename wins with identical contents.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from rlhf_jax.data.batching import Piece

FORMAT = 1
Example = tuple[Piece, ...]  # (piece,), (chosen, rejected) or (prompt, completion).


class Examples(Sequence):
  """Examples as flat arrays: every piece's tokens and loss mask end to end, and a table of
  where each piece starts and how long it is; example i is pieces [k·i, k·(i+1)).

  On disk (`open`) the tokens and masks are memory maps and the table is read into RAM
  (16 bytes a piece); in memory (`from_list`) all are arrays. `examples[i]` gives
  (piece, ...) with piece = (ids [L], loss mask [L]); `fill` writes rows of a batch.

  `labels` ([n] int8, or None) marks unpaired examples, whose two pieces (prompt, completion)
  form one sequence; the pieces of other examples are sequences of their own.
  """

  def __init__(self, tokens, mask, pieces: np.ndarray, pieces_per_example: int,
               record_index: np.ndarray | None = None, labels: np.ndarray | None = None):
    self._tokens, self._mask, self._k = tokens, mask, pieces_per_example
    self._starts, self._lengths = np.ascontiguousarray(pieces.T)
    self.record_index, self.labels = record_index, labels
    # The length of each example's longest sequence: what batching and packing need, without
    # a read.
    self.piece_lengths = self._lengths.reshape(-1, self._k)
    self.lengths = (self.piece_lengths.sum(axis=1) if labels is not None
                    else self.piece_lengths.max(axis=1))

  @classmethod
  def open(cls, directory: str, split: str, pieces_per_example: int) -> 'Examples':
    path = lambda suffix: os.path.join(directory, f'{split}.{suffix}')
    # Plain arrays over the maps (the maps stay open through them): slicing a np.memmap
    # makes a memmap object each time, many times slower for short pieces.
    labels = np.load(path('labels.npy')) if os.path.exists(path('labels.npy')) else None
    return cls(np.asarray(np.memmap(path('tokens'), np.int32, mode='r')),
               np.asarray(np.memmap(path('mask'), np.uint8, mode='r')),
               np.load(path('pieces.npy')),
               pieces_per_example, np.load(path('records.npy'), mmap_mode='r'), labels)

  @classmethod
  def from_list(cls, examples: Sequence[Example],
                labels: Sequence[int] | None = None) -> 'Examples':
    pieces = [piece for example in examples for piece in example]
    lengths = np.array([len(ids) for ids, _ in pieces], np.int64)
    return cls(np.concatenate([np.asarray(ids, np.int32) for ids, _ in pieces]),
               np.concatenate([np.asarray(mask, np.uint8) for _, mask in pieces]),
               np.stack([np.cumsum(lengths) - lengths, lengths], axis=1),
               len(examples[0]), labels=None if labels is None else np.asarray(labels, np.int8))

  def __len__(self) -> int:
    return len(self.lengths)

  def __getitem__(self, i: int) -> Example:
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i %= len(self)
    return tuple(self._piece(p) for p in range(i * self._k, (i + 1) * self._k))

  def _piece(self, p: int) -> Piece:
    start, end = self._starts[p], self._starts[p] + self._lengths[p]
    return np.array(self._tokens[start:end]), self._mask[start:end].astype(np.int32)

  def fill(self, batch: dict, at: Sequence[int], units: Sequence[Sequence[int]],
           partners: Sequence[int] = ()) -> None:
    """Writes units[i] into row at[i] of an `empty_batch`: the examples of a unit end to end
    (one piece each), or a unit's single example's k pieces side by side (pairs are not packed).
    An unpaired example's row holds two sequences: its prompt + completion, and its prompt +
    the completion of example partners[i] (KTO's mismatched pair), cut to fit the row.

    A row is one copy of its pieces' slices: the cost grows with the tokens read, not with the
    number of examples in the source.
    """
    k = self._k
    if k > 1 and any(len(unit) != 1 for unit in units):
      raise ValueError(f'Examples of {k} pieces are not packed: one example a unit.')
    if self.labels is not None:
      rows = ((2 * row + j, [2 * unit[0], 2 * (partner if j else unit[0]) + 1])
              for row, unit, partner in zip(at, units, partners, strict=True) for j in (0, 1))
    elif k == 1:
      rows = zip(at, units)
    else:
      rows = ((row * k + j, [unit[0] * k + j]) for row, unit in zip(at, units) for j in range(k))
    length = batch['tokens'].shape[-1]
    tokens, loss_mask = batch['tokens'].reshape(-1), batch['loss_mask'].reshape(-1)
    for row, pieces in rows:
      lengths = self._lengths[pieces].tolist()
      if sum(lengths) > length:
        if self.labels is None or lengths[0] >= length:
          raise ValueError(f'A row needs {sum(lengths)} tokens; the row length is {length}.')
        lengths[-1] = length - lengths[0]  # A mismatched pair's completion, cut.
      spans = [slice(a, a + n) for a, n in zip(self._starts[pieces].tolist(), lengths)]
      at_row = slice(row * length, row * length + sum(lengths))
      tokens[at_row] = np.concatenate([self._tokens[span] for span in spans])
      loss_mask[at_row] = np.concatenate([self._mask[span] for span in spans])
      batch['piece_lengths'][row] = lengths


def empty_batch(n: int, k: int, length: int, pad_id: int) -> dict:
  """Padding for n rows of k pieces ([n, length] for k = 1, else [n, k, length]), to be
  filled by `Examples.fill` and completed by `finish_batch`."""
  shape = (n, length) if k == 1 else (n, k, length)
  return {'tokens': np.full(shape, pad_id, np.int32), 'loss_mask': np.zeros(shape, np.int32),
          'piece_lengths': [[] for _ in range(n * k)]}  # Of the pieces in each row, in order.


def finish_batch(batch: dict, *, packed: bool) -> dict[str, np.ndarray]:
  """tokens, attention_mask and loss_mask of a filled batch; with `packed` also segment_ids
  (1, 2, … per piece of a row, 0 on padding) and positions (restarting at each piece).

  Computed for the whole batch at once: each row is its pieces then one padding span.
  """
  shape = batch['tokens'].shape
  length = shape[-1]
  spans, segments = [], []
  for row in batch['piece_lengths']:
    spans += row + [length - sum(row)]
    segments += list(range(1, len(row) + 1)) + [0]
  spans, segments = np.array(spans), np.array(segments, np.int32)
  segment_ids = np.repeat(segments, spans).reshape(shape)
  attention_mask = (segment_ids > 0).astype(np.int32)
  finished = {'tokens': batch['tokens'], 'attention_mask': attention_mask,
              'loss_mask': batch['loss_mask']}
  if packed:
    positions = np.arange(segment_ids.size, dtype=np.int32).reshape(shape)
    positions -= np.repeat((np.cumsum(spans) - spans).astype(np.int32), spans).reshape(shape)
    positions *= attention_mask  # 0 on padding.
    finished |= {'segment_ids': segment_ids, 'positions': positions}
  return finished


class StoreWriter:
  """Writes a store split by split, chunk by chunk; `close(stats)` makes it visible at `path`."""

  def __init__(self, path: str, *, kind: str, pieces_per_example: int):
    self.path = path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    self._partial = tempfile.mkdtemp(prefix=os.path.basename(path) + '.partial-', dir=parent)
    self._meta = {'format': FORMAT, 'kind': kind, 'pieces_per_example': pieces_per_example,
                  'examples': {}}

  def write_split(self, split: str,
                  chunks: Iterable[tuple[Sequence[Example], Sequence[int], Sequence[int]]]
                  ) -> None:
    """chunks: (examples, index of each one's record, their labels: unpaired examples only,
    else empty) in order."""
    k = self._meta['pieces_per_example']
    pieces, records, labels, offset = [], [], [], 0
    with (open(os.path.join(self._partial, f'{split}.tokens'), 'wb') as tokens,
          open(os.path.join(self._partial, f'{split}.mask'), 'wb') as masks):
      for examples, record_index, chunk_labels in chunks:
        if any(len(example) != k for example in examples):
          raise ValueError(f'Examples of other than {k} pieces in a store of {k}.')
        flat = [piece for example in examples for piece in example]
        lengths = np.array([len(ids) for ids, _ in flat], np.int64)
        if flat:
          np.concatenate([np.asarray(ids, np.int32) for ids, _ in flat]).tofile(tokens)
          np.concatenate([np.asarray(mask, np.uint8) for _, mask in flat]).tofile(masks)
        pieces.append(np.stack([offset + np.cumsum(lengths) - lengths, lengths], axis=1))
        offset += int(lengths.sum())
        records.append(np.asarray(record_index, np.int64))
        labels.append(np.asarray(chunk_labels, np.int8))
    pieces = np.concatenate(pieces) if pieces else np.zeros((0, 2), np.int64)
    records = np.concatenate(records) if records else np.zeros(0, np.int64)
    np.save(os.path.join(self._partial, f'{split}.pieces.npy'), pieces)
    np.save(os.path.join(self._partial, f'{split}.records.npy'), records)
    if self._meta['kind'] == 'unpaired':
      np.save(os.path.join(self._partial, f'{split}.labels.npy'),
              np.concatenate(labels) if labels else np.zeros(0, np.int8))
    self._meta['examples'][split] = len(records)

  def close(self, stats: Mapping[str, int]) -> None:
    with open(os.path.join(self._partial, 'meta.json'), 'w') as f:
      json.dump(self._meta | {'stats': dict(stats)}, f, indent=1)
    os.chmod(self._partial, 0o755)  # mkdtemp's 0700 would hide a shared cache from others.
    try:
      os.replace(self._partial, self.path)
    except OSError:  # Another process completed the same store first.
      shutil.rmtree(self._partial, ignore_errors=True)

  def abort(self) -> None:
    shutil.rmtree(self._partial, ignore_errors=True)


class Store:
  """A complete store directory: its metadata and its splits."""

  def __init__(self, path: str):
    with open(os.path.join(path, 'meta.json')) as f:
      self.meta = json.load(f)
    if self.meta.get('format') != FORMAT:
      raise ValueError(f'{path}: token store format {self.meta.get("format")}, expected '
                       f'{FORMAT}; delete it to rebuild.')
    self.path = path
    self.kind: str = self.meta['kind']
    self.stats: dict[str, int] = self.meta['stats']

  def split(self, split: str) -> Examples:
    return Examples.open(self.path, split, self.meta['pieces_per_example'])

  @staticmethod
  def exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, 'meta.json'))
