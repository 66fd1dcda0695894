"""Padding, buckets, packing, shuffled epochs and mixtures of the data layer."""

import numpy as np
import pytest

from rlhf_jax.data.batching import bucket_length, buckets_for, pack_starts, pad_rows
from rlhf_jax.data.datasets import BatchShape, TokenData
from rlhf_jax.data.mixture import Mixture, Stream, rows_per_source
from rlhf_jax.engine.optimizer import decay_start_step


def piece(ids, prompt_len=0):
  ids = np.asarray(ids, np.int32)
  return ids, (np.arange(len(ids)) >= prompt_len).astype(np.int32)


def test_pack_is_next_fit_in_order():
  np.testing.assert_array_equal(pack_starts([3, 4, 2, 5, 1], 8), [0, 2, 5])  # [3 4] [2 5 1]
  np.testing.assert_array_equal(pack_starts([5, 2, 3, 1, 4], 8), [0, 2, 5])  # [5 2] [3 1 4]
  np.testing.assert_array_equal(pack_starts([4, 5, 3], 8), [0, 1, 3])  # [4] [5 3]
  with pytest.raises(ValueError, match='Example 7 has 5 tokens > seq_len=4'):
    pack_starts([5], 4, order=[7])


def test_pad_rows_packed_segments_and_positions():
  rows = [[piece([5, 6, 7], 1), piece([8, 9], 0)], [piece([4], 0)]]
  batch = pad_rows(rows, 6, pad_id=0, packed=True)
  np.testing.assert_array_equal(batch['tokens'], [[5, 6, 7, 8, 9, 0], [4, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch['segment_ids'], [[1, 1, 1, 2, 2, 0], [1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch['positions'], [[0, 1, 2, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch['loss_mask'], [[0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch['attention_mask'], batch['segment_ids'] > 0)
  assert 'segment_ids' not in pad_rows(rows[1:], 6, pad_id=0)


def test_buckets():
  assert buckets_for(64, [16, 32]) == (16, 32, 64)
  assert buckets_for(64, None) == (64,)
  assert [bucket_length(n, (16, 32, 64)) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
  with pytest.raises(ValueError, match='config.data.buckets'):
    buckets_for(64, [128])


def test_rows_per_source_largest_remainder():
  np.testing.assert_array_equal(rows_per_source({'a': 3, 'b': 1}, 8, key='k'), [6, 2])
  np.testing.assert_array_equal(rows_per_source({'a': 1, 'b': 1, 'c': 1}, 8, key='k'),
                                [3, 3, 2])
  with pytest.raises(ValueError, match=r"config.data.weights.*\['b'\] would get no row"):
    rows_per_source({'a': 0.99, 'b': 0.01}, 8, key='config.data.weights')


def units(stream, positions):
  return [unit.tolist() for unit in stream.units(np.asarray(positions))[0]]


def test_shuffled_stream_visits_every_example_once_per_epoch():
  stream = Stream([1] * 10, seed=3, shuffle=True)
  epochs = [sorted(sum(units(stream, range(e * 10, e * 10 + 10)), [])) for e in range(3)]
  assert all(e == list(range(10)) for e in epochs)
  first, second = (units(stream, range(e * 10, e * 10 + 10)) for e in (0, 1))
  assert first != second  # A new permutation each epoch.
  # Asked in another order, or across an epoch's end, the same units.
  assert units(Stream([1] * 10, seed=3, shuffle=True), [9, 3, 12, 0]) == [
      first[9], first[3], second[2], first[0]]
  assert units(Stream([1] * 4, seed=0, shuffle=False), range(6)) == [[0], [1], [2], [3], [0],
                                                                      [1]]


def test_packed_stream_covers_each_epoch():
  lengths = list(np.random.default_rng(0).integers(1, 6, size=40))
  stream = Stream(lengths, seed=0, shuffle=True, pack_to=8)
  seen, position = [], 0
  while len(seen) < 80:  # Two epochs.
    [unit], [tokens] = stream.units([position])
    assert tokens == sum(lengths[i] for i in unit) <= 8
    seen += unit.tolist()
    position += 1
  assert sorted(seen[:40]) == list(range(40)) and sorted(seen[40:]) == list(range(40))


def test_mixture_positions_are_consecutive_across_a_switch():
  mixture = Mixture({'a': 3, 'b': 1}, 8, seed=0, switch_step=5, weights_after={'a': 1, 'b': 1})
  positions = {0: [], 1: []}
  for step in range(9):
    sources, pos = mixture.assign(step)
    counts = np.bincount(sources, minlength=2)
    assert list(counts) == ([6, 2] if step < 5 else [4, 4])
    for k in (0, 1):
      positions[k] += sorted(pos[sources == k])
  assert positions[0] == list(range(6 * 5 + 4 * 4))
  assert positions[1] == list(range(2 * 5 + 4 * 4))
  with pytest.raises(ValueError, match='decay_weights'):
    Mixture({'a': 1}, 8, seed=0, switch_step=1, weights_after={'b': 1})


def test_decay_start_matches_the_schedule():
  class Optim:
    schedule, decay_fraction = 'warmup_stable_decay', 0.2
  assert decay_start_step(Optim, 100) == 80
  Optim.schedule = 'warmup_cosine'
  with pytest.raises(ValueError, match='warmup_stable_decay'):
    decay_start_step(Optim, 100)


def _examples(n, seed, paired=False):
  rng = np.random.default_rng(seed)
  make = lambda: piece(rng.integers(5, 50, size=rng.integers(2, 9)), 1)
  return [(make(), make()) if paired else (make(),) for _ in range(n)]


@pytest.mark.parametrize('paired,packing', [(False, False), (False, True), (True, False)])
def test_rows_made_by_two_hosts_equal_the_global_batch(paired, packing):
  splits = {'train': {'a': _examples(30, 0, paired), 'b': _examples(7, 1, paired)}}
  data = TokenData(splits, Mixture({'a': 3, 'b': 1}, 8, seed=0),
                   BatchShape(batch_size=8, buckets=(8, 16, 24), pad_id=0, packing=packing),
                   seed=0)
  for step in (0, 3, 11):
    whole = data.batch('train', step, range(8))
    halves = [data.batch('train', step, rows) for rows in (range(0, 4), range(4, 8))]
    for key, value in whole.items():
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
    assert whole['tokens'].shape[-1] in (8, 16, 24)
    assert whole['tokens'].shape[:-1] == ((8, 2) if paired else (8,))
    # The bucket is the smallest that holds the longest row.
    assert whole['attention_mask'].sum(-1).max() > {8: 0, 16: 8, 24: 16}[
        whole['tokens'].shape[-1]]


def test_batches_depend_only_on_the_step():
  """Resuming needs only the step: a fresh data source asked for step 9 first gives what one
  that walked steps 0..9 in order gave (packing, a mixture and its midtraining switch)."""
  def make():
    splits = {'train': {'a': _examples(40, 0), 'b': _examples(25, 1)}}
    mixture = Mixture({'a': 1, 'b': 1}, 8, seed=0, switch_step=5, weights_after={'a': 3, 'b': 1})
    return TokenData(splits, mixture, BatchShape(batch_size=8, buckets=(24,), pad_id=0,
                                                 packing=True), seed=0)
  walked = make()
  in_order = [walked.batch('train', step, range(8)) for step in range(10)]
  resumed = make()
  for step in (9, 6, 2):
    for key, value in resumed.batch('train', step, range(8)).items():
      np.testing.assert_array_equal(value, in_order[step][key])
