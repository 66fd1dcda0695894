"""A scalar-head model as a reward function on text: a proxy reward model, or a frozen teacher
as the gold reward (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

`ModelReward` scores (prompt, response) strings exactly as a reward model reads SFT data: the
prompt is one user message, the pair goes through the chat template (`encode_sft`, truncation
'response'), and the reward is the scalar head at the last real token (`sequence_rewards`).
A teacher is a reward-model checkpoint in HF format (`from_hf`) or a randomly initialised
transformer (`random`), typically larger than the proxies trained on its labels.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import parallel
from rlhf_jax.data.batching import pad_rows
from rlhf_jax.data.encoding import encode_sft
from rlhf_jax.data.records import Origin, SFTRecord, prompt_messages
from rlhf_jax.errors import InputError
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.models.loading import load_model
from rlhf_jax.models.scoring import sequence_rewards
from rlhf_jax.parallel import map_batches

Pairs = tuple[Sequence[str], Sequence[str]]  # (prompts, responses)


@functools.partial(jax.jit, static_argnums=0)
def _rewards(graphdef, params, batch):
  """Compiled once per architecture, batch shape and placement: teachers of one shape share it."""
  model = nnx.merge(graphdef, params)
  return sequence_rewards(model, batch['tokens'], batch['attention_mask'])


class ModelReward:
  """Callable `reward(prompts, responses) -> rewards [N] float64`, a frozen scalar-head model.

  Every pair is right-padded to `seq_len` and scored `batch_size` rows at a time on the mesh,
  so the scoring function compiles once and later calls reuse it.

  Standardisation: with `standardize_on=(prompts, responses)`, a reference set, the rewards are

      r(x, y) = (r_raw(x, y) − shift) / scale,   shift = mean(r_raw),  scale = std(r_raw)

  over the reference set (population std), so they have mean 0 and std 1 there. A random
  teacher's raw scale is arbitrary, and a Bradley-Terry labeler's temperature only means
  something relative to the reward's scale. Without it, shift = 0 and scale = 1.
  """

  def __init__(self, model: Transformer, tokenizer, *, seq_len: int, max_prompt_len: int,
               batch_size: int, mesh, rules,
               standardize_on: Pairs | None = None):
    """model: a scalar-head `Transformer` whose parameters are already placed on `mesh`."""
    if model.cfg.head != 'scalar':
      raise InputError(f'A reward model needs a scalar head; its config has head='
                       f'{model.cfg.head!r}.')
    if len(tokenizer) > model.cfg.vocab_size:
      raise InputError(f'The tokenizer has {len(tokenizer)} tokens > the reward model\'s '
                       f'vocab_size={model.cfg.vocab_size}.')
    if model.cfg.position == 'learned' and seq_len > model.cfg.max_position:
      raise InputError(f'seq_len={seq_len} > the reward model\'s max_position='
                       f'{model.cfg.max_position} (learned positions).')
    self.graphdef, self.params = nnx.split(model)
    self.tokenizer, self.seq_len, self.max_prompt_len = tokenizer, seq_len, max_prompt_len
    self.batch_size, self.mesh, self.rules = batch_size, mesh, rules
    self.shift, self.scale = 0.0, 1.0
    if standardize_on is not None:
      raw = self(*standardize_on)
      self.shift, self.scale = float(raw.mean()), float(raw.std())
      if not math.isfinite(self.scale) or self.scale <= 0:
        raise InputError(f'standardize_on: the teacher\'s rewards over the {len(raw)} reference '
                         f'pairs have std {self.scale}; standardisation needs it > 0.')

  @classmethod
  def from_hf(cls, path, tokenizer, *, seq_len: int, max_prompt_len: int, batch_size: int,
              mesh, rules, standardize_on: Pairs | None = None) -> 'ModelReward':
    """A reward-model checkpoint in HF format (a *ForSequenceClassification), in float32.

    Its `score.weight` is required: a causal LM has none, and `load_hf` would give it a zero
    head, i.e. a constant reward.
    """
    model = load_model(path, mesh, rules, head='scalar').module()
    if not jnp.any(model.head.kernel[...]):
      raise InputError(f'The checkpoint at {path} has no score.weight (a causal LM, not a '
                       'reward model): the teacher would be constant.')
    return cls(model, tokenizer, seq_len=seq_len, max_prompt_len=max_prompt_len,
               batch_size=batch_size, mesh=mesh, rules=rules, standardize_on=standardize_on)

  @classmethod
  def random(cls, model_config: ModelConfig, tokenizer, *, seed: int, seq_len: int,
             max_prompt_len: int, batch_size: int, mesh, rules, head_std: float | None = None,
             standardize_on: Pairs | None = None) -> 'ModelReward':
    """A randomly initialised scalar-head `Transformer` of `model_config`'s architecture.

    The head w is drawn from N(0, head_std²), head_std = 1/√d_model by default, instead of
    the usual N(0, 0.02²). The final norm gives hidden states h of RMS ≈ 1, so r = h·w spreads
    over inputs as head_std·√d_model times the spread of h. With 0.02 a random body's rewards
    barely vary (e.g. std 0.11 at d_model=128 on playground answers), far below a labeler
    temperature of order 1, so its labels would be near coin flips; with 1/√d_model the spread
    is that of the hidden states at any width (std 0.5 there).
    """
    cfg = model_config.replace(head='scalar')
    head_std = 1.0 / math.sqrt(cfg.d_model) if head_std is None else head_std

    def make():
      rngs = nnx.Rngs(seed)
      model = Transformer(cfg, rngs=rngs)
      kernel = model.head.kernel
      kernel[...] = nnx.initializers.normal(head_std)(rngs.params(), kernel.shape, kernel.dtype)
      return model

    graphdef, params, _ = parallel.create_sharded(make, mesh, rules)
    return cls(nnx.merge(graphdef, params), tokenizer, seq_len=seq_len,
               max_prompt_len=max_prompt_len, batch_size=batch_size, mesh=mesh, rules=rules,
               standardize_on=standardize_on)

  @property
  def model(self) -> Transformer:
    return nnx.merge(self.graphdef, self.params)

  def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
    """tokens and attention_mask [N, seq_len]: each pair encoded like SFT data, right-padded."""
    if len(prompts) != len(responses):
      raise InputError(f'{len(prompts)} prompts but {len(responses)} responses.')
    pieces = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
      record = SFTRecord(prompt_messages(prompt), response, Origin('teacher', i))
      encoded = encode_sft(record, self.tokenizer, seq_len=self.seq_len,
                           max_prompt_len=self.max_prompt_len, truncation='response')
      ids = np.array(encoded.prompt_ids + encoded.response_ids, np.int32)
      pieces.append([(ids, np.ones_like(ids))])
    batch = pad_rows(pieces, self.seq_len, pad_id=self.tokenizer.pad_token_id)
    return {k: batch[k] for k in ('tokens', 'attention_mask')}

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    arrays = self.encode(prompts, responses)
    if not len(arrays['tokens']):
      return np.zeros(0)
    raw = map_batches(functools.partial(_rewards, self.graphdef, self.params), arrays,
                      batch_size=self.batch_size, mesh=self.mesh, rules=self.rules)
    return (raw.astype(np.float64) - self.shift) / self.scale
