"""Entry point: `python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=DIR`.

Any config key can be overridden: `--config.optim.lr=1e-4 --config.mesh.fsdp=2`. A config path
under `configs/` that does not exist from the working directory is the installed one.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import algorithms
from rlhf_jax.config import config_path

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:preset].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and plots go.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the bar says enough.
  logging.info('Config:\n%s', _CONFIG.value)
  algorithms.run(_CONFIG.value, _WORKDIR.value)


def installed_config_args(argv: list[str]) -> list[str]:
  """argv with `--config=PATH` resolved by `config_path`."""
  return [f'--config={config_path(a[len("--config="):])}' if a.startswith('--config=') else a
          for a in argv]


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, argv=installed_config_args(sys.argv))
