"""Online RL from a reward model: PPO with GAE, and critic-free GRPO and RLOO.

Each iteration (one `step` of the run)
  1. rollout: the policy samples responses to a batch of prompts (G per prompt for GRPO/RLOO)
     with the jitted KV-cache sampler;
  2. scoring: one jitted pass gives log-probs, values, reference log-probs, reward-model scores
     and advantages (`rlhf_jax.training.rollout`);
  3. update: `ppo_epochs` passes over the rollout in shuffled minibatches, each minibatch one
     step of the generic train step (`make_train_step`) on the clipped losses.
The KL coefficient β is fixed or follows the adaptive controller (Ziegler et al. 2019); with a KL
budget (`config.rl.stop_kl`) the run ends at the first evaluation that measures it. The
models, all on one mesh: the policy and its critic (trained together, `ActorCritic`), the
reference (the initial policy) and the reward model (frozen). A killed run resumes from its
last checkpoint and continues as if never stopped: prompts, sampling keys and minibatch orders
are functions of (seed, iteration).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rlhf_jax import parallel
from rlhf_jax.data import playground
from rlhf_jax.data.pipeline import make_tokenizer
from rlhf_jax.eval.gold import make_gold, uses_playground_gold
from rlhf_jax.eval.teacher import TeacherReward
from rlhf_jax.losses import adaptive_kl_coef, kl_penalty, masked_mean
from rlhf_jax.losses.ppo import KL_ESTIMATORS, ppo_policy_loss, ppo_value_loss
from rlhf_jax.sampling import make_sampler
from rlhf_jax.sampling.text import decode_responses, encode_prompts
from rlhf_jax.training import loop
from rlhf_jax.training.actor_critic import CRITICS, ActorCritic, ValueHead
from rlhf_jax.training.checkpoint import Checkpointer
from rlhf_jax.training.metrics import MetricWriter, progress_bar, write_config
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.rollout import ESTIMATORS, merge_and_score, reward_model_scores
from rlhf_jax.training.sft import sample_evaluations
from rlhf_jax.training.state import abstract_like, init_train_state, train_state_shardings
from rlhf_jax.training.step import make_train_step


def rl_loss_fn(model: ActorCritic, batch, rng=None, frozen=None, *, temperature: float,
               chunk_size: int, clip_eps: float, value_clip_eps: float, vf_coef: float,
               kl_loss_coef: float):
  """Clipped policy loss (+ vf_coef · clipped value loss with a critic, + β · KL_k3 to the
  reference when the KL is in the loss, as in GRPO) on a minibatch of the rollout."""
  del rng, frozen  # Deterministic; the reference's log-probs come with the batch.
  mask = batch['response_mask']
  prompt_len = batch['tokens'].shape[1] - mask.shape[1]
  logps, values = model.response_logprobs_and_values(
      batch['tokens'], batch['attention_mask'], prompt_len=prompt_len,
      temperature=temperature, chunk_size=chunk_size)
  loss, metrics = ppo_policy_loss(logps, batch['old_logps'], batch['advantages'], mask,
                                  clip_eps=clip_eps)
  if values is not None:
    value_loss, value_metrics = ppo_value_loss(values, batch['old_values'], batch['returns'],
                                               mask, clip_eps=value_clip_eps)
    loss += vf_coef * value_loss
    metrics |= value_metrics
  if kl_loss_coef:
    kl = masked_mean(kl_penalty(logps, batch['ref_logps'], estimator='k3'), mask)
    loss += kl_loss_coef * kl
    metrics['loss/kl'] = kl
  return loss, metrics


def check_config(config) -> None:
  rl = config.rl
  choices = {'estimator': ESTIMATORS, 'critic': CRITICS, 'kl_estimator': KL_ESTIMATORS}
  for key, allowed in choices.items():
    if rl[key] not in allowed:
      raise ValueError(f'config.rl.{key}={rl[key]!r}; choose one of {allowed}.')
  if not config.model.hf_path or not rl.reward_model:
    raise ValueError('Online RL needs a policy (config.model.hf_path, e.g. an SFT run\'s hf '
                     'export) and a reward model (config.rl.reward_model, an RM run\'s).')
  if (rl.estimator == 'gae') != (rl.critic != 'none'):
    raise ValueError(f'config.rl.estimator={rl.estimator!r} with config.rl.critic='
                     f'{rl.critic!r}: GAE needs a critic ("model" or "head"); grpo and rloo '
                     'use none.')
  if rl.estimator != 'gae' and rl.group_size < 2:
    raise ValueError(f'config.rl.estimator={rl.estimator!r} compares the samples of a prompt: '
                     f'config.rl.group_size={rl.group_size} must be ≥ 2.')
  if rl.rollout_batch_size % (rl.group_size * rl.num_minibatches):
    raise ValueError(f'config.rl.rollout_batch_size={rl.rollout_batch_size} must be a multiple '
                     f'of group_size × num_minibatches = {rl.group_size * rl.num_minibatches}.')
  if rl.kl_in_loss and rl.adaptive_kl:
    raise ValueError('config.rl.adaptive_kl steers the KL penalty in the reward; it does not '
                     'apply with config.rl.kl_in_loss=True.')
  if rl.stop_kl < 0:
    raise ValueError(f'config.rl.stop_kl={rl.stop_kl} must be ≥ 0 (0: no KL budget).')
  if rl.stop_kl and not (config.train.eval_every and config.eval.gold == 'playground'):
    raise ValueError(f'config.rl.stop_kl={rl.stop_kl} stops on the KL that evaluations measure; '
                     'it needs config.train.eval_every > 0 and config.eval.gold="playground".')
  needed = config.data.max_prompt_len + rl.max_new_tokens
  if config.train.seq_len < needed:
    raise ValueError(f'config.train.seq_len={config.train.seq_len} < max_prompt_len + '
                     f'rl.max_new_tokens = {needed}: the reward model would not see whole '
                     'responses.')


def training_prompts(config) -> list[str]:
  """The prompts rollouts draw from: config.rl.prompts, 'playground' or a text file (one per
  line)."""
  spec = config.rl.prompts
  if spec == 'playground':
    return playground.sample_prompts(config.data.playground.seed, 'train',
                                     config.rl.num_prompts)
  if not os.path.exists(spec):
    raise FileNotFoundError(f'config.rl.prompts={spec!r}: no such file (or "playground").')
  with open(spec, encoding='utf-8') as f:
    prompts = [line.rstrip('\n') for line in f if line.strip()]
  if not prompts:
    raise ValueError(f'config.rl.prompts={spec!r} holds no prompt.')
  return prompts


def rollout_prompts(pool: list[str], config, iteration: int) -> list[str]:
  """The rollout's rows: rollout_batch_size / G prompts drawn without replacement from the
  pool for (seed, iteration), each repeated G times in consecutive rows."""
  rl = config.rl
  n = rl.rollout_batch_size // rl.group_size
  rng = np.random.default_rng([config.seed, iteration])
  chosen = rng.choice(len(pool), size=n, replace=n > len(pool))
  return [pool[i] for i in chosen for _ in range(rl.group_size)]


class Models:
  """The four models of online RL, on one mesh.

  trained: ActorCritic (policy + critic); reference: ActorCritic(initial policy, no critic);
  reward: the frozen reward model. graphdefs and params are dicts with those keys.
  With config.rl.normalize_scores, the scores are normalised by the reward model's mean and std
  over the initial policy's responses (`score_statistics`), and so is a critic initialised from
  the reward model, so that its first values are on the scale of the returns.
  """

  def __init__(self, config, mesh, tokenizer, pool: list[str]):
    rl, rules = config.rl, config.sharding_rules
    policy_graphdef, policy_params, policy_shardings = loop.build_model(config, mesh)
    self.policy_graphdef = policy_graphdef
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=policy_shardings)
    self.reference_policy = copy(policy_params)  # The trained copy's buffers are donated.
    reward = loop.load_model(rl.reward_model, config.model, mesh, rules, head='scalar')
    self.graphdefs, self.params = {'reward': reward[0]}, {'reward': reward[1]}
    self.score_shift, self.score_scale = 0.0, 1.0
    if rl.normalize_scores:
      self.score_shift, self.score_scale = score_statistics(
          config, tokenizer, mesh, pool, policy_graphdef, self.reference_policy, *reward[:2])
    critic, value_shift, value_scale = None, 0.0, 1.0
    if rl.critic == 'model':
      critic_graphdef, critic_params, _ = loop.load_model(
          rl.value_model or rl.reward_model, config.model, mesh, rules, head='scalar')
      critic = nnx.merge(critic_graphdef, critic_params)
      value_shift, value_scale = self.score_shift, self.score_scale
    elif rl.critic == 'head':
      critic = ValueHead(nnx.merge(policy_graphdef, policy_params).cfg.d_model)
    trained = ActorCritic(nnx.merge(policy_graphdef, policy_params), critic,
                          value_shift=value_shift, value_scale=value_scale)
    reference = ActorCritic(nnx.merge(policy_graphdef, self.reference_policy), None)
    for name, module in (('trained', trained), ('reference', reference)):
      self.graphdefs[name], params = nnx.split(module)
      self.params[name] = jax.device_put(params, parallel.state_shardings(params, mesh, rules))
    self.trained_shardings = parallel.state_shardings(self.params['trained'], mesh, rules)


def encode_rows(config, tokenizer, mesh, prompts: list[str]) -> dict:
  """This process's rows of the global prompt batch, left-padded and sharded over the batch."""
  local = [prompts[i] for i in loop.local_rows(len(prompts))]
  tokens, mask = encode_prompts(tokenizer, local, config.data.max_prompt_len)
  return parallel.shard_batch({'prompt_tokens': tokens, 'prompt_mask': mask}, mesh,
                              config.sharding_rules)


def make_rollout_sampler(config, policy_graphdef, tokenizer):
  """`sample(params, prompt batch, rng) -> batch + response_tokens, response_mask`."""
  rl = config.rl
  sampler = make_sampler(policy_graphdef, max_new_tokens=rl.max_new_tokens,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                         temperature=rl.temperature)

  def sample(params, batch, rng):
    out = sampler(params, batch['prompt_tokens'], batch['prompt_mask'], rng)
    return {**batch, 'response_tokens': out.tokens_BxN, 'response_mask': out.mask_BxN}
  return sample


def score_statistics(config, tokenizer, mesh, pool, policy_graphdef, policy_params,
                     reward_graphdef, reward_params) -> tuple[float, float]:
  """Mean and std of the reward model's scores of the policy's responses to one rollout's
  worth of prompts, the same at every (re)start (fixed prompts and key). Huang et al. 2024
  normalise the reward model so that these are 0 and 1."""
  rng = np.random.default_rng([config.seed, 7])
  prompts = [pool[i] for i in rng.choice(len(pool), config.rl.rollout_batch_size)]
  sample = make_rollout_sampler(config, policy_graphdef, tokenizer)
  samples = sample(policy_params, encode_rows(config, tokenizer, mesh, prompts),
                   jax.random.key(config.seed + 1))
  scores = jax.jit(functools.partial(reward_model_scores, reward_graphdef))(reward_params,
                                                                            samples)
  scores = np.asarray(multihost_utils.process_allgather(scores, tiled=True), np.float64)
  return float(scores.mean()), float(max(scores.std(), 1e-6))


class Learner:
  """Everything one iteration needs, built on the mesh: the models, the train state, the
  rollout and the train step. `iterate` runs one iteration (what `train` loops over, and what
  benchmarks/ppo_step.py times)."""

  def __init__(self, config, workdir: str):
    check_config(config)
    parallel.maybe_initialize_distributed(config.distributed)
    rl, tc = config.rl, config.train
    self.config = config
    self.mesh = parallel.make_mesh(config.mesh)
    self.tokenizer = make_tokenizer(config, workdir)
    self.pool = training_prompts(config)
    self.models = Models(config, self.mesh, self.tokenizer, self.pool)
    self.optimizer, schedule = make_optimizer(
        config.optim, tc.steps * rl.ppo_epochs * rl.num_minibatches)
    self.state_shardings = train_state_shardings(
        self.models.trained_shardings, self.optimizer, self.models.params['trained'], self.mesh)
    self.state = init_train_state(self.models.params.pop('trained'), self.optimizer,
                                  config.seed, self.state_shardings)
    self.frozen = self.models.params  # reference and reward; the trained params: self.state.
    self.rollout = Rollout(config, self.models, self.tokenizer, self.mesh)
    self.train_step = make_train_step(
        functools.partial(rl_loss_fn, temperature=rl.temperature,
                          chunk_size=tc.logprob_chunk_size, clip_eps=rl.clip_eps,
                          value_clip_eps=rl.value_clip_eps, vf_coef=rl.vf_coef,
                          kl_loss_coef=rl.kl_coef if rl.kl_in_loss else 0.0),
        self.optimizer, self.models.graphdefs['trained'], state_shardings=self.state_shardings,
        batch_shardings=self.rollout.update_sharding, schedule=schedule,
        grad_accum_steps=config.optim.grad_accum_steps)

  def iterate(self, iteration: int, kl_coef: float) -> tuple[dict, dict]:
    """Rollout, scoring and updates of `iteration`: (samples, metrics incl. 'time/*' in s)."""
    config, rollout = self.config, self.rollout
    prompts = rollout_prompts(self.pool, config, iteration)
    rng = jax.random.fold_in(jax.random.key(config.seed), iteration)
    t0 = time.perf_counter()
    samples = jax.block_until_ready(rollout.sample(self.state.params['policy'], prompts, rng))
    t1 = time.perf_counter()
    update, metrics = jax.block_until_ready(
        rollout.score(self.state.params, self.frozen, samples, kl_coef=kl_coef))
    t2 = time.perf_counter()
    self.state, update_metrics = run_updates(self.state, update, self.train_step,
                                             rollout.select, config, iteration)
    update_metrics = jax.device_get(update_metrics)
    t3 = time.perf_counter()
    times = {'time/rollout': t1 - t0, 'time/scoring': t2 - t1, 'time/update': t3 - t2}
    return samples, jax.device_get(metrics) | update_metrics | times


def train(config, workdir: str) -> None:
  learner = Learner(config, workdir)
  write_config(config, workdir)
  rl, tc = config.rl, config.train
  checkpointer = Checkpointer.for_run(workdir, tc)
  start, kl_coef, stopped = checkpointer.latest_step() or 0, rl.kl_coef, False
  if start:
    learner.state, data_state = checkpointer.restore(start, abstract_like(learner.state))
    kl_coef, stopped = data_state['kl_coef'], data_state.get('stopped', False)
    logging.warning('Resumed %s from iteration %d.', workdir, start)
  writer = MetricWriter(workdir, start_step=start, tensorboard=tc.tensorboard)

  tokenizer, models = learner.tokenizer, learner.models
  proxy = TeacherReward(nnx.merge(models.graphdefs['reward'], learner.frozen['reward']),
                        tokenizer, seq_len=tc.seq_len, max_prompt_len=config.data.max_prompt_len,
                        batch_size=tc.batch_size, mesh=learner.mesh, rules=config.sharding_rules)
  gold = make_gold(config, tokenizer) if uses_playground_gold(config) else None
  make_evaluations = sample_evaluations(config, workdir, tokenizer, gold=gold, proxy=proxy,
                                        make_reference=lambda mesh: models.reference_policy)
  evaluations = (make_evaluations(models.policy_graphdef, learner.mesh) if make_evaluations
                 else {})

  def evaluate(iteration) -> dict:
    policy, metrics = learner.state.params['policy'], {}
    for name, evaluation in evaluations.items():
      metrics |= {f'eval/{name}/{k}': v for k, v in evaluation(policy, iteration).items()}
    if metrics:
      writer.write(iteration, metrics)
    return metrics

  if start == 0 and tc.eval_every and tc.eval_at_start:
    evaluate(0)
  bar = progress_bar(tc.steps, start, enabled=tc.progress_bar)
  for iteration in range(start, start if stopped else tc.steps):
    samples, metrics = learner.iterate(iteration, kl_coef)
    metrics['kl_coef'] = kl_coef
    if gold is not None:
      prompts = rollout_prompts(learner.pool, config, iteration)
      metrics['objective/gold'] = float(np.mean(gold(prompts, learner.rollout.decode(samples))))
    if rl.adaptive_kl:
      kl_coef = float(adaptive_kl_coef(kl_coef, metrics['objective/kl'], target=rl.kl_target,
                                       horizon=rl.kl_horizon, n_steps=rl.rollout_batch_size))
    done = iteration + 1
    # Wall times go to the progress bar: metrics.jsonl holds only reproducible numbers.
    times = {k: metrics.pop(k) for k in list(metrics) if k.startswith('time/')}
    if done % tc.log_every == 0 or done == tc.steps:
      writer.write(done, metrics)
    if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
      kl = evaluate(done).get('eval/samples/kl', 0.0)
      stopped = bool(rl.stop_kl and kl >= rl.stop_kl)
    if done % tc.checkpoint_every == 0 or done == tc.steps or stopped:
      checkpointer.save(done, learner.state,
                        {'step': done, 'kl_coef': kl_coef, 'stopped': stopped}, force=True)
    bar.set_postfix(score=f'{metrics["objective/scores"]:.3f}',
                    kl=f'{metrics["objective/kl"]:.3f}',
                    s='/'.join(f'{t:.1f}' for t in times.values()))
    bar.update(1)
    if stopped:
      logging.warning('%s: KL to the initial policy %.3f ≥ config.rl.stop_kl = %g after '
                      'iteration %d; stopping.', workdir, kl, rl.stop_kl, done)
      break
  bar.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if tc.export_hf:
    loop.export_hf(models.policy_graphdef, learner.state.params['policy'],
                   os.path.join(workdir, 'hf'), tokenizer)


def run_updates(state, update, train_step, select, config, iteration: int):
  """`ppo_epochs` passes over the rollout in shuffled minibatches; metrics averaged."""
  rl = config.rl
  size = rl.rollout_batch_size // rl.num_minibatches
  all_metrics = []
  for epoch in range(rl.ppo_epochs):
    order = np.random.default_rng([config.seed, iteration, epoch, 1]).permutation(
        rl.rollout_batch_size)
    for k in range(rl.num_minibatches):
      state, metrics = train_step(state, select(update, order[k * size:(k + 1) * size]))
      all_metrics.append(metrics)
  return state, jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *all_metrics)


class Rollout:
  """Sampling and scoring of one rollout on the mesh, and the selection of its minibatches."""

  def __init__(self, config, models: Models, tokenizer, mesh):
    rl = config.rl
    self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
    self._sample = jax.jit(make_rollout_sampler(config, models.policy_graphdef, tokenizer))
    options = dict(temperature=rl.temperature, chunk_size=config.train.logprob_chunk_size,
                   kl_estimator=rl.kl_estimator, eos_id=tokenizer.eos_token_id,
                   missing_eos_penalty=rl.missing_eos_penalty, estimator=rl.estimator,
                   group_size=rl.group_size, gamma=rl.gamma, lam=rl.lam,
                   whiten_rewards=rl.whiten_rewards, whiten_advantages=rl.whiten_advantages)
    self._score = jax.jit(functools.partial(merge_and_score, models.graphdefs, options=options))
    self.controls = {'score_shift': jnp.float32(models.score_shift),
                     'score_scale': jnp.float32(models.score_scale)}
    # Every array of the update batch is [B, ...]: one sharding, a prefix of the batch's tree.
    self.update_sharding = parallel.batch_sharding(mesh, config.sharding_rules, 2)
    self.select = jax.jit(lambda update, rows: jax.tree.map(lambda x: x[rows], update),
                          out_shardings=self.update_sharding)

  def sample(self, policy_params, prompts, rng):
    """Prompts and the policy's responses, [B, P] and [B, N], sharded over the batch."""
    return self._sample(policy_params, encode_rows(self.config, self.tokenizer, self.mesh,
                                                   prompts), rng)

  def score(self, trained_params, frozen, samples, *, kl_coef: float):
    """(update batch, metrics) of sampled responses; see `score_rollout`."""
    controls = {**self.controls, 'kl_coef': jnp.float32(kl_coef)}
    return self._score({**frozen, 'trained': trained_params}, samples, controls)

  def decode(self, samples) -> list[str]:
    """The responses as text, all rows of the global batch (on every host)."""
    return decode_responses(self.tokenizer, *(
        multihost_utils.process_allgather(samples[k], tiled=True)
        for k in ('response_tokens', 'response_mask')))
