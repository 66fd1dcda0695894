"""Records → token ids, with the tokenizer's chat template, EOS and a truncation policy.

With a chat template, the prompt is `apply_chat_template(prompt, add_generation_prompt=True)`
and the response is what the template renders after those ids when the assistant's message is
appended (the prompt ids must be a prefix, else the template cannot be split and we raise). A
response ends at EOS: tokens that a template puts after its last EOS (e.g. the newline after
Qwen's <|im_end|>) are dropped, since generation stops at EOS, and EOS is appended when the
template renders none.

Without a chat template, the prompt is BOS (if the tokenizer has one) + the messages' contents
joined by '\n' (roles are dropped; put any separator wanted between prompt and response in the
data) and the response is its tokens + EOS. Text is encoded with add_special_tokens=False, so
specials come only from the template or from the BOS/EOS named here.

Truncation (`truncation`, config.data.truncation), with L = seq_len and P = max_prompt_len < L:
  'error'                a prompt over P, or a prompt + response over L, is invalid;
  'response'             a prompt over P is invalid; a response keeps its first L − len(prompt)
                         tokens;
  'prompt_and_response'  a prompt over P keeps its last P tokens (so the generation prompt
                         stays); the response is cut as above.
Since P < L, a response always keeps at least one token. A cut response loses its EOS, so the
model is not taught to stop where the cut falls. Preference pairs cut chosen and rejected to
the same budget, and are invalid if that makes them identical.
"""

import dataclasses
from typing import Literal

import transformers

from rlhf_jax.data.records import (InvalidExample, Message, Messages, Origin, PreferenceRecord,
                                   SFTRecord)
from rlhf_jax.errors import InputError

Truncation = Literal['error', 'response', 'prompt_and_response']
TRUNCATIONS = ('error', 'response', 'prompt_and_response')
TRAIN_TURNS = ('all', 'last')
Tokenizer = transformers.PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class EncodedSFT:
  prompt_ids: list[int]
  response_ids: list[int]
  truncated: frozenset[str]  # Which of 'prompt', 'response' were cut.
  # 1 on the prompt's tokens that are trained too: earlier assistant turns (train_turns='all').
  prompt_mask: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class EncodedPreference:
  prompt_ids: list[int]
  chosen_ids: list[int]
  rejected_ids: list[int]
  truncated: frozenset[str]  # Which of 'prompt', 'chosen', 'rejected' were cut.


def encode_prompt(tokenizer: Tokenizer, messages: Messages) -> list[int]:
  """The prompt's ids, ending with the template's generation prompt (see the module doc)."""
  if tokenizer.chat_template:
    return _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))
  bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  return bos + _encode(tokenizer, '\n'.join(m.content for m in messages))


def encode_sft(record: SFTRecord, tokenizer: Tokenizer, *, seq_len: int, max_prompt_len: int,
               truncation: Truncation = 'response', train_turns: str = 'last') -> EncodedSFT:
  """Prompt and response ids that fit `seq_len` together, or InvalidExample.

  train_turns='all' also trains the assistant turns inside the prompt (a multi-turn
  conversation): `prompt_mask` is 1 on each one's tokens, found as the response of the
  conversation up to it; 'last' trains only the response.
  """
  _check_options(seq_len=seq_len, max_prompt_len=max_prompt_len, truncation=truncation,
                 train_turns=train_turns)
  full_prompt = encode_prompt(tokenizer, record.prompt)
  full_response = _response_ids(tokenizer, record.prompt, full_prompt, record.response,
                                record.origin)
  full_mask = (_assistant_turns_mask(tokenizer, record.prompt, full_prompt, record.origin)
               if train_turns == 'all' else [0] * len(full_prompt))
  fit = _Fit(seq_len, max_prompt_len, truncation, record.origin)
  prompt = fit.prompt(full_prompt)
  response = fit.response(full_response, len(prompt), 'response')
  return EncodedSFT(prompt, response, _cut(prompt=(full_prompt, prompt),
                                           response=(full_response, response)),
                    prompt_mask=tuple(full_mask[len(full_prompt) - len(prompt):]))


def _assistant_turns_mask(tokenizer: Tokenizer, prompt: Messages, prompt_ids: list[int],
                          origin: Origin) -> list[int]:
  """1 on the tokens of each assistant turn of `prompt` (its response ids up to EOS)."""
  mask = [0] * len(prompt_ids)
  turns = [i for i, message in enumerate(prompt) if message.role == 'assistant']
  if turns and not tokenizer.chat_template:
    raise InputError(f'{origin}: config.data.train_turns="all" finds the earlier assistant '
                     f'turns through a chat template; tokenizer {tokenizer.name_or_path!r} has '
                     'none. Set config.data.train_turns="last".')
  for i in turns:
    before = encode_prompt(tokenizer, prompt[:i])
    turn = _response_ids(tokenizer, prompt[:i], before, prompt[i].content, origin)
    if prompt_ids[len(before):len(before) + len(turn)] != turn:
      raise InputError(
          f'{origin}: the chat template of tokenizer {tokenizer.name_or_path!r} renders '
          f'assistant turn {i} differently once later turns follow (some templates drop '
          'earlier reasoning), so it cannot be trained as rendered. Set '
          'config.data.train_turns="last".')
    mask[len(before):len(before) + len(turn)] = [1] * len(turn)
  return mask


def encode_preference(record: PreferenceRecord, tokenizer: Tokenizer, *, seq_len: int,
                      max_prompt_len: int,
                      truncation: Truncation = 'response') -> EncodedPreference:
  """Prompt, chosen and rejected ids; prompt + each response fits `seq_len`, or InvalidExample."""
  _check_options(seq_len=seq_len, max_prompt_len=max_prompt_len, truncation=truncation)
  full_prompt = encode_prompt(tokenizer, record.prompt)
  full_chosen, full_rejected = (
      _response_ids(tokenizer, record.prompt, full_prompt, response, record.origin)
      for response in (record.chosen, record.rejected))
  fit = _Fit(seq_len, max_prompt_len, truncation, record.origin)
  prompt = fit.prompt(full_prompt)
  chosen = fit.response(full_chosen, len(prompt), 'chosen')
  rejected = fit.response(full_rejected, len(prompt), 'rejected')
  if chosen == rejected:
    raise InvalidExample(record.origin, 'identical_after_truncation',
                         f'chosen and rejected are identical once encoded and cut to '
                         f'{seq_len - len(prompt)} tokens (config.train.seq_len={seq_len})')
  return EncodedPreference(prompt, chosen, rejected, _cut(
      prompt=(full_prompt, prompt), chosen=(full_chosen, chosen),
      rejected=(full_rejected, rejected)))


def _check_options(*, seq_len: int, max_prompt_len: int, truncation: str,
                   train_turns: str = 'last'):
  if train_turns not in TRAIN_TURNS:
    raise InputError(f'config.data.train_turns={train_turns!r}; choose one of '
                     f'{", ".join(TRAIN_TURNS)}.')
  if truncation not in TRUNCATIONS:
    raise InputError(f'config.data.truncation={truncation!r}; choose one of '
                     f'{", ".join(TRUNCATIONS)}.')
  if not 0 < max_prompt_len < seq_len:
    raise InputError(f'config.data.max_prompt_len={max_prompt_len} must be in [1, '
                     f'config.train.seq_len={seq_len}) so that every response keeps a token.')


def _render(tokenizer: Tokenizer, messages: Messages, *, add_generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template([m._asdict() for m in messages], tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
  return tokenizer.encode(text, add_special_tokens=False)


def _response_ids(tokenizer: Tokenizer, prompt: Messages, prompt_ids: list[int], response: str,
                  origin: Origin) -> list[int]:
  """The response's ids after `prompt_ids`, ending with EOS (see the module doc)."""
  eos = tokenizer.eos_token_id
  if eos is None:
    raise InputError(f'tokenizer {tokenizer.name_or_path!r} has no eos_token_id; responses '
                     'must end with EOS.')
  if not tokenizer.chat_template:
    return _encode(tokenizer, response) + [eos]
  conversation = prompt + (Message('assistant', response),)
  ids = _encode(tokenizer, _render(tokenizer, conversation, add_generation_prompt=False))
  if ids[:len(prompt_ids)] != prompt_ids:
    raise InputError(
        f'{origin}: the chat template of tokenizer {tokenizer.name_or_path!r} does not render '
        'the prompt (with add_generation_prompt=True) as a prefix of prompt + assistant '
        'message, so the response ids cannot be split off.')
  ids = ids[len(prompt_ids):]
  if eos not in ids:
    return ids + [eos]
  return ids[:len(ids) - ids[::-1].index(eos)]


@dataclasses.dataclass(frozen=True)
class _Fit:
  """The truncation policy for one example (see the module doc)."""
  seq_len: int
  max_prompt_len: int
  truncation: Truncation
  origin: Origin

  def prompt(self, ids: list[int]) -> list[int]:
    if len(ids) <= self.max_prompt_len:
      return ids
    if self.truncation == 'prompt_and_response':
      return ids[-self.max_prompt_len:]
    raise InvalidExample(self.origin, 'prompt_too_long',
                         f'prompt has {len(ids)} tokens > config.data.max_prompt_len='
                         f'{self.max_prompt_len} (config.data.truncation={self.truncation!r})')

  def response(self, ids: list[int], prompt_len: int, name: str) -> list[int]:
    budget = self.seq_len - prompt_len
    if len(ids) <= budget:
      return ids
    if self.truncation == 'error':
      raise InvalidExample(self.origin, 'too_long',
                           f'prompt + {name} have {prompt_len} + {len(ids)} tokens > '
                           f'config.train.seq_len={self.seq_len} '
                           f'(config.data.truncation={self.truncation!r})')
    return ids[:budget]


def _cut(**full_and_kept: tuple[list[int], list[int]]) -> frozenset[str]:
  return frozenset(name for name, (full, kept) in full_and_kept.items() if len(kept) < len(full))
