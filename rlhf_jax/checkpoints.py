"""Orbax checkpoints: the one way every phase saves and restores its work.

A phase's `checkpoint/` directory holds numbered steps, each with up to three items:
  params       the model parameters (sharded arrays; restored onto any mesh),
  train_state  optimizer state, RNG, data position ... (only while training),
  manifest     JSON: the model config (HF field names), kind ("causal_lm" / "reward"), whether the
               model has a score head, whether the phase finished, and phase extras (reward stats).
and a `tokenizer/` folder saved once, so a checkpoint path is all `export` and later phases need.
"""

import os
import pathlib
from typing import Any, Sequence

from absl import logging
import jax
import orbax.checkpoint as ocp

from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import hf
from rlhf_jax.models.gpt_neo import GPTNeoConfig

TOKENIZER_DIR = "tokenizer"


class Checkpoints:
  """An Orbax `CheckpointManager` over one directory, keeping the newest `keep` steps."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2, create: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    if not create and not self.directory.is_dir():
      raise UserError(f"{directory}: no such checkpoint directory")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("params", "train_state", "manifest"))

  @property
  def tokenizer_dir(self) -> pathlib.Path:
    return self.directory / TOKENIZER_DIR

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, *, params: Any, manifest: dict, train_state: Any = None) -> None:
    """Saves a step (blocking, from every process: Orbax coordinates multi-host writes)."""
    items = dict(params=ocp.args.StandardSave(params), manifest=ocp.args.JsonSave(manifest))
    if train_state is not None:
      items["train_state"] = ocp.args.StandardSave(train_state)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()

  def manifest(self, step: int | None = None) -> dict:
    step = self._step(step)
    return self._manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))[
        "manifest"]

  def restore(self, step: int | None = None, *, params: Any, train_state: Any = None) -> dict:
    """Restores a step onto the shardings of the given targets.

    Args:
      step: default the latest.
      params: tree of `jax.ShapeDtypeStruct`s with `.sharding` (or arrays) describing the target.
      train_state: same for the training state, or None to skip it (e.g. for export).
    Returns:
      dict with "params", "manifest" and, if requested, "train_state".
    """
    step = self._step(step)
    items = dict(params=ocp.args.StandardRestore(params), manifest=ocp.args.JsonRestore())
    if train_state is not None:
      items["train_state"] = ocp.args.StandardRestore(train_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return {k: restored[k] for k in items}

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{self.directory}: no checkpoint has been saved here yet")
    return step

  def close(self) -> None:
    self._manager.close()


def make_manifest(config: GPTNeoConfig, *, kind: str, score_head: bool, phase: str,
                  finished: bool = False, **extras) -> dict:
  return dict(model=config.to_hf_dict(), kind=kind, score_head=score_head, phase=phase,
              finished=finished, **extras)


def find_checkpoint_dir(path: str | os.PathLike) -> pathlib.Path | None:
  """The Orbax checkpoint directory for `path`: itself, or its `checkpoint/` (a phase dir)."""
  path = pathlib.Path(path)
  for candidate in (path, path / "checkpoint"):
    if candidate.is_dir() and not (candidate / "config.json").exists() and any(
        p.name.isdigit() for p in candidate.iterdir()):
      return candidate
  return None


def abstract_params(config: GPTNeoConfig, score_head: bool, shardings: Any = None) -> Any:
  """ShapeDtypeStructs of the parameters (float32) on `shardings` (default: the first device)."""
  from rlhf_jax.models import gpt_neo
  shapes = gpt_neo.param_shapes(gpt_neo.GPTNeo(config, score_head=score_head))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def describe_model(path: str | os.PathLike) -> dict:
  """What a checkpoint holds, without loading its weights.

  Args:
    path: an Orbax checkpoint directory, a phase directory holding `checkpoint/`, or an HF
      directory / hub id.
  Returns:
    dict(config, kind, score_head, manifest ({} for HF), tokenizer_dir or None, source, format
    ("orbax" or "hf"), path (the resolved directory)).
  """
  ckpt_dir = find_checkpoint_dir(path)
  if ckpt_dir is None:
    local = pathlib.Path(path)
    if local.exists() and not (local / "config.json").exists():
      raise UserError(f"{path}: neither an Orbax checkpoint (numbered step folders) nor a "
                      "Hugging Face directory (config.json)")
    directory = hf.resolve(str(path))
    config = hf.read_config(directory)
    score_head = hf.has_score_head(directory)
    return dict(config=config, kind=hf.REWARD if score_head else hf.CAUSAL_LM,
                score_head=score_head, manifest={}, source=str(path), format="hf", path=directory,
                tokenizer_dir=directory if hf.has_tokenizer(directory) else None)
  manifest = Checkpoints(ckpt_dir, create=False).manifest()
  tokenizer = ckpt_dir / TOKENIZER_DIR
  return dict(config=GPTNeoConfig.from_hf_dict(manifest["model"]), kind=manifest["kind"],
              score_head=manifest["score_head"], manifest=manifest, source=str(path),
              format="orbax", path=ckpt_dir, tokenizer_dir=tokenizer if tokenizer.is_dir() else None)


def load_tokenizer(info: dict, what: str = ""):
  """The tokenizer saved with a checkpoint described by `describe_model`.

  Raises:
    UserError: the checkpoint has none, naming it as "the `what` checkpoint" (e.g. "SFT").
  """
  if info["tokenizer_dir"] is None:
    raise UserError(f"{info['source']}: the {what + ' ' if what else ''}checkpoint has no "
                    "tokenizer files")
  return hf.load_tokenizer(info["tokenizer_dir"])


def model_shardings(config: GPTNeoConfig, score_head: bool, mesh: jax.sharding.Mesh) -> Any:
  """The project's shardings (`sharding.param_shardings`) for a GPT-Neo's parameters on `mesh`."""
  from rlhf_jax.models import gpt_neo
  model = gpt_neo.GPTNeo(config, score_head=score_head)
  return sharding.param_shardings(gpt_neo.logical_axes(model), gpt_neo.param_shapes(model), mesh)


def load_params(info: dict, shardings: Any = None) -> Any:
  """The parameters of a checkpoint described by `describe_model`, placed on `shardings`: a tree
  matching the checkpoint's params, or a Mesh (the project's rules for its architecture, see
  `model_shardings`); default: the first local device (single-process use only).

  An Orbax checkpoint restores onto any mesh, whatever mesh or device count saved it."""
  if info["manifest"].get("lora"):
    return _load_merged_lora(info, shardings)
  if isinstance(shardings, jax.sharding.Mesh):
    shardings = model_shardings(info["config"], info["score_head"], shardings)
  if info["format"] == "hf":
    params = hf.hf_to_flax(hf.read_weights(info["path"]), info["config"], str(info["path"]))
    if shardings is None:
      return jax.device_put(params, jax.local_devices()[0])
    return sharding.global_from_host(params, shardings)
  checkpoints = Checkpoints(info["path"], create=False)
  target = abstract_params(info["config"], info["score_head"], shardings)
  params = checkpoints.restore(params=target)["params"]
  checkpoints.close()
  logging.info("Loaded %s parameters from %s", info["kind"], info["path"])
  return params


def base_pointer(info: dict) -> str:
  """How a LoRA checkpoint names the checkpoint its adapters apply to: an absolute path (a hub id
  as given), so later phases find it from any working directory."""
  if info["format"] == "orbax" or pathlib.Path(info["source"]).exists():
    return str(pathlib.Path(info["path"]).absolute())
  return str(info["source"])


def load_lora_base(info: dict, lora_model) -> Any:
  """The frozen part of a LoRA model (`models.lora.LoraModel`) from the base checkpoint described
  by `info` (adapters of a LoRA base are merged first), placed on its shardings.

  Raises:
    UserError: the base lacks a frozen parameter (e.g. a score head kept frozen with
      `train_heads=False` on a base without one)."""
  from rlhf_jax.models import lora
  mesh = sharding.mesh_of(lora_model.frozen_shardings)
  params = load_params(info, mesh)
  try:
    frozen = lora.select(params, lora_model.frozen_shapes)
  except KeyError as missing:
    raise UserError(f"{info['source']}: the base checkpoint has no parameter {missing}, which "
                    "LoRA keeps frozen (set --config.model.lora.train_heads=True to train heads)")
  return jax.device_put(frozen, lora_model.frozen_shardings)


def load_lora_trained(info: dict, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(`models.lora.LoraModel` on `mesh`, the trained params) of a LoRA checkpoint described by
  `describe_model`: only what it holds (adapters, trained heads), not its base."""
  from rlhf_jax.models import gpt_neo
  from rlhf_jax.models import lora
  settings = lora.LoraSettings.from_dict(info["manifest"]["lora"])
  planned = lora.plan(gpt_neo.GPTNeo(info["config"], score_head=info["score_head"]), settings,
                      mesh)
  saved = Checkpoints(info["path"], create=False)
  trained = saved.restore(params=jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      planned.trained_shapes, planned.trained_shardings))["params"]
  saved.close()
  return planned, trained


def _load_merged_lora(info: dict, shardings: Any) -> Any:
  """A LoRA checkpoint's base (its manifest's `lora.base`, loaded recursively) with the saved
  adapters merged in: the plain model's params, on `shardings` as in `load_params`."""
  if isinstance(shardings, jax.sharding.Mesh):
    mesh = shardings
  else:
    mesh = sharding.mesh_of(shardings) if shardings is not None else None
    mesh = mesh or sharding.make_mesh(devices=jax.local_devices()[:1])
  planned, trained = load_lora_trained(info, mesh)
  frozen = load_lora_base(describe_model(info["manifest"]["lora"]["base"]), planned)
  target = (model_shardings(info["config"], info["score_head"], mesh) if shardings is None
            or isinstance(shardings, jax.sharding.Mesh) else shardings)
  logging.info("Loaded LoRA %s adapters from %s (merged)", info["kind"], info["path"])
  return jax.jit(planned.merged, out_shardings=target)(frozen, trained)


def load_model(path: str | os.PathLike, shardings: Any = None) -> dict:
  """`describe_model(path)` plus its "params" (see `load_params`; `shardings` may be a Mesh)."""
  info = describe_model(path)
  return {**info, "params": load_params(info, shardings)}


POLICY_PHASES = ("ppo", "sft", "init", "import")


def resolve_checkpoint(given: str | os.PathLike | None, workdir: str | os.PathLike,
                       phases: str | Sequence[str], *, key: str) -> str:
  """The checkpoint a phase reads: `given` if set, else the first of `phases` with a checkpoint
  in `workdir` (its phase directory, e.g. WORKDIR/sft).

  Args:
    given: the config's value (an Orbax or HF checkpoint, a phase directory, a hub id), or empty.
    workdir: the run's workdir.
    phases: the phase (or phases, in order of preference) whose checkpoint is the default.
    key: the config key that names it, for the error message (e.g. "sft_checkpoint").

  Raises:
    UserError: nothing given and none of the phases has a checkpoint in the workdir.
  """
  if given:
    return str(given)
  phases = (phases,) if isinstance(phases, str) else tuple(phases)
  for phase in phases:
    if find_checkpoint_dir(pathlib.Path(workdir) / phase) is not None:
      return str(pathlib.Path(workdir) / phase)
  looked = " or ".join(str(pathlib.Path(workdir) / phase) for phase in phases)
  run = " or ".join(f"--phase={phase}" for phase in phases)
  raise UserError(f"no {' / '.join(phases)} checkpoint in {looked}; run {run} first or set "
                  f"--config.{key}")


def phase_finished(phase_dir: str | os.PathLike) -> bool:
  """Whether `phase_dir` (or its `checkpoint/`) holds a finished run: its newest step's manifest
  says `finished`."""
  found = find_checkpoint_dir(phase_dir)
  if found is None:
    return False
  saved = Checkpoints(found, create=False)
  try:
    return bool(saved.manifest().get("finished"))
  finally:
    saved.close()


def save_model(phase_dir: pathlib.Path, params, config: GPTNeoConfig, *, kind: str, phase: str,
               mesh: jax.sharding.Mesh | None = None, tokenizer_dir=None,
               **extras) -> pathlib.Path:
  """Writes a finished single-step checkpoint (params, manifest, tokenizer) under `phase_dir`.

  `params` are host values (or local arrays) that every process holds in full; they are placed
  on `mesh` (default: FSDP over all devices) with the project's shardings first, so every
  process saves only its shards."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  shardings = model_shardings(config, "score" in params, mesh)
  params = sharding.global_from_host(jax.device_get(params), shardings)
  ckpts = Checkpoints(phase_dir / "checkpoint")
  if tokenizer_dir is not None and jax.process_index() == 0:
    hf.copy_tokenizer(tokenizer_dir, ckpts.tokenizer_dir)
  manifest = make_manifest(config, kind=kind, score_head="score" in params, phase=phase,
                           finished=True, **extras)
  ckpts.save(0, params=params, manifest=manifest)
  ckpts.close()
  return ckpts.directory
