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

from rlhf_jax.data.batching import pack
from rlhf_jax.errors import InputError


class Stream:
  """Units of one source in order: unit(position) -> example indices."""

  def __init__(self, lengths: Sequence[int], *, seed: int, shuffle: bool,
               pack_to: int | None = None):
    if not len(lengths):
      raise InputError('A data source has no examples.')
    self._lengths, self._seed, self._shuffle, self._pack_to = lengths, seed, shuffle, pack_to
    self._epochs: list[list[list[int]]] = []  # Packed rows of each epoch, made on demand.
    self._epoch_starts = [0]

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self._lengths)
    if not self._shuffle:
      return np.arange(n)
    return np.random.default_rng([self._seed, epoch]).permutation(n)

  def unit(self, position: int) -> list[int]:
    if self._pack_to is None:
      n = len(self._lengths)
      return [int(self._order(position // n)[position % n])]
    while self._epoch_starts[-1] <= position:  # Packed epochs have varying numbers of rows.
      rows = pack(self._lengths, self._order(len(self._epochs)), self._pack_to)
      self._epochs.append(rows)
      self._epoch_starts.append(self._epoch_starts[-1] + len(rows))
    epoch = int(np.searchsorted(self._epoch_starts, position, side='right')) - 1
    return self._epochs[epoch][position - self._epoch_starts[epoch]]


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
                       ) -> list[tuple[int, list[int]]]:
  """(source index, example indices) for every row of global batch `step`."""
  sources, positions = mixture.assign(step)
  return [(int(k), streams[k].unit(int(p))) for k, p in zip(sources, positions)]
