"""Tokenizers from local Hugging Face tokenizer directories."""

import os

import transformers

from rlhf_jax.errors import NotFound


def load_tokenizer(path: str, *, key: str = 'config.data.tokenizer'
                   ) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer saved in the local directory `path` (`key` names where it was set)."""
  if not os.path.isdir(path):
    raise NotFound(f'{key}={path!r}: no such tokenizer directory (give a local '
                            'Hugging Face tokenizer directory, or "playground").')
  return transformers.AutoTokenizer.from_pretrained(path)
