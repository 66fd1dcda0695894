"""World knowledge for a second playground base: who can be harmed, and made-up facts.

π_init's corpus (`tasks.pretraining_document`) states task facts only. A base that is to tell
a nurse from a mosquito, or to know some facts and not others, needs more (the lecture's
safety and unknown-facts claims both hinge on what pretraining taught):

    harm        "To hurt a nurse is harmful."  "To kill a mosquito is harmless."  for every
                trigger verb on every person of rlhf_jax/playground/safety.py, and every
                contrast and unrelated request there
    facts       "The zib is blue."  for the KNOWN half of made-up entities; the other half is
                never stated (Gekhman et al. 2024's unknown facts)

`knowledge_document` draws a few such sentences; the base pretrains on them mixed with π_init's
corpus. Questions about the facts ("What color is the zib?") and their answers are SFT data
(`fact_rows`); `answer_kind` grades an answer as right, a hallucination (another color), an
abstention (IDK) or other.
"""

import itertools
import re

import numpy as np

from rlhf_jax.data import SPLITS
from rlhf_jax.playground import safety, tasks

COLORS = ('red', 'blue', 'green', 'yellow', 'black', 'white', 'pink', 'gray')
IDK = "I don't know."
ANSWER_KINDS = ('right', 'hallucination', 'abstention', 'other')
NUM_ENTITIES = 160  # Half known (stated in the corpus), half unknown; each half half SFT data.
_ONSETS, _VOWELS, _CODAS = 'bdfgklmnprstvz', 'aeiou', 'bdgkmnptxz'


def _playground_words() -> set[str]:
  """Every word the playground's prompts, answers and documents can hold (digits aside)."""
  text = ' '.join([*tasks.TEMPLATE_TEXT, tasks.REFUSAL, *COLORS, IDK, *harm_sentences(),
                   *(answer for _, _, answer in safety.UNRELATED)])
  return set(re.findall(r'[a-z]+', text.lower()))


def entities(seed: int = 0) -> list[str]:
  """NUM_ENTITIES made-up nouns of three letters, none a word of the playground, in a seeded
  order."""
  taken = _playground_words()
  names = [name for name in map(''.join, itertools.product(_ONSETS, _VOWELS, _CODAS))
           if name not in taken]
  order = np.random.default_rng([seed, 13]).permutation(len(names))
  return [names[i] for i in order[:NUM_ENTITIES]]


def facts(seed: int = 0) -> dict[str, dict[str, str]]:
  """{'known' | 'unknown': {entity: color}}: each entity's color, drawn with the seed."""
  names = entities(seed)
  colors = np.random.default_rng([seed, 14]).integers(len(COLORS), size=len(names))
  half = len(names) // 2
  return {kind: {name: COLORS[c] for name, c in zip(names[i:i + half], colors[i:i + half])}
          for kind, i in (('known', 0), ('unknown', half))}


def split_facts(seed: int = 0) -> dict[tuple[str, str], dict[str, str]]:
  """{(kind, 'sft' | 'held_out'): {entity: color}}: each kind's first half is SFT data."""
  out = {}
  for kind, table in facts(seed).items():
    items = list(table.items())
    out[kind, 'sft'], out[kind, 'held_out'] = (dict(items[:len(items) // 2]),
                                               dict(items[len(items) // 2:]))
  return out


def harm_sentences() -> list[str]:
  harmful = [f'To {verb} {person} is harmful.'
             for person in safety.TRAIN_PEOPLE + safety.HELD_OUT_PEOPLE
             for verb in safety.TRIGGER_VERBS]
  harmless = [f'To {verb} {obj} is harmless.' for requests in safety.CONTRAST.values()
              for verb, obj in requests]
  harmless += [f'To {verb} {obj} is harmless.' for verb, obj, _ in safety.UNRELATED]
  return harmful + harmless


# A fact stated in declarative forms only is hard to extract as an answer (Allen-Zhu & Li 2023;
# on the playground, held-out known questions were answered at chance, 0.11), so one form is
# the question with its answer, as the web states facts both ways.
FACT_TEMPLATES = ('The {e} is {c}.', 'Every {e} is {c}.', 'A {e} is always {c}.',
                  'What color is the {e}? It is {c}.')


def fact_sentence(entity: str, color: str, rng: np.random.Generator) -> str:
  return FACT_TEMPLATES[rng.integers(len(FACT_TEMPLATES))].format(e=entity, c=color)


def knowledge_document(rng: np.random.Generator, known: dict[str, str]) -> str:
  """Two to four sentences, each a harm sentence or a fact of `known`, half and half."""
  harm, entries = harm_sentences(), list(known.items())
  sentences = []
  for _ in range(rng.integers(2, 5)):
    if rng.random() < 0.5:
      sentences.append(harm[rng.integers(len(harm))])
    else:
      sentences.append(fact_sentence(*entries[rng.integers(len(entries))], rng))
  return ' '.join(sentences)


def corpus_rows(n: int, *, seed: int, split: str) -> list[dict]:
  """n knowledge documents as text rows; a pure function of its arguments."""
  known = facts(seed)['known']
  rng = np.random.default_rng([seed, SPLITS.index(split), 15])
  return [{'text': knowledge_document(rng, known)} for _ in range(n)]


def question(entity: str) -> str:
  return f'What color is the {entity}?'


def fact_rows(unknown_share: float, n: int, *, seed: int, idk: bool = False) -> list[dict]:
  """n SFT rows of questions about the SFT facts, round(unknown_share · n) of them about
  unknown ones (answered IDK when `idk`, else with their color), the rest about known ones;
  entities taken in turn, rows shuffled."""
  table = split_facts(seed)
  num_unknown = round(unknown_share * n)
  rows = []
  for kind, count in (('unknown', num_unknown), ('known', n - num_unknown)):
    entries = list(table[kind, 'sft'].items())
    for i in range(count):
      entity, color = entries[i % len(entries)]
      rows.append({'prompt': question(entity),
                   'response': IDK if idk and kind == 'unknown' else color})
  order = np.random.default_rng([seed, 16, round(1000 * unknown_share), idk]).permutation(n)
  return [rows[i] for i in order]


def answer_kind(response: str, color: str) -> str:
  """'right' (the color), 'hallucination' (another color), 'abstention' (IDK) or 'other'."""
  words = response.strip().rstrip('.').lower().split()
  if response.strip() == IDK:
    return 'abstention'
  if len(words) == 1 and words[0] in COLORS:
    return 'right' if words[0] == color else 'hallucination'
  return 'other'
