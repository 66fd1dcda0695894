"""The errors this library raises on purpose. Each message names what is at fault (a config
key, a file and line, a directory), so the command line prints it as one line
(`rlhf_jax.main`) and keeps the traceback for everything else."""


class Error(Exception):
  """Base of the errors raised on purpose."""


class InputError(Error, ValueError):
  """A config value, a data file, an argument that cannot be used."""


class NotFound(Error, FileNotFoundError):
  """A file or directory that a config names and that is not there."""


class NonFinite(Error, FloatingPointError):
  """A training run whose loss or gradient norm stopped being finite."""


class CheckpointFailed(Error, OSError):
  """A checkpoint that could not be written (disk full, storage unreachable)."""


class WorkdirInUse(Error, RuntimeError):
  """Another live run holds the workdir."""


def one_line(error: BaseException) -> str:
  """The error's message on one line."""
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  return ' '.join(text.split())
