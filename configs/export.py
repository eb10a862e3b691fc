"""Export an Orbax checkpoint (policy or reward model) to a Hugging Face directory.

  python -m rlhf_jax.main --phase=export --config=configs/export.py \
      --config.checkpoint=runs/default/ppo/checkpoint --config.hf_out=runs/default/hf_policy

The directory loads with transformers' AutoModelForCausalLM (policies) or
AutoModelForSequenceClassification (reward models) and holds config.json, model.safetensors, the
tokenizer and PROMPT_TEMPLATE.md. Any machine; seconds for small models.
"""

import ml_collections

from rlhf_jax.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.checkpoint = ""  # Orbax checkpoint (or phase) directory; "" = newest policy in --workdir.
  config.hf_out = ""  # Output directory; "" = WORKDIR/export/hf.
  config.dtype = "float32"  # float32 | bfloat16 for the saved weights.
  config.kind = "auto"  # auto (from the checkpoint) | causal_lm | reward.
  # A LoRA checkpoint: True writes its adapters in Hugging Face PEFT's format (adapter_config.json +
  # adapter_model.safetensors) instead of the merged model; hf_out "" = WORKDIR/export/adapter.
  config.adapters_only = False
  config.mesh = common.mesh()
  return config
