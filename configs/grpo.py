"""GRPO: the RL phase (rlhf_jax/phases/ppo.py, the same rollout -> score -> advantages -> update
code) with Group Relative Policy Optimization's defaults, on the built-in verifier reward.

Built-in default (offline, after the sft phase in the same workdir; no reward model needed):
  python -m rlhf_jax.main --phase=grpo --workdir=runs/default
  Machine: 2 cores of an AMD EPYC, jax 0.10.2 on CPU (queue run, at load 15-18 from other jobs).
  Time: 7 min 54 s wall (loaded; the idle time, and whether it fits 5 minutes, not yet measured).
  Result (from the seed-0 main job's SFT, commit 271f3b9): the eval phase's exact match on 200
  test prompts 38.0% -> 41.5% (+3.5 [-2.5, +9.5] points, paired), 12% of the gap to the oracle
  best-of-8 (66.0%), at KL 1.27 nats; the phase's own held-out greedy check 58.6% -> 53.1% on 128
  validation prompts (docs/results.md, "GRPO on the verifier").

Defaults and their sources (DeepSeekMath = Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
Mathematical Reasoning in Open Language Models", section 4.1; Dr. GRPO = Liu et al. 2025,
"Understanding R1-Zero-Like Training: A Critical Perspective"; DAPO = Yu et al. 2025, "DAPO: An
Open-Source LLM Reinforcement Learning System at Scale"; TRL = TRL 1.16's `GRPOConfig`; Tunix =
google/tunix's `GRPOConfig`):
  reward.sources "verifier" .......... 1 when the built-in answer checker accepts the response,
                                       else 0: DeepSeekMath's rule-based outcome reward (any
                                       source of ../shared/CLI.md works)
  ppo.advantage_estimator "grpo" ..... A = (r - mean of the prompt's group) / (std + 1e-4), the
                                       same on every token of the answer (DeepSeekMath outcome
                                       supervision; TRL's eps 1e-4 and unbiased std); no value
                                       model
  ppo.grpo_scale "group" ............. DeepSeekMath and TRL scale_rewards="group"; "batch"
                                       (REINFORCE++'s global std) or "none" (Dr. GRPO: the std
                                       division up-weights prompts whose answers all score alike)
  rollout.samples_per_prompt (G) ..... answers per prompt: DeepSeekMath 64, TRL num_generations 8
  ppo.loss_normalization "sequence_mean" ... GRPO's 1/|o_i| per answer then the mean over answers
                                       (DeepSeekMath eq. 3, TRL loss_type="grpo"); "constant" is
                                       Dr. GRPO's sum / (answers x max new tokens) (TRL
                                       "dr_grpo"), "token" DAPO's token-level mean (TRL "dapo",
                                       TRL's default)
  ppo.kl_penalty "loss", kl_estimator "k3", init_kl_coef (beta) 0.04 ... the KL to the
                                       reference as a k3 loss term, not a reward penalty
                                       (DeepSeekMath eq. 4, beta 0.04; Tunix beta 0.04; TRL beta
                                       0.0), reduced like the policy loss
  ppo.adaptive_kl True, kl_target 1.0, kl_horizon 200 ... all three keep beta fixed; here
                                       Ziegler et al.'s controller steers beta (on the k3 KL it
                                       penalises) to PPO's built-in KL target, so GRPO and PPO
                                       are compared at the same KL
  ppo.clip_range 0.2 ................. DeepSeekMath epsilon 0.2, TRL epsilon 0.2, Tunix 0.2
  ppo.num_epochs 2, num_minibatches 2 ... TRL and Tunix default to num_iterations 1 (one
                                       update per rollout, the ratio always 1); DeepSeekMath's
                                       "GRPO iteration" allows several (mu), which the clip
                                       then bounds. Here 2 epochs x 2 minibatches: the rollout,
                                       not the update, is the cost on a CPU
  ppo.normalize_scores False, missing_eos_penalty 0 ... the group normalisation already removes
                                       the reward's offset and scale (no SFT-sample normaliser
                                       pass); TRL has no missing-EOS penalty by default
  rollout.temperature 0.7, optim.lr 1e-4, train.steps 32, train.batch_size 16 (x 8 answers
  = 128 episodes an iteration): measured on the built-in
                                       checkpoints within the 5-minute budget
                                       (docs/experiments.md, "GRPO"); TRL's temperature is 1.0
                                       and lr 1e-6 for billion-parameter models
"""

import ml_collections

from rlhf_jax.configs import common
from rlhf_jax.configs import ppo as ppo_config


def get_config(variant: str = "builtin") -> ml_collections.ConfigDict:
  common.check_variant(variant, ("builtin", "gpt_neo_125m"))  # Not ppo's `verifier`.
  config = ppo_config.get_config(variant)
  config.name = "grpo"  # The WORKDIR subdirectory written.
  config.reward.sources = "verifier"
  config.rollout.update(dict(samples_per_prompt=8, temperature=0.7))
  config.ppo.update(dict(
      advantage_estimator="grpo", grpo_scale="group", loss_normalization="sequence_mean",
      kl_penalty="loss", kl_estimator="k3", init_kl_coef=0.04, adaptive_kl=True,
      kl_target=1.0, kl_horizon=200.0, num_epochs=2, num_minibatches=2, normalize_scores=False,
      missing_eos_penalty=0.0))
  if variant == "gpt_neo_125m":
    # Dolly has no checkable answers: the reward model scores (../shared/CLI.md's sources).
    config.reward.sources = "model"
    config.train.batch_size = 16  # x 8 answers = 128 episodes per iteration.
    return config
  config.optim.lr = 1e-4
  # train.batch_size = prompts per iteration (episodes: times samples_per_prompt); the held-out
  # evaluation (eval/exact_match, eval/kl, eval/gold_mean) at 0, 16 and 32.
  config.train.update(dict(steps=32, batch_size=16, log_every=4, save_every=16, eval_every=16))
  return config
