"""Online RL from a reward model: PPO with GAE, and critic-free GRPO and RLOO."""
