"""The `init` phase: a tokenizer trained on the built-in set and a random tiny GPT-Neo, the
starting point of the offline default pipeline -> WORKDIR/init/checkpoint."""

import pathlib
import tempfile

import jax

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import builtin
from rlhf_jax.data import records
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf


def run(config, workdir: pathlib.Path) -> None:
  phase_dir = workdir / "init"
  if checkpoints.phase_finished(phase_dir):
    print(f"init: {phase_dir} holds a finished checkpoint; skipping. Delete it or use another "
          "--workdir to start afresh.")
    return
  train = records.load_splits(config.data)["train"]
  corpus = [batching.record_prompt(r) + r["response"] for r in train]
  with tempfile.TemporaryDirectory() as tokenizer_dir:
    tokenizer = builtin.train_tokenizer(corpus, config.vocab_size, tokenizer_dir)
    arch = config.arch.to_dict()
    arch["attention_layers"] = tuple(arch["attention_layers"])
    model_config = gpt_neo.GPTNeoConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **arch)
    params = gpt_neo.init_params(gpt_neo.GPTNeo(model_config), jax.random.key(config.seed))
    out = checkpoints.save_model(phase_dir, params, model_config, kind=hf.CAUSAL_LM, phase="init",
                                 mesh=sharding.mesh_from_config(config.mesh),
                                 tokenizer_dir=tokenizer_dir)
  print(f"init: built-in GPT-Neo ({model_config.num_params / 1e6:.2f}M parameters, vocab "
        f"{model_config.vocab_size}) and tokenizer -> {out}")
