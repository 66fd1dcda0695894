"""XLA_FLAGS for the suite's processes: a number of virtual CPU devices, compiled cheaply.

The suite's models are toys, so its time goes to compiling the programs, not running them.
LLVM's lowest optimisation level without its expensive passes cuts that time (on this
project's 2-core CPU, tests/test_lecture.py's micro run: 100 s -> 83 s); every pair of runs a
test compares is compiled the same way, in the test's process and in those it starts.
"""

import os

FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def xla_flags(devices: int) -> str:
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


def environment(devices: int) -> dict[str, str]:
  """os.environ (the session's XLA cache included, see conftest.py) with `devices` devices."""
  return {**os.environ, 'XLA_FLAGS': xla_flags(devices)}
