"""Config pieces shared by the phase configs (each phase config is a small file that uses these)."""

import os
from collections.abc import Sequence

import ml_collections

# The folder holding the real data the non-default variants read (Dolly files, Anthropic HH-RLHF
# pairs, the GPT-2 tokenizer; layout as in the project's shared data: dolly/, preferences/,
# gpt2_tokenizer/). Configs never guess it from where the repository lies.
DATA_ENV = "RLHF_JAX_DATA"


def data_path(relative: str) -> str:
  """`relative` under the folder $RLHF_JAX_DATA names; unset, the path keeps the variable's name
  ("$RLHF_JAX_DATA/relative"), so the loader's "no such file" error says what to set. A flag
  (e.g. --config.pairs.source=FILE) overrides the path either way."""
  root = os.environ.get(DATA_ENV)
  return os.path.join(root, relative) if root else f"${DATA_ENV}/{relative}"


def check_variant(variant: str, valid: Sequence[str]) -> None:
  """Raises ValueError (the binary prints it as one line) unless `variant` is one of `valid`,
  matched exactly: a misspelled variant must not fall back to another one's settings."""
  if variant not in valid:
    raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(valid)}")


def mesh() -> ml_collections.ConfigDict:
  """Device mesh: data x fsdp x tensor; -1 takes the remaining devices (see rlhf_jax/sharding.py)."""
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


def model() -> ml_collections.ConfigDict:
  """Numerics of the model: compute dtype, master-weight dtype, rematerialisation per block, and
  dropout (-1 keeps the checkpoint's embed/attention/resid dropout; GPT-Neo ships with 0).

  lora: low-rank adapters (rlhf_jax/models/lora.py; needs the `lora` extra): rank (0 = off, full
    fine-tuning), alpha (outputs scaled by alpha / rank), dropout on the adapters' inputs, targets
    (comma-separated among q_proj, k_proj, v_proj, out_proj, c_fc, c_proj, or "all"), train_heads
    (a score/value head trains fully).
  """
  return ml_collections.ConfigDict(dict(
      dtype="float32", param_dtype="float32", remat=False, dropout=-1.0,
      lora=dict(rank=0, alpha=16.0, dropout=0.0,
                targets="q_proj,k_proj,v_proj,out_proj,c_fc,c_proj", train_heads=True)))


def data(source: str = "builtin") -> ml_collections.ConfigDict:
  """Instruction data: the built-in generated set, a local Dolly-format file, or a hub dataset id.

  source: "builtin", a .jsonl/.json/.parquet file with instruction/context/response/category, or
    a hub id such as "databricks/databricks-dolly-15k".
  seed: split (and generation) seed.
  num_train / num_eval: sizes of the built-in set's train split and of each evaluation split
    (rlhf_jax/data/builtin.py's defaults; its DEFAULT_NUM_TRAIN says why 40,000).
  validation_fraction / test_fraction / ood_categories: how files and hub data are split (records of
    the listed categories form the `ood` split).
  skip_bad_records: skip, count and log malformed records instead of stopping at the first.
  demonstrators: who writes the built-in set's responses, "NAME=SHARE,..." over tutor, plain,
    terse, rambler, evasive, careless (rlhf_jax/data/builtin.py; MIXED_DEMONSTRATORS is the
    recommended realistic mix and says why; "mixed", the default, names it). "plain=1.0" is the
    single-style set of earlier versions.
  """
  return ml_collections.ConfigDict(dict(
      source=source, seed=0, num_train=40000, num_eval=200, validation_fraction=0.05,
      test_fraction=0.05, ood_categories=(), skip_bad_records=False,
      demonstrators="mixed"))


def optim(lr: float, **overrides) -> ml_collections.ConfigDict:
  """AdamW + clipping + warmup/decay (rlhf_jax/training/optim.py)."""
  fields = dict(lr=lr, warmup_steps=0, schedule="cosine", end_lr_fraction=0.1, b1=0.9, b2=0.999,
                eps=1e-8, weight_decay=0.0, clip_norm=1.0)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def train(steps: int, batch_size: int, **overrides) -> ml_collections.ConfigDict:
  """The shared loop's settings (rlhf_jax/training/loop.py). batch_size is global (all devices and
  processes); accum_steps splits it into micro-batches; save_every 0 saves only at the end."""
  fields = dict(steps=steps, batch_size=batch_size, accum_steps=1, log_every=50, eval_every=0,
                save_every=500, keep_checkpoints=2, eval_at_start=True, seed=0)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)
