"""Import a Hugging Face GPT-Neo checkpoint (directory or hub id) into an Orbax checkpoint.

  python -m rlhf_jax.main --phase=import --config=configs/import.py \
      --config.hf_model=EleutherAI/gpt-neo-125M --workdir=runs/neo125m

Writes runs/neo125m/import/checkpoint/ (params, manifest, tokenizer/). Any machine; the 125M model
imports in about 10 s on a laptop CPU once downloaded.
"""

import ml_collections

from rlhf_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.hf_model = ""  # A local HF directory or a hub id such as EleutherAI/gpt-neo-125M.
  config.mesh = common.mesh()
  return config
