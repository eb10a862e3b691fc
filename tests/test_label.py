"""The label phase (issue #21) and what reads its pairs: pairs.jsonl in CLI.md's rows judged by the
simulated teacher, resuming after an interruption without duplicating or losing a pair, judged
pairs from a file (a bad line names FILE:LINE, through the binary too), the reward phase training
on the label phase's file as it is (and with a share of built negatives), and eval's gold
metrics and over-optimisation points on the built-in data. A tiny built-in model (the init
phase's, 32 wide) stands in for the SFT policy, so everything runs in a few minutes on CPU."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import main
from rlhf_jax import phases
from rlhf_jax.configs import eval as eval_config
from rlhf_jax.configs import init as init_config
from rlhf_jax.configs import label as label_config
from rlhf_jax.configs import reward as reward_config
from rlhf_jax.data import batching
from rlhf_jax.data import label_server
from rlhf_jax.data import labeling
from rlhf_jax.data import preferences
from rlhf_jax.data import records
from rlhf_jax.data import teacher
from rlhf_jax.errors import UserError
from rlhf_jax.phases import eval as eval_phase
from rlhf_jax.phases import label as label_phase

REPO = pathlib.Path(__file__).resolve().parents[1]
ROW_FIELDS = {"pair_id", "split", "prompt", "instruction", "context", "chosen", "rejected",
              "labeler", "annotator", "judgement"}


def data_config(config):
  config.data.num_train, config.data.num_eval = 96, 8
  return config


def small_label_config():
  """12 training and 6 held-out prompts x 3 samples, chunks of 4 prompts (5 chunks); a teacher
  without noise (a near-zero temperature, no flips), so every label follows the gold order."""
  config = data_config(label_config.get_config())
  config.update(train_prompts=12, heldout_prompts=6, samples_per_prompt=3, chunk_size=4,
                batch_size=12)
  config.teacher.update(temperature=1e-3, flip_rate=0.0)
  return config


@pytest.fixture(scope="module")
def policy_workdir(tmp_path_factory) -> pathlib.Path:
  """A workdir whose `sft` is a tiny random built-in model (the init phase's, as sft's input)."""
  workdir = tmp_path_factory.mktemp("label_work")
  init = data_config(init_config.get_config())
  init.vocab_size = 512
  init.arch.update(hidden_size=32, num_layers=2, attention_layers=("global", "local"))
  main.run_phase("init", init, workdir)
  (workdir / "sft").symlink_to(workdir / "init", target_is_directory=True)
  return workdir


@pytest.fixture(scope="module")
def labelled(policy_workdir):
  """The label phase run straight through in `policy_workdir` (WORKDIR/label)."""
  main.run_phase("label", small_label_config(), policy_workdir)
  return policy_workdir


def read_rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_are_written_in_the_cli_rows_and_judged_by_the_teacher(labelled, capsys):
  rows = read_rows(labelled / "label" / "pairs.jsonl")
  splits = records.load_splits(small_label_config().data)
  questions = {batching.record_prompt(r): r for r in splits["train"][:12] + splits["validation"][:6]}
  held_out_prompts = {batching.record_prompt(r) for r in splits["validation"][:6]}
  assert rows and all(ROW_FIELDS <= set(row) for row in rows)
  assert len({row["pair_id"] for row in rows}) == len(rows)
  assert {row["split"] for row in rows} == {"train", "validation"}
  for row in rows:
    assert (row["labeler"], row["annotator"]) == ("simulated", "teacher")
    assert row["judgement"] in ("a", "b") and row["chosen"] != row["rejected"]
    # Held-out pairs come from held-out prompts only.
    assert (row["prompt"] in held_out_prompts) == (row["split"] == "validation"), row["pair_id"]
    # A noiseless teacher never prefers the response with the lower gold score.
    question = questions[row["prompt"]]
    assert (teacher.gold_score(question, row["chosen"])
            >= teacher.gold_score(question, row["rejected"])), row
  # At most K(K-1)/2 = 3 pairs per prompt (identical samples form none).
  assert len(rows) <= 3 * 18
  summary = json.loads((labelled / "label" / "summary.json").read_text())
  assert summary["rows"] == len(rows)
  assert sum(c["pairs"] for c in summary["per_split"].values()) == len(rows)
  for split in ("train", "validation"):
    agreement = summary["gold_agreement"][split]
    assert agreement["unmatched"] == 0
    if agreement["pairs"]:
      assert agreement["agreement"] == 1.0  # No noise: the labels are the gold order.
  # The training pairs read back as the reward phase reads them.
  train, held_out, stats = labeling.load_judged_pairs(str(labelled / "label" / "pairs.jsonl"))
  assert len(train) + len(held_out) == len(rows) and held_out

  # A finished run is skipped and leaves the file as it was.
  before = (labelled / "label" / "pairs.jsonl").read_bytes()
  capsys.readouterr()
  main.run_phase("label", small_label_config(), labelled)
  assert "holds a finished run" in capsys.readouterr().out
  assert (labelled / "label" / "pairs.jsonl").read_bytes() == before


class Interrupted(Exception):
  pass


def test_an_interrupted_run_resumes_without_duplicating_or_losing_pairs(labelled, tmp_path,
                                                                        monkeypatch):
  workdir = tmp_path / "resumed"
  workdir.mkdir()
  (workdir / "sft").symlink_to(labelled / "init", target_is_directory=True)
  real = label_phase.decode.generate_responses
  calls = []

  def dies_in_the_third_chunk(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise Interrupted  # As if the process were killed while sampling chunk 3.
    return real(*args, **kwargs)

  monkeypatch.setattr(label_phase.decode, "generate_responses", dies_in_the_third_chunk)
  with pytest.raises(Interrupted):
    main.run_phase("label", small_label_config(), workdir)
  partial = read_rows(workdir / "label" / "pairs.jsonl")
  assert {row["chunk"] for row in partial} == {0, 1}
  assert not (workdir / "label" / "summary.json").exists()  # Not finished.

  monkeypatch.setattr(label_phase.decode, "generate_responses", real)
  main.run_phase("label", small_label_config(), workdir)
  resumed = (workdir / "label" / "pairs.jsonl").read_bytes()
  # Exactly the rows of the uninterrupted run, each once, in order.
  assert resumed == (labelled / "label" / "pairs.jsonl").read_bytes()
  rows = read_rows(workdir / "label" / "pairs.jsonl")
  assert len({row["pair_id"] for row in rows}) == len(rows)
  assert json.loads((workdir / "label" / "summary.json").read_text())["resumed_at_chunk"] == 2


def test_the_web_labeller_shows_the_pairs_the_teacher_judged_and_reports_agreement(
    labelled, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "web"
  workdir.mkdir()
  (workdir / "sft").symlink_to(labelled / "init", target_is_directory=True)
  served = []

  def fake_serve(pairs, out_path, **kwargs):  # One person judges the first two pairs: 'a'.
    served.append(pairs)
    with open(out_path, "a") as f:
      for pair in pairs[:2]:
        row = label_server.judged_row(pair, annotator="ann", choice="a", note="", seconds=1.0)
        f.write(json.dumps(row) + "\n")

  monkeypatch.setattr(label_phase.label_server, "serve", fake_serve)
  config = small_label_config()
  config.labeler = "web"
  main.run_phase("label", config, workdir)
  # Sampled exactly as the simulated labeller samples: the same pairs with the same sides.
  simulated = read_rows(labelled / "label" / "pairs.jsonl")
  assert [(p["pair_id"], p["response_a"], p["response_b"]) for p in served[0]] == [
      (row["pair_id"], *labeling.shown_sides(row)) for row in simulated]
  out = capsys.readouterr().out
  assert "2 judgements" in out and "| ann | 2 |" in out
  # A restart shows the same pairs without sampling again (kept in pairs_to_judge.jsonl).
  monkeypatch.setattr(label_phase.decode, "generate_responses", None)
  main.run_phase("label", config, workdir)
  assert served[1] == served[0]
  assert len(read_rows(workdir / "label" / "pairs.jsonl")) == 4  # Two sessions of two.


def write_lines(path: pathlib.Path, lines: list) -> pathlib.Path:
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines))
  return path


def test_judged_pairs_from_a_file_are_validated_and_normalised(tmp_path):
  good = [
      {"prompt": "### Instruction:\nWhat is 2 plus 2?\n\n### Response:\n", "chosen": "4.",
       "rejected": "5.", "split": "validation"},
      {"instruction": "What is 3 plus 3?", "chosen": "6.", "rejected": "7.", "judgement": "b",
       "annotator": "ann"},
      {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello.", "judgement": "tie",
       "pair_id": "p3"},
  ]
  out = tmp_path / "pairs.jsonl"
  label_phase.import_labels(str(write_lines(tmp_path / "labels.jsonl", good)), out,
                            heldout_fraction=0.5, seed=0)
  rows = read_rows(out)
  assert [row["split"] for row in rows] == ["validation", "train", "train"]
  assert rows[1]["prompt"] == batching.format_prompt("What is 3 plus 3?", "")
  assert [row["judgement"] for row in rows] == ["a", "b", "tie"]
  assert [row["annotator"] for row in rows] == ["file", "ann", "file"]
  assert rows[2]["pair_id"] == "p3" and all(row["labeler"] == "file" for row in rows)
  train, held_out, stats = labeling.load_judged_pairs(str(out))  # The reward phase's reader.
  assert (len(train), len(held_out), stats["ties"]) == (1, 1, {"train": 1})

  for bad, message in (
      ("{not json", "tmp"), ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
      ({"prompt": "p", "chosen": "a", "rejected": "b", "judgement": "A"}, "judgement"),
      ({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical"),
      ({"prompt": "p", "chosen": "a", "rejected": "b", "split": "test"}, "split"),
      ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string")):
    path = write_lines(tmp_path / "bad.jsonl", good[:2] + [bad])
    with pytest.raises(UserError, match=rf"{path}:3: "):
      label_phase.import_labels(str(path), tmp_path / "out.jsonl", heldout_fraction=0.5, seed=0)
  path = write_lines(tmp_path / "twice.jsonl", good[:2] + [good[1]])
  with pytest.raises(UserError, match=rf"{path}:3: .*repeats line 2"):
    label_phase.import_labels(str(path), tmp_path / "out.jsonl", heldout_fraction=0.5, seed=0)


def test_without_splits_a_share_of_prompts_is_held_out(tmp_path):
  lines = [{"prompt": f"q{i // 2}", "chosen": f"good {i}", "rejected": f"bad {i}"}
           for i in range(20)]
  out = tmp_path / "pairs.jsonl"
  label_phase.import_labels(str(write_lines(tmp_path / "labels.jsonl", lines)), out,
                            heldout_fraction=0.2, seed=0)
  rows = read_rows(out)
  held_out = {row["prompt"] for row in rows if row["split"] == "validation"}
  assert len(held_out) == 2  # 20% of the 10 prompts, whole prompts.
  assert not held_out & {row["prompt"] for row in rows if row["split"] == "train"}


def test_a_bad_labels_file_is_one_line_naming_file_and_line_through_the_binary(tmp_path):
  path = write_lines(tmp_path / "labels.jsonl", [
      {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.main", "--phase=label", "--config.labeler=file",
       f"--config.labels={path}", f"--workdir={tmp_path / 'w'}", "--config.data.num_train=96"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {path}:2: missing field 'rejected'"], result.stderr


def small_reward_config():
  config = data_config(reward_config.get_config())
  config.train.update(steps=4, batch_size=8, log_every=2, eval_every=2, save_every=2)
  config.stats_samples, config.eval_batch_size = 16, 8
  return config


@pytest.fixture(scope="module")
def rewarded(labelled):
  main.run_phase("reward", small_reward_config(), labelled)
  return labelled


def test_the_reward_phase_trains_on_the_label_phases_pairs_as_they_are(rewarded):
  metrics = read_rows(rewarded / "reward" / "metrics.jsonl")
  final = [m for m in metrics if "eval/gold_accuracy" in m]
  assert any("eval/accuracy/judged" in m for m in metrics)
  # Reported next to each other: the model against the gold order, and the labels' ceiling
  # (the noiseless teacher's labels follow the gold order on every ordered pair).
  assert len(final) == 1 and 0.0 <= final[0]["eval/gold_accuracy"] <= 1.0
  assert final[0]["eval/labeler_gold_agreement"] == 1.0


# Slow: one more reward phase run; the default run has the phase on the label phase's pairs (above)
# and the reward phase's reader on the page's own rows, ties and 'both bad' (test_label_server.py).
@pytest.mark.slow
def test_the_reward_phase_trains_on_the_pages_pairs_jsonl_as_written(labelled, tmp_path, capsys):
  """The labelling page's own pairs.jsonl (judged through its HTTP API, with ties, notes and
  'both bad' rows) is the reward phase's input with no conversion (issue #23)."""
  pytest.importorskip("starlette", reason="the label extra is not installed")
  pytest.importorskip("httpx", reason="httpx (Starlette's TestClient) is not installed")
  from starlette.testclient import TestClient
  workdir = tmp_path / "page"
  (workdir / "label").mkdir(parents=True)
  (workdir / "sft").symlink_to(labelled / "init", target_is_directory=True)
  shown = [dict(pair_id=row["pair_id"], split=row["split"], prompt=row["prompt"],
                instruction=row["instruction"], context=row["context"],
                **dict(zip(("response_a", "response_b"), labeling.shown_sides(row))))
           for row in read_rows(labelled / "label" / "pairs.jsonl")]
  out = workdir / "label" / "pairs.jsonl"
  choices = ["a", "b", "a", "tie", "b", "both_bad"]
  judged = []
  app = label_server.create_app(shown, out, double_share=0.0)
  with TestClient(app, base_url="http://127.0.0.1") as client:
    while True:
      view = client.post("/api/next", json={"annotator": "ann"}).json()
      if view["pair"] is None:
        break
      choice = choices[len(judged) % len(choices)]
      response = client.post("/api/judge", json={"annotator": "ann", "choice": choice,
                                                 "pair_id": view["pair"]["pair_id"],
                                                 "note": "n"})
      assert response.status_code == 200, response.text
      judged.append(choice)
  assert len(judged) == len(shown)
  rows = read_rows(out)
  decided = sum(1 for r in rows if r["split"] == "train" and r["judgement"] != "tie"
                and r["chosen"].strip() and r["rejected"].strip())
  main.run_phase("reward", small_reward_config(), workdir)
  printed = capsys.readouterr().out
  assert f"training pairs by strategy {{'judged': {decided}}}" in printed, printed[-2000:]
  assert any("eval/accuracy/judged" in m for m in read_rows(workdir / "reward" / "metrics.jsonl"))


def test_synthetic_negatives_make_up_the_configured_share(labelled):
  config = small_reward_config()
  config.pairs.synthetic_share = 0.5
  config.pairs.strategies = dict(corrupted=0.5, truncated=0.5, other_response=0.0,
                                 shuffled=0.0, policy_sample=0.0)
  path = str(labelled / "label" / "pairs.jsonl")
  assert preferences.pairs_source("auto", labelled) == path
  assert preferences.is_judged_pairs_file(path)
  judged, held_out, _ = labeling.load_judged_pairs(path)
  train, eval_pairs, stats = preferences.load_judged(config, path, None, None)
  strategies = [pair["strategy"] for pair in train]
  assert strategies.count("judged") == len(judged) == len(train) // 2
  assert set(strategies) == {"judged", "corrupted", "truncated"}
  assert all(pair["strategy"] == "judged" for pair in eval_pairs)
  assert stats["train"]["by_strategy"]["judged"] == len(judged)
  with pytest.raises(UserError, match="synthetic_share"):
    config.pairs.synthetic_share = 1.0
    preferences.load_judged(config, path, None, None)


def test_eval_reports_gold_and_overoptimization_on_the_builtin_data(rewarded):
  workdir = rewarded
  (workdir / "ppo").mkdir()  # PPO's held-out evaluations as its metrics.jsonl logs them.
  write_lines(workdir / "ppo" / "metrics.jsonl", [
      {"step": 0, "eval/kl": 0.0, "eval/score": 0.1, "eval/exact_match": 0.0},
      {"step": 1, "loss": 1.0},
      {"step": 2, "eval/kl": 0.5, "eval/score": 0.4, "eval/gold_mean": -1.0}])
  config = data_config(eval_config.get_config())
  config.update(ppo_checkpoint=str(workdir / "init"), ppo_gold_checkpoint=str(workdir / "init"),
                eval_prompts=6, best_of_n=2, overoptimization_samples=4, eval_batch_size=8,
                num_samples=2)
  main.run_phase("eval", config, workdir)
  results = json.loads((workdir / "eval" / "eval.json").read_text())
  assert {"RR", "SFT", "RO", "RLHF", "RLHF-gold"} <= set(results["systems"])
  for name in ("RR", "RO", "RLHF", "RLHF-gold"):
    for split, metrics in results["systems"][name]["splits"].items():
      for key in ("gold_mean", "gold_ci95", "gold_win_rate_vs_sft", "gold_win_rate_vs_sft_ci95",
                  "exact_match_vs_sft_ci95"):
        assert metrics[key] is not None, (name, split, key)
      low, high = metrics["gold_win_rate_vs_sft_ci95"]
      assert low <= metrics["gold_win_rate_vs_sft"] <= high
      agreement = metrics["reward_model_gold_agreement_vs_sft"]  # None: no gold-ordered pair.
      assert agreement is None or 0.0 <= agreement <= 1.0, (name, split)
      # Against all of RO's SFT samples of each prompt: the same rule, with its own CI.
      low, high = metrics["gold_win_rate_vs_sft_samples_ci95"]
      assert low <= metrics["gold_win_rate_vs_sft_samples"] <= high, (name, split)
  sft = results["systems"]["SFT"]["splits"]["test"]
  assert sft["gold_mean"] is not None and sft["gold_win_rate_vs_sft"] is None
  assert sft["reward_model_gold_agreement_vs_sft"] is None
  assert 0.0 <= sft["gold_win_rate_vs_sft_samples"] <= 1.0  # SFT's one draw against its samples.
  points = results["overoptimization"]
  best_of_n = [p for p in points if p["method"] == "best_of_n"]
  assert [p["n"] for p in best_of_n] == [1, 2, 4]
  assert best_of_n[0]["kl"] == 0.0 and best_of_n[2]["kl"] == pytest.approx(np.log(4) - 0.75)
  # The proxy's expected best-of-n score can only grow with n.
  rewards = [p["reward_mean"] for p in best_of_n]
  assert rewards == sorted(rewards)
  # Against SFT's samples themselves best-of-1 wins exactly half, and the teacher's pick wins at
  # least as often as the proxy's.
  for point in best_of_n:
    assert 0.0 <= point["gold_win_rate_vs_sft"] <= point["gold_picked_win_rate_vs_sft"] <= 1.0
  assert best_of_n[0]["gold_win_rate_vs_sft"] == pytest.approx(0.5)
  assert best_of_n[0]["gold_picked_win_rate_vs_sft"] == pytest.approx(0.5)
  ppo = [p for p in points if p["method"] == "ppo"]
  assert [(p["step"], p["kl"], p["reward_mean"], p["gold_mean"]) for p in ppo] == [
      (0, 0.0, 0.1, None), (2, 0.5, 0.4, -1.0)]
  assert (workdir / "eval" / "overoptimization.png").is_file()
  samples = read_rows(workdir / "eval" / "samples.jsonl")
  assert "gold" in samples[0]["systems"]["RLHF-gold"]


def test_sampling_keys_depend_on_the_split_and_system_only():
  keys = {(split, system): jax.random.key_data(eval_phase.sampling_key(3, split, system))
          for split in ("test", "ood_1") for system in ("SFT", "RLHF", "RO")}
  assert len({tuple(np.asarray(k).tolist()) for k in keys.values()}) == len(keys)  # All differ.
  np.testing.assert_array_equal(jax.random.key_data(eval_phase.sampling_key(3, "test", "RLHF")),
                                keys[("test", "RLHF")])  # And are the same every time.


# Slow: two more eval runs; the default run has the key rule above and the eval phase itself.
@pytest.mark.slow
def test_adding_a_system_changes_no_other_systems_answers(rewarded, tmp_path):
  """Each system samples with a key of its own (seed, split, name): evaluated with and without
  RLHF-gold, every other system gives the same answers and figures on every split."""
  config = data_config(eval_config.get_config())
  config.update(ppo_checkpoint=str(rewarded / "init"), eval_prompts=6, best_of_n=2,
                overoptimization_samples=4, eval_batch_size=8, num_samples=2)
  results, samples = {}, {}
  for name, gold in (("with_gold", str(rewarded / "init")), ("without_gold", "")):
    config.update(ppo_gold_checkpoint=gold, name=f"eval_{name}")
    main.run_phase("eval", config, rewarded)
    results[name] = json.loads((rewarded / f"eval_{name}" / "eval.json").read_text())["systems"]
    samples[name] = [row["systems"]["RLHF"] for row in
                     read_rows(rewarded / f"eval_{name}" / "samples.jsonl")]
  assert "RLHF-gold" in results["with_gold"] and "RLHF-gold" not in results["without_gold"]
  for name in ("RR", "SFT", "RO", "RLHF"):
    assert results["with_gold"][name]["splits"] == results["without_gold"][name]["splits"], name
  assert samples["with_gold"] == samples["without_gold"]


def test_a_phase_writes_under_its_configs_name(tmp_path):
  config = label_config.get_config()
  assert phases.output_dir(config, tmp_path, "label") == tmp_path / "label"
  config.name = "label_round2"
  assert phases.output_dir(config, tmp_path, "label") == tmp_path / "label_round2"


def test_pairs_tied_in_gold_are_coin_flips_or_ties_as_configured():
  question = {"instruction": "What is 3 minus 1?", "context": "", "answer": "2",
              "task": "subtract"}
  right, wrong, other_wrong = "3 minus 1 equals 2.", "3 minus 1 equals 5.", "3 minus 1 equals 7."
  gold = label_phase.GoldScores()
  assert gold([question] * 2, [wrong, other_wrong])[0] == gold([question], [other_wrong])[0]
  questions, a, b = [question] * 3, [right, wrong, other_wrong], [wrong, other_wrong, wrong]
  noiseless = dict(temperature=1e-3, flip_rate=0.0)
  ties = label_phase.simulated_judge(gold, gold_ties="tie", **noiseless)
  assert ties(questions, a, b, np.random.default_rng(0)) == ["a", "tie", "tie"]
  flips = label_phase.simulated_judge(gold, gold_ties="label", **noiseless)
  draws = [flips(questions, a, b, np.random.default_rng(seed)) for seed in range(40)]
  assert all(d[0] == "a" for d in draws)
  assert {d[1] for d in draws} == {"a", "b"}  # A coin flip between equal gold scores.
  with pytest.raises(UserError, match="gold_ties"):
    label_phase.simulated_judge(gold, gold_ties="drop", **noiseless)
