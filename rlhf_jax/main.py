"""Entry point: `python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=DIR`.

Any config key can be overridden: `--config.optim.lr=1e-4 --config.mesh.fsdp=2`. A config path
under `configs/` that does not exist from the working directory is the installed one.

Exit status: 0 done; 1 an error, printed as one line when the library raised it on purpose
(`rlhf_jax.errors`) or the operating system did (a full disk; `--verbosity=1` shows the
traceback too), with its traceback otherwise;
75 stopped by SIGTERM/SIGINT or a preemption notice after writing a checkpoint (run the same
command again to resume).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import algorithms, errors
from rlhf_jax.config import config_path
from rlhf_jax.engine.loop import Interrupted

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:preset].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and plots go.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  verbose = flags.FLAGS['verbosity'].present
  if not verbose:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the bar says enough.
  logging.info('Config:\n%s', _CONFIG.value)
  try:
    algorithms.run(_CONFIG.value, _WORKDIR.value)
  except Interrupted as stop:
    print(f'rlhf_jax.main: {stop}', file=sys.stderr)
    sys.exit(Interrupted.EXIT_STATUS)
  except (errors.Error, OSError) as error:  # On purpose, or the machine's (a full disk).
    if verbose:
      raise
    fail(f'rlhf_jax.main: error: {errors.one_line(error)}')


def fail(line: str) -> None:
  """Ends the command with `line` as its last output and status 1. Background threads of a
  failed checkpoint write would print their own errors at interpreter shutdown, so the process
  ends here, its files closed by the loop."""
  logging.flush()
  print(line, file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    sys.exit(f'rlhf_jax.main: error in the flags: {errors.one_line(error)}')


def installed_config_args(argv: list[str]) -> list[str]:
  """argv with `--config=PATH` resolved by `config_path`."""
  return [f'--config={config_path(a[len("--config="):])}' if a.startswith('--config=') else a
          for a in argv]


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, argv=installed_config_args(sys.argv), flags_parser=parse_flags)
