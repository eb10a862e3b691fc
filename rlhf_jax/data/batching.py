"""The prompt template, tokenisation, loss masks, packing and per-host batches.

Every phase (SFT, reward, PPO, generation, evaluation) and the HF export build prompts with
`format_prompt`, so a model always sees prompts in the form it was trained on.

Tokenisation: the prompt and the response are tokenised separately (no special tokens) and
their ids concatenated, so the prompt/response boundary is exact. GPT-Neo has no pad token:
padding uses a filler id (pass the tokenizer's `eos_token_id`) and masks/segment ids decide
what is real.

Batch layouts (numpy; int32 unless stated):

* SFT / LM batch, from `sft_batches` and `eval_batches`, right-padded to `max_length`:
  - `input_ids` [B, T]
  - `segment_ids` [B, T]: 0 on padding; 1, 2, ... for the 1st, 2nd, ... example packed in the
    row (always 1 without packing). Tokens attend only to earlier tokens of the same segment.
  - `positions` [B, T]: the token's position inside its own segment (0-based), 0 on padding.
  - `targets` [B, T]: the next token of the same segment; 0 where there is none.
  - `loss_mask` float32 [B, T]: 1.0 where `targets` is a response token of the same segment
    (the final EOS included), else 0.0. The loss is on response tokens only.
  An SFT example is prompt + response + EOS; a response cut to fit `max_length` gets no EOS, so
  the model never learns to stop mid-answer.

* Pair batch for the reward model, from `pair_batches` and `eval_pair_batches`, pairs first:
  - `input_ids`, `segment_ids`, `positions` [B, 2, T]: `[b, 0]` is prompt+chosen and `[b, 1]`
    prompt+rejected of pair `b`, right-padded, with *no* trailing EOS: the score is read at the
    last real token, index `sum(segment_ids[b, side] > 0) - 1` (HF's sequence classifier reads
    the last non-pad token, and pad == eos would hide a trailing EOS). The reward loss reshapes
    to [2B, T] for one forward pass and back to [B, 2].
  - `response_length` [B, 2]: tokens of the chosen and the rejected response (0 on padding),
    for length statistics such as the "prefer the longer response" baseline.
  - `pair_mask` float32 [B]: 1.0 for a real pair, 0.0 for padding in the last eval batch.
  - `strategy` [B]: index into `PAIR_STRATEGIES` of how the pair was made; -1 on padding.
  Keeping a pair's two rows together on axis 0 means any split along axis 0 (gradient
  accumulation's micro-batches, hosts, data-parallel devices) keeps whole pairs.

* Prompt batch for generation, from `prompt_batch`, left-padded so every prompt ends at the
  last column: `prompt_ids` [B, P] and `prompt_mask` float32 [B, P] (1.0 real, 0.0 pad).

Shapes are fixed by (`batch_size`, `max_length`, `process_count`), so compiled steps never
recompile; the one exception is opt-in: length-grouped pair batches (`pair_batches`'s
`group_by_length`) take T from a few multiples of `PAD_MULTIPLE`, each compiled once.

Multi-host: process `i` of `n` gets the slice `[i * N / n, (i + 1) * N / n)` along axis 0 of
every global array (N its leading size), so `jax.make_array_from_process_local_data` puts the
hosts' parts back together into exactly the global layout above. For pair batches each host
holds whole pairs (both rows of pair `b` sit at `[b]`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from rlhf_jax.data.records import BadRecords
from rlhf_jax.errors import UserError

# The template: a header for the instruction, an optional context block, and a response
# header ending with a newline; the response follows directly. Ending the prompt with a
# newline keeps the token boundary clean: byte-level BPE never merges "\n" with a following
# word, so tokenising prompt and response separately gives the same ids as tokenising both.
INSTRUCTION_HEADER = "### Instruction:\n"
CONTEXT_HEADER = "### Context:\n"
RESPONSE_HEADER = "### Response:\n"
PROMPT_TEMPLATE = INSTRUCTION_HEADER + "{instruction}\n\n" + RESPONSE_HEADER
PROMPT_TEMPLATE_WITH_CONTEXT = (
    INSTRUCTION_HEADER + "{instruction}\n\n" + CONTEXT_HEADER + "{context}\n\n" + RESPONSE_HEADER)

PROMPT_TEMPLATE_DOC = f"""\
# Prompt format

This model was fine-tuned with rlhf-jax on prompts of the following form. Use the same form
to query it; the answer follows the response header directly and ends with the EOS token
(`<|endoftext|>`).

Without context:

```
{PROMPT_TEMPLATE}```

With context (reference text the answer may use):

```
{PROMPT_TEMPLATE_WITH_CONTEXT}```

`{{instruction}}` and `{{context}}` are stripped of surrounding whitespace; an empty context uses
the first form. In Python: `rlhf_jax.data.batching.format_prompt(instruction, context)`.
"""

# Length-grouped pair batches are padded to a multiple of this: few distinct shapes (each
# compiled once), little padding.
PAD_MULTIPLE = 16

# How a preference pair was made; batches carry the index into this tuple so reward accuracy
# can be reported per strategy. "human" marks pairs judged by people (files, HH-RLHF); the
# others are the negatives built by `rlhf_jax.data.preferences.build_pairs`.
PAIR_STRATEGIES = ("human", "other_response", "corrupted", "truncated", "shuffled",
                   "policy_sample")


def format_prompt(instruction: str, context: str = "") -> str:
  """Formats an instruction (and optional context) as a prompt ending with the response header.

  Args:
    instruction: the question or task.
    context: optional reference text; blank means none.

  Returns:
    The prompt text; the response is to be appended directly.
  """
  instruction = instruction.strip()
  context = context.strip()
  if context:
    return PROMPT_TEMPLATE_WITH_CONTEXT.format(instruction=instruction, context=context)
  return PROMPT_TEMPLATE.format(instruction=instruction)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
  """Tokenises texts without special tokens (batched: the fast tokenizer runs in parallel)."""
  if not texts:
    return []
  # verbose=False: lengths beyond the tokenizer's model_max_length are handled here.
  return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def _eos_id(tokenizer: Any) -> int:
  if tokenizer.eos_token_id is None:
    raise UserError("the tokenizer has no EOS token; GPT-Neo tokenizers use <|endoftext|>")
  return int(tokenizer.eos_token_id)


def _check_max_length(max_length: int) -> None:
  if max_length < 2:
    raise UserError(f"max_length={max_length}: must be at least 2 (a prompt and one token)")


def tokenize_sft_examples(tokenizer: Any, records: Sequence[dict], *, max_length: int,
                          skip_bad_records: bool = False,
                          source: str = "records") -> tuple[list[dict], dict]:
  """Tokenises instruction records into SFT examples.

  Each example is `prompt_ids` (the formatted prompt) and `response_ids` (the stripped response
  followed by EOS), both int32 numpy arrays with `len(prompt_ids) + len(response_ids) <=
  max_length`, plus `truncated` (bool). A response too long to fit is cut, losing its EOS.

  Args:
    tokenizer: a Hugging Face fast tokenizer.
    records: dicts with `instruction`, `response` and optional `context`.
    max_length: the sequence length of the batches.
    skip_bad_records: skip (log and count) records whose prompt alone does not fit, instead of
      raising.
    source: names the records in messages, e.g. the file they came from.

  Returns:
    (examples, stats): stats has `examples`, `truncated_responses` and `skipped`
    ({"prompt_too_long": n} when any were skipped).

  Raises:
    UserError: if a prompt is longer than `max_length - 1` tokens (one token must remain for
      the response) and skipping is off; the message names the record index and `source`.
  """
  _check_max_length(max_length)
  eos = _eos_id(tokenizer)
  prompts = _encode(tokenizer, [format_prompt(r["instruction"], r.get("context", ""))
                                for r in records])
  # Stripped: surrounding whitespace in a reference answer is noise the model need not learn.
  responses = _encode(tokenizer, [r["response"].strip() for r in records])
  bad = BadRecords(skip_bad_records)
  examples = []
  truncated = 0
  for index, (prompt, response) in enumerate(zip(prompts, responses)):
    if len(prompt) > max_length - 1:
      bad.report(f"{source} record {index}", "prompt_too_long",
                 f"prompt is {len(prompt)} tokens but at most max_length - 1 = {max_length - 1} "
                 "fit; raise max_length or shorten the instruction/context")
      continue
    response = response + [eos]
    room = max_length - len(prompt)
    was_cut = len(response) > room
    truncated += was_cut
    examples.append({
        "prompt_ids": np.asarray(prompt, np.int32),
        "response_ids": np.asarray(response[:room], np.int32),
        "truncated": was_cut,
    })
  if truncated:
    logging.info("%s: %d of %d responses truncated to fit max_length=%d", source, truncated,
                 len(examples), max_length)
  stats = {"examples": len(examples), "truncated_responses": truncated,
           "skipped": bad.summary()}
  return examples, stats


def tokenize_sft_example(tokenizer: Any, record: dict, max_length: int) -> dict:
  """Tokenises one record; see `tokenize_sft_examples` (raises `UserError` if it cannot fit)."""
  examples, _ = tokenize_sft_examples(tokenizer, [record], max_length=max_length)
  return examples[0]


# What `tokenize_pairs` does with a pair longer than `max_length` (see its docstring).
TOO_LONG_POLICIES = ("truncate", "truncate_prompt", "error")


def tokenize_pairs(tokenizer: Any, pairs: Sequence[dict], *, max_length: int,
                   skip_bad_records: bool = False, source: str = "pairs",
                   too_long: str = "truncate") -> tuple[list[dict], dict]:
  """Tokenises preference pairs for the reward model.

  Each example has int32 arrays `prompt_ids`, `chosen_ids`, `rejected_ids` (no EOS) and
  `strategy_id` (index into `PAIR_STRATEGIES`; a pair without a `strategy` counts as "human").

  A pair is too long when its prompt plus its longer response exceed `max_length`; `too_long`
  says what happens then:
    * "truncate": each response is cut at its end to fit after the whole prompt (counted in
      `truncated_responses`);
    * "truncate_prompt": the prompt keeps only its last tokens, so both whole responses fit
      (the end of a dialogue, nearest the answer, matters most; counted in
      `truncated_prompts`); a pair whose longer response leaves no room for one prompt token
      is a bad pair (`too_long`);
    * "error": the pair is a bad pair (`too_long`).
  Bad pairs raise, or with `skip_bad_records` are skipped, logged and counted: never dropped
  silently.

  Args:
    tokenizer: a Hugging Face fast tokenizer.
    pairs: dicts with `prompt`, `chosen`, `rejected`, optional `strategy` and optional
      `location` (e.g. "file.jsonl:12", as `preferences.load_pairs` sets it; messages name it).
    max_length: the sequence length of the batches.
    skip_bad_records: skip (log and count) bad pairs instead of raising.
    source: names the pairs in messages when they carry no `location`.
    too_long: one of `TOO_LONG_POLICIES`.

  Returns:
    (examples, stats): stats has `examples`, `truncated_responses` (sides cut),
    `truncated_prompts` and `skipped` per reason: `prompt_too_long` (the prompt alone leaves no
    room for a response), `too_long`, `empty_response`, `identical_after_truncation` (both
    sides cut to the same tokens, so the pair carries no preference), `unknown_strategy`.

  Raises:
    UserError: on a bad pair when skipping is off, naming its location (or index and `source`).
  """
  _check_max_length(max_length)
  if too_long not in TOO_LONG_POLICIES:
    raise UserError(f"too_long={too_long!r}: use one of {', '.join(TOO_LONG_POLICIES)}")
  prompts = _encode(tokenizer, [p["prompt"] for p in pairs])
  chosen = _encode(tokenizer, [p["chosen"] for p in pairs])
  rejected = _encode(tokenizer, [p["rejected"] for p in pairs])
  bad = BadRecords(skip_bad_records)
  examples = []
  truncated = truncated_prompts = 0
  for index, pair in enumerate(pairs):
    location = pair.get("location") or f"{source} pair {index}"
    prompt, chosen_ids, rejected_ids = prompts[index], chosen[index], rejected[index]
    strategy = pair.get("strategy", "human")
    if strategy not in PAIR_STRATEGIES:
      bad.report(location, "unknown_strategy",
                 f"strategy {strategy!r} is not one of {PAIR_STRATEGIES}")
      continue
    if not chosen_ids or not rejected_ids:
      bad.report(location, "empty_response", "chosen or rejected response has no tokens")
      continue
    longest = max(len(chosen_ids), len(rejected_ids))
    if prompt and len(prompt) + longest > max_length:
      if too_long == "error" or (too_long == "truncate_prompt" and longest > max_length - 1):
        bad.report(location, "too_long",
                   f"prompt ({len(prompt)} tokens) + longer response ({longest} tokens) exceed "
                   f"max_length={max_length}; raise max_length"
                   + ("" if too_long == "error" else " (the response alone does not fit)"))
        continue
      if too_long == "truncate_prompt":
        prompt = prompt[len(prompt) + longest - max_length:]
        truncated_prompts += 1
    if not prompt or len(prompt) > max_length - 1:
      bad.report(location, "prompt_too_long",
                 f"prompt is {len(prompt)} tokens but 1 to max_length - 1 = {max_length - 1} "
                 "fit; raise max_length")
      continue
    room = max_length - len(prompt)
    truncated += (len(chosen_ids) > room) + (len(rejected_ids) > room)
    chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    if chosen_ids == rejected_ids:
      bad.report(location, "identical_after_truncation",
                 f"chosen and rejected are identical within max_length={max_length} tokens")
      continue
    examples.append({
        "prompt_ids": np.asarray(prompt, np.int32),
        "chosen_ids": np.asarray(chosen_ids, np.int32),
        "rejected_ids": np.asarray(rejected_ids, np.int32),
        "strategy_id": PAIR_STRATEGIES.index(strategy),
    })
  if truncated or truncated_prompts:
    logging.info("%s: %d responses and %d prompts truncated to fit max_length=%d", source,
                 truncated, truncated_prompts, max_length)
  stats = {"examples": len(examples), "truncated_responses": truncated,
           "truncated_prompts": truncated_prompts, "skipped": bad.summary()}
  return examples, stats


def _check_layout(batch_size: int, process_index: int, process_count: int) -> int:
  """Validates the host split; returns the number of rows (pairs) per host."""
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"batch_size={batch_size}: must be a positive multiple of the process "
                    f"count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")
  return batch_size // process_count


def _epoch_rows(lengths: np.ndarray, *, seed: int, epoch: int, max_length: int,
                pack: bool, batch_size: int = 1, group_batches: int = 0) -> list[list[int]]:
  """Plans one epoch: the rows, each a list of example indices, in a seed+epoch order.

  With `group_batches` > 0 (no packing), each window of `group_batches * batch_size` shuffled
  examples is sorted by length, cut into `group_batches` batches of similar lengths, and those
  batches are put back in a random order: batches stay random in content and order, but each
  holds examples of similar length, so it can be padded to a short length.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  if not pack:
    if group_batches > 0:
      window = group_batches * batch_size
      grouped = []
      for begin in range(0, len(order), window):
        chunk = order[begin:begin + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        grouped.extend(batches[j] for j in rng.permutation(len(batches)))
      order = np.concatenate(grouped)
    return [[int(i)] for i in order]
  # Greedy next-fit in shuffled order: simple, deterministic, and with short instruction data
  # it fills rows well without sorting by length (which would correlate batches with length).
  rows, row, used = [], [], 0
  for i in order:
    if row and used + lengths[i] > max_length:
      rows.append(row)
      row, used = [], 0
    row.append(int(i))
    used += int(lengths[i])
  rows.append(row)
  return rows


def _global_row_batches(lengths: np.ndarray, *, batch_size: int, seed: int, max_length: int,
                        pack: bool, start_step: int,
                        group_batches: int = 0) -> Iterator[list[list[int]]]:
  """Yields global batches of `batch_size` row plans, epochs back to back, from `start_step`.

  Epochs are concatenated (a batch may span two), so no example is dropped at an epoch's end.
  Skipping ahead costs one epoch plan per skipped epoch when packing (lengths only, no
  tokenising or array building) and nothing otherwise.
  """
  if len(lengths) == 0:
    raise UserError("no examples to batch (the data set is empty after filtering)")
  if seed < 0 or start_step < 0:
    raise UserError(f"seed={seed}, start_step={start_step}: must be non-negative")

  def plan(epoch: int) -> list[list[int]]:
    return _epoch_rows(lengths, seed=seed, epoch=epoch, max_length=max_length, pack=pack,
                       batch_size=batch_size, group_batches=group_batches)

  skip = start_step * batch_size
  if pack:
    epoch, rows = 0, plan(0)
    while skip >= len(rows):
      skip -= len(rows)
      epoch += 1
      rows = plan(epoch)
  else:  # every epoch has exactly one row per example
    epoch, skip = divmod(skip, len(lengths))
    rows = plan(epoch)
  position = skip
  while True:
    batch: list[list[int]] = []
    while len(batch) < batch_size:
      if position == len(rows):
        epoch += 1
        rows, position = plan(epoch), 0
      take = min(batch_size - len(batch), len(rows) - position)
      batch.extend(rows[position:position + take])
      position += take
    yield batch


def _sft_batch(examples: Sequence[dict], rows: Sequence[Sequence[int]], max_length: int,
               pad_id: int) -> dict[str, np.ndarray]:
  """Builds the SFT arrays for `rows` (lists of example indices; [] is an empty row)."""
  shape = (len(rows), max_length)
  batch = {
      "input_ids": np.full(shape, pad_id, np.int32),
      "segment_ids": np.zeros(shape, np.int32),
      "positions": np.zeros(shape, np.int32),
      "targets": np.zeros(shape, np.int32),
      "loss_mask": np.zeros(shape, np.float32),
  }
  for r, row in enumerate(rows):
    start = 0
    for segment, index in enumerate(row, start=1):
      prompt, response = examples[index]["prompt_ids"], examples[index]["response_ids"]
      tokens = np.concatenate([prompt, response])
      end = start + len(tokens)
      if end > max_length:
        raise ValueError(f"example {index} ({len(tokens)} tokens) does not fit max_length="
                         f"{max_length}; tokenise with the same max_length")
      batch["input_ids"][r, start:end] = tokens
      batch["segment_ids"][r, start:end] = segment
      batch["positions"][r, start:end] = np.arange(len(tokens))
      batch["targets"][r, start:end - 1] = tokens[1:]
      # Position t predicts token t + 1: the response starts at len(prompt), so the first
      # predicting position is len(prompt) - 1, the last is the segment's second-to-last token.
      batch["loss_mask"][r, start + len(prompt) - 1:end - 1] = 1.0
      start = end
  return batch


def _pair_length(example: dict) -> int:
  """Tokens of the longer side of a tokenised pair (prompt + response)."""
  return len(example["prompt_ids"]) + max(len(example["chosen_ids"]),
                                          len(example["rejected_ids"]))


def _pair_batch(examples: Sequence[dict], pairs: Sequence[int | None], max_length: int,
                pad_id: int, process_index: int, process_count: int,
                pad_multiple: int = 0) -> dict[str, np.ndarray]:
  """Builds this process's part of the global pair batch for `pairs`.

  Args:
    examples: tokenised pairs.
    pairs: the global batch, B example indices (None is a padding pair).
    max_length: T, unless `pad_multiple` is set.
    pad_id: filler token id.
    process_index: this process.
    process_count: the number of processes (divides B).
    pad_multiple: if > 0, T is the longest sequence of the global batch rounded up to this
      multiple (at most `max_length`); every process computes the same T.

  Returns:
    The process's slice `[i * B/n, (i+1) * B/n)` along axis 0 of every global array: the
    [B, 2, T] token arrays and the [B] pair arrays.
  """
  length = max_length
  if pad_multiple > 0:
    longest = max((_pair_length(examples[i]) for i in pairs if i is not None), default=1)
    length = min(max_length, -(-longest // pad_multiple) * pad_multiple)
  per_host = len(pairs) // process_count
  mine = pairs[process_index * per_host:(process_index + 1) * per_host]
  shape = (len(mine), 2, length)
  batch = {
      "input_ids": np.full(shape, pad_id, np.int32),
      "segment_ids": np.zeros(shape, np.int32),
      "positions": np.zeros(shape, np.int32),
      "response_length": np.zeros((len(mine), 2), np.int32),
      "pair_mask": np.zeros((len(mine),), np.float32),
      "strategy": np.full((len(mine),), -1, np.int32),
  }
  for local, index in enumerate(mine):
    if index is None:
      continue
    example = examples[index]
    for side, response in enumerate((example["chosen_ids"], example["rejected_ids"])):
      tokens = np.concatenate([example["prompt_ids"], response])
      if len(tokens) > max_length:
        raise ValueError(f"pair {index} ({len(tokens)} tokens) does not fit max_length="
                         f"{max_length}; tokenise with the same max_length")
      batch["input_ids"][local, side, :len(tokens)] = tokens
      batch["segment_ids"][local, side, :len(tokens)] = 1
      batch["positions"][local, side, :len(tokens)] = np.arange(len(tokens))
      batch["response_length"][local, side] = len(response)
    batch["pair_mask"][local] = 1.0
    batch["strategy"][local] = example["strategy_id"]
  return batch


def sft_batches(examples: Sequence[dict], *, batch_size: int, max_length: int, pad_id: int,
                seed: int, pack: bool = False, start_step: int = 0, process_index: int = 0,
                process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless, deterministic SFT batches, reshuffled every epoch; this process's slice.

  Args:
    examples: from `tokenize_sft_examples` (with the same `max_length`).
    batch_size: rows of the global batch (all processes together).
    max_length: T, the row length.
    pad_id: filler token id for padding (the tokenizer's `eos_token_id`).
    seed: the shuffling seed; epoch e is shuffled by (seed, e).
    pack: greedily pack several examples per row (segment ids and positions per example).
    start_step: the first global step to yield; a resumed run continues at the same data.
    process_index: this process.
    process_count: the number of processes; must divide `batch_size`.

  Yields:
    SFT batches (see the module docstring) of `batch_size / process_count` rows.
  """
  per_host = _check_layout(batch_size, process_index, process_count)
  lengths = np.array([len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples])
  for rows in _global_row_batches(lengths, batch_size=batch_size, seed=seed,
                                  max_length=max_length, pack=pack, start_step=start_step):
    mine = rows[process_index * per_host:(process_index + 1) * per_host]
    yield _sft_batch(examples, mine, max_length, pad_id)


def eval_batches(examples: Sequence[dict], *, batch_size: int, max_length: int, pad_id: int,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Finite SFT batches covering every example exactly once, in order, without packing.

  The last batch is filled up with empty rows (`segment_ids` and `loss_mask` all 0), so shapes
  stay fixed and nothing is counted twice.

  Args: as `sft_batches`.

  Yields:
    SFT batches of `batch_size / process_count` rows; every process gets the same number.
  """
  per_host = _check_layout(batch_size, process_index, process_count)
  for begin in range(0, len(examples), batch_size):
    rows = [[i] for i in range(begin, min(begin + batch_size, len(examples)))]
    rows += [[]] * (batch_size - len(rows))
    yield _sft_batch(examples, rows[process_index * per_host:(process_index + 1) * per_host],
                     max_length, pad_id)


def pair_batches(examples: Sequence[dict], *, batch_size: int, max_length: int, pad_id: int,
                 seed: int, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                 group_by_length: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless, deterministic pair batches, reshuffled every epoch; this process's slice.

  Args:
    examples: from `tokenize_pairs` (with the same `max_length`).
    batch_size: B, pairs in the global batch (2B sequences); `process_count` must divide it.
    group_by_length: 0 pads every batch to `max_length` (one shape). G > 0 sorts each window
      of G batches' worth of shuffled pairs by length, so each batch holds pairs of similar
      length, and pads each batch only to its longest sequence rounded up to a multiple of
      `PAD_MULTIPLE`: one compiled shape per multiple, far fewer padding tokens.
    Others: as `sft_batches`.

  Yields:
    Pair batches (see the module docstring).
  """
  _check_layout(batch_size, process_index, process_count)
  if group_by_length < 0:
    raise UserError(f"group_by_length={group_by_length}: must be 0 (off) or a positive number "
                    "of batches")
  # Pairs are never packed: the reward is read at each row's last token.
  lengths = np.array([_pair_length(e) for e in examples], np.int64)
  pad_multiple = PAD_MULTIPLE if group_by_length else 0
  for rows in _global_row_batches(lengths, batch_size=batch_size, seed=seed,
                                  max_length=max_length, pack=False, start_step=start_step,
                                  group_batches=group_by_length):
    yield _pair_batch(examples, [row[0] for row in rows], max_length, pad_id, process_index,
                      process_count, pad_multiple)


def pad_pair_batch(batch: dict[str, np.ndarray], max_length: int,
                   pad_id: int) -> dict[str, np.ndarray]:
  """A pair batch right-padded along T to `max_length` (token arrays [B, 2, T]; padding as in
  `_pair_batch`): the widest shape length-grouped batches can take."""
  def pad(key, x):
    if x.ndim != 3:
      return x
    fill = pad_id if key == "input_ids" else 0
    return np.pad(x, ((0, 0), (0, 0), (0, max_length - x.shape[-1])), constant_values=fill)
  return {key: pad(key, x) for key, x in batch.items()}


def eval_pair_batches(examples: Sequence[dict], *, batch_size: int, max_length: int,
                      pad_id: int, process_index: int = 0,
                      process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Finite pair batches covering every pair exactly once, in order.

  The last batch is filled up with padding pairs whose `pair_mask` is 0.

  Args: as `pair_batches`.

  Yields:
    Pair batches; every process gets the same number.
  """
  _check_layout(batch_size, process_index, process_count)
  for begin in range(0, len(examples), batch_size):
    pairs: list[int | None] = list(range(begin, min(begin + batch_size, len(examples))))
    pairs += [None] * (batch_size - len(pairs))
    yield _pair_batch(examples, pairs, max_length, pad_id, process_index, process_count)


def prompt_batch(tokenizer: Any, prompts: Sequence[str], max_prompt_length: int, *,
                 truncate: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises prompts into a left-padded batch, so all prompts end at the last column.

  Args:
    tokenizer: a Hugging Face fast tokenizer; its EOS id is the filler.
    prompts: prompt texts, already formatted (e.g. with `format_prompt`).
    max_prompt_length: P, the fixed width.
    truncate: by default a longer prompt keeps its last P tokens (the end holds the response
      header, which tells the model to answer; the cut is logged); False raises instead.

  Returns:
    (prompt_ids int32 [B, P], prompt_mask float32 [B, P]: 1.0 real, 0.0 pad).

  Raises:
    UserError: on an empty prompt, or a too-long one when `truncate` is False.
  """
  if max_prompt_length < 1:
    raise UserError(f"max_prompt_length={max_prompt_length}: must be positive")
  pad_id = _eos_id(tokenizer)
  encoded = _encode(tokenizer, prompts)
  prompt_ids = np.full((len(prompts), max_prompt_length), pad_id, np.int32)
  prompt_mask = np.zeros((len(prompts), max_prompt_length), np.float32)
  cut = 0
  for row, ids in enumerate(encoded):
    if not ids:
      raise UserError(f"prompt {row} is empty")
    if len(ids) > max_prompt_length:
      if not truncate:
        raise UserError(f"prompt {row} is {len(ids)} tokens, longer than max_prompt_length="
                        f"{max_prompt_length}")
      ids = ids[-max_prompt_length:]
      cut += 1
    prompt_ids[row, max_prompt_length - len(ids):] = ids
    prompt_mask[row, max_prompt_length - len(ids):] = 1.0
  if cut:
    logging.warning("%d of %d prompts longer than max_prompt_length=%d kept only their last "
                    "tokens", cut, len(prompts), max_prompt_length)
  return prompt_ids, prompt_mask
