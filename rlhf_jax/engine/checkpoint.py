"""Checkpoints with orbax: train state (sharded arrays) and data position, saved together.

Each step is written into `<directory>/<step>.orbax-checkpoint-tmp` and renamed to
`<directory>/<step>` only once every file is in place (on GCS, which cannot rename atomically,
it is written in place and counts only once `commit_success.txt` is there). A write cut short
by a crash is therefore never listed as a step nor restored, and the next save of that step
deletes its leftovers. Async saves copy the arrays to host memory, then write them in a
background thread while training goes on.
"""

import os

import orbax.checkpoint as ocp


def _absolute(directory: str) -> str:
  """Orbax needs absolute paths; remote ones (gs://...) are kept as they are."""
  return directory if '://' in directory else os.path.abspath(directory)


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep`, restores into given shardings."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        # Not orbax's default policy, which also saves the first step of a run, whatever it is.
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every))
    self._manager = ocp.CheckpointManager(_absolute(directory), options=options)

  @classmethod
  def for_run(cls, workdir: str, train) -> 'Checkpointer':
    """The checkpoints of a run in `<workdir>/checkpoints`, as config.train asks."""
    return cls(os.path.join(workdir, 'checkpoints'), save_every=train.checkpoint_every,
               keep=train.keep_checkpoints, async_save=train.async_checkpoint)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves if `step % save_every == 0` or `force`; returns whether it saved.

    state: a pytree of jax.Arrays (params, optimizer state, step; typed PRNG keys work too).
    data_state: a JSON-able dict, e.g. the data position.
    A step not above the latest is skipped, unless forced; forcing an existing step raises.
    """
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int | None, abstract_state) -> tuple[object, dict]:
    """(state, data_state) of `step` (None: the latest), each array laid out as asked.

    abstract_state: a pytree of jax.ShapeDtypeStruct with `.sharding`, so every array is read
    straight into its sharded layout (each host reads only its own shards).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self._manager.directory}.')
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self):
    """Blocks until the async saves in flight are written and committed."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for the saves in flight, then releases orbax's threads."""
    self._manager.close()
