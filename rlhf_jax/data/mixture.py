"""Which example fills each row of a global batch: shuffled epochs and weighted mixtures.

Every row of every global batch is a pure function of (seed, split, step, row), so a resumed
run needs only its step, and each host makes just its own rows.

- A `Stream` walks one source's units (an example, or a packed row of examples) epoch by
  epoch, each epoch in its own seeded permutation (train) or in file order (eval).
- A `Mixture` gives each source a fixed number of rows in every global batch,
  round(w_k · B) by largest remainder, so proportions hold exactly in each batch instead of
  only on average. The weights can switch once, at a given step (e.g. the decay stage of a
  warmup-stable-decay run: "midtraining"); a source's position is then a closed-form count
  of the rows it filled in earlier steps.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from rlhf_jax.data.batching import pack_starts
from rlhf_jax.errors import InputError


class Stream:
  """Units of one source in order: units(positions) -> example indices and length of each.

  An epoch's order, its packed rows and their lengths are computed once, on the first row
  asked of it, and kept while rows of it or of the next epoch are asked: O(1) per row after
  O(n) per epoch.
  """

  def __init__(self, lengths: Sequence[int], *, seed: int, shuffle: bool,
               pack_to: int | None = None):
    if not len(lengths):
      raise InputError('A data source has no examples.')
    self._lengths = np.asarray(lengths, np.int64)
    self._seed, self._shuffle, self._pack_to = seed, shuffle, pack_to
    # epoch -> (order, start of each unit in it closed by n, tokens before each position).
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    self._epoch_starts = [0]  # First position of each epoch whose row count is known.

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if epoch not in self._epochs:
      n = len(self._lengths)
      order = (np.random.default_rng([self._seed, epoch]).permutation(n) if self._shuffle
               else np.arange(n))
      ordered = self._lengths[order]
      starts = (np.arange(n + 1) if self._pack_to is None
                else pack_starts(ordered, self._pack_to, order=order))
      for old in [e for e in self._epochs if e < epoch - 1]:
        del self._epochs[old]
      self._epochs[epoch] = order, starts, np.r_[0, np.cumsum(ordered)]
    return self._epochs[epoch]

  def units(self, positions: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(example indices of each unit, its tokens: the sum of its examples' lengths)."""
    positions = np.asarray(positions, np.int64)
    while self._epoch_starts[-1] <= positions.max():  # Packed epochs vary in row count.
      rows = len(self._epoch(len(self._epoch_starts) - 1)[1]) - 1
      self._epoch_starts.append(self._epoch_starts[-1] + rows)
    epochs = np.searchsorted(self._epoch_starts, positions, side='right') - 1
    units, lengths = [None] * len(positions), np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs).tolist():
      at = np.flatnonzero(epochs == epoch)
      order, starts, before = self._epoch(epoch)
      rows = positions[at] - self._epoch_starts[epoch]
      first, last = starts[rows], starts[rows + 1]
      lengths[at] = before[last] - before[first]
      for i, a, b in zip(at.tolist(), first.tolist(), last.tolist()):
        units[i] = order[a:b]
    return units, lengths


def rows_per_source(weights: Mapping[str, float], batch_size: int, *, key: str) -> np.ndarray:
  """round(w_k / Σw · B) rows per source, by largest remainder; every weighted source gets one."""
  w = np.array(list(weights.values()), np.float64)
  if (w < 0).any() or w.sum() <= 0:
    raise InputError(f'{key}={dict(weights)}: weights must be >= 0 with a positive sum.')
  exact = w / w.sum() * batch_size
  counts = np.floor(exact).astype(int)
  leftover = batch_size - counts.sum()
  counts[np.argsort(-(exact - counts), kind='stable')[:leftover]] += 1
  starved = [name for name, c, wk in zip(weights, counts, w) if wk > 0 and c == 0]
  if starved:
    raise InputError(f'{key}={dict(weights)}: {starved} would get no row of a batch of '
                     f'{batch_size}; raise their weight or config.train.batch_size.')
  return counts


class Mixture:
  """Per global batch: which source and which position in it fills each row."""

  def __init__(self, weights: Mapping[str, float], batch_size: int, *, seed: int,
               switch_step: int | None = None, weights_after: Mapping[str, float] | None = None):
    self.names = list(weights)
    self._seed, self._batch_size = seed, batch_size
    self._before = rows_per_source(weights, batch_size, key='config.data.weights')
    self._switch = switch_step
    self._after = self._before
    if weights_after is not None:
      if set(weights_after) != set(weights):
        raise InputError(f'config.data.decay_weights names {sorted(weights_after)}; '
                         f'config.data.weights names {sorted(weights)}.')
      self._after = rows_per_source({k: weights_after[k] for k in self.names}, batch_size,
                                    key='config.data.decay_weights')

  def counts(self, step: int) -> np.ndarray:
    return self._before if self._switch is None or step < self._switch else self._after

  def consumed(self, step: int) -> np.ndarray:
    """Rows each source filled in steps [0, step)."""
    if self._switch is None or step <= self._switch:
      return self._before * step
    return self._before * self._switch + self._after * (step - self._switch)

  def assign(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index [B], position within that source [B]) for every row of batch `step`."""
    counts = self.counts(step)
    sources = np.repeat(np.arange(len(counts)), counts)
    if len(counts) > 1:  # Interleave the sources over the rows (and so over the devices).
      sources = np.random.default_rng([self._seed, 2, step]).permutation(sources)
    positions = np.empty(self._batch_size, np.int64)
    start = self.consumed(step)
    for k in range(len(counts)):
      rows = np.flatnonzero(sources == k)
      positions[rows] = start[k] + np.arange(len(rows))
    return sources, positions


def global_batch_units(mixture: Mixture, streams: Sequence[Stream], step: int
                       ) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
  """(source index, example indices) for every row of global batch `step`, and each row's
  tokens."""
  sources, positions = mixture.assign(step)
  units, lengths = [None] * len(sources), np.empty(len(sources), np.int64)
  for k, stream in enumerate(streams):
    rows = np.flatnonzero(sources == k)
    if len(rows):
      source_units, lengths[rows] = stream.units(positions[rows])
      for row, unit in zip(rows.tolist(), source_units):
        units[row] = (k, unit)
  return units, lengths
