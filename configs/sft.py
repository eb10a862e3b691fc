"""Supervised fine-tuning: next-token loss on the responses of instruction data.

Built-in default (offline; a tiny GPT-Neo trained from scratch on the generated educational set):
  python -m rlhf_jax.main --phase=sft --config=configs/sft.py --workdir=runs/default
  Machine: 2 CPU cores, about 2.5 minutes. Result: validation loss 0.31, greedy exact match on
  held-out questions 0% -> 55% (README, "Results of the main job").

GPT-Neo 125M on databricks-dolly-15k (needs the hub, or a local copy of the JSONL):
  python -m rlhf_jax.main --phase=import --config.hf_model=EleutherAI/gpt-neo-125M --workdir=runs/neo
  python -m rlhf_jax.main --phase=sft --config=configs/sft.py:gpt_neo_125m --workdir=runs/neo
  Larger models: `:gpt_neo_1p3b`, `:gpt_neo_2p7b` (bf16 compute, remat, FSDP over all devices).
"""

import ml_collections

from rlhf_jax.configs import common


def get_config(variant: str = "builtin") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_checkpoint = ""  # "" = this workdir's import/ or init/ phase (init is created if needed).
  config.data = common.data("builtin")
  config.max_length = 96  # Tokens per row (prompt + response + EOS).
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
  config.exact_match_samples = 200
  config.exact_match_max_new_tokens = 24
  config.eval_batch_size = 50

  if variant == "builtin":
    pass
  elif variant.startswith("gpt_neo_"):
    config.data = common.data("databricks/databricks-dolly-15k")
    config.pack = False  # Rows of one example; bench/bench_sft.py --part=dolly measures both.
    # Real Dolly instructions reach 570 tokens (shared dolly_alpagasus_3k.jsonl:1861, a list of
    # countries); at 512 they could not fit. GPT-Neo's window is 2048.
    config.max_length = 1024
    config.min_response_tokens = 128
    config.optim = common.optim(1e-5, warmup_steps=100, weight_decay=0.0)
    config.train = common.train(steps=3000, batch_size=32, log_every=20, eval_every=500,
                                save_every=500)
    config.exact_match_samples = 0
    if variant in ("gpt_neo_1p3b", "gpt_neo_2p7b"):
      config.model.dtype = "bfloat16"
      config.model.remat = True
      config.train.accum_steps = 4
  else:
    raise ValueError(f"unknown variant {variant!r}: builtin, gpt_neo_125m, gpt_neo_1p3b, gpt_neo_2p7b")
  return config
