"""Multi-host: two local processes x 4 fake CPU devices, joined by `jax.distributed.initialize` on
127.0.0.1 through `launch/local.py`, run the SFT phase of the binary as one 8-device job.

They must train exactly like one process with 8 devices (same losses, same parameters, within
float32 summation-order noise), write one set of logs (process 0 only) and one checkpoint that
Orbax assembles from both processes' shards, which this 1-device test process restores (a
different mesh and device count). A 1-device process then restores that checkpoint too: `export`
turns it into a Hugging Face model, and a run whose last checkpoint was lost resumes from the
multi-host step-2 checkpoint (params and Adam state) and ends where the uninterrupted 8-device run
ended. Those two are marked slow (export and resume have faster tests of their own: test_cli.py,
test_training_loop.py); the default run keeps the two-process run and its comparisons.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_cleanly

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # For `launch.local`.

from launch import local  # noqa: E402

STEPS = 4
# Tolerances: losses to float32 rounding of differently ordered sums; parameters to 1/1000 of one
# Adam update (lr) per step, as in test_sharding.py.
LR = 1e-2
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-3 * LR * STEPS
# Adam divides by sqrt(v) + eps: with eps 1e-8 a gradient element of ~1e-9, whose sign the
# summation order decides, moves its weight by a sizeable fraction of lr, so two equally correct
# runs differed by 0.13 lr at 2 of 8,192 MLP weights (at eps 1e-6 still 5e-3 lr at one). At 1e-5
# such an element moves by well under 1e-3 lr, and every weight with a real gradient still takes a
# normalised Adam step.
EPS = 1e-5


def sft_flags(init: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  """The SFT phase on a small slice of the built-in set, eval and checkpoints every 2 steps."""
  return ["--phase=sft", f"--workdir={workdir}", f"--config.init_checkpoint={init}",
          "--config.max_length=128", "--config.data.num_train=64", "--config.data.num_eval=16",
          f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
          "--config.train.log_every=1", "--config.train.eval_every=2",
          "--config.train.save_every=2", "--config.train.keep_checkpoints=3",
          f"--config.optim.lr={LR}", "--config.optim.warmup_steps=0", f"--config.optim.eps={EPS}",
          "--config.eval_prompts=0"]


def run(command: list[str], devices: int) -> subprocess.CompletedProcess:
  env = dict(local.fake_devices_env(devices), PYTHONUNBUFFERED="1")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return result


def binary(*args: str) -> list[str]:
  return [sys.executable, "-m", "rlhf_jax.main", *args]


def train_losses(workdir: pathlib.Path) -> dict[int, dict]:
  """{step: logged metrics} from `workdir/sft/metrics.jsonl`; fails on a step logged twice."""
  rows = [json.loads(line) for line in (workdir / "sft" / "metrics.jsonl").read_text().splitlines()]
  by_step: dict[int, dict] = {}
  for row in rows:
    for name, value in row.items():
      if name != "step":
        assert name not in by_step.get(row["step"], {}), f"{name} logged twice at {row['step']}"
        by_step.setdefault(row["step"], {})[name] = value
  return by_step


def final_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  """The latest SFT checkpoint's params, restored in this (1-device) process."""
  import jax
  from rlhf_jax import checkpoints
  params = checkpoints.load_model(workdir / "sft")["params"]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_hf_gpt_neo, tiny_tokenizer_dir) -> dict:
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
  # Width, heads, vocab (320) and positions divisible by 8: every parameter is split over fsdp=8.
  init = make_hf_gpt_neo(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=128, hidden_size=32, num_heads=4,
                         tokenizer_dir=tiny_tokenizer_dir).path
  root = tmp_path_factory.mktemp("multihost")
  multi, single = root / "multi", root / "single"
  launched = run([sys.executable, str(REPO / "launch" / "local.py"), "--num_processes=2",
                  "--devices_per_process=4", "--", *sft_flags(init, multi)], devices=4)
  one_process = run(binary(*sft_flags(init, single)), devices=8)
  return dict(init=init, root=root, multi=multi, single=single, launched=launched,
              one_process=one_process)


@pytest.fixture(scope="module")
def continued(runs) -> dict:
  """A copy of the multi-host run that lost its last checkpoint (as if preempted after step 2),
  continued by one process on one device."""
  multi, resumed = runs["multi"], runs["root"] / "resumed"
  shutil.copytree(multi, resumed)
  shutil.rmtree(resumed / "sft" / "checkpoint" / str(STEPS))
  (resumed / "sft" / "metrics.jsonl").write_text("".join(
      line + "\n" for line in (multi / "sft" / "metrics.jsonl").read_text().splitlines()
      if json.loads(line)["step"] <= 2))
  result = run(binary(*sft_flags(runs["init"], resumed)), devices=1)
  return dict(resumed=resumed, continued=result)


@pytest.fixture(scope="module")
def hf_dir(runs) -> pathlib.Path:
  """The multi-host checkpoint exported by a 1-device `--phase=export`."""
  out = runs["root"] / "hf"
  run(binary("--phase=export", f"--config.checkpoint={runs['multi'] / 'sft'}",
             f"--config.hf_out={out}", f"--workdir={runs['root'] / 'export'}"), devices=1)
  return out


def test_two_processes_train_like_one_process_with_eight_devices(runs):
  out = runs["launched"].stdout
  # Both processes ran, each saw 4 local devices of one 8-device job.
  assert "[0] " in out and "[1] " in out
  assert out.count("memory per device (8 devices)") >= 1, out[-3000:]
  assert "memory per device (8 devices)" in runs["one_process"].stdout
  multi, single = train_losses(runs["multi"]), train_losses(runs["single"])
  assert sorted(multi) == sorted(single) and {1, 2, 3, 4} <= set(multi)
  for step in sorted(single):
    assert set(multi[step]) == set(single[step]), step
    for name in ("loss", "eval/loss"):
      if name in single[step]:
        assert multi[step][name] == pytest.approx(single[step][name], rel=LOSS_RTOL), (step, name)
  assert single[STEPS]["loss"] < single[1]["loss"]  # It trained.
  # One writer: process 0 alone wrote the metrics and event files.
  assert len(list((runs["multi"] / "sft").glob("events.out.tfevents.*"))) == 1


def test_multihost_checkpoint_equals_the_single_process_one(runs):
  multi, single = final_params(runs["multi"]), final_params(runs["single"])
  assert multi.keys() == single.keys()
  for name in single:
    np.testing.assert_allclose(multi[name], single[name], rtol=0, atol=PARAM_ATOL, err_msg=name)


@pytest.mark.slow
def test_one_device_exports_the_multihost_checkpoint(runs, hf_dir):
  import transformers
  model = load_cleanly(transformers.AutoModelForCausalLM, hf_dir)
  params = final_params(runs["multi"])
  exported = model.state_dict()
  np.testing.assert_array_equal(exported["transformer.wte.weight"].numpy(),
                                params["['wte']['embedding']"])
  np.testing.assert_array_equal(exported["transformer.ln_f.weight"].numpy(),
                                params["['ln_f']['scale']"])
  assert (hf_dir / "tokenizer.json").exists() or (hf_dir / "vocab.json").exists()


@pytest.mark.slow
def test_one_device_resumes_the_multihost_run(runs, continued):
  assert "sft: resuming from step 2" in continued["continued"].stdout
  resumed, single = train_losses(continued["resumed"]), train_losses(runs["single"])
  assert sorted(resumed) == sorted(single)
  for step in (3, 4):
    assert resumed[step]["loss"] == pytest.approx(single[step]["loss"], rel=LOSS_RTOL), step
  params, reference = final_params(continued["resumed"]), final_params(runs["single"])
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], rtol=0, atol=PARAM_ATOL,
                               err_msg=name)
