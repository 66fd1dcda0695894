"""Checkpoints with orbax: train state (sharded arrays) and data position, saved together.

Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once
every file is written (on GCS: a commit marker), so a write cut short by a crash is never listed
as a step and never restored. Async saves copy the arrays to host memory and write them in the
background while training goes on.
"""

import os

import jax
import orbax.checkpoint as ocp


def _absolute(directory: str) -> str:
  return directory if '://' in directory else os.path.abspath(directory)


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep`, restores into given shardings."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(_absolute(directory), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves (state, data_state) if `step` is due or `force`; returns whether it saved.

    state: a pytree of jax.Arrays (typed PRNG keys must be stored as `jax.random.key_data`).
    data_state: a JSON-able dict, e.g. the data position.
    """
    _check_no_typed_keys(state)
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int | None, abstract_state):
    """(state, data_state) of `step` (None: latest), each array placed as `abstract_state` says.

    abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding`, so every array is read
    straight into its sharded layout (each host reads only its shards).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self._manager.directory}.')
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def _check_no_typed_keys(state):
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if jax.dtypes.issubdtype(getattr(leaf, 'dtype', None), jax.dtypes.prng_key):
      raise TypeError(f'Checkpoint leaf {jax.tree_util.keystr(path)} is a typed PRNG key; '
                      'store jax.random.key_data(key) instead.')
