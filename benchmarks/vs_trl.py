"""Training steps side by side with Hugging Face TRL (PyTorch) on this machine, in one process.

  python benchmarks/vs_trl.py                          # `small` preset, 8 × 512, this CPU
  python benchmarks/vs_trl.py --shape=playground --batch_size=8 --seq_len=128 --repeats=3
  python benchmarks/vs_trl.py --only=dpo,dpo_precomputed --repeats=5

One random Llama-style model of the shape (and one with a scalar head for the reward model) is
exported with `save_hf`; TRL trains transformers' LlamaForCausalLM / LlamaForSequenceClassification
loaded from that export, ours loads the same files (`load_model`), so both start from the same
weights. Timed, each on the same batch on both sides:
  sft              one SFT step (trl.SFTTrainer vs the engine's train step): next-token
                   cross-entropy on every token of batch_size rows of seq_len tokens;
  rm               one reward-model step (trl.RewardTrainer): Bradley-Terry on batch_size pairs;
  dpo              one DPO step (trl.DPOTrainer, sigmoid loss, β = 0.1) with the reference's
                   forward pass in the step: batch_size pairs, each a prompt of seq_len / 4
                   tokens and two responses that fill seq_len, ending with EOS;
  dpo_precomputed  the same with the reference's log-probs computed once before training
                   (precompute_ref_log_probs=True; ours attaches them to the batch as
                   `dpo.attach_reference_logps` does), so no reference forward in the step;
  grpo             one GRPO iteration (trl.GRPOTrainer vs the engine's `update` of
                   configs/grpo.py): sampling batch_size responses of new_tokens tokens (groups
                   of 8 per prompt) after 32-token prompts, scoring with a Python reward
                   function (the same one on both sides) and the reference's log-probs, and one
                   update (TRL: num_iterations = 1; ours: ppo_epochs = num_minibatches = 1).
TRL's step is timed from the Trainer's on_step_begin to on_step_end callbacks (a
TrainerCallback): its forward, backward, gradient clipping, optimizer and scheduler steps (and
for GRPO the generation and scoring that its training_step runs), without the data loader's
collation or logging; that is the step as `trainer.train()` runs it, with nothing else. Right
after each TRL step the callback runs one of ours (blocked on its results), so the two
alternate in the same process; the first `WARMUP_STEPS` of each (ours compiles) are dropped,
then `repeats` steps each give a median and its min / max. A ratio is TRL's median over ours
(> 1: ours is faster). Each side's losses are kept: `tests/test_vs_trl.py` checks that both
compute the same ones. The float32 matmul peak is
measured in the same run (a 4096² matmul, as benchmarks/train_step.py): a step's MFU is its model
FLOP/s over it, and a step's ceiling, 1 / TRL's MFU, is the ratio that a step run at that peak
would reach: the most any implementation can show on this machine.

Both sides: float32, AdamW (β1 0.9, β2 0.95, ε 1e-8, no weight decay), constant lr 1e-5,
gradient clipping at norm 1, no gradient checkpointing (TRL turns it on by default; ours does
not rematerialise), no dropout. TRL runs through its public API with the least overhead it
allows: no evaluation, logging, saving or reporting, no tqdm, data loading in the main process,
its default fused AdamW, torch's default threads, no torch.compile (TRL's default).
What differs, and why:
  - every row has exactly seq_len tokens (no padding on either side), built from a word-level
    tokenizer over the whole vocabulary (one word, one token), so TRL's text-only DPO and GRPO
    datasets tokenize to the same ids as ours;
  - TRL's SFT and DPO steps also compute per-token entropy and accuracy metrics (its own
    fused LM head), and each TRL step reads metrics back to Python: part of its step;
  - GRPO: ours recomputes the policy's log-probs of the samples in scoring (an extra forward
    pass; TRL skips it when num_iterations = 1) and always samples new_tokens tokens, where
    transformers' generate() stops once every row has emitted EOS (a random model rarely
    does); TRL's loss is its default 'dapo' token mean, ours configs/grpo.py's;
  - PPO is not compared: TRL 1.16 has no PPO trainer (it was removed, trl.experimental has
    none).
Needs the `bench` extra (torch, trl). The last line printed is one JSON object for scripts.
"""

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from datasets import Dataset, disable_progress_bars
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

import trl
from rlhf_jax import parallel
from rlhf_jax.algorithms import dpo, rm, sft
from rlhf_jax.algorithms.rl import learner
from rlhf_jax.config import base_config, load_config, model_config_dict
from rlhf_jax.context import RunContext
from rlhf_jax.engine.loop import Engine
from rlhf_jax.engine.optimizer import make_optimizer
from rlhf_jax.engine.state import init_train_state, train_state_shardings
from rlhf_jax.engine.step import make_train_step
from rlhf_jax.models import Transformer, save_hf
from rlhf_jax.models.loading import load_model
from rlhf_jax.models.presets import get_preset
from rlhf_jax.playground.tokenizer import CHAT_TEMPLATE
from train_step import peak_matmul_flops  # Same folder: the benchmarks' one peak.

STEPS = ('sft', 'rm', 'dpo', 'dpo_precomputed', 'grpo')
SKIPPED = {'ppo': 'TRL 1.16 has no PPO trainer (removed; trl.experimental has none).'}
SPECIAL_TOKENS = ('<|pad|>', '<|end|>', '<|user|>', '<|assistant|>')
WARMUP_STEPS = 1  # Per side, untimed: ours compiles, torch allocates its optimizer state.
LR = 1e-5
DPO_BETA = 0.1  # The `small` preference preset's (rlhf_jax.config.PREFERENCE_PRESETS).
PROMPT_LEN = 32  # GRPO's prompts, chat template included (data_config's max_prompt_len).
GRPO = load_config('grpo.py:tiny')  # configs/grpo.py: G = 8, β = 0.04 on KL_k3 in the loss.


def distinct_word_reward(prompts, completions, **kwargs) -> list[float]:
  """The GRPO reward of both sides: the share of distinct words in each completion."""
  del prompts, kwargs
  return [len(set(words)) / max(len(words), 1) for words in map(str.split, completions)]


# The model, its tokenizer and the data.

def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  """Special tokens, then the words 'w<id>': every id is one word, every word one token."""
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
  vocab |= {f'w{i}': i for i in range(len(SPECIAL_TOKENS), vocab_size)}
  words = Tokenizer(models.WordLevel(vocab, unk_token='<|pad|>'))
  words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=words, pad_token='<|pad|>', eos_token='<|end|>', unk_token='<|pad|>',
      additional_special_tokens=list(SPECIAL_TOKENS[2:]), chat_template=CHAT_TEMPLATE)


def export_models(shape: str, workdir: str, tokenizer) -> dict[str, str]:
  """A random policy and reward model of `shape`, with the tokenizer: head -> HF directory."""
  model_config = get_preset(shape)
  ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  paths = {}
  for seed, head in enumerate(('lm', 'scalar')):
    paths[head] = os.path.join(workdir, head)
    save_hf(Transformer(model_config.replace(head=head), rngs=nnx.Rngs(seed)), paths[head], **ids)
    tokenizer.save_pretrained(paths[head])
  return paths


def random_words(rng, vocab_size: int, shape) -> np.ndarray:
  """Ids of ordinary words (no special token), int32."""
  return rng.integers(len(SPECIAL_TOKENS), vocab_size, shape, dtype=np.int32)


def make_data(args, vocab_size: int, eos_id: int) -> dict[str, np.ndarray]:
  """SFT rows [B, T], and pairs: prompts [B, T/4], chosen and rejected responses [B, 3T/4]
  ending with EOS."""
  rng = np.random.default_rng(0)
  b, t = args.batch_size, args.seq_len
  prompt_len = t // 4
  data = {'tokens': random_words(rng, vocab_size, (b, t)),
          'prompt': random_words(rng, vocab_size, (b, prompt_len))}
  for side in ('chosen', 'rejected'):
    data[side] = random_words(rng, vocab_size, (b, t - prompt_len))
    data[side][:, -1] = eos_id
  return data


def grpo_prompts(vocab_size: int, n: int = 64) -> list[str]:
  """`n` user messages that the chat template makes PROMPT_LEN tokens long."""
  rng = np.random.default_rng(1)
  content_len = PROMPT_LEN - 3  # <|user|> … <|end|><|assistant|>
  return [' '.join(f'w{i}' for i in row)
          for row in random_words(rng, vocab_size, (n, content_len))]


# Timing.

class Alternating(transformers.TrainerCallback):
  """Times each TRL optimizer step (on_step_begin to on_step_end) and runs `ours` after it.

  `ours()` returns its step's loss; `trl_losses` is filled by `record_losses`.
  """

  def __init__(self, ours):
    self.ours, self.trl_times, self.our_times = ours, [], []
    self.trl_losses, self.our_losses = [], []
    self.start = None

  def record_losses(self, trainer: transformers.Trainer) -> None:
    """Keeps the loss that each of the trainer's training_steps returns."""
    training_step = trainer.training_step

    def recorded(*args, **kwargs):
      loss = training_step(*args, **kwargs)
      self.trl_losses.append(float(loss))
      return loss
    trainer.training_step = recorded

  def on_step_begin(self, args, state, control, **kwargs):
    self.start = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    self.trl_times.append(time.perf_counter() - self.start)
    start = time.perf_counter()
    loss = self.ours()
    self.our_times.append(time.perf_counter() - start)
    self.our_losses.append(loss)


def spread(times: list[float]) -> dict[str, float]:
  """Median, min and max in seconds of the steps after warm-up."""
  timed = times[WARMUP_STEPS:]
  return {'median_s': statistics.median(timed), 'min_s': min(timed), 'max_s': max(timed)}


# Optimizer settings, one source for both sides.

def optim_config():
  """config.optim of both sides: AdamW, constant lr, no weight decay, clipping at norm 1."""
  optim = base_config().optim
  optim.update(lr=LR, schedule='constant', warmup_steps=0, weight_decay=0.0)
  return optim


def trl_arguments(args, outdir: str) -> dict:
  """TrainingArguments shared by every TRL config: the same optimizer, nothing else to do."""
  optim = optim_config()
  return dict(
      output_dir=outdir, max_steps=WARMUP_STEPS + args.repeats,
      per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
      learning_rate=optim.lr, lr_scheduler_type='constant', warmup_steps=0,
      weight_decay=optim.weight_decay, adam_beta1=optim.b1, adam_beta2=optim.b2,
      adam_epsilon=optim.eps, max_grad_norm=optim.grad_clip_norm, bf16=False, fp16=False,
      activation_checkpointing=False, use_cpu=True, report_to='none', logging_strategy='no',
      save_strategy='no', eval_strategy='no', disable_tqdm=True, dataloader_num_workers=0,
      seed=0)


# Ours.

class Ours:
  """The mesh and optimizer of our offline steps, and the models in `paths`, loaded."""

  def __init__(self, shape: str, paths: dict[str, str]):
    self.config = base_config()
    self.config.optim = optim_config()
    self.mesh = parallel.make_mesh({'data': -1})
    self.paths, self.numerics = paths, get_preset(shape)

  def load(self, head: str):
    return load_model(self.paths[head], self.mesh, self.config.sharding_rules, head=head,
                      numerics=self.numerics)

  def step(self, loss_fn, host_batch: dict, head: str = 'lm', frozen: bool = False):
    """A callable that runs one train step of `loss_fn` on `host_batch` (frozen: with the
    initial model as the reference), blocked on its results."""
    model = self.load(head)
    optimizer, schedule = make_optimizer(self.config.optim, total_steps=1000)
    state_shardings = train_state_shardings(model.shardings, optimizer, model.params, self.mesh)
    reference = model.copy() if frozen else None  # The train state donates model.params.
    frozen_params, frozen_shardings = reference[1:] if frozen else (None, None)
    state = init_train_state(model.params, optimizer, 0, state_shardings)
    batch = parallel.shard_batch(host_batch, self.mesh, self.config.sharding_rules)
    train_step = make_train_step(
        loss_fn, optimizer, model.graphdef, state_shardings=state_shardings,
        batch_shardings={k: v.sharding for k, v in batch.items()},
        frozen_shardings=frozen_shardings, schedule=schedule)

    def run():
      nonlocal state
      state, metrics = train_step(state, batch, frozen_params)
      return float(jax.block_until_ready((state, metrics))[1]['loss'])
    return run

  def reference_logps(self, host_batch: dict) -> np.ndarray:
    """[B, 2] log-probs of the pairs under the initial policy, computed once."""
    reference = self.load('lm')
    score = jax.jit(lambda params, batch: dpo.pair_logps(
        nnx.merge(reference.graphdef, params), batch,
        chunk_size=self.config.train.logprob_chunk_size)[0])
    return np.asarray(score(reference.params, host_batch))


def pair_batch(data: dict[str, np.ndarray], *, response_loss: bool) -> dict[str, np.ndarray]:
  """Our [B, 2, T] pair batch: prompt + chosen, prompt + rejected; the loss mask on the
  responses (response_loss) or everywhere."""
  prompt = data['prompt']
  tokens = np.stack([np.concatenate([prompt, data[side]], axis=1)
                     for side in ('chosen', 'rejected')], axis=1)
  loss_mask = np.ones_like(tokens)
  if response_loss:
    loss_mask[:, :, :prompt.shape[1]] = 0
  return {'tokens': tokens, 'attention_mask': np.ones_like(tokens), 'loss_mask': loss_mask}


def our_sft(ours: Ours, data):
  tokens = data['tokens']
  batch = {'tokens': tokens, 'attention_mask': np.ones_like(tokens),
           'loss_mask': np.ones_like(tokens)}
  return ours.step(functools.partial(sft.sft_loss_fn, normalize='token',
                                     chunk_size=ours.config.train.logprob_chunk_size), batch)


def our_rm(ours: Ours, data):
  batch = pair_batch(data, response_loss=False)
  return ours.step(functools.partial(rm.rm_loss_fn, center_coef=0.0), batch, head='scalar')


def our_dpo(ours: Ours, data, *, precomputed: bool):
  batch = pair_batch(data, response_loss=True)
  if precomputed:
    batch['ref_logps'] = ours.reference_logps(batch)
  loss_fn = functools.partial(dpo.dpo_loss_fn, loss_options=dict(beta=DPO_BETA,
                                                                  loss_type='sigmoid'),
                              chunk_size=ours.config.train.logprob_chunk_size)
  return ours.step(loss_fn, batch, frozen=not precomputed)


def grpo_group_size(batch_size: int) -> int:
  return min(GRPO.rl.group_size, batch_size)


def our_grpo_config(args, policy: str, prompts_file: str):
  """configs/grpo.py for this shape and batch, one update per iteration, our reward function."""
  config = load_config('grpo.py:tiny')
  config.model = model_config_dict(args.shape)
  config.model.hf_path = policy
  config.train.update(steps=WARMUP_STEPS + args.repeats, batch_size=args.batch_size,
                      seq_len=PROMPT_LEN + args.new_tokens, progress_bar=False,
                      tensorboard=False)
  config.optim = optim_config()
  config.rl.update(rollout_batch_size=args.batch_size, group_size=grpo_group_size(args.batch_size),
                   max_new_tokens=args.new_tokens, ppo_epochs=1, num_minibatches=1,
                   prompts=prompts_file, reward_model='',
                   reward_fns=(f'{__name__}:{distinct_word_reward.__name__}',))
  config.data.update(max_prompt_len=PROMPT_LEN, tokenizer='')  # The policy's tokenizer.
  config.eval.gold = ''
  return config


def our_grpo(args, workdir: str, policy: str, prompts: list[str]):
  """A callable that runs one GRPO iteration of the engine (rollout, scoring, update)."""
  prompts_file = os.path.join(workdir, 'prompts.txt')
  with open(prompts_file, 'w', encoding='utf-8') as f:
    f.write('\n'.join(prompts) + '\n')
  ctx = RunContext(our_grpo_config(args, policy, prompts_file),
                   os.path.join(workdir, 'ours_grpo'))
  engine = Engine(ctx, learner.make_algorithm(ctx))
  iteration = 0

  def run():
    nonlocal iteration
    metrics = jax.block_until_ready(engine.update(iteration))
    iteration += 1
    return float(metrics['loss'])
  return run


# TRL.

def load_hf(path: str, head: str):
  auto = (transformers.AutoModelForCausalLM if head == 'lm'
          else transformers.AutoModelForSequenceClassification)
  return auto.from_pretrained(path, dtype=torch.float32)


def trl_sft(args, paths, tokenizer, data, outdir, callback):
  dataset = Dataset.from_dict({'input_ids': data['tokens'].tolist()})
  config = trl.SFTConfig(**trl_arguments(args, outdir), max_length=args.seq_len)
  return trl.SFTTrainer(model=load_hf(paths['lm'], 'lm'), args=config, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[callback])


def trl_rm(args, paths, tokenizer, data, outdir, callback):
  pairs = pair_batch(data, response_loss=False)['tokens']
  dataset = Dataset.from_dict({'chosen_ids': pairs[:, 0].tolist(),
                               'rejected_ids': pairs[:, 1].tolist()})
  config = trl.RewardConfig(**trl_arguments(args, outdir), max_length=args.seq_len)
  return trl.RewardTrainer(model=load_hf(paths['scalar'], 'scalar'), args=config,
                           train_dataset=dataset, processing_class=tokenizer,
                           callbacks=[callback])


def pair_texts(tokenizer, data) -> dict[str, list[str]]:
  """The pairs as text: responses start with a space, so they tokenize apart from the prompt."""
  words = lambda rows: [' '.join(tokenizer.convert_ids_to_tokens(row.tolist())) for row in rows]
  return {'prompt': words(data['prompt']),
          **{side: [' ' + text for text in words(data[side])] for side in ('chosen', 'rejected')}}


def trl_dpo(args, paths, tokenizer, data, outdir, callback, *, precomputed: bool):
  config = trl.DPOConfig(**trl_arguments(args, outdir), beta=DPO_BETA, loss_type=['sigmoid'],
                         max_length=args.seq_len, precompute_ref_log_probs=precomputed)
  return trl.DPOTrainer(model=load_hf(paths['lm'], 'lm'), args=config,
                        train_dataset=Dataset.from_dict(pair_texts(tokenizer, data)),
                        processing_class=tokenizer, callbacks=[callback])


def trl_grpo(args, paths, tokenizer, prompts, outdir, callback):
  """TRL's GRPO with configs/grpo.py's G and β, one update per generation."""
  templated = [tokenizer.apply_chat_template([{'role': 'user', 'content': p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]
  config = trl.GRPOConfig(
      **trl_arguments(args, outdir), num_generations=grpo_group_size(args.batch_size),
      max_completion_length=args.new_tokens, beta=GRPO.rl.kl_coef, num_iterations=1,
      temperature=GRPO.rl.temperature, top_k=0, top_p=1.0)
  return trl.GRPOTrainer(model=load_hf(paths['lm'], 'lm'), reward_funcs=distinct_word_reward,
                         args=config, train_dataset=Dataset.from_dict({'prompt': templated}),
                         processing_class=tokenizer, callbacks=[callback])


# One comparison per step kind.

def compare(name: str, args, workdir: str, paths, tokenizer, data, prompts) -> dict:
  """Both sides' step times of `name`, alternating; tokens per step."""
  outdir = os.path.join(workdir, f'trl_{name}')
  ours = Ours(args.shape, paths)
  if name == 'sft':
    callback = Alternating(our_sft(ours, data))
    trainer = trl_sft(args, paths, tokenizer, data, outdir, callback)
    tokens = data['tokens'].size
  elif name == 'rm':
    callback = Alternating(our_rm(ours, data))
    trainer = trl_rm(args, paths, tokenizer, data, outdir, callback)
    tokens = 2 * data['tokens'].size
  elif name in ('dpo', 'dpo_precomputed'):
    precomputed = name == 'dpo_precomputed'
    callback = Alternating(our_dpo(ours, data, precomputed=precomputed))
    trainer = trl_dpo(args, paths, tokenizer, data, outdir, callback, precomputed=precomputed)
    tokens = 2 * data['tokens'].size
  else:
    callback = Alternating(our_grpo(args, workdir, paths['lm'], prompts))
    trainer = trl_grpo(args, paths, tokenizer, prompts, outdir, callback)
    tokens = args.batch_size * (PROMPT_LEN + args.new_tokens)
  trainer.remove_callback(transformers.PrinterCallback)  # Prints its end-of-training log.
  callback.record_losses(trainer)
  trainer.train()
  return {'trl': spread(callback.trl_times), 'ours': spread(callback.our_times),
          'tokens_per_step': tokens, 'model_flops_per_step': model_flops(name, args, tokens),
          # Each step's: both sides start from the same weights, train on the same batch with
          # the same optimizer (GRPO: on their own samples).
          'losses': {'trl': callback.trl_losses, 'ours': callback.our_losses}}


def model_flops(name: str, args, tokens: int) -> float | None:
  """A step's model FLOPs (PaLM's 6·N + 12·L·T·H·Dh per token, attention counted whole; a
  reference's forward pass a third more), as benchmarks/train_step.py counts them; None for
  GRPO's iteration (sampling, scoring and an update)."""
  if name == 'grpo':
    return None
  numerics = get_preset(args.shape).replace(head='scalar' if name == 'rm' else 'lm')
  with_reference = 4 / 3 if name == 'dpo' else 1
  return numerics.flops_per_token(args.seq_len) * tokens * with_reference


def benchmark(args, workdir: str) -> dict:
  vocab_size = get_preset(args.shape).vocab_size
  tokenizer = word_tokenizer(vocab_size)
  paths = export_models(args.shape, workdir, tokenizer)
  data = make_data(args, vocab_size, tokenizer.eos_token_id)
  prompts = grpo_prompts(vocab_size)
  peak = peak_matmul_flops(4096, np.float32)
  times = {name: compare(name, args, workdir, paths, tokenizer, data, prompts)
           for name in args.only}
  mfu = {name: {side: t['model_flops_per_step'] / t[side]['median_s'] / peak
                for side in ('trl', 'ours')}
         for name, t in times.items() if t['model_flops_per_step']}
  return {
      'ratios': {name: t['trl']['median_s'] / t['ours']['median_s'] for name, t in times.items()},
      # The ratio of a step run at the matmul peak: no implementation's can be higher.
      'ratio_ceilings': {name: 1 / m['trl'] for name, m in mfu.items()},
      'mfu': mfu, 'peak_matmul_flops': peak,
      'times': times,
      'tokens_per_s': {name: {side: t['tokens_per_step'] / t[side]['median_s']
                              for side in ('trl', 'ours')} for name, t in times.items()},
      'skipped': SKIPPED,
      'shape': args.shape, 'batch_size': args.batch_size, 'seq_len': args.seq_len,
      'grpo_prompt_len': PROMPT_LEN, 'new_tokens': args.new_tokens, 'repeats': args.repeats,
      'params_m': get_preset(args.shape).num_params() / 1e6,
      'torch_threads': torch.get_num_threads(),
      'versions': {'trl': trl.__version__, 'torch': torch.__version__,
                   'transformers': transformers.__version__, 'jax': jax.__version__},
      'device': f'{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs',
  }


def print_report(r: dict) -> None:
  print(f'TRL vs ours, {r["shape"]} ({r["params_m"]:.1f}M params), batch {r["batch_size"]} x '
        f'{r["seq_len"]} tokens (GRPO: {r["grpo_prompt_len"]} + {r["new_tokens"]}), float32, '
        f'{r["device"]}; median [min, max] of {r["repeats"]} steps after {WARMUP_STEPS} '
        'warm-up')
  print(f'  float32 matmul peak (4096², this run): {r["peak_matmul_flops"] / 1e9:.1f} GFLOP/s; '
        'MFU: model FLOP/s over it; ceiling: the ratio of a step at that peak')
  for name, t in r['times'].items():
    mfu = r['mfu'].get(name)
    sides = '   '.join(
        f'{side} {1e3 * t[side]["median_s"]:9.1f} ms [{1e3 * t[side]["min_s"]:.1f}, '
        f'{1e3 * t[side]["max_s"]:.1f}] {r["tokens_per_s"][name][side]:8.0f} tok/s'
        + (f' MFU {100 * mfu[side]:4.1f} %' if mfu else '')
        for side in ('trl', 'ours'))
    ceiling = (f' (ceiling {r["ratio_ceilings"][name]:.2f})' if name in r['ratio_ceilings']
               else '')
    print(f'  {name:<16} {sides}   ratio {r["ratios"][name]:5.2f}{ceiling}')
  for name, reason in r['skipped'].items():
    print(f'  {name:<16} skipped: {reason}')


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', choices=('small', 'playground'), default='small')
  parser.add_argument('--batch_size', type=int, default=8, help='Rows, pairs or responses.')
  parser.add_argument('--seq_len', type=int, default=512)
  parser.add_argument('--new_tokens', type=int, default=64, help='GRPO tokens per response.')
  parser.add_argument('--repeats', type=int, default=5, help='Timed steps after warm-up.')
  parser.add_argument('--only', default=','.join(STEPS), help=f'Some of {",".join(STEPS)}.')
  args = parser.parse_args()
  args.only = [name for name in args.only.split(',') if name]
  unknown = set(args.only) - set(STEPS)
  if unknown:
    parser.error(f'--only: unknown {sorted(unknown)}; choose from {STEPS}.')
  return args


def main():
  args = parse_args()
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  disable_progress_bars()
  with tempfile.TemporaryDirectory() as workdir:
    result = benchmark(args, workdir)
  print_report(result)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
