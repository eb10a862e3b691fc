"""Evaluation: RR, SFT, RO (best-of-N) and RLHF side by side, in distribution and out of it.

Built-in default (offline, after sft, reward and ppo in the same workdir):
  python -m rlhf_jax.main --phase=eval --config=configs/eval.py --workdir=runs/default
  (`--phase=test` is an alias.) Machine: 2 CPU cores; about a minute (52 s). Writes WORKDIR/eval/
  eval.json, eval.md, reward_by_system.png, ood_robustness.png, samples.jsonl. Result (README,
  "Results of the main job"): reward-model score minus SFT's on the same test prompts (paired
  95% CI): RO +0.37 [+0.26, +0.49], RLHF +0.14 [+0.07, +0.23]; exact match SFT 53%, RO 47.5%,
  RLHF 49.5%.

Compare against other checkpoints too (an exported HF directory, a base model):
  --config.extra_checkpoints="base=runs/default/init,hf=/path/to/hf_dir"
"""

import ml_collections

from rlhf_jax.configs import common


def get_config(variant: str = "builtin") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.sft_checkpoint = ""  # "" = WORKDIR/sft
  config.reward_checkpoint = ""  # "" = WORKDIR/reward
  config.ppo_checkpoint = ""  # "" = WORKDIR/ppo
  config.extra_checkpoints = ""  # "name=path,name=path": more policies (Orbax or HF) to compare.
  config.data = common.data("builtin")  # Splits: test, and ood_1..3 (built-in) or ood (Dolly).
  config.num_prompts = 200  # Per split.
  config.best_of_n = 8  # RO's N.
  config.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=24, temperature=0.7, top_k=0, top_p=1.0))  # PPO's rollout settings.
  config.max_prompt_length = 64
  config.batch_size = 50
  config.num_samples = 50  # Prompts written to samples.jsonl.
  config.seed = 0
  config.model = common.model()
  config.mesh = common.mesh()
  if variant == "builtin":
    pass
  elif variant == "gpt_neo_125m":
    config.data = common.data("databricks/databricks-dolly-15k")
    config.data.ood_categories = ("creative_writing",)
    config.sampling.max_new_tokens = 64
    config.max_prompt_length = 256
    config.batch_size = 16
  else:
    raise ValueError(f"unknown variant {variant!r}: builtin, gpt_neo_125m")
  return config
