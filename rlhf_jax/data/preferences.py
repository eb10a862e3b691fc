"""Preference pairs for the reward model: from files (incl. Anthropic HH-RLHF) or built from records.

A pair is a dict with `prompt`, `chosen`, `rejected` (the preferred and the worse response to
`prompt`) and `strategy`, how it was made (one of `batching.PAIR_STRATEGIES`), so reward
accuracy can be reported per strategy.

Files (`load_pairs`): JSON Lines, optionally gzipped, one pair per line, in one of two layouts:
  * `{"prompt", "chosen", "rejected"}` (optionally `"strategy"`, default "human");
  * Anthropic HH-RLHF: `{"chosen", "rejected"}`, two whole dialogues
    `"\\n\\nHuman: ...\\n\\nAssistant: ..."`. The prompt is the dialogue up to and including the
    last `"\\n\\nAssistant:"` of `chosen`; each response is what follows it (leading space
    kept, as the model would generate it after the colon). Two kinds of real HH lines break
    this and are bad data: `chosen == rejected`, and pairs where `rejected` does not start with
    that prompt (the dialogues differ in an earlier turn, so they answer different prompts).

Built pairs (`build_pairs`): for each instruction record, `chosen` is the reference response
and `rejected` a negative made by one strategy, drawn with the given shares:
  * `other_response`: the response of another, randomly picked record: fluent and on some
    topic, but not an answer to this prompt.
  * `corrupted`: a factually wrong answer from `corrupt_fn(record, rng)` (the built-in
    educational set provides one); teaches the reward model to check facts, not style.
  * `truncated`: the reference response cut at a random word boundary (a strict prefix);
    teaches it to prefer complete answers.
  * `shuffled`: the reference response's words in a random order (same multiset of words,
    joined by single spaces); teaches it to prefer coherent text over bag-of-words matches.
  * `policy_sample`: a response sampled from the SFT policy for that record (passed in), the
    negative closest to what PPO will produce.
The prompt is `format_prompt(instruction, context)`. A negative equal to the chosen text is
regenerated (random strategies) and, if it stays equal or cannot be made, skipped, logged and
counted; never kept.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from rlhf_jax.data.batching import PAIR_STRATEGIES, format_prompt
from rlhf_jax.data.records import BadRecords, iter_jsonl
from rlhf_jax.errors import UserError, where

ASSISTANT_MARKER = "\n\nAssistant:"
BUILT_STRATEGIES = ("other_response", "corrupted", "truncated", "shuffled", "policy_sample")
# Attempts for a random negative before giving up on a record (only degenerate responses,
# e.g. a single repeated word, need more than one).
_MAX_TRIES = 10


def split_hh_dialogues(chosen: str, rejected: str) -> tuple[tuple[str, str, str] | None,
                                                              tuple[str, str] | None]:
  """Splits an HH-RLHF pair of dialogues into a shared prompt and two responses.

  Args:
    chosen: the preferred dialogue, "\\n\\nHuman: ...\\n\\nAssistant: ...".
    rejected: the other dialogue.

  Returns:
    ((prompt, chosen_response, rejected_response), None), or (None, (reason, message)) for a
    pair that cannot be split: reasons `identical`, `no_assistant_turn`, `prefix_mismatch`,
    `empty_field`.
  """
  if chosen == rejected:
    return None, ("identical", "chosen and rejected are identical")
  cut = chosen.rfind(ASSISTANT_MARKER)
  if cut < 0:
    return None, ("no_assistant_turn", "field 'chosen' has no '\\n\\nAssistant:' turn")
  prompt = chosen[:cut + len(ASSISTANT_MARKER)]
  if not rejected.startswith(prompt):
    return None, ("prefix_mismatch",
                  "fields 'chosen' and 'rejected' differ before the last '\\n\\nAssistant:' "
                  "of 'chosen', so they do not answer the same prompt")
  chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
  for field, text in (("chosen", chosen_response), ("rejected", rejected_response)):
    if not text.strip():
      return None, ("empty_field", f"field {field!r} has an empty final Assistant response")
  return (prompt, chosen_response, rejected_response), None


def _parse_pair(obj: Any) -> tuple[dict | None, tuple[str, str] | None]:
  """Validates one line of a pairs file; returns (pair, None) or (None, (reason, message))."""
  if not isinstance(obj, dict):
    return None, ("not_object", f"expected a JSON object, got {type(obj).__name__}")
  explicit = "prompt" in obj
  fields = ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")
  for field in fields:
    if field not in obj:
      return None, ("missing_field", f"missing field {field!r}")
    if not isinstance(obj[field], str):
      return None, ("wrong_type", f"field {field!r} has type {type(obj[field]).__name__}, "
                    "expected a string")
  strategy = obj.get("strategy", "human")
  if strategy not in PAIR_STRATEGIES:
    return None, ("wrong_value", f"field 'strategy' is {strategy!r}, expected one of "
                  f"{PAIR_STRATEGIES}")
  if not explicit:
    parts, error = split_hh_dialogues(obj["chosen"], obj["rejected"])
    if error is not None:
      return None, error
    prompt, chosen, rejected = parts
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "strategy": strategy}, None
  for field in fields:
    if not obj[field].strip():
      return None, ("empty_field", f"field {field!r} is empty")
  if obj["chosen"] == obj["rejected"]:
    return None, ("identical", "chosen and rejected are identical")
  return {"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"],
          "strategy": strategy}, None


def load_pairs(path: str, *, skip_bad_records: bool = False) -> tuple[list[dict], dict]:
  """Loads preference pairs from a JSON Lines file (`.jsonl` or `.jsonl.gz`).

  Args:
    path: the file; each line is `{"prompt", "chosen", "rejected"[, "strategy"]}` or an
      HH-RLHF `{"chosen", "rejected"}` dialogue pair (see the module docstring).
    skip_bad_records: skip, log and count bad lines instead of raising.

  Returns:
    (pairs, stats): pairs in file order, each with `location` ("file:line"); stats has `source`, `read`, `kept` and `skipped`
    ({reason: count}; reasons: not_utf8, invalid_json, not_object, missing_field, wrong_type,
    wrong_value, empty_field, identical, no_assistant_turn, prefix_mismatch).

  Raises:
    UserError: on a missing/unreadable file, a file without pairs (empty, or every line bad and
      skipped), or a bad line (unless skipping), naming file:line.
  """
  bad = BadRecords(skip_bad_records)
  pairs = []
  read = 0
  for line, obj, error in iter_jsonl(path):
    read += 1
    pair = None
    if error is None:
      pair, error = _parse_pair(obj)
    if error is not None:
      bad.report(where(path, line), *error)
      continue
    # Later stages (tokenisation) name the pair's file:line in their messages too.
    pairs.append({**pair, "location": where(path, line)})
  stats = {"source": path, "read": read, "kept": len(pairs), "skipped": bad.summary()}
  if not pairs:
    raise UserError(f"{path}: no preference pairs: " + (
        f"all {read} lines were bad and skipped ({stats['skipped']})" if read
        else "the file is empty"))
  if stats["skipped"]:
    logging.warning("%s: skipped %d bad pairs: %s", path, read - len(pairs), stats["skipped"])
  return pairs, stats


def _strategy_counts(strategies: dict[str, float], n: int) -> dict[str, int]:
  """Splits n records among strategies in proportion to their shares (largest remainder)."""
  unknown = sorted(set(strategies) - set(BUILT_STRATEGIES))
  if unknown:
    raise UserError(f"strategies: unknown strategy {unknown}; known: {BUILT_STRATEGIES}")
  if any(share < 0 for share in strategies.values()):
    raise UserError(f"strategies: shares must be non-negative, got {strategies}")
  total = sum(strategies.values())
  if total <= 0:
    raise UserError(f"strategies: at least one share must be positive, got {strategies}")
  names = list(strategies)
  exact = np.array([strategies[s] / total * n for s in names])
  counts = np.floor(exact).astype(int)
  # Give the records left over by flooring to the largest fractional parts (stable order).
  for k in np.argsort(-(exact - counts), kind="stable")[:n - counts.sum()]:
    counts[k] += 1
  return dict(zip(names, counts.tolist()))


def _truncate(text: str, rng: np.random.Generator) -> str | None:
  """A strict, non-empty prefix of `text`, cut at a word end (or mid-word for one word)."""
  word_ends = [m.end() for m in re.finditer(r"\S+", text)]
  if len(word_ends) > 1:
    # Cutting right after a word (never the last) keeps the original spacing.
    return text[:word_ends[int(rng.integers(len(word_ends) - 1))]]
  if len(text) > 1:
    return text[:int(rng.integers(1, len(text)))]
  return None


def _shuffle(text: str, rng: np.random.Generator) -> str | None:
  """The words of `text` in a new random order, joined by spaces (None if impossible)."""
  words = text.split()
  if len(set(words)) < 2:
    return None
  for _ in range(_MAX_TRIES):
    shuffled = [words[k] for k in rng.permutation(len(words))]
    if shuffled != words:
      return " ".join(shuffled)
  return None


def build_pairs(records: Sequence[dict], *, strategies: dict[str, float], seed: int,
                corrupt_fn: Callable[[dict, np.random.Generator], str] | None = None,
                policy_samples: Sequence[str | None] | None = None
                ) -> tuple[list[dict], dict]:
  """Builds preference pairs from instruction records (see the module docstring).

  Each record gets exactly one strategy; the numbers per strategy match the shares as closely
  as whole records allow, and which record gets which is a seeded shuffle.

  Args:
    records: validated instruction records.
    strategies: {strategy: share}, e.g. {"other_response": 0.5, "truncated": 0.5}; shares are
      normalised.
    seed: makes the assignment and every random negative reproducible.
    corrupt_fn: `corrupt_fn(record, rng) -> wrong response` (rng: numpy Generator); required
      if the `corrupted` share is positive.
    policy_samples: one SFT policy response per record (aligned with `records`; None where
      there is none); required if the `policy_sample` share is positive.

  Returns:
    (pairs, stats): pairs carry `prompt`, `chosen`, `rejected`, `strategy` and
    `record_index`; stats has `records`, `pairs`, `by_strategy` (pairs made per strategy) and
    `skipped` (records per strategy for which no negative different from the chosen response
    could be made).

  Raises:
    UserError: on unknown strategies or shares, or a strategy whose input is missing.
  """
  counts = _strategy_counts(strategies, len(records))
  if counts.get("corrupted", 0) and corrupt_fn is None:
    raise UserError("strategies: 'corrupted' has a positive share but no corrupt_fn is given "
                    "(only the built-in data set provides one); set its share to 0")
  if counts.get("policy_sample", 0):
    if policy_samples is None:
      raise UserError("strategies: 'policy_sample' has a positive share but no policy samples "
                      "are given; sample them from the SFT policy or set its share to 0")
    if len(policy_samples) != len(records):
      raise ValueError(f"policy_samples has {len(policy_samples)} entries for "
                       f"{len(records)} records; they must be aligned")

  rng = np.random.default_rng(seed)
  assignment = np.repeat(np.array(list(counts), dtype=object), list(counts.values()))
  assignment = assignment[rng.permutation(len(assignment))]

  def other_response(index: int, chosen: str) -> str | None:
    for _ in range(_MAX_TRIES if len(records) > 1 else 0):
      other = int(rng.integers(len(records) - 1))
      other += other >= index  # any record but this one
      candidate = records[other]["response"].strip()
      if candidate != chosen:
        return candidate
    return None

  def corrupted(index: int, chosen: str) -> str | None:
    for _ in range(_MAX_TRIES):
      candidate = corrupt_fn(records[index], rng).strip()
      if candidate and candidate != chosen:
        return candidate
    return None

  def policy_sample(index: int, chosen: str) -> str | None:
    candidate = (policy_samples[index] or "").strip()
    return candidate if candidate and candidate != chosen else None

  makers = {
      "other_response": other_response,
      "corrupted": corrupted,
      "truncated": lambda index, chosen: _truncate(chosen, rng),
      "shuffled": lambda index, chosen: _shuffle(chosen, rng),
      "policy_sample": policy_sample,
  }
  pairs = []
  made: collections.Counter[str] = collections.Counter()
  skipped: collections.Counter[str] = collections.Counter()
  for index, (record, strategy) in enumerate(zip(records, assignment)):
    chosen = record["response"].strip()
    rejected = makers[strategy](index, chosen)
    if rejected is None or rejected == chosen:
      skipped[strategy] += 1
      logging.warning("build_pairs: record %d: no %s negative different from its response; "
                      "skipped", index, strategy)
      continue
    made[strategy] += 1
    pairs.append({"prompt": format_prompt(record["instruction"], record.get("context", "")),
                  "chosen": chosen, "rejected": rejected, "strategy": strategy,
                  "record_index": index})
  stats = {"records": len(records), "pairs": len(pairs), "by_strategy": dict(made),
           "skipped": dict(skipped)}
  if skipped:
    logging.warning("build_pairs: skipped %d records: %s", sum(skipped.values()), dict(skipped))
  return pairs, stats
