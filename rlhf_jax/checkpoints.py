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
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

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
  """ShapeDtypeStructs of the parameters (float32), with shardings if given (default: replicated
  on the first device... of a trivial one-device placement)."""
  from rlhf_jax.models import gpt_neo
  shapes = gpt_neo.param_shapes(gpt_neo.GPTNeo(config, score_head=score_head))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def load_model(path: str | os.PathLike, shardings_fn=None) -> dict:
  """Loads a model from an Orbax checkpoint (directory, or a phase directory) or an HF directory/id.

  Args:
    path: the checkpoint.
    shardings_fn: (config, score_head) -> tree of shardings for the params; default one device.
  Returns:
    dict(config, params, kind, score_head, manifest, tokenizer_dir or None, source).
  """
  ckpt_dir = find_checkpoint_dir(path)
  if ckpt_dir is None:
    local = pathlib.Path(path)
    if local.exists() and not (local / "config.json").exists():
      raise UserError(f"{path}: neither an Orbax checkpoint (numbered step folders) nor a "
                      "Hugging Face directory (config.json)")
    config, params, kind, directory = hf.load_checkpoint(str(path))
    score_head = "score" in params
    if shardings_fn is not None:
      params = jax.device_put(params, shardings_fn(config, score_head))
    return dict(config=config, params=params, kind=kind, score_head=score_head, manifest={},
                tokenizer_dir=directory if hf.has_tokenizer(directory) else None, source=str(path))
  checkpoints = Checkpoints(ckpt_dir, create=False)
  manifest = checkpoints.manifest()
  config = GPTNeoConfig.from_hf_dict(manifest["model"])
  score_head = manifest["score_head"]
  shardings = shardings_fn(config, score_head) if shardings_fn is not None else None
  params = checkpoints.restore(params=abstract_params(config, score_head, shardings))["params"]
  checkpoints.close()
  logging.info("Loaded %s (step %s) from %s", manifest["kind"], checkpoints.latest_step(), ckpt_dir)
  tokenizer = checkpoints.tokenizer_dir
  return dict(config=config, params=params, kind=manifest["kind"], score_head=score_head,
              manifest=manifest, tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
              source=str(ckpt_dir))


POLICY_PHASES = ("ppo", "sft", "init", "import")


def find_phase_checkpoint(workdir: str | os.PathLike, phases: tuple[str, ...]) -> pathlib.Path:
  """The checkpoint of the first of `phases` that has one in `workdir` (e.g. the newest policy)."""
  for phase in phases:
    found = find_checkpoint_dir(pathlib.Path(workdir) / phase)
    if found is not None:
      return found
  raise UserError(f"{workdir}: no checkpoint of phase {' / '.join(phases)} found; run that phase "
                  "first or name a checkpoint with --config.checkpoint")
