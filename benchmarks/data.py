"""Host time of the data path per global batch, and its memory, at 10k to 1M examples.

  python benchmarks/data.py                                  # 10k, 100k, 1M examples
  python benchmarks/data.py --sizes=10000,100000 --steps=20

For each size a synthetic SFT JSONL file is generated (prompts of 8–40 words, responses of
40–360 words, from 2,000 words that a word-level tokenizer with a chat template maps to one
token each: about 230 tokens an example), then tokenized once into the token store
(`rlhf_jax.data.tokenized`, worker processes: timed as `tokenize_s`). Then, in a fresh process
that finds the store built (as a resumed run does), global batches of 256 rows × 2048 tokens
(`TokenData.batch`, every row, as one host makes them) are made with packing off and on, as
training makes them: `steps` consecutive steps from `start_step`, after the batch of
`start_step` - 1 (which computes its epoch's order and packing: `first_batch_ms`).
`ms_per_batch` is the median; `mean_ms_per_batch` the mean, which also carries the epochs that
begin among those steps (their order and packing are O(n), once per epoch); `peak_rss_mib` is
that process's peak resident memory, which counts the pages of the store's memory map that
the batches touched (file cache, which the OS reclaims); `anon_rss_mib` and `file_rss_mib`
split the resident memory at the end into the process's own (anonymous) and those pages.
The last line printed is one JSON object for scripts.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS, SEQ_LEN, VOCAB = 256, 2048, 2000


def make_tokenizer(directory: str):
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  specials = ['<unk>', '<pad>', '<s>', '<|end|>', '<|user|>', '<|assistant|>']
  vocab = {token: i for i, token in enumerate(specials + [f'w{i}' for i in range(VOCAB)])}
  word_level = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  word_level.pre_tokenizer = pre_tokenizers.Whitespace()
  template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
              "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=word_level, unk_token='<unk>', pad_token='<pad>', eos_token='<|end|>',
      bos_token='<s>', chat_template=template, additional_special_tokens=specials[4:])
  tokenizer.save_pretrained(directory)


def write_jsonl(path: str, n: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  words = np.array([f'w{i}' for i in range(VOCAB)])
  with open(path, 'w') as f:
    for start in range(0, n, 10_000):
      count = min(10_000, n - start)
      prompt_len = rng.integers(8, 41, count)
      response_len = rng.integers(40, 361, count)
      ids = rng.integers(0, VOCAB, (count, 400))
      f.writelines(json.dumps({'prompt': ' '.join(words[ids[i, :p]]),
                               'response': ' '.join(words[ids[i, p:p + r]])}) + '\n'
                   for i, (p, r) in enumerate(zip(prompt_len, response_len)))


def config_for(jsonl: str, tokenizer: str, cache: str, packing: bool):
  from rlhf_jax.config import data_config
  import ml_collections
  config = ml_collections.ConfigDict({'data': data_config({'synthetic': f'jsonl:{jsonl}'}),
                                      'train': {'seq_len': SEQ_LEN, 'batch_size': ROWS}})
  config.data.update(tokenizer=tokenizer, token_cache=cache, packing=packing,
                     max_prompt_len=64, eval_fraction=0.01)
  return config


def token_data(args, packing: bool):
  from rlhf_jax.data.pipeline import make_token_data
  from rlhf_jax.data.tokenizer import load_tokenizer
  config = config_for(args.jsonl, args.tokenizer, args.cache, packing)
  return make_token_data(config, load_tokenizer(args.tokenizer),
                         sources=dict(config.data.sources), kinds=('sft',),
                         cache_dir=args.cache)


def tokenize(args) -> dict:
  start = time.perf_counter()
  token_data(args, packing=False)
  return {'tokenize_s': time.perf_counter() - start}


def measure(args) -> dict:
  """Batch times with packing off and on, in this process (the store exists)."""
  out = {}
  for packing in (False, True):
    data = token_data(args, packing)
    start = time.perf_counter()
    data.batch('train', args.start_step - 1, range(ROWS))
    first = time.perf_counter() - start
    times = []
    for step in range(args.start_step, args.start_step + args.steps):
      start = time.perf_counter()
      batch = data.batch('train', step, range(ROWS))
      times.append(time.perf_counter() - start)
    assert batch['tokens'].shape == (ROWS, SEQ_LEN), batch['tokens'].shape
    name = 'packed' if packing else 'unpacked'
    out[name] = {'ms_per_batch': 1e3 * float(np.median(times)),
                 'mean_ms_per_batch': 1e3 * float(np.mean(times)), 'first_batch_ms': 1e3 * first,
                 'tokens_per_row': float(batch['attention_mask'].sum(-1).mean())}
  out['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  with open('/proc/self/status') as f:  # Linux: resident memory by kind, at the end.
    status = dict(line.split(':', 1) for line in f)
  for kind in ('RssAnon', 'RssFile'):
    if kind in status:
      out[f'{kind[3:].lower()}_rss_mib'] = int(status[kind].split()[0]) / 1024
  return out


def run_child(mode: str, args, jsonl: str, tokenizer: str, cache: str) -> dict:
  command = [sys.executable, __file__, f'--mode={mode}', f'--jsonl={jsonl}',
             f'--tokenizer={tokenizer}', f'--cache={cache}', f'--steps={args.steps}',
             f'--start_step={args.start_step}']
  result = subprocess.run(command, check=True, capture_output=True, text=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='10000,100000,1000000')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--start_step', type=int, default=1000, help='Where the timed steps '
                      'begin (as in a resumed run; several epochs in for the small sizes).')
  parser.add_argument('--dir', default='', help='Where files go (default: a temporary one).')
  parser.add_argument('--mode', default='main', choices=('main', 'tokenize', 'measure'))
  parser.add_argument('--jsonl'), parser.add_argument('--tokenizer')
  parser.add_argument('--cache')
  args = parser.parse_args()
  if args.mode != 'main':
    print(json.dumps((tokenize if args.mode == 'tokenize' else measure)(args)))
    return
  directory = args.dir or tempfile.mkdtemp(prefix='rlhf_jax_data_bench_')
  tokenizer = os.path.join(directory, 'tokenizer')
  make_tokenizer(tokenizer)
  results = {'ms_per_batch': {}, 'ms_per_batch_packed': {}, 'mean_ms_per_batch': {},
             'mean_ms_per_batch_packed': {}, 'first_batch_ms': {},
             'first_batch_ms_packed': {}, 'peak_rss_mib': {}, 'anon_rss_mib': {},
             'file_rss_mib': {}, 'tokenize_s': {},
             'generate_s': {}, 'tokens_per_row_packed': {}, 'cpus': os.cpu_count()}
  for size in [int(s) for s in args.sizes.split(',')]:
    jsonl = os.path.join(directory, f'sft_{size}.jsonl')
    cache = os.path.join(directory, f'tokens_{size}')
    start = time.perf_counter()
    if not os.path.exists(jsonl):
      write_jsonl(jsonl, size)
    results['generate_s'][size] = time.perf_counter() - start
    results['tokenize_s'][size] = run_child('tokenize', args, jsonl, tokenizer, cache)[
        'tokenize_s']
    m = run_child('measure', args, jsonl, tokenizer, cache)
    results['ms_per_batch'][size] = m['unpacked']['ms_per_batch']
    results['ms_per_batch_packed'][size] = m['packed']['ms_per_batch']
    results['mean_ms_per_batch'][size] = m['unpacked']['mean_ms_per_batch']
    results['mean_ms_per_batch_packed'][size] = m['packed']['mean_ms_per_batch']
    results['first_batch_ms'][size] = m['unpacked']['first_batch_ms']
    results['first_batch_ms_packed'][size] = m['packed']['first_batch_ms']
    results['tokens_per_row_packed'][size] = m['packed']['tokens_per_row']
    results['peak_rss_mib'][size] = m['peak_rss_mib']
    results['anon_rss_mib'][size] = m.get('anon_rss_mib')
    results['file_rss_mib'][size] = m.get('file_rss_mib')
    print(f'{size:>9,} examples: {m["unpacked"]["ms_per_batch"]:7.2f} ms/batch (mean '
          f'{m["unpacked"]["mean_ms_per_batch"]:.2f}), packed {m["packed"]["ms_per_batch"]:7.2f} '
          f'(mean {m["packed"]["mean_ms_per_batch"]:.2f}; {m["packed"]["tokens_per_row"]:.0f} '
          f'tokens/row); first batch {m["unpacked"]["first_batch_ms"]:.0f} / '
          f'{m["packed"]["first_batch_ms"]:.0f} ms; peak RSS {m["peak_rss_mib"]:.0f} MiB (at the '
          f'end {m.get("anon_rss_mib", 0):.0f} own + {m.get("file_rss_mib", 0):.0f} mapped); '
          f'tokenized once in {results["tokenize_s"][size]:.1f} s', flush=True)
  print(json.dumps({k: {str(s): v for s, v in d.items()} if isinstance(d, dict) else d
                    for k, d in results.items()}))


if __name__ == '__main__':
  main()
