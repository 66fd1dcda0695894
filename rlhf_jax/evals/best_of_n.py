"""Best-of-n (rejection sampling): n answers per prompt, the proxy reward model keeps the best.

The policy after best-of-n differs from the sampled one by (Stiennon et al. 2020, Appendix G;
Gao et al. 2022, who measure overoptimization against d = √KL):

    KL_bon(n) = log n − (n − 1) / n

`run(ctx)` (`config.procedure='best_of_n'`) samples n_max answers per held-out prompt once; the
reward of best-of-n for every n = 1, 2, 4, … ≤ n_max is the unbiased estimate over those
answers of its expectation (`best_of_n_weights`), so the curves over n share their samples. It
writes `<workdir>/best_of_n.jsonl`: per n, KL_bon and the expected proxy and gold rewards of the
chosen answer, and `<workdir>/best_of_n.png`. Several reward models (config.bon.reward_model,
comma-separated) choose by an aggregate of their scores (`rlhf_jax.rewards.ensemble`), each
standardised over the policy's first answer to every prompt: this fixed set puts the members on
one scale, as RL's rollout statistics do, so that the minimum and the variance compare like
with like; a single reward model keeps its raw scale (standardising it would not change its
ranking). Python reward functions (config.bon.reward_fns, `rlhf_jax.rewards.functions`) add to
the reward model's score, or choose alone.
"""

import json
import math
import os

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax.errors import InputError
from rlhf_jax.playground import tasks
from rlhf_jax.rewards.ensemble import EnsembleReward, check_aggregation
from rlhf_jax.rewards.functions import FunctionReward, add_rewards
from rlhf_jax.sampling.text import TextSampler
from rlhf_jax.storage import open_file


def kl_best_of_n(n: int) -> float:
  """KL(π_bon ‖ π) = log n − (n − 1)/n."""
  return math.log(n) - (n - 1) / n


def best_of_n_weights(proxy_NxK, n: int) -> np.ndarray:
  """[N, K]: the probability that answer k is best-of-n's choice, for n answers drawn without
  replacement from a prompt's K sampled ones (the unbiased best-of-n estimator of Nakano et al.
  2021, WebGPT, which Gao et al. 2022 use):

      P(k chosen) = C(r_k, n − 1) / C(K, n),

  r_k the number of the K answers that the proxy ranks below answer k: k is chosen exactly when
  the n − 1 others all come from those. Ties go to the earlier answer, as argmax does. Weighted
  by these, E[reward of best-of-n] has no more variance than any choice of n of the K answers.
  """
  proxy_NxK = np.asarray(proxy_NxK)
  num_answers = proxy_NxK.shape[1]
  if not 1 <= n <= num_answers:
    raise InputError(f'n={n} must lie in [1, {num_answers}] (the answers sampled).')
  # Ascending by reward; among equal rewards the later answer ranks lower.
  order_NxK = np.lexsort((-np.broadcast_to(np.arange(num_answers), proxy_NxK.shape), proxy_NxK),
                         axis=-1)
  rank_NxK = np.empty_like(order_NxK)
  np.put_along_axis(rank_NxK, order_NxK, np.arange(num_answers)[None], axis=-1)
  weight_of_rank = np.array([math.comb(r, n - 1) / math.comb(num_answers, n)
                             for r in range(num_answers)])
  return weight_of_rank[rank_NxK]


def expected_rewards(proxy_NxK, gold_NxK, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Per prompt [N], the expected proxy and gold reward of best-of-n's choice."""
  weights_NxK = best_of_n_weights(proxy_NxK, n)
  return (weights_NxK * proxy_NxK).sum(1), (weights_NxK * gold_NxK).sum(1)


def curve(proxy_NxK, gold_NxK, ns) -> list[dict]:
  """Per n: KL_bon, d = √KL_bon and the expected proxy and gold reward of the chosen answers."""
  records = []
  for n in ns:
    proxy_N, gold_N = expected_rewards(proxy_NxK, gold_NxK, n)
    kl = kl_best_of_n(n)
    records.append({'n': n, 'kl': kl, 'd': math.sqrt(kl), 'proxy_reward': float(proxy_N.mean()),
                    'gold_reward': float(gold_N.mean())})
  return records


def sample_candidates(policy, config, tokenizer, mesh, prompts, seeds) -> list[list[str]]:
  """An answer of `policy` (a LoadedModel) per prompt and seed: answers[j][i] is prompt i's
  answer drawn with seeds[j] at config.eval.temperature."""
  sampler = TextSampler(tokenizer, policy.graphdef, mesh=mesh, rules=config.sharding_rules,
                        batch_size=config.train.batch_size,
                        max_prompt_len=config.data.max_prompt_len,
                        max_new_tokens=config.eval.max_new_tokens,
                        temperature=config.eval.temperature)
  return [sampler(policy.params, prompts, seed=seed).responses for seed in seeds]


def score_candidates(reward_fn, prompts, answers) -> np.ndarray:
  """Rewards [N, K] of answers[j][i] (prompt i's j-th answer) under reward_fn(prompts, answers)."""
  return np.stack([reward_fn(prompts, a) for a in answers], axis=1)


def powers_of_two(n_max: int) -> list[int]:
  """1, 2, 4, … ≤ n_max."""
  return [2**i for i in range(int(math.log2(n_max)) + 1)]


def run(ctx) -> list[dict]:
  """Best-of-n of the policy config.model.hf_path under the reward model config.bon.reward_model,
  judged by the run's gold reward."""
  config, bon = ctx.config, ctx.config.bon
  if not config.model.hf_path or not (bon.reward_model or bon.reward_fns):
    raise InputError('Best-of-n needs a policy (config.model.hf_path, a Hugging Face '
                     'directory) and a reward: a reward model (config.bon.reward_model, one), '
                     'Python functions (config.bon.reward_fns) or both.')
  if ctx.gold is None:
    raise InputError('Best-of-n judges the chosen answers by the gold reward: set '
                     'config.eval.gold="playground".')
  check_aggregation(bon, 'config.bon')
  ns = powers_of_two(bon.n_max)
  prompts = tasks.playground_prompts(config.data.playground, 'eval', bon.num_prompts)
  answers = sample_candidates(ctx.load(config.model.hf_path, head='lm', keep=False), config,
                              ctx.tokenizer, ctx.mesh, prompts,
                              range(config.seed, config.seed + ns[-1]))
  proxy = None
  if bon.reward_model:
    proxy = ctx.reward_model(bon.reward_model, aggregation=bon.reward_aggregation,
                             uncertainty_weight=bon.uncertainty_weight)
  if isinstance(proxy, EnsembleReward):
    proxy = proxy.standardized_on(prompts, answers[0])
  if bon.reward_fns:
    proxy = add_rewards(proxy, FunctionReward(bon.reward_fns, bon.reward_fn_weights,
                                              key='config.bon.reward_fns'))
  records = curve(score_candidates(proxy, prompts, answers),
                  score_candidates(ctx.gold, prompts, answers), ns)
  if jax.process_index() == 0:
    with open_file(os.path.join(ctx.workdir, 'best_of_n.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)
    plot(records, os.path.join(ctx.workdir, 'best_of_n.png'))
  return records


def plot(records, path: str) -> None:
  """Gold and proxy reward of the chosen answers against d = √KL_bon."""
  figure = Figure(figsize=(5, 3.5), dpi=100)
  FigureCanvasAgg(figure)
  gold_axes = figure.add_subplot()
  proxy_axes = gold_axes.twinx()  # The reward model's scale is its own.
  d = [r['d'] for r in records]
  gold_axes.plot(d, [r['gold_reward'] for r in records], 'o-', color='C0')
  proxy_axes.plot(d, [r['proxy_reward'] for r in records], 's--', color='C1')
  for r in records:
    gold_axes.annotate(f"n={r['n']}", (r['d'], r['gold_reward']), fontsize=7,
                       textcoords='offset points', xytext=(2, -10))
  gold_axes.set_xlabel('d = √KL(best-of-n ‖ policy)')
  gold_axes.set_ylabel('gold reward (circles)', color='C0')
  proxy_axes.set_ylabel('proxy reward (squares)', color='C1')
  figure.tight_layout()
  with open_file(path, 'wb') as f:
    figure.savefig(f, format='png')
