"""What a phase trains: the whole model (full fine-tuning) or LoRA adapters on a frozen base.

One setup for every training phase (sft, reward, dpo, ppo's policy and value model): with
`--config.model.lora.rank=0` the train state holds the whole model as before; with a rank, it holds
only the adapters (and heads with `train_heads`), the base is loaded once, frozen, and passed to
the compiled step as its `frozen` argument (`loop.make_train_step(combine=...)`), so it gets neither
gradients nor optimizer state, and the checkpoint holds the adapters plus a pointer to the base
(`manifest["lora"]`).
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import lora


LORA_MEMORY_LABELS = {"params": "trained (adapters, heads)", "frozen": "frozen base"}


@dataclasses.dataclass(frozen=True)
class Trained:
  """The trained part of a model and how to run it.

  model / eval_model: the modules the loss / evaluation apply (with LoRA: with adapters; only
    `model` applies the adapters' dropout).
  plain_model: the model without adapters (generation runs it on `merged` params).
  param_shapes / param_shardings: what the train state's `params` hold.
  frozen: the frozen base on its shardings (None without LoRA): the step's `frozen` argument.
  combine: `(frozen, params) -> the tree the modules apply to` (None without LoRA).
  manifest: entries for the checkpoint manifest ({"lora": settings + base pointer} or {}).
  lora_model: the `models.lora.LoraModel` (None without LoRA).
  merge: compiled `(frozen, params) -> plain params` (None without LoRA).
  """
  model: nn.Module
  eval_model: nn.Module
  plain_model: nn.Module
  param_shapes: Any
  param_shardings: Any
  frozen: Any = None
  combine: Callable | None = None
  manifest: dict = dataclasses.field(default_factory=dict)
  lora_model: lora.LoraModel | None = None
  merge: Callable | None = None

  @property
  def enabled(self) -> bool:
    return self.lora_model is not None

  def full(self, params: Any, frozen: Any = None) -> Any:
    """The tree the modules apply to (`frozen` defaults to the loaded base)."""
    if self.combine is None:
      return params
    return self.combine(self.frozen if frozen is None else frozen, params)

  def merged(self, params: Any) -> Any:
    """Plain-model params (adapters folded in) for generation and scoring; `params` as is
    without LoRA."""
    if self.lora_model is None:
      return params
    return self.merge(self.frozen, params)

  @property
  def memory_labels(self) -> dict | None:
    """The memory line's names for the trained and frozen parts (`loop.Trainable`)."""
    return LORA_MEMORY_LABELS if self.enabled else None

  def describe(self) -> str:
    settings = self.lora_model.settings
    return (f"LoRA rank {settings.rank} (alpha {settings.alpha:g}) on "
            f"{', '.join(settings.targets)}: {lora.count(self.param_shapes):,} trained "
            f"parameters, {lora.count(self.lora_model.frozen_shapes):,} frozen")


def setup(model: gpt_neo.GPTNeo, model_settings, base_info: dict | None,
          mesh: jax.sharding.Mesh) -> Trained:
  """The trained part of `model` as `model_settings` (a config's `model` section) asks.

  Args:
    model: the plain module (`gpt_neo.build`).
    model_settings: the config's `model` section (its `lora` entry).
    base_info: `checkpoints.describe_model` of the checkpoint the base is loaded from (with LoRA,
      loaded here; None: the caller loads it, for a base it builds itself).
    mesh: the device mesh.
  """
  settings = lora.settings_from_config(model_settings)
  if not settings.enabled:
    shapes = gpt_neo.param_shapes(model)
    return Trained(model=model, eval_model=model, plain_model=model, param_shapes=shapes,
                   param_shardings=sharding.param_shardings(gpt_neo.logical_axes(model), shapes,
                                                            mesh))
  adapted = lora.plan(model, settings, mesh)
  frozen = checkpoints.load_lora_base(base_info, adapted) if base_info is not None else None
  manifest = {"lora": {**settings.to_dict(), "base": checkpoints.base_pointer(base_info)}} if (
      base_info is not None) else {}
  return Trained(model=adapted.train_model, eval_model=adapted.eval_model, plain_model=model,
                 param_shapes=adapted.trained_shapes, param_shardings=adapted.trained_shardings,
                 frozen=frozen, combine=adapted.full, manifest=manifest, lora_model=adapted,
                 merge=jax.jit(adapted.merged))


@dataclasses.dataclass(frozen=True)
class OnBase:
  """A LoRA module bound to its frozen base, used where code is written for a plain module:
  `apply({"params": trained}, ...)` runs the model with adapters on the base joined with `trained`
  (no adapter dropout), so PPO's scoring and losses train adapters unchanged. Other attributes
  are the plain module's.

  Bind the base inside the compiled step (`bind(frozen_base)`): it is then an argument of the
  program, never a constant baked into it. In PPO the base is the reference model itself (the
  adapters switched off), so the policy costs no second copy.
  """
  lora_model: lora.LoraModel
  plain: nn.Module
  base: Any = None

  def bind(self, base: Any) -> "OnBase":
    return dataclasses.replace(self, base=base)

  def apply(self, variables: dict, *args, **kwargs):
    return self.lora_model.eval_model.apply(
        {"params": lora.combine(self.base, variables["params"])}, *args, **kwargs)

  def merged(self, params: Any) -> Any:
    """Plain-model params with the adapters folded in (decoding runs the plain module on them)."""
    return self.lora_model.merged(self.base, params)

  def __getattr__(self, name: str):
    if name.startswith("__") or name in ("lora_model", "plain", "base"):
      raise AttributeError(name)
    return getattr(self.plain, name)
