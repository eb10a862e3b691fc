"""Tests for rlhf_jax.data.labeling with a fake policy and a fake judge (no model needed)."""

import json

import numpy as np
import pytest

from rlhf_jax.data import labeling
from rlhf_jax.data.batching import PAIR_STRATEGIES, format_prompt
from rlhf_jax.errors import UserError

K = 4
CHUNK_SIZE = 3


def _records(split, count):
  return [{"instruction": f"{split} question {i}?", "context": "" if i % 2 else f"ctx {i}",
           "answer": str(i)} for i in range(count)]


RECORDS = {"train": _records("train", 11), "validation": _records("validation", 5)}  # 4 + 2 chunks


def fake_sample_fn(records, seed):
  """Seeded answers drawn from a few texts, so that identical samples and equal scores of
  different texts (ties) both happen."""
  rng = np.random.default_rng(seed)
  return [f"{record['answer']} ({int(rng.integers(0, 3))}){'!' * int(rng.integers(0, 2))}"
          for record in records]


def _score(response):
  return int(response.split("(")[1][0])


def fake_judge(records, responses_a, responses_b, rng):
  """Prefers the larger number in parentheses (a tie when equal), flips 20% at random."""
  judgements = []
  for a, b in zip(responses_a, responses_b):
    score_a, score_b = _score(a), _score(b)
    judgement = "tie" if score_a == score_b else ("a" if score_a > score_b else "b")
    if judgement != "tie" and rng.random() < 0.2:
      judgement = "b" if judgement == "a" else "a"
    judgements.append(judgement)
  return judgements


def _collect(path, sample_fn=fake_sample_fn, **overrides):
  args = dict(sample_fn=sample_fn, judge=fake_judge, num_samples=K, chunk_size=CHUNK_SIZE, seed=7)
  args.update(overrides)
  return labeling.collect_judged_pairs(str(path), RECORDS, **args)


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_rows_and_counts(tmp_path):
  path = tmp_path / "pairs.jsonl"
  stats = _collect(path)
  rows = _rows(path)
  assert stats["chunks"] == 6 and stats["resumed_at_chunk"] == 0 and stats["rows"] == len(rows)
  # All K (K - 1) / 2 = 6 pairs of each prompt's samples, less those with identical texts.
  total_pairs = sum(stats["pairs"].values())
  assert total_pairs + sum(stats["identical"].values()) == 6 * 16
  assert 0 < sum(stats["identical"].values()) and total_pairs == len(rows)
  assert len({row["pair_id"] for row in rows}) == len(rows)
  for row in rows:
    split, index, sides = row["pair_id"].split(":")
    record = RECORDS[split][int(index)]
    assert row["split"] == split
    assert row["prompt"] == format_prompt(record["instruction"], record["context"])
    assert row["instruction"] == record["instruction"]
    assert row["chosen"] != row["rejected"]
    assert row["labeler"] == "simulated" and row["annotator"] == "simulated"
    assert row["judgement"] in ("a", "b", "tie")
    i, j = map(int, sides.split("-"))
    assert 0 <= i < j < K
    for text in (row["chosen"], row["rejected"]):
      assert text.startswith(record["answer"] + " (")  # Both are this prompt's samples.
    if row["judgement"] == "tie":
      assert _score(row["chosen"]) == _score(row["rejected"])
  # Held-out pairs come from held-out prompts only, and come after the training chunks.
  assert {row["split"] for row in rows} == {"train", "validation"}
  assert [row["chunk"] for row in rows] == sorted(row["chunk"] for row in rows)
  assert all(row["chunk"] >= 4 for row in rows if row["split"] == "validation")
  ties = sum(row["judgement"] == "tie" for row in rows)
  assert ties > 0 and sum(stats["ties"].values()) == ties
  # The judge's preference, less its 20% flips, is what chosen/rejected record.
  decided = [row for row in rows if row["judgement"] != "tie"]
  agree = np.mean([_score(row["chosen"]) > _score(row["rejected"]) for row in decided])
  assert 0.65 < agree < 0.95


def test_sides_are_shown_in_a_random_order(tmp_path):
  """Sample k of every prompt scores k, so a later sample always wins: without shuffling, side
  a (the earlier sample) would never win."""
  path = tmp_path / "pairs.jsonl"
  ordered = lambda records, seed: [f"x ({k % K})" for k in range(len(records))]
  stats = _collect(path, sample_fn=ordered, judge=lambda r, a, b, rng: [
      "a" if _score(x) > _score(y) else "b" for x, y in zip(a, b)])
  rows = _rows(path)
  assert sum(stats["identical"].values()) == 0 and len(rows) == 6 * 16
  share_a = np.mean([row["judgement"] == "a" for row in rows])
  assert 0.35 < share_a < 0.65
  assert all(_score(row["chosen"]) > _score(row["rejected"]) for row in rows)
  for row in rows:  # shown_sides gives back what the judge saw.
    a, b = labeling.shown_sides(row)
    assert (row["judgement"] == "a") == (_score(a) > _score(b))


def test_same_seed_same_bytes_other_seed_other_pairs(tmp_path):
  _collect(tmp_path / "one.jsonl")
  _collect(tmp_path / "two.jsonl")
  _collect(tmp_path / "three.jsonl", seed=8)
  one = (tmp_path / "one.jsonl").read_bytes()
  assert one == (tmp_path / "two.jsonl").read_bytes()
  assert one != (tmp_path / "three.jsonl").read_bytes()


def test_disjoint_pairing(tmp_path):
  path = tmp_path / "pairs.jsonl"
  stats = _collect(path, pairing="disjoint")
  assert sum(stats["pairs"].values()) + sum(stats["identical"].values()) == 2 * 16
  assert {row["pair_id"].rsplit(":", 1)[1] for row in _rows(path)} <= {"0-1", "2-3"}
  with pytest.raises(UserError, match="pairing"):
    _collect(tmp_path / "x.jsonl", pairing="some")
  with pytest.raises(UserError, match=">= 2"):
    _collect(tmp_path / "x.jsonl", num_samples=1)


class Interrupted(Exception):
  pass


def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path):
  reference = tmp_path / "reference.jsonl"
  _collect(reference)

  path = tmp_path / "pairs.jsonl"
  calls = []

  def failing_sample_fn(records, seed):
    calls.append(seed)
    if len(calls) == 4:  # Chunk 3.
      raise Interrupted()
    return fake_sample_fn(records, seed)

  with pytest.raises(Interrupted):
    _collect(path, sample_fn=failing_sample_fn)
  assert {row["chunk"] for row in _rows(path)} <= {0, 1, 2}
  assert reference.read_bytes().startswith(path.read_bytes())

  resumed_seeds = []

  def recording_sample_fn(records, seed):
    resumed_seeds.append(seed)
    return fake_sample_fn(records, seed)

  stats = _collect(path, sample_fn=recording_sample_fn)
  assert stats["resumed_at_chunk"] == 3
  assert resumed_seeds == [labeling.chunk_seeds(7, c)[0] for c in (3, 4, 5)]  # No chunk twice.
  assert path.read_bytes() == reference.read_bytes()
  # A finished file: nothing more to do, nothing changes.
  stats = _collect(path, sample_fn=recording_sample_fn)
  assert stats["resumed_at_chunk"] == 6 and path.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("cut", ["torn_line", "partial_chunk", "torn_line_of_a_partial_chunk"])
def test_a_torn_write_is_cut_and_redone(tmp_path, cut):
  reference = tmp_path / "reference.jsonl"
  _collect(reference)
  data = reference.read_bytes()
  lines = data.splitlines(keepends=True)
  rows = [json.loads(line) for line in lines]
  # The rows up to the end of chunk 2, then part of chunk 3's write.
  end_of_2 = max(k for k, row in enumerate(rows) if row["chunk"] == 2) + 1
  assert rows[end_of_2]["chunk"] == 3 and rows[end_of_2]["chunk_rows"] >= 2
  kept = b"".join(lines[:end_of_2])
  if cut == "torn_line":  # Chunk 3 complete, but the tail of chunk 2's last line was lost.
    kept = kept[:-7]
    expected_start = 2
  elif cut == "partial_chunk":  # Whole lines of chunk 3, not all of them.
    kept += lines[end_of_2]
    expected_start = 3
  else:
    kept += lines[end_of_2] + lines[end_of_2 + 1][:10]
    expected_start = 3
  path = tmp_path / "pairs.jsonl"
  path.write_bytes(kept)
  stats = _collect(path)
  assert stats["resumed_at_chunk"] == expected_start
  assert path.read_bytes() == data


def test_resuming_a_file_of_other_prompts_is_a_user_error(tmp_path):
  path = tmp_path / "pairs.jsonl"
  _collect(path)
  lines = path.read_text().splitlines(keepends=True)
  first_of_prompt_2 = next(k for k, line in enumerate(lines) if '"train:2:' in line) + 1
  with pytest.raises(UserError, match=rf"pairs.jsonl:{first_of_prompt_2}: .*other prompts"):
    _collect(path, chunk_size=2)
  path.write_text(lines[0] + "not json\n" + "".join(lines[1:]))
  with pytest.raises(UserError, match=r"pairs.jsonl:2: not a JSON line"):
    _collect(path)
  path.write_text('{"chunk": 0, "chunk_rows": 1}\n')
  with pytest.raises(UserError, match=r"pairs.jsonl:1: .*other prompts"):
    _collect(path)
  path.write_text(lines[0].replace('"chunk": 0', '"chunk": 9'))
  with pytest.raises(UserError, match=r"pairs.jsonl:1: not a row of this label run"):
    _collect(path)


def test_load_judged_pairs_splits_and_leaves_out_ties(tmp_path):
  path = tmp_path / "pairs.jsonl"
  _collect(path)
  rows = _rows(path)
  train, heldout, stats = labeling.load_judged_pairs(str(path))
  decided = [row for row in rows if row["judgement"] != "tie"]
  assert len(train) + len(heldout) == len(decided)
  assert stats["rows"] == len(rows)
  assert sum(stats["ties"].values()) == len(rows) - len(decided) > 0
  assert [p["pair_id"] for p in train] == [r["pair_id"] for r in decided if r["split"] == "train"]
  assert all(p["pair_id"].startswith("validation:") for p in heldout)
  first = train[0]
  assert first["strategy"] == "judged" and first["location"].endswith(
      f"pairs.jsonl:{rows.index(next(r for r in rows if r['pair_id'] == first['pair_id'])) + 1}")
  assert set(first) == {"prompt", "chosen", "rejected", "strategy", "location", "pair_id",
                        "instruction", "context"}
  assert first["strategy"] in PAIR_STRATEGIES  # The reward phase reports its accuracy apart.


@pytest.mark.parametrize("line,message", [
    ('{"pair_id": "p", "prompt": "q", "chosen": "x", "rejected": "y", "split": "train"}',
     "missing field 'judgement'"),
    ('{"pair_id": "p", "prompt": "q", "chosen": "x", "rejected": "y", "split": "train", '
     '"judgement": "c"}', "field 'judgement' is 'c'"),
    ('{"pair_id": "p", "prompt": "q", "chosen": "x", "rejected": "y", "split": "test", '
     '"judgement": "a"}', "field 'split' is 'test'"),
    ('{"pair_id": "p", "prompt": "q", "chosen": "x", "rejected": "x", "split": "train", '
     '"judgement": "a"}', "identical"),
    ('{"pair_id": "p", "prompt": 3, "chosen": "x", "rejected": "y", "split": "train", '
     '"judgement": "a"}', "field 'prompt' has type int"),
    ('{"pair_id": "p0", "prompt": "q", "chosen": "x", "rejected": "y", "split": "train", '
     '"judgement": "a"', "invalid JSON"),
    ('{"pair_id": "p0", "prompt": "q", "chosen": "x", "rejected": "y", "split": "train", '
     '"judgement": "b", "annotator": "ann"}', "repeats line 1"),
])
def test_load_judged_pairs_names_the_bad_line(tmp_path, line, message):
  path = tmp_path / "pairs.jsonl"
  good = ('{"pair_id": "p0", "prompt": "q", "chosen": "x", "rejected": "y", "split": "train", '
          '"judgement": "a", "annotator": "ann"}')
  path.write_text(good + "\n" + line + "\n")
  with pytest.raises(UserError, match=rf"pairs.jsonl:2: .*{message}"):
    labeling.load_judged_pairs(str(path))


def test_load_judged_pairs_two_annotators_and_empty_sides(tmp_path):
  path = tmp_path / "pairs.jsonl"
  base = {"pair_id": "p0", "prompt": "q", "chosen": "x", "rejected": "y", "split": "train",
          "judgement": "a"}
  rows = [{**base, "annotator": "ann"}, {**base, "annotator": "bob", "judgement": "b"},
          {**base, "pair_id": "p1", "chosen": " ", "annotator": "ann"},
          {**base, "pair_id": "p2", "split": "validation", "judgement": "tie"}]
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  train, heldout, stats = labeling.load_judged_pairs(str(path))
  assert len(train) == 2 and heldout == []
  assert stats["empty"] == {"train": 1} and stats["ties"] == {"validation": 1}
  with pytest.raises(UserError, match="no such file"):
    labeling.load_judged_pairs(str(tmp_path / "missing.jsonl"))


def test_agreement_with_a_reference():
  judgements = ["a", "b", "a", "tie", "b", "a"]
  reference = ["a", "a", "a", "a", "b", "tie"]
  # Compared: pairs 0, 1, 2, 4 (a tie on either side is left out); 3 of 4 agree.
  assert labeling.agreement(judgements, reference) == (0.75, 4)
  assert labeling.agreement(["tie"], ["a"]) == (None, 0)
  with pytest.raises(ValueError):
    labeling.agreement(["a"], ["a", "b"])
  with pytest.raises(ValueError):
    labeling.agreement(["x"], ["a"])


def test_shown_sides_recovers_what_the_judge_saw():
  row = {"chosen": "good", "rejected": "bad", "judgement": "b"}
  assert labeling.shown_sides(row) == ("bad", "good")
  assert labeling.shown_sides({**row, "judgement": "a"}) == ("good", "bad")
  assert labeling.shown_sides({**row, "judgement": "tie"}) == ("good", "bad")
