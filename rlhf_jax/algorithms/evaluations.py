"""Evaluations that several algorithms share, built from the run context's models."""

from rlhf_jax.evals.samples import GoldRewardOfSamples
from rlhf_jax.playground import tasks


def sample_evaluations(ctx, graphdef, *, reference=None, proxy=None) -> dict:
  """With the playground's gold (config.eval.gold == 'playground'): {'samples': the gold reward
  of the policy's sampled answers to held-out prompts}, else {}.

  reference: parameters of a reference policy on the mesh (e.g. the SFT model), for win rate
  and KL against it; proxy(prompts, responses), a reward model, adds their proxy reward.
  """
  config = ctx.config
  if ctx.gold is None:
    return {}
  ev = config.eval
  prompts = tasks.playground_prompts(config.data.playground, 'eval', ev.num_prompts)
  return {'samples': GoldRewardOfSamples(
      prompts, ctx.tokenizer, graphdef, gold_fn=ctx.gold,
      groups=[tasks.task_of(p) for p in prompts], mesh=ctx.mesh, rules=ctx.rules,
      batch_size=config.train.batch_size, max_prompt_len=config.data.max_prompt_len,
      max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, seed=config.seed,
      workdir=ctx.workdir, reference=reference, chunk_size=config.train.logprob_chunk_size,
      proxy_fn=proxy)}
