"""Hugging Face interop: GPT-Neo checkpoints <-> Flax parameters, and tokenizers.

The Flax tree mirrors HF's module names (see `gpt_neo.py`), so conversion is the table below plus two
mechanical rules: torch `Linear` weights are `[out, in]` (Flax kernels are `[in, out]`), and per-layer
tensors `transformer.h.{i}.*` are stacked on the leading `layers` axis of the scanned blocks.

Reading safetensors needs no torch; `pytorch_model.bin` files are read with torch when it is installed.
"""

import json
import os
import pathlib
import re
import shutil
from typing import Any

from absl import logging
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.models.gpt_neo import GPTNeoConfig

# (HF name under `transformer.h.{i}.`, Flax path under `h`, is a torch Linear weight).
_LAYER_TABLE = (
    ("ln_1.weight", ("ln_1", "scale"), False),
    ("ln_1.bias", ("ln_1", "bias"), False),
    ("attn.attention.q_proj.weight", ("attn", "q_proj", "kernel"), True),
    ("attn.attention.k_proj.weight", ("attn", "k_proj", "kernel"), True),
    ("attn.attention.v_proj.weight", ("attn", "v_proj", "kernel"), True),
    ("attn.attention.out_proj.weight", ("attn", "out_proj", "kernel"), True),
    ("attn.attention.out_proj.bias", ("attn", "out_proj", "bias"), False),
    ("ln_2.weight", ("ln_2", "scale"), False),
    ("ln_2.bias", ("ln_2", "bias"), False),
    ("mlp.c_fc.weight", ("mlp", "c_fc", "kernel"), True),
    ("mlp.c_fc.bias", ("mlp", "c_fc", "bias"), False),
    ("mlp.c_proj.weight", ("mlp", "c_proj", "kernel"), True),
    ("mlp.c_proj.bias", ("mlp", "c_proj", "bias"), False),
)
# (full HF name, Flax path, is a torch Linear weight). `lm_head.weight` is tied to `wte` and absent.
_TOP_TABLE = (
    ("transformer.wte.weight", ("wte", "embedding"), False),
    ("transformer.wpe.weight", ("wpe", "embedding"), False),
    ("transformer.ln_f.weight", ("ln_f", "scale"), False),
    ("transformer.ln_f.bias", ("ln_f", "bias"), False),
)
_SCORE = ("score.weight", ("score", "kernel"), True)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
CAUSAL_LM, REWARD = "causal_lm", "reward"


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def hf_to_flax(tensors: dict[str, np.ndarray], config: GPTNeoConfig, source: str = "checkpoint") -> dict:
  """Maps HF tensor names to the Flax parameter tree (a `score` head is kept when present).

  Args:
    tensors: HF state dict as NumPy arrays; the `transformer.` prefix is optional (GPTNeoModel).
    config: the architecture, used to check every shape.
    source: file or directory named in error messages.
  """
  if not any(k.startswith("transformer.") for k in tensors):
    tensors = {("transformer." + k if not k.startswith("score.") else k): v for k, v in tensors.items()}

  def take(name: str, transpose: bool) -> np.ndarray:
    if name not in tensors:
      raise UserError(f"{source}: tensor {name!r} is missing from the checkpoint")
    value = np.asarray(tensors[name])
    return value.T if transpose else value

  params: dict = {}
  for name, path, transpose in _TOP_TABLE:
    _set(params, path, take(name, transpose))
  for suffix, path, transpose in _LAYER_TABLE:
    layers = [take(f"transformer.h.{i}.{suffix}", transpose) for i in range(config.num_layers)]
    _set(params, ("h",) + path, np.stack(layers))
  if _SCORE[0] in tensors:
    score = take(_SCORE[0], True)
    if score.shape[1] != 1:
      raise UserError(f"{source}: score.weight has {score.shape[1]} labels; a reward model has 1")
    _set(params, _SCORE[1], score)
  _check_unused(tensors, config, source)
  _check_shapes(params, config, source)
  return params


# Tensors that may be present but carry nothing: the causal-mask buffers older transformers saved.
_IGNORABLE = re.compile(r"transformer\.h\.\d+\.attn\.attention\.(bias|masked_bias)")


def _check_unused(tensors: dict[str, np.ndarray], config: GPTNeoConfig, source: str) -> None:
  """Refuses tensors the conversion would otherwise drop silently (e.g. layers beyond num_layers)."""
  used = {name for name, _, _ in _TOP_TABLE} | {_SCORE[0]} | {
      f"transformer.h.{i}.{suffix}" for suffix, _, _ in _LAYER_TABLE for i in range(config.num_layers)}
  if "lm_head.weight" in tensors:
    if not np.array_equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"]):
      raise UserError(f"{source}: lm_head.weight differs from transformer.wte.weight; GPT-Neo's LM "
                      "head is tied to the token embeddings and an untied head is not supported")
    used.add("lm_head.weight")
  unused = sorted(k for k in tensors if k not in used and not _IGNORABLE.fullmatch(k))
  if unused:
    raise UserError(f"{source}: {len(unused)} tensor(s) that config.json does not account for, e.g. "
                    f"{', '.join(unused[:3])}")


def _check_shapes(params: dict, config: GPTNeoConfig, source: str) -> None:
  from rlhf_jax.models import gpt_neo  # Deferred: building shapes imports flax/jax.
  import jax
  expected = gpt_neo.param_shapes(gpt_neo.GPTNeo(config, score_head="score" in params))
  for path, want in jax.tree_util.tree_leaves_with_path(expected):
    keys = tuple(p.key for p in path)
    got = _get(params, keys).shape
    if tuple(got) != tuple(want.shape):
      raise UserError(f"{source}: tensor for {'/'.join(keys)} has shape {tuple(got)}, "
                      f"config.json implies {tuple(want.shape)}")


def flax_to_hf(params: dict, config: GPTNeoConfig) -> dict[str, np.ndarray]:
  """The inverse of `hf_to_flax`: HF names, torch layouts, contiguous NumPy arrays."""
  layout = lambda x, transpose: np.ascontiguousarray(np.asarray(x).T if transpose else np.asarray(x))
  tensors = {name: layout(_get(params, path), t) for name, path, t in _TOP_TABLE}
  for suffix, path, transpose in _LAYER_TABLE:
    stacked = np.asarray(_get(params, ("h",) + path))
    for i in range(config.num_layers):
      tensors[f"transformer.h.{i}.{suffix}"] = layout(stacked[i], transpose)
  if "score" in params:
    tensors[_SCORE[0]] = layout(_get(params, _SCORE[1]), True)
  return tensors


def read_config(directory: str | os.PathLike) -> GPTNeoConfig:
  """Reads `config.json` of a GPT-Neo checkpoint directory, with clear errors."""
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise UserError(f"{directory}: no config.json, so this is not a Hugging Face checkpoint directory")
  try:
    hf = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if hf.get("model_type") != "gpt_neo":
    raise UserError(f"{path}: model_type is {hf.get('model_type')!r}; rlhf-jax supports GPT-Neo "
                    "(model_type 'gpt_neo')")
  try:
    return GPTNeoConfig.from_hf_dict(hf)
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{path}: invalid GPT-Neo config ({e})") from None


def _read_weight_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  if path.suffix == ".safetensors":
    import safetensors.numpy
    try:
      return safetensors.numpy.load_file(str(path))
    except Exception as e:  # SafetensorError is not importable under a stable name.
      raise UserError(f"{path}: cannot read safetensors file ({e})") from None
  try:
    import torch
  except ImportError:
    raise UserError(f"{path}: reading pytorch_model.bin needs torch; install it or convert the "
                    "checkpoint to safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise UserError(f"{path}: cannot read PyTorch checkpoint ({e})") from None
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory: single or sharded safetensors, else pytorch_model.bin."""
  directory = pathlib.Path(directory)
  for name in _WEIGHT_FILES:
    path = directory / name
    if not path.is_file():
      continue
    if not name.endswith(".index.json"):
      return _read_weight_file(path)
    try:
      shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
      raise UserError(f"{path}: invalid shard index ({e})") from None
    tensors = {}
    for shard in shards:
      if not (directory / shard).is_file():
        raise UserError(f"{path}: lists shard {shard}, which does not exist")
      tensors.update(_read_weight_file(directory / shard))
    return tensors
  raise UserError(f"{directory}: no weights found (looked for {', '.join(_WEIGHT_FILES)})")


def resolve(name_or_path: str) -> pathlib.Path:
  """A local checkpoint directory, downloading a hub id through `huggingface_hub` if needed."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.exists():
    return path
  if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
    raise UserError(f"{name_or_path}: no such checkpoint directory (and not a hub id 'org/name')")
  import huggingface_hub
  try:
    local = huggingface_hub.snapshot_download(
        name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    if not any(pathlib.Path(local).glob("*.safetensors")):
      local = huggingface_hub.snapshot_download(name_or_path, allow_patterns=["pytorch_model*.bin"])
  except Exception as e:  # Offline, unknown repo, gated repo, network errors: one clear line.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"{name_or_path}: cannot download this model from the Hugging Face hub "
                    f"({type(e).__name__}: {reason}); pass a local checkpoint directory instead") from None
  return pathlib.Path(local)


def load_checkpoint(name_or_path: str) -> tuple[GPTNeoConfig, dict, str, pathlib.Path]:
  """Loads an HF GPT-Neo checkpoint (local directory or hub id).

  Returns:
    (config, params as NumPy arrays, kind: "causal_lm" or "reward" (has a `score` head),
    the local directory, which also holds the tokenizer files when the checkpoint has them).
  """
  directory = resolve(name_or_path)
  config = read_config(directory)
  params = hf_to_flax(read_weights(directory), config, str(directory))
  return config, params, REWARD if "score" in params else CAUSAL_LM, directory


def save_checkpoint(params: Any, config: GPTNeoConfig, out_dir: str | os.PathLike, *,
                    kind: str = CAUSAL_LM, tokenizer_dir: str | os.PathLike | None = None,
                    dtype: str = "float32", extra_files: dict[str, str] | None = None,
                    chat_template: str | None = None) -> pathlib.Path:
  """Writes an HF directory that `transformers` loads with no missing or unexpected weights.

  Args:
    params: Flax parameters (any array type; gathered to host memory).
    config: the architecture.
    out_dir: created if needed; config.json, model.safetensors and tokenizer files are written.
    kind: "causal_lm" -> `GPTNeoForCausalLM` (a value head, if any, is dropped); "reward" ->
      `GPTNeoForSequenceClassification` with one label.
    tokenizer_dir: a directory `AutoTokenizer` loads; its tokenizer is saved alongside.
    dtype: "float32" or "bfloat16" for the saved weights.
    extra_files: name -> text written next to the model (e.g. the prompt template).
    chat_template: a Jinja chat template saved with the tokenizer (tokenizer_config.json /
      chat_template.jinja), so `apply_chat_template` renders the prompt format the model was
      trained on (`rlhf_jax.data.batching.CHAT_TEMPLATE`); needs `tokenizer_dir`.
  """
  import ml_dtypes
  import safetensors.numpy
  import transformers
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
  if np_dtype is None:
    raise UserError(f"export dtype {dtype!r} is not supported (use float32 or bfloat16)")
  if kind == REWARD and "score" not in params:
    raise UserError("cannot export a reward model: the checkpoint has no score head")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)

  hf_config = config.to_hf_dict()
  hf_config.pop("model_type")
  if kind == REWARD:
    # HF's classifier reads the last token that is not `pad_token_id`; GPT-Neo pads with EOS.
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    hf_config.update(architectures=["GPTNeoForSequenceClassification"], num_labels=1,
                     pad_token_id=pad)
  else:
    hf_config.update(architectures=["GPTNeoForCausalLM"])
    params = {k: v for k, v in params.items() if k != "score"}
  transformers.GPTNeoConfig(dtype=dtype, **hf_config).save_pretrained(out)

  tensors = {k: v.astype(np_dtype) for k, v in flax_to_hf(params, config).items()}
  safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer_dir is not None:
    tokenizer = load_tokenizer(tokenizer_dir)
    if chat_template is not None:
      tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
  elif chat_template is not None:
    raise ValueError("a chat template is saved with the tokenizer: give tokenizer_dir")
  for name, text in (extra_files or {}).items():
    (out / name).write_text(text)
  return out


def load_tokenizer(directory: str | os.PathLike):
  """`AutoTokenizer` from a directory, with GPT-Neo's convention pad = eos when no pad is defined."""
  import transformers
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  except (OSError, ValueError) as e:
    raise UserError(f"{directory}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def has_score_head(directory: str | os.PathLike) -> bool:
  """Whether an HF checkpoint directory is a sequence classifier (has `score.weight`)."""
  import safetensors
  directory = pathlib.Path(directory)
  index = next((directory / n for n in _WEIGHT_FILES if n.endswith(".index.json")
                and (directory / n).is_file()), None)
  if index is not None:
    return "score.weight" in json.loads(index.read_text()).get("weight_map", {})
  path = directory / "model.safetensors"
  if path.is_file():
    try:
      with safetensors.safe_open(str(path), framework="numpy") as f:
        return "score.weight" in f.keys()
    except Exception as e:
      raise UserError(f"{path}: cannot read safetensors file ({e})") from None
  return "score.weight" in read_weights(directory)


def has_tokenizer(directory: str | os.PathLike) -> bool:
  directory = pathlib.Path(directory)
  return any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies the tokenizer files of `src` into `dst` (through `save_pretrained`, so formats agree)."""
  dst = pathlib.Path(dst)
  if dst.exists():
    shutil.rmtree(dst)
  load_tokenizer(src).save_pretrained(dst)
  logging.info("Saved tokenizer from %s to %s", src, dst)
