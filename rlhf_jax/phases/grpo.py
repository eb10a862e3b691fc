"""The `grpo` phase: the RL phase (`phases.ppo`, the one code path) with GRPO's defaults from
configs/grpo.py: k answers to each prompt scored by the reward sources (the built-in verifier by
default), advantages normalised within each prompt's group, the k3 KL to the SFT policy as a loss
term, no value model, writing WORKDIR/grpo/{checkpoint/, metrics.jsonl}.

  python -m rlhf_jax.main --phase=grpo --workdir=runs/default
"""

import pathlib

from rlhf_jax.phases import ppo


def run(config, workdir: pathlib.Path) -> None:
  ppo.run(config, workdir, phase="grpo")
