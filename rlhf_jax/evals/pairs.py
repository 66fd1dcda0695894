"""A reward model on held-out preference pairs: accuracy, calibration, gold agreement, ceiling.

Every held-out pair is scored once per evaluation. Against the labels the model is judged by
accuracy and by the calibration of σ(r_c − r_r) (ECE, and a reliability diagram written to
`<workdir>/plots/reliability_step_<N>.png` and, as 'reliability', to TensorBoard). Where a gold reward and the labelers' model are
known (the playground), it also reports agreement with the gold preference and the accuracy
ceiling that the labelers' own noise allows (`bradley_terry_ceiling`).
"""

import functools
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from rlhf_jax.data.batching import pad_pairs
from rlhf_jax.playground.labelers import Labeler, is_confident, num_words
from rlhf_jax.parallel import map_batches
from rlhf_jax.evals.calibration import (bradley_terry_ceiling, preference_metrics,
                                       reliability_diagram)


class PairEvaluation:
  """Callable `(params, step) -> metrics` for a scalar-head model (with the reliability
  diagram, a matplotlib figure, on process 0 of a run with a workdir)."""

  def __init__(self, examples: Sequence, *, score_pairs: Callable, graphdef, seq_len: int,
               pad_id: int, mesh, rules, batch_size: int, workdir: str | None,
               gold: tuple[np.ndarray, np.ndarray] | None = None,
               texts: tuple[Sequence[str], Sequence[str]] | None = None,
               labeler: Labeler | None = None, groups: Sequence[str] | None = None):
    """examples: (chosen piece, rejected piece) per pair, encoded like the training data.

    score_pairs(model, batch) -> (r_chosen, r_rejected); gold: gold rewards of the chosen and
    rejected answers; texts: their strings (for the labelers' length and tone biases); groups:
    a label per pair (e.g. the playground task) for per-group accuracy and ceiling.
    """
    self.arrays = pad_pairs(examples, seq_len, pad_id=pad_id)
    self.gold = gold
    self.groups = None if groups is None else np.asarray(groups)
    self.labeler_logits = None  # The labelers' margins, where they are known and noisy.
    if labeler is not None and labeler.temperature > 0:
      lengths = [np.array([num_words(t) for t in side]) for side in texts]
      tones = [np.array([is_confident(t) for t in side]) for side in texts]
      self.labeler_logits = labeler.preference_logit(*gold, *lengths, *tones)
      self.temperature = labeler.temperature
    self.mesh, self.rules, self.batch_size, self.workdir = mesh, rules, batch_size, workdir
    self._score = jax.jit(lambda params, batch: score_pairs(nnx.merge(graphdef, params), batch))

  def __call__(self, params, step: int) -> dict[str, float]:
    r_chosen, r_rejected = map_batches(functools.partial(self._score, params), self.arrays,
                                       batch_size=self.batch_size, mesh=self.mesh,
                                       rules=self.rules)
    gold_labels = None
    if self.gold is not None:
      gold_gap = self.gold[0] - self.gold[1]
      gold_labels = np.where(gold_gap == 0, np.nan, (gold_gap > 0).astype(float))
    metrics = preference_metrics(r_chosen, r_rejected, gold_labels=gold_labels)
    everything = np.ones(len(r_chosen), bool)
    groups = [] if self.groups is None else sorted(set(self.groups))
    for suffix, rows in [('', everything)] + [(f'/{g}', self.groups == g) for g in groups]:
      if suffix:
        metrics[f'accuracy{suffix}'] = preference_metrics(r_chosen[rows],
                                                          r_rejected[rows])['accuracy']
      if self.labeler_logits is not None:
        metrics[f'labeler_ceiling{suffix}'] = bradley_terry_ceiling(
            self.labeler_logits[rows], temperature=self.temperature)
    if self.workdir is not None and jax.process_index() == 0:
      gaps = np.concatenate([r_chosen - r_rejected, r_rejected - r_chosen])
      labels = np.concatenate([np.ones(len(r_chosen)), np.zeros(len(r_chosen))])
      metrics['reliability'] = reliability_diagram(
          1 / (1 + np.exp(-gaps)), labels,
          os.path.join(self.workdir, 'plots', f'reliability_step_{step}.png'),
          title=f'Reward model, step {step}')
    return metrics

