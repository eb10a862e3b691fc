"""Supervised fine-tuning: next-token loss on the responses of instruction data.

Built-in default (offline; the tiny GPT-Neo of the init phase, trained on the generated set):
  python -m rlhf_jax.main --phase=init --workdir=runs/default
  python -m rlhf_jax.main --phase=sft --config=configs/sft.py --workdir=runs/default
  Machine: 2 cores of an AMD EPYC, jax 0.10.2 on CPU. Time: 11 min 23 s at seed 2 (600 steps of
  32 packed rows x 128 tokens at ~3,650 tokens/s; commit 4b86b25, the main job). Result, seeds
  0/1/2 (the main jobs of README "What the main job reaches"): validation loss 6.93 -> 0.49 /
  0.50 / 0.49; greedy exact match on 200 held-out `validation` questions 1% -> 53.5% / 47.0% /
  52.0%. (The single-style set of earlier versions: docs/experiments.md, "SFT".)

GPT-Neo 125M on databricks-dolly-15k (the hub, or a local Dolly file with
`--config.data.source=$RLHF_JAX_DATA/dolly/FILE.jsonl`):
  python -m rlhf_jax.main --phase=import --config.hf_model=EleutherAI/gpt-neo-125M --workdir=runs/neo
  python -m rlhf_jax.main --phase=sft --config=configs/sft.py:gpt_neo_125m --workdir=runs/neo
  Machine, time, result: not yet measured end to end (3,000 steps of 32 rows x 1,024 tokens).
  Measured pieces (bench/RESULTS.md, "SFT"): the train step at batch 4 x 256 on 2 CPU cores runs
  at 148 tokens/s (Intel Xeon; 5.35 s per step with tcmalloc on an AMD EPYC, 7.1 GiB peak
  resident). Per-device memory at this variant's shapes: not yet measured.

GPT-Neo 1.3B / 2.7B (`:gpt_neo_1p3b`, `:gpt_neo_2p7b`; bf16 compute, remat, 4 accumulation steps,
FSDP over all devices; import EleutherAI/gpt-neo-1.3B or -2.7B first; launchers in launch/):
  Step time, tokens/s, result: not yet measured. Parameters + Adam state per device, computed
  from the real shardings (bench/RESULTS.md, "Sharding"; activations and gradients excluded):
  1.3B 14.7 GiB on one device, 1.84 GiB at fsdp=8; 2.7B 29.6 GiB on one device, 3.70 GiB at
  fsdp=8.
"""

import ml_collections

from rlhf_jax.configs import common


def get_config(variant: str = "builtin") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_checkpoint = ""  # "" = this workdir's import/ or init/ phase.
  config.data = common.data("builtin")
  # Tokens per row (prompt + response + EOS): the longest built-in prompt (59 tokens) and a tutor's
  # explained answer (at most 51 tokens).
  config.max_length = 128
  # The response's guaranteed share of a row: a prompt that leaves it fewer tokens has its context
  # cut (instruction and context start kept, the cut marked; counted and printed); the response is
  # cut only beyond that. A record whose instruction alone leaves too few is an error.
  config.min_response_tokens = 32
  # Pack several examples per row (attention and positions reset per example). Built-in records
  # fill about a third of a 96-token row: packed, a step trains ~2.5x the examples for the same
  # compute (measured: exact match 0.37 -> 0.47 and validation loss 0.49 -> 0.43 after 600 steps).
  config.pack = True
  config.model = common.model()
  config.mesh = common.mesh()
  config.optim = common.optim(3e-3, warmup_steps=50, weight_decay=0.01)
  config.train = common.train(steps=600, batch_size=32, log_every=25, eval_every=200,
                              save_every=200)
  # Greedy exact match on held-out verifiable questions, before and after (built-in data only).
  config.eval_prompts = 200  # Held-out verifiable questions.
  config.exact_match_max_new_tokens = 56
  config.eval_batch_size = 50

  common.check_variant(variant, ("builtin", "gpt_neo_125m", "gpt_neo_1p3b", "gpt_neo_2p7b"))
  if variant != "builtin":
    config.data = common.data("databricks/databricks-dolly-15k")
    config.pack = False  # Rows of one example; bench/bench_sft.py --part=dolly measures both.
    # Real Dolly instructions reach 570 tokens (shared dolly_alpagasus_3k.jsonl:1861, a list of
    # countries); at 512 they could not fit. GPT-Neo's window is 2048.
    config.max_length = 1024
    config.min_response_tokens = 128
    config.optim = common.optim(1e-5, warmup_steps=100, weight_decay=0.0)
    config.train = common.train(steps=3000, batch_size=32, log_every=20, eval_every=500,
                                save_every=500)
    config.eval_prompts = 0
    if variant in ("gpt_neo_1p3b", "gpt_neo_2p7b"):
      config.model.dtype = "bfloat16"
      config.model.remat = True
      config.train.accum_steps = 4
  return config
