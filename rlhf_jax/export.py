r"""Exports any checkpoint of a run to Hugging Face format: safetensors and the run's tokenizer.

  python -m rlhf_jax.export --workdir=runs/sft --out=runs/sft/hf-150 [--step=150] \
      [--dtype=bfloat16] [--max_shard_size=5GB] [--push_to_hub=org/name]

The run is rebuilt from <workdir>/config.json: the architecture of the model it trains
(config.model, or config.model.hf_path's checkpoint), its tokenizer, and where that model's
parameters sit in the train state (online RL trains the policy with its critic; the policy is
exported). Only the parameters of checkpoint --step (default: the latest) are read, each
process its shards of a mesh over all devices, whatever mesh trained them; a LoRA run's are
its adapters, joined to the base it read (config.model.hf_path) and folded in, with the
adapters also written for PEFT in --out/adapter. Weights over
--max_shard_size are split into model-00001-of-0000N.safetensors files with an index, as
transformers writes them. --out may be a URL (gs://...). Process 0 writes it and, with
--push_to_hub, uploads it to that Hub repository (created if needed). On a multi-host slice run
it on every host, like the training command.
"""

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx

from rlhf_jax import errors, parallel
from rlhf_jax.config import EXPORT_DTYPES, architecture
from rlhf_jax.context import RunContext
from rlhf_jax.engine.checkpoint import Checkpointer
from rlhf_jax.models import ModelConfig, Transformer, lora
from rlhf_jax.models.loading import export_hf
from rlhf_jax.models.sources import local_dir
from rlhf_jax.storage import open_file

# Their train state holds an ActorCritic: the policy under 'policy', beside its critic.
ONLINE_RL = ('ppo', 'grpo', 'rloo')


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run wrote to <workdir>/config.json."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open_file(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError as error:
    raise errors.NotFound(f'{path}: no such file; --workdir must be the workdir of a '
                          'run.') from error


def trained_model(config) -> tuple[ModelConfig, tuple[str, ...]]:
  """The architecture of the model a run exports (online RL's: the policy) and the path of its
  parameters within the train state's params."""
  online = config.get('algorithm') in ONLINE_RL
  return architecture(config.model, head='lm' if online else None), ('policy',) if online else ()


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = 'bfloat16',
           max_shard_size: int | str = '5GB', push_to_hub: str | None = None) -> int:
  """Writes checkpoint `step` (None: the latest) of the run in `workdir` to `out` as a Hugging
  Face checkpoint with the run's tokenizer, its weights in `dtype`, sharded over
  `max_shard_size`; uploads it to the Hub repository `push_to_hub` if given. Returns the step.
  """
  config = read_run_config(workdir)
  config.mesh.update(data=1, fsdp=-1, tensor=1)  # Parameters sharded over every device.
  ctx = RunContext(config, workdir)
  cfg, within = trained_model(config)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  shardings = parallel.state_shardings(abstract, ctx.mesh, ctx.rules)
  target = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=sharding),
                        abstract, shardings)
  # It never saves, so its retention never deletes anything.
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'),
                              save_every=config.train.checkpoint_every,
                              keep=config.train.keep_checkpoints, async_save=False)
  try:  # A LoRA run's checkpoints hold its adapters; the base is where the run read it.
    step, params = checkpointer.restore_params(step, lora.split_trained(target)[0],
                                               within=within)
  finally:
    checkpointer.close()
  if cfg.lora_rank:
    base = ctx.initial_model() if not config.model.hf_path else ctx.load(
        config.model.hf_path, head=cfg.head)
    params = lora.join(params, lora.split_trained(base.params)[1])
  tokenizer = ctx.tokenizer if 'tokenizer' in config.data else None  # Not the sorting task.
  export_hf(graphdef, params, out, tokenizer, dtype=dtype, max_shard_size=max_shard_size)
  if push_to_hub and jax.process_index() == 0:
    import huggingface_hub
    api = huggingface_hub.HfApi()
    api.create_repo(push_to_hub, exist_ok=True)
    api.upload_folder(repo_id=push_to_hub, folder_path=local_dir(out, key='--out'),
                      commit_message=f'{workdir}: step {step}')
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    step = export(f.workdir, f.out, step=f.step, dtype=f.dtype,
                  max_shard_size=int(f.max_shard_size) if f.max_shard_size.isdigit()
                  else f.max_shard_size, push_to_hub=f.push_to_hub)
  except (errors.Error, OSError) as error:  # On purpose, or the machine's (a full disk).
    sys.exit(f'rlhf_jax.export: error: {errors.one_line(error)}')
  pushed = f' and {f.push_to_hub} on the Hub' if f.push_to_hub else ''
  print(f'rlhf_jax.export: step {step} of {f.workdir} written to {f.out}{pushed}.')


if __name__ == '__main__':
  # Defined here, not on import: other commands (rlhf_jax.launch) define --workdir too.
  flags.DEFINE_string('workdir', None, 'The run whose checkpoint to export.')
  flags.DEFINE_integer('step', None, 'The checkpoint to export (default: the latest).')
  flags.DEFINE_string('out', None, 'Directory or URL (gs://...) to write the export to.')
  flags.DEFINE_enum('dtype', 'bfloat16', EXPORT_DTYPES, 'Of the exported weights.')
  flags.DEFINE_string('max_shard_size', '5GB', 'Largest weights file (bytes, or e.g. 500MB, 5GB).')
  flags.DEFINE_string('push_to_hub', None, 'Hub repository (org/name) to upload the export to.')
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
