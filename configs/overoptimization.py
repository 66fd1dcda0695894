"""Reward-model overoptimization (Gao, Schulman & Hilton 2022) on the playground.

  python experiments/overoptimization.py --config=configs/overoptimization.py:tiny \
      --workdir=runs/overoptimization

A gold reward labels comparisons of the initial policy's samples; proxy reward models learn
from them (a grid of proxy models × numbers of comparisons); best-of-n and PPO optimise each
proxy while the gold reward, the proxy reward and the KL to the initial policy are measured.
Stage configs are the `preset` of configs/{pretrain,sft,rm,ppo,bon}.py, shrunk or grown here.
"""

import ml_collections

# This 2-core CPU: one proxy architecture (the policy's), two amounts of comparisons. SFT
# stops early (80 steps) so that there is room to improve. PPO takes one step per 128 fresh
# answers (rollouts of 256, 2 minibatches, 1 epoch) with a value head on the policy (cheaper
# than a critic copied from the proxy), until an evaluation measures KL 4.5 to π_init
# (d ≈ 2.1), so that each curve has a long enough fall to fit. These settings were chosen on
# seed 0 (how, with the alternatives measured: README, "Reward-model overoptimization"), then
# frozen; the curves are those of seeds 1, 2 and 3 (the main job, `tiny`, changes the tasks
# and PPO's learning rate, below). Prompts take at most 19 tokens and reference answers 13
# with EOS: PPO's sequences are 20 + 16 long.
TINY = dict(stage_preset='tiny', pretrain_steps=800, sft_steps=80, rm_steps=600,
            comparisons=(2000, 16000), models=('policy',), n_max=64, bon_prompts=256,
            rl_steps=250, rl_stop_kl=4.5, rl_eval_every=20, rl_eval_prompts=1024,
            rl_batch_size=256, rl_minibatches=2, rl_epochs=1, rl_critic='head',
            rl_lr=7e-5, rl_max_prompt_len=20, rl_max_new_tokens=16, seeds=(1, 2, 3),
            workers=2)

PRESETS = {
    # The main job optimises sort prompts only: on the other tasks PPO against a proxy loses
    # gold from its first iterations (repeat: the proxy scores "dog dog dog" for "Write the word
    # cat 3 times." above the right answer; safety: π_init is at 0.999, nothing to gain),
    # which on all four tasks hid the rise on sort (the lecture's tiny run, seed 0: PPO against
    # its 8,000-comparison proxy, sort 0.607 -> 0.731 in 80 iterations while repeat fell 0.576
    # -> 0.406). On sort alone every rollout moves the policy on sort: PPO at lr 7e-5 is at KL
    # 1.8 to 2.7 by its first evaluation (20 iterations), so lr 2e-5 with evaluations every 10,
    # chosen on seed 100 (against the 2,000- and 16,000-comparison proxies: +0.036 at KL 0.35
    # then -0.060 at KL 2.3; +0.053 at KL 0.63, +0.044 at KL 1.18), then frozen. The studies
    # below keep all four tasks and lr 7e-5, as they were measured. 80 iterations, not the 120
    # of the first run on seeds 1-3 (chosen after seeing it: against the 2,000-comparison proxy
    # every seed had fallen by iteration 60, the 16,000-comparison runs were on a plateau), so
    # that the job keeps near its former time; held-out seeds 4-6 then confirmed the rises,
    # the falls and the order of the peaks (README).
    'tiny': dict(TINY, tasks=('sort',), rl_lr=2e-5, rl_eval_every=10, rl_steps=80),
    # Gao et al. §3.3 on this CPU: proxies on 250 to 16,000 comparisons (equal steps), and 2,000
    # comparisons × 4 epochs against 8,000 × 1 (equal steps: Gao et al. figure 13); best-of-n
    # only, on one candidate pool per seed; the exact best-of-n KL next to the formula's.
    'data_scaling': dict(TINY, comparisons=(250, 500, 1000, 2000, 4000, 8000, 16000),
                         epochs=((2000, 4), (8000, 1)), methods=('bon',)),
    # Gao et al. §3.2 on this CPU: proxies of three sizes on 8,000 comparisons, all from the
    # policy's pretraining: its first 1 and 2 of 4 layers, and all 4 (0.26M to 0.85M
    # parameters); best-of-n and PPO (80 iterations at most: past its peak) against each.
    'size_scaling': dict(TINY, comparisons=(8000,), models=('policy-L1', 'policy-L2', 'policy'),
                         rl_steps=80),
    # Gao et al. §3.6 on this CPU: PPO against the 2,000-comparison proxy with β = 0, 0.02 and
    # 0.1 (on the proxy normalised over π_init's answers), each run 100 iterations at most
    # (β = 0.1 has converged by then, β = 0 is at d ≈ 2.5).
    'kl_penalty': dict(TINY, comparisons=(2000,), kl_coefs=(0.0, 0.02, 0.1), methods=('rl',),
                       rl_steps=100),
    # Coste et al. 2023 and Ramé et al. 2024 on this CPU: five proxies on the same 2,000
    # comparisons, differing by seed (the order of their data), each 4 epochs (250 steps: WARM
    # needs members that stay near their shared start); best-of-n against each member, their
    # mean, min and uncertainty-weighted ensembles and their weight average (WARM); PPO (80
    # iterations at most) against the first member and the uncertainty-weighted ensemble.
    'ensembles': dict(TINY, comparisons=(2000,), proxy_seeds=(1, 2, 3, 4, 5), rm_steps=250,
                      ensemble_members=5, rl_aggregations=('uncertainty',), rl_steps=80),
    # Accelerators: proxies of three sizes from scratch and from the policy, more data.
    'small': dict(stage_preset='small', pretrain_steps=4000, sft_steps=1000, rm_steps=2000,
                  comparisons=(2000, 8000, 32000), models=('policy', 'tiny', 'playground'),
                  n_max=256, bon_prompts=1024, rl_steps=500, rl_stop_kl=0.0, rl_eval_every=25,
                  rl_eval_prompts=1024, rl_batch_size=512, rl_minibatches=4, rl_epochs=1,
                  rl_critic='model', rl_lr=1e-5, rl_max_prompt_len=32, rl_max_new_tokens=480,
                  seeds=(0, 1, 2), workers=1),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'Unknown preset {preset!r} for configs/overoptimization.py; choose from '
                     f'{sorted(PRESETS)}.')
  p = PRESETS[preset]
  return ml_collections.ConfigDict({
      'stage_preset': p['stage_preset'],
      # 'program' | 'teacher:random' | 'teacher:<HF reward-model dir>' (rlhf_jax/eval/gold.py).
      'gold': 'program',
      # The initial policy: an HF directory, or '' to pretrain and fine-tune one here (an SFT
      # stopped early, so that there is room to improve).
      'policy': '',
      'pretrain_steps': p['pretrain_steps'],
      'sft_steps': p['sft_steps'],
      'proxies': {
          # 'policy': initialised from the policy; 'policy-L<k>': from its first k layers; a
          # model preset: from scratch.
          'models': p['models'],
          'comparisons': p['comparisons'],  # Gold-labelled pairs of the policy's samples.
          'steps': p['rm_steps'],
          'label_temperature': 0.1,  # Bradley-Terry labels on the gold reward; 0: argmax.
          # The temperature the policy's compared answers are sampled at: 1 is its own
          # distribution; above 1, answers further from it, where PPO goes.
          'answer_temperature': p.get('answer_temperature', 1.0),
          # (comparisons, epochs): proxies of the first model trained that many epochs (steps =
          # comparisons · epochs / batch size), to set data against epochs at equal steps.
          'epochs': p.get('epochs', ()),
          # One proxy per seed of each kind above (config.seed of its RM run: the order of
          # its data); several make the members of config.ensemble.
          'seeds': p.get('proxy_seeds', (0,)),
      },
      # Mitigations (Coste et al. 2023; Ramé et al. 2024): with members > 0, the proxies (one
      # model and number of comparisons, proxies.seeds) are an ensemble's members. Best-of-n
      # optimises each member, each aggregation and (warm) their weight average; PPO the first
      # member and the aggregations of rl_aggregations. fits.json's 'ensembles', 'warm' (the
      # proxies' accuracy on pairs of the optimised policies' answers) and 'early_stop' (a stop
      # chosen from the members' disagreement alone, against the gold's best).
      'ensemble': {
          'members': p.get('ensemble_members', 0),
          'aggregations': ('mean', 'min', 'uncertainty'),
          'rl_aggregations': p.get('rl_aggregations', ()),
          'uncertainty_weight': 0.5,  # λ of mean − λ·var over members of std 1.
          'warm': True,
          # Stopping rules, fixed before any run: stop at the last evaluation before the
          # members' disagreement (std over members of their standardised scores, mean over
          # prompts) first exceeds (1 + early_stop_rise) times its value on π_init's answers;
          # and, for PPO against one member, at the peak of the other members' mean score.
          'early_stop_rise': 0.5,
      },
      # Every curve is measured once per seed, on the policy's side (best-of-n's answers; PPO's
      # rollouts, minibatch order and evaluation answers), against the same proxies: fits.json
      # has the curves averaged over seeds with bootstrap intervals over seeds and prompts.
      'seeds': p['seeds'],
      # The playground tasks optimised and measured: best-of-n's and PPO's prompts, PPO's
      # evaluations. π_init and the proxies learn from all four.
      'tasks': p.get('tasks', ('sort', 'add', 'repeat', 'safety')),
      'methods': p.get('methods', ('bon', 'rl')),  # Best-of-n ('bon') and PPO ('rl').
      # PPO's β (config.rl.kl_coef of configs/ppo.py, on proxy scores normalised to mean 0 and
      # std 1 over π_init's answers): a run per coefficient, proxy and seed. Gao et al.'s main
      # runs have none; several compare them (fits.json's kl_penalty).
      'kl_coefs': p.get('kl_coefs', (0.0,)),
      'bon': {'n_max': p['n_max'], 'num_prompts': p['bon_prompts']},
      # PPO against each proxy. steps, eval_every, eval_prompts and lr set the run
      # (train.steps, ...); every other key sets that key of configs/ppo.py's config.rl.
      'rl': {
          'steps': p['rl_steps'],
          'eval_every': p['rl_eval_every'],
          'eval_prompts': p['rl_eval_prompts'],
          'rollout_batch_size': p['rl_batch_size'],
          'num_minibatches': p['rl_minibatches'],
          'ppo_epochs': p['rl_epochs'],
          'critic': p['rl_critic'],  # 'model' (a copy of the proxy) | 'head' (on the policy)
          # A KL budget: each run stops at the first evaluation with KL(π‖π_init) ≥ stop_kl,
          # so that every proxy's curve covers the same d (0: every run takes all steps).
          'stop_kl': p['rl_stop_kl'],
          'lr': p['rl_lr'],
          # Sequences as long as the tasks need (the padding carries no signal): prompts of up
          # to max_prompt_len tokens, answers of up to max_new_tokens, in training and in
          # evaluation, and in best-of-n's answers.
          'max_prompt_len': p['rl_max_prompt_len'],
          'max_new_tokens': p['rl_max_new_tokens'],
      },
      # Proxies, then PPO runs, trained this many at a time in processes of their own: on a
      # CPU one run leaves cores idle. 1 on an accelerator, which one run fills.
      'workers': p['workers'],
      'progress_bar': True,
      # Keys of every stage's config ('all') or of one kind's ('pretrain', 'rm', 'ppo', …), nested
      # like that config, set before the stage's own: e.g. a smaller model for a quick test.
      'stage_overrides': {},
  })
