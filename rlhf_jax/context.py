"""The run context: what a run makes once and every part of it shares.

Made once per run, before any algorithm: jax.distributed (on multi-host launches), the mesh,
the tokenizer, the data sources (the playground's written to files first), the gold reward,
and every model the run reads, each loaded once from its checkpoint and kept on the mesh
(`load`): the policy that a DPO run trains is a copy of the reference it already holds (with
LoRA, it shares the reference's base), a critic a copy of the reward model. Evaluations
receive these models instead of reloading them.
"""

import functools
import os

from rlhf_jax import parallel
from rlhf_jax.config import reward_model_paths, to_model_config
from rlhf_jax.data.pipeline import make_token_data
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.engine.optimizer import decay_start_step
from rlhf_jax.errors import InputError
from rlhf_jax.models import read_hf_config
from rlhf_jax.models.loading import LoadedModel, build_model, load_model
from rlhf_jax.models.sources import local_dir
from rlhf_jax.playground import files as playground_files
from rlhf_jax.playground.tokenizer import saved_tokenizer
from rlhf_jax.rewards.ensemble import EnsembleReward
from rlhf_jax.rewards.gold import GoldFn, make_gold, uses_playground_gold
from rlhf_jax.rewards.model import ModelReward
from rlhf_jax.storage import local_cache_dir

PLAYGROUND = 'playground'


class RunContext:
  """`RunContext(config, workdir)`: the mesh, tokenizer, models and rewards of one run."""

  def __init__(self, config, workdir: str):
    parallel.maybe_initialize_distributed(config.distributed)
    self.config, self.workdir = config, workdir
    self.mesh = parallel.make_mesh(config.mesh)
    self.rules = config.sharding_rules
    # Per-host caches (tokenizer, generated data) stay local when the workdir is a URL.
    self.cache_dir = local_cache_dir(os.path.join(workdir, 'data'))
    self._models: dict[tuple[str, str], LoadedModel] = {}

  @functools.cached_property
  def tokenizer(self):
    """config.data.tokenizer: a directory (local, a URL or a Hub id), 'playground', or '' for
    config.model.hf_path's.

    Its ids must fit the model's embedding: config.model.vocab_size, or the checkpoint's
    vocab_size when the model is loaded from config.model.hf_path.
    """
    model, spec = self.config.model, self.config.data.tokenizer
    key = 'config.data.tokenizer' if spec else 'config.model.hf_path'
    spec = spec or model.hf_path
    if not spec:
      raise InputError('config.data.tokenizer is empty and there is no config.model.hf_path '
                       'to take a tokenizer from.')
    if spec == PLAYGROUND:
      spec = saved_tokenizer(self.cache_dir, seed=self.config.data.playground.seed)
    tokenizer = load_tokenizer(local_dir(spec, key=key), key=key)
    if model.hf_path:
      vocab_size = read_hf_config(local_dir(model.hf_path, key='config.model.hf_path'),
                                  head=model.head).vocab_size
      where = (f'the checkpoint config.model.hf_path={model.hf_path!r} has '
               f'vocab_size={vocab_size}')
    else:
      vocab_size = model.vocab_size
      where = f'config.model.vocab_size={vocab_size}'
    if len(tokenizer) > vocab_size:
      raise InputError(f'The tokenizer has {len(tokenizer)} tokens but {where}.')
    return tokenizer

  def load(self, path: str, *, head: str, keep: bool = True,
           adapters: bool = True) -> LoadedModel:
    """The HF checkpoint at `path` with a `head` head, in config.model's numerics, read from
    disk once per run (`keep=False`: not kept for later calls, e.g. a model used once);
    adapters=False: without config.model's LoRA adapters, for a model that stays frozen (a
    reward model)."""
    key = self._key(path, head, adapters)
    if key in self._models:
      return self._models[key]
    model = load_model(path, self.mesh, self.rules, head=head, numerics=self.config.model,
                       adapters=adapters)
    if keep:
      self._models[key] = model
    return model

  def _key(self, path: str, head: str, adapters: bool = True) -> tuple:
    """The cache key of a loaded model; without LoRA, adapters or not is the same model."""
    return path, head, adapters and bool(self.config.model.lora_rank)

  def release(self, path: str, *, head: str) -> None:
    """Stops keeping the model of `load(path, head=head)` (its memory goes with its last use)."""
    self._models.pop(self._key(path, head), None)

  def initial_model(self) -> LoadedModel:
    """What the run trains, at its start: config.model.hf_path's checkpoint (a copy when the
    run also holds it, e.g. as a reference) or config.model built from config.seed."""
    model = self.config.model
    if not model.hf_path:
      return build_model(to_model_config(model), self.mesh, self.rules, seed=self.config.seed)
    if self._key(model.hf_path, model.head) in self._models:
      return self._models[self._key(model.hf_path, model.head)].copy()
    return self.load(model.hf_path, head=model.head, keep=False)

  @functools.cached_property
  def gold(self) -> GoldFn | None:
    """The playground's gold reward when config.eval.gold asks for it, else None."""
    if not uses_playground_gold(self.config):
      return None
    return make_gold(self.config, self.tokenizer, mesh=self.mesh)

  def reward_model(self, spec: str, *, aggregation: str = 'mean',
                   uncertainty_weight: float = 0.0) -> ModelReward | EnsembleReward:
    """The reward model(s) of `spec` as a reward function `(prompts, responses) -> [N]`: a
    `ModelReward` for one HF directory; for several separated by commas, an `EnsembleReward` of
    their raw scores aggregated by `aggregation` (see its `normalized`, `standardized_on`)."""
    config = self.config
    models = [self.load(path, head='scalar', adapters=False) for path in reward_model_paths(spec)]
    members = [ModelReward(model.module(), self.tokenizer, seq_len=config.train.seq_len,
                           max_prompt_len=config.data.max_prompt_len,
                           batch_size=config.train.batch_size, mesh=self.mesh, rules=self.rules)
               for model in models]
    if not members:
      raise InputError(f'No reward-model directory in {spec!r}.')
    if len(members) == 1:
      return members[0]
    return EnsembleReward(members, aggregation=aggregation,
                          uncertainty_weight=uncertainty_weight)

  def token_data(self, *, kinds: tuple[str, ...], gold=None, answer_pairs=None, config=None):
    """The mixture of config.data.sources, tokenized (`rlhf_jax.data.pipeline`), in batches of
    config.train.batch_size; `config` (default: the run's) may give other sources or batches.

    'playground:KIND' sources are written to JSONL files first; preference pairs are labelled
    by `gold` (default: the program) on two corruptions of the best answer, or on
    `answer_pairs(prompts, split) -> (answers, other answers)` of a policy.
    """
    config = config or self.config
    data = config.data
    sources = {}
    for name, spec in data.sources.items():
      scheme, _, kind = spec.partition(':')
      if scheme == PLAYGROUND:
        spec = playground_files.source_spec(kind, data.playground, self.cache_dir, gold=gold,
                                            answer_pairs=answer_pairs,
                                            key=f'config.data.sources.{name}')
      sources[name] = spec
    decay_start = (decay_start_step(config.optim, config.train.steps) if data.decay_weights
                   else None)
    return make_token_data(config, self.tokenizer, sources=sources, kinds=kinds,
                           cache_dir=data.token_cache or os.path.join(self.cache_dir, 'tokens'),
                           decay_start=decay_start)
