"""SFT, preference and text examples: read from JSONL, validated, each tagged with its origin.

Accepted forms of one example (a JSON object; other keys are ignored):

  sft         {"prompt": str | messages, "response": str}
              {"prompt": str | messages, "completion": completion}   TRL's prompt-completion
                                       form, standard or conversational (below)
              {"messages": messages}   the last message is the assistant's response, the rest
                                       (system/user/assistant/tool turns) is the prompt
  preference  {"prompt": str | messages, "chosen": completion, "rejected": completion}
                                       completion = str, or a list of one assistant message
              {"chosen": messages, "rejected": messages}   TRL's implicit prompt: two whole
                                       conversations that share every turn but the last, which
                                       is the assistant's; the shared turns are the prompt
  unpaired    {"prompt": str | messages, "completion": completion, "label": bool}
                                       TRL's unpaired preference form (KTO): the completion is
                                       desirable (true) or undesirable (false)
  text        {"text": str}            a document, for pretraining
  prompt      {"prompt": str | messages} or {"messages": messages}   an RL prompt; a
                                       conversation's last assistant message, if any, is
                                       dropped (so SFT and preference files serve as prompts)

messages = [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...] (a `tool`
turn needs a chat template that renders it); a prompt given as a string is one user message.
`field_map` (config.data.field_map) maps our field names (prompt, response, completion,
messages, chosen, rejected, label, text) to the file's, e.g. {'response': 'answer'}.

Every problem raises `InvalidExample`, whose message names the file and line, e.g.
`data/train.jsonl:17: missing key "response" (keys: prompt, answer)`, and whose `reason` is a
short key for counting. Nothing is dropped or changed silently: `skip_invalid` skips invalid
examples but counts them by reason and logs each one.
"""

import collections
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, NamedTuple

from absl import logging

from rlhf_jax.errors import InputError, NotFound

ROLES = ('system', 'user', 'assistant', 'tool')
FIELDS = {'sft': ('prompt', 'response', 'completion', 'messages'),
          'preference': ('prompt', 'chosen', 'rejected'),
          'unpaired': ('prompt', 'completion', 'label'), 'text': ('text',),
          'prompt': ('prompt', 'messages')}
Kind = Literal['sft', 'preference', 'unpaired', 'text', 'prompt']


@dataclasses.dataclass(frozen=True)
class Origin:
  """Where an example comes from: a file and its 1-based line, or a TFDS split and its index."""
  path: str
  line: int

  def __str__(self):
    return f'{self.path}:{self.line}'


class InvalidExample(InputError):
  """An example that cannot be used; `reason` is a short key such as 'missing_key'."""

  def __init__(self, origin: Origin, reason: str, detail: str):
    super().__init__(f'{origin}: {detail}')
    self.origin, self.reason, self.detail = origin, reason, detail

  def __reduce__(self):  # Picklable across worker processes despite the custom __init__.
    return type(self), (self.origin, self.reason, self.detail)


class Message(NamedTuple):
  role: str
  content: str


Messages = tuple[Message, ...]
Prompt = str | Messages  # A string is one user message.


def prompt_messages(prompt: Prompt) -> Messages:
  return (Message('user', prompt),) if isinstance(prompt, str) else prompt


@dataclasses.dataclass(frozen=True)
class SFTRecord:
  prompt: Messages
  response: str
  origin: Origin


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
  prompt: Messages
  chosen: str
  rejected: str
  origin: Origin


@dataclasses.dataclass(frozen=True)
class UnpairedRecord:
  prompt: Messages
  completion: str
  desirable: bool
  origin: Origin


@dataclasses.dataclass(frozen=True)
class TextRecord:
  text: str
  origin: Origin


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  prompt: Messages
  origin: Origin


Record = SFTRecord | PreferenceRecord | UnpairedRecord | TextRecord | PromptRecord


@dataclasses.dataclass
class Records:
  """The valid records, in source order, and how many invalid ones were skipped, by reason."""
  records: list[Record]
  skipped: collections.Counter


def parse_record(obj, kind: Kind, origin: Origin,
                 field_map: Mapping[str, str] | None = None) -> Record:
  """One example (a decoded JSON object or TFDS example) → a record, or InvalidExample."""
  if kind not in FIELDS:
    raise InputError(f'kind={kind!r}; choose one of {", ".join(FIELDS)}.')
  field_map = dict(field_map or {})
  unknown = set(field_map) - set(FIELDS[kind])
  if unknown:
    raise InputError(f'field_map has unknown {kind} fields {sorted(unknown)}; '
                     f'expected some of {", ".join(FIELDS[kind])}.')
  if not isinstance(obj, dict):
    raise InvalidExample(origin, 'not_an_object',
                         f'expected a JSON object, got {type(obj).__name__}')
  fields = _Fields(obj, field_map, origin)
  return {'sft': _parse_sft, 'preference': _parse_preference, 'unpaired': _parse_unpaired,
          'text': _parse_text, 'prompt': _parse_prompt}[kind](fields)


def read_jsonl(path: str | os.PathLike, kind: Kind, *, skip_invalid: bool = False,
               field_map: Mapping[str, str] | None = None) -> Records:
  """Records from a JSONL file: one JSON object a line, UTF-8; blank lines are skipped."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise NotFound(f'JSONL file {path!r} does not exist.')
  with open(path, 'rb') as f:  # Bytes, so invalid UTF-8 is reported with its own line number.
    parsers = (functools.partial(_parse_line, raw, kind, Origin(path, number), field_map)
               for number, raw in enumerate(f, start=1))
    records = collect(parsers, source=path, skip_invalid=skip_invalid)
  if not records.records and not records.skipped:
    raise InputError(f'JSONL file {path!r} is empty: it holds no example, one JSON object a '
                     'line.')
  return records


def collect(parsers: Iterable[Callable[[], Record | None]], *, source: str,
            skip_invalid: bool) -> Records:
  """Runs each parser in turn; None (a blank line) is no record, InvalidExample is raised or,
  with `skip_invalid`, logged and counted by reason."""
  records, skipped = [], collections.Counter()
  for parse in parsers:
    try:
      record = parse()
    except InvalidExample as e:
      if not skip_invalid:
        raise
      skipped[e.reason] += 1
      logging.warning('Skipping invalid example %s', e)
      continue
    if record is not None:
      records.append(record)
  if skipped:
    logging.warning('%s: kept %d examples, skipped %d invalid ones: %s', source, len(records),
                    skipped.total(), dict(skipped))
  return Records(records, skipped)


def _parse_line(raw: bytes, kind: Kind, origin: Origin,
                field_map: Mapping[str, str] | None) -> Record | None:
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise InvalidExample(origin, 'invalid_utf8',
                         f'invalid UTF-8 at byte {e.start}: {raw[e.start:e.end]!r}') from None
  if not text.strip():
    return None
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise InvalidExample(origin, 'malformed_json',
                         f'malformed JSON: {e.msg} (column {e.colno})') from None
  return parse_record(obj, kind, origin, field_map)


class _Fields:
  """Reads one example's fields by our names, through `field_map`, naming the file's keys."""

  def __init__(self, obj: dict, field_map: dict[str, str], origin: Origin):
    self.obj, self.field_map, self.origin = obj, field_map, origin

  def key(self, name: str) -> str:
    return self.field_map.get(name, name)

  def has(self, name: str) -> bool:
    return self.key(name) in self.obj

  def get(self, name: str):
    if not self.has(name):
      raise self.invalid('missing_key',
                         f'missing key "{self.key(name)}" (keys: {", ".join(self.obj)})')
    return self.obj[self.key(name)]

  def invalid(self, reason: str, detail: str) -> InvalidExample:
    return InvalidExample(self.origin, reason, detail)

  def typed(self, name: str, types: type | tuple[type, ...], what: str):
    value = self.get(name)
    if not isinstance(value, types):
      raise self.invalid('wrong_type',
                         f'"{self.key(name)}" must be {what}, got {type(value).__name__}')
    return value

  def messages(self, name: str) -> Messages:
    value = self.typed(name, list, 'a list of {"role", "content"} messages')
    return tuple(self._message(m, f'{self.key(name)}[{i}]') for i, m in enumerate(value))

  def _message(self, value, where: str) -> Message:
    if not isinstance(value, dict):
      raise self.invalid('wrong_type', f'"{where}" must be an object, got '
                         f'{type(value).__name__}')
    for name in ('role', 'content'):
      if name not in value:
        raise self.invalid('missing_key',
                           f'"{where}" has no "{name}" (keys: {", ".join(value)})')
      if not isinstance(value[name], str):
        raise self.invalid('wrong_type', f'"{where}.{name}" must be a string, got '
                           f'{type(value[name]).__name__}')
    if value['role'] not in ROLES:
      raise self.invalid('unknown_role', f'"{where}" has unknown role "{value["role"]}" '
                         f'(expected {", ".join(ROLES)})')
    return Message(value['role'], value['content'])

  def prompt(self) -> Messages:
    """A string is one user message."""
    value = self.typed('prompt', (str, list), 'a string or a list of messages')
    return (Message('user', value),) if isinstance(value, str) else self.messages('prompt')

  def conversation(self, name: str) -> tuple[Messages, str]:
    """Messages that end with the assistant's → (the turns before it, its content)."""
    messages = self.messages(name)
    if not messages or messages[-1].role != 'assistant':
      last = messages[-1].role if messages else 'none, the list is empty'
      raise self.invalid('no_assistant_response', f'"{self.key(name)}" must end with an '
                         f'assistant message (last role: {last})')
    return messages[:-1], self.nonempty(name, messages[-1].content)

  def completion(self, name: str) -> str:
    """A string, or a list of exactly one assistant message."""
    value = self.typed(name, (str, list), 'a string or a list of one assistant message')
    if isinstance(value, str):
      return self.nonempty(name, value)
    before, content = self.conversation(name)
    if before:
      raise self.invalid('wrong_type', f'"{self.key(name)}" must be one assistant message when '
                         f'"{self.key("prompt")}" is given, got {len(before) + 1} messages')
    return content

  def nonempty(self, name: str, text: str, reason: str = 'empty_response') -> str:
    if not text.strip():
      raise self.invalid(reason, f'empty "{self.key(name)}"')
    return text


def _parse_sft(fields: _Fields) -> SFTRecord:
  if fields.has('messages'):
    prompt, response = fields.conversation('messages')
  elif fields.has('completion') and not fields.has('response'):
    prompt, response = fields.prompt(), fields.completion('completion')
  else:
    prompt = fields.prompt()
    response = fields.nonempty('response', fields.typed('response', str, 'a string'))
  return SFTRecord(prompt, response, fields.origin)


def _parse_preference(fields: _Fields) -> PreferenceRecord:
  if fields.has('prompt') or not isinstance(fields.get('chosen'), list):
    prompt = fields.prompt()
    chosen, rejected = fields.completion('chosen'), fields.completion('rejected')
  else:  # Implicit prompt: the turns that the two conversations share.
    prompt, chosen = fields.conversation('chosen')
    rejected_prompt, rejected = fields.conversation('rejected')
    if rejected_prompt != prompt:
      raise fields.invalid('prompt_mismatch', f'"{fields.key("chosen")}" and '
                           f'"{fields.key("rejected")}" differ before their last message, so '
                           'they share no prompt')
  if chosen == rejected:
    raise fields.invalid('identical_responses', f'"{fields.key("chosen")}" and '
                         f'"{fields.key("rejected")}" are identical')
  return PreferenceRecord(prompt, chosen, rejected, fields.origin)


def _parse_unpaired(fields: _Fields) -> UnpairedRecord:
  label = fields.typed('label', bool, 'true (desirable) or false (undesirable)')
  return UnpairedRecord(fields.prompt(), fields.completion('completion'), label, fields.origin)


def _parse_text(fields: _Fields) -> TextRecord:
  return TextRecord(fields.nonempty('text', fields.typed('text', str, 'a string'), 'empty_text'),
                    fields.origin)


def _parse_prompt(fields: _Fields) -> PromptRecord:
  if fields.has('prompt') or not fields.has('messages'):
    return PromptRecord(fields.prompt(), fields.origin)
  messages = fields.messages('messages')
  if messages and messages[-1].role == 'assistant':
    messages = messages[:-1]
  if not messages:
    raise fields.invalid('empty_prompt', f'"{fields.key("messages")}" holds no prompt turn')
  return PromptRecord(messages, fields.origin)
