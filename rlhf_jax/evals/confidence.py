"""A policy's confidence in its own answers: the probability of an answer's tokens,

    p_T(y | x) = Π_t softmax(logits_t / T)[y_t]    (EOS included: the whole answer),

at a grid of temperatures T (T = 1: the policy's own confidence; the others for temperature
scaling, Guo et al. 2017; Kadavath et al. 2022 find T ≈ 2.5 calibrates RLHF models). On tasks
with one right answer, confidence against correctness is the policy's calibration
(`rlhf_jax.analysis.lecture.calibration_statistic`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.losses import masked_sum, token_logprobs
from rlhf_jax.parallel import map_batches
from rlhf_jax.sampling.text import TextSamples


class AnswerConfidence:
  """`confidence(params, samples) -> [N, G]`: p_T of each sampled answer at each temperature."""

  def __init__(self, graphdef, temperatures: Sequence[float], *, mesh, rules, batch_size: int,
               chunk_size: int = 256):
    self.temperatures = tuple(float(t) for t in temperatures)
    self.mesh, self.rules, self.batch_size = mesh, rules, batch_size

    def answer_logps(params, batch):  # [B, G]; the hidden states once for every temperature.
      model = nnx.merge(graphdef, params)
      tokens = batch['tokens']
      hidden, _ = model.hidden_states(tokens, attention_mask=batch['attention_mask'])
      mask = batch['loss_mask'][:, 1:].astype(bool)
      return jnp.stack([masked_sum(token_logprobs(hidden[:, :-1], model.unembedding(),
                                                  tokens[:, 1:], chunk_size=chunk_size,
                                                  temperature=t), mask, axis=-1)
                        for t in self.temperatures], axis=-1)

    self._answer_logps = jax.jit(answer_logps)

  def __call__(self, params, samples: TextSamples) -> np.ndarray:
    logps = map_batches(lambda batch: self._answer_logps(params, batch), samples.sequences(),
                        batch_size=self.batch_size, mesh=self.mesh, rules=self.rules)
    return np.exp(np.asarray(logps, np.float64))
