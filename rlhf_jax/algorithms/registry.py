"""The algorithms by name (`config.algorithm`), the procedures that train nothing
(`config.procedure`), and one call that runs a config in a workdir."""

from rlhf_jax import parallel
from rlhf_jax.algorithms import dpo, kto, rm, sft
from rlhf_jax.algorithms.rl import learner as rl
from rlhf_jax.config import check_batch_sizes, check_paths, check_run_config
from rlhf_jax.context import RunContext
from rlhf_jax.engine import loop
from rlhf_jax.engine.workdir import workdir_lock
from rlhf_jax.errors import InputError
from rlhf_jax.evals import best_of_n

ALGORITHMS = {'sft': sft.make_algorithm, 'rm': rm.make_algorithm, 'dpo': dpo.make_algorithm,
              'kto': kto.make_algorithm, 'ppo': rl.make_algorithm, 'grpo': rl.make_algorithm,
              'rloo': rl.make_algorithm}
PROCEDURES = {'best_of_n': best_of_n.run}


def run(config, workdir: str) -> None:
  """Runs `config` in `workdir`: trains config.algorithm through the engine's loop (resuming
  from the workdir's last checkpoint if there is one), or runs config.procedure. The config is
  checked before any expensive work, and no other run may hold the workdir meanwhile."""
  procedure = config.get('procedure')
  if procedure is not None:
    if procedure not in PROCEDURES:
      raise InputError(f'config.procedure={procedure!r}; known: {sorted(PROCEDURES)}.')
    check_paths(config)
  elif config.get('algorithm') not in ALGORITHMS:
    raise InputError(f'config.algorithm={config.get("algorithm")!r}; known: '
                     f'{sorted(ALGORITHMS)}.')
  else:
    check_run_config(config)
  parallel.maybe_initialize_distributed(config.distributed)  # Before anything touches JAX.
  with workdir_lock(workdir):
    ctx = RunContext(config, workdir)
    check_batch_sizes(config, ctx.mesh)
    if procedure is not None:
      PROCEDURES[procedure](ctx)
    else:
      loop.train(ctx, ALGORITHMS[config.algorithm](ctx))
