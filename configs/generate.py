"""Generate responses with a policy: an Orbax checkpoint or a Hugging Face directory.

  python -m rlhf_jax.main --phase=generate --config=configs/generate.py \
      --config.checkpoint=runs/default/ppo --config.prompts="What is 7 plus 5?" --config.temperature=0

`prompts` is one prompt, or a .txt file (one per line) or .jsonl file (`prompt`, or `instruction` and
`context`). Prompts are wrapped in the project's instruction template unless use_template=False.
Writes WORKDIR/generate/generations.jsonl and prints each response. Greedy when temperature=0.
"""

import ml_collections

from rlhf_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.checkpoint = ""  # "" = newest policy in --workdir (ppo, then sft, then init/import).
  config.prompts = ""
  config.use_template = True
  config.batch_size = 8
  config.max_prompt_length = 256  # Longer prompts are cut from the left (their end is kept).
  config.max_new_tokens = 64
  config.temperature = 1.0  # 0 = greedy.
  config.top_k = 0
  config.top_p = 1.0
  config.seed = 0
  config.model = common.model()
  config.mesh = common.mesh()
  return config
