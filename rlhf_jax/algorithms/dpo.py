"""Direct preference optimisation and its family: a policy trained on preference pairs.

Batches are [B, 2, T] pairs, as for reward models; chosen and rejected go through the policy in
one [2B, T] forward, and their response log-probs are summed per sequence (`sequence_logps`,
chunked, never float32 [B, T, V] logits). The reference is the initial policy (the SFT model of
`config.model.hf_path`). Its log-probs come either
  - on the fly, from a frozen copy on the same mesh, inside the jitted step, or
  - precomputed (`config.loss.precompute_ref=True`): once over the whole dataset before
    training, stored in `<workdir>/reference_logps.npz` and attached to the batches, so the
    reference never sits in memory while training.
Reference-free losses (SimPO, ORPO) need neither. The reference is read from disk once: the
trained policy starts as a copy of it, and evaluations (win rate, KL) use it where it sits. A
LoRA policy (config.model.lora_rank > 0) is no copy: its reference is its own base with the
adapters switched off.
With precomputed log-probs it is kept on the mesh only when evaluations need it.
"""

import functools
import io
import os

import jax
import numpy as np
from flax import nnx

from rlhf_jax.algorithms.base import Algorithm, DataBatches
from rlhf_jax.algorithms.evaluations import sample_evaluations
from rlhf_jax.algorithms.preferences import preference_data
from rlhf_jax.data.batching import pad_pairs
from rlhf_jax.errors import InputError
from rlhf_jax.losses import dpo_loss
from rlhf_jax.losses.dpo import LOSS_TYPES, REFERENCE_FREE, VARIANT_ARGS
from rlhf_jax.models import lora
from rlhf_jax.models.scoring import sequence_logps
from rlhf_jax.parallel import map_batches
from rlhf_jax.storage import exists, open_file, replace_file


def pair_logps(model, batch, *, chunk_size: int):
  """(log π(response) [B, 2], response lengths [B, 2]) of a [B, 2, T] pair batch."""
  b, _, t = batch['tokens'].shape
  flat = [batch[k].reshape(2 * b, t) for k in ('tokens', 'attention_mask', 'loss_mask')]
  logps, lengths = sequence_logps(model, *flat, chunk_size=chunk_size)
  return logps.reshape(b, 2), lengths.reshape(b, 2)


def dpo_loss_fn(model, batch, rng=None, frozen=None, *, loss_options: dict, chunk_size: int):
  """The policy's pair log-probs against the reference's, into `dpo_loss`.

  The reference's log-probs are batch['ref_logps'] when precomputed, else computed here from
  `frozen`, the reference's parameters (the policy's architecture), or, for a LoRA policy,
  from its base with the adapters switched off; neither for a reference-free loss.
  """
  del rng  # Deterministic loss.
  policy, lengths = pair_logps(model, batch, chunk_size=chunk_size)
  ref_chosen = ref_rejected = None
  needs_reference = loss_options['loss_type'] not in REFERENCE_FREE
  if 'ref_logps' in batch:
    ref_chosen, ref_rejected = batch['ref_logps'][:, 0], batch['ref_logps'][:, 1]
  elif frozen is not None or (needs_reference and lora.has_adapters(model)):
    reference = lora.reference_model(model, frozen)
    ref = jax.lax.stop_gradient(pair_logps(reference, batch, chunk_size=chunk_size)[0])
    ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
  return dpo_loss(policy[:, 0], policy[:, 1], ref_chosen, ref_rejected,
                  chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], **loss_options)


def loss_options(loss) -> dict:
  """dpo_loss's options from config.loss: beta, loss_type, label_smoothing, variant args."""
  if loss.loss_type not in LOSS_TYPES:
    raise InputError(f'config.loss.loss_type={loss.loss_type!r}; choose from {LOSS_TYPES}.')
  return dict(beta=loss.beta, loss_type=loss.loss_type, label_smoothing=loss.label_smoothing,
              **{name: loss[name] for name in VARIANT_ARGS.get(loss.loss_type, ())})


def make_loss_fn(config):
  """dpo_loss_fn with config.loss's options and config.train.logprob_chunk_size."""
  return functools.partial(dpo_loss_fn, loss_options=loss_options(config.loss),
                           chunk_size=config.train.logprob_chunk_size)


def make_algorithm(ctx) -> Algorithm:
  config = ctx.config
  data = preference_data(ctx, head='lm')
  needs_reference = config.loss.loss_type not in REFERENCE_FREE
  evaluated = ctx.gold is not None  # Sample evaluations measure win rate and KL against it.
  precompute = needs_reference and config.loss.precompute_ref
  on_mesh = (needs_reference and not precompute) or evaluated  # The reference, while training.
  reference = None
  if needs_reference or evaluated:
    reference = (ctx.load(config.model.hf_path, head='lm') if config.model.hf_path
                 else ctx.initial_model())
  if precompute:
    attach_reference_logps(ctx, data, reference)
  if reference is not None:  # A LoRA policy's reference is its own base: no copy.
    model, reference = reference.trained_and_reference()
  else:
    model = ctx.initial_model()
  adapters = lora.has_adapters(model.params)
  if not on_mesh:  # Its log-probs are computed: only the trained copy stays.
    ctx.release(config.model.hf_path, head='lm')
    reference = None
  return Algorithm(
      model=model, loss_fn=make_loss_fn(config), batches=DataBatches.for_run(ctx, data),
      frozen=((reference.params, reference.shardings)
              if needs_reference and not precompute and not adapters else None),
      evaluations=sample_evaluations(ctx, model.graphdef,
                                     reference=reference.params if evaluated else None),
      data_stats=data.stats, tokenizer=ctx.tokenizer)


def attach_reference_logps(ctx, data, reference) -> None:
  """Reference log-probs of every pair, computed once (or read back), attached to the data."""
  config = ctx.config
  path = os.path.join(ctx.workdir, 'reference_logps.npz')
  if exists(path):
    with open_file(path, 'rb') as f, np.load(f) as stored:
      values = {split: stored[split] for split in stored.files}
  else:
    score = jax.jit(lambda params, batch: pair_logps(
        nnx.merge(reference.graphdef, params), batch,
        chunk_size=config.train.logprob_chunk_size)[0])
    values, block = {}, 64 * config.train.batch_size  # Pairs padded at a time.
    for split in ('train', 'eval'):
      examples = data.examples(split)
      values[split] = np.concatenate([map_batches(
          functools.partial(score, reference.params),
          pad_pairs([examples[i] for i in range(start, min(start + block, len(examples)))],
                    config.train.seq_len, pad_id=data.shape.pad_id),
          batch_size=config.train.batch_size, mesh=ctx.mesh, rules=ctx.rules)
          for start in range(0, len(examples), block)])
    if jax.process_index() == 0:
      buffer = io.BytesIO()
      np.savez(buffer, **values)
      replace_file(path, buffer.getvalue())
  data.attach('ref_logps', values)
