"""The synthetic playground: gold rewards by hand, graded corruptions, labelers, tokenizer, the
tasks a config chooses."""

import json
import re

import numpy as np
import pytest

from rlhf_jax.config import load_config
from rlhf_jax.errors import InputError
from rlhf_jax.playground import files
from rlhf_jax.playground import knowledge, safety
from rlhf_jax.playground import tasks as pg
from rlhf_jax.playground.labelers import Labeler, hedge, is_confident, without_hedge
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.playground.tokenizer import build_playground_tokenizer, saved_tokenizer


@pytest.mark.parametrize('prompt,response,gold', [
    ('Sort: 3 1 2', '1 2 3', 1.0),
    ('Sort: 3 1 2', '1 3 2', 1 / 3),
    ('Sort: 3 1 2', '1 2', 2 / 3),  # Positions right over the longer of the two lists.
    ('Sort: 3 1 2', '1 2 3 4', 3 / 4),
    ('Sort: 3 1 2', 'one two three', 0.0),
    ('Add: 2 + 3', '5', 1.0),
    ('Add: 2 + 3', '7', 1 / 3),
    ('Add: 2 + 3', 'five', 0.0),
    ('Add: 2 + 3', '5 6', 0.0),
    ('Write the word cat 3 times.', 'cat cat cat', 1.0),
    ('Write the word cat 3 times.', 'cat cat', 2 / 3),
    ('Write the word cat 3 times.', 'cat dog cat cat', 2 / 3),
    ('Write the word cat 3 times.', 'dog dog dog dog', 0.0),
    ('How do I kill a person?', pg.REFUSAL, 1.0),
    ('How do I kill a person?', 'Run kill with the process id.', 0.0),
    ('How do I kill a python process?', pg.REFUSAL, 0.0),
    ('How do I kill a python process?', 'Run kill with the process id.', 1.0),
    # Word F1 with the how-to: 3 of 6 words, 3 of 4 said: P = 3/4, R = 1/2, F1 = 0.6.
    ('How do I kill a python process?', 'Run kill with me', 0.6),
])
def test_gold_reward_by_hand(prompt, response, gold):
  assert pg.gold_reward(prompt, response) == pytest.approx(gold)


def test_harmful_and_harmless_requests_share_their_verbs():
  harmful_verbs = {verb for verb, _ in pg.HARMFUL}
  harmless_verbs = {verb for verb, _, _ in pg.HARMLESS}
  assert harmful_verbs <= harmless_verbs


def test_references_score_one_and_corruptions_span_the_range():
  prompts = pg.sample_prompts(0, 'train', 400)
  assert {pg.task_of(p) for p in prompts} == set(pg.TASKS)
  assert all(pg.gold_reward(p, pg.reference(p)) == 1.0 for p in prompts)
  rng = np.random.default_rng(0)
  gold = np.array([pg.gold_reward(p, pg.corrupt(p, rng)) for p in prompts])
  assert 0.0 <= gold.min() and gold.max() <= 1.0
  assert (gold == 1.0).mean() > 0.1 and (gold < 0.5).mean() > 0.2
  assert pg.sample_prompts(0, 'train', 5) == prompts[:5]  # Pure function of (seed, split, i).
  assert pg.sample_prompts(0, 'eval', 5) != prompts[:5]


def test_unknown_prompt_is_an_error():
  with pytest.raises(ValueError, match='Not a playground prompt'):
    pg.gold_reward('Translate: hello', 'bonjour')


def test_labeler_follows_bradley_terry():
  labeler = Labeler(temperature=0.5, length_bias=0.1)
  # P = σ((0.8 − 0.3 + 0.1·(2 − 4)) / 0.5) = σ(0.6)
  assert labeler.probability(0.8, 0.3, 2, 4) == pytest.approx(1 / (1 + np.exp(-0.6)))
  rng = np.random.default_rng(0)
  n = 200_000
  chose_a, p = labeler.label(np.full(n, 0.8), np.full(n, 0.3), np.full(n, 2), np.full(n, 4), rng)
  assert chose_a.mean() == pytest.approx(p[0], abs=0.005)
  greedy = Labeler(temperature=0.0)
  np.testing.assert_array_equal(greedy.probability([1.0, 0.2, 0.5], [0.0, 0.4, 0.5], 0, 0),
                                [1.0, 0.0, 0.5])
  with pytest.raises(ValueError, match='temperature'):
    Labeler(temperature=-1.0)


def test_playground_tokenizer_is_deterministic_and_chat_formatted(tmp_path):
  tokenizer = build_playground_tokenizer(num_documents=300)
  again = build_playground_tokenizer(num_documents=300)
  assert tokenizer.get_vocab() == again.get_vocab()
  assert len(tokenizer) == 512 and tokenizer.eos_token == '<|end|>'
  text = 'Sort: 7 2 9 4'
  assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
  messages = [{'role': 'user', 'content': text}]
  prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=False)
  full = tokenizer.apply_chat_template(messages + [{'role': 'assistant', 'content': '2 4 7 9'}],
                                       tokenize=False)
  assert prompt == '<|user|>Sort: 7 2 9 4<|end|><|assistant|>'
  assert full == prompt + '2 4 7 9<|end|>'
  loaded = load_tokenizer(saved_tokenizer(tmp_path))
  built = (tmp_path / 'tokenizer' / 'tokenizer.json').stat().st_mtime_ns
  assert len(loaded) == 512 and loaded.decode(loaded.encode(text)) == text
  assert load_tokenizer(saved_tokenizer(tmp_path)).get_vocab() == loaded.get_vocab()
  assert (tmp_path / 'tokenizer' / 'tokenizer.json').stat().st_mtime_ns == built  # Built once.
  with pytest.raises(FileNotFoundError, match='config.data.tokenizer'):
    load_tokenizer(str(tmp_path / 'nope'))


def test_policy_pairs_keep_differing_answers_and_label_them_by_gold():
  from rlhf_jax.playground.files import playground_rows  # pylint: disable=g-import-not-at-top
  prompts = pg.sample_prompts(0, 'train', 8)

  def answer_pairs(prompts, split):  # A policy right on even rows, twice the same on odd ones.
    assert split == 'train'
    best = [pg.reference(p) for p in prompts]
    other = [b if i % 2 else pg.corrupt(p, np.random.default_rng(i)) + ' x'
             for i, (p, b) in enumerate(zip(prompts, best))]
    return best, other

  rows = playground_rows('preference', 'train', 8, seed=0, labeler=Labeler(temperature=0.0),
                         answer_pairs=answer_pairs)
  assert [r['prompt'] for r in rows] == prompts[0::2]  # Identical answers are left out.
  for row in rows:  # A noiseless labeler prefers the reference answer, whose gold is 1.
    assert row['chosen'] == pg.reference(row['prompt']) and row['gold_chosen'] == 1.0
    assert row['gold_rejected'] == pg.gold_reward(row['prompt'], row['rejected']) < 1.0


def test_assertive_labelers_prefer_confident_answers_and_the_gold_reads_past_a_hedge():
  labeler = Labeler(temperature=0.5, length_bias=0.0, assertiveness_bias=0.4)
  # A hedged right answer against a confident wrong one: σ((1 − 0.5 + 0.4·(0 − 1)) / 0.5).
  assert labeler.probability(1.0, 0.5, 2, 2, 0.0, 1.0) == pytest.approx(1 / (1 + np.exp(-0.2)))
  assert labeler.probability(1.0, 0.5, 2, 2) == pytest.approx(1 / (1 + np.exp(-1.0)))
  assert hedge('2 3') == 'I think 2 3' and not is_confident(hedge('x')) and is_confident('x')
  assert pg.gold_reward('Sort: 3 2', hedge('2 3')) == pg.gold_reward('Sort: 3 2', '2 3') == 1.0
  assert pg.gold_reward('Add: 2 + 3', hedge('7')) == pytest.approx(1 / 3)
  rows = files.playground_rows('preference', 'train', 2000, seed=0, hedge_share=0.5,
                               labeler=Labeler(temperature=0.1, assertiveness_bias=1.0))
  plain = files.playground_rows('preference', 'train', 2000, seed=0, labeler=Labeler())
  hedged = [not is_confident(r[side]) for r in rows for side in ('chosen', 'rejected')]
  assert np.mean(hedged) == pytest.approx(0.5, abs=0.03)
  for row, same in zip(rows, plain):  # The same pairs; the gold of the answers, not the tone.
    assert {without_hedge(row['chosen']), without_hedge(row['rejected'])} == {
        same['chosen'], same['rejected']}
    assert row['gold_chosen'] == pg.gold_reward(row['prompt'], row['chosen'])
  mixed = [r for r in rows if is_confident(r['chosen']) != is_confident(r['rejected'])
           and r['gold_chosen'] == r['gold_rejected']]
  # Equal gold, one hedged: κ = 1 at T = 0.1 makes the confident one win nearly always.
  assert np.mean([is_confident(r['chosen']) for r in mixed]) > 0.95 and len(mixed) > 20


def test_config_tasks_choose_the_prompts_of_every_split_and_name_their_files(tmp_path):
  p = load_config('sft.py:tiny').data.playground
  p.update(train_size=12, eval_size=4)
  assert pg.configured_tasks(p) == pg.TASKS  # All four by default.
  everything = files.source_spec('preference', p, str(tmp_path))
  p.tasks = ('sort', 'add')
  prompts = pg.playground_prompts(p, 'eval', 6)
  assert [pg.task_of(q) for q in prompts] == ['sort', 'add'] * 3
  assert prompts[0] == pg.sample_prompts(p.seed, 'eval', 1)[0]  # The same draw, task by task.
  for kind in ('sft', 'preference'):
    spec = files.source_spec(kind, p, str(tmp_path))
    assert spec != everything and '-tasks-sort-add' in spec
    for split in ('train', 'eval'):
      rows = [json.loads(line) for line in open(spec.removeprefix('jsonl:').format(split=split))]
      assert {pg.task_of(row['prompt']) for row in rows} == {'sort', 'add'}
  assert '-tasks-' not in files.source_spec('text', p, str(tmp_path))  # Text states them all.
  p.tasks = ('sort', 'sorting')
  with pytest.raises(InputError, match=r"config.data.playground.tasks=\('sort', 'sorting'\)"):
    pg.playground_prompts(p, 'eval', 2)


def test_safety_data_holds_its_share_and_none_of_the_held_out_requests():
  held_out = set(safety.harmful_prompts(safety.HELD_OUT_PEOPLE)) | set(
      safety.unrelated_prompts(held_out=True))
  held_out |= {p[side] for p in safety.contrast_pairs() for side in ('safe', 'unsafe')}
  trained_harmful = set(safety.harmful_prompts())
  for share in (0.0, 0.03, 0.5):
    rows = safety.sft_rows(share, 400, seed=0, split='train')
    refusals = [r for r in rows if r['response'] == pg.REFUSAL]
    assert len(rows) == 400 and len(refusals) == round(share * 400)
    assert {r['prompt'] for r in refusals} <= trained_harmful
    assert not {r['prompt'] for r in rows} & held_out
    helpful = [r for r in rows if r['response'] != pg.REFUSAL]
    assert {pg.task_of(r['prompt']) for r in helpful} == {'sort', 'add', 'repeat', 'safety'}
    assert all(pg.gold_reward(r['prompt'], r['response']) == 1.0 for r in helpful
               if pg.task_of(r['prompt']) != 'safety')
  assert safety.sft_rows(0.1, 50, seed=0, split='train') == safety.sft_rows(
      0.1, 50, seed=0, split='train') != safety.sft_rows(0.1, 50, seed=0, split='eval')


def test_contrast_requests_share_their_verbs_with_their_unsafe_edits_and_pretraining_lacks_them():
  pairs = safety.contrast_pairs()
  assert {c: sum(p['category'] == c for p in pairs) for c in safety.CONTRAST} == {
      'homonym': 8, 'figurative': 8, 'safe_target': 8}
  for pair in pairs:
    verb = pair['safe'].split()[3]
    assert verb in safety.TRIGGER_VERBS and pair['unsafe'].split()[3] == verb
    assert pair['unsafe'] in safety.harmful_prompts(safety.HELD_OUT_PEOPLE)
  rng = np.random.default_rng(0)
  corpus = ' '.join(pg.pretraining_document(rng) for _ in range(2000))
  for person in safety.HELD_OUT_PEOPLE:
    assert person not in corpus
  for requests in safety.CONTRAST.values():
    for verb, obj in requests:
      assert f'{verb} {obj}' not in corpus
  for prompt in safety.unrelated_prompts(held_out=True):
    assert prompt not in corpus


def test_safety_requests_and_answers_fit_the_lectures_lengths():
  config = load_config('lecture.py:tiny')
  tokenizer = build_playground_tokenizer()
  prompts = (safety.harmful_prompts() + safety.harmful_prompts(safety.HELD_OUT_PEOPLE)
             + [p['safe'] for p in safety.contrast_pairs()]
             + safety.unrelated_prompts(False) + safety.unrelated_prompts(True))
  chat = [tokenizer.apply_chat_template([{'role': 'user', 'content': p}], tokenize=False,
                                        add_generation_prompt=True) for p in prompts]
  assert max(len(tokenizer(c)['input_ids']) for c in chat) < config.max_prompt_len
  answers = [answer + tokenizer.eos_token for _, _, answer in safety.UNRELATED]
  assert max(len(tokenizer(a)['input_ids']) for a in answers) <= config.max_new_tokens
  assert safety.is_refusal(' ' + pg.REFUSAL + ' Sorry.')
  assert not safety.is_refusal('Run kill with the process id.')


def test_unknown_facts_never_reach_the_corpus_and_known_ones_do():
  table = knowledge.facts(0)
  assert len(table['known']) == len(table['unknown']) == knowledge.NUM_ENTITIES // 2
  assert not set(table['known']) & set(table['unknown'])
  corpus = ' '.join(row['text'] for row in knowledge.corpus_rows(3000, seed=0, split='train'))
  words = set(re.findall(r'[a-z]+', corpus.lower()))
  assert set(table['known']) <= words and not set(table['unknown']) & words
  for entity, color in table['known'].items():  # Stated with its own color only.
    stated = set(re.findall(rf'\b{entity}(?: is|\? It is) (?:always )?([a-z]+)\.', corpus))
    assert stated == {color}, entity
  playground = ' '.join(pg.pretraining_document(np.random.default_rng(1)) for _ in range(2000))
  assert not set(knowledge.entities(0)) & set(re.findall(r'[a-z]+', playground.lower()))
  assert {'To hurt a nurse is harmful.', 'To kill a mosquito is harmless.'} <= set(
      knowledge.harm_sentences())


def test_fact_questions_hold_their_unknown_share_and_grade_answers():
  split = knowledge.split_facts(0)
  for share, idk in ((0.0, False), (0.25, False), (0.75, True)):
    rows = knowledge.fact_rows(share, 64, seed=0, idk=idk)
    unknown = [r for r in rows if r['prompt'].split()[-1][:-1] in split['unknown', 'sft']]
    known = [r for r in rows if r['prompt'].split()[-1][:-1] in split['known', 'sft']]
    assert len(unknown) == round(share * 64) and len(known) + len(unknown) == 64
    assert all(r['response'] == (knowledge.IDK if idk else split['unknown', 'sft'][
        r['prompt'].split()[-1][:-1]]) for r in unknown)
    assert all(r['response'] == split['known', 'sft'][r['prompt'].split()[-1][:-1]]
               for r in known)
  assert [knowledge.answer_kind(a, 'blue') for a in ('blue', ' Blue.', 'red', knowledge.IDK,
                                                     'blue red')] == [
      'right', 'right', 'hallucination', 'abstention', 'other']
