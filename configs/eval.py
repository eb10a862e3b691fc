"""Evaluation: RR, SFT, RO (best-of-N) and RLHF side by side, in distribution and out of it.

Built-in default (offline, after sft, reward and ppo in the same workdir):
  python -m rlhf_jax.main --phase=eval --config=configs/eval.py --workdir=runs/default
  (`--phase=test` is an alias.) Machine: 2 cores of an AMD EPYC, jax 0.10.2 on CPU. Time: 3 min
  38 s at seed 2 (200 prompts per split, 4 splits, 16 SFT samples per test prompt for RO and the
  best-of-n curve; commit 4b86b25, the main job). Writes WORKDIR/eval/ eval.json, eval.md,
  reward_by_system.png, ood_robustness.png, overoptimization.png, samples.jsonl. Result, seeds
  0/1/2 (commit 117e989, 3 min 15 s-3 min 24 s with RLHF-gold beside): RLHF's gold win-rate
  against SFT's samples on `test` 63.0% / 58.4% / 61.9%, RO (best of 8) 62.7% / 63.0% / 65.4%
  (README "What the main job reaches", docs/results.md).

GPT-Neo 125M on Dolly (after the gpt_neo_125m variants of the other phases):
  python -m rlhf_jax.main --phase=eval --config=configs/eval.py:gpt_neo_125m --workdir=runs/neo
  Machine, time, result: not yet measured.

Compare against other checkpoints too (an exported HF directory, a base model):
  --config.extra_checkpoints="base=runs/default/init,hf=/path/to/hf_dir"
"""

import ml_collections

from rlhf_jax.configs import common


def get_config(variant: str = "builtin") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "eval"  # The WORKDIR subdirectory written.
  config.sft_checkpoint = ""  # "" = WORKDIR/sft
  config.reward_checkpoint = ""  # "" = WORKDIR/reward
  config.ppo_checkpoint = ""  # "" = WORKDIR/ppo
  # "" = WORKDIR/ppo_gold, WORKDIR/grpo, WORKDIR/dpo when they hold a checkpoint (else left out).
  config.ppo_gold_checkpoint = ""  # RLHF-gold: PPO on the teacher's gold score.
  config.grpo_checkpoint = ""
  config.dpo_checkpoint = ""
  config.extra_checkpoints = ""  # "name=path,name=path": more policies (Orbax or HF) to compare.
  config.data = common.data("builtin")  # Splits: test, and ood_1..3 (built-in) or ood (Dolly).
  config.eval_prompts = 200  # Per split.
  config.best_of_n = 8  # RO's N.
  # SFT samples per in-distribution prompt for the best-of-n over-optimisation curve (n = 1, 2,
  # 4, ... up to it; built-in data; 0 = no curve). RO's N are the first of them.
  config.overoptimization_samples = 16
  config.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=56, temperature=0.7, top_k=0, top_p=1.0))  # PPO's rollout settings.
  config.max_prompt_length = 64
  config.eval_batch_size = 50
  config.num_samples = 50  # Prompts written to samples.jsonl.
  config.seed = 0
  config.model = common.model()
  config.mesh = common.mesh()
  common.check_variant(variant, ("builtin", "gpt_neo_125m"))
  if variant == "gpt_neo_125m":
    config.data = common.data("databricks/databricks-dolly-15k")
    config.data.ood_categories = ("creative_writing",)
    config.sampling.max_new_tokens = 64
    config.max_prompt_length = 256
    config.eval_batch_size = 16
  return config
