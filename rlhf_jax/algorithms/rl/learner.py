"""Online RL from a reward model and/or Python reward functions: PPO with GAE, and critic-free
GRPO and RLOO.

Each iteration (one step of the engine's loop) makes its own update batches (`Rollouts`):
  1. rollout: the policy samples responses to a batch of prompts (G per prompt for GRPO/RLOO)
     with the jitted KV-cache sampler;
  2. scoring: the reward functions score the decoded responses on the host
     (`rlhf_jax.rewards.functions`), then one jitted pass gives log-probs, values, reference
     log-probs, reward-model scores and advantages (`rlhf_jax.algorithms.rl.rollout`);
  3. update: `ppo_epochs` passes over the rollout in shuffled minibatches, each minibatch one
     step of the shared train step on the clipped losses (`rl_loss_fn`), with PPO-ptx's
     pretraining rows (`config.rl.ptx_coef`, `ptx_source`) alongside.
The KL coefficient β is fixed or follows the adaptive controller (Ziegler et al. 2019), and is
checkpointed with the run; with a KL budget (`config.rl.stop_kl`) the run ends at the first
evaluation that measures it. The models, all on one mesh and each read from disk once: the
policy and its critic (trained together, `ActorCritic`), the reference (the initial policy)
and the reward model, or an ensemble of them (frozen; `rlhf_jax.rewards.ensemble`). Prompts,
sampling keys and minibatch orders are functions of (seed, iteration), so a resumed run
continues as if never stopped.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from rlhf_jax import parallel
from rlhf_jax.algorithms.base import Algorithm, DataBatches, UpdateBatches
from rlhf_jax.algorithms.evaluations import sample_evaluations
from rlhf_jax.algorithms.rl.actor_critic import CRITICS, ActorCritic, ValueHead
from rlhf_jax.algorithms.rl.loss import rl_loss_fn
from rlhf_jax.algorithms.rl.prompts import prompt_pool, rollout_prompts
from rlhf_jax.algorithms.rl.rollout import merge_and_score, reward_model_scores
from rlhf_jax.config import reward_model_paths
from rlhf_jax.errors import InputError
from rlhf_jax.losses import adaptive_kl_coef
from rlhf_jax.losses.ppo import KL_ESTIMATORS, LOSS_AGGREGATIONS
from rlhf_jax.models import lora
from rlhf_jax.models.loading import LoadedModel
from rlhf_jax.rewards.ensemble import EnsembleReward, check_aggregation
from rlhf_jax.rewards.functions import FunctionReward, add_rewards
from rlhf_jax.sampling import make_sampler
from rlhf_jax.sampling.text import decode_responses, encode_prompts

# The advantage estimator of each online-RL algorithm (rlhf_jax.algorithms.rl.rollout).
ADVANTAGE_ESTIMATOR = {'ppo': 'gae', 'grpo': 'grpo', 'rloo': 'rloo'}


def check_config(config) -> None:
  rl = config.rl
  choices = {'critic': CRITICS, 'kl_estimator': KL_ESTIMATORS,
             'loss_aggregation': LOSS_AGGREGATIONS}
  for key, allowed in choices.items():
    if rl[key] not in allowed:
      raise InputError(f'config.rl.{key}={rl[key]!r}; choose one of {allowed}.')
  check_aggregation(rl, 'config.rl')
  if not config.model.hf_path or not (reward_model_paths(rl.reward_model) or rl.reward_fns):
    raise InputError('Online RL needs a policy (config.model.hf_path, e.g. an SFT run\'s hf '
                     'export) and a reward: a reward model (config.rl.reward_model, an RM run\'s '
                     'hf export), Python functions (config.rl.reward_fns), or both.')
  if rl.critic == 'model' and not (rl.value_model or reward_model_paths(rl.reward_model)):
    raise InputError('config.rl.critic="model" starts the critic from config.rl.value_model or '
                     'the reward model; with reward functions alone, set one of them or use '
                     'critic="head".')
  if (config.algorithm == 'ppo') != (rl.critic != 'none'):
    raise InputError(f'config.algorithm={config.algorithm!r} with config.rl.critic='
                     f'{rl.critic!r}: PPO\'s GAE needs a critic ("model" or "head"); grpo and '
                     'rloo use none.')
  if config.algorithm != 'ppo' and rl.group_size < 2:
    raise InputError(f'config.algorithm={config.algorithm!r} compares the samples of a prompt: '
                     f'config.rl.group_size={rl.group_size} must be ≥ 2.')
  if rl.rollout_batch_size % (rl.group_size * rl.num_minibatches):
    raise InputError(f'config.rl.rollout_batch_size={rl.rollout_batch_size} must be a multiple '
                     f'of group_size × num_minibatches = {rl.group_size * rl.num_minibatches}.')
  if rl.kl_in_loss and rl.adaptive_kl:
    raise InputError('config.rl.adaptive_kl steers the KL penalty in the reward; it does not '
                     'apply with config.rl.kl_in_loss=True.')
  if rl.ptx_coef < 0 or (rl.ptx_coef and not rl.ptx_source):
    raise InputError(f'config.rl.ptx_coef={rl.ptx_coef} must be ≥ 0, and > 0 needs pretraining '
                     'text in config.rl.ptx_source (e.g. "playground:text").')
  if rl.stop_kl < 0:
    raise InputError(f'config.rl.stop_kl={rl.stop_kl} must be ≥ 0 (0: no KL budget).')
  if rl.stop_kl and not (config.train.eval_every and config.eval.gold == 'playground'):
    raise InputError(f'config.rl.stop_kl={rl.stop_kl} stops on the KL that evaluations measure; '
                     'it needs config.train.eval_every > 0 and config.eval.gold="playground".')
  needed = config.data.max_prompt_len + rl.max_new_tokens
  if config.train.seq_len < needed:
    raise InputError(f'config.train.seq_len={config.train.seq_len} < max_prompt_len + '
                     f'rl.max_new_tokens = {needed}: the reward model would not see whole '
                     'responses.')


class Models:
  """The models of online RL, on the run's mesh.

  trained: ActorCritic (policy + critic); reference: ActorCritic(initial policy, no critic);
  reward: the frozen reward models of config.rl.reward_model, one, an ensemble or none
  (graphdefs a tuple, params a list). graphdefs and params are dicts with those keys.
  With config.rl.normalize_scores, each reward model's scores are normalised by their mean and
  std over the initial policy's responses (`score_statistics`; ensembles aggregate the
  normalised scores), and so is a critic initialised from the (first) reward model, so that its
  first values are on the scale of the returns.
  With LoRA (config.model.lora_rank > 0) the policy and a critic model train adapters (and the
  critic its scalar head, a value head in full) over frozen bases; there is no 'reference'
  entry: scoring takes the reference as the trained policy's base with its adapters off, so
  policy and reference share one base. The reward models have no adapters.
  """

  def __init__(self, ctx, pool: list[str]):
    config, rl = ctx.config, ctx.config.rl
    policy, self.initial_policy = ctx.load(config.model.hf_path,
                                           head='lm').trained_and_reference()
    paths = reward_model_paths(rl.reward_model)
    rewards = [ctx.load(path, head='scalar', adapters=False) for path in paths]
    self.graphdefs = {'reward': tuple(reward.graphdef for reward in rewards)}
    self.params = {'reward': [reward.params for reward in rewards]}
    self.score_shifts, self.score_scales = [0.0] * len(rewards), [1.0] * len(rewards)
    if rl.normalize_scores:
      self.score_shifts, self.score_scales = score_statistics(ctx, pool, self.initial_policy,
                                                              rewards)
    critic, value_shift, value_scale = None, 0.0, 1.0
    if rl.critic == 'model':  # value_model, or the ensemble's first member, as trained.
      critic = ctx.load(rl.value_model or paths[0],
                        head='scalar').trained_and_reference()[0].module()
      value_shift, value_scale = self.score_shifts[0], self.score_scales[0]
    elif rl.critic == 'head':
      critic = ValueHead(policy.module().cfg.d_model)
    modules = {'trained': ActorCritic(policy.module(), critic, value_shift=value_shift,
                                      value_scale=value_scale)}
    if not lora.has_adapters(policy.params):
      modules['reference'] = ActorCritic(self.initial_policy.module(), None)
    for name, module in modules.items():
      self.graphdefs[name], params = nnx.split(module)
      self.params[name] = jax.device_put(params,
                                         parallel.state_shardings(params, ctx.mesh, ctx.rules))
    trained_params = self.params.pop('trained')
    self.trained = LoadedModel(self.graphdefs['trained'], trained_params,
                               parallel.state_shardings(trained_params, ctx.mesh, ctx.rules))


def encode_rows(ctx, prompts: list[str]) -> dict:
  """This process's rows of the global prompt batch, left-padded and sharded over the batch."""
  local = [prompts[i] for i in parallel.local_rows(len(prompts))]
  tokens, mask = encode_prompts(ctx.tokenizer, local, ctx.config.data.max_prompt_len)
  return parallel.shard_batch({'prompt_tokens': tokens, 'prompt_mask': mask}, ctx.mesh,
                              ctx.rules)


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


def score_statistics(ctx, pool, policy: LoadedModel, rewards: list[LoadedModel]
                     ) -> tuple[list[float], list[float]]:
  """Per reward model, the mean and std of its scores of the policy's responses to one
  rollout's worth of prompts, the same at every (re)start (fixed prompts and key). Huang et al.
  2024 normalise the reward model so that these are 0 and 1; Coste et al. 2023 normalise each
  member of an ensemble."""
  config = ctx.config
  rng = np.random.default_rng([config.seed, 7])
  prompts = [pool[i] for i in rng.choice(len(pool), config.rl.rollout_batch_size)]
  sample = make_rollout_sampler(config, policy.graphdef, ctx.tokenizer)
  samples = sample(policy.params, encode_rows(ctx, prompts), jax.random.key(config.seed + 1))
  shifts, scales = [], []
  for reward in rewards:
    scores = jax.jit(functools.partial(reward_model_scores, reward.graphdef))(reward.params,
                                                                              samples)
    scores = np.asarray(multihost_utils.process_allgather(scores, tiled=True), np.float64)
    shifts.append(float(scores.mean()))
    scales.append(float(max(scores.std(), 1e-6)))
  return shifts, scales


def scoring_options(config, *, eos_id: int) -> dict:
  """`score_rollout`'s options from config.rl."""
  rl = config.rl
  return dict(temperature=rl.temperature, chunk_size=config.train.logprob_chunk_size,
              kl_estimator=rl.kl_estimator, eos_id=eos_id,
              missing_eos_penalty=rl.missing_eos_penalty,
              estimator=ADVANTAGE_ESTIMATOR[config.algorithm], group_size=rl.group_size,
              gamma=rl.gamma, lam=rl.lam, whiten_rewards=rl.whiten_rewards,
              whiten_advantages=rl.whiten_advantages,
              normalize_group_std=rl.normalize_group_std, aggregation=rl.reward_aggregation,
              uncertainty_weight=rl.uncertainty_weight)


class Rollout:
  """Sampling and scoring of one rollout on the mesh, and the selection of its minibatches."""

  def __init__(self, ctx, models: Models, functions: FunctionReward | None = None):
    """functions: the reward functions, added to the reward models' score (or alone)."""
    config = ctx.config
    self.ctx, self.functions = ctx, functions
    self._sample = jax.jit(make_rollout_sampler(config, models.initial_policy.graphdef,
                                                ctx.tokenizer))
    self._score = jax.jit(functools.partial(
        merge_and_score, models.graphdefs,
        options=scoring_options(config, eos_id=ctx.tokenizer.eos_token_id)))
    self.frozen = models.params  # reference and reward
    self.controls = {'score_shift': jnp.asarray(models.score_shifts, jnp.float32),
                     'score_scale': jnp.asarray(models.score_scales, jnp.float32)}
    # Every array of the update batch is [B, ...]: one sharding, a prefix of the batch's tree.
    self.update_sharding = parallel.batch_sharding(ctx.mesh, ctx.rules, 2)
    self.select = jax.jit(lambda update, rows: jax.tree.map(lambda x: x[rows], update),
                          out_shardings=self.update_sharding)

  def sample(self, policy_params, prompts, rng):
    """Prompts and the policy's responses, [B, P] and [B, N], and with reward functions their
    scores of the responses [B], sharded over the batch."""
    samples = self._sample(policy_params, encode_rows(self.ctx, prompts), rng)
    if self.functions is None:
      return samples
    scores = self.functions(prompts, self.decode(samples))[parallel.local_rows(len(prompts))]
    return samples | parallel.shard_batch({'function_scores': scores.astype(np.float32)},
                                          self.ctx.mesh, self.ctx.rules)

  def score(self, trained_params, samples, *, kl_coef: float):
    """(update batch, metrics) of sampled responses; see `score_rollout`."""
    controls = {**self.controls, 'kl_coef': jnp.float32(kl_coef)}
    return self._score({**self.frozen, 'trained': trained_params}, samples, controls)

  def decode(self, samples) -> list[str]:
    """The responses as text, all rows of the global batch (on every host)."""
    return decode_responses(self.ctx.tokenizer, *(
        multihost_utils.process_allgather(samples[k], tiled=True)
        for k in ('response_tokens', 'response_mask')))


class Rollouts(UpdateBatches):
  """Online RL's update batches: each step, a fresh rollout of the current policy, scored,
  then `ppo_epochs` passes over it in `num_minibatches` shuffled minibatches. The eval loss is
  that of one rollout of held-out prompts (config.train.eval_batches minibatches)."""

  progress_keys = ('objective/scores', 'objective/kl')

  def __init__(self, ctx, rollout: Rollout, pool: list[str], gold=None,
               pretraining: DataBatches | None = None):
    """pretraining: rows of text, one batch per minibatch: with config.rl.ptx_coef > 0 in
    every update (PPO-ptx), and in every eval batch."""
    config, rl = ctx.config, ctx.config.rl
    self.config, self.rollout, self.pool, self.gold = config, rollout, pool, gold
    self.pretraining = pretraining
    self.kl_coef = rl.kl_coef
    self.last_samples = None  # The latest rollout's prompts and responses (for benchmarks).
    self.shardings = rollout.update_sharding
    self.updates_per_step = rl.ppo_epochs * rl.num_minibatches
    self.minibatch = rl.rollout_batch_size // rl.num_minibatches
    eval_rows = self.minibatch * config.train.eval_batches
    eval_pool = prompt_pool(config, 'eval', eval_rows // rl.group_size)
    self.eval_prompts = [eval_pool[i % len(eval_pool)] for i in range(eval_rows // rl.group_size)
                         for _ in range(rl.group_size)]

  def iterate(self, step: int, params):
    """(samples, scored update batch, metrics with 'time/*' in seconds) of `step`'s rollout."""
    config = self.config
    prompts = rollout_prompts(self.pool, config, step)
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    t0 = time.perf_counter()
    samples = jax.block_until_ready(self.rollout.sample(params['policy'], prompts, rng))
    t1 = time.perf_counter()
    update, metrics = jax.block_until_ready(
        self.rollout.score(params, samples, kl_coef=self.kl_coef))
    t2 = time.perf_counter()
    metrics = jax.device_get(metrics) | {'kl_coef': self.kl_coef, 'time/rollout': t1 - t0,
                                         'time/scoring': t2 - t1}
    if self.gold is not None:
      metrics['objective/gold'] = float(np.mean(self.gold(prompts,
                                                          self.rollout.decode(samples))))
    return samples, update, metrics

  def train(self, step: int, params):
    rl = self.config.rl
    self.last_samples, update, metrics = self.iterate(step, params)
    if rl.adaptive_kl:
      self.kl_coef = float(adaptive_kl_coef(self.kl_coef, metrics['objective/kl'],
                                            target=rl.kl_target, horizon=rl.kl_horizon,
                                            n_steps=rl.rollout_batch_size))
    return self.minibatches(update, step), metrics

  def minibatches(self, update, step: int):
    """The rollout's minibatches, epoch after epoch, each epoch in an order of its own."""
    rl = self.config.rl
    for epoch in range(rl.ppo_epochs):
      order = np.random.default_rng([self.config.seed, step, epoch, 1]).permutation(
          rl.rollout_batch_size)
      for k in range(rl.num_minibatches):
        minibatch = self.rollout.select(update,
                                        order[k * self.minibatch:(k + 1) * self.minibatch])
        if self.pretraining is not None and rl.ptx_coef:
          index = (step * rl.ppo_epochs + epoch) * rl.num_minibatches + k
          minibatch['ptx'] = self.pretraining.batch('train', index)
        yield minibatch

  def eval(self, params) -> list[dict]:
    rng = jax.random.fold_in(jax.random.key(self.config.seed), 2**31 - 1)
    samples = self.rollout.sample(params['policy'], self.eval_prompts, rng)
    update, _ = self.rollout.score(params, samples, kl_coef=self.kl_coef)
    rows = np.arange(len(self.eval_prompts))
    batches = [self.rollout.select(update, rows[i:i + self.minibatch])
               for i in range(0, len(rows), self.minibatch)]
    if self.pretraining is not None:
      batches = [batch | {'ptx': self.pretraining.batch('eval', i)}
                 for i, batch in enumerate(batches)]
    return batches

  def state(self) -> dict:
    return {'kl_coef': self.kl_coef}

  def restore(self, state: dict) -> None:
    self.kl_coef = state['kl_coef']


def make_algorithm(ctx) -> Algorithm:
  """PPO, GRPO or RLOO (config.algorithm) on the run's mesh."""
  config, rl = ctx.config, ctx.config.rl
  check_config(config)
  pool = prompt_pool(config)
  models = Models(ctx, pool)
  functions = (FunctionReward(rl.reward_fns, rl.reward_fn_weights, key='config.rl.reward_fns')
               if rl.reward_fns else None)
  rollouts = Rollouts(ctx, Rollout(ctx, models, functions), pool, gold=ctx.gold,
                      pretraining=pretraining_rows(ctx))
  policy_graphdef = models.initial_policy.graphdef
  proxy = None
  if reward_model_paths(rl.reward_model):
    proxy = ctx.reward_model(rl.reward_model, aggregation=rl.reward_aggregation,
                             uncertainty_weight=rl.uncertainty_weight)
  if isinstance(proxy, EnsembleReward):  # On the scale of the rollouts' aggregated scores.
    proxy = proxy.normalized(models.score_shifts, models.score_scales)
  proxy = add_rewards(proxy, functions)
  evaluations = sample_evaluations(ctx, policy_graphdef,
                                   reference=models.initial_policy.params, proxy=proxy)
  return Algorithm(
      model=models.trained, loss_fn=make_loss_fn(config), batches=rollouts,
      evaluations={name: _on_policy(evaluation) for name, evaluation in evaluations.items()},
      data_stats={'data/prompts/train': len(pool),
                  'data/prompts/eval': len(set(rollouts.eval_prompts))},
      tokenizer=ctx.tokenizer, export=lambda params: (policy_graphdef, params['policy']),
      stop=functools.partial(kl_budget_reached, rl.stop_kl))


def make_loss_fn(config):
  """rl_loss_fn with config.rl's options."""
  rl = config.rl
  return functools.partial(
      rl_loss_fn, temperature=rl.temperature, chunk_size=config.train.logprob_chunk_size,
      clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high, value_clip_eps=rl.value_clip_eps,
      vf_coef=rl.vf_coef, kl_loss_coef=rl.kl_coef if rl.kl_in_loss else 0.0,
      ptx_coef=rl.ptx_coef, loss_aggregation=rl.loss_aggregation)


def pretraining_rows(ctx) -> DataBatches | None:
  """The text of config.rl.ptx_source in batches of one minibatch's rows (read with
  config.data's options, as training data is), or None without one."""
  rl = ctx.config.rl
  if not rl.ptx_source:
    return None
  config = ctx.config.copy_and_resolve_references()
  config.data.update(sources={'ptx': rl.ptx_source}, weights={'ptx': 1.0}, decay_weights=None)
  config.train.batch_size = rl.rollout_batch_size // rl.num_minibatches
  return DataBatches(ctx.token_data(kinds=('text',), config=config), mesh=ctx.mesh,
                     rules=ctx.rules, batch_size=config.train.batch_size,
                     eval_batches=config.train.eval_batches)


def _on_policy(evaluation):
  """An evaluation of a policy's parameters, applied to the policy part of ActorCritic's."""
  return lambda params, step: evaluation(params['policy'], step)


def kl_budget_reached(stop_kl: float, results) -> str | None:
  """Why a run with KL budget `stop_kl` (0: none) ends after these evaluation results."""
  kl = results.get('eval/samples/kl', 0.0)
  if stop_kl and kl >= stop_kl:
    return f'KL to the initial policy {kl:.3f} ≥ config.rl.stop_kl = {stop_kl:g}'
  return None
