"""Set before JAX is imported: eight virtual CPU devices for the sharding tests, compiled
cheaply (tests/devices.py), and one persistent XLA compilation cache for the whole session.

The suite builds many runs of the same tiny configs, in this process, in the subprocesses it
starts and in pytest-xdist's workers (which all inherit the environment); each would compile the
same programs again. With a cache fresh for the session (nothing carried over from an earlier
one), a program compiles once: on this project's 2-core CPU tests/test_rl_runs.py takes 124 s
instead of 313 s. The compiled programs are the ones a run without the cache would build, so no
test changes what it checks.
"""

import atexit
import os
import shutil
import tempfile

import devices  # tests/devices.py

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + devices.xla_flags(8)).strip()

# pytest-xdist's workers inherit the directory that the controlling process made (and removes).
_XLA_CACHE = os.environ.get('RLHF_JAX_TESTS_XLA_CACHE')
if _XLA_CACHE is None:
  _XLA_CACHE = os.environ['RLHF_JAX_TESTS_XLA_CACHE'] = tempfile.mkdtemp(
      prefix='rlhf_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.update({
    'JAX_COMPILATION_CACHE_DIR': _XLA_CACHE,
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
    # A size limit makes concurrent processes read and write the cache under a file lock.
    'JAX_COMPILATION_CACHE_MAX_SIZE': str(2**31),
})


def pytest_configure(config):
  """Processes started by tests run without torch (tests/no_torch/sitecustomize.py); the test
  processes keep it for the parity tests, so pytest-xdist's controller, whose workers inherit
  its environment, leaves PYTHONPATH as it is."""
  if config.getoption('numprocesses', None) and not hasattr(config, 'workerinput'):
    return
  shim = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'no_torch')
  os.environ['PYTHONPATH'] = os.pathsep.join(
      [shim] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
