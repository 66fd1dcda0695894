"""Encoded examples as the trainer's data source: `batch(split, step, rows)` of fixed shape.

Examples are token pieces (`batching.Piece`): one per SFT or text example, two (chosen,
rejected) per preference pair. Rows come from the `Mixture` of the sources; each batch is padded
to the smallest configured bucket that holds its longest row, so shapes (and compilations)
stay few. Preference batches are [B, 2, T]: row b's chosen and rejected sequences side by side,
so one forward pass over the reshaped [2B, T] batch scores both and each device keeps its pairs.
"""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from rlhf_jax.data.batching import Piece, bucket_length, pad_pairs, pad_rows
from rlhf_jax.data.mixture import Mixture, Stream, global_batch_units
from rlhf_jax.errors import InputError

Example = tuple[Piece, ...]  # (piece,) or (chosen, rejected).


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
               records: Mapping[str, Mapping[str, Sequence]] | None = None):
    """splits: split -> source name -> examples; every split names the mixture's sources.

    records: the same layout with the record each example came from (for evaluations that
    need the text, e.g. a gold reward); stats: counts of skipped and truncated examples.
    """
    self.shape, self.mixture, self.stats = shape, mixture, dict(stats or {})
    self._records = records
    self._attached: dict[str, dict[str, np.ndarray]] = {}
    self.paired = len(next(iter(splits['train'].values()))[0]) == 2
    if self.paired and shape.packing:
      raise InputError('config.data.packing applies to SFT and text, not to preference pairs.')
    self._examples, self._streams = {}, {}
    for split, sources in splits.items():
      self._examples[split] = [sources[name] for name in mixture.names]
      self._streams[split] = [
          Stream([max(len(p[0]) for p in example) for example in examples],
                 seed=seed + i, shuffle=split == 'train',
                 pack_to=shape.buckets[-1] if shape.packing else None)
          for i, examples in enumerate(self._examples[split])]

  def examples(self, split: str) -> list[Example]:
    """Every example of `split`, source after source."""
    return [ex for examples in self._examples[split] for ex in examples]

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
    return [r for name in self.mixture.names for r in self._records[split][name]]

  def batch(self, split: str, step: int, rows: range) -> dict[str, np.ndarray]:
    units = global_batch_units(self.mixture, self._streams[split], step)
    examples = self._examples[split]
    rows_pieces = [[examples[k][i] for i in indices] for k, indices in units]
    longest = max(sum(max(len(p[0]) for p in ex) for ex in row) for row in rows_pieces)
    length = bucket_length(longest, self.shape.buckets)
    local = [rows_pieces[r] for r in rows]
    attached = {}
    if self._attached:  # One example per row: its index in examples(split).
      offsets = np.cumsum([0] + [len(examples) for examples in self._examples[split][:-1]])
      ids = np.array([offsets[units[r][0]] + units[r][1][0] for r in rows])
      attached = {name: values[split][ids] for name, values in self._attached.items()}
    if not self.paired:
      return pad_rows([[ex[0] for ex in row] for row in local], length,
                      pad_id=self.shape.pad_id, packed=self.shape.packing) | attached
    return pad_pairs([row[0] for row in local], length, pad_id=self.shape.pad_id) | attached
