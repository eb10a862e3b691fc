"""rlhf-jax: SFT, reward modelling and PPO for GPT-Neo in JAX/Flax."""
import setuptools

setuptools.setup(
    name="rlhf-jax",
    version="0.1.0",
    description="RLHF (SFT, reward model, PPO, evaluation) for GPT-Neo in JAX/Flax",
    license="MIT",
    python_requires=">=3.10",
    # `configs/` lives at the repository root (big_vision style) and is installed as
    # `rlhf_jax.configs`, so config files can import each other and the binary finds
    # its built-in defaults however the package was installed.
    packages=setuptools.find_packages(include=["rlhf_jax", "rlhf_jax.*"]) + ["rlhf_jax.configs"],
    package_dir={"rlhf_jax.configs": "configs"},
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "datasets>=3.0",
        "sacrebleu>=2.4",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is only the Hugging Face PyTorch reference the parity tests compare against.
        # 2.13.0 is pinned: it is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0"],
    },
)
