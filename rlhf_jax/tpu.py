"""Cloud TPU slices: accelerator types (`v4-32`) as hosts, JAX devices, torus shapes and
chips (HBM, peak FLOP/s), for launching runs (`rlhf_jax.launch`) and compiling them ahead of
time (`rlhf_jax.aot`)."""

import dataclasses
import math
import os

from rlhf_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Generation:
  """How the accelerator types of a TPU generation (`v4-32`) map to hosts and JAX devices."""
  cores_per_chip: int  # The number in the type counts TensorCores (2 a chip) or chips (1).
  devices_per_chip: int  # JAX devices: one a chip with megacore (v4, v5p), else one a core.
  single_host_chips: int  # The largest slice on one TPU VM.
  chips_per_host: int  # Chips on each TPU VM of a multi-host slice.


# Cloud TPU docs (cloud.google.com/tpu/docs/v4, v5p, v5e, v6e): v4-32 is 32 TensorCores = 16
# chips = 4 VMs of 4 chips; v5litepod-N (v5e) and v6e-N have N chips, one VM up to 8 and VMs of
# 4 chips beyond (v6e-16: 4 VMs).
GENERATIONS = {
    'v2': Generation(cores_per_chip=2, devices_per_chip=2, single_host_chips=4,
                     chips_per_host=4),
    'v3': Generation(cores_per_chip=2, devices_per_chip=2, single_host_chips=4,
                     chips_per_host=4),
    'v4': Generation(cores_per_chip=2, devices_per_chip=1, single_host_chips=4,
                     chips_per_host=4),
    'v5p': Generation(cores_per_chip=2, devices_per_chip=1, single_host_chips=4,
                      chips_per_host=4),
    'v5litepod': Generation(cores_per_chip=1, devices_per_chip=1, single_host_chips=8,
                            chips_per_host=4),
    'v6e': Generation(cores_per_chip=1, devices_per_chip=1, single_host_chips=8,
                      chips_per_host=4),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  hosts: int  # TPU VMs = JAX processes (jax.process_count()).
  devices: int  # jax.device_count().


def topology(accelerator: str, *, flag: str = '--accelerator') -> Topology:
  """The hosts and JAX devices of a slice of accelerator type `accelerator` (e.g. 'v4-32'),
  given by the flag `flag`."""
  name, _, number = accelerator.rpartition('-')
  if name not in GENERATIONS or not number.isdigit():
    raise InputError(f'Unknown {flag}={accelerator!r}; known types: '
                     + ', '.join(f'{known}-N' for known in GENERATIONS) + '.')
  generation, number = GENERATIONS[name], int(number)
  chips, cores_left = divmod(number, generation.cores_per_chip)
  multi_host = chips > generation.single_host_chips
  if not chips or cores_left or (multi_host and chips % generation.chips_per_host):
    raise InputError(f'{flag}={accelerator!r} is not a {name} slice: its number counts '
                     + ('TensorCores (2 a chip)' if generation.cores_per_chip == 2 else 'chips')
                     + f', and a slice beyond one host has {generation.chips_per_host} chips '
                     'a host.')
  return Topology(hosts=chips // generation.chips_per_host if multi_host else 1,
                  devices=chips * generation.devices_per_chip)


@dataclasses.dataclass(frozen=True)
class Chip:
  libtpu_name: str  # The generation in libtpu's topology names: 'v5p' of 'v5p:2x2x1'.
  torus_dims: int
  chip_config: str  # libtpu's chip config; 'megacore': one JAX device a chip (v4, v5p).
  hbm_gib: float
  peak_bf16_flops: float


# HBM per chip and peak bf16 FLOP/s per chip from the Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
CHIPS = {
    'v4': Chip('v4', 3, 'megacore', hbm_gib=32, peak_bf16_flops=275e12),
    'v5p': Chip('v5p', 3, 'megacore', hbm_gib=95, peak_bf16_flops=459e12),
    'v5litepod': Chip('v5e', 2, 'default', hbm_gib=16, peak_bf16_flops=197e12),
    'v6e': Chip('v6e', 2, 'default', hbm_gib=32, peak_bf16_flops=918e12),
}
ALIASES = {'v5e': 'v5litepod'}
KNOWN_FORMS = ('v4-N and v5p-N (N TensorCores, 2 a chip: v5p-8 is 4 chips), v5e-N or '
               'v5litepod-N and v6e-N (N chips)')


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # As typed: 'v5p-64'.
  chip: Chip
  chips: int
  topology: str  # libtpu's: 'v5p:2x4x4'.
  chips_per_host_bounds: tuple[int, int, int]

  def devices(self) -> list:
    """The slice's abstract JAX devices (one a chip), from libtpu's topology description.

    Compiling needs no chip, so several processes may load libtpu at once (test workers, a run
    of the other) instead of failing on its lockfile.
    """
    from jax.experimental import topologies
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    return topologies.get_topology_desc(
        platform='tpu', topology_name=self.topology, chip_config_name=self.chip.chip_config,
        chips_per_host_bounds=self.chips_per_host_bounds, num_slices=1).devices


def parse_slice(name: str) -> Slice:
  """The slice of a Cloud TPU accelerator type (`--topology`), e.g. 'v5p-64'."""
  generation, _, number = name.rpartition('-')
  generation = ALIASES.get(generation, generation)
  if generation not in CHIPS:
    raise InputError(f'Unknown --topology={name!r}; known forms: {KNOWN_FORMS}.')
  hosts_and_chips = topology(f'{generation}-{number}', flag='--topology')
  chip, chips = CHIPS[generation], hosts_and_chips.devices  # One device a chip here.
  shape = torus_shape(chips, chip.torus_dims, name)
  bounds = shape + (1,) * (3 - len(shape)) if hosts_and_chips.hosts == 1 else (2, 2, 1)
  return Slice(name, chip, chips, f'{chip.libtpu_name}:' + 'x'.join(map(str, shape)), bounds)


def torus_shape(chips: int, dims: int, name: str) -> tuple[int, ...]:
  """Cloud TPU's slice shape of `chips` chips: from 2x2x1 (3D) or 1x1 (2D), the last of the
  smallest sides doubled until it holds them (v5p-64: 2x4x4, v5e-32: 4x8)."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  if chips & (chips - 1) or chips < math.prod(shape):
    raise InputError(f'--topology={name!r} has {chips} chips; slices here have a power of two '
                     f'chips, at least {math.prod(shape)} ({KNOWN_FORMS}).')
  while math.prod(shape) < chips:
    shape[max(i for i, side in enumerate(shape) if side == min(shape))] *= 2
  return tuple(shape)
