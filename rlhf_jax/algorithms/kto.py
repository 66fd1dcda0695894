"""KTO: a policy trained on unpaired desirable / undesirable examples (`losses.kto`).

Batches are [B, 2, T] (`data.datasets`): each example's prompt + completion, and its prompt +
another row's completion, the mismatched pair whose log-ratio estimates the reference point z₀.
The policy's log-probs of the examples carry the gradient; those of the mismatched pairs, like
the reference's, are computed without it (z₀ takes none). The reference is the initial policy
(the SFT model of `config.model.hf_path`), a frozen copy on the mesh, or for a LoRA policy its
own base with the adapters switched off. Its log-probs are not
precomputed: a mismatched pair depends on which rows meet in a batch, which changes each epoch.
Data: KTO files (`{"prompt", "completion", "label"}`) or preference pairs, each read as a
desirable and an undesirable example.
"""

import functools

import jax

from rlhf_jax.algorithms.base import Algorithm, DataBatches
from rlhf_jax.algorithms.evaluations import sample_evaluations
from rlhf_jax.algorithms.preferences import preference_data
from rlhf_jax.errors import InputError
from rlhf_jax.losses import kto_loss
from rlhf_jax.losses.kto import LOSS_TYPES
from rlhf_jax.models import lora
from rlhf_jax.models.scoring import sequence_logps


def sequence_logps_of(model, batch, slot: int, *, chunk_size: int):
  """log π of the responses in sequence `slot` of a [B, 2, T] batch: [B]."""
  return sequence_logps(model, *(batch[k][:, slot] for k in ('tokens', 'attention_mask',
                                                              'loss_mask')),
                        chunk_size=chunk_size)[0]


def kto_loss_fn(model, batch, rng=None, frozen=None, *, loss_options: dict, chunk_size: int):
  """The policy's and the reference's log-probs of both sequences, into `kto_loss`; the
  reference is `frozen`'s parameters, or a LoRA policy's base (`lora.reference_model`)."""
  del rng  # Deterministic loss.
  logps = functools.partial(sequence_logps_of, chunk_size=chunk_size)
  reference = lora.reference_model(model, frozen)
  no_grad = lambda m, slot: jax.lax.stop_gradient(logps(m, batch, slot))
  return kto_loss(logps(model, batch, 0), no_grad(reference, 0), no_grad(model, 1),
                  no_grad(reference, 1), batch['labels'], **loss_options)


def make_loss_fn(config):
  """kto_loss_fn with config.loss's options and config.train.logprob_chunk_size."""
  loss = config.loss
  if loss.loss_type not in LOSS_TYPES:
    raise InputError(f'config.loss.loss_type={loss.loss_type!r}; choose from {LOSS_TYPES}.')
  return functools.partial(
      kto_loss_fn, chunk_size=config.train.logprob_chunk_size,
      loss_options=dict(beta=loss.beta, loss_type=loss.loss_type,
                        desirable_weight=loss.desirable_weight,
                        undesirable_weight=loss.undesirable_weight))


def make_algorithm(ctx) -> Algorithm:
  config = ctx.config
  loss_fn = make_loss_fn(config)
  data = preference_data(ctx, head='lm', kinds=('unpaired',))
  reference = (ctx.load(config.model.hf_path, head='lm') if config.model.hf_path
               else ctx.initial_model())
  model, reference = reference.trained_and_reference()
  return Algorithm(
      model=model, loss_fn=loss_fn, batches=DataBatches.for_run(ctx, data),
      frozen=None if lora.has_adapters(model.params) else (reference.params, reference.shardings),
      evaluations=sample_evaluations(ctx, model.graphdef, reference=reference.params),
      data_stats=data.stats, tokenizer=ctx.tokenizer)
