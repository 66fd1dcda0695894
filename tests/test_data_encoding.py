"""Encoding records to token ids: chat template or plain text, EOS, and each truncation policy.

The tokenizer is word-level (one token per word), so every expected id list is written out by
hand as tokens.
"""

from unittest import mock

import pytest
from data_fixtures import CHAT_TEMPLATE, tiny_tokenizer, write_jsonl

from rlhf_jax.data.encoding import encode_preference, encode_prompt, encode_sft
from rlhf_jax.data.records import InvalidExample, Message, read_jsonl

PROMPT_6 = 'p0 p1 p2 p3 p4 p5'
RESPONSE_4 = 'r0 r1 r2 r3'


@pytest.fixture(scope='module')
def templated(tmp_path_factory):
  return tiny_tokenizer(tmp_path_factory.mktemp('templated'))


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
  """No chat template and no BOS: a prompt of n words is n tokens."""
  return tiny_tokenizer(tmp_path_factory.mktemp('plain'), chat_template=None, bos=False)


def tokens(tokenizer, ids):
  return tokenizer.convert_ids_to_tokens(ids)


def read_one(tmp_path, kind, example):
  """The example as line 2 of data.jsonl (line 1 is blank)."""
  path = write_jsonl(tmp_path / 'data.jsonl', ['', example])
  [record] = read_jsonl(path, kind).records
  return record


def test_chat_template_prompt_is_a_prefix_and_response_ends_with_eos(tmp_path, templated):
  record = read_one(tmp_path, 'sft', {'messages': [
      {'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'p1 p2'},
      {'role': 'assistant', 'content': 'r1 r2 r3'}]})
  encoded = encode_sft(record, templated, seq_len=32, max_prompt_len=16)
  assert tokens(templated, encoded.prompt_ids) == [
      '<s>', '<|system|>', 'be', 'brief', '<|end|>', '<|user|>', 'p1', 'p2', '<|end|>',
      '<|assistant|>']
  assert tokens(templated, encoded.response_ids) == ['r1', 'r2', 'r3', '<|end|>']
  assert encoded.response_ids[-1] == templated.eos_token_id
  assert encoded.truncated == frozenset()
  # Prompt + response is exactly the template's rendering of the whole conversation.
  conversation = [{'role': r, 'content': c} for r, c in record.prompt + (
      Message('assistant', record.response),)]
  text = templated.apply_chat_template(conversation, tokenize=False)
  assert encoded.prompt_ids + encoded.response_ids == templated.encode(
      text, add_special_tokens=False)


@pytest.mark.parametrize('turn_end, response', [
    ('<|end|> hello', ['r1', '<|end|>']),  # Tokens after the last EOS are dropped.
    ('', ['r1', '<|end|>']),  # No EOS from the template: appended.
])
def test_response_ends_at_eos_whatever_the_template_puts_after_it(
    tmp_path, turn_end, response):
  template = CHAT_TEMPLATE.replace("}}<|end|>{% endfor %}", "}}" + turn_end + "{% endfor %}")
  assert template != CHAT_TEMPLATE
  tokenizer = tiny_tokenizer(tmp_path / 'tok', chat_template=template)
  record = read_one(tmp_path, 'sft', {'prompt': 'p1', 'response': 'r1'})
  encoded = encode_sft(record, tokenizer, seq_len=16, max_prompt_len=8)
  assert tokens(tokenizer, encoded.prompt_ids) == ['<s>', '<|user|>', 'p1'] + (
      turn_end.split() if turn_end else []) + ['<|assistant|>']
  assert tokens(tokenizer, encoded.response_ids) == response


def test_template_that_does_not_split_at_the_prompt_is_an_error(tmp_path):
  # The generation prompt says 'hello', which an assistant turn does not start with.
  template = CHAT_TEMPLATE.replace('<|assistant|>{% endif %}', '<|assistant|>hello{% endif %}')
  tokenizer = tiny_tokenizer(tmp_path / 'tok', chat_template=template)
  record = read_one(tmp_path, 'sft', {'prompt': 'p1', 'response': 'r1'})
  with pytest.raises(ValueError, match=r'data\.jsonl:2: the chat template of tokenizer .*tok'):
    encode_sft(record, tokenizer, seq_len=16, max_prompt_len=8)


def test_no_template_joins_contents_with_newlines_after_bos(tmp_path):
  tokenizer = tiny_tokenizer(tmp_path / 'tok', chat_template=None)
  messages = (Message('system', 'be brief'), Message('user', 'p1 p2'))
  with mock.patch.object(tokenizer, 'encode', wraps=tokenizer.encode) as encode:
    ids = encode_prompt(tokenizer, messages)
  assert tokens(tokenizer, ids) == ['<s>', 'be', 'brief', 'p1', 'p2']
  encode.assert_called_once_with('be brief\np1 p2', add_special_tokens=False)
  record = read_one(tmp_path, 'sft', {'prompt': 'p1', 'response': 'r1 r2'})
  encoded = encode_sft(record, tokenizer, seq_len=16, max_prompt_len=8)
  assert tokens(tokenizer, encoded.response_ids) == ['r1', 'r2', '<|end|>']


def test_no_template_and_no_bos(tmp_path, plain):
  record = read_one(tmp_path, 'sft', {'prompt': PROMPT_6, 'response': RESPONSE_4})
  encoded = encode_sft(record, plain, seq_len=16, max_prompt_len=8)
  assert tokens(plain, encoded.prompt_ids) == PROMPT_6.split()
  assert tokens(plain, encoded.response_ids) == RESPONSE_4.split() + ['<|end|>']


# Prompt: 6 tokens; response: 4 tokens + EOS. (seq_len, max_prompt_len, truncation) → kept.
_FITS = [
    (16, 8, 'error', PROMPT_6.split(), RESPONSE_4.split() + ['<|end|>'], set()),
    (16, 8, 'response', PROMPT_6.split(), RESPONSE_4.split() + ['<|end|>'], set()),
    (8, 6, 'response', PROMPT_6.split(), ['r0', 'r1'], {'response'}),
    (8, 6, 'prompt_and_response', PROMPT_6.split(), ['r0', 'r1'], {'response'}),
    (8, 4, 'prompt_and_response', ['p2', 'p3', 'p4', 'p5'], ['r0', 'r1', 'r2', 'r3'],
     {'prompt', 'response'}),
    (6, 3, 'prompt_and_response', ['p3', 'p4', 'p5'], ['r0', 'r1', 'r2'],
     {'prompt', 'response'}),
]


@pytest.mark.parametrize('seq_len, max_prompt_len, truncation, prompt, response, truncated',
                         _FITS)
def test_truncation_keeps_prompt_end_and_response_start(
    tmp_path, plain, seq_len, max_prompt_len, truncation, prompt, response, truncated):
  record = read_one(tmp_path, 'sft', {'prompt': PROMPT_6, 'response': RESPONSE_4})
  encoded = encode_sft(record, plain, seq_len=seq_len, max_prompt_len=max_prompt_len,
                       truncation=truncation)
  assert tokens(plain, encoded.prompt_ids) == prompt
  assert tokens(plain, encoded.response_ids) == response
  assert encoded.truncated == truncated


@pytest.mark.parametrize('seq_len, max_prompt_len, truncation, reason, detail', [
    (16, 4, 'response', 'prompt_too_long',
     "prompt has 6 tokens > config.data.max_prompt_len=4 (config.data.truncation='response')"),
    (16, 4, 'error', 'prompt_too_long', 'prompt has 6 tokens > config.data.max_prompt_len=4'),
    (8, 6, 'error', 'too_long', 'prompt + response have 6 + 5 tokens > config.train.seq_len=8'),
])
def test_what_does_not_fit_is_invalid_and_names_file_and_line(
    tmp_path, plain, seq_len, max_prompt_len, truncation, reason, detail):
  record = read_one(tmp_path, 'sft', {'prompt': PROMPT_6, 'response': RESPONSE_4})
  with pytest.raises(InvalidExample) as error:
    encode_sft(record, plain, seq_len=seq_len, max_prompt_len=max_prompt_len,
               truncation=truncation)
  assert str(error.value).startswith(f'{tmp_path / "data.jsonl"}:2: {detail}')
  assert error.value.reason == reason


def test_prompt_truncation_keeps_the_generation_prompt(tmp_path, templated):
  record = read_one(tmp_path, 'sft', {'prompt': PROMPT_6, 'response': 'r0'})
  encoded = encode_sft(record, templated, seq_len=8, max_prompt_len=4,
                       truncation='prompt_and_response')
  assert tokens(templated, encoded.prompt_ids) == ['p4', 'p5', '<|end|>', '<|assistant|>']
  assert tokens(templated, encoded.response_ids) == ['r0', '<|end|>']


def test_preference_cuts_chosen_and_rejected_to_the_same_budget(tmp_path, plain):
  record = read_one(tmp_path, 'preference', {
      'prompt': 'p0 p1', 'chosen': 'r0 r1 r2 r3 r4 r5', 'rejected': 'r6'})
  encoded = encode_preference(record, plain, seq_len=6, max_prompt_len=2)
  assert tokens(plain, encoded.prompt_ids) == ['p0', 'p1']
  assert tokens(plain, encoded.chosen_ids) == ['r0', 'r1', 'r2', 'r3']
  assert tokens(plain, encoded.rejected_ids) == ['r6', '<|end|>']
  assert encoded.truncated == {'chosen'}


def test_preference_identical_after_truncation_is_invalid(tmp_path, plain):
  record = read_one(tmp_path, 'preference', {
      'prompt': 'p0 p1', 'chosen': 'r0 r1 r2 r3', 'rejected': 'r0 r1 r2 r4'})
  encoded = encode_preference(record, plain, seq_len=6, max_prompt_len=2)  # Budget 4: differ.
  assert tokens(plain, encoded.chosen_ids) == ['r0', 'r1', 'r2', 'r3']
  assert tokens(plain, encoded.rejected_ids) == ['r0', 'r1', 'r2', 'r4']
  with pytest.raises(InvalidExample, match=r'data\.jsonl:2: chosen and rejected are identical '
                     r'once encoded and cut to 3 tokens') as error:
    encode_preference(record, plain, seq_len=5, max_prompt_len=2)
  assert error.value.reason == 'identical_after_truncation'


def test_preference_too_long_under_error_policy(tmp_path, plain):
  record = read_one(tmp_path, 'preference', {'prompt': 'p0', 'chosen': 'r0', 'rejected': 'r1 r2'})
  with pytest.raises(InvalidExample, match=r'data\.jsonl:2: prompt \+ rejected have 1 \+ 3'):
    encode_preference(record, plain, seq_len=3, max_prompt_len=1, truncation='error')


@pytest.mark.parametrize('options, match', [
    (dict(seq_len=8, max_prompt_len=8), r'config\.data\.max_prompt_len=8 must be in \[1, '
                                        r'config\.train\.seq_len=8\)'),
    (dict(seq_len=8, max_prompt_len=0), r'config\.data\.max_prompt_len=0'),
    (dict(seq_len=8, max_prompt_len=4, truncation='left'), r"config\.data\.truncation='left'"),
])
def test_bad_options_name_the_config_key(tmp_path, plain, options, match):
  record = read_one(tmp_path, 'sft', {'prompt': 'p0', 'response': 'r0'})
  with pytest.raises(ValueError, match=match):
    encode_sft(record, plain, **options)


def test_every_assistant_turn_is_trained_or_only_the_last(tmp_path, templated):
  record = read_one(tmp_path, 'sft', {'messages': [
      {'role': 'user', 'content': 'p1'}, {'role': 'assistant', 'content': 'r1 r2'},
      {'role': 'user', 'content': 'p2'}, {'role': 'assistant', 'content': 'r3'}]})
  every = encode_sft(record, templated, seq_len=32, max_prompt_len=16, train_turns='all')
  last = encode_sft(record, templated, seq_len=32, max_prompt_len=16, train_turns='last')
  assert every.prompt_ids == last.prompt_ids and every.response_ids == last.response_ids
  trained = [t for t, m in zip(tokens(templated, every.prompt_ids), every.prompt_mask) if m]
  assert trained == ['r1', 'r2', '<|end|>']  # The earlier turn, up to its EOS.
  assert not any(last.prompt_mask)
  # Cutting the prompt's start cuts its mask the same way.
  cut = encode_sft(record, templated, seq_len=32, max_prompt_len=6, train_turns='all',
                   truncation='prompt_and_response')
  assert tokens(templated, cut.prompt_ids) == ['r2', '<|end|>', '<|user|>', 'p2', '<|end|>',
                                               '<|assistant|>']
  assert list(cut.prompt_mask) == [1, 1, 0, 0, 0, 0]


def test_turns_a_template_renders_differently_later_cannot_be_trained(tmp_path):
  # A template that drops earlier assistant turns' content (as some drop earlier reasoning).
  template = CHAT_TEMPLATE.replace(
      "{{ m['content'] }}", "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}"
      "{% endif %}")
  tokenizer = tiny_tokenizer(tmp_path / 'tok', chat_template=template)
  record = read_one(tmp_path, 'sft', {'messages': [
      {'role': 'user', 'content': 'p1'}, {'role': 'assistant', 'content': 'r1'},
      {'role': 'user', 'content': 'p2'}, {'role': 'assistant', 'content': 'r3'}]})
  with pytest.raises(ValueError, match='data.jsonl:2: .* renders assistant turn 1 differently'
                                       '.*train_turns="last"'):
    encode_sft(record, tokenizer, seq_len=32, max_prompt_len=16, train_turns='all')
  encode_sft(record, tokenizer, seq_len=32, max_prompt_len=16, train_turns='last')
