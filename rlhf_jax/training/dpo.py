"""Direct preference optimisation and its family: a policy trained on preference pairs.

Batches are [B, 2, T] pairs, as for reward models; chosen and rejected go through the policy in
one [2B, T] forward, and their response log-probs are summed per sequence (`sequence_logps`,
chunked, never float32 [B, T, V] logits). The reference is the initial policy (the SFT model of
`config.model.hf_path`). Its log-probs come either
  - on the fly, from a frozen copy on the same mesh, inside the jitted step, or
  - precomputed (`config.loss.precompute_ref=True`): once over the whole dataset before
    training, stored in `<workdir>/reference_logps.npz` and attached to the batches, so the
    reference never sits in memory while training.
Reference-free losses (SimPO, ORPO) need neither.
"""

import functools
import io
import os

import jax
import numpy as np
from flax import nnx

from rlhf_jax.data.batching import pad_pairs
from rlhf_jax.parallel import map_batches
from rlhf_jax.losses import dpo_loss
from rlhf_jax.losses.dpo import LOSS_TYPES, REFERENCE_FREE, VARIANT_ARGS
from rlhf_jax.storage import exists, open_file, replace_file
from rlhf_jax.training import loop
from rlhf_jax.training.algorithm import Algorithm
from rlhf_jax.training.pairs import preference_data
from rlhf_jax.training.scoring import sequence_logps
from rlhf_jax.training.sft import sample_evaluations

def pair_logps(model, batch, *, chunk_size: int):
  """(log π(response) [B, 2], response lengths [B, 2]) of a [B, 2, T] pair batch."""
  b, _, t = batch['tokens'].shape
  flat = [batch[k].reshape(2 * b, t) for k in ('tokens', 'attention_mask', 'loss_mask')]
  logps, lengths = sequence_logps(model, *flat, chunk_size=chunk_size)
  return logps.reshape(b, 2), lengths.reshape(b, 2)


def dpo_loss_fn(model, batch, rng=None, frozen=None, *, loss_options: dict, chunk_size: int):
  """The policy's pair log-probs against the reference's, into `dpo_loss`.

  The reference's log-probs are batch['ref_logps'] when precomputed, else computed here from
  `frozen`, the reference's parameters (the policy's architecture); neither for a
  reference-free loss.
  """
  del rng  # Deterministic loss.
  policy, lengths = pair_logps(model, batch, chunk_size=chunk_size)
  ref_chosen = ref_rejected = None
  if 'ref_logps' in batch:
    ref_chosen, ref_rejected = batch['ref_logps'][:, 0], batch['ref_logps'][:, 1]
  elif frozen is not None:
    reference = nnx.merge(nnx.graphdef(model), frozen)
    ref = jax.lax.stop_gradient(pair_logps(reference, batch, chunk_size=chunk_size)[0])
    ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
  return dpo_loss(policy[:, 0], policy[:, 1], ref_chosen, ref_rejected,
                  chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], **loss_options)


def loss_options(loss) -> dict:
  """dpo_loss's options from config.loss: beta, loss_type, label_smoothing, variant args."""
  if loss.loss_type not in LOSS_TYPES:
    raise ValueError(f'config.loss.loss_type={loss.loss_type!r}; choose from {LOSS_TYPES}.')
  return dict(beta=loss.beta, loss_type=loss.loss_type, label_smoothing=loss.label_smoothing,
              **{name: loss[name] for name in VARIANT_ARGS.get(loss.loss_type, ())})


def make_algorithm(config, workdir: str) -> Algorithm:
  if config.model.head != 'lm':
    raise ValueError(f'DPO trains a policy: config.model.head must be "lm", got '
                     f'{config.model.head!r}.')
  tokenizer, gold, data = preference_data(config, workdir)
  chunk_size = config.train.logprob_chunk_size
  loss_fn = functools.partial(dpo_loss_fn, loss_options=loss_options(config.loss),
                              chunk_size=chunk_size)
  reference = functools.partial(reference_params, config)
  needs_reference = config.loss.loss_type not in REFERENCE_FREE
  precompute = needs_reference and config.loss.precompute_ref
  return Algorithm(
      loss_fn=loss_fn, data=data, tokenizer=tokenizer, data_stats=data.stats,
      make_evaluations=sample_evaluations(config, workdir, tokenizer, gold=gold,
                                          make_reference=lambda mesh: reference(mesh)[0]),
      make_frozen=reference if needs_reference and not precompute else None,
      prepare=(functools.partial(attach_reference_logps, config, workdir, data)
               if precompute else None))


def reference_params(config, mesh):
  """(parameters, shardings) of the initial policy, built or loaded on the mesh."""
  _, params, shardings = loop.build_model(config, mesh)
  return params, shardings


def attach_reference_logps(config, workdir: str, data, mesh) -> None:
  """Reference log-probs of every pair, computed once (or read back), attached to the data."""
  path = os.path.join(workdir, 'reference_logps.npz')
  if exists(path):
    with open_file(path, 'rb') as f, np.load(f) as stored:
      values = {split: stored[split] for split in stored.files}
  else:
    graphdef, params, _ = loop.build_model(config, mesh)
    score = jax.jit(lambda params, batch: pair_logps(
        nnx.merge(graphdef, params), batch, chunk_size=config.train.logprob_chunk_size)[0])
    values = {}
    for split in ('train', 'eval'):
      pairs = pad_pairs(data.examples(split), config.train.seq_len,
                        pad_id=data.shape.pad_id)
      values[split] = map_batches(functools.partial(score, params), pairs,
                                  batch_size=config.train.batch_size, mesh=mesh,
                                  rules=config.sharding_rules)
    del params  # The reference is not needed again.
    if jax.process_index() == 0:
      buffer = io.BytesIO()
      np.savez(buffer, **values)
      replace_file(path, buffer.getvalue())
  data.attach('ref_logps', values)
