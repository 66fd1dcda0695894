"""Checkpoints with orbax: train state (sharded arrays) and data position, saved together.

Each step is written into `<directory>/<step>.orbax-checkpoint-tmp` and renamed to
`<directory>/<step>` only once every file is in place (on GCS, which cannot rename atomically,
it is written in place and counts only once `commit_success.txt` is there). A write cut short
by a crash is therefore never listed as a step nor restored, and the next save of that step
deletes its leftovers. Async saves copy the arrays to host memory, then write them in a
background thread while training goes on.
"""

import contextlib
import os

import orbax.checkpoint as ocp
from absl import logging

from rlhf_jax.errors import CheckpointFailed, InputError, NotFound



def _absolute(directory: str) -> str:
  """Orbax needs absolute paths; remote ones (gs://...) are kept as they are."""
  return directory if '://' in directory else os.path.abspath(directory)


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep`, restores into given shardings.

  With `keep_every`, every `keep_every`-th step is saved too and kept for good (a run's
  evaluation steps: the policies of a curve's points stay exportable).
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, keep_every: int = 0,
               async_save: bool = True):
    policies = ocp.checkpoint_managers
    # Not orbax's default policy, which also saves the first step of a run, whatever it is.
    save = [policies.FixedIntervalPolicy(save_every)]
    preserve = [policies.LatestN(keep)]
    if keep_every:
      save.append(policies.FixedIntervalPolicy(keep_every))
      preserve.append(policies.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, create=True,
        save_decision_policy=policies.AnySavePolicy(save),
        preservation_policy=policies.AnyPreservationPolicy(preserve))
    self._manager = ocp.CheckpointManager(_absolute(directory), options=options)

  @classmethod
  def for_run(cls, workdir: str, train) -> 'Checkpointer':
    """The checkpoints of a run in `<workdir>/checkpoints`, as config.train asks."""
    return cls(os.path.join(workdir, 'checkpoints'), save_every=train.checkpoint_every,
               keep=train.keep_checkpoints,
               keep_every=train.eval_every if train.keep_eval_checkpoints else 0,
               async_save=train.async_checkpoint)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _existing(self, step: int | None) -> int:
    """`step` (None: the latest) if it has a checkpoint; else an error listing those there are."""
    steps = sorted(self._manager.all_steps())
    if not steps:
      raise NotFound(f'No checkpoint in {self._manager.directory}.')
    if step is None:
      return steps[-1]
    if step not in steps:
      raise NotFound(f'No checkpoint of step {step} in {self._manager.directory}; it has steps '
                     f'{", ".join(map(str, steps))}.')
    return step

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves if `step` is a multiple of `save_every` (or `keep_every`) or `force`; returns
    whether it saved.

    state: a pytree of jax.Arrays (params, optimizer state, step; typed PRNG keys work too).
    data_state: a JSON-able dict, e.g. the data position.
    A step not above the latest is skipped, unless forced; forcing an existing step raises.
    """
    if force and step in self._manager.all_steps():
      raise InputError(f'Checkpoint {step} already exists in {self._manager.directory}.')
    with self._failures_named():
      return self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int | None, abstract_state) -> tuple[object, dict]:
    """(state, data_state) of `step` (None: the latest), each array laid out as asked.

    abstract_state: a pytree of jax.ShapeDtypeStruct with `.sharding`, so every array is read
    straight into its sharded layout (each host reads only its own shards).
    """
    restored = self._manager.restore(
        self._existing(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def restore_params(self, step: int | None, abstract_params, *,
                     within: tuple[str, ...] = ()) -> tuple[int, object]:
    """(the step, its parameters) for `step` (None: the latest): only the train state's
    `params` (the subtree at `within`, e.g. ('policy',)), read straight into the layout of
    `abstract_params` (jax.ShapeDtypeStructs with `.sharding`), without the optimizer's
    moments. What `python -m rlhf_jax.export` writes out."""
    step = self._existing(step)
    target = abstract_params
    for key in reversed(('params', *within)):
      target = {key: target}
    # Read by a PyTree checkpointer of its own: the manager's item 'state' is bound to the
    # StandardRestore of `restore`, which cannot read part of a tree.
    with ocp.PyTreeCheckpointer() as checkpointer:
      params = checkpointer.restore(
          self._manager.directory / str(step) / 'state', args=ocp.args.PyTreeRestore(
              target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
    for key in ('params', *within):
      params = params[key]
    return step, params

  def restore_latest_readable(self, abstract_state) -> tuple[int, object, dict] | None:
    """(step, state, data_state) of the latest checkpoint that reads back, or None if there is
    none. A checkpoint that fails to read (corrupted, cut short on shared storage) is reported
    and deleted, and the one before it tried, so a run resumes from its last good step."""
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as error:  # pylint: disable=broad-except
        cause = ' '.join(str(error).split())[:300]
        failures.append(f'step {step} ({type(error).__name__}: {cause})')
        logging.warning('Checkpoint %d in %s could not be read (%s: %s); deleting it and '
                        'trying the previous one.', step, self._manager.directory,
                        type(error).__name__, cause)
        self._manager.delete(step)
        continue
      return step, state, data_state
    if failures:
      raise InputError(f'No checkpoint in {self._manager.directory} could be read: '
                       f'{"; ".join(failures)}. Move the directory away to start over.')
    return None

  def check_for_errors(self) -> None:
    """Raises the error of a failed background save now, rather than at the next save."""
    with self._failures_named():
      self._manager.check_for_errors()

  @contextlib.contextmanager
  def _failures_named(self):
    """A failed save (a full disk, storage out of reach) as one CheckpointFailed error."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except
      raise CheckpointFailed(f'Saving a checkpoint in {self._manager.directory} failed: '
                             f'{" ".join(str(error).split())}') from error

  def reached_preemption(self, step: int) -> bool:
    """Whether the platform announced a preemption (a TPU maintenance event) that every host
    has now seen at `step`, so all save this step and stop."""
    return self._manager.reached_preemption(step)

  def wait(self):
    """Blocks until the async saves in flight are written and committed."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for the saves in flight, then releases orbax's threads."""
    with self._failures_named():
      self._manager.close()
