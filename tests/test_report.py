"""Tests for rlhf_jax.evaluation.report: files, JSON round trip, PNG sizes, missing metrics."""

import json
import math

import matplotlib
from matplotlib import image as mpl_image
import numpy as np
import pytest

from rlhf_jax.errors import UserError
from rlhf_jax.evaluation import metrics
from rlhf_jax.evaluation import report

EXPECTED_FILES = {"eval.json", "eval.md", "reward_by_system.png", "ood_robustness.png",
                  "samples.jsonl"}
OOD_LEVELS = {0: "in-distribution", 1: "paraphrased prompts", 2: "larger numbers",
              3: "unseen task families"}
SYSTEMS = ("RR", "SFT", "RO", "RLHF")


def _split(rng, reward_shift, *, with_answers=True, with_kl=True, paired=True):
  """Metrics of one system on one split, built by the real `system_metrics`."""
  n = 40
  records = [{"answer": str(i % 3)} for i in range(n)]
  responses = [f"the answer is {rng.integers(0, 3)}" for _ in range(n)]
  references = [f"the answer is {i % 3}" for i in range(n)]
  return metrics.system_metrics(
      responses=responses, references=references, rewards=rng.normal(reward_shift, 1.0, n),
      kl=rng.normal(2.0, 0.5, n) if with_kl else None, lengths=rng.integers(3, 60, n),
      ended_with_eos=rng.random(n) < 0.8, records=records,
      check_fn=(lambda r, x: r["answer"] in x) if with_answers else None,
      sft_rewards=rng.normal(0.0, 1.0, n) if paired else None, num_resamples=200)


def _results(*, with_answers=True):
  rng = np.random.default_rng(0)
  systems = {}
  for index, name in enumerate(SYSTEMS):
    splits = {report.ood_split_name(level): _split(rng, index - level * 0.5,
                                                   with_answers=with_answers,
                                                   with_kl=name not in ("RR", "SFT"),
                                                   paired=name != "SFT")
              for level in OOD_LEVELS}
    curve = {metric: [splits[report.ood_split_name(level)][metric] for level in OOD_LEVELS]
             for metric in ("reward_mean", "exact_match", "bleu")}
    systems[name] = {"splits": splits, "ood_curve": curve}
  return {"systems": systems, "config": {"seed": 0, "num_prompts": 40},
          "bleu_signature": systems["RR"]["splits"]["test"]["bleu_signature"]}


def _samples(results):
  return [{"prompt": f"prompt {i}", "reference": f"reference {i}",
           "systems": {name: {"response": f"{name} says {i}", "reward": np.float32(i / 10)}
                       for name in results["systems"]}} for i in range(5)]


def _assert_png(path, width=1200, height=600):
  pixels = mpl_image.imread(path)
  assert pixels.shape[:2] == (height, width), path
  # Not a blank canvas: a plot has many distinct colours.
  assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20


def test_write_report_files_and_json_round_trip(tmp_path):
  results = _results()
  samples = _samples(results)
  backend_before = matplotlib.get_backend()
  paths = report.write_report(tmp_path / "eval", results, ood_levels=OOD_LEVELS, samples=samples)

  assert set(paths) == EXPECTED_FILES
  assert all(path.is_file() and path.parent == tmp_path / "eval" for path in paths.values())
  assert not list((tmp_path / "eval").glob("*.tmp"))
  assert matplotlib.get_backend() == backend_before  # No global backend switch.

  loaded = json.loads(paths["eval.json"].read_text())
  assert loaded == results  # Plain-JSON input round-trips exactly.
  for name in SYSTEMS:
    test_split = loaded["systems"][name]["splits"]["test"]
    assert set(test_split) == set(metrics.SYSTEM_METRIC_KEYS)
    assert len(loaded["systems"][name]["ood_curve"]["reward_mean"]) == len(OOD_LEVELS)

  lines = paths["samples.jsonl"].read_text().splitlines()
  assert len(lines) == len(samples)
  first = json.loads(lines[0])
  assert first["prompt"] == "prompt 0" and first["reference"] == "reference 0"
  assert set(first["systems"]) == set(SYSTEMS)
  assert json.loads(lines[3])["systems"]["RO"]["reward"] == pytest.approx(0.3)

  _assert_png(paths["reward_by_system.png"])
  _assert_png(paths["ood_robustness.png"])


def test_markdown_shows_every_system_ci_ood_levels_and_signature(tmp_path):
  results = _results()
  paths = report.write_report(tmp_path, results, ood_levels=OOD_LEVELS, samples=[])
  text = paths["eval.md"].read_text()
  rlhf = results["systems"]["RLHF"]["splits"]["test"]
  low, high = rlhf["reward_ci95"]
  assert f"| RLHF | {rlhf['bleu']:.2f} | {rlhf['reward_mean']:.3f} [{low:.3f}, {high:.3f}] |" in text
  assert f"{100 * rlhf['exact_match']:.1f}%" in text
  # The paired difference to SFT, signed, in the next column; SFT has none.
  low, high = rlhf["reward_vs_sft_ci95"]
  paired = f"| {rlhf['reward_vs_sft']:+.3f} [{low:+.3f}, {high:+.3f}] |"
  rlhf_row = next(line for line in text.splitlines() if line.startswith("| RLHF |"))
  assert paired in rlhf_row
  sft_row = next(line for line in text.splitlines() if line.startswith("| SFT |"))
  assert sft_row.split("|")[4].strip() == "n/a"
  for name in SYSTEMS:
    assert text.count(f"| {name} |") == len(OOD_LEVELS)  # One row per split table.
  for level, level_name in OOD_LEVELS.items():
    if level:
      assert f"Level {level}: {level_name} (`ood_{level}`)" in text
  assert results["bleu_signature"] in text
  # RR and SFT have no KL to SFT.
  rr_row = next(line for line in text.splitlines() if line.startswith("| RR |"))
  assert "n/a" in rr_row
  assert paths["samples.jsonl"].read_text() == ""


def test_report_with_missing_metrics(tmp_path):
  # Dolly-like: no verifiable answers; plus NaN, absent splits, curves and CIs.
  results = _results(with_answers=False)
  results["systems"]["RO"]["splits"]["test"]["reward_mean"] = float("nan")
  results["systems"]["RO"]["splits"]["test"]["reward_ci95"] = None
  del results["systems"]["RLHF"]["ood_curve"]
  del results["systems"]["RLHF"]["splits"]["ood_2"]
  results["systems"]["extra checkpoint | hf"] = {"splits": {}}
  results["systems"]["SFT"]["ood_curve"]["reward_mean"][1] = None
  paths = report.write_report(tmp_path, results, ood_levels=OOD_LEVELS, samples=_samples(results))

  loaded = json.loads(paths["eval.json"].read_text())
  assert loaded["systems"]["RO"]["splits"]["test"]["reward_mean"] is None  # NaN -> null.
  assert loaded["systems"]["SFT"]["splits"]["test"]["exact_match"] is None
  assert "extra checkpoint | hf" in loaded["systems"]
  text = paths["eval.md"].read_text()
  assert "| extra checkpoint \\| hf | n/a | n/a |" in text
  _assert_png(paths["reward_by_system.png"])
  _assert_png(paths["ood_robustness.png"])


def test_report_with_no_systems_data_at_all(tmp_path):
  results = {"systems": {"RR": {}, "SFT": {"splits": {"test": {"reward_mean": None}}}}}
  paths = report.write_report(tmp_path, results, ood_levels={}, samples=[])
  assert json.loads(paths["eval.json"].read_text()) == results
  assert "no signature recorded" in paths["eval.md"].read_text()
  _assert_png(paths["reward_by_system.png"])
  _assert_png(paths["ood_robustness.png"])


def test_report_with_no_systems(tmp_path):
  paths = report.write_report(tmp_path, {"systems": {}}, ood_levels=OOD_LEVELS, samples=[])
  assert json.loads(paths["eval.json"].read_text()) == {"systems": {}}
  for name in ("reward_by_system.png", "ood_robustness.png"):
    assert mpl_image.imread(paths[name]).shape[:2] == (600, 1200)


def test_to_json_safe_converts_numpy_nan_and_tuples():
  converted = report.to_json_safe({
      "a": np.float32(1.5), "b": np.int64(3), "c": np.array([1.0, np.nan, np.inf]),
      "d": (1, 2), "e": math.nan, "f": np.bool_(True), 4: None})
  assert converted == {"a": 1.5, "b": 3, "c": [1.0, None, None], "d": [1, 2], "e": None,
                       "f": True, "4": None}
  json.dumps(converted, allow_nan=False)


def test_out_dir_that_is_a_file_is_a_user_error(tmp_path):
  not_a_dir = tmp_path / "eval"
  not_a_dir.write_text("x")
  with pytest.raises(UserError, match=str(not_a_dir)):
    report.write_report(not_a_dir, {"systems": {}}, ood_levels={}, samples=[])


def test_gold_columns_and_gold_panel_when_the_teacher_scored(tmp_path):
  rng = np.random.default_rng(1)
  n = 40
  records = [{"answer": str(i % 3)} for i in range(n)]
  sft_responses = [f"the answer is {rng.integers(0, 3)}" for _ in range(n)]
  sft_gold = rng.normal(0.0, 1.0, n)
  common = {"references": sft_responses, "records": records,
            "check_fn": lambda r, x: r["answer"] in x, "num_resamples": 200}
  systems = {
      "SFT": {"splits": {"test": metrics.system_metrics(
          responses=sft_responses, rewards=rng.normal(size=n), gold=sft_gold, **common)}},
      "RLHF": {"splits": {"test": metrics.system_metrics(
          responses=[f"the answer is {i % 3}" for i in range(n)], rewards=rng.normal(size=n),
          gold=sft_gold + rng.normal(0.3, 0.5, n), sft_gold=sft_gold,
          sft_rewards=rng.normal(size=n), sft_responses=sft_responses, **common)}},
  }
  paths = report.write_report(tmp_path, {"systems": systems}, ood_levels={}, samples=[])
  text = paths["eval.md"].read_text()
  header = next(line for line in text.splitlines() if line.startswith("| system |"))
  assert "gold (95% CI)" in header and "gold win-rate vs SFT (95% CI)" in header
  rlhf = systems["RLHF"]["splits"]["test"]
  rlhf_row = next(line for line in text.splitlines() if line.startswith("| RLHF |"))
  low, high = rlhf["gold_win_rate_vs_sft_ci95"]
  assert (f"| {100 * rlhf['gold_win_rate_vs_sft']:.1f}% [{100 * low:.1f}%, {100 * high:.1f}%] |"
          in rlhf_row)
  low, high = rlhf["gold_ci95"]
  assert f"| {rlhf['gold_mean']:.3f} [{low:.3f}, {high:.3f}] |" in rlhf_row
  assert f"| {100 * rlhf['exact_match_vs_sft']:+.1f} [" in rlhf_row
  sft_row = next(line for line in text.splitlines() if line.startswith("| SFT |"))
  assert sft_row.split("|")[6].strip() == "n/a"  # SFT has no win-rate against itself.
  _assert_png(paths["reward_by_system.png"])
  # Without gold scores the table has no gold columns (as on Dolly).
  plain = report.write_report(tmp_path / "plain", _results(), ood_levels=OOD_LEVELS, samples=[])
  assert "gold" not in plain["eval.md"].read_text()
