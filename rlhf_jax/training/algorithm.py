"""What an algorithm hands the generic trainer: a loss function, a data source, evaluations."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax.training.step import LossFn

# evaluation(params, step) -> metrics; made once the model's graphdef and the mesh exist.
Evaluation = Callable[[nnx.State, int], Mapping[str, float]]
MakeEvaluations = Callable[[nnx.GraphDef, Mesh], Mapping[str, Evaluation]]
# (parameters, their shardings) of models the loss reads but does not train, on the mesh.
MakeFrozen = Callable[[Mesh], tuple[object, object]]


class DataSource(Protocol):

  def batch(self, split: str, step: int, rows: range) -> dict[str, np.ndarray]:
    """Rows `rows` of global batch number `step` of `split`, as host arrays."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
  loss_fn: LossFn
  data: DataSource
  # Evaluations beyond the loss on eval batches (e.g. gold reward of samples, calibration).
  make_evaluations: MakeEvaluations | None = None
  tokenizer: object | None = None  # Saved next to the exported model.
  make_frozen: MakeFrozen | None = None  # Passed to loss_fn as `frozen` (e.g. a reference).
  prepare: Callable[[Mesh], None] | None = None  # Work on the mesh before the first batch.
  data_stats: Mapping[str, int] = dataclasses.field(default_factory=dict)  # Skips, truncations.
