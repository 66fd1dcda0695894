"""Teacher reward model: against a direct forward pass, padding-free, seeded, standardised, HF."""

import numpy as np
import pytest
from flax import nnx

from rlhf_jax import parallel
from rlhf_jax.playground import tasks
from rlhf_jax.playground.tokenizer import build_playground_tokenizer
from rlhf_jax.rewards import model as teacher_module
from rlhf_jax.rewards.model import ModelReward
from rlhf_jax.models import ModelConfig, Transformer, save_hf

CONFIG = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                     max_position=64)
SHAPE = dict(seq_len=48, max_prompt_len=24, batch_size=8, rules=parallel.DEFAULT_RULES)


@pytest.fixture(scope='module')
def tokenizer():
  return build_playground_tokenizer(num_documents=200)


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh({'data': -1})


@pytest.fixture(scope='module')
def pairs():
  """Varied playground answers: the reference and a graded corruption of each prompt."""
  prompts = tasks.sample_prompts(0, 'eval', 12)
  rng = np.random.default_rng(0)
  responses = [tasks.reference(p) for p in prompts]
  responses += [tasks.corrupt(p, rng) for p in prompts]
  return prompts + prompts, responses


@pytest.fixture(scope='module')
def teacher(tokenizer, mesh):
  return ModelReward.random(CONFIG, tokenizer, seed=0, mesh=mesh, **SHAPE)


def test_reward_is_the_full_forward_value_at_the_last_token(teacher, tokenizer, pairs):
  forward = nnx.jit(lambda model, tokens: model(tokens))
  for prompt, response in zip(pairs[0][::13], pairs[1][::13]):  # A sort and an add answer.
    # The playground chat template written out by hand; the response ends with <|end|>.
    ids = tokenizer.encode(f'<|user|>{prompt}<|end|><|assistant|>{response}<|end|>',
                           add_special_tokens=False)
    values_1xT = forward(teacher.model, np.array([ids]))
    assert values_1xT.shape == (1, len(ids))
    np.testing.assert_allclose(teacher([prompt], [response]), [values_1xT[0, -1]], rtol=1e-5,
                               atol=1e-6)


def test_rewards_do_not_depend_on_batch_or_padding(teacher, pairs):
  prompts, responses = pairs
  together = teacher(prompts[:13], responses[:13])  # Two batches of 8, the last one filled up.
  compiled = teacher_module._rewards._cache_size()
  assert together.shape == (13,) and together.dtype == np.float64
  alone = [teacher([p], [r])[0] for p, r in zip(prompts[:13], responses[:13])]
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(teacher(prompts[12::-1], responses[12::-1]), together[::-1],
                             rtol=1e-5, atol=1e-6)
  assert teacher_module._rewards._cache_size() == compiled  # No compile for later calls.
  assert teacher([], []).shape == (0,)
  with pytest.raises(ValueError, match='2 prompts but 1 responses'):
    teacher(prompts[:2], responses[:1])


def test_random_teacher_is_seeded_varied_and_standardised(teacher, tokenizer, mesh, pairs):
  raw = teacher(*pairs)
  assert raw.std() > 0.05  # 0.13 here; float noise is ~1e-6.
  reference = (pairs[0][:16], pairs[1][:16])
  raw_reference = teacher(*reference)
  # Same seed: the same parameters, so the standardised teacher is (raw − mean) / std.
  standardised = ModelReward.random(CONFIG, tokenizer, seed=0, mesh=mesh,
                                      standardize_on=reference, **SHAPE)
  np.testing.assert_allclose(standardised(*pairs),
                             (raw - raw_reference.mean()) / raw_reference.std(),
                             rtol=1e-4, atol=1e-5)
  on_reference = standardised(*reference)
  assert on_reference.mean() == pytest.approx(0.0, abs=1e-6)
  assert on_reference.std() == pytest.approx(1.0, rel=1e-6)
  other_seed = ModelReward.random(CONFIG, tokenizer, seed=1, mesh=mesh, **SHAPE)
  assert np.abs(other_seed(*pairs) - raw).max() > 0.1


def test_from_hf_round_trip(teacher, tokenizer, mesh, pairs, tmp_path):
  save_hf(teacher.model, tmp_path / 'teacher', pad_token_id=tokenizer.pad_token_id,
          eos_token_id=tokenizer.eos_token_id)
  loaded = ModelReward.from_hf(tmp_path / 'teacher', tokenizer, mesh=mesh, **SHAPE)
  np.testing.assert_allclose(loaded(*pairs), teacher(*pairs), rtol=1e-6, atol=1e-7)


def test_from_hf_rejects_a_causal_lm(tokenizer, mesh, tmp_path):
  save_hf(Transformer(CONFIG.replace(n_layers=1), rngs=nnx.Rngs(0)), tmp_path / 'lm')
  with pytest.raises(ValueError, match='no score.weight'):
    ModelReward.from_hf(tmp_path / 'lm', tokenizer, mesh=mesh, **SHAPE)
