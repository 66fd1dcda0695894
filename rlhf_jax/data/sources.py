"""Data sources named in a config, read, validated and tokenized into examples.

`config.data.sources` maps a name to a spec; `config.data.weights` mixes them:

    playground:sft | playground:preference | playground:text   built-in generated data
    jsonl:PATH           a JSONL file; with '{split}' in PATH one file per split, otherwise
                         config.data.eval_fraction of it (a seeded choice) is held out for eval
    tfds:NAME            a prepared TFDS dataset, read with tfds.data_source (no TensorFlow);
                         splits named by config.data.tfds_splits, from config.data.tfds_data_dir

Playground data are written as JSONL files (into `<workdir>/data`) and read back through
the same reader as a user's files, so the built-in data exercise the real loading path.
"""

import collections
import dataclasses
import json
import math
import os
import re

import numpy as np
from absl import logging

from rlhf_jax.data import playground, tfds_source
from rlhf_jax.data.batching import Piece
from rlhf_jax.data.datasets import Example
from rlhf_jax.data.encoding import encode_preference, encode_sft
from rlhf_jax.data.labelers import Labeler, num_words
from rlhf_jax.data.records import InvalidExample, Records, read_jsonl

SPLITS = ('train', 'eval')
KINDS = ('sft', 'preference', 'text')


def parse_spec(spec: str, key: str) -> tuple[str, str]:
  scheme, _, location = spec.partition(':')
  if scheme not in ('playground', 'jsonl', 'tfds') or not location:
    raise ValueError(f'{key}={spec!r}: expected "playground:KIND", "jsonl:PATH" or '
                     '"tfds:NAME".')
  if scheme == 'playground' and location not in KINDS:
    raise ValueError(f'{key}={spec!r}: the playground has {KINDS}.')
  return scheme, location


def read_source(spec: str, kinds: tuple[str, ...], *, data, cache_dir: str, key: str,
                gold=None, answer_pairs=None) -> tuple[str, dict[str, Records]]:
  """(kind, records of both splits) of one source. `data` is the config's `data` entry.

  gold: `gold(prompts, responses) -> rewards` that labels playground preference pairs;
  answer_pairs: `(prompts, split) -> (answers, other answers)`, where they come from a policy.

  The kind is the playground's name for it, or read off the fields of a file's first example:
  "chosen" → preference, "text" → text, otherwise sft. It must be one of `kinds`.
  """
  scheme, location = parse_spec(spec, key)
  if scheme == 'playground':
    kind = location
  elif scheme == 'tfds':
    kind = kind_of_fields(tfds_source.feature_names(location, data.tfds_splits['train'],
                                                    data_dir=data.tfds_data_dir))
  else:
    kind = kind_of_fields(_first_object(location.format(split='train')))
  if kind not in kinds:
    raise ValueError(f'{key}={spec!r} holds {kind!r} examples; this trainer reads {kinds}.')
  if scheme == 'playground':
    return kind, {split: read_jsonl(playground_file(kind, split, data.playground, cache_dir,
                                                    gold=gold, answer_pairs=answer_pairs), kind)
                  for split in SPLITS}
  if scheme == 'tfds':
    return kind, {split: tfds_source.tfds_records(
        location, data.tfds_splits[split], data_dir=data.tfds_data_dir, kind=kind,
        skip_invalid=data.skip_invalid) for split in SPLITS}
  if '{split}' in location:
    return kind, {split: read_jsonl(location.format(split=split), kind,
                                    skip_invalid=data.skip_invalid) for split in SPLITS}
  return kind, _hold_out(read_jsonl(location, kind, skip_invalid=data.skip_invalid),
                         data.eval_fraction, seed=data.seed, key=key)


def kind_of_fields(fields) -> str:
  fields = set(fields)
  return 'preference' if 'chosen' in fields else 'text' if 'text' in fields else 'sft'


def _first_object(path: str) -> dict:
  """The first example of a JSONL file, or {} if it does not parse (the reader then says why)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No such JSONL file: {path}')
  with open(path, 'rb') as f:
    for line in f:
      if line.strip():
        try:
          obj = json.loads(line)
        except ValueError:
          return {}
        return obj if isinstance(obj, dict) else {}
  return {}


def _hold_out(records: Records, fraction: float, *, seed: int, key: str) -> dict[str, Records]:
  n = len(records.records)
  n_eval = math.ceil(n * fraction)
  if not 0 < n_eval < n:
    raise ValueError(f'{key}: config.data.eval_fraction={fraction} of {n} examples leaves an '
                     'empty split; give a file per split with "{split}" in the path.')
  eval_rows = set(np.random.default_rng([seed, 5]).permutation(n)[:n_eval].tolist())
  split = lambda keep: Records([r for i, r in enumerate(records.records) if keep(i)],
                               records.skipped)
  return {'train': split(lambda i: i not in eval_rows),
          'eval': split(lambda i: i in eval_rows)}


def playground_file(kind: str, split: str, p, cache_dir: str, *, gold=None,
                    answer_pairs=None) -> str:
  """Writes the playground's `kind` examples of `split` once; returns the path.

  p: the config's `data.playground` entry. Each process writes a file of its own and renames
  it into place, so concurrent writers (several hosts) never leave a partial file.
  """
  size = p.train_size if split == 'train' else p.eval_size
  name = f'playground-{kind}-{split}-n{size}-seed{p.seed}'
  if kind == 'preference':
    name += (f'-T{p.label_temperature}-len{p.length_bias}-gold-{_slug(p.gold)}'
             f'-pairs-{_slug(p.pairs)}')
  path = os.path.join(cache_dir, name + '.jsonl')
  if not os.path.exists(path):
    os.makedirs(cache_dir, exist_ok=True)
    rows = playground_rows(kind, split, size, seed=p.seed, gold=gold, answer_pairs=answer_pairs,
                           labeler=Labeler(p.label_temperature, p.length_bias))
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
    os.replace(tmp, path)
  return path


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9.]+', '_', text).strip('_')[-60:]


def playground_rows(kind: str, split: str, n: int, *, seed: int, labeler: Labeler,
                    gold=None, answer_pairs=None) -> list:
  """The JSON objects of a playground file; preference rows also keep their gold rewards.

  Preference pairs are two corruptions of the best answer, or with `answer_pairs(prompts,
  split)` two answers of a policy; pairs whose answers are the same are redrawn
  (corruptions) or left out (a policy's, as are pairs with an empty answer). gold(prompts, responses) -> rewards labels them
  (default: the playground's program).
  """
  if kind == 'text':
    rng = np.random.default_rng([seed, playground.SPLITS[split], 9])
    return [{'text': playground.pretraining_document(rng)} for _ in range(n)]
  prompts = playground.sample_prompts(seed, split, n)
  if kind == 'sft':
    return [{'prompt': p, 'response': playground.reference(p)} for p in prompts]
  rngs = [np.random.default_rng([seed, playground.SPLITS[split], i, 3]) for i in range(n)]
  if answer_pairs is None:
    pairs = [_corruption_pair(prompt, rng) for prompt, rng in zip(prompts, rngs)]
  else:
    pairs = list(zip(*answer_pairs(prompts, split)))
    kept = [i for i, (a, b) in enumerate(pairs) if a != b and a.strip() and b.strip()]
    prompts, pairs, rngs = ([xs[i] for i in kept] for xs in (prompts, pairs, rngs))
  gold = gold or program_gold
  gold_a, gold_b = (gold(prompts, [pair[j] for pair in pairs]) for j in (0, 1))
  rows = []
  for prompt, (a, b), g_a, g_b, rng in zip(prompts, pairs, gold_a, gold_b, rngs):
    a_wins, p_a = labeler.label(g_a, g_b, num_words(a), num_words(b), rng)
    (chosen, g_c), (rejected, g_r) = ((a, g_a), (b, g_b))[::1 if a_wins else -1]
    rows.append({'prompt': prompt, 'chosen': chosen, 'rejected': rejected,
                 'gold_chosen': float(g_c), 'gold_rejected': float(g_r),
                 'p_chosen': float(p_a if a_wins else 1 - p_a)})
  return rows


def _corruption_pair(prompt: str, rng: np.random.Generator) -> tuple[str, str]:
  a, b = playground.corrupt(prompt, rng), playground.corrupt(prompt, rng)
  while a == b:  # A pair must differ; redraw the second answer.
    b = playground.corrupt(prompt, rng)
  return a, b


def program_gold(prompts, responses) -> np.ndarray:
  """The playground's programmatic gold reward of each (prompt, response)."""
  return np.array([playground.gold_reward(p, r) for p, r in zip(prompts, responses)])


@dataclasses.dataclass
class EncodedSplits:
  """Examples per split of one source, the record of each, and what was skipped or cut."""
  examples: dict[str, list[Example]]
  records: dict[str, list]
  stats: collections.Counter


def encode_source(records: dict[str, Records], kind: str, tokenizer, *, data,
                  seq_len: int) -> EncodedSplits:
  """Token pieces of every example; invalid ones raise, or are counted when skip_invalid."""
  stats = collections.Counter()
  examples, origins = {}, {}
  for split, recs in records.items():
    stats.update({f'skipped/{reason}': n for reason, n in recs.skipped.items()})
    examples[split], origins[split] = [], []
    for record in recs.records:
      try:
        encoded = _encode(record, kind, tokenizer, data=data, seq_len=seq_len, stats=stats)
        examples[split] += encoded
        origins[split] += [record] * len(encoded)
      except InvalidExample as e:
        if not data.skip_invalid:
          raise
        logging.warning('Skipped %s', e)
        stats[f'skipped/{e.reason}'] += 1
    if not examples[split]:
      raise ValueError(f'No valid {split} examples in this source.')
  return EncodedSplits(examples, origins, stats)


def _encode(record, kind: str, tokenizer, *, data, seq_len: int, stats) -> list[Example]:
  if kind == 'text':  # Pretraining: documents cut into rows of seq_len, loss on every token.
    ids = tokenizer.encode(record.text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [(_piece([], ids[i:i + seq_len]),) for i in range(0, len(ids), seq_len)]
  options = dict(seq_len=seq_len, max_prompt_len=data.max_prompt_len,
                 truncation=data.truncation)
  if kind == 'sft':
    encoded = encode_sft(record, tokenizer, **options)
    stats.update(f'truncated/{part}' for part in encoded.truncated)
    return [(_piece(encoded.prompt_ids, encoded.response_ids),)]
  encoded = encode_preference(record, tokenizer, **options)
  stats.update(f'truncated/{part}' for part in encoded.truncated)
  return [(_piece(encoded.prompt_ids, encoded.chosen_ids),
           _piece(encoded.prompt_ids, encoded.rejected_ids))]


def _piece(prompt_ids, response_ids) -> Piece:
  ids = np.asarray(list(prompt_ids) + list(response_ids), np.int32)
  mask = np.zeros(len(ids), np.int32)
  mask[len(prompt_ids):] = 1
  return ids, mask
