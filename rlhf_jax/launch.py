r"""Starts a run on every host of a Cloud TPU VM slice, from a workstation with `gcloud`.

  python -m rlhf_jax.launch --tpu=my-v4 --zone=us-central2-b --accelerator=v4-32 \
      --config=configs/sft.py:small --workdir=gs://my-bucket/sft_small --setup --dry_run \
      -- --config.optim.lr=1e-4

prints (without --dry_run: prints and runs) one command that runs the same training command on
every host of the slice:

  gcloud compute tpus tpu-vm ssh my-v4 --zone=us-central2-b --worker=all \
      --command='cd rlhf_jax && python3 -m rlhf_jax.main --config=... --workdir=... ...'

The hosts' processes find each other through `jax.distributed.initialize()`, which needs no
arguments on TPU VMs; on a multi-host slice the command passes
`--config.distributed.enabled=True`, so that a failure to start it stops the run rather than
leaving N independent single-host runs. Such a run needs its workdir on shared storage
(gs://...): every host writes its shards of each checkpoint there.

--setup first copies the code (setup.py, rlhf_jax/, configs/) to --repo_dir on every host and
installs it: `python3 -m pip install -e '.[gcs]' 'jax[tpu]'`.
--sweep_points=FILE starts one run per line of FILE (space-separated overrides such as
`--config.optim.lr=1e-4 --config.seed=1`, shell-quoted where needed; `#` starts a comment), one
after another, the run of line i (from 0, blank lines skipped) in <workdir>/<i>.
"""

import pathlib
import posixpath
import re
import shlex
import subprocess
from collections.abc import Sequence

from absl import app, flags

from rlhf_jax.errors import InputError
from rlhf_jax.tpu import topology

_TPU = flags.DEFINE_string('tpu', None, 'Name of the TPU VM (slice).')
_ZONE = flags.DEFINE_string('zone', None, 'Its zone, e.g. us-central2-b.')
_PROJECT = flags.DEFINE_string('project', None, 'Its project (default: gcloud config).')
_ACCELERATOR = flags.DEFINE_string('accelerator', None, 'Its accelerator type, e.g. v4-32.')
_CONFIG = flags.DEFINE_string('config', None, 'Config file[:preset], relative to --repo_dir.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of the run: gs://... if multi-host.')
_REPO_DIR = flags.DEFINE_string('repo_dir', 'rlhf_jax',
                                'Where the code is on the hosts, relative to the home directory '
                                '(where ssh starts) or absolute; a leading ~/ is dropped.')
_PYTHON = flags.DEFINE_string('python', 'python3', 'The Python interpreter on the hosts.')
_ENV = flags.DEFINE_multi_string('env', [], 'NAME=VALUE set for the run on every host.')
_SETUP = flags.DEFINE_bool('setup', False, 'Copy the code to the hosts and install it first.')
_SWEEP_POINTS = flags.DEFINE_string('sweep_points', None,
                                    'File of sweep points: one line of overrides per run.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands without running them.')

# What --setup copies, relative to the repository root.
SOURCES = ('setup.py', 'rlhf_jax', 'configs')


def check_workdir(workdir: str, hosts: int) -> None:
  """A run on several hosts needs one workdir that they all see: gs://..."""
  if hosts > 1 and not workdir.startswith('gs://'):
    raise InputError(f'--workdir={workdir!r} is not on Cloud Storage: the {hosts} hosts of the '
                     'slice each write their checkpoint shards there, and a local path would '
                     'split them over the hosts. Use --workdir=gs://BUCKET/PATH.')


def remote_path(path: str) -> str:
  """`path` as given to ssh and scp: `~/x` becomes `x`, which both resolve from the home
  directory (a quoted `~` would not expand)."""
  return path.removeprefix('~/') if path != '~' else '.'


def gcloud(verb: str, *args: str, zone: str, project: str | None) -> list[str]:
  """argv of `gcloud compute tpus tpu-vm VERB ARGS --zone=... --worker=all` (all hosts)."""
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *args, f'--zone={zone}',
          *([f'--project={project}'] if project else []), '--worker=all']


def ssh(command: str, *, tpu: str, zone: str, project: str | None) -> list[str]:
  """argv that runs the shell command `command` on every host of the slice `tpu`."""
  return [*gcloud('ssh', tpu, zone=zone, project=project), f'--command={command}']


def train_command(*, repo_dir: str, python: str, config: str, workdir: str,
                  overrides: Sequence[str], env: Sequence[str], distributed: bool) -> str:
  """The shell command each host runs: `cd REPO && [env NAME=VALUE ...] PYTHON -m
  rlhf_jax.main --config=... --workdir=... [--config.distributed.enabled=True] OVERRIDES`."""
  for assignment in env:
    if not re.fullmatch(r'[A-Za-z_]\w*=.*', assignment, flags=re.DOTALL):
      raise InputError(f'--env={assignment!r} is not NAME=VALUE.')
  argv = [*(['env', *env] if env else []), python, '-m', 'rlhf_jax.main',
          f'--config={config}', f'--workdir={workdir}',
          *(['--config.distributed.enabled=True'] if distributed else []), *overrides]
  return f'cd {shlex.quote(remote_path(repo_dir))} && {shlex.join(argv)}'


def setup_commands(*, repo_dir: str, python: str, source_dir: pathlib.Path, tpu: str,
                   zone: str, project: str | None) -> list[list[str]]:
  """argvs that copy the code (SOURCES under `source_dir`) to every host and install it."""
  target = shlex.quote(remote_path(repo_dir))
  return [
      ssh(f'mkdir -p {target}', tpu=tpu, zone=zone, project=project),
      gcloud('scp', '--recurse', *(str(source_dir / name) for name in SOURCES),
             f'{tpu}:{remote_path(repo_dir)}', zone=zone, project=project),
      ssh(f'cd {target} && '
          + shlex.join([python, '-m', 'pip', 'install', '-e', '.[gcs]', 'jax[tpu]']),
          tpu=tpu, zone=zone, project=project),
  ]


def read_sweep_points(path: str) -> list[list[str]]:
  """The overrides of each sweep point: the shell words of each non-blank line of `path`."""
  with open(path) as f:
    points = [shlex.split(line, comments=True) for line in f]
  points = [point for point in points if point]
  if not points:
    raise InputError(f'--sweep_points={path!r} lists no points.')
  return points


def runs(workdir: str, overrides: Sequence[str],
         sweep_points: Sequence[Sequence[str]] | None) -> list[tuple[str, list[str]]]:
  """(workdir, overrides) of each run: one, or one per sweep point in `workdir/<i>`."""
  if sweep_points is None:
    return [(workdir, list(overrides))]
  return [(posixpath.join(workdir, str(i)), [*overrides, *point])
          for i, point in enumerate(sweep_points)]


def main(argv):
  overrides = argv[1:]
  try:
    shape = topology(_ACCELERATOR.value)
    check_workdir(_WORKDIR.value, shape.hosts)
    points = read_sweep_points(_SWEEP_POINTS.value) if _SWEEP_POINTS.value else None
    where = dict(tpu=_TPU.value, zone=_ZONE.value, project=_PROJECT.value)
    commands = (setup_commands(repo_dir=_REPO_DIR.value, python=_PYTHON.value,
                               source_dir=pathlib.Path(__file__).parent.parent, **where)
                if _SETUP.value else [])
    for workdir, run_overrides in runs(_WORKDIR.value, overrides, points):
      commands.append(ssh(train_command(
          repo_dir=_REPO_DIR.value, python=_PYTHON.value, config=_CONFIG.value,
          workdir=workdir, overrides=run_overrides, env=_ENV.value,
          distributed=shape.hosts > 1), **where))
  except ValueError as e:
    raise SystemExit(f'rlhf_jax.launch: {e}') from e
  print(f'# {_ACCELERATOR.value}: hosts (JAX processes): {shape.hosts}, devices: '
        f'{shape.devices}', flush=True)
  for command in commands:
    print(shlex.join(command), flush=True)
    if not _DRY_RUN.value:
      subprocess.run(command, check=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['tpu', 'zone', 'accelerator', 'config', 'workdir'])
  app.run(main)
