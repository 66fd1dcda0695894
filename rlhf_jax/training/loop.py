"""The generic training loop: model, optimizer, sharded step, checkpoints, metrics.

An algorithm brings a loss function and a data source; this loop does the rest, the same way
for SFT, reward models and DPO. A run is (config, workdir): run it again on the same workdir
and it resumes from the last checkpoint as if it had never stopped.
"""

import os
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rlhf_jax import parallel
from rlhf_jax.models import Transformer, load_hf, read_hf_config, save_hf
from rlhf_jax.storage import staged_dir
from rlhf_jax.training.algorithm import Algorithm
from rlhf_jax.training.checkpoint import Checkpointer
from rlhf_jax.training.config import to_model_config
from rlhf_jax.training.metrics import MetricWriter, progress_bar, write_config
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.state import (abstract_like, init_train_state,
                                     train_state_shardings)
from rlhf_jax.training.step import LossFn, make_train_step


def build_model(config, mesh):
  """(graphdef, params, param_shardings), created or loaded straight into the mesh layout.

  `config.model.hf_path` loads an HF checkpoint (its architecture replaces config.model's,
  except the numerics: dtype, param_dtype, remat and head).
  """
  model = config.model
  if model.hf_path:
    return load_model(model.hf_path, model, mesh, config.sharding_rules, head=model.head)
  model_config = to_model_config(model)
  make = lambda: Transformer(model_config, rngs=nnx.Rngs(config.seed))
  return parallel.create_sharded(make, mesh, config.sharding_rules)


def load_model(path: str, numerics, mesh, rules, *, head: str):
  """(graphdef, params, param_shardings) of the HF checkpoint at `path` with a `head` head,
  stored, computed and rematerialised as `numerics` (a config.model) says."""
  cfg = read_hf_config(path, head=head)
  abstract_state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  shardings = parallel.state_shardings(abstract_state, mesh, rules)
  loaded = load_hf(path, numerics.param_dtype, head=head, shardings=shardings,
                   compute_dtype=numerics.dtype, remat=numerics.remat)
  graphdef, params = nnx.split(loaded)
  return graphdef, params, shardings


def local_rows(global_batch: int) -> range:
  """This process's rows of the global batch."""
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f'config.train.batch_size={global_batch} does not split over {n} '
                     'processes.')
  per_process = global_batch // n
  return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def train(config, workdir: str, algorithm: Algorithm) -> None:
  parallel.maybe_initialize_distributed(config.distributed)
  mesh = parallel.make_mesh(config.mesh)
  rules = config.sharding_rules
  tc = config.train
  write_config(config, workdir)

  graphdef, params, param_shardings = build_model(config, mesh)
  optimizer, schedule = make_optimizer(config.optim, tc.steps)
  state_shardings = train_state_shardings(param_shardings, optimizer, params, mesh)
  state = init_train_state(params, optimizer, config.seed, state_shardings)

  checkpointer = Checkpointer.for_run(workdir, tc)
  start = checkpointer.latest_step() or 0
  if start:
    state, data_state = checkpointer.restore(start, abstract_like(state))
    if data_state['step'] != start:
      raise ValueError(f'Checkpoint {start} in {workdir} holds data position {data_state}.')
    logging.warning('Resumed %s from step %d.', workdir, start)
  writer = MetricWriter(workdir, start_step=start, tensorboard=tc.tensorboard)

  if algorithm.prepare is not None:
    algorithm.prepare(mesh)  # E.g. reference log-probs, attached to the data before batching.
  frozen, frozen_shardings = (algorithm.make_frozen(mesh) if algorithm.make_frozen is not None
                              else (None, None))
  rows = local_rows(tc.batch_size)
  example = algorithm.data.batch('train', 0, rows)
  batch_shardings = {k: parallel.batch_sharding(mesh, rules, v.ndim) for k, v in example.items()}
  train_step = make_train_step(algorithm.loss_fn, optimizer, graphdef,
                               state_shardings=state_shardings,
                               batch_shardings=batch_shardings,
                               frozen_shardings=frozen_shardings, schedule=schedule,
                               grad_accum_steps=config.optim.grad_accum_steps)
  evaluate_loss = make_eval_step(algorithm.loss_fn, graphdef, state_shardings.params,
                                 batch_shardings, frozen_shardings)
  evaluations = (algorithm.make_evaluations(graphdef, mesh)
                 if algorithm.make_evaluations else {})

  def get_batch(split, step):
    return parallel.shard_batch(algorithm.data.batch(split, step, rows), mesh, rules)

  def evaluate(step, params):
    """Loss over the eval batches and every evaluation of the algorithm, as 'eval/...'."""
    losses = [evaluate_loss(params, get_batch('eval', i), frozen)
              for i in range(tc.eval_batches)]
    results = {f'eval/{k}': v for k, v in
               jax.tree.map(lambda *x: np.mean(x), *jax.device_get(losses)).items()}
    for name, evaluation in evaluations.items():
      results |= {f'eval/{name}/{k}': v for k, v in evaluation(params, step).items()}
    writer.write(step, results)

  if start == 0:
    if algorithm.data_stats:  # Skipped and truncated examples, by source.
      writer.write(0, dict(algorithm.data_stats))
    if tc.eval_every and tc.eval_at_start:
      evaluate(0, state.params)

  bar = progress_bar(tc.steps, start, enabled=tc.progress_bar)
  throughput = Throughput(tokens_per_step=tc.batch_size * tc.seq_len, step=start)
  pending = None  # (step, device metrics), fetched one step late so the device never waits.

  def flush():
    nonlocal pending
    if pending is not None:
      step, metrics = pending[0], jax.device_get(pending[1])
      writer.write(step, metrics)
      bar.set_postfix(loss=f'{metrics["loss"]:.4f}', tok_s=f'{throughput(step):,.0f}')
      pending = None

  for step in range(start, tc.steps):
    state, metrics = train_step(state, get_batch('train', step), frozen)
    flush()
    done = step + 1
    if done % tc.log_every == 0 or done == tc.steps:
      pending = (done, metrics)
    if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
      flush()
      evaluate(done, state.params)
    if done % tc.checkpoint_every == 0 or done == tc.steps:
      flush()  # A checkpoint's step must never lack its metrics line.
      checkpointer.save(done, state, {'step': done}, force=True)
    bar.update(1)
  flush()
  bar.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if tc.export_hf:
    export_hf(graphdef, state.params, os.path.join(workdir, 'hf'), algorithm.tokenizer)


def export_hf(graphdef, params, path: str, tokenizer=None) -> None:
  """The trained model (and its tokenizer) as a Hugging Face checkpoint directory.

  The next stage of a pipeline starts from it with `--config.model.hf_path=<workdir>/hf`. Its
  parameters are gathered to every host (save_hf writes from one host's memory). A `path` on
  shared storage (a URL) is written locally first, then uploaded.
  """
  params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() != 0:
    return
  token_ids = {}
  if tokenizer is not None:
    token_ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  with staged_dir(path) as local_path:
    save_hf(nnx.merge(graphdef, params), local_path, **token_ids)
    if tokenizer is not None:
      tokenizer.save_pretrained(local_path)


class Throughput:
  """Tokens per second since the previous call."""

  def __init__(self, *, tokens_per_step: int, step: int):
    self.tokens_per_step, self.step, self.time = tokens_per_step, step, time.perf_counter()

  def __call__(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self.step) * self.tokens_per_step / max(now - self.time, 1e-9)
    self.step, self.time = step, now
    return rate


def make_eval_step(loss_fn: LossFn, graphdef, params_shardings, batch_shardings,
                   frozen_shardings=None) -> Callable:
  def evaluate(params, batch, frozen=None):
    loss, metrics = loss_fn(nnx.merge(graphdef, params), batch, jax.random.key(0), frozen)
    return {**metrics, 'loss': loss}
  jitted = jax.jit(evaluate, in_shardings=(params_shardings, batch_shardings, frozen_shardings))
  return lambda params, batch, frozen=None: jitted(params, batch, frozen)
