"""Reading SFT and preference examples from JSONL: every accepted form, every invalid one."""

import collections
import pickle

import pytest
from data_fixtures import write_jsonl

from rlhf_jax.data.records import (InvalidExample, Origin, PreferenceRecord, SFTRecord,
                                   TextRecord, UnpairedRecord, parse_record, read_jsonl)

SYSTEM, USER, ASSISTANT = 'system', 'user', 'assistant'


def msg(role, content):
  return {'role': role, 'content': content}


def test_origin_prints_as_path_colon_line():
  assert str(Origin('data/train.jsonl', 17)) == 'data/train.jsonl:17'


def test_sft_forms(tmp_path):
  path = write_jsonl(tmp_path / 'sft.jsonl', [
      {'prompt': 'What is 2+2?', 'response': '4', 'id': 7},  # Other keys are ignored.
      '',
      '   ',
      {'messages': [msg(SYSTEM, 'Be brief.'), msg(USER, 'Hi'), msg(ASSISTANT, 'Hello!'),
                    msg(USER, 'Bye?'), msg(ASSISTANT, 'Bye.')]},
      {'prompt': [msg(SYSTEM, 'Be brief.'), msg(USER, 'Hi')], 'response': 'Hello, ü!'},
  ])
  records = read_jsonl(path, 'sft')
  p = str(path)
  assert records.records == [
      SFTRecord(((USER, 'What is 2+2?'),), '4', Origin(p, 1)),
      SFTRecord(((SYSTEM, 'Be brief.'), (USER, 'Hi'), (ASSISTANT, 'Hello!'), (USER, 'Bye?')),
                'Bye.', Origin(p, 4)),
      SFTRecord(((SYSTEM, 'Be brief.'), (USER, 'Hi')), 'Hello, ü!', Origin(p, 5)),
  ]
  assert records.skipped == collections.Counter()


def test_preference_forms(tmp_path):
  history = [msg(SYSTEM, 'Be brief.'), msg(USER, 'Hi'), msg(ASSISTANT, 'Hello!'), msg(USER, 'Q?')]
  path = write_jsonl(tmp_path / 'pref.jsonl', [
      {'prompt': 'Q?', 'chosen': 'Yes.', 'rejected': 'No.'},
      {'prompt': history, 'chosen': [msg(ASSISTANT, 'Yes.')], 'rejected': 'No.'},
      # TRL's implicit prompt: whole conversations that differ in the last (assistant) turn.
      {'chosen': history + [msg(ASSISTANT, 'Yes.')], 'rejected': history + [msg(ASSISTANT, 'No.')]},
      {'chosen': [msg(ASSISTANT, 'Yes.')], 'rejected': [msg(ASSISTANT, 'No.')]},
  ])
  turns = ((SYSTEM, 'Be brief.'), (USER, 'Hi'), (ASSISTANT, 'Hello!'), (USER, 'Q?'))
  p = str(path)
  assert read_jsonl(path, 'preference').records == [
      PreferenceRecord(((USER, 'Q?'),), 'Yes.', 'No.', Origin(p, 1)),
      PreferenceRecord(turns, 'Yes.', 'No.', Origin(p, 2)),
      PreferenceRecord(turns, 'Yes.', 'No.', Origin(p, 3)),
      PreferenceRecord((), 'Yes.', 'No.', Origin(p, 4)),
  ]


def test_text_form(tmp_path):
  path = write_jsonl(tmp_path / 'docs.jsonl', [{'text': 'One document.'}, '', {'text': 'Two.'}])
  assert read_jsonl(path, 'text').records == [TextRecord('One document.', Origin(str(path), 1)),
                                              TextRecord('Two.', Origin(str(path), 3))]


def test_field_map_reads_other_names(tmp_path):
  sft = write_jsonl(tmp_path / 'qa.jsonl', [{'question': 'Q?', 'answer': 'A.'}])
  field_map = {'prompt': 'question', 'response': 'answer'}
  [record] = read_jsonl(sft, 'sft', field_map=field_map).records
  assert (record.prompt, record.response) == (((USER, 'Q?'),), 'A.')
  chat = write_jsonl(tmp_path / 'chat.jsonl', [{'turns': [msg(USER, 'Q?'), msg(ASSISTANT, 'A.')]}])
  [record] = read_jsonl(chat, 'sft', field_map={'messages': 'turns'}).records
  assert (record.prompt, record.response) == (((USER, 'Q?'),), 'A.')
  pref = write_jsonl(tmp_path / 'pref.jsonl', [{'q': 'Q?', 'good': 'A.', 'bad': 'B.'}])
  field_map = {'prompt': 'q', 'chosen': 'good', 'rejected': 'bad'}
  [record] = read_jsonl(pref, 'preference', field_map=field_map).records
  assert (record.prompt, record.chosen, record.rejected) == (((USER, 'Q?'),), 'A.', 'B.')
  # Errors name the file's key.
  with pytest.raises(InvalidExample, match=r'qa\.jsonl:1: missing key "answer" \(keys: q, a\)'):
    read_jsonl(write_jsonl(tmp_path / 'qa.jsonl', [{'q': 'Q?', 'a': 'A.'}]), 'sft',
               field_map={'prompt': 'q', 'response': 'answer'})


def test_field_map_with_unknown_field_is_rejected():
  with pytest.raises(ValueError, match=r"field_map has unknown sft fields \['answer'\]"):
    parse_record({}, 'sft', Origin('x', 1), field_map={'answer': 'response'})


_SFT_OK = {'prompt': 'p', 'response': 'r'}
_OK = {'sft': _SFT_OK, 'preference': {'prompt': 'p', 'chosen': 'a', 'rejected': 'b'},
       'text': {'text': 't'}}
_BAD = [
    # (kind, line, reason, what the message says after 'file.jsonl:3: ')
    ('sft', '{"prompt": "p", "response": }', 'malformed_json',
     'malformed JSON: Expecting value (column 29)'),
    ('sft', b'{"prompt": "caf\xe9", "response": "r"}', 'invalid_utf8',
     "invalid UTF-8 at byte 15: b'\\xe9'"),
    ('sft', '["p", "r"]', 'not_an_object', 'expected a JSON object, got list'),
    ('sft', {'prompt': 'p', 'answer': 'r'}, 'missing_key',
     'missing key "response" (keys: prompt, answer)'),
    ('sft', {'response': 'r'}, 'missing_key', 'missing key "prompt" (keys: response)'),
    ('sft', {'prompt': 'p', 'response': 3}, 'wrong_type', '"response" must be a string, got int'),
    ('sft', {'prompt': 5, 'response': 'r'}, 'wrong_type',
     '"prompt" must be a string or a list of messages, got int'),
    ('sft', {'prompt': 'p', 'response': ' \n\t'}, 'empty_response', 'empty "response"'),
    ('sft', {'messages': [msg('bot', 'hi'), msg(ASSISTANT, 'r')]}, 'unknown_role',
     '"messages[0]" has unknown role "bot" (expected system, user, assistant, tool)'),
    ('sft', {'messages': [{'role': USER}, msg(ASSISTANT, 'r')]}, 'missing_key',
     '"messages[0]" has no "content" (keys: role)'),
    ('sft', {'messages': [msg(USER, 'p'), 'r']}, 'wrong_type',
     '"messages[1]" must be an object, got str'),
    ('sft', {'messages': [msg(ASSISTANT, 'r'), msg(USER, 'p')]}, 'no_assistant_response',
     '"messages" must end with an assistant message (last role: user)'),
    ('sft', {'messages': []}, 'no_assistant_response',
     '"messages" must end with an assistant message (last role: none, the list is empty)'),
    ('sft', {'messages': [msg(USER, 'p'), msg(ASSISTANT, '')]}, 'empty_response',
     'empty "messages"'),
    ('preference', {'prompt': 'p', 'chosen': 'same', 'rejected': 'same'}, 'identical_responses',
     '"chosen" and "rejected" are identical'),
    ('preference', {'prompt': 'p', 'chosen': 'a', 'rejected': ' '}, 'empty_response',
     'empty "rejected"'),
    ('preference', {'prompt': 'p', 'chosen': 'a'}, 'missing_key',
     'missing key "rejected" (keys: prompt, chosen)'),
    ('preference', {'chosen': 'a', 'rejected': 'b'}, 'missing_key',
     'missing key "prompt" (keys: chosen, rejected)'),
    ('preference', {'prompt': 'p', 'chosen': [msg(USER, 'p'), msg(ASSISTANT, 'a')],
                    'rejected': 'b'}, 'wrong_type',
     '"chosen" must be one assistant message when "prompt" is given, got 2 messages'),
    ('preference', {'prompt': 'p', 'chosen': {'a': 1}, 'rejected': 'b'}, 'wrong_type',
     '"chosen" must be a string or a list of one assistant message, got dict'),
    ('preference', {'chosen': [msg(USER, 'p'), msg(ASSISTANT, 'a')],
                    'rejected': [msg(USER, 'q'), msg(ASSISTANT, 'b')]}, 'prompt_mismatch',
     '"chosen" and "rejected" differ before their last message'),
    ('preference', {'chosen': [msg(USER, 'p'), msg(ASSISTANT, 'a')],
                    'rejected': [msg(USER, 'p'), msg(USER, 'b')]}, 'no_assistant_response',
     '"rejected" must end with an assistant message (last role: user)'),
    ('text', {'text': '\n'}, 'empty_text', 'empty "text"'),
    ('text', {'text': ['a']}, 'wrong_type', '"text" must be a string, got list'),
    ('text', {'body': 'a'}, 'missing_key', 'missing key "text" (keys: body)'),
]


@pytest.mark.parametrize('kind, line, reason, detail', _BAD,
                         ids=[f'{case[0]}-{i}-{case[2]}' for i, case in enumerate(_BAD)])
def test_invalid_line_names_file_line_and_reason(tmp_path, kind, line, reason, detail):
  ok = _OK[kind]
  path = write_jsonl(tmp_path / 'file.jsonl', [ok, '', line, ok])  # The bad one is line 3.
  with pytest.raises(InvalidExample) as error:
    read_jsonl(path, kind)
  assert str(error.value).startswith(f'{path}:3: ')
  assert detail in str(error.value)
  assert (error.value.reason, error.value.origin) == (reason, Origin(str(path), 3))


def test_skip_invalid_counts_reasons_and_keeps_valid_in_order(tmp_path, caplog):
  path = write_jsonl(tmp_path / 'mixed.jsonl', [
      {'prompt': 'p1', 'response': 'r1'},
      '{not json',
      {'prompt': 'p2'},
      '',
      {'prompt': 'p3', 'response': 'r3'},
      b'\xff\xfe',
      {'prompt': 'p4', 'response': ''},
      {'response': 'r5'},
      {'prompt': 'p6', 'response': 'r6'},
  ])
  result = read_jsonl(path, 'sft', skip_invalid=True)
  assert [(r.response, r.origin.line) for r in result.records] == [('r1', 1), ('r3', 5),
                                                                    ('r6', 9)]
  assert result.skipped == collections.Counter(
      {'malformed_json': 1, 'missing_key': 2, 'invalid_utf8': 1, 'empty_response': 1})
  for line in (2, 3, 6, 7, 8):
    assert f'{path}:{line}: ' in caplog.text


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    read_jsonl(tmp_path / 'nope.jsonl', 'sft')


def test_unknown_kind_is_rejected(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', [_SFT_OK])
  with pytest.raises(ValueError, match="kind='dpo'; choose one of sft, preference, unpaired, text, prompt"):
    read_jsonl(path, 'dpo')


def test_invalid_example_survives_pickling():
  error = InvalidExample(Origin('a.jsonl', 2), 'missing_key', 'missing key "prompt"')
  copy = pickle.loads(pickle.dumps(error))
  assert (str(copy), copy.reason, copy.origin) == ('a.jsonl:2: missing key "prompt"',
                                                   'missing_key', Origin('a.jsonl', 2))


def test_trl_prompt_completion_forms_standard_and_conversational(tmp_path):
  path = write_jsonl(tmp_path / 'pc.jsonl', [
      {'prompt': 'Q?', 'completion': 'A.'},
      {'prompt': [msg(SYSTEM, 'Be brief.'), msg(USER, 'Q?')],
       'completion': [msg(ASSISTANT, 'A.')]},
      {'messages': [msg(USER, 'Weather?'), msg('tool', '{"temp": 20}'), msg(ASSISTANT, '20 C.')]},
  ])
  p = str(path)
  assert read_jsonl(path, 'sft').records == [
      SFTRecord(((USER, 'Q?'),), 'A.', Origin(p, 1)),
      SFTRecord(((SYSTEM, 'Be brief.'), (USER, 'Q?')), 'A.', Origin(p, 2)),
      SFTRecord(((USER, 'Weather?'), ('tool', '{"temp": 20}')), '20 C.', Origin(p, 3)),
  ]
  bad = write_jsonl(tmp_path / 'bad.jsonl', [{'prompt': 'Q?', 'completion': [msg(USER, 'A.')]}])
  with pytest.raises(InvalidExample, match='bad.jsonl:1: "completion" must end with an '
                                           'assistant message'):
    read_jsonl(bad, 'sft')


def test_trl_unpaired_form_standard_and_conversational(tmp_path):
  path = write_jsonl(tmp_path / 'kto.jsonl', [
      {'prompt': 'Q?', 'completion': 'A.', 'label': True},
      {'prompt': [msg(USER, 'Q?')], 'completion': [msg(ASSISTANT, 'B.')], 'label': False},
  ])
  p = str(path)
  assert read_jsonl(path, 'unpaired').records == [
      UnpairedRecord(((USER, 'Q?'),), 'A.', True, Origin(p, 1)),
      UnpairedRecord(((USER, 'Q?'),), 'B.', False, Origin(p, 2)),
  ]
  for bad, error in (({'prompt': 'Q?', 'completion': 'A.', 'label': 1},
                      '"label" must be true .desirable. or false .undesirable., got int'),
                     ({'prompt': 'Q?', 'completion': 'A.'}, 'missing key "label"')):
    with pytest.raises(InvalidExample, match=f'bad.jsonl:1: {error}'):
      read_jsonl(write_jsonl(tmp_path / 'bad.jsonl', [bad]), 'unpaired')
