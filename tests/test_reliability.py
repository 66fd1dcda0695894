"""Nothing lost, nothing silent: runs as a user starts them, with faults and bad input.

A diverging run stops at the step it diverges and saves nothing of it; SIGTERM writes a
checkpoint and a rerun continues exactly; a second run on a workdir in use stops at once; a
corrupted latest checkpoint falls back to the previous one; bad settings and files end the
command with one line that names the key, file or directory.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from test_resume import ROOT, TIMEOUT, finish, start

from rlhf_jax import algorithms, errors
from rlhf_jax.config import load_config
from rlhf_jax.data.sources import read_records
from rlhf_jax.engine.metrics import read_metrics
from rlhf_jax.engine.loop import Interrupted
from devices import environment

DIVERGE = ['--config.optim.lr=1e3', '--config.optim.warmup_steps=1', '--config.train.steps=40',
           '--config.train.checkpoint_every=5', '--config.train.log_every=1',
           '--config.train.eval_every=0', '--config.train.export_hf=True']


def start_main(workdir, *args) -> subprocess.Popen:
  """`python -m rlhf_jax.main` with exactly these flags, on one CPU device."""
  env = environment(1)
  return subprocess.Popen([sys.executable, '-m', 'rlhf_jax.main', f'--workdir={workdir}', *args],
                          env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def last_line(stderr: str) -> str:
  return stderr.strip().splitlines()[-1]


def checkpoint_params(workdir, step) -> list[np.ndarray]:
  state = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'state')
  return [np.asarray(x) for x in jax_leaves(state['params'])]


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def test_a_diverging_run_stops_where_it_diverges_and_saves_nothing_of_it(tmp_path):
  stop, skip = tmp_path / 'stop', tmp_path / 'skip'
  runs = [start(stop, *DIVERGE), start(skip, *DIVERGE, '--config.train.nonfinite=skip')]
  stderr = finish(runs[0], expect_ok=False)
  finish(runs[1])
  assert runs[0].returncode == 1
  line = last_line(stderr)
  assert line.startswith('rlhf_jax.main: error:') and 'config.optim.lr' in line
  assert 'Traceback' not in stderr
  step = int(line.split('at step ')[1].split()[0])
  logged = read_metrics(stop / 'metrics.jsonl')
  assert [m['step'] for m in logged] == list(range(1, step))  # Up to the last finite step.
  assert all(np.isfinite(m['loss']) for m in logged)
  saved = sorted(int(p.name) for p in (stop / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and max(saved) < step
  assert all(np.isfinite(x).all() for x in checkpoint_params(stop, max(saved)))
  assert not (stop / 'hf').exists()
  # With nonfinite='skip' the same run skips those updates, counts them and exports a finite
  # model.
  skipped = [m['update_skipped'] for m in read_metrics(skip / 'metrics.jsonl')]
  assert len(skipped) == 40 and skipped[step - 1] == 1 and sum(skipped) >= 1
  weights = safetensors.numpy.load_file(skip / 'hf' / 'model.safetensors')
  assert all(np.isfinite(w).all() for w in weights.values())


def logged_steps(workdir) -> list[int]:
  """Steps of the complete lines of a metrics file that a live run may be writing to."""
  try:
    text = (workdir / 'metrics.jsonl').read_text()
  except FileNotFoundError:
    return []
  complete = text[:text.rfind('\n') + 1]  # A line being written has no newline yet.
  return [json.loads(line)['step'] for line in complete.splitlines() if line.strip()]


def test_interrupted_runs_resume_to_the_uninterrupted_runs_metrics(tmp_path):
  """Three runs stopped mid-run, next to one that is not: SIGTERM at step 35 of 60 (between
  checkpoints) exits 75 with a checkpoint of the step; a corrupted latest checkpoint makes the
  rerun fall back to the one before; SIGKILL at step 45 loses the steps since the last
  (asynchronous) checkpoint. Each rerun's metrics.jsonl ends byte-identical to the
  uninterrupted run's: every step once, in order, and every evaluation."""
  overrides = ['--config.train.steps=60', '--config.train.checkpoint_every=20',
               '--config.train.keep_checkpoints=3', '--config.train.log_every=1',
               '--config.train.eval_every=20', '--config.train.eval_batches=2',
               '--config.train.async_checkpoint=True',
               '--config.train.batch_size=32', '--config.train.seq_len=64',  # Steps of about
               '--config.data.max_items=30']  # 40 ms, so that the signals land mid-run.
  reference = start(tmp_path / 'ref', *overrides)
  signals = {'term': (signal.SIGTERM, 35), 'corrupt': (signal.SIGTERM, 35),
             'kill': (signal.SIGKILL, 45)}
  victims = {name: start(tmp_path / name, *overrides) for name in signals}
  deadline, signalled = time.time() + TIMEOUT, set()
  while len(signalled) < len(victims) and time.time() < deadline:  # All runs at once.
    for name, victim in victims.items():
      sig, at_step = signals[name]
      if name not in signalled and max(logged_steps(tmp_path / name), default=0) >= at_step:
        victim.send_signal(sig)
        signalled.add(name)
    time.sleep(0.01)
  stopped_at = {}
  for name, victim in victims.items():
    stderr = finish(victim, expect_ok=False)
    if name == 'kill':
      assert victim.returncode == -signal.SIGKILL, stderr[-3000:]
      stopped_at[name] = max(logged_steps(tmp_path / name))
      assert 45 <= stopped_at[name] < 60
      continue
    assert victim.returncode == Interrupted.EXIT_STATUS, stderr[-3000:]
    assert 'stopped by SIGTERM after step' in last_line(stderr)
    stopped_at[name] = int(last_line(stderr).split('after step ')[1].split(',')[0])
    assert 35 <= stopped_at[name] < 60
    assert (tmp_path / name / 'checkpoints' / str(stopped_at[name])).is_dir()
  # Corrupt every file of the latest checkpoint of one run: the rerun resumes from step 20.
  latest = tmp_path / 'corrupt' / 'checkpoints' / str(stopped_at['corrupt'])
  for path in latest.rglob('*'):
    if path.is_file():
      path.write_bytes(b'\0garbage')
  expected_resume = {'term': (stopped_at['term'],), 'corrupt': (20,), 'kill': (20, 40)}
  for name in victims:
    stderr = finish(start(tmp_path / name, *overrides))
    resumed_from = int(stderr.split('Resumed')[1].split('from step ')[1].split('.')[0])
    assert resumed_from in expected_resume[name], stderr[-3000:]
    if name == 'corrupt':
      assert f'Checkpoint {stopped_at[name]} in' in stderr and 'could not be read' in stderr
  finish(reference)
  logged = read_metrics(tmp_path / 'ref' / 'metrics.jsonl')
  assert [m['step'] for m in logged if 'loss' in m] == list(range(1, 61))
  assert [m['step'] for m in logged if 'eval/loss' in m] == [20, 40, 60]
  expected = (tmp_path / 'ref' / 'metrics.jsonl').read_bytes()
  for name in victims:
    assert (tmp_path / name / 'metrics.jsonl').read_bytes() == expected, name


def test_a_second_run_on_a_workdir_in_use_stops_at_once_naming_the_first(tmp_path):
  workdir = tmp_path / 'run'
  first = start(workdir, '--config.train.steps=100000', '--config.train.checkpoint_every=1000')
  deadline = time.time() + TIMEOUT
  while not (workdir / 'metrics.jsonl').exists() and time.time() < deadline:
    time.sleep(0.05)
  began = time.time()
  second = start(workdir, '--config.train.steps=10')
  stderr = finish(second, expect_ok=False)
  assert second.returncode == 1 and time.time() - began < 60
  assert f'pid {first.pid}' in last_line(stderr) and 'in use' in last_line(stderr)
  first.send_signal(signal.SIGTERM)
  finish(first, expect_ok=False)
  assert first.returncode == Interrupted.EXIT_STATUS
  assert not (workdir / 'run.lock').exists()
  # A lock left by a process that is gone is stale: the next run takes it over.
  (workdir / 'run.lock').write_text(json.dumps({'host': os.uname().nodename, 'pid': 2**22 + 7,
                                                'started': 'earlier'}))
  stderr = finish(start(workdir, '--config.train.steps=10', '--config.train.eval_every=0'))
  assert 'taking over the lock' in stderr


def test_bad_input_ends_with_one_line_naming_it(tmp_path):
  """Each case as a user meets it at the command line: exit 1, no traceback, the last line
  names the key, file or directory at fault."""
  bad_weights = tmp_path / 'bad_model'
  bad_weights.mkdir()
  (bad_weights / 'config.json').write_text(json.dumps({
      'model_type': 'llama', 'vocab_size': 512, 'hidden_size': 16, 'intermediate_size': 32,
      'num_hidden_layers': 1, 'num_attention_heads': 2, 'num_key_value_heads': 1}))
  (bad_weights / 'model.safetensors').write_bytes(b'not safetensors')
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  sorting = f'--config={ROOT}/configs/sft.py:sorting'
  sft = f'--config={ROOT}/configs/sft.py:tiny'
  cases = {
      (sorting, '--config.optim.lr=-0.001'): 'config.optim.lr=-0.001 must be > 0',
      (sorting, '--config.train.steps=0'): 'config.train.steps=0 must be > 0',
      (sorting, '--config.optim.lrr=1'): 'Did you mean "lr"',
      (sorting, '--config.train.batch_size=7', '--config.optim.grad_accum_steps=2'):
          'config.train.batch_size=7 does not split into 2 micro-batch',
      (sft, '--config.model.hf_path=no/such/dir'): "config.model.hf_path='no/such/dir': no "
                                                   'such directory',
      (sft, f'--config.model.hf_path={bad_weights}', '--config.data.tokenizer=playground',
       '--config.data.playground.train_size=64', '--config.data.playground.eval_size=8'):
          f'{bad_weights / "model.safetensors"}: not a readable safetensors file',
      (sft, f'--config.data.sources.sft=jsonl:{empty}'): 'is empty',
  }
  processes = {args: start_main(tmp_path / str(i), *args) for i, args in enumerate(cases)}
  for args, process in processes.items():
    stderr = finish(process, expect_ok=False)
    assert process.returncode == 1 and 'Traceback' not in stderr, (args, stderr[-3000:])
    assert cases[args] in last_line(stderr), (args, stderr[-3000:])


def test_indivisible_batch_names_the_key_before_any_setup(tmp_path):
  config = load_config('sft.py:sorting')
  config.train.batch_size = 12  # 8 devices (conftest.py): not a multiple.
  with pytest.raises(errors.InputError, match=r'config\.train\.batch_size=12'):
    algorithms.run(config, str(tmp_path))
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_skipped_examples_of_a_single_file_are_counted_once(tmp_path):
  path = tmp_path / 'sft.jsonl'
  lines = [json.dumps({'prompt': f'q{i}', 'response': f'a{i}'}) for i in range(20)]
  path.write_text('\n'.join(lines[:10] + ['{not json'] + lines[10:]) + '\n')
  data = ml_collections.ConfigDict({'skip_invalid': True, 'eval_fraction': 0.25, 'seed': 0})
  splits = read_records(f'jsonl:{path}', 'sft', data=data, key='config.data.sources.sft')
  assert sum(s.skipped['malformed_json'] for s in splits.values()) == 1
  assert sum(len(s.records) for s in splits.values()) == 20


def test_a_failed_export_leaves_no_partial_model(tmp_path, monkeypatch):
  """A disk that fills while the model is exported: the run fails with the OS error and no
  `hf/` stands in the workdir, so a pipeline never takes the stage for done."""
  from rlhf_jax.models import loading  # pylint: disable=g-import-not-at-top

  def full_disk(model, path, **fields):
    (pathlib.Path(path) / 'config.json').write_text('{}')  # Written before the disk filled.
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(loading, 'save_hf', full_disk)
  config = load_config('sft.py:sorting')
  config.train.update(steps=2, eval_every=0, export_hf=True, progress_bar=False,
                      tensorboard=False, batch_size=8)
  with pytest.raises(OSError, match='No space left'):
    algorithms.run(config, str(tmp_path))
  assert not (tmp_path / 'hf').exists() and not loading.is_export(str(tmp_path / 'hf'))
  assert [p.name for p in tmp_path.iterdir() if 'partial' in p.name] == []


def test_a_full_disk_stops_the_run_with_the_os_error_in_one_line(tmp_path):
  """The workdir on a 96 KiB tmpfs: the first checkpoint does not fit. The run stops at once
  and its last line says why (and, for a checkpoint, where)."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=96k', 'tmpfs', str(disk)],
                           capture_output=True, check=False)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.decode().strip()}')
  try:
    run = start(disk / 'run', '--config.train.steps=40', '--config.train.checkpoint_every=5',
                '--config.train.eval_every=0')
    stderr = finish(run, expect_ok=False)
  finally:
    subprocess.run(['umount', str(disk)], check=False)
  assert run.returncode == 1
  line = last_line(stderr)
  # The checkpoint's write or the metrics' (whichever finds the disk full first).
  assert line.startswith('rlhf_jax.main: error:'), stderr[-3000:]
  assert 'No space left on device' in line and 'Traceback' not in line
