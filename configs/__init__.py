"""Experiment configs: one file per algorithm or experiment, `get_config(preset)`; installed
as `rlhf_jax.configs`."""
