"""Tests for rlhf_jax.data.preferences: pair files, HH-RLHF dialogues, pairs built from records."""

import collections
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.data import preferences
from rlhf_jax.data.batching import format_prompt
from rlhf_jax.data.records import load_records
from rlhf_jax.errors import UserError

from conftest import SHARED_DATA as DATA  # noqa: E402 ($RLHF_JAX_DATA)
HH_SAMPLE = DATA / "preferences" / "hh_rlhf_helpful_base_sample_1k.jsonl"
HH_TEST_GZ = DATA / "preferences" / "hh_rlhf_helpful_base_test.jsonl.gz"
DOLLY_1K = DATA / "dolly" / "dolly_sample_1k.jsonl"
MARKER = "\n\nAssistant:"


def _need_data():
  if not HH_SAMPLE.exists():
    pytest.skip(f"shared test data not found at {DATA}")


def _raw_lines(path: Path) -> list[str]:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as f:
    return f.read().splitlines()


def test_hh_first_pair_split_by_hand():
  _need_data()
  pairs, _ = preferences.load_pairs(str(HH_SAMPLE), skip_bad_records=True)
  first = pairs[0]
  assert first["prompt"] == ("\n\nHuman: Do you know why turkeys became the official food of "
                             "thanksgiving?\n\nAssistant:")
  assert first["chosen"].startswith(" To be honest, I don’t know anything about that.")
  assert first["chosen"].endswith("those particular facts, sorry.")
  assert first["rejected"].startswith(" I know that the American Indians were the first")
  assert first["strategy"] == "human"
  # Line 2 is a three-turn dialogue: the prompt holds the earlier turns, and the split is at
  # the last Assistant turn, where the two dialogues diverge.
  second = pairs[1]
  assert second["prompt"].count(MARKER) == 3
  assert second["prompt"].endswith("What are some common species then?\n\nAssistant:")
  assert second["chosen"].startswith(" About 150 species of butterflies live in Oregon")
  assert second["rejected"].startswith(" Are you interested in just the common butterflies?")


def test_hh_pairs_rebuild_the_dialogues():
  _need_data()
  raw = [json.loads(line) for line in _raw_lines(HH_TEST_GZ)]
  pairs, stats = preferences.load_pairs(str(HH_TEST_GZ), skip_bad_records=True)
  assert stats["read"] == len(raw) == 2354
  assert stats["kept"] == len(pairs) == 2354 - sum(stats["skipped"].values())
  # SOURCES.md: 2 pairs of the full file have chosen == rejected.
  assert stats["skipped"]["identical"] == sum(r["chosen"] == r["rejected"] for r in raw) == 2
  dialogues = {(r["chosen"], r["rejected"]) for r in raw}
  for pair in pairs:
    assert pair["prompt"].endswith(MARKER)
    assert MARKER not in pair["chosen"]  # split at the *last* Assistant turn of chosen
    assert (pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]) in dialogues
    assert pair["chosen"].strip() and pair["rejected"].strip()


def test_hh_sample_special_cases_raise_with_file_line():
  _need_data()
  lines = _raw_lines(HH_SAMPLE)
  raw_722 = json.loads(lines[721])
  assert raw_722["chosen"] == raw_722["rejected"]  # the sample's chosen == rejected pair
  raw_568 = json.loads(lines[567])
  # Found by hand: chosen has a later Assistant turn than where the two dialogues diverge.
  prompt = raw_568["chosen"][:raw_568["chosen"].rfind(MARKER) + len(MARKER)]
  assert not raw_568["rejected"].startswith(prompt)
  with pytest.raises(UserError, match=re.escape(f"{HH_SAMPLE}:121:")):
    preferences.load_pairs(str(HH_SAMPLE))  # first bad line: an empty rejected answer


@pytest.mark.parametrize("line_index,reason", [(721, "identical"), (567, "prefix_mismatch"),
                                               (120, "empty_field")])
def test_hh_special_cases_per_option(tmp_path, line_index, reason):
  _need_data()
  lines = _raw_lines(HH_SAMPLE)
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join([lines[0], lines[line_index], lines[1]]) + "\n", encoding="utf-8")
  with pytest.raises(UserError, match=re.escape(f"{path}:2:")):
    preferences.load_pairs(str(path))
  pairs, stats = preferences.load_pairs(str(path), skip_bad_records=True)
  assert len(pairs) == 2
  assert stats["skipped"] == {reason: 1}


def test_explicit_pairs_and_bad_lines(tmp_path):
  good = {"prompt": "Q?", "chosen": "Yes.", "rejected": "No.", "strategy": "truncated"}
  bad_lines = {
      "missing_field": json.dumps({"prompt": "Q?", "chosen": "Yes."}),
      "identical": json.dumps({"prompt": "Q?", "chosen": "Same", "rejected": "Same"}),
      "empty_field": json.dumps({"prompt": "Q?", "chosen": "Yes.", "rejected": " "}),
      "invalid_json": '{"prompt": "Q?", "chosen": ',
      "wrong_type": json.dumps({"prompt": "Q?", "chosen": 1, "rejected": "No."}),
      "wrong_value": json.dumps(dict(good, strategy="made_up")),
  }
  for reason, line in bad_lines.items():
    path = tmp_path / f"{reason}.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:2:")):
      preferences.load_pairs(str(path))
    pairs, stats = preferences.load_pairs(str(path), skip_bad_records=True)
    assert pairs == [dict(good, location=f"{path}:1")]
    assert stats["skipped"] == {reason: 1}, reason
  path = tmp_path / "plain.jsonl"
  path.write_text(json.dumps({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}) + "\n")
  assert preferences.load_pairs(str(path))[0] == [
      {"prompt": "Q?", "chosen": "Yes.", "rejected": "No.", "strategy": "human",
       "location": f"{path}:1"}]


def test_a_file_without_pairs_is_an_error_naming_it(tmp_path):
  for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n \n")):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / name}: no preference pairs: "
                                                  "the file is empty")):
      preferences.load_pairs(str(tmp_path / name))
  with gzip.open(tmp_path / "empty.jsonl.gz", "wb"):
    pass
  with pytest.raises(UserError, match="empty.jsonl.gz: no preference pairs: the file is empty"):
    preferences.load_pairs(str(tmp_path / "empty.jsonl.gz"))
  path = tmp_path / "all_bad.jsonl"
  path.write_text(json.dumps({"prompt": "Q?", "chosen": "Same", "rejected": "Same"}) + "\n")
  with pytest.raises(UserError, match=re.escape(f"{path}: no preference pairs: all 1 lines were bad")):
    preferences.load_pairs(str(path), skip_bad_records=True)


def test_held_out_split_of_too_few_prompts_is_an_error_naming_the_file():
  pairs = [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No.", "strategy": "human",
            "location": f"pairs.jsonl:{i + 1}"} for i in range(3)]
  # 10% of 3 prompts rounds to none held out; 90% to none left for training.
  with pytest.raises(UserError, match=r"pairs\.jsonl: 3 distinct prompts leave the held-out part empty"):
    preferences.split_by_prompt(pairs, 0.1, seed=0)
  with pytest.raises(UserError, match=r"pairs\.jsonl: 3 distinct prompts leave the training part empty"):
    preferences.split_by_prompt(pairs, 0.9, seed=0)
  train, held_out = preferences.split_by_prompt(pairs, 0.5, seed=0)
  assert (len(train), len(held_out)) == (1, 2)


def _dolly_records():
  if not DOLLY_1K.exists():
    pytest.skip(f"shared test data not found at {DATA}")
  return load_records(str(DOLLY_1K))[0]


def test_build_pairs_shares_and_strategies():
  records = _dolly_records()
  shares = {"other_response": 0.4, "truncated": 0.35, "shuffled": 0.25}
  pairs, stats = preferences.build_pairs(records, strategies=shares, seed=7)
  # Every record gets one strategy, in the given proportions (1000 records: exact).
  assigned = collections.Counter(stats["by_strategy"]) + collections.Counter(stats["skipped"])
  assert assigned == {"other_response": 400, "truncated": 350, "shuffled": 250}
  assert stats["pairs"] == len(pairs) == 1000 - sum(stats["skipped"].values())
  # Only one-word responses cannot be shuffled; nothing else is skipped.
  assert set(stats["skipped"]) <= {"shuffled"}
  responses = {r["response"].strip() for r in records}
  for pair in pairs:
    record = records[pair["record_index"]]
    assert pair["prompt"] == format_prompt(record["instruction"], record["context"])
    assert pair["chosen"] == record["response"].strip()
    assert pair["rejected"] != pair["chosen"] and pair["rejected"]
    if pair["strategy"] == "truncated":
      assert pair["chosen"].startswith(pair["rejected"])
      assert len(pair["rejected"]) < len(pair["chosen"])
    elif pair["strategy"] == "shuffled":
      assert sorted(pair["rejected"].split()) == sorted(pair["chosen"].split())
      assert pair["rejected"].split() != pair["chosen"].split()
    else:
      assert pair["rejected"] in responses
  again, _ = preferences.build_pairs(records, strategies=shares, seed=7)
  other_seed, _ = preferences.build_pairs(records, strategies=shares, seed=8)
  assert again == pairs
  assert other_seed != pairs


def test_build_pairs_corrupted_regenerates_or_skips():
  records = [{"instruction": f"What is {i} + 1?", "context": "", "response": f"It is {i + 1}.",
              "category": "math"} for i in range(6)]
  calls = collections.Counter()

  def sometimes_right(record, rng):
    # Returns the correct answer on the first call per record, a wrong one afterwards;
    # record 0 is never corrupted at all.
    calls[record["instruction"]] += 1
    if record is records[0] or calls[record["instruction"]] == 1:
      return record["response"]
    return f"It is {int(rng.integers(100, 200))}."

  pairs, stats = preferences.build_pairs(records, strategies={"corrupted": 1.0}, seed=0,
                                         corrupt_fn=sometimes_right)
  assert stats["skipped"] == {"corrupted": 1}
  assert sorted(p["record_index"] for p in pairs) == [1, 2, 3, 4, 5]
  for pair in pairs:
    assert pair["rejected"] != pair["chosen"]
    assert pair["strategy"] == "corrupted"


def test_build_pairs_policy_samples_and_missing_inputs():
  records = [{"instruction": f"Q{i}", "context": "", "response": f"A{i}", "category": "c"}
             for i in range(4)]
  samples = ["A0", "something else", None, " another "]
  pairs, stats = preferences.build_pairs(records, strategies={"policy_sample": 1.0}, seed=0,
                                         policy_samples=samples)
  assert stats["skipped"] == {"policy_sample": 2}  # equal to the reference, and missing
  assert [(p["record_index"], p["rejected"]) for p in pairs] == [(1, "something else"),
                                                                 (3, "another")]
  with pytest.raises(UserError, match="corrupt_fn"):
    preferences.build_pairs(records, strategies={"corrupted": 0.5, "truncated": 0.5}, seed=0)
  with pytest.raises(UserError, match="policy"):
    preferences.build_pairs(records, strategies={"policy_sample": 1.0}, seed=0)
  with pytest.raises(UserError, match="unknown strategy"):
    preferences.build_pairs(records, strategies={"reversed": 1.0}, seed=0)
  # A zero share needs no input.
  pairs, _ = preferences.build_pairs(records, strategies={"corrupted": 0.0, "truncated": 1.0},
                                     seed=0)
  assert {p["strategy"] for p in pairs} == {"truncated"}


def test_no_pair_is_identical_within_the_window():
  # Long responses after a long context in a 96-token window: a truncation cut past the visible
  # part, or a policy sample that only differs beyond it, would give two identical sides.
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from rlhf_jax.data import batching  # pylint: disable=g-import-not-at-top
  tokenizer_dir = DATA / "gpt2_tokenizer"
  if not tokenizer_dir.exists():
    pytest.skip(f"shared test data not found at {DATA}")
  tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
  records = [{"instruction": f"Describe item {i}.", "context": " ".join(["background"] * 200),
              "response": " ".join(f"w{i}x{k}" for k in range(120)), "category": "c",
              "location": f"data.jsonl:{i + 1}"} for i in range(40)]
  settings = dict(max_length=96, min_response_tokens=32, too_long="truncate")
  window = batching.PairWindow(tokenizer, **settings)

  def build(window_or_none):
    return preferences.build_pairs(records, strategies={"truncated": 1.0}, seed=0,
                                   window=window_or_none)

  # Without the window, truncations past the visible part make identical pairs.
  blind, _ = build(None)
  _, blind_stats = batching.tokenize_pairs(tokenizer, blind, skip_bad_records=True, **settings)
  assert blind_stats["skipped"].get("identical_after_truncation", 0) > 0
  # With it, every truncation is cut inside the window: none is identical, none is skipped, and
  # tokenisation (no skipping) keeps them all.
  pairs, stats = build(window)
  assert stats["pairs"] == len(records) and not stats["skipped"]
  examples, token_stats = batching.tokenize_pairs(tokenizer, pairs, **settings)
  assert len(examples) == len(records) and token_stats["truncated_contexts"] == len(records)
  for example in examples:
    assert not np.array_equal(example["chosen_ids"], example["rejected_ids"])
    assert len(example["prompt_ids"]) + len(example["chosen_ids"]) <= 96
    assert len(example["chosen_ids"]) >= 32  # the response budget is kept

  # Policy samples equal to the reference within the window are redrawn, then replaced.
  same_start = [r["response"] + " but a different ending" for r in records]
  draws = {"count": 0}

  def sample_fn(batch, seed):
    draws["count"] += 1
    # Record i's draws: the reference (as text), the reference with a new ending beyond the
    # window, then (odd i only) a real negative.
    out = []
    for k, record in enumerate(batch):
      i, draw = records.index(record), k % 3
      out.append([record["response"], same_start[i],
                  "Something else." if i % 2 else same_start[i]][draw])
    return out

  pairs, stats = preferences.build_instruction_pairs(
      records, strategies={"policy_sample": 1.0}, copies=1, seed=0, sample_fn=sample_fn,
      policy_tries=3, window=window)
  assert draws["count"] == 1
  assert stats["policy_same_as_reference_resampled"] == 20 * 2 + 20 * 3
  assert stats["policy_unusable"] == stats["policy_replaced_by_other_response"] == 20
  assert stats["by_strategy"] == {"policy_sample": 20, "other_response": 20}
  examples, _ = batching.tokenize_pairs(tokenizer, pairs, **settings)  # raises on identical
  assert len(examples) == 40
