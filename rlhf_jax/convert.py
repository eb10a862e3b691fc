"""The phases that move models in and out: `import` (HF -> Orbax), `export` (Orbax -> HF), and
`init` (a fresh built-in model and tokenizer, for the offline default pipeline)."""

import pathlib

from absl import logging
import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import hf


def _finished(phase_dir: pathlib.Path) -> bool:
  ckpt = checkpoints.find_checkpoint_dir(phase_dir)
  return ckpt is not None and checkpoints.Checkpoints(ckpt, create=False).manifest().get("finished")


def save_model(phase_dir: pathlib.Path, params, config, *, kind: str, phase: str,
               mesh: jax.sharding.Mesh | None = None, tokenizer_dir=None,
               **extras) -> pathlib.Path:
  """Writes a finished single-step checkpoint (params, manifest, tokenizer) under `phase_dir`.

  `params` are host values (or local arrays) that every process holds in full; they are placed
  on `mesh` (default: FSDP over all devices) with the project's shardings first, so every
  process saves only its shards."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  shardings = checkpoints.model_shardings(config, "score" in params, mesh)
  params = sharding.global_from_host(jax.device_get(params), shardings)
  ckpts = checkpoints.Checkpoints(phase_dir / "checkpoint")
  if tokenizer_dir is not None and jax.process_index() == 0:
    hf.copy_tokenizer(tokenizer_dir, ckpts.tokenizer_dir)
  manifest = checkpoints.make_manifest(config, kind=kind, score_head="score" in params, phase=phase,
                                       finished=True, **extras)
  ckpts.save(0, params=params, manifest=manifest)
  ckpts.close()
  return ckpts.directory


def run_import(config, workdir: pathlib.Path) -> None:
  """HF directory or hub id (`config.hf_model`) -> WORKDIR/import/checkpoint."""
  if not config.hf_model:
    raise UserError("--config.hf_model: give a Hugging Face directory or hub id to import")
  phase_dir = workdir / "import"
  if _finished(phase_dir):
    print(f"import: {phase_dir} holds a finished checkpoint; skipping. Delete it or use another "
          "--workdir to import again.")
    return
  model_config, params, kind, directory = hf.load_checkpoint(config.hf_model)
  tokenizer = directory if hf.has_tokenizer(directory) else None
  if tokenizer is None:
    logging.warning("import: %s has no tokenizer files; later phases will need one", directory)
  out = save_model(phase_dir, params, model_config, kind=kind, phase="import",
                   mesh=sharding.mesh_from_config(config.mesh), tokenizer_dir=tokenizer,
                   source=str(config.hf_model))
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  print(f"import: {config.hf_model} ({kind}, {n:,} parameters) -> {out}")


def run_export(config, workdir: pathlib.Path) -> None:
  """Orbax checkpoint (`config.checkpoint`, default the newest policy) -> HF directory."""
  from rlhf_jax.data import batching
  source = config.checkpoint or checkpoints.find_phase_checkpoint(workdir, checkpoints.POLICY_PHASES)
  # Loaded sharded on this run's mesh (whatever mesh saved it), then gathered to the host.
  loaded = checkpoints.load_model(source, sharding.mesh_from_config(config.mesh))
  kind = loaded["kind"] if config.kind == "auto" else config.kind
  if kind not in (hf.CAUSAL_LM, hf.REWARD):
    raise UserError(f"--config.kind={config.kind}: use auto, {hf.CAUSAL_LM} or {hf.REWARD}")
  out_dir = pathlib.Path(config.hf_out) if config.hf_out else workdir / "export" / "hf"
  params = sharding.to_host(loaded["params"])  # Every process takes part in the gather.
  if jax.process_index() == 0:
    hf.save_checkpoint(params, loaded["config"], out_dir, kind=kind,
                       tokenizer_dir=loaded["tokenizer_dir"], dtype=config.dtype,
                       extra_files={"PROMPT_TEMPLATE.md": batching.PROMPT_TEMPLATE_DOC})
  print(f"export: {loaded['source']} ({kind}) -> {out_dir}")


def run_init(config, workdir: pathlib.Path) -> None:
  """A tokenizer trained on the built-in set and a random tiny GPT-Neo -> WORKDIR/init/checkpoint."""
  import tempfile
  from rlhf_jax.data import batching
  from rlhf_jax.data import builtin
  from rlhf_jax.models import gpt_neo
  phase_dir = workdir / "init"
  if _finished(phase_dir):
    print(f"init: {phase_dir} holds a finished checkpoint; skipping. Delete it or use another "
          "--workdir to start afresh.")
    return
  train = builtin.generate(config.data.seed, config.data.num_train, config.data.num_eval)["train"]
  corpus = [batching.format_prompt(r["instruction"], r["context"]) + r["response"] for r in train]
  with tempfile.TemporaryDirectory() as tokenizer_dir:
    tokenizer = builtin.train_tokenizer(corpus, config.vocab_size, tokenizer_dir)
    arch = config.arch.to_dict()
    arch["attention_layers"] = tuple(arch["attention_layers"])
    model_config = gpt_neo.GPTNeoConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **arch)
    params = gpt_neo.init_params(gpt_neo.GPTNeo(model_config), jax.random.key(config.seed))
    out = save_model(phase_dir, params, model_config, kind=hf.CAUSAL_LM, phase="init",
                     mesh=sharding.mesh_from_config(config.mesh), tokenizer_dir=tokenizer_dir)
  print(f"init: built-in GPT-Neo ({model_config.num_params / 1e6:.2f}M parameters, vocab "
        f"{model_config.vocab_size}) and tokenizer -> {out}")
