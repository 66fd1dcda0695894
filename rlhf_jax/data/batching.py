"""Fixed-shape rows from token sequences: padding to length buckets, and packing.

A *piece* is one example's token ids with a 0/1 loss weight per token. A row holds one piece
(padded on the right) or several packed end to end; packed pieces get their own `segment_ids`
and positions restarting at 0, so attention and position ids never cross examples.
"""

import bisect
from collections.abc import Sequence

import numpy as np

from rlhf_jax.errors import InputError

Piece = tuple[np.ndarray, np.ndarray]  # (token ids [L], loss mask [L])


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `longest` tokens (buckets sorted, last = seq_len)."""
  i = bisect.bisect_left(buckets, longest)
  if i == len(buckets):
    raise InputError(f'A row of {longest} tokens exceeds the largest bucket {buckets[-1]}.')
  return buckets[i]


def buckets_for(seq_len: int, buckets: Sequence[int] | None) -> tuple[int, ...]:
  """config.data.buckets validated and closed with seq_len (no buckets: always seq_len)."""
  buckets = sorted(set(buckets or ()) | {seq_len})
  if buckets[-1] != seq_len or buckets[0] < 1:
    raise InputError(f'config.data.buckets={buckets} must lie in [1, seq_len={seq_len}].')
  return tuple(buckets)


def pad_rows(rows: Sequence[Sequence[Piece]], length: int, *, pad_id: int,
             packed: bool = False) -> dict:
  """Rows of pieces into right-padded [N, length] arrays.

  Returns tokens, attention_mask, loss_mask, and if `packed` also segment_ids (1, 2, … per
  piece, 0 on padding) and positions (restarting at each piece); every batch of a packed
  source carries them, so batches keep one structure.
  """
  n = len(rows)
  tokens = np.full((n, length), pad_id, np.int32)
  loss_mask = np.zeros((n, length), np.int32)
  segment_ids = np.zeros((n, length), np.int32)
  positions = np.zeros((n, length), np.int32)
  for i, pieces in enumerate(rows):
    start = 0
    for segment, (ids, mask) in enumerate(pieces, start=1):
      end = start + len(ids)
      if end > length:
        raise InputError(f'Row {i} needs {end} tokens; the row length is {length}.')
      tokens[i, start:end] = ids
      loss_mask[i, start:end] = mask
      segment_ids[i, start:end] = segment
      positions[i, start:end] = np.arange(len(ids))
      start = end
  batch = {'tokens': tokens, 'attention_mask': (segment_ids > 0).astype(np.int32),
           'loss_mask': loss_mask}
  if packed:
    batch |= {'segment_ids': segment_ids, 'positions': positions}
  return batch


def pad_pairs(pairs: Sequence[tuple[Piece, Piece]], length: int, *, pad_id: int) -> dict:
  """(chosen, rejected) pieces into [N, 2, length] arrays: each pair side by side in a row."""
  halves = [pad_rows([[pair[j]] for pair in pairs], length, pad_id=pad_id) for j in (0, 1)]
  return {key: np.stack([halves[0][key], halves[1][key]], axis=1) for key in halves[0]}


def pack_starts(lengths: Sequence[int], seq_len: int, *, order: Sequence[int] | None = None
                ) -> np.ndarray:
  """Where each row starts when examples of these `lengths` (in order) fill rows of at most
  seq_len tokens, next-fit; closed by len(lengths). `order` names the examples in errors.

  Next-fit keeps the order (a pure function of it, so resumable and the same on every host);
  a row is closed when the next example does not fit.
  """
  lengths = np.asarray(lengths, np.int64)
  too_long = np.flatnonzero(lengths > seq_len)
  if len(too_long):
    index = too_long[0] if order is None else order[too_long[0]]
    raise InputError(f'Example {index} has {lengths[too_long[0]]} tokens > seq_len={seq_len}.')
  starts, used = [0], 0
  for i, length in enumerate(lengths.tolist()):
    if used + length > seq_len:
      starts.append(i)
      used = 0
    used += length
  starts.append(len(lengths))
  return np.asarray(starts, np.int64)

