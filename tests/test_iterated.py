"""Iterated RLHF (configs/pipeline.py:iterated, issue #23 item 6) through the binary on a tiny
built-in model: two rounds, each labelling the current policy's samples with the simulated teacher,
training the reward model on every round's judgements so far, running PPO and evaluating; a
partial round resumes without redoing a finished one."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# The iterated pipeline, smaller: a narrow model, few records, a few steps per phase.
SMALL = (
    "--config=configs/pipeline.py:iterated", "--config.rounds=2",
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
    "--config.ppo.train.steps=2", "--config.ppo.train.batch_size=8",
    "--config.ppo.train.log_every=1", "--config.ppo.eval_prompts=8",
    "--config.ppo.ppo.normalize_samples=16", "--config.ppo.eval_batch_size=8",
    "--config.eval.eval_prompts=8", "--config.eval.best_of_n=2", "--config.eval.eval_batch_size=8",
    "--config.eval.num_samples=4",
)


def run_main(workdir: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.main", f"--workdir={workdir}", *SMALL, *extra],
      # Two rounds compile every phase twice: minutes on 2 idle cores, far more on a loaded machine.
      cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return result


def read_rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trainable(rows: list[dict]) -> int:
  """Training pairs the reward phase takes from judged rows (ties and empty sides left out)."""
  return sum(1 for r in rows if r["split"] == "train" and r["judgement"] != "tie"
             and r["chosen"].strip() and r["rejected"].strip())


@pytest.fixture(scope="module")
def iterated(tmp_path_factory) -> dict:
  workdir = tmp_path_factory.mktemp("iterated")
  first = run_main(workdir, "--config.ppo_init=last")
  return dict(workdir=workdir, first=first)


def test_each_round_labels_the_current_policy_and_trains_on_all_judgements(iterated):
  workdir, out = iterated["workdir"], iterated["first"].stdout
  for index in (1, 2):
    for phase in ("label", "reward", "ppo", "eval"):
      assert f"=== round {index}/2: {phase}" in out, out[-3000:]
    for phase in ("reward", "ppo"):
      assert any((workdir / f"round_{index}" / phase / "checkpoint").iterdir())
    assert (workdir / f"round_{index}" / "eval" / "eval.json").is_file()
  # Round 1 labels the SFT policy's samples, round 2 round 1's PPO policy's.
  assert f"label: sampling 4 responses per prompt from {workdir / 'sft'}" in out
  assert f"label: sampling 4 responses per prompt from {workdir / 'round_1' / 'ppo'}" in out
  for index in (1, 2):  # label.seed + R - 1, stored with the round's labels.
    settings = json.loads((workdir / f"round_{index}" / "label" / "config.json").read_text())
    assert settings["seed"] == index - 1
  round_1 = read_rows(workdir / "round_1" / "label" / "pairs.jsonl")
  round_2 = read_rows(workdir / "round_2" / "label" / "pairs.jsonl")
  assert round_1 and round_2
  assert {r["labeler"] for r in round_1 + round_2} == {"simulated"}
  # New samples of another policy (and another seed): round 2's pairs are not round 1's.
  assert {(r["chosen"], r["rejected"]) for r in round_2} != {
      (r["chosen"], r["rejected"]) for r in round_1}
  # The reward models: round 1's on round 1's judgements, round 2's on both rounds'.
  reward_lines = [line for line in out.splitlines() if "training pairs by strategy" in line]
  assert len(reward_lines) == 2, out[-3000:]
  assert f"{{'judged': {trainable(round_1)}}}" in reward_lines[0]
  assert f"{{'judged': {trainable(round_1) + trainable(round_2)}}}" in reward_lines[1]
  # ppo_init=last: round 2's PPO starts from round 1's policy, with KL to SFT.
  assert (f"ppo: the policy starts from {workdir / 'round_1' / 'ppo'} (KL reference: "
          f"{workdir / 'sft'})") in out
  assert out.count("ppo: the policy starts from") == 1


def test_rounds_json_has_the_gold_score_and_time_of_each_round(iterated):
  workdir, out = iterated["workdir"], iterated["first"].stdout
  summary = json.loads((workdir / "rounds.json").read_text())
  assert summary["ppo_init"] == "last"
  assert [r["round"] for r in summary["rounds"]] == [1, 2]
  for entry, policy in zip(summary["rounds"], (workdir / "sft", workdir / "round_1" / "ppo")):
    assert entry["policy_labelled"] == str(policy)
    assert entry["seconds"] > 0 and set(entry["phase_seconds"]) == {"label", "reward", "ppo",
                                                                    "eval"}
    report = json.loads((workdir / f"round_{entry['round']}" / "eval" / "eval.json").read_text())
    test = report["systems"]["RLHF"]["splits"]["test"]
    assert entry["splits"]["test"]["gold_mean"] == test["gold_mean"]
    assert entry["splits"]["test"]["gold_win_rate_vs_sft"] == test["gold_win_rate_vs_sft"]
    assert 0 <= test["gold_win_rate_vs_sft"] <= 1
    assert entry["splits"]["test"]["sft_gold_mean"] == (
        report["systems"]["SFT"]["splits"]["test"]["gold_mean"])
  first, second = summary["rounds"]
  assert second["judgements_so_far"] == first["judgements"] + second["judgements"]
  assert "round 1/2: RLHF gold mean" in out and "round 2/2: RLHF gold mean" in out
  assert "gold win-rate vs SFT" in out


def test_a_partial_round_resumes_without_redoing_finished_rounds(iterated):
  workdir = iterated["workdir"]
  # Round 2 as a kill during its PPO phase leaves it: label and reward finished, no PPO output
  # and no report.
  import shutil
  shutil.rmtree(workdir / "round_2" / "ppo")
  shutil.rmtree(workdir / "round_2" / "eval")
  summary = json.loads((workdir / "rounds.json").read_text())
  summary["rounds"] = summary["rounds"][:1]
  (workdir / "rounds.json").write_text(json.dumps(summary))
  stamp = lambda index: {p: p.stat().st_mtime_ns
                         for p in (workdir / f"round_{index}").rglob("*") if p.is_file()}
  round_1_files = stamp(1)
  round_2_label = (workdir / "round_2" / "label" / "pairs.jsonl").read_bytes()
  out = run_main(workdir, "--config.ppo_init=last").stdout
  assert "=== round 1/2: finished" in out and "=== round 1/2: label" not in out
  assert stamp(1) == round_1_files  # Nothing of round 1 rewritten.
  assert "label: " in out and "holds a finished run (summary.json); skipping" in out
  assert "reward: " in out and "holds a finished run; skipping" in out
  assert (workdir / "round_2" / "label" / "pairs.jsonl").read_bytes() == round_2_label
  assert any((workdir / "round_2" / "ppo" / "checkpoint").iterdir())
  assert (workdir / "round_2" / "eval" / "eval.json").is_file()
  resumed = json.loads((workdir / "rounds.json").read_text())["rounds"]
  assert [r["round"] for r in resumed] == [1, 2] and resumed[1]["resumed"]
  assert resumed[0] == summary["rounds"][0]
  # A third run finds both rounds finished and runs nothing.
  again = run_main(workdir, "--config.ppo_init=last").stdout
  assert "=== round 1/2: finished" in again and "=== round 2/2: finished" in again
  assert "=== round 2/2: ppo" not in again


def test_a_bad_ppo_init_is_one_line_naming_the_key(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.main", f"--workdir={tmp_path}",
       "--config=configs/pipeline.py:iterated", "--config.ppo_init=first"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "--config.ppo_init=first" in result.stderr and "Traceback" not in result.stderr
