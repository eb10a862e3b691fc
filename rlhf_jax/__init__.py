"""rlhf-jax: supervised fine-tuning, reward modelling and PPO for GPT-Neo in JAX/Flax."""

__version__ = "0.1.0"
