"""The main job: `python -m rlhf_jax.main` with no --phase runs init, sft, label, reward, ppo and eval
in one workdir, through the binary exactly as a user starts it (shrunk by config overrides so it takes
a minute or two), writes every file that CLI.md promises, and a second run skips every phase.

Not marked slow: it is the default run's one test of the phases chained through the binary, and of
the sft and ppo phases run for real (their own phase tests in test_sft.py and test_ppo.py are)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("init", "sft", "label", "reward", "ppo", "eval")
SYSTEMS = ("RR", "SFT", "RO", "RLHF")
SPLITS = ("test", "ood_1", "ood_2", "ood_3")

# The built-in default, smaller: a narrow model, few records, a few steps per phase.
SMALL = (
    "--config.data.num_train=96", "--config.data.num_eval=8",
    "--config.init.arch.hidden_size=32",
    "--config.sft.train.steps=6", "--config.sft.train.batch_size=8",
    "--config.sft.train.log_every=2", "--config.sft.train.eval_every=3",
    "--config.sft.eval_prompts=8", "--config.sft.eval_batch_size=8",
    "--config.label.train_prompts=16", "--config.label.heldout_prompts=8",
    "--config.label.chunk_size=8", "--config.label.batch_size=16",
    "--config.reward.train.steps=4", "--config.reward.train.batch_size=8",
    "--config.reward.train.log_every=2", "--config.reward.train.eval_every=2",
    "--config.reward.stats_samples=16", "--config.reward.eval_batch_size=8",
    "--config.reward.pairs.policy_batch_size=16",
    "--config.ppo.train.steps=2", "--config.ppo.train.batch_size=8",
    "--config.ppo.train.log_every=1", "--config.ppo.eval_prompts=8",
    "--config.eval.eval_prompts=8", "--config.eval.best_of_n=2", "--config.eval.eval_batch_size=8",
    "--config.eval.overoptimization_samples=4",
    "--config.eval.num_samples=4",
)


def run_main(workdir: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "rlhf_jax.main", f"--workdir={workdir}", *SMALL],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
  workdir = tmp_path_factory.mktemp("pipeline")
  first = run_main(workdir)
  second = run_main(workdir)
  return dict(workdir=workdir, first=first, second=second)


def test_every_phase_runs_in_order_and_writes_its_outputs(pipeline):
  workdir, out = pipeline["workdir"], pipeline["first"].stdout
  headers = [f"[{i}/{len(PHASES)}] {phase}" for i, phase in enumerate(PHASES, 1)]
  positions = [out.find(h) for h in headers]
  assert -1 not in positions and positions == sorted(positions), out[-3000:]
  for phase in ("init", "sft", "reward", "ppo"):
    assert any((workdir / phase / "checkpoint").iterdir()), phase
  # The reward model trained on the label phase's judgements of the SFT policy's samples.
  pairs = [json.loads(line) for line in (workdir / "label" / "pairs.jsonl").read_text().splitlines()]
  assert pairs and {row["labeler"] for row in pairs} == {"simulated"}
  assert "{'judged': " in out and "the ceiling for these labels" in out
  for phase in ("sft", "reward", "ppo"):
    rows = [json.loads(line) for line in (workdir / phase / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("step" in row for row in rows), phase
    assert list((workdir / phase).glob("events.out.tfevents.*")), phase
  assert f"Report: {workdir / 'eval' / 'eval.md'}" in out
  assert str(workdir / "eval" / "overoptimization.png") in out


def test_the_report_has_every_system_split_and_metric(pipeline):
  from PIL import Image
  eval_dir = pipeline["workdir"] / "eval"
  results = json.loads((eval_dir / "eval.json").read_text())
  assert set(SYSTEMS) <= set(results["systems"])
  for name in SYSTEMS:
    splits = results["systems"][name]["splits"]
    assert set(SPLITS) <= set(splits), name
    for split in SPLITS:
      for metric in ("bleu", "reward_mean", "reward_ci95", "exact_match", "kl_to_sft", "length",
                     "eos_fraction"):
        assert metric in splits[split], (name, split, metric)
      assert np.isfinite(splits[split]["reward_mean"]), (name, split)
      assert np.isfinite(splits[split]["gold_mean"]), (name, split)  # The teacher's judgement.
  assert results["systems"]["SFT"]["splits"]["test"]["kl_to_sft"] == pytest.approx(0, abs=1e-5)
  # The paired difference to SFT (same prompts): its mean is the difference of the means.
  for split in SPLITS:
    sft = results["systems"]["SFT"]["splits"][split]
    assert sft["reward_vs_sft"] is None
    for name in set(SYSTEMS) - {"SFT"}:
      other = results["systems"][name]["splits"][split]
      assert other["reward_vs_sft"] == pytest.approx(
          other["reward_mean"] - sft["reward_mean"], abs=1e-6), (name, split)
      low, high = other["reward_vs_sft_ci95"]
      assert low <= other["reward_vs_sft"] <= high, (name, split)
  table = (eval_dir / "eval.md").read_text()
  assert all(f"| {name} " in table or f"| {name}|" in table for name in SYSTEMS), table
  assert [p["n"] for p in results["overoptimization"] if p["method"] == "best_of_n"] == [1, 2, 4]
  assert any(p["method"] == "ppo" for p in results["overoptimization"])
  for png in ("reward_by_system.png", "ood_robustness.png", "overoptimization.png"):
    with Image.open(eval_dir / png) as image:
      assert image.format == "PNG" and min(image.size) >= 300, (png, image.size)
  samples = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines()]
  assert len(samples) == 4 and set(SYSTEMS) <= set(samples[0]["systems"])


def test_a_second_run_skips_every_finished_phase(pipeline):
  out = pipeline["second"].stdout
  for phase in ("sft", "label", "reward", "ppo"):
    assert f"{phase}: " in out and "holds a finished run" in out, out[-3000:]
  assert out.count("skipping") >= len(PHASES), out[-3000:]
  assert "eval: " in out and "step 1/" not in out
