"""The trainers by name (`config.algorithm`), and one call that runs a config in a workdir."""

from rlhf_jax import parallel
from rlhf_jax.eval import best_of_n
from rlhf_jax.training import dpo, loop, rl, rm, sft

ALGORITHMS = {'sft': sft.make_algorithm, 'rm': rm.make_algorithm, 'dpo': dpo.make_algorithm}
# Runs with a loop of their own (or none): run(config, workdir).
PROCEDURES = {'bon': best_of_n.run, 'rl': rl.train}


def run(config, workdir: str) -> None:
  """Trains `config` in `workdir` (resuming from its last checkpoint if there is one)."""
  known = sorted(ALGORITHMS) + sorted(PROCEDURES)
  if config.algorithm not in known:
    raise ValueError(f'config.algorithm={config.algorithm!r}; known: {known}.')
  parallel.maybe_initialize_distributed(config.distributed)  # Before the data touch JAX.
  if config.algorithm in PROCEDURES:
    PROCEDURES[config.algorithm](config, workdir)
  else:
    loop.train(config, workdir, ALGORITHMS[config.algorithm](config, workdir))
