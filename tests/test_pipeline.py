"""The SFT, midtraining-mix and reward-model trainers end to end, as a user runs them.

Every run is a real `python -m rlhf_jax.main` subprocess on one CPU device, shrunk to a
one-layer model, four steps and a few hundred playground examples. Runs that do not depend on
each other start together (the machine has two cores). All runs share one playground tokenizer
(`--config.data.tokenizer`) and the session's persistent XLA compilation cache (conftest.py), so a
shape compiles once.
Config errors, raised before anything is built, and the mixture's rows are checked in-process.
"""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from data_fixtures import write_jsonl
from devices import environment
from hf_fixtures import VOCAB as HF_VOCAB
from hf_fixtures import tiny_model
from test_resume import finish

from rlhf_jax.playground import tasks
from rlhf_jax.playground.labelers import Labeler
from rlhf_jax import algorithms
from rlhf_jax.context import RunContext
from rlhf_jax.models import loading
from rlhf_jax.playground.files import playground_rows
from rlhf_jax.data.tfds_source import prepare_from_jsonl
from rlhf_jax.playground.tokenizer import build_playground_tokenizer
from rlhf_jax.models import Transformer, load_hf, lora, quantization
from rlhf_jax.algorithms import sft
from rlhf_jax.engine.metrics import read_metrics
from rlhf_jax.export import export
from rlhf_jax.models.scoring import sequence_rewards

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
VOCAB = 512  # The playground tokenizer's size (specials included).
MODEL = ['--config.model.n_layers=1', '--config.model.d_model=32', '--config.model.n_heads=2',
         '--config.model.n_kv_heads=1', '--config.model.d_ff=64']
RUN = [f'--config.train.steps={STEPS}', '--config.train.batch_size=8',
       '--config.train.seq_len=48', f'--config.train.eval_every={STEPS}',
       '--config.train.log_every=1', '--config.train.progress_bar=False',
       '--config.train.tensorboard=False', '--config.data.playground.train_size=200',
       '--config.data.playground.eval_size=32']
SAMPLES = ['--config.eval.num_prompts=8', '--config.eval.max_new_tokens=8']
NO_EXPORT = ['--config.train.export_hf=False']
# No evaluation, no export; a flag given twice takes its last value.
TRAIN_ONLY = ['--config.train.eval_every=0', '--config.eval.gold=', *NO_EXPORT]
LABELER = Labeler(temperature=0.1, length_bias=0.0)  # configs' playground defaults.


@pytest.fixture(scope='module')
def env():
  """One CPU device (whatever conftest.py set for in-process tests); the session's XLA cache
  (conftest.py) comes with the rest of the environment."""
  return environment(1)


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  """The playground tokenizer, built once (each run would otherwise build its own)."""
  path = tmp_path_factory.mktemp('tokenizer')
  build_playground_tokenizer(VOCAB).save_pretrained(path)
  return path


def start(env, workdir, config: str, *overrides) -> subprocess.Popen:
  command = [sys.executable, '-m', 'rlhf_jax.main', f'--config={ROOT}/configs/{config}',
             f'--workdir={workdir}', *overrides]
  return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def finish_all(processes) -> None:
  for process in processes:
    finish(process)


def train_records(metrics: list[dict]) -> list[dict]:
  return [m for m in metrics if 'loss' in m]


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def param_norm(model: torch.nn.Module) -> float:
  """Global L2 norm of a torch model's parameters (a tied embedding counted once)."""
  return sum(float((p.detach().double() ** 2).sum()) for p in model.parameters()) ** 0.5


@pytest.fixture(scope='module')
def sft_run(env, tokenizer_dir, tmp_path_factory):
  """The SFT playground run: eval at step 0 and at the end, the model exported to <workdir>/hf."""
  workdir = tmp_path_factory.mktemp('sft')
  finish(start(env, workdir, 'sft.py:tiny', *MODEL, *RUN, *SAMPLES,
               f'--config.data.tokenizer={tokenizer_dir}', '--config.optim.warmup_steps=1',
               '--config.optim.lr=1e-2'))
  return workdir


def test_sft_run_evaluates_samples_and_exports_a_transformers_model(sft_run, tokenizer_dir):
  metrics = read_metrics(sft_run / 'metrics.jsonl')
  evals = {m['step']: m for m in metrics if 'eval/loss' in m}
  assert sorted(evals) == [0, STEPS]
  assert [m['step'] for m in train_records(metrics)] == [1, 2, 3, 4]
  # Before training the model is nearly uniform over the vocabulary; training lowers the loss.
  assert evals[0]['eval/loss'] == pytest.approx(math.log(VOCAB), abs=0.05)
  assert evals[STEPS]['eval/loss'] < evals[0]['eval/loss'] - 0.05

  prompts = tasks.sample_prompts(0, 'eval', 8)  # config.eval.num_prompts held-out prompts.
  task_names = ('sort', 'add', 'repeat', 'safety')  # Taken in turn: each twice.
  for step, record in evals.items():
    samples = read_jsonl(sft_run / 'samples' / f'step_{step}.jsonl')
    assert [s['prompt'] for s in samples] == prompts
    gold = np.array([tasks.gold_reward(s['prompt'], s['response']) for s in samples])
    np.testing.assert_allclose([s['gold'] for s in samples], gold)
    assert record['eval/samples/gold_reward'] == pytest.approx(gold.mean())
    per_task = {k: v for k, v in record.items() if k.startswith('eval/samples/gold_reward/')}
    assert per_task == pytest.approx({f'eval/samples/gold_reward/{task}': gold[i::4].mean()
                                      for i, task in enumerate(task_names)})

  hf_dir = sft_run / 'hf'
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  playground_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  assert tokenizer.get_vocab() == playground_tokenizer.get_vocab()
  assert torch_model.config.eos_token_id == tokenizer.convert_tokens_to_ids('<|end|>')
  assert torch_model.config.pad_token_id == tokenizer.pad_token_id
  # The exported weights are the trained ones: the norm the last step logged.
  assert param_norm(torch_model) == pytest.approx(train_records(metrics)[-1]['param_norm'],
                                                    rel=1e-5)

  ids = tokenizer(prompts[0])['input_ids']
  with torch.no_grad():
    torch_logits = torch_model(torch.tensor([ids])).logits.numpy()
  ours = load_hf(hf_dir)(np.array([ids]))
  assert torch_logits.shape == (1, len(ids), VOCAB)
  np.testing.assert_allclose(np.asarray(ours), torch_logits, atol=1e-4)


def test_reward_model_from_the_sft_export(sft_run, env, tmp_path):
  workdir = tmp_path / 'rm'
  # No model flags: the architecture comes from the SFT checkpoint, and so does the tokenizer.
  finish(start(env, workdir, 'rm.py:tiny', *RUN, f'--config.model.hf_path={sft_run / "hf"}',
               '--config.data.tokenizer='))
  metrics = read_metrics(workdir / 'metrics.jsonl')
  evals = {m['step']: m for m in metrics if 'eval/loss' in m}
  assert sorted(evals) == [0, STEPS]
  # The scalar head starts at zero: every reward is 0, every pair a tie.
  assert evals[0]['eval/reward_chosen'] == evals[0]['eval/reward_rejected'] == 0
  assert evals[0]['eval/pairs/accuracy'] == evals[0]['eval/pairs/mean_prob'] == 0.5
  assert evals[0]['eval/pairs/ece'] == 0  # p = 0.5 on both orientations, half of them right.
  assert evals[0]['eval/loss'] == pytest.approx(math.log(2), abs=1e-5)

  # The labelers' ceiling, mean σ(|Δ| / T) over the held-out pairs' gold gaps.
  pairs = playground_rows('preference', 'eval', 32, seed=0, labeler=LABELER)
  gaps = np.array([p['gold_chosen'] - p['gold_rejected'] for p in pairs])
  ceiling = np.mean(1 / (1 + np.exp(-np.abs(gaps) / LABELER.temperature)))
  assert 0.5 < ceiling <= 1
  assert evals[STEPS]['eval/pairs/labeler_ceiling'] == pytest.approx(ceiling, rel=1e-9)
  for step in (0, STEPS):
    assert (workdir / 'plots' / f'reliability_step_{step}.png').read_bytes()[:8] == (
        b'\x89PNG\r\n\x1a\n')

  hf_dir = workdir / 'hf'
  torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert torch_model.config.num_labels == 1
  assert torch_model.score.weight.abs().sum() > 0  # The head has learned from zero.
  assert param_norm(torch_model) == pytest.approx(train_records(metrics)[-1]['param_norm'],
                                                    rel=1e-5)
  # A right-padded pair of answers: HF reads the last non-pad token, as we do.
  rows = [tokenizer(text)['input_ids'] for text in ('Add: 2 + 3', 'The answer is 5 and 7')]
  length = max(map(len, rows))
  tokens = np.array([r + [tokenizer.pad_token_id] * (length - len(r)) for r in rows])
  mask = np.array([[1] * len(r) + [0] * (length - len(r)) for r in rows])
  with torch.no_grad():
    torch_rewards = torch_model(torch.tensor(tokens), attention_mask=torch.tensor(mask))
  ours = sequence_rewards(load_hf(hf_dir, head='scalar'), tokens, mask)
  np.testing.assert_allclose(np.asarray(ours), torch_rewards.logits[:, 0].numpy(), atol=1e-5)


def test_tfds_trains_exactly_like_its_jsonl(env, tokenizer_dir, tmp_path):
  """The same examples from JSONL files and from the TFDS dataset prepared from them give
  the same batches, so the same losses to the last bit (SFT and reward model)."""
  data_dir = tmp_path / 'tfds'
  runs = []
  for kind, config, name in (('sft', 'sft.py:tiny', 'pipeline_sft'),
                             ('preference', 'rm.py:tiny', 'pipeline_pairs')):
    paths = {split: write_jsonl(tmp_path / f'{kind}-{split}.jsonl',
                                playground_rows(kind, split, n, seed=0, labeler=LABELER))
             for split, n in (('train', 64), ('eval', 16))}
    # The eval split gets another name in TFDS, found through config.data.splits.
    prepare_from_jsonl(name, kind, {'train': paths['train'], 'validation': paths['eval']},
                       data_dir=data_dir)
    key = f'--config.data.sources.{"sft" if kind == "sft" else "pairs"}'
    common = [*MODEL, *RUN, *NO_EXPORT, f'--config.data.tokenizer={tokenizer_dir}',
              '--config.eval.gold=', '--config.train.eval_at_start=False']
    runs.append((start(env, tmp_path / f'{kind}-jsonl', config, *common,
                       f'{key}=jsonl:{tmp_path}/{kind}-{{split}}.jsonl'),
                 start(env, tmp_path / f'{kind}-tfds', config, *common, f'{key}=tfds:{name}',
                       f'--config.data.tfds_data_dir={data_dir}',
                       '--config.data.splits.eval=validation')))
  finish_all(p for pair in runs for p in pair)
  for kind in ('sft', 'preference'):
    from_jsonl = read_metrics(tmp_path / f'{kind}-jsonl' / 'metrics.jsonl')
    assert len(train_records(from_jsonl)) == STEPS
    assert [m['step'] for m in from_jsonl if 'eval/loss' in m] == [STEPS]
    assert read_metrics(tmp_path / f'{kind}-tfds' / 'metrics.jsonl') == from_jsonl, kind


def test_bad_examples_stop_the_run_or_are_counted(env, tokenizer_dir, tmp_path):
  rows = playground_rows('sft', 'train', 16, seed=0, labeler=LABELER)
  long_prompt = {'prompt': ' '.join(['word'] * 100), 'response': 'ok'}  # > 32 prompt tokens.
  malformed = '{"prompt": "Add: 1 + 2", "response": '
  data = tmp_path / 'data'
  data.mkdir()
  bad = write_jsonl(data / 'bad-train.jsonl', [*rows[:2], malformed, rows[2], long_prompt,
                                               *rows[3:]])
  too_long = write_jsonl(data / 'long-train.jsonl', [rows[0], long_prompt, *rows[1:]])
  for name in ('bad', 'long'):
    write_jsonl(data / f'{name}-eval.jsonl', rows)

  def launch(workdir, name, *overrides):
    return start(env, tmp_path / workdir, 'sft.py:tiny', *MODEL, *RUN, *TRAIN_ONLY,
                 f'--config.data.tokenizer={tokenizer_dir}',
                 f'--config.data.sources.sft=jsonl:{data}/{name}-{{split}}.jsonl', *overrides)
  stop, stop_long = launch('stop', 'bad'), launch('stop_long', 'long')
  skip = launch('skip', 'bad', '--config.data.skip_invalid=True')
  stderr, long_stderr = (finish(p, expect_ok=False) for p in (stop, stop_long))
  finish(skip)

  assert stop.returncode != 0
  assert f'{bad}:3: malformed JSON' in stderr, stderr[-3000:]
  assert stop_long.returncode != 0
  assert f'{too_long}:2: prompt has' in long_stderr, long_stderr[-3000:]
  assert 'config.data.max_prompt_len=32' in long_stderr
  metrics = read_metrics(tmp_path / 'skip' / 'metrics.jsonl')
  assert metrics[0] == {'step': 0, 'data/sft/skipped/malformed_json': 1,
                        'data/sft/skipped/prompt_too_long': 1}
  assert [m['step'] for m in metrics[1:]] == [1, 2, 3, 4]


def test_config_errors_name_the_culprit(tokenizer_dir, tmp_path):
  """Raised before any data is tokenized or any model built, so checked in-process."""
  tiny_model('qwen2').save_pretrained(tmp_path / 'qwen2')
  for split in ('train', 'eval'):  # Unpaired (KTO) examples: SFT reads pairs, not these.
    write_jsonl(tmp_path / f'kto-{split}.jsonl',
                [{'prompt': row['prompt'], 'completion': row['chosen'], 'label': True}
                 for row in playground_rows('preference', split, 8, seed=0, labeler=LABELER)])
  cases = [  # (config overrides, what the error must say)
      ({'data.sources.sft': 'foo:bar'}, ["config.data.sources.sft='foo:bar'", '"jsonl:PATH"']),
      ({'data.sources.sft': f'jsonl:{tmp_path}/kto-{{split}}.jsonl'},
       ['config.data.sources.sft=', "holds 'unpaired' examples", "('sft', 'text')"]),
      ({'model.vocab_size': 256},
       [f'The tokenizer has {VOCAB} tokens but config.model.vocab_size=256']),
      # A checkpoint's vocabulary is checked as well: its embedding has no row for ids >= 100.
      ({'model.hf_path': str(tmp_path / 'qwen2')},
       [f'The tokenizer has {VOCAB} tokens', 'config.model.hf_path=',
        f'vocab_size={HF_VOCAB}']),
  ]
  for i, (overrides, messages) in enumerate(cases):
    config = load_config('sft', 'tiny')
    config.data.tokenizer = str(tokenizer_dir)
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError) as error:
      sft.make_algorithm(RunContext(config, str(tmp_path / str(i))))
    for message in messages:
      assert message in str(error.value), (overrides, str(error.value))


def test_midtraining_mix_runs_with_and_without_packing(env, tokenizer_dir, tmp_path):
  processes = [start(env, tmp_path / f'packing={packing}', 'sft.py:mix', *MODEL, *RUN, *TRAIN_ONLY,
                     f'--config.data.tokenizer={tokenizer_dir}',
                     f'--config.data.packing={packing}')
               for packing in (False, True)]
  finish_all(processes)
  unpacked, packed = (read_metrics(tmp_path / f'packing={p}' / 'metrics.jsonl')
                      for p in (False, True))
  for metrics in (unpacked, packed):
    assert [m['step'] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m['loss']) for m in metrics)
  # Packed rows hold several examples each, so more target tokens per batch.
  assert all(p['target_tokens'] > u['target_tokens'] for p, u in zip(packed, unpacked))


def load_config(name: str, preset: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.mark.parametrize('packing', [False, True])
def test_midtraining_switches_to_sft_only_at_the_decay_stage(tokenizer_dir, tmp_path, packing):
  config = load_config('sft', 'mix')  # weights sft 3 : text 1, then sft 1 : text 0.
  config.train.steps, config.train.batch_size, config.train.seq_len = 10, 8, 48
  config.data.tokenizer, config.data.packing = str(tokenizer_dir), packing
  config.data.playground.train_size, config.data.playground.eval_size = 200, 32
  data = RunContext(config, str(tmp_path)).token_data(kinds=('sft', 'text'))
  # The decay stage is the last 20 % of 10 steps: steps 8 and 9. Before it, 3/4 of 8 rows are
  # SFT and 1/4 text in every batch; from it on, all 8 are SFT.
  expected_text_rows = [2] * 8 + [0] * 2
  text_rows = []
  for step in range(10):
    batch = data.batch('train', step, range(8))
    real = batch['attention_mask'].astype(bool)
    assert real.any(axis=1).all()
    # Text has loss on every token; an SFT example has none on its prompt.
    text_rows.append(int(sum((batch['loss_mask'][i][real[i]] == 1).all() for i in range(8))))
    assert ('segment_ids' in batch) == packing
    if packing:  # Some row holds more than one example.
      assert batch['segment_ids'].max() > 1
  assert text_rows == expected_text_rows


def test_dpo_precomputed_reference_gives_the_on_the_fly_trace(sft_run, env, tmp_path):
  """DPO from the SFT export: the reference's log-probs computed once before training (and the
  reference dropped) give the loss trace of a frozen reference evaluated in every step. SimPO,
  and KTO on a file in TRL's unpaired form, train from the same export."""
  common = [*RUN, *SAMPLES, f'--config.model.hf_path={sft_run / "hf"}',
            '--config.data.tokenizer=', '--config.optim.warmup_steps=1', '--config.optim.lr=1e-3']
  workdirs = {mode: tmp_path / mode for mode in ('on_the_fly', 'precomputed', 'simpo', 'kto')}
  finish_all([
      start(env, workdirs['on_the_fly'], 'dpo.py:tiny', *common),
      start(env, workdirs['precomputed'], 'dpo.py:tiny', *common,
            '--config.loss.precompute_ref=True')])
  for split, n in (('train', 96), ('eval', 16)):  # Every chosen answer, half the rejected.
    write_jsonl(tmp_path / f'kto_{split}.jsonl', [
        {'prompt': pair['prompt'], 'completion': pair[key], 'label': key == 'chosen'}
        for i, pair in enumerate(playground_rows('preference', split, n, seed=0,
                                                 labeler=LABELER))
        for key in ('chosen', 'rejected') if key == 'chosen' or i % 2])
  finish_all([
      start(env, workdirs['simpo'], 'dpo.py:tiny', *common, '--config.loss.loss_type=simpo',
            '--config.loss.beta=2.0'),
      start(env, workdirs['kto'], 'kto.py:tiny', *common, '--config.loss.undesirable_weight=1.5',
            f'--config.data.sources={{"kto": "jsonl:{tmp_path}/kto_{{split}}.jsonl"}}',
            '--config.data.weights={"kto": 1.0}')])
  metrics = {mode: read_metrics(path / 'metrics.jsonl') for mode, path in workdirs.items()}
  on_the_fly, precomputed = (train_records(metrics[m]) for m in ('on_the_fly', 'precomputed'))
  assert [m['step'] for m in on_the_fly] == [1, 2, 3, 4]
  # Step 1: the policy is the reference, every log-ratio is 0 and the loss is log 2.
  assert on_the_fly[0]['loss'] == pytest.approx(math.log(2), abs=1e-6)
  for key in ('loss', 'rewards/margins', 'grad_norm'):
    np.testing.assert_allclose([m[key] for m in precomputed], [m[key] for m in on_the_fly],
                               rtol=1e-4, atol=1e-6)
  assert on_the_fly[-1]['rewards/margins'] > 0  # The policy moved toward the chosen answers.

  stored = np.load(workdirs['precomputed'] / 'reference_logps.npz')
  for split in ('train', 'eval'):  # One pair per line of the playground's file of the split.
    pairs_file, = (workdirs['precomputed'] / 'data').glob(f'*preference-{split}*.jsonl')
    assert stored[split].shape == (len(read_jsonl(pairs_file)), 2)
  assert len(stored['train']) > 100  # Two samples of the SFT model mostly differ.
  assert (stored['train'] < 0).all()  # Log-probs of whole responses.
  assert not (workdirs['on_the_fly'] / 'reference_logps.npz').exists()

  start_eval = [m for m in metrics['on_the_fly'] if 'eval/loss' in m][0]
  assert start_eval['eval/samples/win_rate'] == 0.5  # The reference against itself.
  assert start_eval['eval/samples/kl'] == pytest.approx(0.0, abs=1e-5)
  simpo = train_records(metrics['simpo'])
  assert len(simpo) == STEPS and all(math.isfinite(m['loss']) for m in simpo)

  kto = train_records(metrics['kto'])
  assert [m['step'] for m in kto] == [1, 2, 3, 4]
  # Step 1: the policy is the reference, r = z₀ = 0, each loss λ_y (1 − σ(0)) = λ_y / 2.
  fraction = kto[0]['desirable_fraction']
  assert 0.5 < fraction < 1  # Two desirable examples for each undesirable one, drawn at random.
  assert kto[0]['loss'] == pytest.approx(fraction / 2 + (1 - fraction) * 1.5 / 2, abs=1e-6)
  assert kto[0]['kl'] == 0
  assert kto[-1]['rewards/margins'] > 0  # Desirable answers gained on undesirable ones.
  kto_eval = [m for m in metrics['kto'] if 'eval/loss' in m][0]
  assert kto_eval['eval/samples/win_rate'] == 0.5


def counted_reads(monkeypatch) -> list[str]:
  """The checkpoints `loading.load_hf` reads from now on, in order."""
  reads = []
  load_hf = loading.load_hf
  monkeypatch.setattr(loading, 'load_hf', lambda path, *a, **k: reads.append(str(path)) or
                      load_hf(path, *a, **k))
  return reads


def small_dpo_config(sft_run, **overrides):
  """dpo.py:tiny from the SFT export, 4 steps of 8 pairs, evaluated at its start."""
  config = load_config('dpo', 'tiny')
  config.update_from_flattened_dict({
      'model.hf_path': str(sft_run / 'hf'), 'data.tokenizer': '', 'train.steps': 4,
      'train.batch_size': 8, 'train.seq_len': 48, 'train.eval_at_start': True,
      'train.progress_bar': False, 'train.tensorboard': False,
      'data.playground.train_size': 64, 'data.playground.eval_size': 16,
      'eval.num_prompts': 8, 'eval.max_new_tokens': 8, 'optim.warmup_steps': 1, **overrides})
  return config


def test_a_qlora_dpo_run_trains_adapters_over_an_nf4_base(sft_run, tmp_path):
  """DPO with LoRA over the SFT export quantized to NF4: the reference is the quantized base
  with the adapters off (loss log 2 at step 1, KL 0 at the start, then moving), and the
  export's kernels that no adapter touches are the NF4 round trip of the SFT model's."""
  config = small_dpo_config(sft_run, **{
      'train.eval_every': 4, 'train.log_every': 1, 'optim.lr': 1e-2, 'model.lora_rank': 4,
      'model.lora_targets': ('q', 'v'), 'model.quantize_base': 'nf4'})
  algorithms.run(config, str(tmp_path))
  metrics = read_metrics(tmp_path / 'metrics.jsonl')
  train, evals = train_records(metrics), [m for m in metrics if 'eval/samples/kl' in m]
  assert train[0]['loss'] == pytest.approx(math.log(2), abs=1e-6)
  assert train[-1]['rewards/margins'] != 0
  assert evals[0]['eval/samples/kl'] == pytest.approx(0.0, abs=1e-5)
  assert evals[-1]['eval/samples/kl'] > 1e-4
  exported, sft = (dict(nnx.to_flat_state(nnx.state(load_hf(path))))
                   for path in (tmp_path / 'hf', sft_run / 'hf'))
  for path, value in sft.items():
    if path[0] == 'blocks' and path[-1] == 'kernel' and path[3] not in ('q', 'v'):
      round_trip = quantization.dequantize(*quantization.quantize(value[...]), jnp.float32)
      np.testing.assert_allclose(np.asarray(exported[path][...]), round_trip, atol=1e-7)


def test_a_dpo_run_reads_the_sft_checkpoint_once(sft_run, tmp_path, monkeypatch):
  """Pairs sampled from the SFT policy, the reference, the trained copy and the evaluations'
  win rate and KL against the reference (at steps 0, 2 and 4): one read of the checkpoint."""
  reads = counted_reads(monkeypatch)
  config = small_dpo_config(sft_run, **{'train.eval_every': 2, 'train.export_hf': False,
                                        'optim.lr': 1e-3})
  assert config.data.playground.pairs == 'policy'  # Pairs of the SFT policy's own samples.
  algorithms.run(config, str(tmp_path))
  assert reads == [str(sft_run / 'hf')]
  evals = [m for m in read_metrics(tmp_path / 'metrics.jsonl') if 'eval/samples/kl' in m]
  assert [m['step'] for m in evals] == [0, 2, 4]
  assert evals[0]['eval/samples/kl'] == pytest.approx(0.0, abs=1e-5)  # The reference itself.
  assert evals[-1]['eval/samples/kl'] > 1e-4  # The trained copy, its own buffers, has moved.


def test_best_of_n_of_the_sft_policy_under_a_reward_model(sft_run, env, tmp_path):
  """configs/bon.py: n answers of the SFT export, chosen by a (random) reward model."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rlhf_jax.models import ModelConfig, Transformer, save_hf  # pylint: disable=g-import-not-at-top
  reward_model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2,
                                         n_kv_heads=1, d_ff=64, head='scalar'),
                             rngs=nnx.Rngs(1))
  save_hf(reward_model, tmp_path / 'rm')
  workdir = tmp_path / 'bon'
  finish(start(env, workdir, 'bon.py:tiny', f'--config.model.hf_path={sft_run / "hf"}',
               f'--config.bon.reward_model={tmp_path / "rm"}', '--config.bon.n_max=4',
               '--config.bon.num_prompts=8', '--config.eval.max_new_tokens=8',
               '--config.data.tokenizer=', '--config.train.batch_size=8'))
  records = read_jsonl(workdir / 'best_of_n.jsonl')
  assert [r['n'] for r in records] == [1, 2, 4]
  assert [r['kl'] for r in records] == pytest.approx([0.0, math.log(2) - 0.5,
                                                      math.log(4) - 0.75])
  proxy = [r['proxy_reward'] for r in records]
  assert proxy[0] < proxy[1] <= proxy[2]  # The best of a growing set, by the proxy.
  assert all(0.0 <= r['gold_reward'] <= 1.0 for r in records)
  assert (workdir / 'best_of_n.png').read_bytes()[:4] == b'\x89PNG'


def test_a_lora_dpo_run_trains_adapters_on_the_sft_base(sft_run, tmp_path, monkeypatch):
  """DPO with LoRA adapters on the SFT export, the checkpoint read once: the reference is the
  base with the adapters off (loss log 2 and KL 0 at the start, the KL moving after), the
  train state holds the adapters alone (its parameter norm is theirs), and the export is the
  merged model, with the adapters beside it for PEFT, whose non-adapted weights are the
  base's."""
  reads = counted_reads(monkeypatch)
  config = small_dpo_config(sft_run, **{
      'train.eval_every': 4, 'train.log_every': 1, 'optim.lr': 1e-2, 'model.lora_rank': 4,
      'model.lora_targets': ('q', 'v', 'up')})
  algorithms.run(config, str(tmp_path))
  assert reads == [str(sft_run / 'hf')]
  metrics = read_metrics(tmp_path / 'metrics.jsonl')
  train, evals = train_records(metrics), [m for m in metrics if 'eval/samples/kl' in m]
  assert train[0]['loss'] == pytest.approx(math.log(2), abs=1e-6)
  assert [m['step'] for m in evals] == [0, 4]
  assert evals[0]['eval/samples/kl'] == pytest.approx(0.0, abs=1e-5)
  assert evals[-1]['eval/samples/kl'] > 1e-4
  base = load_hf(sft_run / 'hf')
  cfg = base.cfg.replace(lora_rank=4, lora_targets=('q', 'v', 'up'))
  adapters = lora.init_adapters(dict(nnx.to_flat_state(nnx.state(nnx.eval_shape(
      lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))))
  initial_norm = float(np.sqrt(sum(float((a ** 2).sum()) for a in adapters.values())))
  assert train[0]['param_norm'] == pytest.approx(initial_norm, rel=0.05)

  merged = load_hf(tmp_path / 'hf')
  merged_flat, base_flat = (dict(nnx.to_flat_state(nnx.state(m))) for m in (merged, base))
  adapted = {('attn', 'q'), ('attn', 'v'), ('mlp', 'up')}
  for path, value in base_flat.items():
    same = np.array_equal(np.asarray(merged_flat[path][...]), np.asarray(value[...]))
    assert same != (path[0] == 'blocks' and path[2:4] in adapted and path[-1] == 'kernel'), path
  tokens = np.array([[5, 9, 33, 7, 12]])
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(sft_run / 'hf')
  with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / 'hf' / 'adapter').eval()
  with torch.no_grad():
    peft_logits = with_adapter(input_ids=torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(peft_logits, np.asarray(merged(tokens)), atol=1e-4)
  # The last checkpoint holds the adapters; exported later, they join the base again.
  export(str(tmp_path), str(tmp_path / 'exported'), dtype='float32')
  exported = dict(nnx.to_flat_state(nnx.state(load_hf(tmp_path / 'exported'))))
  for path, value in merged_flat.items():
    np.testing.assert_array_equal(np.asarray(exported[path][...]), np.asarray(value[...]))
  assert (tmp_path / 'exported' / 'adapter' / 'adapter_model.safetensors').exists()
