"""Preference pairs for the reward model and DPO: from files (incl. Anthropic HH-RLHF), the label
phase's judged pairs, or built from records.

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

Built pairs (`build_pairs`; with policy samples and copies `build_instruction_pairs`; the
whole reward config's train and held-out pairs `load_preference_pairs`): for each instruction
record, `chosen` is the reference response and `rejected` a negative made by one strategy, drawn
with the given shares:
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
The prompt is `format_prompt(instruction, context)`. Given the reward model's window
(`batching.PairWindow`: what `tokenize_pairs` will keep), a truncation is cut inside the visible
part of the response, and a negative identical to the chosen response within the window, like one
equal as text, is redrawn (random strategies; counted per reason) and, if it stays so or cannot
be made, skipped, logged and counted; never kept. A policy sample that is the reference within
the window is redrawn, and a record whose draws all fail is replaced by another strategy
(`build_instruction_pairs`; counted).

What a pair-training phase (reward, dpo) reads, from its config's `pairs` section:
`load_phase_pairs` (the source, "auto" being the label phase's WORKDIR/label/pairs.jsonl when it
exists; the judged, file or built pairs; tokenised), with `summary_lines` to report it.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from rlhf_jax.data import builtin
from rlhf_jax.data import labeling
from rlhf_jax.data import records as records_lib
from rlhf_jax.data.batching import PAIR_STRATEGIES, PairWindow, format_prompt, tokenize_pairs
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


def _truncate(text: str, rng: np.random.Generator, visible: str | None = None) -> str | None:
  """A strict, non-empty prefix of `text`, cut at a word end (or mid-word for one word) strictly
  inside `visible`, the start of `text` the model sees (all of it by default): a cut past the
  window would leave both sides identical in what the model sees."""
  limit = len((text if visible is None else visible).rstrip())
  # Cutting right after a word (never the last visible one) keeps the original spacing.
  word_ends = [m.end() for m in re.finditer(r"\S+", text) if m.end() < limit]
  if word_ends:
    return text[:word_ends[int(rng.integers(len(word_ends)))]]
  if limit > 1:
    return text[:int(rng.integers(1, limit))]
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
                policy_samples: Sequence[str | None] | None = None,
                window: PairWindow | None = None) -> tuple[list[dict], dict]:
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
    window: what the reward model will see of a pair (`batching.PairWindow`, with the
      settings `tokenize_pairs` gets). With it a truncation is cut inside the visible part of
      the response, and a negative identical to the response within the window is redrawn
      (random strategies) or not used; without it only equal texts are.

  Returns:
    (pairs, stats): pairs carry `prompt`, `chosen`, `rejected`, `strategy`, `record_index`,
    the record's `instruction` and `context` (so `tokenize_pairs` can fit a long context) and
    its `location` when it has one; stats has `records`, `pairs`, `by_strategy` (pairs made per
    strategy), `skipped` (records per strategy for which no negative different from the chosen
    response could be made), `redrawn` and `skip_reasons` (per reason: `equal_text`,
    `identical_in_window`, `impossible`, the strategy cannot make one from this response).

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
    if len(records) < 2:
      return None
    other = int(rng.integers(len(records) - 1))
    other += other >= index  # any record but this one
    return records[other]["response"].strip()

  def truncated(index: int, chosen: str) -> str | None:
    visible = None if window is None else window.visible_response(records[index], chosen)
    return _truncate(chosen, rng, visible)

  makers = {
      "other_response": other_response,
      "corrupted": lambda index, chosen: corrupt_fn(records[index], rng).strip(),
      "truncated": truncated,
      "shuffled": lambda index, chosen: _shuffle(chosen, rng),
      "policy_sample": lambda index, chosen: (policy_samples[index] or "").strip(),
  }
  # A policy sample is drawn once (`sample_policy_negatives` redraws); the others are random.
  tries = {strategy: 1 if strategy == "policy_sample" else _MAX_TRIES for strategy in makers}

  def rejection(record: dict, chosen: str, candidate: str | None) -> str | None:
    """Why `candidate` cannot be the negative (None: it can)."""
    if not candidate:
      return "impossible"
    if candidate == chosen:
      return "equal_text"
    if window is not None and not window.distinct(record, chosen, candidate):
      return "identical_in_window"
    return None

  pairs = []
  made: collections.Counter[str] = collections.Counter()
  skipped: collections.Counter[str] = collections.Counter()
  redrawn: collections.Counter[str] = collections.Counter()
  skip_reasons: collections.Counter[str] = collections.Counter()
  for index, (record, strategy) in enumerate(zip(records, assignment)):
    chosen = record["response"].strip()
    for attempt in range(tries[strategy]):
      rejected = makers[strategy](index, chosen)
      reason = rejection(record, chosen, rejected)
      # A truncation or shuffle that cannot be made from this response never can.
      if reason is None or (reason == "impossible" and strategy in ("truncated", "shuffled")):
        break
      if attempt + 1 < tries[strategy]:
        redrawn[reason] += 1
    if reason is not None:
      skipped[strategy] += 1
      skip_reasons[reason] += 1
      logging.warning("build_pairs: record %d: no %s negative that differs from its response "
                      "within the window (%s); skipped", index, strategy, reason)
      continue
    made[strategy] += 1
    pair = {"prompt": format_prompt(record["instruction"], record.get("context", "")),
            "chosen": chosen, "rejected": rejected, "strategy": strategy,
            "record_index": index, "instruction": record["instruction"],
            "context": record.get("context", "")}
    if "location" in record:
      pair["location"] = record["location"]
    pairs.append(pair)
  stats = {"records": len(records), "pairs": len(pairs), "by_strategy": dict(made),
           "skipped": dict(skipped), "redrawn": dict(redrawn),
           "skip_reasons": dict(skip_reasons)}
  if skipped:
    logging.warning("build_pairs: skipped %d records: %s (reasons %s)", sum(skipped.values()),
                    dict(skipped), dict(skip_reasons))
  return pairs, stats


BUILD = "build"  # `pairs.source` value: build pairs from the `data` section's records.


def split_by_prompt(pairs: Sequence[dict], fraction: float,
                    seed: int) -> tuple[list[dict], list[dict]]:
  """(train, held-out): the pairs of a seeded `fraction` of the distinct prompts are held out,
  so no prompt is in both; file order is kept within each part."""
  if not 0.0 < fraction < 1.0:
    raise UserError(f"pairs.eval_fraction={fraction}: must be in (0, 1), or set pairs.eval_file")
  prompts = list(dict.fromkeys(p["prompt"] for p in pairs))
  count = int(round(fraction * len(prompts)))
  if not 0 < count < len(prompts):  # Too few prompts: one part would be empty.
    source = pairs[0].get("location", "pairs").rsplit(":", 1)[0] if pairs else "pairs"
    raise UserError(f"{source}: {len(prompts)} distinct prompts leave the "
                    f"{'held-out' if count == 0 else 'training'} part empty at "
                    f"pairs.eval_fraction={fraction}; give more pairs, change the fraction or "
                    "set pairs.eval_file")
  held_out = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:count]}
  return ([p for p in pairs if p["prompt"] not in held_out],
          [p for p in pairs if p["prompt"] in held_out])


def drop_shared_prompts(train: Sequence[dict], held_out: Sequence[dict]) -> tuple[list[dict], int]:
  """Held-out pairs whose prompt is not a training prompt, and how many were dropped."""
  seen = {p["prompt"] for p in train}
  kept = [p for p in held_out if p["prompt"] not in seen]
  return kept, len(held_out) - len(kept)


def sample_policy_negatives(records: Sequence[dict], *,
                            sample_fn: Callable[[list[dict], int], list[str]],
                            is_correct: Callable[[dict, str], bool], tries: int,
                            seed: int = 0,
                            window: PairWindow | None = None) -> tuple[list[str | None], dict]:
  """Policy samples usable as negatives: wrong (per `is_correct`), non-empty, and different
  from the record's reference response (within `window` when given, else as text).

  Each record gets `tries` draws, all sampled in one call (one compiled shape instead of one
  per retry); the first usable draw is its negative, as if it had been resampled until then.

  Args:
    records: instruction records.
    sample_fn: `(records, seed) -> one response per record`.
    is_correct: whether a response answers its record correctly.
    tries: draws per record.
    seed: passed to `sample_fn`.
    window: what the reward model will see of a pair (see `build_pairs`).

  Returns:
    (samples, stats): one sample per record, None where every draw was correct, empty or the
    reference; stats `policy_samples` (records), `policy_correct_resampled`,
    `policy_empty_resampled` and `policy_same_as_reference_resampled` (draws before the used
    one, or all draws of an unusable record, that were correct / empty / the reference within
    the window), `policy_unusable` (records left with None).
  """
  tries = max(int(tries), 1)
  drawn = sample_fn([record for record in records for _ in range(tries)], seed)
  samples: list[str | None] = [None] * len(records)
  correct = empty = same = 0
  for index, record in enumerate(records):
    reference = record["response"].strip()
    for text in drawn[index * tries:(index + 1) * tries]:
      text = text.strip()
      if not text:
        empty += 1
      elif is_correct(record, text):
        correct += 1
      elif text == reference or (window is not None
                                 and not window.distinct(record, reference, text)):
        same += 1
      else:
        samples[index] = text
        break
  return samples, {"policy_samples": len(records), "policy_correct_resampled": correct,
                   "policy_empty_resampled": empty, "policy_same_as_reference_resampled": same,
                   "policy_unusable": sum(s is None for s in samples)}


def build_instruction_pairs(records: Sequence[dict], *, strategies: dict[str, float],
                            copies: int, seed: int,
                            corrupt_fn: Callable | None = None,
                            sample_fn: Callable[[list[dict], int], list[str]] | None = None,
                            is_correct: Callable[[dict, str], bool] = lambda r, t: False,
                            policy_tries: int = 1,
                            window: PairWindow | None = None) -> tuple[list[dict], dict]:
  """Pairs from instruction records: `copies` negatives per record, strategies by share.

  The records are repeated `copies` times; a seeded `policy_sample` share of these slots gets
  policy samples (see `sample_policy_negatives`), the rest go to `build_pairs` with the other
  shares. A slot whose policy samples were all unusable (correct, empty, or the reference
  within `window`) is replaced: it gets a `corrupted` negative when `corrupt_fn` is given,
  else an `other_response` one; both are counted.

  Returns:
    (pairs, stats): stats `records`, `pairs`, `by_strategy`, `skipped` (per strategy),
    `redrawn` and `skip_reasons` (per reason, see `build_pairs`), the policy counts of
    `sample_policy_negatives` and `policy_replaced_by_corrupted` or
    `policy_replaced_by_other_response`.
  """
  unknown = sorted(set(strategies) - set(BUILT_STRATEGIES))
  if unknown:
    raise UserError(f"pairs.strategies: unknown strategy {unknown}; known: "
                    f"{BUILT_STRATEGIES}")
  if any(float(v) < 0 for v in strategies.values()) or sum(strategies.values()) <= 0:
    raise UserError(f"pairs.strategies: shares must be non-negative with a positive sum, got "
                    f"{dict(strategies)}")
  if copies < 1:
    raise UserError(f"pairs.negatives_per_record={copies}: must be at least 1")
  shares = {k: float(v) for k, v in strategies.items() if float(v) > 0}
  if "policy_sample" in shares and sample_fn is None:
    raise UserError("pairs.strategies: 'policy_sample' has a positive share but there is no "
                    "policy to sample from")
  slots = [record for _ in range(copies) for record in records]
  order = np.random.default_rng(seed).permutation(len(slots))
  n_policy = int(round(shares.get("policy_sample", 0.0) / sum(shares.values()) * len(slots)))
  other_shares = {k: v for k, v in shares.items() if k != "policy_sample"}
  pairs: list[dict] = []
  made: collections.Counter[str] = collections.Counter()
  skipped: collections.Counter[str] = collections.Counter()
  redrawn: collections.Counter[str] = collections.Counter()
  skip_reasons: collections.Counter[str] = collections.Counter()

  def add(part: list[dict], part_shares: dict[str, float], part_seed: int, **kwargs) -> None:
    if not part:
      return
    built, stats = build_pairs(part, strategies=part_shares, seed=part_seed,
                               corrupt_fn=corrupt_fn, window=window, **kwargs)
    pairs.extend(built)
    made.update(stats["by_strategy"])
    skipped.update(stats["skipped"])
    redrawn.update(stats["redrawn"])
    skip_reasons.update(stats["skip_reasons"])

  add([slots[i] for i in order[n_policy:]], other_shares, seed)
  policy_stats: dict[str, int] = {}
  if n_policy:
    policy_slots = [slots[i] for i in order[:n_policy]]
    samples, policy_stats = sample_policy_negatives(policy_slots, sample_fn=sample_fn,
                                                    is_correct=is_correct, tries=policy_tries,
                                                    seed=seed, window=window)
    usable = [i for i, s in enumerate(samples) if s is not None]
    unusable = [policy_slots[i] for i, s in enumerate(samples) if s is None]
    add([policy_slots[i] for i in usable], {"policy_sample": 1.0}, seed + 1,
        policy_samples=[samples[i] for i in usable])
    # Without a corrupt function (real data), another record's answer: always available.
    replacement = "corrupted" if corrupt_fn is not None else "other_response"
    add(unusable, {replacement: 1.0}, seed + 2)
    policy_stats[f"policy_replaced_by_{replacement}"] = len(unusable)
  return pairs, {"records": len(records), "pairs": len(pairs), "by_strategy": dict(made),
                 "skipped": dict(skipped), "redrawn": dict(redrawn),
                 "skip_reasons": dict(skip_reasons), **policy_stats}


def load_preference_pairs(config, sampler_factory: Callable[[], Callable],
                          window: PairWindow | None = None
                          ) -> tuple[list[dict], list[dict], dict]:
  """The training and held-out pairs a reward config describes (see the reward phase's docstring).

  Args:
    config: the reward config (`pairs`, `data`).
    sampler_factory: builds the policy sampler, `(records, seed) -> one response per record`;
      called only when policy samples are needed (the reward phase passes one built on
      `rlhf_jax.models.decode.generate_responses`, so data/ never imports a model).
    window: what the reward model will see of a built pair (`batching.PairWindow` with the
      phase's tokenizer, `max_length`, `min_response_tokens` and `pairs.too_long`), so no built
      pair is identical within it.

  Returns:
    (train pairs, held-out pairs, stats: `train` and `eval` stats of the loader/builder and
    `eval_dropped_shared_prompt`).
  """
  pairs_config = config.pairs
  if pairs_config.source != BUILD:
    train, train_stats = load_pairs(pairs_config.source,
                                                skip_bad_records=pairs_config.skip_bad_records)
    if pairs_config.eval_file:
      held_out, eval_stats = load_pairs(
          pairs_config.eval_file, skip_bad_records=pairs_config.skip_bad_records)
    else:
      train, held_out = split_by_prompt(train, pairs_config.eval_fraction, pairs_config.seed)
      eval_stats = {"source": f"{pairs_config.source} (held-out prompts)", "kept": len(held_out)}
  else:
    splits = records_lib.load_splits(config.data)
    if not splits.get("validation"):
      raise UserError(f"data.source={config.data.source}: no validation split to build "
                      "held-out pairs from; raise data.validation_fraction")
    builtin_data = config.data.source == "builtin"
    strategies = {k: float(v) for k, v in pairs_config.strategies.items()}
    sample_fn = sampler_factory() if strategies.get("policy_sample", 0.0) > 0 else None
    # Only the built-in set has verifiable answers (and wrong answers to corrupt them into).
    is_correct = ((lambda record, text: bool(record.get("answer"))
                   and builtin.check_answer(record, text)) if builtin_data
                  else (lambda record, text: False))
    build = lambda split, copies, seed: build_instruction_pairs(
        splits[split], strategies=strategies, copies=copies, seed=seed,
        corrupt_fn=builtin.corrupt if builtin_data else None, sample_fn=sample_fn,
        is_correct=is_correct, policy_tries=pairs_config.policy_tries, window=window)
    train, train_stats = build("train", pairs_config.negatives_per_record, pairs_config.seed)
    held_out, eval_stats = build("validation", pairs_config.eval_negatives_per_record,
                                 pairs_config.seed + 1000)
  held_out, dropped = drop_shared_prompts(train, held_out)
  if not train or not held_out:
    raise UserError(f"pairs.source={pairs_config.source}: {len(train)} training and "
                    f"{len(held_out)} held-out pairs; both must be non-empty")
  return train, held_out, {"train": train_stats, "eval": eval_stats,
                           "eval_dropped_shared_prompt": dropped}


# ---------------------------------------------------------------------------------------------
# The pairs a pair-training phase (reward, dpo) reads, as its config's `pairs` section names them.

# The label phase's judged pairs, relative to the workdir: the default source ("auto").
LABEL_PAIRS = pathlib.Path("label") / "pairs.jsonl"


def pairs_source(source: str, workdir: pathlib.Path) -> str:
  """The pairs a phase reads: `pairs.source`, where "auto" (the default) is the label phase's
  WORKDIR/label/pairs.jsonl when it exists, else "build"."""
  if source != "auto":
    return source
  label_pairs = pathlib.Path(workdir) / LABEL_PAIRS
  return str(label_pairs) if label_pairs.is_file() else BUILD


def is_judged_pairs_file(source: str) -> bool:
  """Whether `source` is a judged-pairs file (the label phase's rows: its first line has a
  `judgement`), read by `labeling.load_judged_pairs`, rather than a plain pairs file."""
  if source == BUILD or not pathlib.Path(source).is_file():
    return False
  for _, obj, error in iter_jsonl(source):
    return error is None and isinstance(obj, dict) and "judgement" in obj
  return False


def load_judged(config, path: str, sampler_factory: Callable[[], Callable] | None,
                window: PairWindow | None) -> tuple[list[dict], list[dict], dict]:
  """Judged pairs (ties and empty sides left out, counted) for training and held out; with
  `pairs.synthetic_share` > 0, that share of the training pairs are built negatives instead
  (`pairs.strategies` from the data's training records; held-out pairs stay judged).

  Returns:
    (train, held-out, stats as `load_preference_pairs` gives them, plus `judged`).
  """
  train, held_out, stats = labeling.load_judged_pairs(path)
  share = float(config.pairs.synthetic_share)
  if not 0.0 <= share < 1.0:
    raise UserError(f"--config.pairs.synthetic_share={share}: must be in [0, 1)")
  skipped = lambda split: {"tie": stats["ties"].get(split, 0),
                           "empty_side": stats["empty"].get(split, 0)}
  train_stats = {"source": path, "by_strategy": {labeling.JUDGED_STRATEGY: len(train)},
                 "skipped": skipped(labeling.TRAIN_SPLIT)}
  count = int(round(share / (1.0 - share) * len(train)))
  if count:
    built_config = config.copy_and_resolve_references()
    built_config.pairs.source = BUILD
    built_config.pairs.negatives_per_record = 1
    if built_config.data.source == "builtin":
      # Generate only about as many records as needed: twice, since a record whose negative
      # cannot be built (a bare answer too short to truncate, a non-answer to corrupt) is skipped.
      built_config.data.num_train = 2 * count
    built, _, built_stats = load_preference_pairs(built_config, sampler_factory, window=window)
    if len(built) < count:
      raise UserError(f"pairs.synthetic_share={share}: {count} built negatives needed, "
                      f"{len(built)} could be built from data.source={config.data.source}")
    picked = np.random.default_rng(config.pairs.seed).permutation(len(built))[:count]
    built = [built[i] for i in sorted(picked)]
    train = train + built
    for pair in built:
      by_strategy = train_stats["by_strategy"]
      by_strategy[pair["strategy"]] = by_strategy.get(pair["strategy"], 0) + 1
    train_stats.update({k: v for k, v in built_stats["train"].items()
                        if k.startswith("policy_")})
  held_out, dropped = drop_shared_prompts(train, held_out)
  if not train or not held_out:
    raise UserError(f"{path}: {len(train)} training and {len(held_out)} held-out judged pairs "
                    "(ties and empty sides left out); both must be non-empty")
  return train, held_out, {
      "train": train_stats, "judged": True,
      "eval": {"source": path, "by_strategy": {labeling.JUDGED_STRATEGY: len(held_out)},
               "skipped": skipped(labeling.HELDOUT_SPLIT)},
      "eval_dropped_shared_prompt": dropped}


@dataclasses.dataclass(frozen=True)
class PhasePairs:
  """A phase's preference pairs, as texts and tokenised (`batching.tokenize_pairs`).

  Attributes:
    train, held_out: the tokenised examples (`prompt_ids`, `chosen_ids`, `rejected_ids`,
      `strategy_id`).
    train_pairs, held_out_pairs: the pairs as texts (before tokenisation; a pair tokenisation
      skipped is still here).
    stats: the loader's (`load_preference_pairs`, `load_judged`): `train`, `eval`,
      `eval_dropped_shared_prompt`, and `judged` for judged pairs.
    train_tokens, held_out_tokens: `tokenize_pairs`'s stats.
    judged: the pairs are a judged-pairs file's (the label phase's).
  """
  train: list[dict]
  held_out: list[dict]
  train_pairs: list[dict]
  held_out_pairs: list[dict]
  stats: dict
  train_tokens: dict
  held_out_tokens: dict
  judged: bool


def load_phase_pairs(config, workdir: pathlib.Path, tokenizer: Any,
                     sampler_factory: Callable[[], Callable] | None, *, phase: str,
                     append_eos: bool = False) -> PhasePairs:
  """The training and held-out pairs of a pair-training phase's config, tokenised.

  The source is `pairs.source` (`pairs_source`: "auto" is the label phase's judged pairs when
  the workdir has them, else "build"): a judged-pairs file (`load_judged`), a pairs file or
  built pairs (`load_preference_pairs`). Judged pairs are policy samples, at most the label
  phase's max_new_tokens as sampled; only a decoded sample that re-tokenises longer (stray
  bytes) can overflow, so they are cut at the end to fit rather than rejected (even under
  `pairs.too_long="error"`), and a pair the cut leaves identical is skipped and counted. Built
  pairs are made so that no two sides are identical within what the model sees.

  Args:
    config: the phase's config: `pairs`, `data`, `max_length`, optional `min_response_tokens`.
    workdir: the run's workdir (for "auto").
    tokenizer: the model's tokenizer.
    sampler_factory: builds the policy sampler for `policy_sample` negatives (see
      `load_preference_pairs`); None where no config asks for them.
    phase: names the phase in messages.
    append_eos: each response ends with EOS (see `batching.tokenize_pairs`).

  Raises:
    UserError: bad pairs (naming file:line) or none left after tokenisation.
  """
  source = pairs_source(config.pairs.source, workdir)
  judged = is_judged_pairs_file(source)
  fit = dict(max_length=config.max_length,
             too_long="truncate" if judged and config.pairs.too_long == "error"
             else config.pairs.too_long,
             min_response_tokens=config.get("min_response_tokens", 1))
  window = PairWindow(tokenizer, **fit)
  if judged:
    train_pairs, held_out_pairs, stats = load_judged(config, source, sampler_factory, window)
  else:
    built_config = config.copy_and_resolve_references()
    built_config.pairs.source = source
    train_pairs, held_out_pairs, stats = load_preference_pairs(built_config, sampler_factory,
                                                               window=window)
  tokenize = lambda pairs, name: tokenize_pairs(
      tokenizer, pairs, skip_bad_records=config.pairs.skip_bad_records or judged, source=name,
      append_eos=append_eos, **fit)
  train, train_tokens = tokenize(train_pairs, "training pairs")
  held_out, held_out_tokens = tokenize(held_out_pairs, "held-out pairs")
  if not train or not held_out:
    raise UserError(f"{phase}: {len(train)} training and {len(held_out)} held-out pairs left "
                    "after tokenisation; check max_length and the data")
  return PhasePairs(train=train, held_out=held_out, train_pairs=train_pairs,
                    held_out_pairs=held_out_pairs, stats=stats, train_tokens=train_tokens,
                    held_out_tokens=held_out_tokens, judged=judged)


def _describe_counts(stats: dict) -> str:
  skipped = {k: v for k, v in stats.items() if v}
  return ", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"


def summary_lines(pairs: PhasePairs) -> list[str]:
  """What was loaded, skipped, cut and built, one line per split (and the held-out pairs dropped
  for sharing a training prompt), for the phase to print."""
  lines = []
  for name, stats, tokens in (("training", pairs.stats["train"], pairs.train_tokens),
                              ("held-out", pairs.stats["eval"], pairs.held_out_tokens)):
    made = stats.get("by_strategy")
    made_text = f" by strategy {made}" if made else ""
    policy = {k: v for k, v in stats.items() if k.startswith("policy_")}
    skipped = {**stats.get("skipped", {}), **tokens["skipped"]}
    # Why built negatives were redrawn, and why a record got none (equal_text,
    # identical_in_window: the same tokens within max_length; impossible).
    redrawn, not_made = stats.get("redrawn", {}), stats.get("skip_reasons", {})
    lines.append(
        f"{tokens['examples']} {name} pairs{made_text}; skipped "
        f"{_describe_counts(skipped)}; truncated {tokens['truncated_contexts']} contexts, "
        f"{tokens['truncated_responses']} responses, {tokens['truncated_prompts']} prompts"
        + (f"; negatives redrawn: {_describe_counts(redrawn)}" if any(redrawn.values()) else "")
        + (f"; no negative made: {_describe_counts(not_made)}" if any(not_made.values())
           else "")
        + (f"; policy samples: {_describe_counts(policy)}" if policy else ""))
  if pairs.stats["eval_dropped_shared_prompt"]:
    lines.append(f"dropped {pairs.stats['eval_dropped_shared_prompt']} held-out pairs whose "
                 "prompt is also a training prompt")
  return lines
