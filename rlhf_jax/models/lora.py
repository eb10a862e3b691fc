"""LoRA adapters on GPT-Neo's linear layers, through qwix (Google's LoRA and quantisation library,
the one Tunix uses).

qwix intercepts the `dot_general` of each targeted `nn.Dense` and adds `x @ A @ B * alpha / rank`
next to the frozen kernel, creating the adapters as parameters of that Dense: `kernel_lora_a`
[in, rank] (he-uniform) and `kernel_lora_b` [rank, out] (zeros, so a fresh adapter changes nothing).
Under the scan over layers they are stacked like the kernels ([layers, in, rank]), and they take the
kernel's logical axis names (`embed` / `heads` / `mlp` on the side they share with it, None on the
rank side), so `rlhf_jax.sharding` lays them out by the same rules as their base weights.

A parameter tree with adapters is the plain model's tree plus those two leaves per targeted Dense:
`split` parts it into the frozen base and what is trained (the adapters, and with `train_heads` the
score head), `combine` joins them again, and `merge` folds the adapters into the kernels
(W + A B alpha / rank): the plain GPT-Neo that export, generation and evaluation use.
`peft_adapter` writes them as Hugging Face PEFT names and shapes.
"""

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError

# The linear layers an adapter may target, by their Hugging Face GPT-Neo module names (the names
# peft's `target_modules` uses): attention q/k/v/out projections and the MLP's in (c_fc) and out
# (c_proj).
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")
_ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
_HEADS = ("score",)
# Flax path under a block -> HF module path under `transformer.h.{i}.`.
_HF_MODULES = {"q_proj": "attn.attention.q_proj", "k_proj": "attn.attention.k_proj",
               "v_proj": "attn.attention.v_proj", "out_proj": "attn.attention.out_proj",
               "c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """What `--config.model.lora.*` asks for.

  rank: adapter rank; 0 turns LoRA off (full fine-tuning).
  alpha: the adapter's output is scaled by alpha / rank (as peft's `lora_alpha`).
  dropout: dropout on the adapter's input while training (as peft's `lora_dropout`).
  targets: the linear layers that get adapters (names in `TARGETS`).
  train_heads: a score head (reward model, PPO value head) is trained fully; otherwise it stays
    as loaded (or initialised).
  """
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS
  train_heads: bool = True

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict:
    return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=list(self.targets),
                train_heads=self.train_heads)

  @classmethod
  def from_dict(cls, values: dict) -> "LoraSettings":
    return cls(rank=int(values["rank"]), alpha=float(values["alpha"]),
               dropout=float(values["dropout"]), targets=tuple(values["targets"]),
               train_heads=bool(values["train_heads"]))


def settings_from_config(model_settings) -> LoraSettings:
  """The LoRA settings of a config's `model` section (off when it has no `lora` entry).

  Raises:
    UserError: a bad value, naming its `--config.model.lora.*` flag.
  """
  section = model_settings.get("lora") if model_settings is not None else None
  if not section:
    return LoraSettings()
  get = lambda key, default: section.get(key, default)
  rank, alpha, dropout = int(get("rank", 0)), float(get("alpha", 16.0)), float(get("dropout", 0.0))
  targets = get("targets", ",".join(TARGETS))
  targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)
                  if t.strip())
  if targets == ("all",):
    targets = TARGETS
  if rank < 0:
    raise UserError(f"--config.model.lora.rank={rank}: must be >= 0 (0 turns LoRA off)")
  if rank and alpha <= 0:
    raise UserError(f"--config.model.lora.alpha={alpha}: must be > 0")
  if not 0 <= dropout < 1:
    raise UserError(f"--config.model.lora.dropout={dropout}: must be in [0, 1)")
  if bad := [t for t in targets if t not in TARGETS]:
    raise UserError(f"--config.model.lora.targets: unknown {', '.join(bad)}; use names among "
                    f"{', '.join(TARGETS)} (or 'all')")
  if rank and not targets:
    raise UserError("--config.model.lora.targets is empty; name at least one of "
                    f"{', '.join(TARGETS)}")
  return LoraSettings(rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                      train_heads=bool(get("train_heads", True)))


def with_adapters(model: nn.Module, settings: LoraSettings, *, train: bool = False) -> nn.Module:
  """`model` with LoRA adapters on `settings.targets` (a qwix-intercepted copy of `model`).

  Args:
    model: a `GPTNeo` (scanned or not: module paths `h/attn/q_proj` and `h_0/attn/q_proj` match).
    settings: enabled LoRA settings.
    train: apply the adapters' dropout (needs a "dropout" rng). qwix applies it whenever the rate
      is positive, so evaluation and generation use `train=False`.
  """
  import qwix  # Imported here: only LoRA runs need it (the `lora` extra).
  pattern = r"(.*/)?(" + "|".join(re.escape(t) for t in settings.targets) + ")"
  provider = qwix.LoraProvider(module_path=pattern, rank=settings.rank, alpha=settings.alpha,
                               dropout=settings.dropout if train else 0.0)
  return qwix.apply_lora_to_model(model, provider)


def _is_adapter(name: str) -> bool:
  return name.endswith(_ADAPTER_SUFFIXES)


def _partition(tree: Any, take) -> Any:
  """The sub-dict of `tree` whose leaves' paths satisfy `take(path)`, empty branches dropped."""
  missing = object()

  def walk(node, path):
    if not isinstance(node, dict):
      return node if take(path) else missing
    kept = {k: walk(v, path + (k,)) for k, v in node.items()}
    kept = {k: v for k, v in kept.items() if v is not missing}
    return kept or missing
  found = walk(tree, ())
  return {} if found is missing else found


def is_trained(path: tuple[str, ...], settings: LoraSettings) -> bool:
  """Whether the leaf at `path` (dict keys) is trained with LoRA: an adapter, or a head when
  `settings.train_heads`."""
  return _is_adapter(path[-1]) or (settings.train_heads and path[0] in _HEADS)


def split(params: dict, settings: LoraSettings) -> tuple[dict, dict]:
  """(frozen base, trained) parts of a tree with adapters (see `is_trained`)."""
  trained = _partition(params, lambda path: is_trained(path, settings))
  frozen = _partition(params, lambda path: not is_trained(path, settings))
  return frozen, trained


def combine(frozen: dict, trained: dict) -> dict:
  """The whole tree from `split`'s parts (a deep union; `trained` wins where both have a leaf)."""
  if not isinstance(frozen, dict) or not isinstance(trained, dict):
    return trained
  out = dict(frozen)
  for key, value in trained.items():
    out[key] = combine(frozen[key], value) if key in frozen else value
  return out


def adapters_only(params: dict) -> dict:
  """The adapter leaves of a tree (no heads)."""
  return _partition(params, lambda path: _is_adapter(path[-1]))


def strip_adapters(params: dict) -> dict:
  """The tree without its adapters: the base model (the 'adapters off' reference)."""
  return _partition(params, lambda path: not _is_adapter(path[-1]))


def merge(params: dict, settings: LoraSettings) -> dict:
  """Adapters folded into their kernels: W + (A @ B) * alpha / rank, in W's dtype; the result is
  a plain GPT-Neo tree (jit-friendly; stacked layers merge per layer)."""
  def walk(node):
    if not isinstance(node, dict):
      return node
    if "kernel_lora_a" in node:
      kernel, a, b = node["kernel"], node["kernel_lora_a"], node["kernel_lora_b"]
      delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
      merged = (kernel.astype(jnp.float32) + delta * settings.scale).astype(kernel.dtype)
      return {**{k: v for k, v in node.items() if not _is_adapter(k)}, "kernel": merged}
    return {k: walk(v) for k, v in node.items()}
  return walk(params)


def peft_adapter(trained: dict, settings: LoraSettings, *, num_layers: int, kind: str,
                 base_model: str = "") -> tuple[dict[str, np.ndarray], dict]:
  """The trained part of a LoRA model in Hugging Face PEFT's adapter format.

  Args:
    trained: host arrays, the trained tree (`split(...)[1]`), blocks stacked under `h`.
    settings: the run's LoRA settings.
    num_layers: blocks in the model.
    kind: "causal_lm" (`GPTNeoForCausalLM`) or "reward" (`GPTNeoForSequenceClassification`; a
      trained score head is saved whole, as peft's `modules_to_save`).
    base_model: recorded as `base_model_name_or_path`.
  Returns:
    (tensors for `adapter_model.safetensors`, the `adapter_config.json` dict). Names are peft's:
    `base_model.model.transformer.h.{i}.attn.attention.q_proj.lora_A.weight` [rank, in] and
    `...lora_B.weight` [out, rank] (torch Linear layout: our A and B transposed).
  """
  tensors = {}
  blocks = trained.get("h", {})
  for group in blocks.values():  # attn, mlp
    for name, leaves in group.items():
      if "kernel_lora_a" not in leaves:
        continue
      a, b = np.asarray(leaves["kernel_lora_a"]), np.asarray(leaves["kernel_lora_b"])
      for i in range(num_layers):
        prefix = f"base_model.model.transformer.h.{i}.{_HF_MODULES[name]}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  modules_to_save = None
  if "score" in trained:
    tensors["base_model.model.score.weight"] = np.ascontiguousarray(
        np.asarray(trained["score"]["kernel"]).T)
    modules_to_save = ["score"]
  config = dict(
      peft_type="LORA", task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM",
      base_model_name_or_path=base_model or None, r=settings.rank, lora_alpha=settings.alpha,
      lora_dropout=settings.dropout, target_modules=sorted(settings.targets), bias="none",
      fan_in_fan_out=False, use_rslora=False, init_lora_weights=True, inference_mode=True,
      modules_to_save=modules_to_save, layers_to_transform=None, layers_pattern=None,
      rank_pattern={}, alpha_pattern={})
  return tensors, config


def select(tree: dict, like: dict) -> dict:
  """The leaves of `tree` at the paths `like` has (e.g. a loaded base cut to the frozen part).

  Raises:
    KeyError: `tree` lacks a path of `like` (the message is the missing path).
  """
  def walk(node, shape, path):
    if not isinstance(shape, dict):
      return node
    if not isinstance(node, dict):
      raise KeyError("/".join(path))
    out = {}
    for key, sub in shape.items():
      if key not in node:
        raise KeyError("/".join(path + (key,)))
      out[key] = walk(node[key], sub, path + (key,))
    return out
  return walk(tree, like, ())


@dataclasses.dataclass(frozen=True)
class LoraModel:
  """A GPT-Neo trained through adapters on a mesh: its modules and the two parts of its tree.

  settings: the LoRA settings.
  train_model / eval_model: the model with adapters, with / without the adapters' dropout.
  trained_shapes / trained_shardings: ShapeDtypeStructs and NamedShardings of what is trained
    (adapters, heads with `train_heads`), laid out by `rlhf_jax.sharding`'s rules.
  frozen_shapes / frozen_shardings: the same for the frozen base part.
  """
  settings: LoraSettings
  train_model: nn.Module
  eval_model: nn.Module
  trained_shapes: dict
  trained_shardings: dict
  frozen_shapes: dict
  frozen_shardings: dict

  def full(self, frozen: dict, trained: dict) -> dict:
    """The tree the LoRA modules apply to."""
    return combine(frozen, trained)

  def merged(self, frozen: dict, trained: dict) -> dict:
    """The plain GPT-Neo params with the adapters folded in (call under jit for large models)."""
    return merge(combine(frozen, trained), self.settings)

  def init_trained(self, rng: jax.Array) -> dict:
    """Fresh trained params on their shardings: A he-uniform, B zero (the model starts as its
    base), heads initialised as the plain model does. Only the trained part is computed."""
    ids = jnp.zeros((1, 8), jnp.int32)
    init = lambda r: split(nn.meta.unbox(self.eval_model.init(r, ids, jnp.ones_like(ids))[
        "params"]), self.settings)[1]
    return jax.jit(init, out_shardings=self.trained_shardings)(rng)


def plan(model: nn.Module, settings: LoraSettings, mesh: jax.sharding.Mesh) -> LoraModel:
  """The `LoraModel` of a plain `GPTNeo` module (`settings` enabled) on `mesh`."""
  from rlhf_jax import sharding
  from rlhf_jax.models import gpt_neo
  eval_model = with_adapters(model, settings, train=False)
  shapes = gpt_neo.param_shapes(eval_model)
  shardings = sharding.param_shardings(gpt_neo.logical_axes(eval_model), shapes, mesh)
  frozen_shapes, trained_shapes = split(shapes, settings)
  return LoraModel(settings=settings, train_model=with_adapters(model, settings, train=True),
                   eval_model=eval_model, trained_shapes=trained_shapes,
                   trained_shardings=select(shardings, trained_shapes),
                   frozen_shapes=frozen_shapes, frozen_shardings=select(shardings, frozen_shapes))


def count(tree: Any) -> int:
  """Number of parameters in a tree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))
