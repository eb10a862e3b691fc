"""Tests for rlhf_jax.data.records: loading Dolly-format records, bad data, splits."""

import collections
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax.data import records
from rlhf_jax.errors import UserError

from conftest import SHARED_DATA as DATA  # noqa: E402 ($RLHF_JAX_DATA)
DOLLY_3K = DATA / "dolly" / "dolly_alpagasus_3k.jsonl"
DOLLY_1K = DATA / "dolly" / "dolly_sample_1k.jsonl"

GOOD = {"instruction": "What is 2 + 2?", "context": "", "response": "4", "category": "open_qa"}


def _need_data():
  if not DOLLY_3K.exists():
    pytest.skip(f"shared test data not found at {DATA}")


def _write_lines(path: Path, lines: list[bytes]) -> str:
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


def _json_line(obj) -> bytes:
  return json.dumps(obj).encode()


def test_reads_shared_dolly_files_like_plain_json():
  _need_data()
  for path, expected_count in ((DOLLY_3K, 2996), (DOLLY_1K, 1000)):
    loaded, stats = records.load_records(str(path))
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(loaded) == expected_count == len(raw)
    # Every Dolly line already has all four fields; the loader adds where it read each one.
    assert [{k: v for k, v in r.items() if k != "location"} for r in loaded] == raw
    assert [r["location"] for r in loaded] == [f"{path}:{n}" for n in range(1, len(raw) + 1)]
    assert stats["read"] == stats["kept"] == expected_count
    assert stats["skipped"] == {}
  loaded, _ = records.load_records(str(DOLLY_3K))
  # Category and empty-context counts published in SOURCES.md.
  categories = collections.Counter(r["category"] for r in loaded)
  assert categories["open_qa"] == 943 and categories["summarization"] == 111
  assert sum(r["context"] == "" for r in loaded) == 2562


MALFORMED = [
    ("missing_field", _json_line({k: v for k, v in GOOD.items() if k != "response"}),
     "'response'"),
    ("empty_field", _json_line(dict(GOOD, response="  \n")), "'response'"),
    ("empty_field", _json_line(dict(GOOD, instruction="")), "'instruction'"),
    ("not_utf8", b'{"instruction": "caf\xe9", "response": "x", "category": "c"}', "UTF-8"),
    ("invalid_json", b'{"instruction": "x", "response": ', "invalid JSON"),
    ("wrong_type", _json_line(dict(GOOD, response=42)), "'response'"),
    ("wrong_type", _json_line(dict(GOOD, category=None)), "'category'"),
    ("not_object", b'["a", "list"]', "object"),
]


@pytest.mark.parametrize("reason,bad_line,names", MALFORMED)
def test_malformed_line_raises_with_file_and_line(tmp_path, reason, bad_line, names):
  del reason
  # A blank line before the bad one checks that line numbers count every physical line.
  path = _write_lines(tmp_path / "data.jsonl", [_json_line(GOOD), b"", bad_line, _json_line(GOOD)])
  with pytest.raises(UserError) as error:
    records.load_records(path)
  message = str(error.value)
  assert f"{path}:3" in message
  assert names in message


def test_malformed_lines_are_skipped_and_counted(tmp_path):
  lines = [_json_line(GOOD)] + [bad for _, bad, _ in MALFORMED] + [_json_line(GOOD)]
  path = _write_lines(tmp_path / "data.jsonl", lines)
  loaded, stats = records.load_records(path, skip_bad_records=True)
  # The good records keep the lines they were read from.
  assert loaded == [dict(GOOD, location=f"{path}:1"), dict(GOOD, location=f"{path}:{len(lines)}")]
  assert stats["read"] == len(lines)
  assert stats["kept"] == 2
  assert stats["skipped"] == dict(collections.Counter(reason for reason, _, _ in MALFORMED))


def test_missing_context_becomes_empty_and_extra_fields_are_kept(tmp_path):
  record = {"instruction": "Q", "response": "A", "category": "c", "answer": "A", "ood_level": 2}
  path = _write_lines(tmp_path / "data.jsonl", [_json_line(record)])
  loaded, _ = records.load_records(path)
  assert loaded == [dict(record, context="", location=f"{path}:1")]


def test_json_list_and_parquet_and_gzip_give_the_same_records(tmp_path):
  rows = [GOOD, dict(GOOD, instruction="Name a colour.", response="Red", context="Colours.")]
  json_path = tmp_path / "data.json"
  json_path.write_text(json.dumps(rows, indent=2))
  gz_path = tmp_path / "data.jsonl.gz"
  with gzip.open(gz_path, "wt") as f:
    f.write("\n".join(json.dumps(r) for r in rows))
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  parquet_path = tmp_path / "data.parquet"
  pq.write_table(pyarrow.Table.from_pylist(rows), parquet_path)
  for path in (json_path, gz_path, parquet_path):
    loaded, stats = records.load_records(str(path))
    assert [{k: v for k, v in r.items() if k != "location"} for r in loaded] == rows, path
    assert all(r["location"].startswith(f"{path}:") for r in loaded)
    assert stats["kept"] == 2


def test_json_list_errors_name_the_element_line(tmp_path):
  path = tmp_path / "data.json"
  # Element 2 starts on line 3 and lacks its response.
  path.write_text('[\n' + json.dumps(GOOD) + ',\n' +
                  json.dumps({"instruction": "Q", "category": "c"}) + '\n]\n')
  with pytest.raises(UserError, match=re.escape(f"{path}:3: missing field 'response'")):
    records.load_records(str(path))
  path.write_text('[\n' + json.dumps(GOOD) + ',\n{"instruction": oops}\n]')
  with pytest.raises(UserError, match=re.escape(f"{path}:3: invalid JSON")):
    records.load_records(str(path))
  path.write_text(json.dumps(GOOD))
  with pytest.raises(UserError, match="list of objects"):
    records.load_records(str(path))


def test_a_source_without_records_is_an_error_naming_it(tmp_path):
  # Empty files of every format, and a file of blank lines: an error naming the file, not an
  # empty list that fails later (an empty Dolly JSONL used to reach the SFT evaluator).
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  empty = {"data.jsonl": b"", "blank.jsonl": b"\n  \n\n", "data.json": b"[ ]\n"}
  for name, content in empty.items():
    (tmp_path / name).write_bytes(content)
  with gzip.open(tmp_path / "data.jsonl.gz", "wb"):
    pass
  pq.write_table(pyarrow.Table.from_pylist([], schema=pyarrow.schema(
      [(field, pyarrow.string()) for field in ("instruction", "response", "category")])),
                 tmp_path / "data.parquet")
  for name in (*empty, "data.jsonl.gz", "data.parquet"):
    path = str(tmp_path / name)
    with pytest.raises(UserError, match=re.escape(f"{path}: no records: the data is empty")):
      records.load_records(path)
  # Every record bad and skipped: nothing left to train on is an error too.
  path = _write_lines(tmp_path / "bad.jsonl", [bad for _, bad, _ in MALFORMED[:3]])
  with pytest.raises(UserError, match=re.escape(f"{path}: no records: all 3 were bad")):
    records.load_records(path, skip_bad_records=True)


def test_missing_file_and_unsupported_format(tmp_path):
  with pytest.raises(UserError, match="no such file"):
    records.load_records(str(tmp_path / "absent.jsonl"))
  other = tmp_path / "data.csv"
  other.write_text("instruction,response\n")
  with pytest.raises(UserError, match="unsupported"):
    records.load_records(str(other))


def test_offline_hub_id_gives_a_clean_user_error():
  # Runs in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when it is imported.
  code = (
      "from rlhf_jax.data.records import load_records\n"
      "from rlhf_jax.errors import UserError\n"
      "try:\n"
      "  load_records('databricks/databricks-dolly-15k')\n"
      "except UserError as e:\n"
      "  print('USER_ERROR', e)\n")
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert "USER_ERROR databricks/databricks-dolly-15k" in result.stdout
  assert "unreachable" in result.stdout


def _records_with_categories(n: int) -> list[dict]:
  return [dict(GOOD, instruction=f"question {i}", category=f"cat{i % 4}") for i in range(n)]


def test_split_is_deterministic_and_a_partition():
  data = _records_with_categories(200)
  first = records.split_records(data, seed=3, validation_fraction=0.1, test_fraction=0.2)
  again = records.split_records(data, seed=3, validation_fraction=0.1, test_fraction=0.2)
  other = records.split_records(data, seed=4, validation_fraction=0.1, test_fraction=0.2)
  assert first == again
  assert first["validation"] != other["validation"]
  assert (len(first["validation"]), len(first["test"]), len(first["train"])) == (20, 40, 140)
  assert first["ood"] == []
  seen = sorted(r["instruction"] for split in first.values() for r in split)
  assert seen == sorted(r["instruction"] for r in data)


def test_split_holds_out_ood_categories():
  data = _records_with_categories(200)
  splits = records.split_records(data, seed=0, validation_fraction=0.1, test_fraction=0.1,
                                 ood_categories=["cat1", "cat3"])
  assert sorted(r["instruction"] for r in splits["ood"]) == sorted(
      r["instruction"] for r in data if r["category"] in ("cat1", "cat3"))
  for name in ("train", "validation", "test"):
    assert all(r["category"] in ("cat0", "cat2") for r in splits[name])
  assert len(splits["validation"]) == 10  # 10% of the 100 in-distribution records


def test_split_rejects_bad_settings():
  data = _records_with_categories(10)
  with pytest.raises(UserError, match="validation_fraction"):
    records.split_records(data, seed=0, validation_fraction=1.5, test_fraction=0.1)
  with pytest.raises(UserError, match="below 1"):
    records.split_records(data, seed=0, validation_fraction=0.5, test_fraction=0.5)
  with pytest.raises(UserError, match="ood_categories.*nope"):
    records.split_records(data, seed=0, validation_fraction=0.1, test_fraction=0.1,
                          ood_categories=["nope"])


def test_a_split_left_empty_is_an_error_naming_the_source():
  # 10 records at 5% each: round(0.5) = 0 validation and test records.
  with pytest.raises(UserError, match=r"tiny\.jsonl: the validation split is empty: 10 "):
    records.split_records(_records_with_categories(10), seed=0, validation_fraction=0.05,
                          test_fraction=0.05, source="tiny.jsonl")
  # Every record of an OOD category: nothing left to train on.
  with pytest.raises(UserError, match=r"the train split is empty: 0 in-distribution records \(4 "):
    records.split_records(_records_with_categories(4), seed=0, validation_fraction=0.0,
                          test_fraction=0.0, ood_categories=["cat0", "cat1", "cat2", "cat3"])
  # A fraction of 0 asks for no such split: an empty one is fine then.
  splits = records.split_records(_records_with_categories(10), seed=0, validation_fraction=0.0,
                                 test_fraction=0.1)
  assert (len(splits["validation"]), len(splits["test"]), len(splits["train"])) == (0, 1, 9)


def test_load_splits_from_a_data_config():
  _need_data()
  from rlhf_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.data(str(DOLLY_1K))
  config.ood_categories = ("creative_writing",)
  config.validation_fraction = 0.1
  config.test_fraction = 0.1
  splits = records.load_splits(config)
  assert len(splits["ood"]) == 39  # SOURCES.md: creative_writing 39 of the 1k sample
  assert (len(splits["validation"]), len(splits["test"])) == (96, 96)  # 10% of 961
  assert len(splits["train"]) == 1000 - 39 - 2 * 96
  builtin_splits = records.load_splits(common.data("builtin"))
  assert set(builtin_splits) >= {"train", "validation", "test"}
