"""The playground's tokenizer: a byte-level BPE (every string encodes, nothing is unknown)
trained with the `tokenizers` library on generated playground text, with a chat template, saved
as an ordinary `transformers` tokenizer directory. Building it is deterministic, so every stage
of a pipeline (pretrain, SFT, RM, …) that builds it gets the same ids.
"""

import os
import pathlib

import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rlhf_jax.playground import tasks

SPECIAL_TOKENS = ('<|pad|>', '<|end|>', '<|system|>', '<|user|>', '<|assistant|>')
# Each turn is <|role|>content<|end|>; <|end|> is also EOS, so a response ends where its turn does.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_playground_tokenizer(vocab_size: int = 512, *, seed: int = 0,
                               num_documents: int = 4000) -> transformers.PreTrainedTokenizerFast:
  """Byte-level BPE with `vocab_size` entries (specials included) on the playground's text."""
  rng = np.random.default_rng([seed, 7])
  corpus = [tasks.pretraining_document(rng) for _ in range(num_documents)]
  for prompt in tasks.sample_prompts(seed, 'train', num_documents):
    corpus += [prompt, tasks.reference(prompt), tasks.corrupt(prompt, rng)]
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  bpe.train_from_iterator(corpus, trainer)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, pad_token='<|pad|>', eos_token='<|end|>',
      additional_special_tokens=list(SPECIAL_TOKENS[2:]), chat_template=CHAT_TEMPLATE)


def saved_tokenizer(cache_dir: str | os.PathLike, *, vocab_size: int = 512, seed: int = 0) -> str:
  """The directory of the playground tokenizer in `cache_dir`, built there once."""
  path = pathlib.Path(cache_dir) / 'tokenizer'
  if not (path / 'tokenizer.json').exists():
    build_playground_tokenizer(vocab_size, seed=seed).save_pretrained(path)
  return str(path)
