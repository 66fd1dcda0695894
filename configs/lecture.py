"""Stanford CS336 (2025) lecture 15's claims about RLHF, measured on the playground.

  python experiments/lecture.py --config=configs/lecture.py:tiny --workdir=runs/lecture
  python experiments/lecture.py --config=configs/lecture.py:tiny --workdir=runs/lecture \
      --only=calibration

One π_init (pretraining, then an SFT stopped early, as in configs/overoptimization.py), one
proxy reward model on gold-labelled comparisons of its answers; PPO against the proxy under
adaptive KL targets and against the gold itself, DPO at several β on the same comparisons, and
best-of-n under the proxy, SFT on the comparisons' chosen answers, and IPO and hinge (SLiC) at
DPO's β, each evaluated along its run on the same held-out prompts. The phenomena read those
runs: `frontier` (gold against KL per method, the DPO paper's figure 2), `calibration` (ECE,
temperature scaling, entropy and diversity, after SFT, PPO and DPO), `daa_overoptimization`
(gold against KL over one epoch per direct-alignment loss and β, Rafailov et al. 2024),
`length` (Singhal et al. 2023), `alignment_tax` (PPO on one task with and without PPO-ptx,
Ouyang et al. 2022), `midtraining` (instructions in the pretraining's decay stage, Hu et al.
2024), `rlaif` (a reward model trained on AI labels), `safety` (the share of safety data in
SFT against over-refusal, Bianchi et al. 2023 and XSTest), `unknown_facts` (SFT on facts
the base never saw, Gekhman et al. 2024) and `assertive_labelers` (labelers who like a
confident tone).
Stage configs are the `stage_preset` of configs/{pretrain,sft,rm,ppo,dpo,bon}.py, changed
here; `stage_overrides` changes every stage ('all') or one kind, as nested keys of its config.
"""

import ml_collections

PHENOMENA = ('frontier', 'calibration', 'daa_overoptimization', 'length', 'alignment_tax',
             'midtraining', 'rlaif', 'safety', 'unknown_facts', 'assertive_labelers')

# DPO and its length-aware variants on length-biased pairs (rlhf_jax/losses/dpo.py): DPO's β;
# R-DPO's α cancels the labelers' own length term (their logit is λ/T per word, one token a word
# on the playground: α = 1/0.1 at λ = 1); SimPO and length-normalised DPO at their papers' β.
LENGTH_LOSSES = {'sigmoid': {'beta': 0.1}, 'rdpo': {'beta': 0.1, 'alpha': 10.0},
                 'simpo': {'beta': 2.0, 'gamma': 1.0}, 'length_normalized': {'beta': 0.5}}

# This 2-core CPU. π_init is the overoptimization experiment's (the same steps). PPO takes the
# settings that experiment froze (rollouts of 256, one epoch in 2 minibatches, lr 7e-5, a value
# head, 20 + 16 tokens), for 80 iterations, evaluated every 20 on the 1,024 held-out prompts
# that every method is measured on. DPO, IPO and hinge: one epoch of the 8,000 comparisons (250
# steps of 32), evaluated 8 times in it (Rafailov et al. 2024 evaluate 8 times an epoch);
# Preferred-FT the same steps on their chosen answers, at an lr between DPO's and SFT's. The
# alignment tax: PPO as above on sort's prompts, γ ∈ {0, 1, 10} at β 0.1 and β ∈ {0.4, 1.6}
# without PPO-ptx (five runs): the NLL and the clipped policy loss are both means per token,
# so γ = 1 weighs them alike (InstructGPT's γ = 27.8 is on the scale of its own losses).
# Safety: SFT of the base for 200 steps of 32 on 2,048 rows (about three epochs), so 3 % is 61
# refusals seen three times (Bianchi et al.: 500 safety examples, 3 % of their mix). Unknown
# facts: 150 steps of 32 on 640 questions about 80 facts (7.5 epochs: Gekhman et al. find the
# unknown ones fitted late, so the SFT runs long enough to fit them). Both repeat each SFT with
# three seeds (their order of the rows): one run per share was too noisy to rank the shares.
TINY = dict(stage_preset='tiny', pretrain_steps=800, sft_steps=80, comparisons=8000,
            rm_steps=400, eval_prompts=1024, max_prompt_len=20, max_new_tokens=16,
            ppo_steps=80, ppo_eval_every=20, ppo_batch_size=256, ppo_minibatches=2, ppo_lr=7e-5,
            kl_targets=(1.0, 4.0), dpo_betas=(0.03, 0.1, 0.3), dpo_steps=250,
            dpo_eval_every=32, dpo_lr=3e-5, preferred_sft_lr=3e-4, n_max=16,
            calibration_prompts=1024, calibration_samples=16, length_biases=(0.0, 0.5, 1.0),
            length_losses=tuple(LENGTH_LOSSES), tax_tasks=('sort',), ptx_coefs=(0.0, 1.0, 10.0),
            tax_kl_coefs=(0.1, 0.4, 1.6), tax_text_batches=4, rlaif_comparisons=500,
            rlaif_steps=200, safety_shares=(0.0, 0.01, 0.03, 0.1, 0.25, 0.5),
            safety_examples=2048, safety_steps=200, safety_samples=16,
            knowledge_documents=20000, fact_shares=(0.0, 0.25, 0.5, 0.75), fact_examples=640,
            fact_steps=150, fact_samples=8, assertive_biases=(0.0, 0.2, 0.5), sft_seeds=(0, 1, 2),
            workers=2)

PRESETS = {
    'tiny': TINY,
    # Every stage at a toy size, for tests: a two-layer model, a few steps of each run.
    'micro': dict(TINY, pretrain_steps=6, sft_steps=6, comparisons=64, rm_steps=6,
                  eval_prompts=32, ppo_steps=2, ppo_eval_every=1, ppo_batch_size=16,
                  ppo_lr=3e-3, kl_targets=(1.0,), dpo_betas=(0.1,), dpo_steps=4,
                  dpo_eval_every=2, dpo_lr=3e-3, preferred_sft_lr=3e-3, n_max=4,
                  calibration_prompts=24, length_biases=(0.0, 1.0),
                  length_losses=('sigmoid', 'rdpo'), ptx_coefs=(0.0, 1.0),
                  tax_kl_coefs=(0.1, 0.4), tax_text_batches=1, rlaif_comparisons=32,
                  rlaif_steps=4, safety_shares=(0.0, 0.03, 0.5), safety_examples=64,
                  safety_steps=4, safety_samples=2, knowledge_documents=200,
                  fact_shares=(0.0, 0.5), fact_examples=32, fact_steps=4, fact_samples=2,
                  assertive_biases=(0.0, 0.5), sft_seeds=(0,),
                  calibration_samples=3, bootstrap=50, workers=1, stage_overrides={
                      'all': {'train': {'batch_size': 16, 'tensorboard': False},
                              'data': {'playground': {'train_size': 64, 'eval_size': 16}}},
                      'pretrain': {'model': {'n_layers': 2, 'd_model': 32, 'n_heads': 2,
                                             'n_kv_heads': 1, 'd_ff': 64},
                                   'train': {'eval_every': 0}},
                      'sft': {'train': {'eval_every': 0}},
                      'rm': {'train': {'eval_every': 0}},
                      'ppo': {'rl': {'num_prompts': 64}}}),
    # Accelerators: the small model, longer answers, more of everything.
    'small': dict(TINY, stage_preset='small', pretrain_steps=4000, sft_steps=1000,
                  comparisons=32000, rm_steps=2000, max_prompt_len=32, max_new_tokens=128,
                  ppo_steps=300, ppo_eval_every=25, ppo_batch_size=512, ppo_minibatches=4,
                  ppo_lr=1e-5, dpo_steps=1000, dpo_eval_every=100, dpo_lr=5e-6, n_max=64,
                  calibration_samples=16, workers=1),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'Unknown preset {preset!r} for configs/lecture.py; choose from '
                     f'{sorted(PRESETS)}.')
  p = PRESETS[preset]
  return ml_collections.ConfigDict({
      'stage_preset': p['stage_preset'],
      'gold': 'program',  # As in configs/overoptimization.py.
      'policy': '',  # π_init: an HF directory, or '' to pretrain and fine-tune one here.
      'pretrain_steps': p['pretrain_steps'],
      'sft_steps': p['sft_steps'],
      'stage_overrides': p.get('stage_overrides', {}),
      'phenomena': PHENOMENA,  # What to measure (--only picks some).
      # Every method's points are measured on the same held-out prompts, their answers as long
      # as the tasks need (prompts of ≤ 19 tokens, reference answers of ≤ 13 with EOS).
      'eval_prompts': p['eval_prompts'],
      'max_prompt_len': p['max_prompt_len'],
      'max_new_tokens': p['max_new_tokens'],
      # The proxy reward model, and DPO's data: comparisons of π_init's answers, labelled by
      # Bradley-Terry labelers on the gold (temperature 0.1).
      'proxy': {'comparisons': p['comparisons'], 'steps': p['rm_steps'],
                'label_temperature': 0.1},
      # PPO against the proxy, one run per KL target (Ziegler et al. 2019's controller, from
      # β = kl_coef, horizon kl_horizon responses), and one against the gold itself (PPO-GT:
      # the playground's program as a reward function, no KL penalty).
      'ppo': {'steps': p['ppo_steps'], 'eval_every': p['ppo_eval_every'],
              'rollout_batch_size': p['ppo_batch_size'], 'num_minibatches': p['ppo_minibatches'],
              'ppo_epochs': 1, 'critic': 'head', 'lr': p['ppo_lr'],
              'kl_targets': p['kl_targets'], 'kl_coef': 0.1, 'kl_horizon': 1000, 'gold': True},
      # DPO (sigmoid) at each β on the proxy's comparisons, evaluated every eval_every steps;
      # for daa_overoptimization also each of `losses` (rlhf_jax/losses/dpo.py) at each β.
      'dpo': {'betas': p['dpo_betas'], 'steps': p['dpo_steps'], 'eval_every': p['dpo_eval_every'],
              'lr': p['dpo_lr'], 'losses': ('sigmoid', 'ipo', 'hinge')},
      # Preferred-FT (Rafailov et al. 2023): SFT on the chosen answers of the same comparisons,
      # DPO's steps and batch, evaluated as often, with KL to π_init.
      'preferred_sft': {'lr': p['preferred_sft_lr']},
      # Best-of-n under the proxy: n_max answers per evaluation prompt; n = 1, 2, 4, … n_max.
      'bon': {'n_max': p['n_max']},
      'frontier': {
          # KL bins (nats per prompt) of the envelope; the last edge is open.
          'kl_edges': (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 1e9),
      },
      'calibration': {
          # Held-out prompts of the tasks with one right answer (sort, add, repeat): the first
          # half fits the temperature, the second measures the ECE after it.
          'prompts': p['calibration_prompts'],
          'samples': p['calibration_samples'],  # Answers per prompt, for distinct_answers.
          'num_bins': 10,  # Equal-mass bins of the ECE.
          'temperatures': tuple(round(0.5 + 0.1 * i, 2) for i in range(46)),  # 0.5 … 5.0
          'dpo_beta': 0.1,  # The DPO policy measured (its last step): one of dpo.betas.
          'ppo_kl_target': p['kl_targets'][-1],  # The PPO policy measured: one of kl_targets.
      },
      # Length (Singhal et al. 2023): proxies on the same comparisons labelled by labelers with
      # a length bias λ (gold per word, rlhf_jax/playground/labelers.py; λ = 0 is the proxy
      # above), PPO (adaptive KL, kl_target) and best-of-n against each; PPO against a
      # length-only reward; DPO and its length-aware variants (rlhf_jax/losses/dpo.py) on the
      # pairs labelled at the largest λ (LENGTH_LOSSES).
      'length': {'biases': p['length_biases'], 'kl_target': p['kl_targets'][-1],
                 'bin_words': 2,  # Singhal's bins of answer length.
                 'losses': {loss: LENGTH_LOSSES[loss] for loss in p['length_losses']}},
      # The alignment tax (Ouyang et al. 2022): PPO against the proxy on prompts of `tasks`
      # only, at a fixed KL coefficient; the tax is what the other tasks' gold and the NLL of
      # held-out pretraining text (π_init's own corpus; text_batches minibatches of rows) lose.
      # PPO-ptx at each γ of ptx_coefs (at kl_coefs[0]), and without it at each other β.
      'alignment_tax': {'tasks': p['tax_tasks'], 'ptx_coefs': p['ptx_coefs'],
                        'kl_coefs': p['tax_kl_coefs'], 'text_batches': p['tax_text_batches']},
      # Midtraining (Hu et al. 2024, MiniCPM): two pretrainings like π_init's base, on a
      # warmup-stable-decay schedule and with the playground's instructions as a second source
      # at weight 0, that differ only in the decay stage's weights: text only, or
      # `decay_weights`; then π_init's SFT (sft_steps) after each, and twice as long after the
      # text-only one.
      'midtraining': {'decay_weights': {'text': 1.0, 'sft': 1.0}},
      # AI feedback: an AI labeler, a reward model on the first `comparisons` of the proxy's
      # comparisons (the simulated humans' labels, `steps` steps), labels all of them in the
      # humans' place (its standardised scores through the same Bradley-Terry labelers); a
      # proxy trained on its labels is compared with the proxy on the humans'.
      'rlaif': {'comparisons': p['rlaif_comparisons'], 'steps': p['rlaif_steps']},
      # The knowledge base of `safety` (and of the questions about facts): pretrained like
      # π_init's base, on its corpus and `documents` documents of world knowledge (who can be
      # harmed, made-up facts: rlhf_jax/playground/knowledge.py) mixed at `weights`.
      'knowledge': {'documents': p['knowledge_documents'],
                    'weights': {'text': 3.0, 'knowledge': 1.0}},
      # Safety data and over-refusal: per share, an SFT of the knowledge base (`steps` steps) on
      # `examples` rows of which that share are harmful requests answered with a refusal and
      # the rest helpful (rlhf_jax/playground/safety.py); each policy answers held-out harmful
      # requests, the XSTest-style contrast set and held-out unrelated requests `samples` times;
      # each share's SFT is run once per seed of `seeds`, its measures averaged over them.
      # small_share: the share the verdict asks to cut unsafe compliance (Bianchi et al.'s 3 %).
      'safety': {'shares': p['safety_shares'], 'examples': p['safety_examples'],
                 'steps': p['safety_steps'], 'samples': p['safety_samples'],
                 'small_share': 0.03, 'seeds': p['sft_seeds']},
      # Unknown facts (Gekhman et al. 2024): per unknown share, an SFT of the knowledge base on
      # `examples` questions about 40 facts its corpus states and 40 it never states, that share
      # of them about the unknown ones; at idk_share also with those answered "I don't know".
      # Each policy answers held-out questions about 40 known and 40 unknown facts `samples`
      # times; each arm is run once per seed of `seeds`, its measures averaged over them.
      # Labelers who like confidence: proxies on the proxy's comparisons with each answer hedged
      # ("I think …") with probability hedge_share, labelled with assertiveness bias κ of
      # `biases` (the logit gains κ for a confident answer; rlhf_jax/playground/labelers.py);
      # best-of-n under each over π_init's candidates, hedged where less than unsure_below of
      # the prompt's candidates agree with them.
      'assertive_labelers': {'biases': p['assertive_biases'], 'hedge_share': 0.5,
                             'unsure_below': 0.5},
      'unknown_facts': {'shares': p['fact_shares'], 'idk_share': 0.5,
                        'examples': p['fact_examples'], 'steps': p['fact_steps'],
                        'samples': p['fact_samples'], 'seeds': p['sft_seeds']},
      'bootstrap': p.get('bootstrap', 1000),  # Resamples of every interval (over prompts).
      'seed': 0,
      # Stages trained this many at a time in processes of their own (1 on an accelerator).
      'workers': p['workers'],
      'progress_bar': True,
  })
