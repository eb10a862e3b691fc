"""The whole pipeline on the built-in default, offline: init, sft, reward, ppo, eval.

  python -m rlhf_jax.main                  # = --config=configs/pipeline.py --workdir=runs/default

Each phase's settings are its own config file's (`configs/PHASE.py`), nested here under the phase
name: `--config.sft.train.steps=300`, `--config.ppo.optim.lr=5e-5`. The `data`, `model` and `mesh`
sections are shared by every phase (`--config.data.seed=1` changes them all). A phase whose
finished checkpoint is already in the workdir is skipped; a partial one resumes.
Machine: 2 cores of an AMD EPYC, jax 0.10.2 on CPU. Time: 6 min 51 s. Result (commit c5a8eca):
SFT exact match 0% -> 55%; reward model 74.2% held-out pairwise accuracy; PPO held-out reward
score 7.24 -> 7.20 (no gain) at KL 1.08; eval, paired against SFT on 200 test prompts: RLHF
+0.01 [-0.12, +0.14], best-of-8 +0.25 [+0.17, +0.35] (README, "What the main job reaches").
"""

import ml_collections

from rlhf_jax.configs import common
from rlhf_jax.configs import eval as eval_config
from rlhf_jax.configs import init as init_config
from rlhf_jax.configs import ppo as ppo_config
from rlhf_jax.configs import reward as reward_config
from rlhf_jax.configs import sft as sft_config

PHASES = ("init", "sft", "reward", "ppo", "eval")


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.phases = ",".join(PHASES)  # Run a subset with e.g. --config.phases=sft,reward.
  config.data = common.data("builtin")
  config.model = common.model()
  config.mesh = common.mesh()
  for name, module in (("init", init_config), ("sft", sft_config), ("reward", reward_config),
                       ("ppo", ppo_config), ("eval", eval_config)):
    phase = module.get_config()
    for shared in ("data", "model", "mesh"):
      if shared in phase:
        phase[shared] = config[shared]  # The same object: one override changes every phase.
    config[name] = phase
  return config
