"""What an algorithm hands the generic trainer: a loss function and a data source."""

import dataclasses
from typing import Protocol

import numpy as np

from rlhf_jax.training.step import LossFn


class DataSource(Protocol):

  def batch(self, split: str, step: int, rows: range) -> dict[str, np.ndarray]:
    """Rows `rows` of global batch number `step` of `split`, as host arrays."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
  loss_fn: LossFn
  data: DataSource
