"""A tiny word-level tokenizer (one token per word) and a JSONL writer, for the data tests."""

import json
import pathlib

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIAL_TOKENS = ('<unk>', '<pad>', '<s>', '<|end|>', '<|system|>', '<|user|>', '<|assistant|>')
# Words p0…p19 (prompts), r0…r19 (responses) and a few others; every word is one token.
WORDS = tuple(f'p{i}' for i in range(20)) + tuple(f'r{i}' for i in range(20)) + tuple(
    'hello world how are you fine thanks be brief'.split())
# Each turn is <|role|>content<|end|>; <|end|> is EOS, so an assistant turn ends with EOS.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer(directory: pathlib.Path, *, chat_template: str | None = CHAT_TEMPLATE,
                   bos: bool = True) -> transformers.PreTrainedTokenizerBase:
  """Saved to `directory` and reloaded with AutoTokenizer, as a real tokenizer would be."""
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
  word_level = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  word_level.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=word_level, unk_token='<unk>', pad_token='<pad>', eos_token='<|end|>',
      bos_token='<s>' if bos else None, chat_template=chat_template,
      additional_special_tokens=list(SPECIAL_TOKENS[4:]))
  tokenizer.save_pretrained(directory)
  return transformers.AutoTokenizer.from_pretrained(directory)


def write_jsonl(path: pathlib.Path, lines) -> pathlib.Path:
  """One line per item: a dict or list is JSON-encoded, a str is written as is (UTF-8), and
  bytes are written raw (e.g. invalid UTF-8)."""
  with open(path, 'wb') as f:
    for line in lines:
      if isinstance(line, (dict, list)):
        line = json.dumps(line, ensure_ascii=False)
      f.write((line.encode() if isinstance(line, str) else line) + b'\n')
  return path
