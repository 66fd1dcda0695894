"""DPO and its offline preference-loss variants: per-pair log-prob sums in, (loss, metrics) out.

π_c, π_r: policy log-probs of the chosen / rejected response, each the SUM over its response
tokens, [B]; ρ_c, ρ_r: the same under the reference model; |y_c|, |y_r|: response token counts.
h = (π_c − ρ_c) − (π_r − ρ_r); h̄ is h with every log-prob divided by its response length.
ℓ(z) = −log σ(z); ε = label_smoothing. Every loss is the mean over the B pairs of:

  loss_type          per-pair loss                                   source
  sigmoid            (1−ε) ℓ(βh) + ε ℓ(−βh)                          DPO, Rafailov et al. 2023;
                                                                     ε > 0: cDPO, Mitchell 2023
  robust             [(1−ε) ℓ(βh) − ε ℓ(−βh)] / (1 − 2ε)             Chowdhury et al. 2024
  ipo                (h̄ − 1/(2β))²                                   Azar et al. 2023
  hinge              max(0, 1 − βh)                                  SLiC, Zhao et al. 2023
  length_normalized  (1−ε) ℓ(βh̄) + ε ℓ(−βh̄)                          LN-DPO, Ahrabian et al. 2024
  rdpo               (1−ε) ℓ(z) + ε ℓ(−z), z = βh + α(|y_c| − |y_r|) R-DPO, Park et al. 2024
  simpo              (1−ε) ℓ(z) + ε ℓ(−z), z = β(π_c/|y_c| − π_r/|y_r|) − γ
                                                                     SimPO, Meng et al. 2024
  orpo               −π_c/|y_c| + β ℓ(log odds_c − log odds_r),      ORPO, Hong et al. 2024
                     odds = p / (1 − p), p = exp(π/|y|)

KTO (Ethayarajh et al. 2024), which learns from unpaired desirable / undesirable examples, is
in `kto.py`.
"""

import math

import jax
import jax.numpy as jnp

from rlhf_jax.errors import InputError

_SMOOTHED = ('sigmoid', 'robust', 'length_normalized', 'rdpo', 'simpo')
LOSS_TYPES = _SMOOTHED + ('ipo', 'hinge', 'orpo')
VARIANT_ARGS = {'rdpo': ('alpha',), 'simpo': ('gamma',)}
_NEEDS_LENGTHS = ('ipo', 'length_normalized', 'rdpo', 'simpo', 'orpo')
REFERENCE_FREE = ('simpo', 'orpo')
_PER_TOKEN = ('ipo', 'length_normalized', 'simpo', 'orpo')


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta: float, loss_type: str = 'sigmoid', label_smoothing: float = 0.0,
             chosen_lengths=None, rejected_lengths=None, **variant_args):
  """The `loss_type` preference loss of the module table, averaged over the B pairs.

  All log-probs are [B] per-response sums. `chosen_lengths` / `rejected_lengths` ([B] response
  token counts, > 0) are required by ipo, length_normalized, rdpo, simpo and orpo and ignored by
  the others. simpo and orpo are reference-free: their ref log-probs may be None and are
  ignored. For orpo, β plays the role of the paper's λ, the weight of the odds-ratio term (as in
  TRL). `variant_args` are the variant's own coefficients, required and keyword-only: rdpo takes
  `alpha` (the length coefficient α) and simpo `gamma` (the target reward margin γ, not scaled
  by β, as in the SimPO paper). label_smoothing ε ∈ [0, 0.5) applies to the logistic types
  (cDPO for sigmoid / length_normalized / rdpo / simpo, the unbiased estimator for robust).

  Computed in float32 with ℓ(z) = −jax.nn.log_sigmoid(z), finite for any margin.

  Metrics, named as in TRL: 'rewards/chosen' and 'rewards/rejected' are batch means of β times
  each response's log-ratio as the loss uses it: β(π − ρ), per token β(π − ρ)/|y| for ipo and
  length_normalized, and the reference-free β π/|y| for simpo and orpo; 'rewards/margins' is
  the mean chosen − rejected reward; 'rewards/accuracies' the fraction of pairs with chosen
  reward > rejected reward (ties count 0); 'logps/chosen' and 'logps/rejected' are means of
  the policy sums. orpo adds 'nll_loss' (its SFT term) and 'log_odds_ratio' (mean).
  """
  _check_options(loss_type, label_smoothing, variant_args)
  named = {'policy_chosen_logps': policy_chosen_logps,
           'policy_rejected_logps': policy_rejected_logps}
  if loss_type not in REFERENCE_FREE:
    named.update(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
  if loss_type in _NEEDS_LENGTHS:
    named.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
  x = _as_float32_pairs(named, loss_type)

  # Each response's log-ratio as the loss uses it: π − ρ, per token for _PER_TOKEN, and the
  # bare (per-token) policy log-prob for the reference-free types.
  chosen_B, rejected_B = x['policy_chosen_logps'], x['policy_rejected_logps']
  if loss_type not in REFERENCE_FREE:
    chosen_B = chosen_B - x['ref_chosen_logps']
    rejected_B = rejected_B - x['ref_rejected_logps']
  if loss_type in _PER_TOKEN:
    chosen_B = chosen_B / x['chosen_lengths']
    rejected_B = rejected_B / x['rejected_lengths']
  h_B = chosen_B - rejected_B
  eps = label_smoothing
  extra = {}

  if loss_type == 'robust':
    losses_B = ((1 - eps) * _nll_sigmoid(beta * h_B)
                - eps * _nll_sigmoid(-beta * h_B)) / (1 - 2 * eps)
  elif loss_type == 'ipo':
    losses_B = jnp.square(h_B - 1 / (2 * beta))
  elif loss_type == 'hinge':
    losses_B = jax.nn.relu(1 - beta * h_B)
  elif loss_type == 'orpo':
    log_odds_ratio_B = h_B - (_log1mexp(chosen_B) - _log1mexp(rejected_B))
    losses_B = -chosen_B + beta * _nll_sigmoid(log_odds_ratio_B)
    extra = {'nll_loss': -jnp.mean(chosen_B), 'log_odds_ratio': jnp.mean(log_odds_ratio_B)}
  else:
    z_B = beta * h_B
    if loss_type == 'rdpo':
      z_B += variant_args['alpha'] * (x['chosen_lengths'] - x['rejected_lengths'])
    elif loss_type == 'simpo':
      z_B -= variant_args['gamma']
    losses_B = (1 - eps) * _nll_sigmoid(z_B) + eps * _nll_sigmoid(-z_B)

  loss = jnp.mean(losses_B)
  rewards_chosen_B, rewards_rejected_B = beta * chosen_B, beta * rejected_B
  return loss, {
      'loss': loss,
      'rewards/chosen': jnp.mean(rewards_chosen_B),
      'rewards/rejected': jnp.mean(rewards_rejected_B),
      'rewards/margins': jnp.mean(rewards_chosen_B - rewards_rejected_B),
      'rewards/accuracies': jnp.mean(rewards_chosen_B > rewards_rejected_B),
      'logps/chosen': jnp.mean(x['policy_chosen_logps']),
      'logps/rejected': jnp.mean(x['policy_rejected_logps']),
      **extra,
  }


def _nll_sigmoid(z):
  """ℓ(z) = −log σ(z)."""
  return -jax.nn.log_sigmoid(z)


def _log1mexp(a):
  """log(1 − exp(a)) for a < 0, accurate at both ends (Mächler 2012, "Accurately Computing
  log(1 − exp(−|a|))")."""
  return jnp.where(a > -math.log(2), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def _check_options(loss_type, label_smoothing, variant_args):
  if loss_type not in LOSS_TYPES:
    raise InputError(f'loss_type={loss_type!r}; choose one of {", ".join(LOSS_TYPES)}.')
  if loss_type in _SMOOTHED:
    if not 0 <= label_smoothing < 0.5:
      raise InputError(f'label_smoothing={label_smoothing}; it must lie in [0, 0.5).')
  elif label_smoothing:
    raise InputError(f'label_smoothing={label_smoothing} has no meaning for '
                     f'loss_type={loss_type!r}; it applies to {", ".join(_SMOOTHED)}.')
  expected = set(VARIANT_ARGS.get(loss_type, ()))
  if set(variant_args) != expected:
    unknown, missing = sorted(set(variant_args) - expected), sorted(expected - set(variant_args))
    raise InputError(f'loss_type={loss_type!r} takes variant_args {sorted(expected)}; '
                     f'unknown: {unknown}, missing: {missing}.')


def _as_float32_pairs(named, loss_type):
  """The named arrays in float32, after checking that each is given and all share one [B]."""
  for name, value in named.items():
    if value is None:
      raise InputError(f'{name} is None; loss_type={loss_type!r} needs it.')
  shape = jnp.shape(named['policy_chosen_logps'])
  if len(shape) != 1:
    raise InputError(f'policy_chosen_logps has shape {shape}; expected [B] (one sum per pair).')
  for name, value in named.items():
    if jnp.shape(value) != shape:
      raise InputError(f'{name} has shape {jnp.shape(value)}; expected {shape} like '
                       'policy_chosen_logps.')
  return {name: jnp.asarray(value, jnp.float32) for name, value in named.items()}
