"""Where a model or tokenizer comes from: a local directory, a directory on shared storage
(`gs://bucket/run/hf`, `memory://...`, any URL fsspec reads) or a Hugging Face Hub id
(`org/name`). `local_dir` turns each into the local directory that transformers and
safetensors read; every loader calls it.

`huggingface_hub` is imported inside the functions that use it, so importing this module stays
cheap.
"""

import functools
import os

from rlhf_jax import storage
from rlhf_jax.errors import NotFound, one_line

# What a model or tokenizer needs from a Hub repository: configs, safetensors weights, tokenizer
# files and chat templates; not the weights of other frameworks (*.bin, *.pth, an original/
# copy), which would double a download.
HUB_FILES = ('*.json', '*.safetensors', '*.txt', '*.model', '*.jinja', '*.tiktoken')


def local_dir(path: str, *, key: str | None = None) -> str:
  """`path` as a local directory: itself when it is one (never copied); a URL's directory
  copied to this host once per version of its files (`storage.local_copy`); a Hub id, `name` or
  `org/name` that is no local path, as its snapshot in the Hugging Face cache, downloaded there
  unless HF_HUB_OFFLINE=1. `key` names the config key that set `path`, for the errors."""
  named = f'{key}={path!r}' if key else repr(path)
  if os.path.isdir(path):
    return path
  if storage.is_remote(path):
    try:
      return storage.local_copy(path)
    except NotFound as error:
      raise NotFound(f'{named}: no such directory at that URL.') from error
  if os.path.exists(path) or not _is_hub_id(path):
    raise NotFound(f'{named}: no such directory (give a local directory, a URL such as '
                   'gs://bucket/run/hf, or a Hugging Face Hub id such as org/name).')
  return _hub_snapshot(path, named)


def _is_hub_id(path: str) -> bool:
  """Whether `path` has the form of a Hub repository id: `name` or `org/name`, of letters,
  digits, '-', '_' and '.'."""
  from huggingface_hub.errors import HFValidationError
  from huggingface_hub.utils import validate_repo_id
  try:
    validate_repo_id(path)
  except HFValidationError:
    return False
  return True


def _hub_snapshot(repo_id: str, named: str) -> str:
  """The Hub id's snapshot; where there is none, an error saying what was tried."""
  import huggingface_hub
  try:
    return _download(repo_id)
  except (huggingface_hub.errors.LocalEntryNotFoundError,
          huggingface_hub.errors.HfHubHTTPError) as error:
    constants = huggingface_hub.constants
    reason = (f'HF_HUB_OFFLINE=1 and the cache {constants.HF_HUB_CACHE} does not hold it'
              if constants.HF_HUB_OFFLINE else one_line(error)[:300])
    raise NotFound(f'{named}: no such local directory; as a Hugging Face Hub id: '
                   f'{reason}.') from error


@functools.cache
def _download(repo_id: str) -> str:
  """The snapshot of `repo_id`'s main revision, asked of the Hub once per process: a run reads
  one revision throughout, and its several loads of one model cost one request."""
  import huggingface_hub
  return huggingface_hub.snapshot_download(repo_id, allow_patterns=list(HUB_FILES))
