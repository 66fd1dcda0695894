"""Gold reward of a policy's sampled answers to held-out prompts.

The prompts go through the chat template, left-padded to `max_prompt_len`; the policy samples
up to `max_new_tokens` with the KV-cache sampler; the decoded answers are scored by a gold
reward `gold_fn(prompts, responses) -> rewards`. Reported: the mean gold reward, per group (e.g.
per playground task), mean response length and the share of answers that ended with EOS; the
samples themselves go to `<workdir>/samples/step_<N>.jsonl`, each with its measurements, and
the first `SHOWN` of them, as a table ('answers'), to TensorBoard.
"""

import collections
import functools
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from rlhf_jax.evals.media import Table
from rlhf_jax.parallel import map_batches
from rlhf_jax.sampling.text import TextSampler
from rlhf_jax.storage import open_file
from rlhf_jax.models.scoring import sequence_kl

SHOWN = 8  # Answers shown in the table of each evaluation (same prompts every time).


class GoldRewardOfSamples:
  """Callable `(params, step) -> metrics`: samples answers and scores them with the gold.

  With `proxy_fn` (a reward model's `proxy(prompts, responses)`), it also reports the mean
  'proxy_reward' of the same answers, the reward that RL optimises next to the gold.
  With `reference` (the parameters of a reference policy of the same architecture on the mesh,
  e.g. the SFT model: a run's frozen copy, never reloaded), it also reports
    win_rate = mean_x [1(g(x, y) > g(x, y_ref)) + ½·1(g(x, y) = g(x, y_ref))],
        y ~ π(·|x), y_ref ~ π_ref(·|x), drawn with the same keys;
    kl       = mean_x Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)), y ~ π: the Rao–Blackwellised
        Monte-Carlo estimate of KL(π‖π_ref) per prompt (`sequence_kl`), never negative and
        exact in expectation when sampling at temperature 1.
  """

  def __init__(self, prompts: Sequence[str], tokenizer, graphdef, *, gold_fn: Callable,
               groups: Sequence[str] | None, mesh, rules, batch_size: int, max_prompt_len: int,
               max_new_tokens: int, temperature: float, seed: int, workdir: str | None,
               reference=None, chunk_size: int = 256,
               proxy_fn: Callable | None = None):
    self.prompts, self.tokenizer, self.gold_fn = list(prompts), tokenizer, gold_fn
    self.proxy_fn = proxy_fn
    self.groups = list(groups) if groups is not None else None
    self.mesh, self.rules, self.batch_size, self.seed = mesh, rules, batch_size, seed
    self.workdir, self.reference = workdir, reference
    self.sampler = TextSampler(tokenizer, graphdef, mesh=mesh, rules=rules,
                               batch_size=batch_size, max_prompt_len=max_prompt_len,
                               max_new_tokens=max_new_tokens, temperature=temperature)

    def kl(params, reference_params, batch):
      return sequence_kl(nnx.merge(graphdef, params), nnx.merge(graphdef, reference_params),
                         batch['tokens'], batch['attention_mask'], batch['loss_mask'],
                         chunk_size=chunk_size)

    self._kl = jax.jit(kl)
    self._reference_gold = None  # Gold of the reference's samples: fixed, computed once.

  def _sample(self, params):
    """(samples, their gold rewards [N])."""
    samples = self.sampler(params, self.prompts, seed=self.seed)
    return samples, np.asarray(self.gold_fn(self.prompts, samples.responses), np.float64)

  def __call__(self, params, step: int) -> dict[str, float]:
    """Same prompts and keys at every evaluation, so only the policy's change shows."""
    samples, gold = self._sample(params)
    per_answer = {'gold': gold}
    metrics = {'gold_reward': gold.mean(), 'response_tokens': samples.mask.sum(-1).mean(),
               'ended_with_eos': (samples.tokens == self.tokenizer.eos_token_id).any(-1).mean()}
    if self.proxy_fn is not None:
      per_answer['proxy'] = np.asarray(self.proxy_fn(self.prompts, samples.responses), np.float64)
      metrics['proxy_reward'] = float(per_answer['proxy'].mean())
    if self.groups is not None:
      by_group = collections.defaultdict(list)
      for group, g in zip(self.groups, gold):
        by_group[group].append(g)
      metrics |= {f'gold_reward/{k}': float(np.mean(v)) for k, v in sorted(by_group.items())}
    if self.reference is not None:
      per_answer |= self._against_reference(params, samples, gold)
      metrics |= {'win_rate': per_answer['win'].mean(), 'kl': per_answer['kl'].mean()}
    self._write_samples(step, samples.responses, per_answer)
    metrics['answers'] = Table(('prompt', 'answer', *per_answer), [
        (prompt, response, *(float(v[i]) for v in per_answer.values()))
        for i, (prompt, response) in enumerate(zip(self.prompts[:SHOWN], samples.responses))])
    return metrics

  def _against_reference(self, params, samples, gold) -> dict[str, np.ndarray]:
    """Per answer: 'win' against the reference's answer to the same prompt, and 'kl'."""
    reference = self.reference
    if self._reference_gold is None:
      self._reference_gold = self._sample(reference)[1]
    kl = map_batches(functools.partial(self._kl, params, reference), samples.sequences(),
                     batch_size=self.batch_size, mesh=self.mesh, rules=self.rules)
    wins = (gold > self._reference_gold) + 0.5 * (gold == self._reference_gold)
    return {'win': wins, 'kl': np.asarray(kl, np.float64)}

  def _write_samples(self, step, responses, per_answer: dict[str, np.ndarray]):
    """One line per prompt: the prompt, the answer and its measurements (gold, and where
    measured proxy, win and kl), for inspection and for bootstrap intervals over prompts."""
    if self.workdir is None or jax.process_index() != 0:
      return
    with open_file(os.path.join(self.workdir, 'samples', f'step_{step}.jsonl'), 'w') as f:
      for i, (prompt, response) in enumerate(zip(self.prompts, responses)):
        values = {key: float(v[i]) for key, v in per_answer.items()}
        f.write(json.dumps({'prompt': prompt, 'response': response, **values}) + '\n')
