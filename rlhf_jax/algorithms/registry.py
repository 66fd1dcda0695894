"""The algorithms by name (`config.algorithm`), the procedures that train nothing
(`config.procedure`), and one call that runs a config in a workdir."""

from rlhf_jax.algorithms import dpo, rm, sft
from rlhf_jax.algorithms.rl import learner as rl
from rlhf_jax.context import RunContext
from rlhf_jax.engine import loop
from rlhf_jax.evals import best_of_n

ALGORITHMS = {'sft': sft.make_algorithm, 'rm': rm.make_algorithm, 'dpo': dpo.make_algorithm,
              'ppo': rl.make_algorithm, 'grpo': rl.make_algorithm, 'rloo': rl.make_algorithm}
PROCEDURES = {'best_of_n': best_of_n.run}


def run(config, workdir: str) -> None:
  """Runs `config` in `workdir`: trains config.algorithm through the engine's loop (resuming
  from the workdir's last checkpoint if there is one), or runs config.procedure."""
  procedure = config.get('procedure')
  if procedure is not None:
    if procedure not in PROCEDURES:
      raise ValueError(f'config.procedure={procedure!r}; known: {sorted(PROCEDURES)}.')
    PROCEDURES[procedure](RunContext(config, workdir))
    return
  if config.get('algorithm') not in ALGORITHMS:
    raise ValueError(f'config.algorithm={config.get("algorithm")!r}; known: '
                     f'{sorted(ALGORITHMS)}.')
  ctx = RunContext(config, workdir)
  loop.train(ctx, ALGORITHMS[config.algorithm](ctx))
