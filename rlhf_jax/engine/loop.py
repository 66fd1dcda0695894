"""The one training loop: every algorithm, offline or online, runs through it.

An algorithm (`rlhf_jax.algorithms.base.Algorithm`) brings the model it trains, its loss and
its update batches; this loop owns everything around the update, the same way for SFT, reward
models, DPO, PPO, GRPO and RLOO:

    restore ─▶ [step 0: data statistics, evaluation] ─▶ for each step:
        batches = algorithm.batches.train(step, params)       (a data batch, or a rollout's
        state = train_step(state, batch) for each batch        minibatches)
        metrics of step s are read at step s + 1, so the device never waits
        evaluate (eval loss + the algorithm's evaluations); algorithm.stop(evaluation)?
        checkpoint (train state + data position + the algorithm's own state)
    ─▶ export the trained model to <workdir>/hf

A run is (config, workdir): run it again on the same workdir and it resumes from the last
checkpoint as if it had never stopped.
"""

import os
import signal
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rlhf_jax.engine.checkpoint import Checkpointer
from rlhf_jax.engine.metrics import MetricWriter, WandbOptions, progress_bar, write_config
from rlhf_jax.engine.optimizer import make_optimizer
from rlhf_jax.engine.state import abstract_like, init_train_state, train_state_shardings
from rlhf_jax.engine.step import LossFn, make_train_step
from rlhf_jax.errors import CheckpointFailed, Error, InputError, NonFinite
from rlhf_jax.models import lora
from rlhf_jax.models.loading import export_hf


class Interrupted(Error):
  """A run stopped by a signal or a preemption notice, after writing a checkpoint."""
  EXIT_STATUS = 75  # EX_TEMPFAIL: try again later (the same command resumes the run).


class Engine:
  """An algorithm's train state, jitted train and eval steps, checkpoints and metric writer on
  the run's mesh, restored from the workdir's last checkpoint if there is one. `update(step)`
  runs one step's updates (what benchmarks time); `train()` is the whole loop."""

  def __init__(self, ctx, algorithm):
    config, workdir, tc = ctx.config, ctx.workdir, ctx.config.train
    self.ctx, self.algorithm, self.batches = ctx, algorithm, algorithm.batches
    write_config(config, workdir)
    graphdef, params, param_shardings = algorithm.model
    # A LoRA model trains its adapters; its base weights stay out of the train state.
    params, self.fixed = lora.split_trained(params)
    param_shardings, fixed_shardings = lora.split_trained(param_shardings)
    optimizer, schedule = make_optimizer(config.optim, tc.steps * self.batches.updates_per_step)
    state_shardings = train_state_shardings(param_shardings, optimizer, params, ctx.mesh)
    self.state = init_train_state(params, optimizer, config.seed, state_shardings)

    self.checkpointer = Checkpointer.for_run(workdir, tc)
    self.start, self.stopped = 0, False
    restored = self.checkpointer.restore_latest_readable(abstract_like(self.state))
    if restored is not None:
      self.start, self.state, data_state = restored
      if data_state['step'] != self.start:
        raise InputError(f'Checkpoint {self.start} in {workdir} holds data position '
                         f'{data_state}.')
      self.stopped = data_state.get('stopped', False)
      self.batches.restore(data_state)
      logging.warning('Resumed %s from step %d.', workdir, self.start)
    self.saved = self.start  # The last step with a checkpoint.
    self.signal = None  # SIGTERM or SIGINT, once received.
    wandb = WandbOptions(tc.wandb_project, config.to_dict()) if tc.wandb else None
    self.writer = MetricWriter(workdir, start_step=self.start, tensorboard=tc.tensorboard,
                               wandb=wandb)

    self.frozen, frozen_shardings = algorithm.frozen or (None, None)
    self.train_step = make_train_step(algorithm.loss_fn, optimizer, graphdef,
                                      state_shardings=state_shardings,
                                      batch_shardings=self.batches.shardings,
                                      frozen_shardings=frozen_shardings,
                                      fixed_shardings=fixed_shardings, schedule=schedule,
                                      grad_accum_steps=config.optim.grad_accum_steps)
    self.evaluate_loss = make_eval_step(
        algorithm.loss_fn, graphdef,
        lora.join(state_shardings.params, fixed_shardings), self.batches.shardings,
        frozen_shardings)
    self.tokens = 0  # Through the train step since the progress bar last showed tokens/s.

  @property
  def params(self):
    """The model's parameters now: the trained ones, joined with a LoRA model's base."""
    return lora.join(self.state.params, self.fixed)

  def update(self, step: int) -> dict:
    """The updates of `step`: its batches through the train step; their (device) metrics."""
    update_batches, metrics = self.batches.train(step, self.params)
    start, update_metrics = time.perf_counter(), []
    for batch in update_batches:
      self.state, batch_metrics = self.train_step(self.state, batch, self.frozen, self.fixed)
      update_metrics.append(batch_metrics)
      self.tokens += batch['tokens'].size
    metrics = {**mean_metrics(update_metrics), **metrics}
    if any(k.startswith('time/') for k in metrics):  # The algorithm times its stages (and so
      jax.block_until_ready(self.state)                # waits anyway): add the updates' time.
      metrics['time/update'] = time.perf_counter() - start
    return metrics

  def evaluate(self, step: int) -> dict:
    """Loss over the eval batches and every evaluation of the algorithm, as 'eval/...'."""
    params = self.params
    losses = [self.evaluate_loss(params, batch, self.frozen)
              for batch in self.batches.eval(params)]
    results = {f'eval/{k}': v for k, v in
               jax.tree.map(lambda *x: np.mean(x), *jax.device_get(losses)).items()}
    for name, evaluation in self.algorithm.evaluations.items():
      results |= {f'eval/{name}/{k}': v for k, v in evaluation(params, step).items()}
    self.writer.write(step, results)
    return results

  def train(self) -> None:
    """Steps from the restored one to config.train.steps (or a stop), then the export."""
    ctx, algorithm, tc = self.ctx, self.algorithm, self.ctx.config.train
    if self.start == 0:
      if algorithm.data_stats:  # Examples (skipped, truncated), by source.
        self.writer.write(0, dict(algorithm.data_stats))
      if tc.eval_every and tc.eval_at_start:
        self.evaluate(0)

    bar = progress_bar(tc.steps, self.start, enabled=tc.progress_bar)
    last_shown = time.perf_counter()
    pending = None  # (step, metrics) to log, read one step late so the device never waits.
    unchecked = None  # (step, metrics) whose finiteness is checked one step late.

    def flush():
      nonlocal pending, last_shown
      if pending is not None:
        step, metrics = pending[0], jax.device_get(pending[1])
        # Wall times go to the progress bar: metrics.jsonl holds only reproducible numbers.
        times = {k: metrics.pop(k) for k in list(metrics) if k.startswith('time/')}
        if tc.nonfinite == 'stop':
          metrics.pop('update_skipped')  # Always 0: a skipped update stops the run.
        self.writer.write(step, metrics)
        now = time.perf_counter()
        shown = {k.rpartition('/')[2]: f'{metrics[k]:.4g}' for k in self.batches.progress_keys}
        shown['tok_s'] = f'{self.tokens / max(now - last_shown, 1e-9):,.0f}'
        if times:
          shown['s'] = '/'.join(f'{t:.1f}' for t in times.values())
        bar.set_postfix(shown)
        self.tokens, last_shown, pending = 0, now, None

    def check():
      nonlocal unchecked
      if unchecked is not None:
        self.check_finite(*unchecked)
        unchecked = None

    previous_handlers = self._catch_signals()
    ended = False  # Whether the loop ran to its end (else an error is on its way out).
    try:
      for step in range(self.start, self.start if self.stopped else tc.steps):
        metrics = self.update(step)
        check()
        flush()
        done = step + 1
        unchecked = (done, metrics)
        if done % tc.log_every == 0 or done == tc.steps:
          pending = (done, metrics)
        evaluated = tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps)
        if evaluated:
          check()
          flush()
          reason = algorithm.stop(self.evaluate(done))
          if reason:
            self.stopped = True
            logging.warning('%s: %s after step %d; stopping.', ctx.workdir, reason, done)
        interrupted = self._interrupted(done)
        if (done % tc.checkpoint_every == 0 or done == tc.steps or self.stopped
            or interrupted or (evaluated and tc.keep_eval_checkpoints)):
          check()  # Never a checkpoint of a step that went non-finite.
          flush()  # A checkpoint's step must never lack its metrics line.
          self.save(done)
        self.checkpointer.check_for_errors()
        bar.update(1)
        if interrupted:
          self.checkpointer.wait()
          raise Interrupted(f'{ctx.workdir}: stopped by {interrupted} after step {done}, '
                            'checkpoint written; run the same command to resume.')
        if self.stopped:
          break
      check()
      flush()
      ended = True
    finally:
      self._restore_signals(previous_handlers)
      bar.close()
      for close in (self.writer.close, self.checkpointer.close):  # The latter waits for
        try:                                                       # the saves in flight.
          close()
        except (OSError, CheckpointFailed):
          if ended:
            raise  # Else the error on its way out comes first (a full disk fails both).
    if tc.export_hf:
      export_hf(*algorithm.exported(self.params), os.path.join(ctx.workdir, 'hf'),
                algorithm.tokenizer, dtype=tc.export_dtype)

  def save(self, step: int) -> None:
    if step > self.saved:
      self.checkpointer.save(step, self.state, {'step': step, 'stopped': self.stopped,
                                                **self.batches.state()}, force=True)
      self.saved = step

  def check_finite(self, step: int, metrics) -> None:
    """With config.train.nonfinite='stop', raises if the update of `step` was skipped for a
    non-finite loss or gradient norm (the train step then left the parameters as they were)."""
    if self.ctx.config.train.nonfinite != 'stop':
      return
    values = jax.device_get({k: metrics[k] for k in ('update_skipped', 'loss', 'grad_norm')})
    if values['update_skipped'] > 0:
      raise NonFinite(
          f'{self.ctx.workdir}: at step {step} the loss is {values["loss"]} and the gradient '
          f'norm {values["grad_norm"]}; stopped with the parameters of step {step - 1}, '
          f'nothing after the checkpoint of step {self.saved} saved or exported. Lower '
          'config.optim.lr, or set config.train.nonfinite="skip" to skip such updates.')

  def _catch_signals(self) -> dict:
    """SIGTERM (a preemption, `kill`) and SIGINT (Ctrl-C) end the run after the current step,
    with a checkpoint; returns the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
      return {}

    def note(signum, frame):
      del frame
      self.signal = signal.Signals(signum).name
    return {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}

  @staticmethod
  def _restore_signals(handlers: dict) -> None:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)

  def _interrupted(self, step: int) -> str | None:
    """What stops the run after `step`: a signal to any process, or a preemption notice; every
    process sees the same answer at the same step."""
    received = self.signal is not None
    if jax.process_count() > 1:
      received = bool(np.max(multihost_utils.process_allgather(np.int32(received))))
    if received:
      return self.signal or 'a signal to another process'
    if self.checkpointer.reached_preemption(step):
      return 'a preemption notice'
    return None


def train(ctx, algorithm) -> None:
  """Trains `algorithm` in the run of `ctx` (a RunContext: config, workdir, mesh)."""
  Engine(ctx, algorithm).train()


def mean_metrics(metrics: list[dict]) -> dict:
  """The metrics of one step's updates: those of its one update, or their mean (on device)."""
  if len(metrics) == 1:
    return dict(metrics[0])
  return jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *metrics)


def make_eval_step(loss_fn: LossFn, graphdef, params_shardings, batch_shardings,
                   frozen_shardings=None) -> Callable:
  def evaluate(params, batch, frozen=None):
    loss, metrics = loss_fn(nnx.merge(graphdef, params), batch, jax.random.key(0), frozen)
    return {**metrics, 'loss': loss}
  jitted = jax.jit(evaluate, in_shardings=(params_shardings, batch_shardings, frozen_shardings))
  return lambda params, batch, frozen=None: jitted(params, batch, frozen)
