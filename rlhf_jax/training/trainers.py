"""The trainers by name (`config.algorithm`), and one call that runs a config in a workdir."""

from rlhf_jax import parallel
from rlhf_jax.training import dpo, loop, rm, sft

ALGORITHMS = {'sft': sft.make_algorithm, 'rm': rm.make_algorithm, 'dpo': dpo.make_algorithm}


def run(config, workdir: str) -> None:
  """Trains `config` in `workdir` (resuming from its last checkpoint if there is one)."""
  if config.algorithm not in ALGORITHMS:
    raise ValueError(f'config.algorithm={config.algorithm!r}; known: {sorted(ALGORITHMS)}.')
  parallel.maybe_initialize_distributed(config.distributed)  # Before the data touch JAX.
  loop.train(config, workdir, ALGORITHMS[config.algorithm](config, workdir))
