"""Tiny random transformers models and padded batches for the HF parity tests."""

import numpy as np
import torch
import transformers

VOCAB = 100
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(_LLAMA, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    'llama3': (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(_LLAMA, max_position_embeddings=256,
                    rope_scaling=dict(rope_type='llama3', rope_theta=10_000.0, factor=8.0,
                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=64))),
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(_LLAMA, tie_word_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, head_dim set apart from hidden_size / heads.
    'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(_LLAMA, head_dim=16, tie_word_embeddings=True)),
    'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(_LLAMA, sliding_window=3)),
    'gpt2': (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                  bos_token_id=0, eos_token_id=0)),
    'llama_reward': (transformers.LlamaConfig, transformers.LlamaForSequenceClassification,
                     dict(_LLAMA, num_labels=1, pad_token_id=0)),
}


def tiny_model(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A float32 model with every parameter random (norm scales near 1), in eval mode."""
  config_class, model_class, fields = CONFIGS[kind]
  torch.manual_seed(seed)
  model = model_class(config_class(**fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = p.ndim == 1 and name.endswith('weight')
      p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.2) + (1.0 if is_scale else 0.0))
  return model


def padded_batch(seed: int = 0):
  """Tokens and mask [3, 8]: a left-padded row, a right-padded row and a full row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=(3, 8))
  mask = np.ones((3, 8), np.int64)
  mask[0, :3] = 0
  mask[1, 6:] = 0
  return np.where(mask, tokens, 0), mask


def hf_forward(model, tokens, mask) -> np.ndarray:
  """HF logits with our conventions: positions count real tokens only."""
  tokens, mask = torch.as_tensor(tokens), torch.as_tensor(mask)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions)
  return out.logits.float().numpy()
