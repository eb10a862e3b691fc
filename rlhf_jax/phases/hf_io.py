"""The phases that move models in and out of Hugging Face's format: `import` (HF -> Orbax) and
`export` (Orbax -> HF)."""

import pathlib

from absl import logging
import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.errors import UserError
from rlhf_jax.models import hf


def run_import(config, workdir: pathlib.Path) -> None:
  """HF directory or hub id (`config.hf_model`) -> WORKDIR/import/checkpoint."""
  if not config.hf_model:
    raise UserError("--config.hf_model: give a Hugging Face directory or hub id to import")
  phase_dir = workdir / "import"
  if checkpoints.phase_finished(phase_dir):
    print(f"import: {phase_dir} holds a finished checkpoint; skipping. Delete it or use another "
          "--workdir to import again.")
    return
  model_config, params, kind, directory = hf.load_checkpoint(config.hf_model)
  tokenizer = directory if hf.has_tokenizer(directory) else None
  if tokenizer is None:
    logging.warning("import: %s has no tokenizer files; later phases will need one", directory)
  out = checkpoints.save_model(phase_dir, params, model_config, kind=kind, phase="import",
                               mesh=sharding.mesh_from_config(config.mesh),
                               tokenizer_dir=tokenizer, source=str(config.hf_model))
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  print(f"import: {config.hf_model} ({kind}, {n:,} parameters) -> {out}")


def run_export(config, workdir: pathlib.Path) -> None:
  """Orbax checkpoint (`config.checkpoint`, default the newest policy) -> HF directory."""
  source = checkpoints.resolve_checkpoint(config.checkpoint, workdir, checkpoints.POLICY_PHASES,
                                          key="checkpoint")
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
                       extra_files={"PROMPT_TEMPLATE.md": batching.PROMPT_TEMPLATE_DOC},
                       chat_template=batching.CHAT_TEMPLATE)
  print(f"export: {loaded['source']} ({kind}) -> {out_dir}")
