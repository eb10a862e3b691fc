"""Sharding (rlhf_jax/sharding.py) and the training state on a device mesh.

In this process (one CPU device): the logical-axis rules on abstract meshes of any size (every
GPT-Neo parameter split 1/N over fsdp), per-device bytes, the memory report, host-to-global
placement, multi-host detection, bf16 compute with float32 master weights, and remat.

In a subprocess with 8 fake CPU devices (JAX must not be initialised yet, so it runs this file as
a script): one SFT step, one reward-model step and one PPO iteration (four GPT-Neos) on a single
device, on fsdp=8 and on data=2 x fsdp=2 x tensor=2, from the same parameters and batch (the PPO
iteration in a second subprocess, whose tests are marked slow: its compilation is most of the
time; the SFT and reward steps are the default run's multi-device check). They must give the
same losses and updated parameters (float32; tolerances below: only the summation order of the
sharded reductions differs), and with fsdp=8 every device holds exactly 1/8 of every parameter
and of both Adam moments, read from the arrays' own shards.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # For `launch.local` (and this file when run as the worker).

from launch import local  # noqa: E402
from rlhf_jax import sharding  # noqa: E402
from rlhf_jax.configs import common  # noqa: E402
from rlhf_jax.errors import UserError  # noqa: E402
from rlhf_jax.models import gpt_neo  # noqa: E402
from rlhf_jax.training import loop  # noqa: E402
from rlhf_jax.training import optim  # noqa: E402
from rlhf_jax.training import sft  # noqa: E402

# A tiny GPT-Neo whose every dimension 8 divides (vocab, width, heads, MLP, positions), so that on
# fsdp=8 no parameter falls back to replication.
VOCAB, WIDTH, HEADS, LAYERS = 64, 32, 4, 2
DEVICES = 8
LR = 1e-2
UPDATES = {"sft": 1, "reward": 1, "ppo": 4}  # Optimizer steps in each phase's compared step.
# Tolerances of sharded vs single-device float32 results: metrics to 1e-5 relative; parameters to
# 1/1000 of one update (lr) per optimizer step, since Adam's normalised update turns the
# summation-order noise of a small gradient element into a larger change of its parameter.
LOSS_RTOL = 1e-5
PARAM_ATOL_PER_UPDATE = 1e-3 * LR


def tiny_config() -> gpt_neo.GPTNeoConfig:
  return gpt_neo.tiny_config(vocab_size=VOCAB, hidden_size=WIDTH, num_heads=HEADS,
                             max_position_embeddings=64, window_size=8)


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * 3)


def shardings_of(model: gpt_neo.GPTNeo, mesh) -> dict:
  return sharding.param_shardings(gpt_neo.logical_axes(model), gpt_neo.param_shapes(model), mesh)


def flat(tree) -> dict[str, object]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree)}


# ------------------------------------------------------------------------------------------------
# Rules, bytes and placement, in this process.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fsdp", [8, 64])
def test_every_gpt_neo_parameter_is_split_over_fsdp(fsdp):
  # GPT-Neo 1.3B's shapes with a score head (no allocation): every parameter is split 1/fsdp, the
  # c_fc bias (no embed dimension) by its MLP dimension, the [2048, 1] score head by its width.
  config = gpt_neo.GPTNeoConfig(hidden_size=2048, num_heads=16, num_layers=24,
                                attention_layers=("global", "local") * 12)
  model = gpt_neo.GPTNeo(config, score_head=True)
  shapes = flat(gpt_neo.param_shapes(model))
  specs = flat(shardings_of(model, abstract_mesh(1, fsdp, 1)))
  assert set(specs) == set(shapes) and len(specs) == 18
  for name, sharding_ in specs.items():
    shape = shapes[name].shape
    shard = sharding_.shard_shape(shape)
    assert np.prod(shard) * fsdp == np.prod(shape), (name, shape, shard)
    # The scanned layer dimension is never split (the layer loop slices it).
    if name.startswith("['h']"):
      assert shard[0] == shape[0] == 24, name
  assert specs["['h']['mlp']['c_fc']['bias']"].shard_shape((24, 8192)) == (24, 8192 // fsdp)
  assert specs["['score']['kernel']"].shard_shape((2048, 1)) == (2048 // fsdp, 1)
  assert specs["['wte']['embedding']"].shard_shape((50257, 2048)) == (50257, 2048 // fsdp)


def test_tensor_axis_splits_heads_mlp_and_vocab_and_indivisible_dims_stay_whole():
  model = gpt_neo.GPTNeo(tiny_config())
  specs = flat(shardings_of(model, abstract_mesh(2, 2, 2)))
  assert specs["['h']['attn']['q_proj']['kernel']"].spec == P(None, "fsdp", "tensor")
  assert specs["['h']['attn']['out_proj']['kernel']"].spec == P(None, "tensor", "fsdp")
  assert specs["['h']['mlp']['c_fc']['bias']"].spec == P(None, ("tensor", "fsdp"))
  # GPT-2's vocabulary (50257, odd) cannot be split over tensor=2: replicated there, never dropped.
  big = gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=50257, hidden_size=32, num_heads=4))
  wte = flat(shardings_of(big, abstract_mesh(1, 4, 2)))["['wte']['embedding']"]
  assert wte.spec == P(None, "fsdp") and wte.shard_shape((50257, 32)) == (50257, 8)


def test_per_device_bytes_counts_the_largest_shard_of_each_leaf():
  mesh = abstract_mesh(2, 4, 1)
  tree = {
      "split": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
      "both": jax.ShapeDtypeStruct((4, 8), jnp.bfloat16,
                                   sharding=NamedSharding(mesh, P("data", "fsdp"))),
      "replicated": jax.ShapeDtypeStruct((3,), jnp.int32, sharding=NamedSharding(mesh, P())),
      "host": np.zeros((5, 2), np.float64),
  }
  expected = 2 * 6 * 4 + 2 * 2 * 2 + 3 * 4 + 5 * 2 * 8
  assert sharding.per_device_bytes(tree) == expected


def test_memory_report_adds_up_the_state_from_its_shardings():
  mesh = abstract_mesh(1, 8, 1)
  model = gpt_neo.GPTNeo(tiny_config())
  shapes = gpt_neo.param_shapes(model)
  tx = optax.adamw(1e-3)
  abstract = jax.eval_shape(lambda p: loop.create_train_state(p, tx, jax.random.key(0)), shapes)
  shardings = loop.state_shardings(abstract, shardings_of(model, mesh), mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
  report = loop.memory_report(abstract, frozen={"ref": abstract.params})
  total = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert report["params_total"] == total
  assert report["params"] == total // 8 == report["frozen"]
  # AdamW: two moments like the params, plus replicated int32 step counters.
  counters = 4 * sum(1 for x in jax.tree.leaves(abstract.opt_state) if x.ndim == 0)
  assert report["optimizer"] == 2 * total // 8 + counters
  assert report["activations"] == -1 and report["extra"] == 0
  line = loop.format_memory(report, 8)
  assert "8 devices" in line and "params" in line and "activations" not in line


def test_global_batch_splits_rows_that_divide_and_replicates_the_rest():
  mesh = sharding.make_mesh()  # One device here: everything divides.
  ids = np.arange(12, dtype=np.int32).reshape(4, 3)
  placed = sharding.global_batch({"ids": ids, "scalar": np.float32(2.0)}, mesh)
  assert placed["ids"].sharding.spec == P(sharding.BATCH_AXES, None)
  assert placed["scalar"].sharding.spec == P()
  np.testing.assert_array_equal(sharding.to_host(placed)["ids"], ids)


def test_global_from_host_places_each_leaf_on_its_sharding():
  mesh = sharding.make_mesh()
  shardings = {"a": NamedSharding(mesh, P("fsdp")), "b": sharding.replicated(mesh)}
  placed = sharding.global_from_host({"a": np.ones((4, 2)), "b": np.arange(3)}, shardings)
  assert placed["a"].sharding == shardings["a"] and placed["b"].sharding == shardings["b"]
  np.testing.assert_array_equal(np.asarray(placed["b"]), np.arange(3))


def test_mesh_fills_the_minus_one_axis_and_rejects_bad_shapes():
  devices = jax.devices() * 8  # Only sizes are checked before jax.make_mesh.
  with pytest.raises(UserError, match="at most one"):
    sharding.make_mesh(-1, -1, 1, devices=devices[:8])
  with pytest.raises(UserError, match="does not fit"):
    sharding.make_mesh(3, -1, 1, devices=devices[:8])
  with pytest.raises(UserError, match="does not fit"):
    sharding.make_mesh(0, -1, 1, devices=devices[:8])
  mesh = sharding.make_mesh(1, -1, 1)
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "16"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "host-0"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_cluster_detection_from_the_environment(monkeypatch, env, expected):
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert sharding._cluster_detected() is expected  # Not a Cloud TPU VM here.


def test_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(sharding, "_cluster_detected", lambda: False)
  sharding.initialize_distributed()
  assert calls == []  # A single process does nothing.
  with pytest.raises(UserError, match="--num_processes"):
    sharding.initialize_distributed("127.0.0.1:1234", None, 0)
  sharding.initialize_distributed("127.0.0.1:1234", 2, 1)
  assert calls == [(("127.0.0.1:1234", 2, 1), {})]
  monkeypatch.setattr(sharding, "_cluster_detected", lambda: True)
  sharding.initialize_distributed()
  assert calls[-1] == ((), {})  # JAX's own detection (SLURM, TPU pod, MPI).


# ------------------------------------------------------------------------------------------------
# Numerics switches: bf16 compute with float32 master weights, remat.
# ------------------------------------------------------------------------------------------------
def _lm_batch(rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (rows, length), dtype=np.int32)
  real = np.arange(length)[None, :] < rng.integers(length // 2, length + 1, (rows, 1))
  segment_ids = real.astype(np.int32)
  return dict(input_ids=ids, segment_ids=segment_ids,
              positions=np.maximum(np.cumsum(segment_ids, 1) - 1, 0).astype(np.int32),
              targets=np.roll(ids, -1, axis=1),
              loss_mask=(real & (np.arange(length)[None, :] >= length // 4)).astype(np.float32))


NUMERICS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
            "remat": dict(dtype="float32", remat=True)}


@pytest.fixture(scope="module")
def numerics() -> dict:
  """SFT loss and gradients of one batch under each `model` setting of NUMERICS, same params."""
  params = gpt_neo.init_params(gpt_neo.GPTNeo(tiny_config()), jax.random.key(1))
  batch = _lm_batch(4, 16, seed=0)
  results = {"params": params, "batch": batch}
  for name, settings in NUMERICS.items():
    model = gpt_neo.build(tiny_config(), ml_collections.ConfigDict(
        dict(param_dtype="float32", **settings)))
    loss_and_grads = jax.jit(jax.value_and_grad(lambda p: sft.sft_loss(model, p, batch, None)[0]),
                             compiler_options={"xla_backend_optimization_level": 0})
    results[name] = (model, *loss_and_grads(params))
  return results


def test_bfloat16_compute_keeps_float32_master_weights_and_gradients(numerics):
  model, loss, grads = numerics["bfloat16"]
  params, batch = numerics["params"], numerics["batch"]
  hidden = jax.eval_shape(lambda p: model.apply({"params": p}, batch["input_ids"],
                                                batch["segment_ids"])["hidden"], params)
  assert hidden.dtype == jnp.bfloat16  # The compute really is bf16 ...
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}  # ... not the grads,
  tx = optim.make_optimizer(common.optim(1e-2), 10)
  step = loop.make_train_step(lambda p, b, r: sft.sft_loss(model, p, b, r), tx)
  state = jax.eval_shape(lambda p: loop.create_train_state(p, tx, jax.random.key(0)), params)
  new_state, _ = jax.eval_shape(step, state, batch)
  for tree in (new_state.params, new_state.opt_state):  # ... the master weights or Adam moments.
    assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {jnp.dtype(jnp.float32)}
  _, loss32, grads32 = numerics["float32"]
  # The same loss and gradient direction within bf16 precision (8 mantissa bits), not identical.
  np.testing.assert_allclose(float(loss), float(loss32), rtol=2e-2)
  assert float(loss) != float(loss32)
  g, g32 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (grads, grads32))
  assert np.dot(g, g32) / (np.linalg.norm(g) * np.linalg.norm(g32)) > 0.99


def test_remat_gives_the_same_loss_and_gradients(numerics):
  _, loss, grads = numerics["remat"]
  _, loss32, grads32 = numerics["float32"]
  np.testing.assert_allclose(float(loss), float(loss32), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 1 device vs 8 fake devices, in a subprocess.
# ------------------------------------------------------------------------------------------------
MESHES = {"single": (1, 1, 1), "fsdp8": (1, 8, 1), "mixed": (2, 2, 2)}
PPO_MESHES = ("single", "fsdp8")  # A PPO iteration compiles slowly: the mixed mesh is SFT/reward's.


def _run_worker(out: pathlib.Path, phases: tuple[str, ...]) -> dict:
  """Runs this file as a script on 8 fake devices for `phases`: {"results": json, "arrays": npz}."""
  env = local.fake_devices_env(DEVICES)
  result = subprocess.run([sys.executable, __file__, str(out), ",".join(phases)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  return {"results": json.loads((out / "results.json").read_text()),
          "arrays": dict(np.load(out / "arrays.npz"))}


@pytest.fixture(scope="module")
def multi_device(tmp_path_factory) -> dict:
  """The SFT and reward-model steps on 8 fake devices (the default run's multi-device check)."""
  return _run_worker(tmp_path_factory.mktemp("multi_device"), ("sft", "reward"))


@pytest.fixture(scope="module")
def multi_device_ppo(tmp_path_factory) -> dict:
  """The PPO iteration on 8 fake devices, in its own subprocess: its compilation takes most of
  the worker's time, so its tests are behind the slow marker."""
  return _run_worker(tmp_path_factory.mktemp("multi_device_ppo"), ("ppo",))


def _worker_output(request, phase: str) -> dict:
  return request.getfixturevalue("multi_device_ppo" if phase == "ppo" else "multi_device")


@pytest.mark.parametrize("phase, mesh", [("sft", "fsdp8"), ("reward", "fsdp8"),
                                         pytest.param("ppo", "fsdp8", marks=pytest.mark.slow),
                                         ("sft", "mixed"), ("reward", "mixed")])
def test_sharded_step_equals_single_device(request, phase, mesh):
  multi_device = _worker_output(request, phase)
  results, arrays = multi_device["results"], multi_device["arrays"]
  assert results["devices"] == DEVICES
  single, sharded = results[phase]["single"], results[phase][mesh]
  assert set(single) == set(sharded)
  for name, value in single.items():
    np.testing.assert_allclose(sharded[name], value, rtol=LOSS_RTOL, atol=1e-6, err_msg=name)
  names = [k.split("/", 2)[2] for k in arrays if k.startswith(f"{phase}/single/")]
  # The step changed the parameters (all but a few whose gradient is exactly zero, e.g. ln_f's
  # bias under the Bradley-Terry loss, which shifts both rewards of a pair alike) ...
  trained = [n for n in names if not np.array_equal(arrays[f"{phase}/single/{n}"],
                                                    arrays[f"{phase}/initial/{n}"])]
  assert len(trained) >= 0.8 * len(names) > 0, sorted(set(names) - set(trained))
  atol = PARAM_ATOL_PER_UPDATE * UPDATES[phase]
  largest_change = max(np.max(np.abs(arrays[f"{phase}/single/{n}"] - arrays[f"{phase}/initial/{n}"]))
                       for n in names)
  assert largest_change > 100 * atol
  for name in names:  # ... and the sharded step changed them alike.
    np.testing.assert_allclose(arrays[f"{phase}/{mesh}/{name}"], arrays[f"{phase}/single/{name}"],
                               rtol=0, atol=atol, err_msg=f"{phase} {mesh} {name}")


@pytest.mark.parametrize("phase", ["sft", "reward", pytest.param("ppo", marks=pytest.mark.slow)])
def test_fsdp8_holds_one_eighth_of_params_and_adam_moments(request, phase):
  layout = _worker_output(request, phase)["results"][phase]["layout"]
  params = [e for e in layout if e["group"] == "params"]
  moments = [e for e in layout if e["group"] in ("mu", "nu")]
  assert params and len(moments) == 2 * len(params)
  for entry in params + moments:
    assert entry["devices"] == DEVICES, entry
    # Every device holds a distinct 1/8 of the array (score heads are [width, 1]: split by width).
    assert entry["shard_size"] * DEVICES == entry["size"], entry
    assert entry["distinct_shards"] == DEVICES, entry
    assert "fsdp" in entry["spec"], entry
  # Each moment is laid out exactly like its parameter.
  spec = {e["name"]: e["spec"] for e in params}
  for entry in moments:
    assert entry["spec"] == spec[entry["name"]], entry
  if phase == "ppo":  # Both trained models: the policy and the value model (in `extra`).
    assert {e["model"] for e in params} == {"policy", "value"}
    assert {e["model"] for e in layout if e["group"] == "frozen"} == {"reference", "reward"}
    for entry in (e for e in layout if e["group"] == "frozen"):
      assert entry["shard_size"] * DEVICES == entry["size"], entry


# ------------------------------------------------------------------------------------------------
# The worker (run as a script with 8 fake devices).
# ------------------------------------------------------------------------------------------------
def _layout(tree, group: str, model: str = "") -> list[dict]:
  """How each leaf is laid out, from its addressable shards."""
  entries = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not leaf.ndim:
      continue
    name = jax.tree_util.keystr(path)
    shards = leaf.addressable_shards
    entries.append(dict(
        name=name, group=group, model=model,
        size=int(leaf.size), shard_size=int(np.prod(shards[0].data.shape)),
        devices=len({s.device for s in shards}),
        distinct_shards=len({str(s.index) for s in shards}), spec=str(leaf.sharding.spec)))
  return entries


def _adam_moments(opt_state) -> tuple:
  """The (mu, nu) trees of the project's optimizer chain (clip, AdamW, schedule)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
           if hasattr(s, "mu")]
  assert len(found) == 1, found
  return found[0].mu, found[0].nu


def _place_state(host_state, mesh, model_shardings, extra_shardings=None):
  """The state on `mesh`, laid out by `loop.state_shardings` as the phases lay it out."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype),
                          host_state)
  shardings = loop.state_shardings(abstract, model_shardings, mesh, extra_shardings)
  return jax.device_put(host_state, shardings), shardings


def _metrics(metrics, names) -> dict[str, float]:
  host = jax.device_get(metrics)
  return {k: float(host[k]) for k in names}


def _worker(out: pathlib.Path, phases: set[str]) -> None:
  """Writes out/results.json and out/arrays.npz for `phases` (of sft, reward and ppo)."""
  from rlhf_jax.models import decode
  from rlhf_jax.training import ppo
  from rlhf_jax.training import reward
  assert jax.device_count() == DEVICES, jax.devices()
  start = time.time()
  config = tiny_config()
  fast = {"xla_backend_optimization_level": 0}  # Compile time dominates these one-step runs.
  # eps 1e-4 rather than 1e-8: Adam divides by |gradient| + eps, so at eps 1e-8 a gradient element
  # that is ~0 (its float32 sum cancels) turns summation-order noise into a full lr-sized step.
  tx = optim.make_optimizer(common.optim(LR, clip_norm=1.0, weight_decay=0.01, eps=1e-4), 10)
  policy = gpt_neo.GPTNeo(config)
  scorer = gpt_neo.GPTNeo(config, score_head=True)
  init = lambda model, seed: jax.device_get(
      jax.jit(lambda key: gpt_neo.init_params(model, key))(jax.random.key(seed)))
  policy_params, scorer_params = init(policy, 1), init(scorer, 2)
  results: dict = {"devices": jax.device_count(), "sft": {}, "reward": {}, "ppo": {}}
  arrays: dict[str, np.ndarray] = {}

  def keep(phase, label, tree, prefix=""):
    for name, leaf in flat(jax.device_get(tree)).items():
      arrays[f"{phase}/{label}/{prefix}{name}"] = np.asarray(leaf)

  sft_batch = _lm_batch(16, 24, seed=3)
  rows = np.random.default_rng(4)
  pair_ids = rows.integers(0, VOCAB, (8, 2, 24), dtype=np.int32)
  pair_segments = (np.arange(24)[None, None, :] < rows.integers(6, 25, (8, 2, 1))).astype(np.int32)
  pair_batch = dict(input_ids=pair_ids, segment_ids=pair_segments,
                    positions=np.maximum(np.cumsum(pair_segments, -1) - 1, 0).astype(np.int32),
                    pair_mask=np.array([1.0] * 7 + [0.0], np.float32))
  prompt_rows = np.random.default_rng(5)
  prompt_ids = prompt_rows.integers(0, VOCAB - 1, (16, 6), dtype=np.int32)
  prompt_mask = (np.arange(6)[None, :] >= prompt_rows.integers(0, 5, (16, 1))).astype(np.int32)
  settings = ppo.PPOSettings(
      sampling=decode.SamplingSettings(max_new_tokens=5, temperature=0.7,
                                         eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1),
      num_epochs=2, num_minibatches=2)
  models = ppo.Models(policy=policy, reference=policy, value=scorer, reward=scorer)
  keep("sft", "initial", policy_params)
  keep("reward", "initial", scorer_params)
  keep("ppo", "initial", policy_params, "policy")
  keep("ppo", "initial", scorer_params, "value")

  for label, (data, fsdp, tensor) in MESHES.items():
    devices = jax.devices()[:data * fsdp * tensor]
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices)
    policy_shardings = shardings_of(policy, mesh)
    scorer_shardings = shardings_of(scorer, mesh)
    replicated = sharding.replicated(mesh)

    if phases & {"sft", "reward"}:
      # SFT: one step of the phase's loss through the loop's step function.
      state, shardings = _place_state(
          loop.create_train_state(policy_params, tx, jax.random.key(0)), mesh, policy_shardings)
      step = jax.jit(loop.make_train_step(lambda p, b, r: sft.sft_loss(policy, p, b, r), tx),
                     out_shardings=(shardings, replicated), donate_argnums=0, compiler_options=fast)
      if label == "fsdp8":
        mu, nu = _adam_moments(state.opt_state)
        results["sft"]["layout"] = (_layout(state.params, "params") + _layout(mu, "mu")
                                    + _layout(nu, "nu"))
      state, metrics = step(state, sharding.shard_batch(sft_batch, mesh))
      results["sft"][label] = _metrics(metrics, ("loss", "token_accuracy", "grad_norm"))
      keep("sft", label, state.params)

      # Reward model: one Bradley-Terry step.
      state, shardings = _place_state(
          loop.create_train_state(scorer_params, tx, jax.random.key(0)), mesh, scorer_shardings)
      step = jax.jit(loop.make_train_step(lambda p, b, r: reward.reward_loss(scorer, p, b, r), tx),
                     out_shardings=(shardings, replicated), donate_argnums=0, compiler_options=fast)
      if label == "fsdp8":
        mu, nu = _adam_moments(state.opt_state)
        results["reward"]["layout"] = (_layout(state.params, "params") + _layout(mu, "mu")
                                       + _layout(nu, "nu"))
      state, metrics = step(state, sharding.shard_batch(pair_batch, mesh))
      results["reward"][label] = _metrics(metrics, ("loss", "accuracy", "margin", "grad_norm"))
      keep("reward", label, state.params)

      print(f"{label}: sft and reward done at {time.time() - start:.1f} s", flush=True)
    if "ppo" not in phases or label not in PPO_MESHES:
      continue
    # PPO: one iteration (rollout, scoring, GAE, 2 epochs x 2 minibatches) with four models; the
    # state is built as the ppo phase builds it, the frozen models sharded like the trained ones.
    learner = {"policy": policy_params, "value": scorer_params}
    host_state = loop.create_train_state(learner, tx, jax.random.key(0), extra={"kl_coef": np.float32(0.1)})
    host_state = host_state.replace(params=learner["policy"],
                                    extra={"kl_coef": host_state.extra["kl_coef"],
                                           "value": learner["value"],
                                           "reward_stats": {"mean": np.float32(0.1),
                                                            "std": np.float32(0.9)}})
    state, shardings = _place_state(host_state, mesh, policy_shardings,
                                    {"value": scorer_shardings})
    frozen = {"reference": jax.device_put(policy_params, policy_shardings),
              "reward": jax.device_put(scorer_params, scorer_shardings)}
    iteration = lambda s, b, f: ppo.ppo_iteration(s, b, f, models=models, settings=settings,
                                                  tx=tx)
    step = jax.jit(iteration, out_shardings=(shardings, replicated), donate_argnums=0,
                   compiler_options=fast)
    if label == "fsdp8":
      mu, nu = _adam_moments(state.opt_state)
      results["ppo"]["layout"] = (
          _layout(state.params, "params", "policy") + _layout(state.extra["value"], "params",
                                                              "value")
          + _layout(mu["policy"], "mu", "policy") + _layout(mu["value"], "mu", "value")
          + _layout(nu["policy"], "nu", "policy") + _layout(nu["value"], "nu", "value")
          + _layout(frozen["reference"], "frozen", "reference")
          + _layout(frozen["reward"], "frozen", "reward"))
    batch = sharding.shard_batch({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, mesh)
    state, metrics = step(state, batch, frozen)
    results["ppo"][label] = _metrics(metrics, ("loss", "policy_loss", "value_loss", "score",
                                               "kl", "response_length", "grad_norm"))
    keep("ppo", label, state.params, "policy")
    keep("ppo", label, state.extra["value"], "value")
    print(f"{label}: ppo done at {time.time() - start:.1f} s", flush=True)

  np.savez(out / "arrays.npz", **arrays)
  (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
  _worker(pathlib.Path(sys.argv[1]), set(sys.argv[2].split(",")))
