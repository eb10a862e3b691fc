"""rlhf-jax: SFT, reward modelling and PPO for GPT-Neo in JAX/Flax."""
import setuptools

LABEL_REQUIRES = ["starlette>=0.37", "uvicorn>=0.29"]
# --config.model.lora.rank > 0: LoRA adapters through qwix (Google's LoRA/quantisation library).
LORA_REQUIRES = ["qwix>=0.1.8"]

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
    # The labelling page's HTML, script and style, served by rlhf_jax.data.label_server.
    package_data={"rlhf_jax.data": ["label_page/*"]},
    extras_require={
        # labeler=web: the labelling page for people (a Starlette app on uvicorn).
        "label": LABEL_REQUIRES,
        # LoRA training (--config.model.lora.rank > 0); full fine-tuning needs nothing more.
        "lora": LORA_REQUIRES,
        # torch is only the Hugging Face PyTorch reference the parity tests compare against.
        # 2.13.0 is pinned: it is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
        # The label extra, httpx (Starlette's TestClient) and selenium test the labelling page;
        # selenium drives the system's chromium (.ci/run installs it), it downloads no browser.
        # peft loads the LoRA adapter exports onto the PyTorch reference (tests/test_lora.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", *LABEL_REQUIRES,
                 "httpx>=0.27", "selenium>=4.11", *LORA_REQUIRES, "peft>=0.17"],
    },
)
