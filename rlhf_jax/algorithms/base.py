"""What an algorithm hands the engine's loop (`rlhf_jax.engine.loop.train`).

An algorithm is its model, its loss and its update batches. The loop calls, in this order:
`batches.restore(checkpointed state)` on resume; per step `batches.train(step, params)`, one
train step per batch it returns; at evaluations `batches.eval(params)` (the eval loss) and each
of `evaluations`, then `stop(results)`; `batches.state()` goes into every checkpoint.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from flax import nnx

from rlhf_jax import parallel
from rlhf_jax.engine.step import LossFn
from rlhf_jax.models.loading import LoadedModel

# evaluation(params, step) -> metrics, for the trained parameters at `step`.
Evaluation = Callable[[nnx.State, int], Mapping[str, float]]


class UpdateBatches:
  """The batches of an algorithm's updates; offline algorithms read a dataset (`DataBatches`),
  online RL samples them (`rlhf_jax.algorithms.rl.learner.Rollouts`)."""

  shardings: object  # Of one batch (a pytree prefix of it), for the jitted steps.
  updates_per_step: int = 1  # Train steps per loop step, for the learning-rate schedule.
  progress_keys: Sequence[str] = ('loss',)  # Metrics shown on the progress bar.

  def train(self, step: int, params) -> tuple[list[dict], dict]:
    """(the update batches of `step`, metrics of making them) for the current `params`."""
    raise NotImplementedError

  def eval(self, params) -> list[dict]:
    """The batches of the eval loss; the same at every evaluation."""
    raise NotImplementedError

  def state(self) -> dict:
    """What a checkpoint keeps beyond the train state (JSON-able)."""
    return {}

  def restore(self, state: dict) -> None:
    """Continues from a checkpoint's `state()`."""


class DataBatches(UpdateBatches):
  """One batch per step from a data source whose `batch(split, step, rows)` is a pure function of
  its arguments: each process makes its own rows, and resuming needs only the step."""

  def __init__(self, data, *, mesh, rules, batch_size: int, eval_batches: int):
    self.data, self.mesh, self.rules, self.eval_batches = data, mesh, rules, eval_batches
    self.rows = parallel.local_rows(batch_size)
    example = data.batch('train', 0, self.rows)
    self.shardings = {k: parallel.batch_sharding(mesh, rules, v.ndim)
                      for k, v in example.items()}

  @classmethod
  def for_run(cls, ctx, data) -> 'DataBatches':
    """Batches of `data` of config.train.batch_size rows, on the run's mesh."""
    train = ctx.config.train
    return cls(data, mesh=ctx.mesh, rules=ctx.rules, batch_size=train.batch_size,
               eval_batches=train.eval_batches)

  def batch(self, split: str, step: int) -> dict:
    """Batch `step` of `split`, sharded over the mesh."""
    return parallel.shard_batch(self.data.batch(split, step, self.rows), self.mesh, self.rules)

  def train(self, step: int, params) -> tuple[list[dict], dict]:
    del params  # Offline: the data do not depend on the policy.
    return [self.batch('train', step)], {}

  def eval(self, params) -> list[dict]:
    return [self.batch('eval', i) for i in range(self.eval_batches)]


@dataclasses.dataclass
class Algorithm:
  model: LoadedModel  # What is trained, at its initial parameters.
  loss_fn: LossFn
  batches: UpdateBatches
  # Models the loss reads but does not train (DPO's reference): (params, shardings) or None.
  frozen: tuple[object, object] | None = None
  evaluations: Mapping[str, Evaluation] = dataclasses.field(default_factory=dict)
  data_stats: Mapping[str, int] = dataclasses.field(default_factory=dict)  # Logged at step 0.
  tokenizer: object | None = None  # Saved next to the exported model.
  # The (graphdef, params) to export from the trained params; default: the model itself.
  export: Callable[[nnx.State], tuple] | None = None
  # stop(evaluation results) -> why the run should end now, or None (e.g. a KL budget).
  stop: Callable[[Mapping[str, float]], str | None] = lambda results: None

  def exported(self, params) -> tuple:
    return self.export(params) if self.export else (self.model.graphdef, params)
