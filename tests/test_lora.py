"""Tests of LoRA (rlhf_jax/models/lora.py, through qwix) and of training with it: adapters at zero
give the base exactly, merged params give the LoRA forward, a LoRA step changes only the adapters
and the optimizer state holds only adapter-shaped arrays, the SFT phase checkpoints only the
adapters (plus a pointer to its base) and resumes bit-exactly, both exports (merged HF directory,
PEFT adapter directory loaded by `peft`) give the JAX logits, and 8 devices give the 1-device
step."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoints
from rlhf_jax import main
from rlhf_jax import sharding
from rlhf_jax.configs import export as export_config
from rlhf_jax.configs import init as init_config
from rlhf_jax.configs import sft as sft_config
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import lora
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import sft
from conftest import save_tiny_sft_and_reward  # noqa: E402
from conftest import tiny_ppo_config  # noqa: E402
from conftest import write_pairs  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = lora.LoraSettings(rank=4, alpha=8.0)


def one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def base():
  """A tiny GPT-Neo, its (random) params and a batch of token ids."""
  model = gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=256, hidden_size=32, num_heads=4))
  params = gpt_neo.init_params(model, jax.random.key(0))
  ids = np.random.default_rng(0).integers(0, 256, (3, 10)).astype(np.int32)
  return model, params, ids


def randomized(trained: dict, seed: int = 1, scale: float = 0.3) -> dict:
  """Adapters with non-zero B (a fresh adapter's B is zero)."""
  leaves, treedef = jax.tree.flatten(trained)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def logits(model, params, ids) -> np.ndarray:
  return np.asarray(model.apply({"params": params}, ids, np.ones_like(ids))["logits"])


def test_settings_from_config_and_errors():
  config = sft_config.get_config()
  assert not lora.settings_from_config(config.model).enabled  # Off by default.
  config.model.lora.update(rank=8, targets="q_proj, v_proj")
  settings = lora.settings_from_config(config.model)
  assert settings.rank == 8 and settings.targets == ("q_proj", "v_proj") and settings.scale == 2.0
  config.model.lora.targets = "q_proj,wte"
  with pytest.raises(UserError, match=r"--config.model.lora.targets: unknown wte"):
    lora.settings_from_config(config.model)
  config.model.lora.update(targets="all", rank=-1)
  with pytest.raises(UserError, match=r"--config.model.lora.rank=-1"):
    lora.settings_from_config(config.model)


def test_adapters_take_their_kernels_logical_axes(base):
  model, _, _ = base
  axes = gpt_neo.logical_axes(lora.with_adapters(model, SETTINGS))
  for group, name, (into, out) in [("attn", "q_proj", ("embed", "heads")),
                                   ("attn", "out_proj", ("heads", "embed")),
                                   ("mlp", "c_fc", ("embed", "mlp")),
                                   ("mlp", "c_proj", ("mlp", "embed"))]:
    leaves = axes["h"][group][name]
    assert tuple(leaves["kernel"]) == ("layers", into, out)
    assert tuple(leaves["kernel_lora_a"]) == ("layers", into, None)
    assert tuple(leaves["kernel_lora_b"]) == ("layers", None, out)


def test_zero_adapters_give_the_reference_exactly(base):
  """A fresh adapter (B = 0) leaves the model as its base, bit for bit: LoRA's policy at step 0 is
  the reference with the adapters off."""
  model, params, ids = base
  planned = lora.plan(model, SETTINGS, one_device_mesh())
  trained = planned.init_trained(jax.random.key(3))
  assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape[-1], lora.adapters_only(trained))))
  assert all(not np.any(np.asarray(b)) for b in jax.tree.leaves(trained)
             if b.shape[-2] == SETTINGS.rank)  # Every B is zero ...
  assert any(np.any(np.asarray(a)) for a in jax.tree.leaves(trained))  # ... and A is not.
  frozen = lora.select(params, planned.frozen_shapes)
  np.testing.assert_array_equal(logits(planned.eval_model, planned.full(frozen, trained), ids),
                                logits(model, params, ids))


def test_merged_params_give_the_lora_forward(base):
  model, params, ids = base
  planned = lora.plan(model, SETTINGS, one_device_mesh())
  trained = randomized(planned.init_trained(jax.random.key(3)))
  frozen = lora.select(params, planned.frozen_shapes)
  with_adapters = logits(planned.eval_model, planned.full(frozen, trained), ids)
  merged = logits(model, jax.jit(planned.merged)(frozen, trained), ids)
  assert np.abs(with_adapters - logits(model, params, ids)).max() > 1e-2  # The adapters matter.
  np.testing.assert_allclose(merged, with_adapters, atol=1e-5, rtol=0)


def sft_batch(ids: np.ndarray) -> dict:
  return dict(input_ids=ids, targets=np.roll(ids, -1, 1), segment_ids=np.ones_like(ids),
              positions=np.tile(np.arange(ids.shape[1], dtype=np.int32), (ids.shape[0], 1)),
              loss_mask=np.ones(ids.shape, np.float32))


def test_lora_step_changes_only_adapters_and_optimizer_holds_only_adapters(base):
  model, params, ids = base
  planned = lora.plan(model, SETTINGS, one_device_mesh())
  frozen = lora.select(params, planned.frozen_shapes)
  frozen_before = jax.tree.map(np.array, frozen)
  tx = optim.make_optimizer(sft_config.get_config().optim, 10)
  state = loop.create_train_state(planned.init_trained(jax.random.key(3)), tx, jax.random.key(0))
  trained_before = jax.tree.map(np.array, state.params)
  step = jax.jit(loop.make_train_step(
      lambda p, b, r: sft.sft_loss(planned.train_model, p, b, r), tx, combine=planned.full))
  losses = []
  for _ in range(3):
    state, metrics = step(state, sft_batch(ids), frozen)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  # The base is untouched, every adapter moved, and nothing else is trained.
  jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
  assert jax.tree.structure(state.params) == jax.tree.structure(lora.adapters_only(state.params))
  for before, after in zip(jax.tree.leaves(trained_before), jax.tree.leaves(state.params)):
    assert not np.array_equal(before, after)
  # Optimizer state: only arrays shaped like the adapters (Adam's two moments), plus scalars.
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)
  assert lora.count(state.opt_state) - lora.count(moments) < 10


# ---------------------------------------------------------------------------------------------
# The SFT phase with LoRA, its checkpoints and exports.


def init_and_sft_config(workdir: pathlib.Path):
  init = init_config.get_config()
  init.data.num_train, init.vocab_size = 64, 512
  init.arch.update(hidden_size=32, num_layers=2, attention_layers=("global", "local"))
  main.run_phase("init", init, workdir)
  config = sft_config.get_config()
  config.data.num_train, config.data.num_eval = 64, 8
  config.train.update(steps=4, batch_size=8, log_every=2, eval_every=2, save_every=2)
  config.optim.lr = 1e-2
  config.eval_prompts = 0
  config.model.lora.update(rank=4, alpha=8.0)
  return config


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora_sft")
  config = init_and_sft_config(workdir)
  main.run_phase("sft", config, workdir)
  return workdir, config


def restore_all(phase_dir: pathlib.Path, step: int | None = None) -> dict:
  """The raw saved items of a step (params and train state, whatever their structure)."""
  import orbax.checkpoint as ocp
  ckpts = checkpoints.Checkpoints(phase_dir / "checkpoint", create=False)
  step = ckpts.latest_step() if step is None else step
  ckpts.close()
  with ocp.StandardCheckpointer() as reader:
    return {item: jax.tree.map(np.asarray, reader.restore(
        phase_dir / "checkpoint" / str(step) / item)) for item in ("params", "train_state")}


def test_sft_checkpoint_holds_only_adapters_and_changes_only_them(lora_sft):
  workdir, _ = lora_sft
  info = checkpoints.describe_model(workdir / "sft")
  assert info["manifest"]["lora"]["base"] == str((workdir / "init" / "checkpoint").absolute())
  assert info["manifest"]["lora"]["rank"] == 4
  saved = restore_all(workdir / "sft")
  assert jax.tree.structure(saved["params"]) == jax.tree.structure(
      lora.adapters_only(saved["params"]))
  moments = [x for x in jax.tree.leaves(saved["train_state"]["opt_state"]) if x.ndim]
  assert sorted(x.shape for x in moments) == sorted(
      [x.shape for x in jax.tree.leaves(saved["params"])] * 2)
  # Loaded (merged), the model differs from its base only in the targeted kernels.
  merged = jax.tree.map(np.asarray, checkpoints.load_model(workdir / "sft")["params"])
  initial = jax.tree.map(np.asarray, checkpoints.load_model(workdir / "init")["params"])
  for path, value in jax.tree_util.tree_leaves_with_path(initial):
    keys = tuple(k.key for k in path)
    other = merged
    for key in keys:
      other = other[key]
    if keys[-1] == "kernel" and keys[-2] in lora.TARGETS:
      assert not np.array_equal(other, value), keys
    else:
      np.testing.assert_array_equal(other, value, err_msg=str(keys))


def test_sft_with_lora_resumes_bit_exactly(lora_sft, tmp_path):
  workdir, config = lora_sft
  shutil.copytree(workdir / "init", tmp_path / "init")
  shutil.copytree(workdir / "sft", tmp_path / "sft")
  shutil.rmtree(tmp_path / "sft" / "checkpoint" / "4")  # As if stopped after saving step 2.
  main.run_phase("sft", config, tmp_path)  # Resumes from step 2 (the base: the copied init).
  expected, got = restore_all(workdir / "sft"), restore_all(tmp_path / "sft")
  assert checkpoints.Checkpoints(tmp_path / "sft" / "checkpoint", create=False).latest_step() == 4
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_merged_and_peft_exports_give_the_lora_logits(lora_sft, tmp_path):
  import peft
  import torch
  import transformers
  workdir, _ = lora_sft
  for source, out, adapters_only in [("init", "hf_base", False), ("sft", "hf_merged", False),
                                     ("sft", "adapter", True)]:
    export = export_config.get_config()
    export.checkpoint, export.hf_out = str(workdir / source), str(tmp_path / out)
    export.adapters_only = adapters_only
    main.run_phase("export", export, tmp_path)
  adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0
  # The JAX LoRA forward: base + adapters through qwix, read from the checkpoint as saved.
  info = checkpoints.describe_model(workdir / "sft")
  planned, trained = checkpoints.load_lora_trained(info, one_device_mesh())
  frozen = checkpoints.load_lora_base(checkpoints.describe_model(workdir / "init"), planned)
  ids = np.random.default_rng(1).integers(0, 512, (2, 12)).astype(np.int32)
  ours = logits(planned.eval_model, planned.full(frozen, trained), ids)
  base_logits = logits(gpt_neo.GPTNeo(info["config"]),
                       checkpoints.load_model(workdir / "init")["params"], ids)
  assert np.abs(ours - base_logits).max() > 1e-3  # Training moved the adapters.

  torch_ids = torch.tensor(ids, dtype=torch.long)
  merged = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "hf_merged").eval()
  base_model = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "hf_base").eval()
  with_peft = peft.PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
  with torch.no_grad():
    merged_logits = merged(torch_ids).logits.numpy()
    peft_logits = with_peft(torch_ids).logits.numpy()
  np.testing.assert_allclose(merged_logits, ours, atol=1e-5, rtol=0)
  np.testing.assert_allclose(peft_logits, ours, atol=1e-5, rtol=0)


def test_adapters_only_export_of_a_full_checkpoint_is_a_user_error(lora_sft, tmp_path):
  workdir, _ = lora_sft
  export = export_config.get_config()
  export.checkpoint, export.hf_out = str(workdir / "init"), str(tmp_path / "adapter")
  export.adapters_only = True
  with pytest.raises(UserError, match="not a LoRA checkpoint"):
    main.run_phase("export", export, tmp_path)


# ---------------------------------------------------------------------------------------------
# 8 devices.

_EIGHT_DEVICES_SCRIPT = r"""
import jax, numpy as np
from rlhf_jax import sharding
from rlhf_jax.configs import sft as sft_config
from rlhf_jax.models import gpt_neo, lora
from rlhf_jax.training import loop, optim, sft
assert jax.device_count() == 8
model = gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=256, hidden_size=32, num_heads=4))
params = jax.device_get(gpt_neo.init_params(model, jax.random.key(0)))
settings = lora.LoraSettings(rank=4, alpha=8.0)
ids = np.random.default_rng(0).integers(0, 256, (8, 10)).astype(np.int32)
batch = dict(input_ids=ids, targets=np.roll(ids, -1, 1), segment_ids=np.ones_like(ids),
             positions=np.tile(np.arange(10, dtype=np.int32), (8, 1)),
             loss_mask=np.ones(ids.shape, np.float32))
tx = optim.make_optimizer(sft_config.get_config().optim, 10)

def steps(mesh):
  planned = lora.plan(model, settings, mesh)
  frozen = sharding.global_from_host(lora.select(params, planned.frozen_shapes),
                                     planned.frozen_shardings)
  trained = planned.init_trained(jax.random.key(3))
  placed = trained["h"]["mlp"]["c_fc"]["kernel_lora_a"].sharding.spec
  assert placed == planned.trained_shardings["h"]["mlp"]["c_fc"]["kernel_lora_a"].spec
  state = loop.create_train_state(trained, tx, jax.random.key(0))
  step = jax.jit(loop.make_train_step(
      lambda p, b, r: sft.sft_loss(planned.train_model, p, b, r), tx, combine=planned.full))
  for _ in range(2):
    state, metrics = step(state, sharding.shard_batch(batch, mesh), frozen)
  return planned, state, float(metrics["loss"])

one = steps(sharding.make_mesh(devices=jax.devices()[:1]))
eight = steps(sharding.make_mesh(fsdp=8))
# The adapters are laid out by their kernels' rules: c_fc's A [layers, embed, r] over fsdp.
spec = eight[0].trained_shardings["h"]["mlp"]["c_fc"]["kernel_lora_a"].spec
assert "fsdp" in str(spec), spec
np.testing.assert_allclose(eight[2], one[2], rtol=1e-6)
for a, b in zip(jax.tree.leaves(eight[1].params), jax.tree.leaves(one[1].params)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
print("same step on 8 devices as on 1; c_fc A sharded", spec)
"""


@pytest.mark.slow
def test_eight_devices_give_the_one_device_lora_step():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert "same step on 8 devices as on 1" in result.stdout


# ---------------------------------------------------------------------------------------------
# The reward model with LoRA (on a LoRA SFT checkpoint: its base is loaded merged).




def test_reward_with_lora_trains_adapters_and_head_and_exports_both_forms(lora_sft, tmp_path):
  import peft
  import torch
  import transformers
  from rlhf_jax.configs import reward as reward_config
  workdir, _ = lora_sft
  config = reward_config.get_config()
  config.init_checkpoint = str(workdir / "sft")
  config.pairs.source = str(write_pairs(tmp_path / "pairs.jsonl", 24))
  config.pairs.eval_fraction = 0.25
  config.max_length = 64
  config.train.update(steps=3, batch_size=4, log_every=1, eval_every=0, save_every=0)
  config.eval_batch_size, config.stats_samples = 4, 8
  config.model.lora.update(rank=2, alpha=4.0, targets="q_proj,v_proj")
  main.run_phase("reward", config, tmp_path)

  info = checkpoints.describe_model(tmp_path / "reward")
  assert info["manifest"]["lora"]["base"] == str((workdir / "sft" / "checkpoint").absolute())
  saved = restore_all(tmp_path / "reward")
  assert sorted(saved["params"]) == ["h", "score"]  # Adapters and the head, nothing else.
  assert sorted(saved["params"]["h"]["attn"]) == ["q_proj", "v_proj"]

  for source, out, kind, adapters_only in [("sft", "hf_sft", "causal_lm", False),
                                           ("reward", "hf_reward", "auto", False),
                                           ("reward", "reward_adapter", "auto", True)]:
    export = export_config.get_config()
    export.checkpoint, export.hf_out = str(tmp_path / source if source == "reward"
                                           else workdir / source), str(tmp_path / out)
    export.kind, export.adapters_only = kind, adapters_only
    main.run_phase("export", export, tmp_path)
  planned, trained = checkpoints.load_lora_trained(info, one_device_mesh())
  frozen = checkpoints.load_lora_base(checkpoints.describe_model(workdir / "sft"), planned)
  ids = np.random.default_rng(2).integers(0, 512, (2, 12)).astype(np.int32)
  ours = np.asarray(planned.eval_model.apply({"params": planned.full(frozen, trained)}, ids,
                                             np.ones_like(ids), lm_head=False)["scores"][:, -1])
  torch_ids = torch.tensor(ids, dtype=torch.long)
  merged = transformers.GPTNeoForSequenceClassification.from_pretrained(
      tmp_path / "hf_reward").eval()
  base_model = transformers.GPTNeoForSequenceClassification.from_pretrained(
      tmp_path / "hf_sft", num_labels=1).eval()
  with_peft = peft.PeftModel.from_pretrained(base_model, tmp_path / "reward_adapter").eval()
  with torch.no_grad():  # One row at a time: HF's classifier needs a pad id for batches.
    merged_scores = np.concatenate([merged(row[None]).logits.numpy()[:, 0] for row in torch_ids])
    peft_scores = np.concatenate([with_peft(row[None]).logits.numpy()[:, 0] for row in torch_ids])
  np.testing.assert_allclose(merged_scores, ours, atol=1e-5, rtol=0)
  np.testing.assert_allclose(peft_scores, ours, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# PPO with LoRA: the reference is the base with the adapters off.


def ppo_lora_config(value_model: str = "adapters"):
  config = tiny_ppo_config()
  config.model.lora.update(rank=2, alpha=4.0)
  config.value_model = value_model
  return config


@pytest.mark.slow
def test_ppo_with_lora_saves_only_adapters_and_resumes_bit_exactly(tmp_path, tiny_tokenizer_dir,
                                                                   capsys):
  """value_model=adapters: the policy and the value model are adapters (and a value head) on the
  one frozen SFT base, which is also the KL reference; nothing else is trained or saved."""
  save_tiny_sft_and_reward(tmp_path, tiny_tokenizer_dir)
  main.run_phase("ppo", ppo_lora_config(), tmp_path)
  out = capsys.readouterr().out
  assert "LoRA rank 2" in out and "frozen (the reference)" in out
  uninterrupted = restore_all(tmp_path / "ppo", 4)
  params, extra = uninterrupted["params"], uninterrupted["train_state"]["extra"]
  assert jax.tree.structure(params) == jax.tree.structure(lora.adapters_only(params))
  assert sorted(extra["value"]) == ["h", "score"]  # The value model's own adapters and head.
  assert jax.tree.structure(extra["value"]["h"]) == jax.tree.structure(
      lora.adapters_only(extra["value"]["h"]))
  assert any(np.any(b) for b in jax.tree.leaves(params) if b.shape[-2] == 2)  # B moved.
  moments = [x for x in jax.tree.leaves(uninterrupted["train_state"]["opt_state"]) if x.ndim]
  trained = [x.shape for x in jax.tree.leaves((params, extra["value"]))]
  assert sorted(x.shape for x in moments) == sorted(trained * 2)
  info = checkpoints.describe_model(tmp_path / "ppo")
  assert info["manifest"]["lora"]["base"] == str((tmp_path / "sft" / "checkpoint").absolute())

  shutil.rmtree(tmp_path / "ppo" / "checkpoint" / "4")
  main.run_phase("ppo", ppo_lora_config(), tmp_path)
  assert "resuming from step 2" in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, restore_all(tmp_path / "ppo", 4), uninterrupted)
  # The merged policy loads as a plain causal LM (export, eval, generate read it so).
  merged = checkpoints.load_model(tmp_path / "ppo")
  assert "h" in merged["params"] and "kernel_lora_a" not in merged["params"]["h"]["attn"]["q_proj"]


@pytest.mark.slow
def test_ppo_with_lora_host_source_policy_head_and_held_out_eval(tmp_path, tiny_tokenizer_dir):
  save_tiny_sft_and_reward(tmp_path, tiny_tokenizer_dir)
  config = ppo_lora_config(value_model="policy_head")
  config.reward.sources = "gold"
  config.eval_prompts, config.train.eval_every = 4, 2
  config.train.update(steps=2)
  main.run_phase("ppo", config, tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "eval/kl" in row] == [0, 2]
  assert all(np.isfinite(row["loss"]) for row in rows if "loss" in row)
  saved = restore_all(tmp_path / "ppo")["params"]
  assert sorted(saved) == ["h", "score"]  # Adapters and the policy's value head.


# ---------------------------------------------------------------------------------------------
# DPO with LoRA: the reference is the initial policy, the adapters' base.


def test_dpo_with_lora_starts_at_the_reference_and_saves_only_adapters(lora_sft, tmp_path):
  from rlhf_jax.configs import dpo as dpo_config
  workdir, _ = lora_sft
  config = dpo_config.get_config()
  config.init_checkpoint = str(workdir / "sft")  # A LoRA checkpoint: its base loads merged.
  config.pairs.source = str(write_pairs(tmp_path / "pairs.jsonl", 24))
  config.pairs.eval_fraction = 0.25
  config.max_length = 64
  config.train.update(steps=2, batch_size=4, log_every=1, eval_every=0, save_every=0)
  config.eval_batch_size, config.reference_batch_size = 4, 8
  config.model.lora.update(rank=2, alpha=4.0)
  main.run_phase("dpo", config, tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
  first = next(row for row in rows if row["step"] == 0 and "eval/rewards/margins" in row)
  # Fresh adapters: the policy is its base, the reference, so every implicit reward is 0.
  assert abs(first["eval/rewards/chosen"]) < 1e-6 and abs(first["eval/rewards/margins"]) < 1e-6
  saved = restore_all(tmp_path / "dpo")["params"]
  assert jax.tree.structure(saved) == jax.tree.structure(lora.adapters_only(saved))
  info = checkpoints.describe_model(tmp_path / "dpo")
  assert info["manifest"]["lora"]["base"] == str((workdir / "sft" / "checkpoint").absolute())


# ---------------------------------------------------------------------------------------------
# GRPO with LoRA: no value model, the reference is the SFT base with the adapters off.


@pytest.mark.slow  # The default run has the grpo phase (test_grpo.py) and LoRA's reference (DPO's test).
def test_grpo_with_lora_starts_at_the_reference_and_saves_only_adapters(tmp_path,
                                                                        tiny_tokenizer_dir,
                                                                        capsys):
  from rlhf_jax.configs import grpo as grpo_config
  save_tiny_sft_and_reward(tmp_path, tiny_tokenizer_dir)
  config = grpo_config.get_config()
  config.data.update(dict(num_train=16, num_eval=4))
  config.eval_prompts = 0
  config.rollout.update(dict(max_prompt_length=24, max_new_tokens=6, samples_per_prompt=4))
  config.train.update(dict(steps=2, batch_size=4, log_every=1, save_every=0, eval_every=0))
  config.reward.sources = "model"  # The tiny reward model: scores that differ within a group.
  config.optim.lr = 1e-2
  config.model.lora.update(rank=2, alpha=4.0)
  main.run_phase("grpo", config, tmp_path)
  assert "LoRA rank 2" in capsys.readouterr().out
  rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
  first, second = (next(r for r in rows if r.get("step") == s and "loss" in r) for s in (1, 2))
  # Fresh adapters (B = 0): the first rollout's policy is the reference, the second's is not.
  assert abs(first["kl"]) < 1e-5 and abs(second["kl"]) > 1e-4, (first, second)
  assert first["advantage_std_before_whitening"] > 0  # Something to learn from.
  saved = restore_all(tmp_path / "grpo")["params"]
  assert jax.tree.structure(saved) == jax.tree.structure(lora.adapters_only(saved))
  assert any(np.any(b) for b in jax.tree.leaves(saved) if b.shape[-2] == 2)  # B moved.
  info = checkpoints.describe_model(tmp_path / "grpo")
  assert info["manifest"]["lora"]["base"] == str((tmp_path / "sft" / "checkpoint").absolute())
