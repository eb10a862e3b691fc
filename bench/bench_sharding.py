"""Sharding benchmarks: one SFT train step on 1 vs 8 (fake CPU) devices, and the per-device
parameter + Adam memory of GPT-Neo 1.3B / 2.7B under FSDP, in one run.

  python bench/bench_sharding.py             # both tables
  python bench/bench_sharding.py --steps=5   # fewer timed steps per mesh

Table 1 (measured): the SFT phase's train step (`loop.make_train_step(sft_loss)`, jitted with the
state donated and `out_shardings` = the state's shardings, params/moments laid out by
`sharding.param_shardings` + `loop.state_shardings`, batch placed by `sharding.shard_batch`, as
`sft.run` builds it; optimizer and batch from configs/sft.py) for the built-in tiny model
(configs/init.py: hidden 128, 4 layers, vocab 1024; batch 32 x 96 full rows of random tokens), on
each mesh of `--meshes`, same global batch, same initial weights. Fake devices need XLA_FLAGS before
JAX starts, so every mesh runs in a subprocess of this script (`--worker=data,fsdp,tensor`, with
`launch.local.fake_devices_env(devices)`), which reports JSON. Per mesh: compile time
(`lower().compile()`), the median (and min-max) wall time of `--steps` steps after one warm-up
step, bytes per device of params and optimizer state read from the arrays' addressable shards
(checked against `loop.memory_report`, which reads the shardings), and XLA's temporaries of one
step (`compiled.memory_analysis()`, via `loop.memory_report`). The fake devices share this
machine's cores, so more devices do not mean more compute: the time column shows the overhead of
the sharded program (collectives, smaller kernels), not a speed-up.

Table 2 (computed, nothing allocated): GPT-Neo 1.3B and 2.7B (Hugging Face shapes) parameter and
AdamW state bytes per device for fsdp = `--fsdp_sizes`, from the real shardings on
`jax.sharding.AbstractMesh`es (`jax.eval_shape` of `loop.create_train_state`, then
`sharding.param_shardings` / `loop.state_shardings` / `loop.memory_report`), float32 master
weights and moments as in configs/sft.py:gpt_neo_1p3b. Activations are not included.

The machine is shared (2 cores); `uptime` is printed before and after.
"""

import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # For `launch.local`.

from common import machine_description, uptime  # noqa: E402
from launch import local  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps per mesh (after one warm-up step).")
_MESHES = flags.DEFINE_string("meshes", "1,1,1;1,8,1;2,4,1",
                              "Meshes of table 1: data,fsdp,tensor separated by ';'.")
_FSDP_SIZES = flags.DEFINE_string("fsdp_sizes", "1,8,64", "fsdp sizes of table 2.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run table 1's step on this mesh "
                              "(data,fsdp,tensor) and write JSON to --worker_out.")
_WORKER_OUT = flags.DEFINE_string("worker_out", None, "Internal: the worker's JSON file.")

MiB, GiB = 2 ** 20, 2 ** 30
BATCH, LENGTH = 32, 96


def parse_mesh(text: str) -> tuple[int, int, int]:
  data, fsdp, tensor = (int(x) for x in text.split(","))
  return data, fsdp, tensor


def mesh_name(mesh: tuple[int, int, int]) -> str:
  data, fsdp, tensor = mesh
  if data * fsdp * tensor == 1:
    return "1 device"
  parts = [f"{axis}={size}" for axis, size in zip(("data", "fsdp", "tensor"), mesh) if size > 1]
  return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Table 1: the worker (one mesh, in its own process).


def tiny_config():
  from rlhf_jax.configs import init as init_config
  from rlhf_jax.models import gpt_neo
  arch = init_config.get_config().arch.to_dict()
  arch["attention_layers"] = tuple(arch["attention_layers"])
  return gpt_neo.GPTNeoConfig(vocab_size=init_config.get_config().vocab_size, bos_token_id=0,
                              eos_token_id=0, **arch)


def lm_batch(vocab: int, seed: int = 0) -> dict:
  """Full rows of random tokens, every next token a target (as bench_sft.py's step part)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (BATCH, LENGTH + 1)).astype(np.int32)
  return dict(input_ids=ids[:, :-1], targets=ids[:, 1:],
              segment_ids=np.ones((BATCH, LENGTH), np.int32),
              positions=np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy(),
              loss_mask=np.ones((BATCH, LENGTH), np.float32))


def shard_bytes_per_device(tree) -> int:
  """The most bytes any device holds of `tree`, summed over its addressable shards."""
  import jax
  per_device: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values())


def worker(mesh_spec: tuple[int, int, int], steps: int) -> dict:
  import math
  import jax
  from rlhf_jax import sharding
  from rlhf_jax.configs import sft as sft_config
  from rlhf_jax.models import gpt_neo
  from rlhf_jax.training import loop
  from rlhf_jax.training import optim
  from rlhf_jax.training import sft

  data, fsdp, tensor = mesh_spec
  devices = data * fsdp * tensor
  assert jax.device_count() == devices, (jax.device_count(), mesh_spec)
  config = sft_config.get_config()
  assert config.train.batch_size == BATCH and config.max_length == LENGTH
  mesh = sharding.make_mesh(data, fsdp, tensor)
  model_config = tiny_config()
  model = gpt_neo.build(model_config, config.model)

  # As sft.run: param shardings from the logical rules, the state's from loop.state_shardings.
  param_shapes = gpt_neo.param_shapes(model)
  param_shardings = sharding.param_shardings(gpt_neo.logical_axes(model), param_shapes, mesh)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  rng = jax.random.key(config.train.seed)
  abstract = loop.abstract_train_state(param_shapes, param_shardings, tx, rng, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  # The same initial weights on every mesh (seeded init, placed on the state's shardings).
  state = jax.jit(lambda: loop.create_train_state(gpt_neo.init_params(model, jax.random.key(1)),
                                                  tx, rng), out_shardings=shardings)()
  groups = math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES)
  step_fn = loop.make_train_step(lambda p, b, r: sft.sft_loss(model, p, b, r, groups=groups), tx,
                                 config.train.accum_steps)
  jitted = jax.jit(step_fn, out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
  batch = sharding.shard_batch(lm_batch(model_config.vocab_size), mesh)

  start = time.perf_counter()
  compiled = jitted.lower(abstract, loop._abstract(batch)).compile()
  compile_seconds = time.perf_counter() - start
  report = loop.memory_report(abstract, compiled=compiled)

  state, metrics = compiled(state, batch)  # Warm-up.
  first_loss = float(metrics["loss"])
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  params_bytes = shard_bytes_per_device(state.params)
  optimizer_bytes = shard_bytes_per_device(state.opt_state)
  return dict(
      mesh=list(mesh_spec), devices=devices, compile_seconds=compile_seconds, step_seconds=times,
      first_loss=first_loss, last_loss=float(metrics["loss"]),
      params_bytes=params_bytes, optimizer_bytes=optimizer_bytes,
      report_params=report["params"], report_optimizer=report["optimizer"],
      params_total=report["params_total"], temporaries=report["activations"],
      num_params=int(sum(x.size for x in jax.tree.leaves(state.params))))


def run_worker(mesh_spec: tuple[int, int, int], steps: int) -> dict:
  """Runs `worker` in a subprocess with as many fake CPU devices as the mesh has."""
  devices = mesh_spec[0] * mesh_spec[1] * mesh_spec[2]
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "result.json"
    command = [sys.executable, __file__, f"--worker={','.join(map(str, mesh_spec))}",
               f"--worker_out={out}", f"--steps={steps}"]
    result = subprocess.run(command, env=local.fake_devices_env(devices), cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
      raise RuntimeError(f"worker {mesh_spec} failed:\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-5000:]}")
    return json.loads(out.read_text())


def step_table(results: list[dict]) -> list[str]:
  tokens = BATCH * LENGTH
  base = statistics.median(results[0]["step_seconds"])
  lines = ["| mesh | devices | compile s | step s, median (min-max) | tok/s | vs 1 device | "
           "params MiB/device | Adam state MiB/device | XLA temporaries MiB/device | "
           "loss step 1 / last |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    median = statistics.median(r["step_seconds"])
    temps = f"{r['temporaries'] / MiB:.1f}" if r["temporaries"] >= 0 else "n/a"
    lines.append(
        f"| {mesh_name(tuple(r['mesh']))} | {r['devices']} | {r['compile_seconds']:.1f} | "
        f"{median * 1e3:.0f} ms ({min(r['step_seconds']) * 1e3:.0f}-"
        f"{max(r['step_seconds']) * 1e3:.0f}) | {tokens / median:,.0f} | {base / median:.2f}x | "
        f"{r['params_bytes'] / MiB:.2f} | {r['optimizer_bytes'] / MiB:.2f} | {temps} | "
        f"{r['first_loss']:.4f} / {r['last_loss']:.4f} |")
  r0 = results[0]
  lines.append(f"\nModel: built-in tiny GPT-Neo, {r0['num_params']:,} params "
               f"({r0['params_total'] / MiB:.2f} MiB float32 unsharded); global batch "
               f"{BATCH} x {LENGTH} = {tokens:,} tokens; {len(r0['step_seconds'])} timed steps "
               "after one warm-up step.")
  mismatched = [mesh_name(tuple(r["mesh"])) for r in results
                if (r["params_bytes"], r["optimizer_bytes"]) != (r["report_params"],
                                                               r["report_optimizer"])]
  lines.append("Per-device bytes from addressable shards "
               + ("match `loop.memory_report` on every mesh." if not mismatched else
                  f"DIFFER from `loop.memory_report` on: {', '.join(mismatched)}."))
  return lines


# ---------------------------------------------------------------------------------------------
# Table 2: GPT-Neo 1.3B / 2.7B on abstract meshes.


def large_configs() -> dict:
  from rlhf_jax.models import gpt_neo
  # Hugging Face's EleutherAI/gpt-neo-1.3B and -2.7B config.json (vocab 50257, 2048 positions,
  # window 256 are the dataclass defaults).
  return {
      "GPT-Neo 1.3B": gpt_neo.GPTNeoConfig(hidden_size=2048, num_layers=24, num_heads=16,
                                           attention_layers=("global", "local") * 12),
      "GPT-Neo 2.7B": gpt_neo.GPTNeoConfig(hidden_size=2560, num_layers=32, num_heads=20,
                                           attention_layers=("global", "local") * 16),
  }


def abstract_memory(model_config, fsdp: int) -> dict:
  import jax
  from jax.sharding import AbstractMesh, AxisType
  from rlhf_jax import sharding
  from rlhf_jax.configs import sft as sft_config
  from rlhf_jax.models import gpt_neo
  from rlhf_jax.training import loop
  from rlhf_jax.training import optim

  config = sft_config.get_config("gpt_neo_1p3b")
  mesh = AbstractMesh((1, fsdp, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  model = gpt_neo.build(model_config, config.model)
  shapes = gpt_neo.param_shapes(model)
  param_shardings = sharding.param_shardings(gpt_neo.logical_axes(model), shapes, mesh)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  abstract = loop.abstract_train_state(shapes, param_shardings, tx, jax.random.key(0), mesh)
  report = loop.memory_report(abstract)
  report["num_params"] = int(sum(x.size for x in jax.tree.leaves(shapes)))
  report["optimizer_total"] = sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.opt_state))
  return report


def memory_table(fsdp_sizes: list[int]) -> list[str]:
  lines = ["| model | parameters | layout | params GiB/device | Adam state GiB/device | "
           "total GiB/device | unsharded / per device |",
           "|---|---|---|---|---|---|---|"]
  for name, model_config in large_configs().items():
    reports = {n: abstract_memory(model_config, n) for n in fsdp_sizes}
    first = reports[fsdp_sizes[0]]
    total, opt_total = first["params_total"], first["optimizer_total"]
    rows = [("unsharded (totals)", total, opt_total)]
    rows += [(f"fsdp={n}", r["params"], r["optimizer"]) for n, r in reports.items()]
    for label, params, opt in rows:
      lines.append(f"| {name} | {first['num_params'] / 1e9:.3f} B | {label} | "
                   f"{params / GiB:.3f} | {opt / GiB:.3f} | **{(params + opt) / GiB:.3f}** | "
                   f"{(total + opt_total) / (params + opt):.2f}x |")
  lines.append("\nfloat32 master weights and AdamW moments (mu, nu) of the optimizer chain of "
               "configs/sft.py:gpt_neo_1p3b, from the shardings on AbstractMeshes (data=1, "
               "fsdp=N, tensor=1), nothing allocated; activations, gradients and XLA "
               "temporaries are not included.")
  return lines


# ---------------------------------------------------------------------------------------------


def main(argv):
  del argv
  if _WORKER.value:
    result = worker(parse_mesh(_WORKER.value), _STEPS.value)
    pathlib.Path(_WORKER_OUT.value).write_text(json.dumps(result))
    return
  print(machine_description(libraries=()))
  print("load before:", uptime(), flush=True)
  results = []
  for text in _MESHES.value.split(";"):
    mesh_spec = parse_mesh(text)
    start = time.perf_counter()
    results.append(run_worker(mesh_spec, _STEPS.value))
    r = results[-1]
    print(f"{mesh_name(mesh_spec)}: compile {r['compile_seconds']:.1f} s, step median "
          f"{statistics.median(r['step_seconds']) * 1e3:.0f} ms "
          f"({time.perf_counter() - start:.0f} s with start-up)", flush=True)
  report = step_table(results) + [""] + memory_table(
      [int(n) for n in _FSDP_SIZES.value.split(",")])
  print("load after:", uptime())
  print()
  print("\n".join(report))


if __name__ == "__main__":
  app.run(main)
