"""The `generate` phase: responses from a policy (Orbax or HF checkpoint) for prompts from the command
line or a file, through the one host-side generation path (`decode.generate_responses`)."""

import json
import pathlib

from absl import logging
import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.errors import UserError, where
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo


def read_prompts(spec: str, use_template: bool) -> list[str]:
  """Prompts from a string, a .txt file (one per line) or a .jsonl file.

  JSONL lines hold `prompt`, or `instruction` (and optional `context`). With `use_template`, plain
  prompts and instructions are wrapped in the project's instruction template.
  """
  path = pathlib.Path(spec)
  if not spec:
    raise UserError("--config.prompts: give a prompt, or a .txt / .jsonl file of prompts")
  if path.suffix in (".txt", ".jsonl") and not path.is_file():
    raise UserError(f"{spec}: no such prompts file")
  wrap = lambda text, context="": batching.format_prompt(text, context) if use_template else text
  if not path.is_file():
    return [wrap(spec)]
  prompts = []
  with open(path, encoding="utf-8", errors="strict") as f:
    try:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        if path.suffix != ".jsonl":
          prompts.append(wrap(line.rstrip("\n")))
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f"{where(path, number)}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not ("prompt" in record or "instruction" in record):
          raise UserError(f"{where(path, number)}: expected an object with 'prompt' or 'instruction'")
        if "prompt" in record:
          prompts.append(wrap(str(record["prompt"])))
        else:
          prompts.append(wrap(str(record["instruction"]), str(record.get("context", ""))))
    except UnicodeDecodeError as e:
      raise UserError(f"{path}: not valid UTF-8 ({e.reason})") from None
  if not prompts:
    raise UserError(f"{path}: no prompts in the file")
  return prompts


def run(config, workdir: pathlib.Path) -> None:
  source = checkpoints.resolve_checkpoint(config.checkpoint, workdir, checkpoints.POLICY_PHASES,
                                          key="checkpoint")
  loaded = checkpoints.load_model(source, sharding.mesh_from_config(config.mesh))
  tokenizer = checkpoints.load_tokenizer(loaded)
  prompts = read_prompts(config.prompts, config.use_template)
  model = gpt_neo.build(loaded["config"], config.model, score_head=loaded["score_head"])
  settings = decode.SamplingSettings.from_config(config, tokenizer.eos_token_id,
                                                 tokenizer.pad_token_id)
  responses = decode.generate_responses(
      model, loaded["params"], tokenizer, prompts, settings=settings,
      batch_size=config.batch_size, max_prompt_length=config.max_prompt_length,
      rng=jax.random.key(config.seed))
  results = [dict(prompt=prompt, response=text, num_tokens=int(n), ended_with_eos=bool(ended))
             for prompt, text, n, ended in zip(prompts, responses.texts, responses.lengths,
                                               responses.ended)]
  out_dir = workdir / "generate"
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "generations.jsonl", "w", encoding="utf-8") as f:
      for r in results:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for r in results:
      print(f"--- prompt ---\n{r['prompt']}\n--- response ---\n{r['response']}\n")
    print(f"generate: {len(results)} responses -> {out_dir / 'generations.jsonl'}")
  logging.info("mean response length %.1f tokens", np.mean(responses.lengths))
