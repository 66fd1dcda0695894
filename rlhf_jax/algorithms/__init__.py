"""The algorithms: SFT, reward models, DPO and its family, PPO/GRPO/RLOO; each is a model, a
loss and its update batches, trained by the engine's one loop. `run(config, workdir)`."""

from rlhf_jax.algorithms.registry import ALGORITHMS, PROCEDURES, run
