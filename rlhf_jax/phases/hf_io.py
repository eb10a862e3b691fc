"""The phases that move models in and out of Hugging Face's format: `import` (HF -> Orbax) and
`export` (Orbax -> HF)."""

import json
import pathlib

from absl import logging
import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.errors import UserError
from rlhf_jax.models import hf
from rlhf_jax.models import lora


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
  if config.get("adapters_only", False):
    _export_adapters(config, source, workdir)
    return
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


def _export_adapters(config, source: str, workdir: pathlib.Path) -> None:
  """A LoRA checkpoint's adapters (and trained heads) -> Hugging Face PEFT's adapter format:
  adapter_config.json + adapter_model.safetensors (+ the tokenizer), which
  `peft.PeftModel.from_pretrained(base, dir)` loads onto the HF export of the base."""
  from safetensors.numpy import save_file
  info = checkpoints.describe_model(source)
  if not info["manifest"].get("lora"):
    raise UserError(f"--config.adapters_only: {source} is not a LoRA checkpoint (it was trained "
                    "with --config.model.lora.rank=0); export it without adapters_only")
  kind = info["kind"] if config.kind == "auto" else config.kind
  planned, trained = checkpoints.load_lora_trained(info, sharding.mesh_from_config(config.mesh))
  trained = sharding.to_host(trained)
  out_dir = pathlib.Path(config.hf_out) if config.hf_out else workdir / "export" / "adapter"
  if jax.process_index() == 0:
    tensors, adapter_config = lora.peft_adapter(
        trained, planned.settings, num_layers=info["config"].num_layers, kind=kind,
        base_model=info["manifest"]["lora"]["base"])
    if info["tokenizer_dir"] is not None:  # First: it replaces the directory.
      hf.copy_tokenizer(info["tokenizer_dir"], out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
  print(f"export: {info['source']} ({kind}, LoRA rank {planned.settings.rank} adapters) -> "
        f"{out_dir} (PEFT format; base: {info['manifest']['lora']['base']})")
