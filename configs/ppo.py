"""PPO against the reward model with a KL penalty to the SFT policy (RLHF).

Built-in default (offline, after the sft and reward phases in the same workdir):
  python -m rlhf_jax.main --phase=ppo --config=configs/ppo.py --workdir=runs/default
  Machine: 2 cores of an AMD EPYC, jax 0.10.2 on CPU. Time: 9 min 3 s at seed 2 (60 iterations
  of 32 prompts x up to 56 new tokens; commit 4b86b25, the main job). Result, seeds 0/1/2, with
  the 200-step reward model (commit bcd17df): the teacher's gold score on 128 held-out prompts
  2.19 -> 3.05 / 1.74 -> 2.07 / 2.33 -> 2.56 at KL 0.72 / 1.49 / 1.45 nats (target 1.0; what was
  tried for the controller: docs/experiments.md, "The KL controller on the mixed set"); the eval
  phase's gold win-rate against SFT's samples on 200 test prompts 61.1% / 58.9% / 63.3% (README
  "What the main job reaches"). On the single-style set of earlier versions PPO gained nothing;
  what was tried: docs/experiments.md, "PPO".

PPO on the built-in verifier (`:verifier`; issue #22's verifier reward: 1 when the answer checker
accepts the response, else 0), 30 iterations, written to WORKDIR/ppo_verifier (after sft and
reward: the value model starts from the reward model):
  python -m rlhf_jax.main --phase=ppo --config=configs/ppo.py:verifier --workdir=runs/default
  python -m rlhf_jax.main --phase=eval --config.extra_checkpoints=verifier=runs/default/ppo_verifier \
      --config.name=eval_verifier --workdir=runs/default
  Machine: 2 cores of an AMD EPYC, jax 0.10.2 on CPU. Time: 3 min 56 s. Result (seed 0's main-job
  SFT, commit 1658bb3): the eval phase's sampled exact match on 200 test prompts 38.0% -> 45.5%
  (+7.5 [+1.5, +14.0] points, paired) at KL 0.80 nats (target 1.0), 27% of the gap to the oracle
  best-of-8 (66.0%); ood_1 +1.5, ood_2 +2.0, ood_3 +0.0 points. Evaluated again at commit
  117e989 (other draws): 39.5% -> 50.5% (+11.0 [+5.0, +17.5]), 38% of the gap, KL 0.74
  (docs/results.md, "GRPO and PPO on the verifier").

GPT-Neo 125M on Dolly (after import, sft and reward with their gpt_neo_125m variants):
  python -m rlhf_jax.main --phase=ppo --config=configs/ppo.py:gpt_neo_125m --workdir=runs/neo
  Machine, time, result (step time, tokens/s, per-device memory): not yet measured.

Defaults and their sources (Ziegler et al. 2019 = OpenAI lm-human-preferences, `launch.py`/
`train_policy.py`; "N details" = Huang et al., "The N Implementation Details of RLHF with PPO";
TRL = `PPOConfig`):
  rollout.temperature 0.7 ............ lm-human-preferences and TRL sample at 0.7; logprobs are
                                       taken at the same temperature (N details: "scale the
                                       logits by sampling temperature")
  rollout.samples_per_prompt 1 ....... k answers to each prompt per iteration (OpenRLHF's
                                       n_samples_per_prompt); episodes = train.batch_size x k
  ppo.advantage_estimator "gae" ...... GAE with a value model, as lm-human-preferences and TRL's
                                       PPO. "rloo": each episode's return minus the mean return
                                       of the other answers to its prompt (REINFORCE leave-one-
                                       out, Ahmadian et al. 2024; TRL's RLOOTrainer, OpenRLHF's
                                       advantage_estimator=rloo), needs samples_per_prompt >= 2
                                       and no value model
  ppo.advantage_estimator "grpo" / "reinforce_pp", ppo.grpo_scale, ppo.loss_normalization,
  ppo.kl_penalty ..................... GRPO's pieces (configs/grpo.py says where each comes
                                       from); PPO: token-level loss, KL as a reward penalty
  ppo.num_epochs 4 ................... lm-human-preferences noptepochs=4; TRL num_ppo_epochs=4
  ppo.num_minibatches 2 (builtin), 4 (gpt_neo_125m) ... both references use 1 minibatch per
                                       epoch; here 2 and 4 (minibatches of 16 episodes), i.e.
                                       more optimizer steps per rollout
  ppo.gamma 1.0, lam 0.95 ............ lm-human-preferences and TRL
  ppo.clip_range 0.2, clip_range_value 0.2, vf_coef 0.1 ... lm-human-preferences and TRL
  ppo.init_kl_coef, adaptive_kl, kl_target, kl_horizon .... Ziegler et al.'s adaptive controller
                                       (0.15 / target 6 nats / horizon 10000 for 24-token
                                       samples: the gpt_neo_125m values); the built-in run has
                                       only 1,920 episodes and short answers: from 0.2, target
                                       1.0, horizon 200 (docs/experiments.md, "PPO")
  ppo.normalize_scores, normalize_samples 256 ... Ziegler et al. set the reward's gain and bias
                                       so that its scores of the SFT policy's samples of the
                                       training prompts have mean 0, std 1; here of the combined
                                       reward (reward.sources), from 256 samples at the rollout
                                       temperature, once per run (saved in the checkpoint)
  reward.sources "model" ............. what PPO maximises (../shared/CLI.md); "gold" is RLHF-gold
  ppo.whiten_rewards False, advantages whitened ... TRL defaults (N details: advantage whitening)
  optim.eps 1e-5 ..................... lm-human-preferences' Adam epsilon VALUE (N details), but in
                                       optax's (PyTorch's) form, added to sqrt of the
                                       bias-corrected second moment; TF1's epsilon hat equals a
                                       PyTorch eps of 1e-5 / sqrt(1 - b2^t), 31.6x larger at the
                                       first update. optim.eps_form="tf" gives TF's form
                                       (rlhf_jax/training/optim.py)
  optim: the schedule counts optimizer updates (steps x num_epochs x num_minibatches); policy
         and value gradients are clipped to clip_norm each (logged: policy_grad_norm,
         value_grad_norm)
  train.eval_every 10 ................ the held-out evaluation (eval/score, eval/kl,
                                       eval/gold_mean, eval/exact_match) every 10 iterations and
                                       at 0 and the end: 7 points of the over-optimisation curve
  optim.lr 1e-5 for 125M ............. lm-human-preferences (1.41e-5 in TRL's examples)
  optim.lr 3e-5 (builtin) ............ measured on the built-in checkpoints (docs/experiments.md)
  ppo.missing_eos_penalty ............ TRL's `missing_eos_penalty` (subtracted from the score)
"""

import ml_collections

from rlhf_jax.configs import common


def get_config(variant: str = "builtin") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "ppo"  # The WORKDIR subdirectory written (the pipeline's RLHF-gold run: ppo_gold).
  config.sft_checkpoint = ""  # "" = WORKDIR/sft: the KL reference (and the start, by default).
  # "" = start from sft_checkpoint; else a policy of the same architecture to continue (the
  # iterated pipeline's ppo_init=last: the previous round's PPO policy).
  config.policy_checkpoint = ""
  config.reward_checkpoint = ""  # "" = WORKDIR/reward
  # What PPO maximises (CLI.md): "model" (the reward phase's model), "verifier", "gold" (the
  # simulated teacher's score), "package.module:function", or weighted "model=1,verifier=2".
  config.reward = ml_collections.ConfigDict(dict(sources="model"))
  config.value_model = "reward"  # reward: a trained copy of the reward model | policy_head (GAE only)
  # | adapters (LoRA only): the policy's frozen base with the value model's own adapters and head.
  config.data = common.data("builtin")  # Prompts: the train split; held-out: the validation split.
  config.eval_prompts = 128  # Held-out prompts scored before and after PPO.
  config.eval_batch_size = 32
  config.model = common.model()
  config.mesh = common.mesh()
  config.rollout = ml_collections.ConfigDict(dict(
      max_prompt_length=64, max_new_tokens=56, temperature=0.7, top_k=0,
      top_p=1.0, samples_per_prompt=1))
  config.ppo = ml_collections.ConfigDict(dict(
      advantage_estimator="gae", grpo_scale="group", loss_normalization="token",
      kl_penalty="reward", num_epochs=4, num_minibatches=2, accum_steps=1, gamma=1.0,
      lam=0.95, clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, entropy_coef=0.0, kl_estimator="k1",
      init_kl_coef=0.2, adaptive_kl=True, kl_target=1.0, kl_horizon=200.0,
      whiten_rewards=False, normalize_scores=True, normalize_samples=256,
      missing_eos_penalty=1.0, approx_kl_stop=0.0))
  config.optim = common.optim(3e-5, warmup_steps=0, schedule="constant", eps=1e-5, clip_norm=1.0)
  # train.batch_size = prompts per PPO iteration (episodes: times rollout.samples_per_prompt);
  # one loop step = one iteration.
  config.train = common.train(steps=60, batch_size=32, log_every=5, save_every=20,
                              eval_every=10)

  common.check_variant(variant, ("builtin", "verifier", "gpt_neo_125m"))
  if variant == "verifier":
    config.name = "ppo_verifier"
    config.reward.sources = "verifier"
    config.train.steps = 30
  if variant == "gpt_neo_125m":
    config.data = common.data("databricks/databricks-dolly-15k")
    config.rollout.update(dict(max_prompt_length=256, max_new_tokens=64))
    config.ppo.update(dict(num_minibatches=4, init_kl_coef=0.15, kl_target=6.0,
                           kl_horizon=10000.0))
    config.optim = common.optim(1e-5, schedule="constant", eps=1e-5, clip_norm=1.0)
    config.train = common.train(steps=500, batch_size=64, log_every=5, save_every=50,
                                eval_every=50)
    config.eval_batch_size = 64
  return config
