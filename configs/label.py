"""The label phase: judged pairs of the SFT policy's own samples (issue #21; CLI.md, `label`).

Built-in default (offline, after init and sft in the same workdir):
  python -m rlhf_jax.main --phase=label --config=configs/label.py --workdir=runs/default
  K = 4 samples (temperature 0.7, 56 new tokens: PPO's rollout settings, so the reward model is
  trained on the distribution PPO starts from) to each of 2,000 training prompts and 200
  validation prompts (the built-in validation split's size; its first 128 are PPO's held-out
  prompts), all 6 pairs of each prompt's 4 samples (InstructGPT's K-choose-2: the most
  judgements per generated sample), minus pairs of identical samples: at most 12,000 training
  and 1,200 held-out pairs; the reward phase's 200 steps x 32 pairs see about two thirds of
  them (twice the labels measured no better: docs/experiments.md, "Reward model"). Judged by
  the simulated teacher at its defaults (Bradley-Terry temperature 0.5, 10% flips; see
  rlhf_jax/data/teacher.py for why). Chunks of 250 prompts (1,000 samples) are the unit an
  interruption can lose.
  Machine: 2 cores of an AMD EPYC, jax 0.10.2 on CPU. Time: 1 min 58 s at seed 2 (8,800 samples
  and their gold scores; commit 4b86b25, the main job). Result, seeds 0/1/2: about 9,900
  training and 1,000 held-out judged pairs (2,200-2,500 identical sample pairs left out); the
  labels agree with the teacher's noiseless order on 86.5% / 86.7% / 87.0% of the held-out pairs
  that have one: the ceiling for the reward model.

Other labellers:
  --config.labeler=web                          the labelling page (pip install -e ".[label]")
  --config.labeler=web --config.pairs_to_judge=FILE.jsonl   (prompt, response_a, response_b)
  --config.labeler=file --config.labels=FILE.jsonl          judged pairs (prompt, chosen, rejected)

Fields:
  name              the WORKDIR subdirectory written (default "label").
  policy_checkpoint "" = WORKDIR/sft; else an Orbax or HF policy checkpoint.
  labeler           simulated | web | file.
  train_prompts, heldout_prompts   the first N training / validation prompts sampled.
  samples_per_prompt   K; pairing "all" (K(K-1)/2 pairs) or "disjoint" (K/2 pairs).
  chunk_size        prompts per chunk (written together; resumed by chunk).
  sampling          the policy's sampling settings; batch_size rows per generation call.
  teacher           the simulated labeller's noise: Bradley-Terry temperature (gold points) and
                    flip rate (AlpacaFarm: 0.25). Defaults = data/teacher.py's DEFAULT_*.
                    gold_ties: "label" (default) or "tie" for pairs with equal gold scores (see
                    the measurement above: most pairs of the plain set are such pairs).
  labels            labeler=file: the judged pairs; heldout_fraction of their distinct prompts
                    is held out when no line has a `split`.
  pairs_to_judge    labeler=web: pairs to show instead of sampling the policy.
  web               the page's host, port, token ("" = generated for a non-loopback host),
                    double_share (pairs judged by two people) and lease_seconds.
  seed              sampling, side order and the teacher's noise.
"""

import ml_collections

from rlhf_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "label"
  config.policy_checkpoint = ""  # "" = WORKDIR/sft
  config.labeler = "simulated"
  config.data = common.data("builtin")
  config.train_prompts = 2000
  config.heldout_prompts = 200
  config.samples_per_prompt = 4
  config.pairing = "all"
  config.chunk_size = 250
  config.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=56, temperature=0.7, top_k=0, top_p=1.0))  # PPO's rollout settings.
  config.max_prompt_length = 64
  config.batch_size = 250
  # rlhf_jax/data/teacher.py's DEFAULT_TEMPERATURE and DEFAULT_FLIP_RATE (tests/test_configs.py
  # checks they agree).
  # gold_ties: "label" judges pairs tied in gold by a coin flip (the teacher's Bradley-Terry
  # draw), "tie" marks them 'tie' (left out of training).
  config.teacher = ml_collections.ConfigDict(dict(temperature=0.5, flip_rate=0.1,
                                                  gold_ties="label"))
  config.labels = ""
  config.heldout_fraction = 0.1
  config.pairs_to_judge = ""
  config.web = ml_collections.ConfigDict(dict(
      host="127.0.0.1", port=8765, token="", double_share=0.1, lease_seconds=900.0))
  config.seed = 0
  config.model = common.model()
  config.mesh = common.mesh()
  return config
