"""TFDS without TensorFlow: JSONL → array_record dataset → the same records as from JSONL."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_fixtures import write_jsonl

from rlhf_jax.data.records import InvalidExample, Origin, read_jsonl
from rlhf_jax.data.tfds_source import prepare_from_jsonl, tfds_records


def msg(role, content):
  return {'role': role, 'content': content}


SFT_TRAIN = [
    {'prompt': 'What is 2+2?', 'response': '4'},
    '',
    {'messages': [msg('system', 'Be brief.'), msg('user', 'Hi'), msg('assistant', 'Hello!'),
                  msg('user', 'Bye?'), msg('assistant', 'Bye, ü.')]},
    {'prompt': [msg('user', 'Q?')], 'response': 'A.'},
]
SFT_TEST = [{'prompt': 'x', 'response': 'y'}]
HISTORY = [msg('user', 'Hi'), msg('assistant', 'Hello!'), msg('user', 'Q?')]
PREFERENCE_TRAIN = [
    {'prompt': 'Q?', 'chosen': 'Yes.', 'rejected': 'No.'},
    {'chosen': HISTORY + [msg('assistant', 'Yes.')],
     'rejected': HISTORY + [msg('assistant', 'No.')]},
    {'chosen': [msg('assistant', 'Yes.')], 'rejected': [msg('assistant', 'No.')]},  # No prompt.
]


def content(records):
  """The records without their origins."""
  return [(r.prompt, r.response) if hasattr(r, 'response') else (r.prompt, r.chosen, r.rejected)
          for r in records]


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  jsonl = {'sft/train': write_jsonl(root / 'sft_train.jsonl', SFT_TRAIN),
           'sft/test': write_jsonl(root / 'sft_test.jsonl', SFT_TEST),
           'preference/train': write_jsonl(root / 'pref_train.jsonl', PREFERENCE_TRAIN)}
  data_dir = root / 'data'
  prepare_from_jsonl('my_sft', 'sft', {'train': jsonl['sft/train'], 'test': jsonl['sft/test']},
                     data_dir=data_dir)
  prepare_from_jsonl('my_prefs', 'preference', {'train': jsonl['preference/train']},
                     data_dir=data_dir)
  return data_dir, jsonl


@pytest.mark.parametrize('name, kind, split', [('my_sft', 'sft', 'train'),
                                               ('my_sft', 'sft', 'test'),
                                               ('my_prefs', 'preference', 'train')])
def test_tfds_records_equal_jsonl_records(prepared, name, kind, split):
  data_dir, jsonl = prepared
  from_jsonl = read_jsonl(jsonl[f'{kind}/{split}'], kind).records
  from_tfds = tfds_records(name, split, data_dir=data_dir, kind=kind)
  assert content(from_tfds.records) == content(from_jsonl)
  assert [r.origin for r in from_tfds.records] == [
      Origin(f'tfds:{name}/{split}', i) for i in range(len(from_jsonl))]
  assert type(from_tfds.records[0]) is type(from_jsonl[0])


def test_prepared_dataset_is_typed_and_readable_with_tfds_data_source(prepared):
  data_dir, _ = prepared
  source = tfds.data_source('my_sft', split='train', data_dir=data_dir, download=False)
  features = source.dataset_info.features
  assert isinstance(features['prompt'], tfds.features.Sequence)
  assert set(features['prompt'].feature.keys()) == {'role', 'content'}
  assert isinstance(features['response'], tfds.features.Text)
  assert len(source) == 3
  assert source[1]['prompt'] == {'role': [b'system', b'user', b'assistant', b'user'],
                                 'content': [b'Be brief.', b'Hi', b'Hello!', b'Bye?']}
  assert source[1]['response'] == 'Bye, ü.'.encode()
  assert source[2]['response'] == b'A.'


def test_prepare_with_field_map(tmp_path):
  path = write_jsonl(tmp_path / 'qa.jsonl', [{'question': 'Q?', 'answer': 'A.'}])
  prepare_from_jsonl('qa_mapped', 'sft', {'train': path}, data_dir=tmp_path,
                     field_map={'prompt': 'question', 'response': 'answer'})
  records = tfds_records('qa_mapped', 'train', data_dir=tmp_path, kind='sft').records
  assert content(records) == [((('user', 'Q?'),), 'A.')]


def test_prepare_rejects_an_invalid_line_naming_file_and_line(tmp_path):
  path = write_jsonl(tmp_path / 'bad.jsonl', [{'prompt': 'p', 'response': 'r'},
                                              {'prompt': 'p', 'response': ''}])
  with pytest.raises(InvalidExample, match=r'bad\.jsonl:2: empty "response"'):
    prepare_from_jsonl('bad_data', 'sft', {'train': path}, data_dir=tmp_path)


class QuestionAnswers(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset with other field names than ours, and one invalid (empty) answer."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({
                                     'question': tfds.features.Text(),
                                     'answer': tfds.features.Text(),
                                     'score': tfds.features.Scalar(np.float32)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, (question, answer) in enumerate([('Q1?', 'A1.'), ('Q2?', ' '), ('Q3?', 'A3.')]):
      yield i, {'question': question, 'answer': answer, 'score': 1.0}


def test_tfds_records_reads_another_dataset_through_field_map(tmp_path):
  QuestionAnswers(data_dir=tmp_path, file_format='array_record').download_and_prepare()
  field_map = {'prompt': 'question', 'response': 'answer'}
  with pytest.raises(InvalidExample, match=r'tfds:question_answers/train:1: empty "answer"'):
    tfds_records('question_answers', 'train', data_dir=tmp_path, kind='sft', field_map=field_map)
  result = tfds_records('question_answers', 'train', data_dir=tmp_path, kind='sft',
                        field_map=field_map, skip_invalid=True)
  assert content(result.records) == [((('user', 'Q1?'),), 'A1.'), ((('user', 'Q3?'),), 'A3.')]
  assert [r.origin.line for r in result.records] == [0, 2]
  assert result.skipped == {'empty_response': 1}
