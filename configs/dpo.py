"""DPO: the SFT policy trained directly on preference pairs, no reward model, no sampling.

Built-in default (offline, after init, sft and label in the same workdir):
  python -m rlhf_jax.main --phase=dpo --config=configs/dpo.py --workdir=runs/default
  Pairs: the label phase's judgements of the SFT policy's own samples by the simulated teacher
  (WORKDIR/label/pairs.jsonl; ties left out). Machine: 2 cores of an AMD EPYC, jax 0.10.2 on
  CPU. Time: 373 s (300 steps of 32 pairs, the one-off reference computation of 10,961 pairs
  included; commit 6948608, the seed-0 main job's SFT and labels). Result at the default lr 3e-5:
  held-out pairs' rewards/accuracies 0.62; the eval phase's gold win-rate against SFT on 200
  `test` prompts 61.0% [56.0%, 65.5%] (ood_1 68.8%, ood_2 68.0%) at KL 1.02 nats, exact match
  38.0% -> 39.5%, answers 15.8 -> 20.6 tokens; against SFT's 16 samples of each prompt (commit
  117e989's eval) 60.8% [57.4%, 63.8%]. At lr 1e-4 the policy drifts (KL 9.3, answers twice
  as long, 59.8%), at 3e-4 further (KL 26, 48.5%): docs/experiments.md, "DPO".

Anthropic HH-RLHF helpful pairs (`:hh_rlhf`, the reward phase's variant of the same pairs;
--config.init_checkpoint=an HF or Orbax GPT-Neo):
  RLHF_JAX_DATA=/path/to/data python -m rlhf_jax.main --phase=dpo --config=configs/dpo.py:hh_rlhf \
      --config.init_checkpoint=PATH_TO_GPT_NEO --workdir=runs/hh
  Time and result: not yet measured.

Sources of the settings:
  * The loss: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model" (loss_type "sigmoid", eq. 7); Azar et al. 2023, "A General
    Theoretical Paradigm to Understand Learning from Human Preferences" (loss_type "ipo", eq. 17,
    with TRL's per-token average of the log-ratios); label_smoothing is conservative DPO
    (Mitchell 2023), as TRL < 1.0's sigmoid loss had it.
  * TRL 1.16's DPOConfig defaults: beta 0.1, loss_type "sigmoid", label_smoothing 0,
    disable_dropout True (here model.dropout 0), an EOS after each response, reference
    log-probabilities of a frozen copy of the initial policy (precompute_ref_log_probs: computed
    once, here always), AdamW with a linear decay and no warmup. Its learning rate 1e-6 is sized
    for billion-parameter models; the built-in 1M-parameter GPT-Neo (trained by SFT at 3e-3)
    needs a larger one: 3e-5, the lowest of the three measured (3e-5, 1e-4, 3e-4), where the
    policy stays near the reference (KL 1 nat) and the teacher prefers it most.

Fields:
  init_checkpoint   "" = WORKDIR/sft; else an Orbax or HF causal LM (a score head is dropped).
  reference_checkpoint   "" = init_checkpoint: the frozen reference of the implicit reward.
  pairs, data, max_length, min_response_tokens, group_by_length   the pairs and their batches,
                    exactly as the reward phase reads them (configs/reward.py describes each),
                    from the reward config of the same variant. pairs.strategies.policy_sample
                    is 0: the dpo phase draws no policy samples for built pairs.
  append_eos        end each response with EOS (TRL does), so the policy learns to stop.
  loss.beta, loss.loss_type ("sigmoid" | "ipo"), loss.label_smoothing   rlhf_jax/training/dpo.py.
  reference_batch_size   pairs per forward pass of the one-off reference computation.
  eval_batch_size   held-out pairs per evaluation batch.
"""

import ml_collections

from rlhf_jax.configs import common
from rlhf_jax.configs import reward as reward_config


def get_config(variant: str = "builtin") -> ml_collections.ConfigDict:
  common.check_variant(variant, ("builtin", "hh_rlhf"))
  pair_settings = reward_config.get_config(variant)
  config = ml_collections.ConfigDict()
  config.init_checkpoint = ""  # "" = WORKDIR/sft.
  config.reference_checkpoint = ""  # "" = init_checkpoint.
  config.data = pair_settings.data
  config.pairs = pair_settings.pairs
  config.pairs.strategies.policy_sample = 0.0
  config.max_length = pair_settings.max_length
  config.min_response_tokens = pair_settings.min_response_tokens
  config.group_by_length = pair_settings.group_by_length
  config.append_eos = True
  config.loss = ml_collections.ConfigDict(dict(beta=0.1, loss_type="sigmoid",
                                               label_smoothing=0.0))
  config.model = common.model()
  config.model.dropout = 0.0  # TRL's disable_dropout.
  config.mesh = common.mesh()
  config.optim = common.optim(3e-5, schedule="linear", end_lr_fraction=0.0)
  config.train = common.train(steps=300, batch_size=32, log_every=25, eval_every=100,
                              save_every=100)
  config.reference_batch_size = 100
  config.eval_batch_size = 100
  if variant == "hh_rlhf":
    config.optim = common.optim(5e-5, schedule="linear", end_lr_fraction=0.0)
    config.train = common.train(steps=300, batch_size=16, log_every=25, eval_every=100,
                                save_every=100)
    config.reference_batch_size = 32
    config.eval_batch_size = 32
  return config
