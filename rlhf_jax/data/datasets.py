"""Encoded examples as the trainer's data source: `batch(split, step, rows)` of fixed shape.

Examples are token pieces (`batching.Piece`): one per SFT or text example, two (chosen,
rejected) per preference pair, two (prompt, completion) per unpaired example. Rows come from the
`Mixture` of the sources; each batch is padded to the smallest configured bucket that holds its
longest row, so shapes (and compilations) stay few. Preference batches are [B, 2, T]: row b's
chosen and rejected sequences side by side, so one forward pass over the reshaped [2B, T] batch
scores both and each device keeps its pairs.

Unpaired batches (KTO) are [B, 2, T] too: row b's prompt + completion, and its prompt + the
completion of the previous row of the same source in the global batch (cyclically: TRL's
rotation of completions by one), the mismatched pair that estimates KTO's reference point; and
'labels' [B] (1 desirable). The mismatched sequence's completion is cut to fit seq_len.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from rlhf_jax.data.batching import bucket_length
from rlhf_jax.data.mixture import Mixture, Stream, global_batch_units
from rlhf_jax.data.store import Example, Examples, empty_batch, finish_batch
from rlhf_jax.errors import InputError



@dataclasses.dataclass(frozen=True)
class BatchShape:
  batch_size: int  # Global rows per batch.
  buckets: tuple[int, ...]  # Allowed row lengths, ascending; the last is seq_len.
  pad_id: int
  packing: bool = False  # Several examples per row (SFT / text only).


class TokenData:
  """The `DataSource` of SFT, pretraining and preference training."""

  def __init__(self, splits: Mapping[str, Mapping[str, Sequence[Example]]], mixture: Mixture,
               shape: BatchShape, *, seed: int, stats: Mapping[str, int] | None = None,
               records: Mapping[str, Callable[[str], Sequence]] | None = None):
    """splits: split -> source name -> examples (a list, or `store.Examples`, read
    only for the rows a host makes); every split names the mixture's sources.

    records: source name -> records(split), the record each of its examples came from (for
    evaluations that need the text, e.g. a gold reward); stats: counts of skipped and
    truncated examples.
    """
    self.shape, self.mixture, self.stats = shape, mixture, dict(stats or {})
    self._records = records
    self._attached: dict[str, dict[str, np.ndarray]] = {}
    self.paired = len(next(iter(splits['train'].values()))[0]) == 2
    if self.paired and shape.packing:
      raise InputError('config.data.packing applies to SFT and text, not to preference pairs '
                       'or unpaired examples.')
    self._examples, self._streams = {}, {}
    for split, sources in splits.items():
      self._examples[split] = [
          examples if isinstance(examples, Examples) else Examples.from_list(examples)
          for examples in (sources[name] for name in mixture.names)]
    self.unpaired = self._examples['train'][0].labels is not None
    if self.unpaired:
      self.attach('labels', {split: np.concatenate([e.labels for e in examples])
                             for split, examples in self._examples.items()})
    for split in splits:
      self._streams[split] = [
          Stream(examples.lengths, seed=seed + i, shuffle=split == 'train',
                 pack_to=shape.buckets[-1] if shape.packing else None)
          for i, examples in enumerate(self._examples[split])]

  def examples(self, split: str) -> Sequence[Example]:
    """Every example of `split`, source after source."""
    return Concatenation(self._examples[split])

  def attach(self, name: str, per_split: Mapping[str, np.ndarray]) -> None:
    """Adds `name` to every batch: per_split[split][i] belongs to examples(split)[i].

    For values computed once per example, e.g. DPO's precomputed reference log-probs.
    """
    if self.shape.packing:
      raise InputError('Per-example values need one example per row; turn off packing.')
    for split, values in per_split.items():
      if len(values) != len(self.examples(split)):
        raise InputError(f'{name}: {len(values)} values for {len(self.examples(split))} '
                         f'{split} examples.')
    self._attached[name] = dict(per_split)

  def records(self, split: str) -> list:
    """The record of each of `examples(split)`."""
    return [r for name in self.mixture.names for r in self._records[name](split)]

  def batch(self, split: str, step: int, rows: range) -> dict[str, np.ndarray]:
    """Rows `rows` of global batch `step`: every host agrees on the batch's length from the
    example lengths alone, and reads the tokens of its own rows only."""
    streams, examples = self._streams[split], self._examples[split]
    units, lengths = global_batch_units(self.mixture, streams, step)
    partners = []
    if self.unpaired:  # Each row's mismatched pair (see the module doc), cut to seq_len.
      partners = _previous_of_same_source(units)
      lengths = np.concatenate([lengths, [min(self.shape.buckets[-1], _prompt_and_completion(
          examples, units[r], units[p])) for r, p in enumerate(partners)]])
    length = bucket_length(int(lengths.max()), self.shape.buckets)
    attached = {}
    if self._attached:  # One example per row: its index in examples(split).
      offsets = np.cumsum([0] + [len(examples) for examples in examples[:-1]])
      ids = np.array([offsets[units[r][0]] + units[r][1][0] for r in rows])
      attached = {name: values[split][ids] for name, values in self._attached.items()}
    k = 2 if self.paired else 1
    batch = empty_batch(len(rows), k, length, self.shape.pad_id)
    for s, source in enumerate(examples):
      at = [i for i, r in enumerate(rows) if units[r][0] == s]
      if at:
        source.fill(batch, at, [units[rows[i]][1] for i in at],
                    [units[partners[rows[i]]][1][0] for i in at] if partners else ())
    return finish_batch(batch, packed=self.shape.packing) | attached


def _previous_of_same_source(units) -> list[int]:
  """For each row of a global batch, the previous row drawn from the same source (the last
  such row for the first)."""
  rows_of = {}
  for row, (source, _) in enumerate(units):
    rows_of.setdefault(source, []).append(row)
  partners = [0] * len(units)
  for rows in rows_of.values():
    for i, row in enumerate(rows):
      partners[row] = rows[i - 1]
  return partners


def _prompt_and_completion(examples, unit, other) -> int:
  """Tokens of unit's prompt followed by other's completion (units of one source)."""
  piece_lengths = examples[unit[0]].piece_lengths
  return int(piece_lengths[unit[1][0], 0] + piece_lengths[other[1][0], 1])


class Concatenation(Sequence):
  """Sequences one after the other, indexed without copying them."""

  def __init__(self, parts: Sequence[Sequence]):
    self._parts = parts
    self._offsets = np.cumsum([0] + [len(part) for part in parts])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, i: int):
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    i %= len(self)
    k = int(np.searchsorted(self._offsets, i, side='right')) - 1
    return self._parts[k][i - self._offsets[k]]
