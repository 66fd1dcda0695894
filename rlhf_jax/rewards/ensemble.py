"""Several reward models as one: ensembles (Coste et al. 2023) and weight averages (WARM).

Ensembles ("Reward Model Ensembles Help Mitigate Overoptimization", Coste et al. 2023): M
proxies trained alike but for their seed score every response, r_m(x, y), m = 1 … M, and the
reward is an aggregate of the M scores (`aggregate`):

    mean         r = 1/M Σ_m r_m
    min          r = min_m r_m                      (worst-case optimisation, WCO)
    uncertainty  r = 1/M Σ_m r_m − λ · Var_m(r_m)   (uncertainty-weighted optimisation, UWO)

Var_m is the population variance over the members (1/M Σ_m (r_m − mean)²). Coste et al.
normalise each member first: a Bradley-Terry reward model is only defined up to an added
constant, so raw members' min would follow whichever has the lowest offset and their variance
would measure offsets, not disagreement. Here each member is standardised by its own mean and
std over the initial policy's responses: in RL (with config.rl.normalize_scores, the default)
by the rollout statistics of `rlhf_jax.algorithms.rl.learner.score_statistics`; in best-of-n
over one sampled answer per prompt (`EnsembleReward.standardized_on`).

WARM ("Weight Averaged Reward Models", Ramé et al. 2024): one model whose weights are the
elementwise mean of M reward models fine-tuned from the same initialisation (`average_weights`,
`warm_average`); it is used like any single reward model.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel
from rlhf_jax.errors import InputError
from rlhf_jax.models import read_hf_config
from rlhf_jax.models.loading import export_hf, load_model

AGGREGATIONS = ('mean', 'min', 'uncertainty')

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def aggregate(scores_MxB, how: str, *, uncertainty_weight: float):
  """[B]: the members' scores [M, B] (NumPy or JAX) aggregated over M; see the module docstring.

  how: 'mean', 'min' (worst case) or 'uncertainty' (mean − uncertainty_weight · population
  variance, Coste et al. 2023's UWO). uncertainty_weight is λ, read only by 'uncertainty'.
  """
  if how == 'mean':
    return scores_MxB.mean(axis=0)
  if how == 'min':
    return scores_MxB.min(axis=0)
  if how == 'uncertainty':
    return scores_MxB.mean(axis=0) - uncertainty_weight * scores_MxB.var(axis=0)
  raise InputError(f'Reward aggregation {how!r}; choose one of {AGGREGATIONS}.')


def check_aggregation(block, key: str) -> None:
  """`block.reward_aggregation` and `block.uncertainty_weight` of config entry `key`
  ('config.rl', 'config.bon'): a known aggregation and λ ≥ 0."""
  if block.reward_aggregation not in AGGREGATIONS:
    raise InputError(f'{key}.reward_aggregation={block.reward_aggregation!r}; choose one of '
                     f'{AGGREGATIONS}.')
  if block.uncertainty_weight < 0:
    raise InputError(f'{key}.uncertainty_weight={block.uncertainty_weight} must be ≥ 0 (λ of '
                     'mean − λ·var: a negative λ would reward disagreement).')


class EnsembleReward:
  """Callable `reward(prompts, responses) -> [N] float64`: the aggregate over the members of

      s_m(x, y) = (r_m(x, y) − shift_m) / scale_m,

  r_m the m-th member's reward (a `ModelReward` or any reward function). shift and scale default
  to 0 and 1 (raw members); `normalized` sets them, `standardized_on` measures them.
  """

  def __init__(self, members: Sequence[RewardFn], *, aggregation: str,
               uncertainty_weight: float, shift_M=None, scale_M=None):
    if aggregation not in AGGREGATIONS:
      raise InputError(f'Reward aggregation {aggregation!r}; choose one of {AGGREGATIONS}.')
    self.members = tuple(members)
    self.aggregation, self.uncertainty_weight = aggregation, uncertainty_weight
    num_members = len(self.members)
    self.shift_M = np.zeros(num_members) if shift_M is None else np.asarray(shift_M, np.float64)
    self.scale_M = np.ones(num_members) if scale_M is None else np.asarray(scale_M, np.float64)
    if self.shift_M.shape != (num_members,) or self.scale_M.shape != (num_members,):
      raise InputError(f'{num_members} members but shift_M of shape {self.shift_M.shape} and '
                       f'scale_M of shape {self.scale_M.shape}.')

  def normalized(self, shift_M, scale_M) -> 'EnsembleReward':
    """The same members and aggregation, member m mapped to (r_m − shift_M[m]) / scale_M[m]."""
    return EnsembleReward(self.members, aggregation=self.aggregation,
                          uncertainty_weight=self.uncertainty_weight, shift_M=shift_M,
                          scale_M=scale_M)

  def standardized_on(self, prompts: Sequence[str], responses: Sequence[str]
                      ) -> 'EnsembleReward':
    """Each member standardised to mean 0 and std 1 (population) over these pairs, a fixed
    reference set: later scores do not depend on what else is scored with them."""
    raw_MxN = np.stack([member(prompts, responses) for member in self.members])
    scale_M = raw_MxN.std(axis=1)
    if not np.all(scale_M > 0):
      raise InputError(f'A member\'s rewards over the {raw_MxN.shape[1]} reference pairs have '
                       f'std 0 (stds {scale_M.tolist()}); standardisation needs them > 0.')
    return self.normalized(raw_MxN.mean(axis=1), scale_M)

  def member_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """[M, N]: s_m of every pair, member by member."""
    raw_MxN = np.stack([member(prompts, responses) for member in self.members])
    return (raw_MxN - self.shift_M[:, None]) / self.scale_M[:, None]

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return aggregate(self.member_scores(prompts, responses), self.aggregation,
                     uncertainty_weight=self.uncertainty_weight)


def average_weights(param_states: Sequence):
  """WARM: the elementwise mean (1/M) Σ_m θ_m of M parameter states of one architecture,
  computed in float32 and kept in each parameter's dtype. Same initialisation (what makes the
  average a good model, Ramé et al. 2024) is the caller's to ensure; same tree and shapes are
  checked here."""
  if not param_states:
    raise InputError('average_weights needs at least one parameter state.')
  structure = jax.tree.structure(param_states[0])
  for m, state in enumerate(param_states[1:], start=1):
    if jax.tree.structure(state) != structure:
      raise InputError(f'Parameter state {m} has another tree than state 0: WARM averages '
                       'models of one architecture.')
  leaves_MxL = [jax.tree_util.tree_flatten_with_path(state)[0] for state in param_states]
  for leaves in zip(*leaves_MxL):
    shapes = [leaf.shape for _, leaf in leaves]
    if len(set(shapes)) > 1:
      raise InputError(f'Parameter {jax.tree_util.keystr(leaves[0][0])} has shapes {shapes} '
                       'across the states: WARM averages models of one architecture.')

  def mean(*leaves):
    total = sum(leaf.astype(jnp.float32) for leaf in leaves)
    return (total / len(leaves)).astype(leaves[0].dtype)
  return jax.tree.map(mean, *param_states)


def warm_average(paths: Sequence[str], out_dir: str, *, mesh=None,
                 rules=parallel.DEFAULT_RULES, tokenizer=None) -> None:
  """Writes to `out_dir` the HF reward-model directory whose weights are the average of those of
  the reward models (HF directories) at `paths` (`average_weights`), with `tokenizer` if given.
  Loaded on `mesh` (default: data-parallel over every device), in float32."""
  if not paths:
    raise InputError('warm_average needs at least one reward-model directory.')
  configs = [read_hf_config(path, head='scalar') for path in paths]
  for path, cfg in zip(paths[1:], configs[1:]):
    if cfg != configs[0]:
      raise InputError(f'The reward models at {paths[0]!r} and {path!r} have different '
                       'architectures: WARM averages models of one architecture.')
  mesh = parallel.make_mesh({'data': -1}) if mesh is None else mesh
  models = [load_model(path, mesh, rules, head='scalar') for path in paths]
  export_hf(models[0].graphdef, average_weights([model.params for model in models]), out_dir,
            tokenizer)
