"""A token-level task for the fastest smoke runs, so a run needs no download.

`SortingTask`: the prompt is a list of random symbols, the response the same list sorted.

    BOS x_1 … x_k SEP sort(x)_1 … sort(x)_k EOS PAD …

A model must attend back across the prompt to answer, and the response's correctness is
checkable, which makes it a small but honest instruction-following task. Every row is a pure
function of (seed, split, step, row), so any process can make exactly its own rows of any
global batch, and resuming at a step needs no other state.
"""

import numpy as np

from rlhf_jax.data import SPLITS
from rlhf_jax.errors import InputError

PAD, BOS, SEP, EOS = 0, 1, 2, 3
NUM_SPECIAL = 4


class SortingTask:

  def __init__(self, *, seq_len: int, vocab_size: int, min_items: int, max_items: int,
               seed: int):
    if 2 * max_items + 3 > seq_len:
      raise InputError(f'config.data.max_items={max_items} needs seq_len >= {2 * max_items + 3},'
                       f' got config.train.seq_len={seq_len}.')
    if vocab_size <= NUM_SPECIAL + 1:
      raise InputError(f'config.model.vocab_size={vocab_size} leaves no symbols to sort.')
    self.seq_len, self.vocab_size = seq_len, vocab_size
    self.min_items, self.max_items, self.seed = min_items, max_items, seed

  def example(self, split: str, step: int, row: int) -> tuple[np.ndarray, int]:
    """Token ids of one example and the index where its response starts."""
    rng = np.random.default_rng([self.seed, SPLITS.index(split), step, row])
    k = rng.integers(self.min_items, self.max_items + 1)
    items = rng.integers(NUM_SPECIAL, self.vocab_size, size=k)
    tokens = np.concatenate([[BOS], items, [SEP], np.sort(items), [EOS]])
    return tokens, k + 2

  def batch(self, split: str, step: int, rows: range) -> dict[str, np.ndarray]:
    """Right-padded rows: tokens, attention_mask and loss_mask (1 on response tokens)."""
    n, t = len(rows), self.seq_len
    tokens = np.full((n, t), PAD, np.int32)
    attention_mask = np.zeros((n, t), np.int32)
    loss_mask = np.zeros((n, t), np.int32)
    for i, row in enumerate(rows):
      example, response_start = self.example(split, step, row)
      tokens[i, :len(example)] = example
      attention_mask[i, :len(example)] = 1
      loss_mask[i, response_start:len(example)] = 1
    return {'tokens': tokens, 'attention_mask': attention_mask, 'loss_mask': loss_mask}
