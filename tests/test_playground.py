"""The synthetic playground: gold rewards by hand, graded corruptions, labelers, tokenizer, the
tasks a config chooses."""

import json

import numpy as np
import pytest

from rlhf_jax.config import load_config
from rlhf_jax.errors import InputError
from rlhf_jax.playground import files
from rlhf_jax.playground import tasks as pg
from rlhf_jax.playground.labelers import Labeler
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
  harmful_verbs = {verb for verb, _ in pg._HARMFUL}  # pylint: disable=protected-access
  harmless_verbs = {verb for verb, _, _ in pg._HARMLESS}  # pylint: disable=protected-access
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
