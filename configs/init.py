"""A fresh built-in model: a byte-level BPE tokenizer trained on the built-in educational set and a
randomly initialised tiny GPT-Neo. The first phase of the offline default pipeline.

  python -m rlhf_jax.main --phase=init --config=configs/init.py --workdir=runs/default

Writes runs/default/init/checkpoint/ (params, manifest, tokenizer/). Machine: 2 cores of an AMD
EPYC. Time: 6 s. Result: a 0.96M-parameter GPT-Neo (hidden 128, 4 layers, global/local attention)
and a 1,024-token byte-level BPE tokenizer.
"""

import ml_collections

from rlhf_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = common.data("builtin")  # The tokenizer is trained on its train split.
  config.vocab_size = 1024
  # The built-in GPT-Neo: small enough to learn the built-in set on 2 CPU cores in minutes.
  config.arch = ml_collections.ConfigDict(dict(
      hidden_size=128, num_layers=4, num_heads=4, max_position_embeddings=256, window_size=64,
      attention_layers=("global", "local", "global", "local")))
  config.mesh = common.mesh()
  return config
