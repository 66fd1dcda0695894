"""What online RL trains: the policy and, for PPO, its critic, as one NNX module.

The critic is one of
  - a separate scalar-head transformer (`config.rl.critic='model'`), initialised from the
    reward model as in Ouyang et al. 2022 and Huang et al. 2024;
  - a value head on the policy's own hidden states (`'head'`): one more forward pass saved,
    at the price of policy and value gradients sharing the backbone;
  - none (`'none'`): GRPO and RLOO, whose baselines come from the other samples of a prompt.

Sequences are a left-padded prompt of P tokens followed by N response positions. Response token
j is predicted from position P − 1 + j, and its value V(s_j) is read there too: the state is
everything before the token.
"""

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.errors import InputError
from rlhf_jax.losses import token_logprobs
from rlhf_jax.models import Transformer
from rlhf_jax.models.layers import HeadParam

CRITICS = ('model', 'head', 'none')


class ValueHead(nnx.Module):
  """V = h · w + b on the policy's final hidden states; w, b start at 0 (V ≡ 0)."""

  def __init__(self, d_model: int):
    self.kernel = HeadParam(jnp.zeros((d_model,), jnp.float32), logical_axes=('embed',))
    self.bias = HeadParam(jnp.zeros((), jnp.float32), logical_axes=())

  def __call__(self, hidden_BxTxD):
    return jnp.dot(hidden_BxTxD.astype(jnp.float32), self.kernel[...]) + self.bias[...]


class ActorCritic(nnx.Module):
  """The policy with an optional critic (`ValueHead`, a scalar-head `Transformer`, or None).

  A critic model's outputs are read as V = (output − value_shift) / value_scale: a critic
  initialised from the reward model then starts on the scale of the normalised scores.
  """

  def __init__(self, policy: Transformer, critic: ValueHead | Transformer | None, *,
               value_shift: float = 0.0, value_scale: float = 1.0):
    if policy.cfg.head != 'lm':
      raise InputError(f'The policy needs an LM head; it has head={policy.cfg.head!r}.')
    if isinstance(critic, Transformer) and critic.cfg.head != 'scalar':
      raise InputError(f'A critic model needs a scalar head; it has head={critic.cfg.head!r}.')
    self.policy, self.critic = policy, critic
    self.value_shift, self.value_scale = float(value_shift), float(value_scale)

  def response_logprobs_and_values(self, tokens_BxL, attention_mask_BxL, *, prompt_len: int,
                                   temperature: float, chunk_size: int):
    """(log π(y_j | x, y_<j) [B, N] at `temperature`, V(s_j) [B, N] or None), N = L − P."""
    hidden_BxLxD, _ = self.policy.hidden_states(tokens_BxL, attention_mask=attention_mask_BxL)
    before_BxNxD = hidden_BxLxD[:, prompt_len - 1:-1]
    logps_BxN = token_logprobs(before_BxNxD, self.policy.unembedding(),
                               tokens_BxL[:, prompt_len:], chunk_size=chunk_size,
                               temperature=temperature)
    if self.critic is None:
      return logps_BxN, None
    if isinstance(self.critic, ValueHead):
      return logps_BxN, self.critic(before_BxNxD)
    values_BxL = self.critic(tokens_BxL, attention_mask=attention_mask_BxL)
    values_BxN = (values_BxL[:, prompt_len - 1:-1] - self.value_shift) / self.value_scale
    return logps_BxN, values_BxN
