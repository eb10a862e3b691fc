"""The label phase's library: judged pairs of a policy's own samples, as InstructGPT collected them.

For each prompt the policy samples K responses (`sample_fn`, the project's generation function);
a labeller (`judge`: the simulated teacher, or anything with its signature) judges pairs of them.
Which pairs: `pairing="all"` takes all K (K - 1) / 2 pairs of a prompt's samples (InstructGPT's
K-choose-2 comparisons: the most judgements per generated sample), `"disjoint"` K // 2 disjoint
pairs (0, 1), (2, 3), ... (independent pairs, fewer judgements). Two samples with the same text
(after stripping whitespace) form no pair: there is nothing to judge; they are counted. Each
pair's two sides are shown to the judge in a random (seeded) order, so a judge with a position
bias cannot favour one sampling slot.

`pairs.jsonl` has one judged pair a line (the rows every labeller writes, see `../shared/CLI.md`):
  * `pair_id`: stable, `SPLIT:PROMPT_INDEX:I-J` (the prompt's index in its split, the two
    samples' indices among its K);
  * `split`: "train" or "validation"; held-out pairs come from held-out prompts only;
  * `prompt` (the formatted prompt), `instruction`, `context` (so a long prompt can be fitted
    the way `batching.tokenize_pairs` fits built pairs);
  * `chosen`, `rejected`: the preferred and the other response; for a tie the sides as shown;
  * `labeler` ("simulated", "web", "file"), `annotator` (who judged);
  * `judgement`: "a" (the side shown first won), "b" (the second) or "tie";
  * `chunk`, `chunk_rows`: the chunk of prompts that wrote the row and how many rows it wrote.

Resuming: the prompts are processed in chunks of `chunk_size` (a chunk never mixes splits). Each
chunk's rows are appended with one write, flushed and fsynced. Every random choice of a chunk
(the sampling seed, the side order, the judge's noise) is drawn from (seed, chunk index) only,
so a chunk gives the same rows whenever it runs. On restart `collect_judged_pairs` reads the
file, cuts a torn last line and the rows of an incomplete last chunk (fewer than its
`chunk_rows`), and continues with the next chunk: an interrupted run ends with exactly the bytes
an uninterrupted one writes. Only a changed seed or K between the two runs goes unnoticed (a
changed prompt list or chunk size is caught, naming file:line).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from rlhf_jax.data.batching import format_prompt
from rlhf_jax.data.records import iter_jsonl
from rlhf_jax.errors import UserError, where

JUDGEMENTS = ("a", "b", "tie")
TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "validation"
SPLITS = (TRAIN_SPLIT, HELDOUT_SPLIT)
PAIRINGS = ("all", "disjoint")
# The reward phase's strategy name for a labelled pair of two policy samples
# (`batching.PAIR_STRATEGIES`), so its accuracy is reported apart from built pairs.
JUDGED_STRATEGY = "judged"

# sample_fn(records, seed) -> one response per record.
SampleFn = Callable[[Sequence[dict], int], Sequence[str]]
# judge(records, responses_a, responses_b, rng) -> one of JUDGEMENTS per pair.
JudgeFn = Callable[[Sequence[dict], Sequence[str], Sequence[str], np.random.Generator],
                   Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A run of consecutive prompts of one split, judged and written together."""
  index: int
  split: str
  start: int  # index of the first prompt within its split
  records: Sequence[dict]


def plan_chunks(records_by_split: Mapping[str, Sequence[dict]], chunk_size: int) -> list[Chunk]:
  """The chunks in processing order: the splits in `SPLITS` order, prompts in order within each.

  Args:
    records_by_split: `{"train": records, "validation": records}` (either may be missing).
    chunk_size: prompts per chunk, >= 1.
  """
  unknown = set(records_by_split) - set(SPLITS)
  if unknown:
    raise ValueError(f"plan_chunks: splits must be among {SPLITS}, got {sorted(unknown)}")
  if chunk_size < 1:
    raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
  chunks = []
  for split in SPLITS:
    records = list(records_by_split.get(split) or ())
    for start in range(0, len(records), chunk_size):
      chunks.append(Chunk(len(chunks), split, start, records[start:start + chunk_size]))
  return chunks


def pair_indices(num_samples: int, pairing: str = "all") -> list[tuple[int, int]]:
  """Which of a prompt's samples are compared: index pairs (i, j), i < j (see module docstring)."""
  if pairing not in PAIRINGS:
    raise UserError(f"pairing={pairing!r}: use one of {', '.join(PAIRINGS)}")
  if num_samples < 2:
    raise UserError(f"samples per prompt must be >= 2 to form pairs, got {num_samples}")
  if pairing == "all":
    return [(i, j) for i in range(num_samples) for j in range(i + 1, num_samples)]
  return [(i, i + 1) for i in range(0, num_samples - 1, 2)]


def chunk_seeds(seed: int, chunk_index: int) -> tuple[int, np.random.Generator,
                                                        np.random.Generator]:
  """(sampling seed, side-order RNG, judge RNG) of a chunk: from (seed, chunk index) only."""
  sample_seq, order_seq, judge_seq = np.random.SeedSequence([seed, chunk_index]).spawn(3)
  sample_seed = int(sample_seq.generate_state(1, np.uint32)[0])
  return sample_seed, np.random.default_rng(order_seq), np.random.default_rng(judge_seq)


def judge_chunk(chunk: Chunk, *, sample_fn: SampleFn, judge: JudgeFn, num_samples: int,
                seed: int, labeler: str, annotator: str,
                pairing: str = "all") -> tuple[list[dict], dict]:
  """Samples K responses per prompt of `chunk`, pairs them, has `judge` judge the pairs.

  Args:
    chunk: the prompts (see `plan_chunks`).
    sample_fn: `sample_fn(records, seed) -> responses`, one per record; called once per chunk
      with each record repeated `num_samples` times in a row (one batch of generation).
    judge: `judge(records, responses_a, responses_b, rng) -> judgements` ('a', 'b' or 'tie'),
      one per pair, `records[k]` the question of pair k.
    num_samples: K, samples per prompt.
    seed: the run's seed; the chunk's randomness comes from (seed, chunk.index).
    labeler, annotator: written into each row.
    pairing: "all" or "disjoint" (`pair_indices`).

  Returns:
    (rows, stats): the chunk's rows in order (prompt, then (i, j)), each with `chunk` and
    `chunk_rows`; stats has `pairs`, `ties`, `identical` (pairs not formed).
  """
  indices = pair_indices(num_samples, pairing)
  sample_seed, order_rng, judge_rng = chunk_seeds(seed, chunk.index)
  repeated = [record for record in chunk.records for _ in range(num_samples)]
  responses = list(sample_fn(repeated, sample_seed))
  if len(responses) != len(repeated):
    raise ValueError(f"sample_fn returned {len(responses)} responses for {len(repeated)} records")
  pair_records, sides_a, sides_b, meta = [], [], [], []
  identical = 0
  for offset, record in enumerate(chunk.records):
    samples = responses[offset * num_samples:(offset + 1) * num_samples]
    for i, j in indices:
      if samples[i].strip() == samples[j].strip():
        identical += 1
        continue
      pair_records.append(record)
      meta.append((chunk.start + offset, i, j))
      first, second = samples[i], samples[j]
      if order_rng.random() < 0.5:
        first, second = second, first
      sides_a.append(first)
      sides_b.append(second)
  judgements = list(judge(pair_records, sides_a, sides_b, judge_rng)) if pair_records else []
  if len(judgements) != len(pair_records):
    raise ValueError(f"judge returned {len(judgements)} judgements for {len(pair_records)} pairs")
  rows = []
  for record, a, b, judgement, (prompt_index, i, j) in zip(pair_records, sides_a, sides_b,
                                                           judgements, meta):
    if judgement not in JUDGEMENTS:
      raise ValueError(f"judge returned {judgement!r}, expected one of {JUDGEMENTS}")
    chosen, rejected = (b, a) if judgement == "b" else (a, b)
    context = record.get("context", "") or ""
    rows.append({
        "pair_id": f"{chunk.split}:{prompt_index}:{i}-{j}",
        "split": chunk.split,
        "prompt": format_prompt(record["instruction"], context),
        "instruction": record["instruction"],
        "context": context,
        "chosen": chosen,
        "rejected": rejected,
        "labeler": labeler,
        "annotator": annotator,
        "judgement": judgement,
        "chunk": chunk.index,
        "chunk_rows": len(pair_records),
    })
  ties = sum(row["judgement"] == "tie" for row in rows)
  return rows, {"pairs": len(rows), "ties": ties, "identical": identical}


def _encode_rows(rows: Sequence[Mapping[str, Any]]) -> bytes:
  return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _append(path: str, data: bytes) -> None:
  """Appends `data` with one write and returns once it is on disk (flush + fsync)."""
  with open(path, "ab") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _truncate(path: str, size: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(size)
    f.flush()
    os.fsync(f.fileno())


def _resume_point(path: str, chunks: Sequence[Chunk]) -> int:
  """Cuts what an interrupted run left unfinished; returns the first chunk still to do.

  Raises:
    UserError: for a bad line before the end, or rows that do not belong to this run's chunks
      (another prompt list or chunk size), naming file:line.
  """
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    raw = f.read()
  lines = raw.split(b"\n")
  if lines[-1]:  # No final newline: a write that never finished.
    logging.warning("%s: cutting off a torn last line (%d bytes) left by an interrupted run",
                    path, len(lines[-1]))
  lines = lines[:-1]
  ends, rows = [], []  # ends[k]: byte offset just past line k.
  offset = 0
  for number, line in enumerate(lines, start=1):
    offset += len(line) + 1
    location = where(path, number)
    try:
      row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f"{location}: not a JSON line ({e}); pairs.jsonl is written only by the "
                      "label phase: remove the line or the file") from e
    chunk = row.get("chunk") if isinstance(row, dict) else None
    if not isinstance(chunk, int) or not 0 <= chunk < len(chunks) or not isinstance(
        row.get("chunk_rows"), int) or (rows and chunk < rows[-1]["chunk"]):
      raise UserError(f"{location}: not a row of this label run (needs 'chunk' in 0.."
                      f"{len(chunks) - 1} in order and 'chunk_rows'); use another workdir or "
                      "remove the file")
    _check_row_belongs(row, chunks[chunk], location)
    ends.append(offset)
    rows.append(row)
  if not rows:
    keep, next_chunk = 0, 0
  else:
    last = rows[-1]["chunk"]
    of_last = sum(row["chunk"] == last for row in rows)
    if of_last == rows[-1]["chunk_rows"]:
      keep, next_chunk = ends[-1], last + 1
    else:
      logging.warning("%s: chunk %d has %d of its %d rows (interrupted mid-write); redoing it",
                      path, last, of_last, rows[-1]["chunk_rows"])
      keep = ends[len(rows) - of_last - 1] if len(rows) > of_last else 0
      next_chunk = last
  if keep != len(raw):
    _truncate(path, keep)
  return next_chunk


def _check_row_belongs(row: Mapping[str, Any], chunk: Chunk, location: str) -> None:
  """A resumed row must be one this chunk writes: its split, a prompt of the chunk, that prompt."""
  try:
    split, prompt_index, _ = str(row.get("pair_id")).split(":")
    offset = int(prompt_index) - chunk.start
  except ValueError:
    offset = -1
    split = None
  if (split != chunk.split or not 0 <= offset < len(chunk.records)
      or row.get("prompt") != format_prompt(chunk.records[offset]["instruction"],
                                            chunk.records[offset].get("context", "") or "")):
    raise UserError(f"{location}: pair {row.get('pair_id')!r} was written for other prompts "
                    f"(chunk {chunk.index} is {chunk.split} prompts {chunk.start}.."
                    f"{chunk.start + len(chunk.records) - 1}): the prompts or chunk_size changed "
                    "since; use another workdir or remove the file")


def collect_judged_pairs(path: str, records_by_split: Mapping[str, Sequence[dict]], *,
                         sample_fn: SampleFn, judge: JudgeFn, num_samples: int, chunk_size: int,
                         seed: int, labeler: str = "simulated", annotator: str | None = None,
                         pairing: str = "all") -> dict:
  """Writes (or finishes) `path`: judged pairs of K samples per prompt, chunk by chunk.

  Args:
    path: the pairs.jsonl to write; resumed when it exists (see the module docstring).
    records_by_split: `{"train": records, "validation": records}`; each record has
      `instruction` (and optional `context`) and whatever `sample_fn` and `judge` read.
    sample_fn, judge, num_samples, pairing: as for `judge_chunk`.
    chunk_size: prompts per chunk (the unit of progress that an interruption can lose).
    seed: the run's seed.
    labeler: the `labeler` field; annotator: the `annotator` field (default: `labeler`).

  Returns:
    `{"chunks", "resumed_at_chunk", "rows" (in the file at the end), and for the chunks this
    call judged "pairs", "ties", "identical" per split}`.
  """
  chunks = plan_chunks(records_by_split, chunk_size)
  pair_indices(num_samples, pairing)  # Validates before any sampling.
  start = _resume_point(path, chunks)
  if start:
    logging.info("%s: resuming at chunk %d of %d", path, start, len(chunks))
  counts = {key: collections.Counter() for key in ("pairs", "ties", "identical")}
  for chunk in chunks[start:]:
    rows, stats = judge_chunk(chunk, sample_fn=sample_fn, judge=judge, num_samples=num_samples,
                              seed=seed, labeler=labeler, annotator=annotator or labeler,
                              pairing=pairing)
    _append(path, _encode_rows(rows))
    for key in counts:
      counts[key][chunk.split] += stats[key]
    logging.info("label: chunk %d/%d (%s): %d pairs, %d ties, %d identical", chunk.index + 1,
                 len(chunks), chunk.split, stats["pairs"], stats["ties"], stats["identical"])
  if not os.path.exists(path):  # No prompts at all: still leave the (empty) file.
    _append(path, b"")
  with open(path, "rb") as f:
    num_rows = sum(1 for line in f if line.strip())
  return {"chunks": len(chunks), "resumed_at_chunk": start, "rows": num_rows,
          **{key: dict(value) for key, value in counts.items()}}


def _check_judged_row(obj: Any) -> str | None:
  """What is wrong with one pairs.jsonl line for training, or None."""
  if not isinstance(obj, dict):
    return f"expected a JSON object, got {type(obj).__name__}"
  for field in ("pair_id", "prompt", "chosen", "rejected", "judgement", "split"):
    if field not in obj:
      return f"missing field {field!r}"
    if not isinstance(obj[field], str):
      return f"field {field!r} has type {type(obj[field]).__name__}, expected a string"
  if obj["judgement"] not in JUDGEMENTS:
    return f"field 'judgement' is {obj['judgement']!r}, expected one of {JUDGEMENTS}"
  if obj["split"] not in SPLITS:
    return f"field 'split' is {obj['split']!r}, expected one of {SPLITS}"
  if obj["judgement"] != "tie" and obj["chosen"] == obj["rejected"]:
    return "chosen and rejected are identical"
  return None


def load_judged_pairs(path: str) -> tuple[list[dict], list[dict], dict]:
  """Reads a judged-pairs file for the reward phase: training and held-out pairs.

  Ties are kept in the file but left out of both (a tie states no preference), counted; so are
  pairs with an empty side (the tokenizer gives it no tokens to score), counted. Held-out pairs
  are the `validation` split's (held-out prompts). Several annotators may judge the same pair;
  each judgement is a pair, but one annotator's second row for a pair is an error.

  Args:
    path: a pairs.jsonl as `collect_judged_pairs` (or the web labeller, or a user) writes it.

  Returns:
    (train, heldout, stats): pairs `{"prompt", "chosen", "rejected", "strategy": "judged",
    "location": "file:line", "pair_id"}` (+ `instruction`, `context` when the row has them), in
    file order; stats `{"source", "rows", "train", "heldout", "ties", "empty"}`, counts per
    split for ties and empty.

  Raises:
    UserError: a missing file, or a bad line (not JSON, a missing or ill-typed field, an unknown
      judgement or split, identical sides, a repeated judgement), naming file:line.
  """
  train, heldout = [], []
  ties, empty = collections.Counter(), collections.Counter()
  seen: dict[tuple[str, Any], int] = {}
  rows = 0
  for line, obj, error in iter_jsonl(path):
    location = where(path, line)
    if error is not None:
      raise UserError(f"{location}: {error[1]}")
    message = _check_judged_row(obj)
    if message:
      raise UserError(f"{location}: {message}")
    key = (obj["pair_id"], obj.get("annotator"))
    if key in seen:
      raise UserError(f"{location}: pair {obj['pair_id']!r} judged by {obj.get('annotator')!r} "
                      f"repeats line {seen[key]}")
    seen[key] = line
    rows += 1
    split = obj["split"]
    if obj["judgement"] == "tie":
      ties[split] += 1
      continue
    if not obj["chosen"].strip() or not obj["rejected"].strip():
      empty[split] += 1
      continue
    pair = {"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"],
            "strategy": JUDGED_STRATEGY, "location": location, "pair_id": obj["pair_id"]}
    for field in ("instruction", "context"):
      if isinstance(obj.get(field), str):
        pair[field] = obj[field]
    (train if split == TRAIN_SPLIT else heldout).append(pair)
  stats = {"source": path, "rows": rows, "train": len(train), "heldout": len(heldout),
           "ties": dict(ties), "empty": dict(empty)}
  if sum(ties.values()) or sum(empty.values()):
    logging.info("%s: left out %d ties and %d pairs with an empty side", path,
                 sum(ties.values()), sum(empty.values()))
  return train, heldout, stats


def shown_sides(row: Mapping[str, Any]) -> tuple[str, str]:
  """(response_a, response_b) of a judged row, as the judge saw them (from `judgement`)."""
  if row["judgement"] == "b":
    return row["rejected"], row["chosen"]
  return row["chosen"], row["rejected"]


def agreement(judgements: Sequence[str], reference: Sequence[str]) -> tuple[float | None, int]:
  """How often judgements agree with a reference judgement of the same pairs (same sides).

  For the labeller's ceiling: `reference` is the noiseless gold order ('a' when the gold score
  of side a is higher, 'tie' when equal). Only pairs where both are decided ('a' or 'b') are
  compared: a tie on either side states no order to agree with.

  Args:
    judgements: 'a', 'b' or 'tie' per pair.
    reference: 'a', 'b' or 'tie' per pair, aligned with `judgements`.

  Returns:
    (fraction agreeing or None when no pair is compared, number of pairs compared).
  """
  if len(judgements) != len(reference):
    raise ValueError(f"agreement: {len(judgements)} judgements but {len(reference)} references")
  for value in (*judgements, *reference):
    if value not in JUDGEMENTS:
      raise ValueError(f"agreement: {value!r} is not one of {JUDGEMENTS}")
  compared = [(j, r) for j, r in zip(judgements, reference) if j != "tie" and r != "tie"]
  if not compared:
    return None, 0
  return sum(j == r for j, r in compared) / len(compared), len(compared)
