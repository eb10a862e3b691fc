"""Instruction records (Dolly 15k and local files): loading, validation and splitting.

A record is a dict with string fields `instruction`, `context` ("" when there is none),
`response` and `category`; any extra fields (the built-in set adds `answer`, `ood_level`)
are kept as they are. `load_records` adds `location` ("file:line"), so later stages can name
the record in their messages.

Bad data is never dropped silently: by default it raises `UserError` naming `file:line` and
the field; with `skip_bad_records=True` it is skipped, logged and counted per reason in the
returned stats, so the caller can report how much was lost.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from rlhf_jax.data import builtin
from rlhf_jax.errors import UserError, where

REQUIRED_FIELDS = ("instruction", "response", "category")
# Fields whose text must not be blank: a record without a question or an answer teaches nothing.
NON_EMPTY_FIELDS = ("instruction", "response")
_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
# Enough individual warnings to see what is wrong; the per-reason counts cover the rest.
_MAX_LOGGED_SKIPS = 20


class BadRecords:
  """Raises on bad data, or (when skipping is allowed) logs it and counts it per reason.

  Shared by every loader in `rlhf_jax.data` so bad data is treated the same way everywhere.
  """

  def __init__(self, skip: bool):
    self.skip = skip
    self.counts: collections.Counter[str] = collections.Counter()

  def report(self, location: str, reason: str, message: str) -> None:
    """Handles one bad record.

    Args:
      location: where the record is, e.g. "data.jsonl:12" (see `rlhf_jax.errors.where`).
      reason: a short key to count it under, e.g. "missing_field".
      message: what is wrong, naming the field.

    Raises:
      UserError: unless skipping is allowed.
    """
    if not self.skip:
      raise UserError(f"{location}: {message} (set skip_bad_records=True to skip such records)")
    self.counts[reason] += 1
    total = sum(self.counts.values())
    if total <= _MAX_LOGGED_SKIPS:
      logging.warning("Skipping bad record at %s: %s", location, message)
    elif total == _MAX_LOGGED_SKIPS + 1:
      logging.warning("More bad records are being skipped; only their counts are reported.")

  def summary(self) -> dict[str, int]:
    """Counts of skipped records per reason (empty when none were skipped)."""
    return dict(self.counts)


def iter_jsonl(path: str) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
  """Reads a JSON Lines file (plain or .gz) line by line.

  Blank lines are not records and are passed over.

  Args:
    path: the file.

  Yields:
    (line_number, parsed_object, error): line numbers are 1-based; on a line that is not
    UTF-8 or not valid JSON, `parsed_object` is None and `error` is (reason, message).

  Raises:
    UserError: if the file is missing or is not a readable gzip file.
  """
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      for line_number, raw in enumerate(f, start=1):
        try:
          text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          yield line_number, None, ("not_utf8", f"line is not valid UTF-8 (byte {e.start})")
          continue
        if not text.strip():
          continue
        try:
          yield line_number, json.loads(text), None
        except json.JSONDecodeError as e:
          yield line_number, None, ("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; truncated gzip is EOFError
    raise UserError(f"{path}: cannot read file: {e}") from e


def _iter_json_list(path: str) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
  """Reads a .json file holding a list of objects, yielding each element with its line."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise UserError(f"{where(path, line)}: file is not valid UTF-8 (byte {e.start})") from e
  # `json.load` loses element positions; decoding element by element keeps each one's line
  # so errors can point at it.
  decoder = json.JSONDecoder()

  def fail(pos: int, message: str) -> UserError:
    return UserError(f"{where(path, text.count(chr(10), 0, pos) + 1)}: {message}")

  def skip_space(pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
      pos += 1
    return pos

  pos = skip_space(0)
  if not text.startswith("[", pos):
    raise fail(pos, "invalid JSON: a .json records file must hold a list of objects")
  pos = skip_space(pos + 1)
  if text.startswith("]", pos):
    return
  while True:
    line = text.count("\n", 0, pos) + 1
    try:
      value, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise fail(e.pos, f"invalid JSON: {e.msg}") from e
    yield line, value, None
    pos = skip_space(pos)
    if text.startswith("]", pos):
      break
    if not text.startswith(",", pos):
      raise fail(pos, "invalid JSON: expected ',' or ']' between list elements")
    pos = skip_space(pos + 1)
  if skip_space(pos + 1) != len(text):
    raise fail(pos + 1, "invalid JSON: extra data after the list")


def _iter_parquet(path: str) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
  """Reads a .parquet file; the 'line' of a row is its 1-based row number."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  import pyarrow  # pylint: disable=g-import-not-at-top  (installed with `datasets`)
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    rows = pq.read_table(path).to_pylist()
  except (pyarrow.ArrowException, OSError) as e:
    raise UserError(f"{path}: cannot read parquet file: {e}") from e
  for row_number, row in enumerate(rows, start=1):
    yield row_number, row, None


def _iter_hub(dataset_id: str, split: str) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
  """Loads a Hugging Face hub dataset; the 'line' of a row is its 1-based row number."""
  import datasets  # pylint: disable=g-import-not-at-top  (slow import, only needed here)
  try:
    dataset = datasets.load_dataset(dataset_id, split=split)
  except ConnectionError as e:
    raise UserError(
        f"{dataset_id}: cannot load this dataset: the Hugging Face hub is unreachable ({e}); "
        "load it once where the hub is reachable (it is then cached), or pass a local "
        ".jsonl/.json/.parquet file") from e
  except FileNotFoundError as e:  # datasets.exceptions.DatasetNotFoundError is one
    raise UserError(f"{dataset_id}: no such local file or hub dataset ({e})") from e
  except ValueError as e:  # e.g. an unknown split
    raise UserError(f"{dataset_id}: cannot load split {split!r}: {e}") from e
  for row_number, row in enumerate(dataset, start=1):
    yield row_number, row, None


def _validate_record(obj: Any) -> tuple[dict | None, tuple[str, str] | None]:
  """Checks one record; returns (record, None) or (None, (reason, message))."""
  if not isinstance(obj, dict):
    return None, ("not_object", f"expected a JSON object, got {type(obj).__name__}")
  for field in REQUIRED_FIELDS:
    if field not in obj:
      return None, ("missing_field", f"missing field {field!r}")
  record = dict(obj)
  # Dolly writes "" for no context; other sources omit it or store null.
  if record.get("context") is None:
    record["context"] = ""
  for field in REQUIRED_FIELDS + ("context",):
    value = record[field]
    if not isinstance(value, str):
      return None, ("wrong_type",
                    f"field {field!r} has type {type(value).__name__}, expected a string")
  for field in NON_EMPTY_FIELDS:
    if not record[field].strip():
      return None, ("empty_field", f"field {field!r} is empty")
  return record, None


def _is_file_source(source: str) -> bool:
  # A directory is left to `datasets`, which loads local dataset folders as well as hub ids.
  return source.endswith(_FILE_SUFFIXES) or os.path.isfile(source)


def load_records(source: str, *, skip_bad_records: bool = False,
                 hub_split: str = "train") -> tuple[list[dict], dict]:
  """Loads and validates instruction records.

  Args:
    source: a local `.jsonl` (or `.jsonl.gz`) file with one object per line, a `.json` file
      holding a list of objects, a `.parquet` file, or a Hugging Face hub dataset id such as
      `databricks/databricks-dolly-15k` (loaded with `datasets.load_dataset`).
    skip_bad_records: skip, log and count bad records instead of raising.
    hub_split: the split to load from a hub dataset.

  Returns:
    (records, stats): records in file order, each with `location` ("file:line", the row number
    for parquet and hub data); stats has `source`, `read` (records seen),
    `kept`, and `skipped` ({reason: count}; reasons: not_utf8, invalid_json, not_object,
    missing_field, wrong_type, empty_field).

  Raises:
    UserError: on a missing/unreadable source, an unreachable hub, no records at all (an empty
      file, or every record bad and skipped), or (unless skipping) a bad record; the message
      names `file:line` (row number for parquet and hub data) and the field.
  """
  if _is_file_source(source):
    if source.endswith((".jsonl", ".jsonl.gz")):
      rows = iter_jsonl(source)
    elif source.endswith(".json"):
      rows = _iter_json_list(source)
    elif source.endswith(".parquet"):
      rows = _iter_parquet(source)
    else:
      raise UserError(f"{source}: unsupported records file; expected one of "
                      f"{', '.join(_FILE_SUFFIXES)} or a hub dataset id")
  else:
    rows = _iter_hub(source, hub_split)

  bad = BadRecords(skip_bad_records)
  records = []
  read = 0
  for line, obj, error in rows:
    read += 1
    record = None
    if error is None:
      record, error = _validate_record(obj)
    if error is not None:
      bad.report(where(source, line), *error)
      continue
    # Later stages (tokenisation) name the record's file:line in their messages.
    records.append({**record, "location": where(source, line)})
  stats = {"source": source, "read": read, "kept": len(records), "skipped": bad.summary()}
  if not records:
    raise UserError(f"{source}: no records: " + (
        f"all {read} were bad and skipped ({stats['skipped']})" if read else "the data is empty"))
  if stats["skipped"]:
    logging.warning("%s: skipped %d bad records: %s", source, read - len(records),
                    stats["skipped"])
  return records, stats


def split_records(records: Sequence[dict], *, seed: int, validation_fraction: float,
                  test_fraction: float, ood_categories: Sequence[str] = (),
                  source: str = "records") -> dict[str, list[dict]]:
  """Splits records into train/validation/test, holding out whole categories as `ood`.

  The split depends only on `seed` and the records' order, so every phase of a run sees the
  same split.

  Args:
    records: validated records (see `load_records`).
    seed: the shuffling seed.
    validation_fraction: share of the in-distribution records for `validation`.
    test_fraction: share of the in-distribution records for `test`.
    ood_categories: categories held out entirely into `ood` (out-of-distribution evaluation).
    source: what the records came from (a file or hub id), named in errors.

  Returns:
    {"train", "validation", "test", "ood": [records]}; `ood` is empty without ood_categories.

  Raises:
    UserError: on fractions outside [0, 1) or summing to 1 or more, an OOD category that no
      record has (most likely a typo), or a split left empty: `train` always needs records, and
      `validation` / `test` do when their fraction is positive (too few records to split).
  """
  for name, value in (("validation_fraction", validation_fraction),
                      ("test_fraction", test_fraction)):
    if not 0.0 <= value < 1.0:
      raise UserError(f"{name}={value}: must be in [0, 1)")
  if validation_fraction + test_fraction >= 1.0:
    raise UserError(f"validation_fraction + test_fraction = "
                    f"{validation_fraction + test_fraction}: must be below 1 to leave training data")
  held_out = set(ood_categories)
  present = {r["category"] for r in records}
  missing = sorted(held_out - present)
  if missing:
    raise UserError(f"ood_categories: {missing} not found in the data; categories present: "
                    f"{sorted(present)}")

  ood = [r for r in records if r["category"] in held_out]
  in_dist = [r for r in records if r["category"] not in held_out]
  order = np.random.default_rng(seed).permutation(len(in_dist))
  n_val = int(round(validation_fraction * len(in_dist)))
  n_test = int(round(test_fraction * len(in_dist)))
  shuffled = [in_dist[i] for i in order]
  splits = {
      "validation": shuffled[:n_val],
      "test": shuffled[n_val:n_val + n_test],
      "train": shuffled[n_val + n_test:],
      "ood": ood,
  }
  fractions = {"validation": validation_fraction, "test": test_fraction, "train": 1.0}
  for name, fraction in fractions.items():
    if fraction > 0 and not splits[name]:
      raise UserError(
          f"{source}: the {name} split is empty: {len(in_dist)} in-distribution records "
          f"({len(ood)} more held out as ood) split with validation_fraction="
          f"{validation_fraction}, test_fraction={test_fraction}; give more records or change "
          "the fractions")
  return splits


def load_splits(data_config: Any) -> dict[str, list[dict]]:
  """Loads the splits a data config names (see `data()` in configs/common.py).

  Args:
    data_config: has `source` ("builtin", a records file or a hub dataset id), `seed`,
      `num_train`, `num_eval` (built-in set), `validation_fraction`, `test_fraction`,
      `ood_categories` (files and hub data) and `skip_bad_records`.

  Returns:
    {split: records}: the built-in set's `builtin.SPLITS`, or for other sources "train",
    "validation", "test" and "ood" from `split_records`.

  Raises:
    UserError: as `load_records` and `split_records`.
  """
  if data_config.source == "builtin":
    return builtin.generate(data_config.seed, num_train=data_config.num_train,
                            num_eval=data_config.num_eval,
                            demonstrators=data_config.get("demonstrators",
                                                          builtin.DEFAULT_DEMONSTRATORS))
  loaded, stats = load_records(data_config.source,
                               skip_bad_records=data_config.skip_bad_records)
  logging.info("%s: %d records read, %d kept, skipped %s", stats["source"], stats["read"],
               stats["kept"], stats["skipped"] or "none")
  return split_records(loaded, seed=data_config.seed,
                       validation_fraction=data_config.validation_fraction,
                       test_fraction=data_config.test_fraction,
                       ood_categories=tuple(data_config.ood_categories),
                       source=data_config.source)
