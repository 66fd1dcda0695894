"""The trainers' model-facing loss functions: packed SFT and paired reward scoring."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.data.batching import pad_rows
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.algorithms.rm import pair_rewards, rm_loss_fn
from rlhf_jax.models.scoring import last_token_index
from rlhf_jax.algorithms.sft import sft_loss_fn

CONFIG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32)


def model(head='lm'):
  return Transformer(CONFIG.replace(head=head), rngs=nnx.Rngs(0))


def piece(ids, prompt_len):
  ids = np.asarray(ids, np.int32)
  return ids, (np.arange(len(ids)) >= prompt_len).astype(np.int32)


def test_packed_sft_loss_equals_the_loss_of_separate_rows():
  """Packing changes nothing: no attention across examples, positions restart, and the first
  token of the second example is not scored from the last token of the first."""
  first, second = piece([5, 6, 7, 8, 9], 2), piece([10, 11, 12, 13], 1)
  separate = pad_rows([[first], [second]], 12, pad_id=0)
  packed = pad_rows([[first, second]], 12, pad_id=0, packed=True)
  lm = model()
  jitted = nnx.jit(lambda lm, batch: sft_loss_fn(lm, batch, None, normalize='token',
                                                 chunk_size=4)[0])
  loss = lambda batch: jitted(lm, {k: jnp.asarray(v) for k, v in batch.items()})
  assert float(loss(packed)) == pytest.approx(float(loss(separate)), rel=1e-5)
  # With packing ignored (no segment ids), the scores differ: the test can fail.
  leaky = {k: v for k, v in packed.items() if k not in ('segment_ids', 'positions')}
  assert float(loss(leaky)) != pytest.approx(float(loss(separate)), rel=1e-5)


def test_last_token_index_left_and_right_padding():
  mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(last_token_index(mask), [2, 4, 4])


def test_pair_rewards_read_the_scalar_head_at_each_sequence_end():
  rm = model('scalar')
  chosen = pad_rows([[piece([1, 2, 3, 4], 2)], [piece([1, 2, 5], 2)]], 6, pad_id=0)
  rejected = pad_rows([[piece([1, 2, 6, 7, 8], 2)], [piece([1, 9], 1)]], 6, pad_id=0)
  batch = {k: jnp.stack([chosen[k], rejected[k]], axis=1) for k in ('tokens', 'attention_mask')}
  r_chosen, r_rejected = nnx.jit(pair_rewards)(rm, batch)
  score = nnx.jit(lambda rm, tokens, mask: rm(tokens, attention_mask=mask))
  for rows, rewards in ((chosen, r_chosen), (rejected, r_rejected)):
    values = score(rm, jnp.asarray(rows['tokens']), jnp.asarray(rows['attention_mask']))
    ends = rows['attention_mask'].sum(-1) - 1
    np.testing.assert_allclose(rewards, values[np.arange(2), ends], rtol=1e-5, atol=1e-6)
  loss, metrics = nnx.jit(lambda rm, batch: rm_loss_fn(rm, batch, None, center_coef=0.0))(
      rm, batch)
  gap = np.asarray(r_chosen - r_rejected)
  assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-gap))), rel=1e-5)
  assert float(metrics['accuracy']) == pytest.approx(np.mean(gap > 0))
