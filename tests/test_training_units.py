"""Optimizer schedules, model bookkeeping and config plumbing."""

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import Transformer
from rlhf_jax.models.presets import PRESETS, get_preset
from rlhf_jax.config import base_config, model_config_dict, to_model_config
from rlhf_jax.engine.optimizer import make_optimizer, make_schedule


def optim(**overrides):
  o = base_config().optim
  o.update(overrides)
  return o


def test_warmup_cosine_schedule_values():
  s = make_schedule(optim(lr=1.0, warmup_steps=10, final_lr_fraction=0.1), total_steps=110)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  # Halfway through the cosine: lr_final + (lr - lr_final)·(1 + cos(π/2))/2.
  assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
  assert float(s(110)) == pytest.approx(0.1, abs=1e-6)


def test_warmup_stable_decay_schedule_values():
  s = make_schedule(optim(lr=2.0, warmup_steps=10, schedule='warmup_stable_decay',
                          decay_fraction=0.2, final_lr_fraction=0.0), total_steps=100)
  assert float(s(10)) == pytest.approx(2.0)
  assert float(s(79)) == pytest.approx(2.0)  # Stable until the last 20 steps.
  assert float(s(90)) == pytest.approx(1.0)  # Linear decay, halfway.
  assert float(s(100)) == pytest.approx(0.0, abs=1e-6)


def test_bad_schedule_and_optimizer_names_name_the_key():
  with pytest.raises(ValueError, match='config.optim.schedule'):
    make_schedule(optim(schedule='linear'), 10)
  with pytest.raises(ValueError, match='config.optim.name'):
    make_optimizer(optim(name='sgd'), 10)


def test_weight_decay_skips_vectors():
  opt, _ = make_optimizer(optim(lr=1.0, warmup_steps=0, schedule='constant', weight_decay=0.5,
                                grad_clip_norm=0.0), 10)
  params = {'kernel': np.ones((2, 2), np.float32), 'scale': np.ones((2,), np.float32)}
  grads = jax.tree.map(np.zeros_like, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.5)  # −lr·wd·p with zero gradient.
  np.testing.assert_allclose(updates['scale'], 0.0)


def test_num_params_counts_the_real_parameters():
  tiny = get_preset('tiny')
  gpt2_like = tiny.replace(norm='layer', position='learned', mlp='gelu', qkv_bias=True,
                           out_bias=True, tie_embeddings=True)
  for cfg in [tiny, gpt2_like, tiny.replace(head='scalar')]:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == cfg.num_params()


def test_published_sizes_of_presets():
  # GPT-2 small: 124,439,808 parameters; Qwen2-0.5B: 494,032,768 (their model cards).
  assert PRESETS['gpt2'].num_params() == 124_439_808
  assert PRESETS['qwen2-0.5b'].num_params() == 494_032_768


def test_model_config_roundtrip_and_bad_field():
  c = model_config_dict('tiny', d_model=32)
  assert to_model_config(c) == get_preset('tiny').replace(d_model=32)
  c.sliding_window = 8  # A None field can still be set (placeholder typed int).
  assert to_model_config(c).sliding_window == 8
  with pytest.raises(ValueError, match='preset'):
    get_preset('nope')
