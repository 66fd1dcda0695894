"""rlhf_jax: the alignment pipeline (SFT, reward models, DPO family, PPO, best-of-n) in JAX."""

import setuptools

setuptools.setup(
    name='rlhf_jax',
    version='0.1.0',
    description=__doc__,
    packages=setuptools.find_packages(include=['rlhf_jax', 'rlhf_jax.*']) + ['rlhf_jax.configs'],
    # The experiment configs ship with the package, so commands work from any directory.
    package_dir={'rlhf_jax.configs': 'configs'},
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'transformers>=5.0',
        'safetensors>=0.6',
        'tokenizers>=0.22',
        'jinja2>=3.1',  # transformers' chat templates (transformers does not require it).
        'ml-collections>=1.1.0',
        'absl-py>=2.1',
        'tensorflow-datasets>=4.9.10',
        'array-record>=0.8',
        'tensorboardX>=2.6',
        'tqdm>=4.66',
        'fsspec>=2024.1',  # Metrics and config.json in remote workdirs (gs://...).
        'pyarrow>=15',  # hf: sources (parquet and arrow files).
        'matplotlib>=3.9',
        'numpy>=2.0',
        'scipy>=1.13',  # scipy.special in evals/calibration.py.
    ],
    extras_require={
        # torch only builds reference models for parity tests; 2.13.0 is the CPU build that
        # pip takes from local disk on our machines (a bare 'torch' pulls a CUDA build).
        # trl: its KTO loss, run on the same inputs as ours (tests/test_kto.py).
        # wandb: config.train.wandb, run offline (WANDB_MODE=offline) in tests/test_metrics.py.
        # libtpu: tests/test_aot.py compiles train steps for TPU slices on CPU machines (the
        # version tested with jax 0.10.2).
        # peft: loads the LoRA adapters we export onto the HF base (tests/test_lora.py).
        'test': ['pytest>=8', 'pytest-xdist>=3.6', 'torch==2.13.0', 'trl==1.16.0',
                 'wandb>=0.19', 'libtpu==0.0.52', 'peft==0.21.2'],
        # The TPU runtime and compiler; python -m rlhf_jax.aot needs it, not a TPU.
        'tpu': ['libtpu==0.0.52'],
        # Workdirs on Google Cloud Storage (gs://...): every file of a workdir, TensorBoard's
        # events included, goes through fsspec, which reads gs:// with gcsfs.
        'gcs': ['gcsfs'],
        'wandb': ['wandb>=0.19'],  # config.train.wandb: metrics, figures and tables to W&B.
        'bench': ['torch==2.13.0', 'trl==1.16.0'],  # benchmarks/vs_trl.py: TRL's trainers.
    },
)
