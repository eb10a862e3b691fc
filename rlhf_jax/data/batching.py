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
  - `pair_index` [B]: the pair's index in the examples batched, -1 on padding: the key to data
    kept per pair outside the batch (DPO's reference log-probabilities).
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

import json
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

# Ends a context cut to fit the window (`fit_prompt`), on its own line after the kept start.
CONTEXT_CUT_MARKER = "[context truncated]"

# The template as a Hugging Face chat template (Jinja), saved with exported tokenizers: for
# messages = [{"role": "user", "content": instruction, "context": context}] (the "context" key
# optional, Dolly's field name; a system message would mean instructions, not reference text),
# `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` equals
# `format_prompt(instruction, context)`. An assistant message after it renders the training
# sequence: the prompt, the response, EOS. Anything else (several turns, a system message) is an
# error: the model was trained on single instructions. The headers come from the constants above.
CHAT_TEMPLATE = """\
{%- if messages | length not in (1, 2) or messages[0]['role'] != 'user'
      or (messages | length == 2 and messages[1]['role'] != 'assistant') -%}
  {{- raise_exception('this model takes one user message (the instruction, with an optional '
                      + '"context" key), optionally followed by the assistant message answering it') -}}
{%- endif -%}
{%- set context = (messages[0].get('context') or '') | trim -%}
{{- INSTRUCTION_HEADER + (messages[0]['content'] | trim) + '\\n\\n' -}}
{%- if context -%}
  {{- CONTEXT_HEADER + context + '\\n\\n' -}}
{%- endif -%}
{%- if add_generation_prompt or messages | length == 2 -%}
  {{- RESPONSE_HEADER -}}
{%- endif -%}
{%- if messages | length == 2 -%}
  {{- messages[1]['content'] + eos_token -}}
{%- endif -%}""".replace("INSTRUCTION_HEADER", json.dumps(INSTRUCTION_HEADER)).replace(
    "CONTEXT_HEADER", json.dumps(CONTEXT_HEADER)).replace(
    "RESPONSE_HEADER", json.dumps(RESPONSE_HEADER))

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

The exported tokenizer carries this format as its chat template, with the context as a `context`
key of the user message:

```
tokenizer = AutoTokenizer.from_pretrained(export_dir)
prompt = tokenizer.apply_chat_template(
    [{{"role": "user", "content": instruction, "context": context}}],  # "context" is optional
    tokenize=False, add_generation_prompt=True)
```

gives exactly the prompt above. One user message only (optionally followed by the assistant's
answer, rendered as the answer and EOS): the model was trained on single instructions.

A context too long for the model's window was cut during training: the instruction and the start
of the context were kept, and the line `{CONTEXT_CUT_MARKER}` follows the kept part, so the
prompt says that text is missing:

```
{PROMPT_TEMPLATE_WITH_CONTEXT.format(instruction="{instruction}",
                                      context="{start of the context}" + chr(10) + CONTEXT_CUT_MARKER)}```
"""

# Length-grouped pair batches are padded to a multiple of this: few distinct shapes (each
# compiled once), little padding.
PAD_MULTIPLE = 16

# How a preference pair was made; batches carry the index into this tuple so reward accuracy
# can be reported per strategy. "human" marks pairs judged by people (files, HH-RLHF); the
# next five are the negatives built by `rlhf_jax.data.preferences.build_pairs`; "judged" marks
# two policy samples judged by the label phase's labeller (`rlhf_jax.data.labeling`).
PAIR_STRATEGIES = ("human", "other_response", "corrupted", "truncated", "shuffled",
                   "policy_sample", "judged")


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


def record_prompt(record: dict) -> str:
  """The prompt of an instruction record: `format_prompt` of its instruction and context."""
  return format_prompt(record["instruction"], record.get("context", "") or "")


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


def _cut_context_prompt(instruction: str, kept_context: str) -> str:
  """The prompt of a record whose context was cut to `kept_context` (its start), marked as cut."""
  kept = kept_context.rstrip()
  return format_prompt(instruction,
                       f"{kept}\n{CONTEXT_CUT_MARKER}" if kept else CONTEXT_CUT_MARKER)


def fit_prompt(tokenizer: Any, instruction: str, context: str, max_tokens: int,
               prompt_ids: Sequence[int] | None = None) -> tuple[str, list[int], bool] | None:
  """The record's prompt in at most `max_tokens` tokens, its context cut if it must be.

  A prompt that fits is `format_prompt(instruction, context)` unchanged. Otherwise the context
  keeps as many of its first tokens as fit, followed by the line `CONTEXT_CUT_MARKER` (the
  instruction is never cut: it is the task); with no room for any of it, the context block
  holds the marker alone.

  Args:
    tokenizer: a Hugging Face fast tokenizer.
    instruction: the record's instruction.
    context: the record's context ("" for none).
    max_tokens: the most tokens the prompt may take.
    prompt_ids: the whole prompt's ids, when the caller already has them.

  Returns:
    (prompt text, its token ids, whether the context was cut), or None when even the prompt
    without its context (the marker alone) is longer than `max_tokens`.
  """
  text = format_prompt(instruction, context)
  ids = list(prompt_ids) if prompt_ids is not None else _encode(tokenizer, [text])[0]
  if len(ids) <= max_tokens:
    return text, ids, False
  context = context.strip()
  if not context:
    return None
  shortest = _encode(tokenizer, [_cut_context_prompt(instruction, "")])[0]
  if len(shortest) > max_tokens:
    return None
  # Token ends in characters, so the context is cut between tokens (never inside a character).
  ends = [end for _, end in tokenizer(context, add_special_tokens=False, verbose=False,
                                      return_offsets_mapping=True)["offset_mapping"]]
  # The prompt grows by about one token per context token kept; the loop corrects the estimate
  # (BPE may merge across the cut) and ends at the marker alone, which fits.
  keep = min(max_tokens - len(shortest), len(ends) - 1)
  while keep > 0:
    text = _cut_context_prompt(instruction, context[:ends[keep - 1]])
    ids = _encode(tokenizer, [text])[0]
    if len(ids) <= max_tokens:
      return text, ids, True
    keep -= len(ids) - max_tokens
  return _cut_context_prompt(instruction, ""), shortest, True


def _template_parts(prompt: str) -> tuple[str, str] | None:
  """(instruction, context) of a prompt `format_prompt` made with a context, else None."""
  if not (prompt.startswith(INSTRUCTION_HEADER) and prompt.endswith(RESPONSE_HEADER)):
    return None
  body = prompt[len(INSTRUCTION_HEADER):-len(RESPONSE_HEADER)]
  instruction, separator, context = body.partition("\n\n" + CONTEXT_HEADER)
  if not separator or not context.endswith("\n\n"):
    return None
  context = context[:-2]
  # Only an exact round trip counts: any other text is left as it is.
  return (instruction, context) if format_prompt(instruction, context) == prompt else None


def _response_reserve(response_tokens: int, min_response_tokens: int) -> int:
  """Tokens a prompt must leave for a response of `response_tokens` tokens: all of it, or the
  configured minimum if that is less."""
  return max(1, min(response_tokens, min_response_tokens))


def _check_min_response_tokens(min_response_tokens: int, max_length: int) -> None:
  if not 1 <= min_response_tokens < max_length:
    raise UserError(f"min_response_tokens={min_response_tokens}: must be at least 1 and below "
                    f"max_length={max_length}")


def tokenize_sft_examples(tokenizer: Any, records: Sequence[dict], *, max_length: int,
                          min_response_tokens: int = 1, skip_bad_records: bool = False,
                          source: str = "records") -> tuple[list[dict], dict]:
  """Tokenises instruction records into SFT examples, fitting long records into `max_length`.

  Each example is `prompt_ids` (the formatted prompt) and `response_ids` (the stripped response
  followed by EOS), both int32 numpy arrays with `len(prompt_ids) + len(response_ids) <=
  max_length`, plus `truncated` (the response was cut) and `context_cut`.

  A record too long for `max_length` is fitted, not rejected:
    * the response is guaranteed `min(min_response_tokens, its length + EOS)` tokens: a prompt
      longer than `max_length` minus that has its context cut (`fit_prompt`: the instruction
      and the start of the context kept, the cut marked in the prompt);
    * the response is then cut only if it still does not fit, losing its EOS (the model never
      learns to stop mid-answer); the loss stays on the tokens kept.
  Both are counted. Only a record whose prompt does not leave that many tokens even with its
  context removed is bad data.

  Args:
    tokenizer: a Hugging Face fast tokenizer.
    records: dicts with `instruction`, `response`, optional `context` and optional `location`
      ("file:line", as `records.load_records` sets it; messages name it).
    max_length: the sequence length of the batches.
    min_response_tokens: the response's guaranteed share of `max_length` (at least 1).
    skip_bad_records: skip (log and count) records that cannot fit, instead of raising.
    source: names the records in messages when they carry no `location`.

  Returns:
    (examples, stats): stats has `examples`, `truncated_contexts`, `truncated_responses` and
    `skipped` ({"prompt_too_long": n} when any were skipped).

  Raises:
    UserError: for a record that cannot fit even without its context, unless skipping; the
      message names its location (or index and `source`).
  """
  _check_max_length(max_length)
  _check_min_response_tokens(min_response_tokens, max_length)
  eos = _eos_id(tokenizer)
  prompts = _encode(tokenizer, [format_prompt(r["instruction"], r.get("context", ""))
                                for r in records])
  # Stripped: surrounding whitespace in a reference answer is noise the model need not learn.
  responses = _encode(tokenizer, [r["response"].strip() for r in records])
  bad = BadRecords(skip_bad_records)
  examples = []
  truncated = cut_contexts = 0
  for index, (record, prompt, response) in enumerate(zip(records, prompts, responses)):
    response = response + [eos]
    reserve = _response_reserve(len(response), min_response_tokens)
    fitted = fit_prompt(tokenizer, record["instruction"], record.get("context", ""),
                        max_length - reserve, prompt_ids=prompt)
    if fitted is None:
      bare = _encode(tokenizer, [format_prompt(record["instruction"])])[0]
      bad.report(record.get("location") or f"{source} record {index}", "prompt_too_long",
                 f"prompt is {len(bare)} tokens even without its context, but at most "
                 f"max_length - {reserve} = {max_length - reserve} fit (the response needs "
                 f"min(min_response_tokens={min_response_tokens}, its {len(response)} tokens)); "
                 "raise max_length or shorten the instruction")
      continue
    _, prompt, context_cut = fitted
    room = max_length - len(prompt)
    was_cut = len(response) > room
    truncated += was_cut
    cut_contexts += context_cut
    examples.append({
        "prompt_ids": np.asarray(prompt, np.int32),
        "response_ids": np.asarray(response[:room], np.int32),
        "truncated": was_cut,
        "context_cut": context_cut,
    })
  if truncated or cut_contexts:
    logging.info("%s: %d of %d contexts and %d responses truncated to fit max_length=%d",
                 source, cut_contexts, len(examples), truncated, max_length)
  stats = {"examples": len(examples), "truncated_contexts": cut_contexts,
           "truncated_responses": truncated, "skipped": bad.summary()}
  return examples, stats


# What `tokenize_pairs` does with a pair longer than `max_length` (see its docstring).
TOO_LONG_POLICIES = ("truncate", "truncate_prompt", "error")


def _fit_pair(tokenizer: Any, pair: dict, prompt: list[int], chosen_ids: list[int],
              rejected_ids: list[int], *, max_length: int, min_response_tokens: int,
              too_long: str, fit: Any = fit_prompt
              ) -> tuple[tuple | None, tuple[str, str] | None, dict[str, int]]:
  """Fits one tokenised pair into `max_length` (the rules of `tokenize_pairs`; `fit` is
  `fit_prompt` or a cached equivalent).

  Returns:
    ((prompt, chosen, rejected) ids as fitted, None, counts) or (None, (reason, message),
    counts); counts has `contexts`, `prompts` (0 or 1 each) and `responses` (sides cut).
  """
  counts = {"contexts": 0, "prompts": 0, "responses": 0}
  longest = max(len(chosen_ids), len(rejected_ids))
  if "instruction" in pair and len(prompt) + longest > max_length:
    # A pair built from a record: its context is cut as in SFT, leaving the longer response
    # min(min_response_tokens, its length) tokens.
    reserve = _response_reserve(longest, min_response_tokens)
    fitted = fit(tokenizer, pair["instruction"], pair.get("context", ""),
                 max_length - reserve, prompt_ids=prompt)
    if fitted is None:
      bare = _encode(tokenizer, [format_prompt(pair["instruction"])])[0]
      return None, ("prompt_too_long",
                    f"prompt is {len(bare)} tokens even without its context, but at most "
                    f"max_length - {reserve} = {max_length - reserve} fit; raise max_length"), counts
    prompt, counts["contexts"] = fitted[1], int(fitted[2])
  if prompt and len(prompt) + longest > max_length:
    if too_long == "error" or (too_long == "truncate_prompt" and longest > max_length - 1):
      return None, ("too_long",
                    f"prompt ({len(prompt)} tokens) + longer response ({longest} tokens) exceed "
                    f"max_length={max_length}; raise max_length"
                    + ("" if too_long == "error" else " (the response alone does not fit)")), counts
    if too_long == "truncate_prompt":
      prompt = prompt[len(prompt) + longest - max_length:]
      counts["prompts"] = 1
  if not prompt or len(prompt) > max_length - 1:
    return None, ("prompt_too_long",
                  f"prompt is {len(prompt)} tokens but 1 to max_length - 1 = {max_length - 1} "
                  "fit; raise max_length"), counts
  room = max_length - len(prompt)
  counts["responses"] = (len(chosen_ids) > room) + (len(rejected_ids) > room)
  chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
  if chosen_ids == rejected_ids:
    return None, ("identical_after_truncation",
                  f"chosen and rejected are identical within max_length={max_length} tokens"), counts
  return (prompt, chosen_ids, rejected_ids), None, counts


def tokenize_pairs(tokenizer: Any, pairs: Sequence[dict], *, max_length: int,
                   min_response_tokens: int = 1, skip_bad_records: bool = False,
                   source: str = "pairs", too_long: str = "truncate",
                   append_eos: bool = False) -> tuple[list[dict], dict]:
  """Tokenises preference pairs for the reward model (and, with `append_eos`, for DPO).

  Each example has int32 arrays `prompt_ids`, `chosen_ids`, `rejected_ids` (no EOS) and
  `strategy_id` (index into `PAIR_STRATEGIES`; a pair without a `strategy` counts as "human").

  A pair built from a record (it carries the record's `instruction` and `context`, as
  `preferences.build_pairs` makes them) that is too long has its context cut first, as
  `tokenize_sft_examples` does: the longer response is guaranteed `min(min_response_tokens,
  its length)` tokens (counted in `truncated_contexts`). A pair is then too long when its
  prompt plus its longer response exceed `max_length`; `too_long` says what happens:
    * "truncate": each response is cut at its end to fit after the whole prompt (counted in
      `truncated_responses`);
    * "truncate_prompt": the prompt keeps only its last tokens, so both whole responses fit
      (the end of a dialogue, nearest the answer, matters most; counted in
      `truncated_prompts`); a pair whose longer response leaves no room for one prompt token
      is a bad pair (`too_long`);
    * "error": the pair is a bad pair (`too_long`).
  Bad pairs raise, or with `skip_bad_records` are skipped, logged and counted: never dropped
  silently. `PairWindow` tells a pair builder in advance what this function will keep.

  With `append_eos` each response ends with the tokenizer's EOS before fitting, as TRL's
  DPOTrainer builds its pairs, so a policy trained on them learns where answers stop; a response
  cut to fit loses it, as in SFT (the reward model reads its score at the last real token, so
  its pairs have none).

  Args:
    tokenizer: a Hugging Face fast tokenizer.
    pairs: dicts with `prompt`, `chosen`, `rejected`, optional `strategy`, optional
      `instruction` and `context` (a built pair) and optional `location` (e.g.
      "file.jsonl:12", as `preferences.load_pairs` sets it; messages name it).
    max_length: the sequence length of the batches.
    min_response_tokens: a built pair's longer response's guaranteed share of `max_length`.
    skip_bad_records: skip (log and count) bad pairs instead of raising.
    source: names the pairs in messages when they carry no `location`.
    too_long: one of `TOO_LONG_POLICIES`.
    append_eos: end each response with EOS (policy training on pairs: DPO).

  Returns:
    (examples, stats): stats has `examples`, `truncated_contexts`, `truncated_responses`
    (sides cut), `truncated_prompts` and `skipped` per reason: `prompt_too_long` (the prompt
    alone leaves no room for a response), `too_long`, `empty_response`,
    `identical_after_truncation` (both sides cut to the same tokens, so the pair carries no
    preference), `unknown_strategy`.

  Raises:
    UserError: on a bad pair when skipping is off, naming its location (or index and `source`).
  """
  _check_max_length(max_length)
  _check_min_response_tokens(min_response_tokens, max_length)
  if too_long not in TOO_LONG_POLICIES:
    raise UserError(f"too_long={too_long!r}: use one of {', '.join(TOO_LONG_POLICIES)}")
  prompts = _encode(tokenizer, [p["prompt"] for p in pairs])
  chosen = _encode(tokenizer, [p["chosen"] for p in pairs])
  rejected = _encode(tokenizer, [p["rejected"] for p in pairs])
  if append_eos:
    eos = _eos_id(tokenizer)
    # An empty response stays empty: a bad pair either way.
    chosen, rejected = ([ids + [eos] if ids else ids for ids in side] for side in (chosen, rejected))
  bad = BadRecords(skip_bad_records)
  examples = []
  totals = {"contexts": 0, "prompts": 0, "responses": 0}
  for index, pair in enumerate(pairs):
    location = pair.get("location") or f"{source} pair {index}"
    strategy = pair.get("strategy", "human")
    if strategy not in PAIR_STRATEGIES:
      bad.report(location, "unknown_strategy",
                 f"strategy {strategy!r} is not one of {PAIR_STRATEGIES}")
      continue
    if not chosen[index] or not rejected[index]:
      bad.report(location, "empty_response", "chosen or rejected response has no tokens")
      continue
    fitted, error, counts = _fit_pair(
        tokenizer, pair, prompts[index], chosen[index], rejected[index], max_length=max_length,
        min_response_tokens=min_response_tokens, too_long=too_long)
    if error is not None:
      bad.report(location, *error)
      continue
    for key, value in counts.items():
      totals[key] += value
    prompt, chosen_ids, rejected_ids = fitted
    examples.append({
        "prompt_ids": np.asarray(prompt, np.int32),
        "chosen_ids": np.asarray(chosen_ids, np.int32),
        "rejected_ids": np.asarray(rejected_ids, np.int32),
        "strategy_id": PAIR_STRATEGIES.index(strategy),
    })
  if any(totals.values()):
    logging.info("%s: %d contexts, %d responses and %d prompts truncated to fit max_length=%d",
                 source, totals["contexts"], totals["responses"], totals["prompts"], max_length)
  stats = {"examples": len(examples), "truncated_contexts": totals["contexts"],
           "truncated_responses": totals["responses"], "truncated_prompts": totals["prompts"],
           "skipped": bad.summary()}
  return examples, stats


class PairWindow:
  """What the reward model will see of a pair built from a record: the tokens `tokenize_pairs`
  keeps with the same settings. A pair builder asks it so that it never builds a pair whose
  sides are identical within the window (e.g. a truncation cut past the visible part).

  Attributes:
    tokenizer, max_length, min_response_tokens, too_long: as `tokenize_pairs` takes them.
  """

  def __init__(self, tokenizer: Any, *, max_length: int, min_response_tokens: int = 1,
               too_long: str = "truncate"):
    _check_max_length(max_length)
    _check_min_response_tokens(min_response_tokens, max_length)
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.min_response_tokens = min_response_tokens
    self.too_long = too_long
    # Prompt ids per (instruction, context), fitted prompts per (instruction, context, budget).
    self._prompts: dict[tuple[str, str], list[int]] = {}
    self._fitted: dict[tuple[str, str, int], Any] = {}

  def _fit_prompt(self, tokenizer, instruction, context, max_tokens, prompt_ids=None):
    key = (instruction, context, max_tokens)
    if key not in self._fitted:
      self._fitted[key] = fit_prompt(tokenizer, instruction, context, max_tokens, prompt_ids)
    return self._fitted[key]

  def _prompt_ids(self, record: dict) -> list[int]:
    key = (record["instruction"], record.get("context", ""))
    if key not in self._prompts:
      self._prompts[key] = _encode(self.tokenizer, [format_prompt(*key)])[0]
    return self._prompts[key]

  def _fits(self, record: dict, *texts: str) -> bool:
    """True when the prompt and each text surely fit whole: a byte-level BPE token holds at
    least one byte, so a text has at most as many tokens as UTF-8 bytes (no tokenising)."""
    longest = max(len(text.encode("utf-8")) for text in texts)
    return len(self._prompt_ids(record)) + longest <= self.max_length

  def _fit(self, record: dict, chosen_ids: list[int], rejected_ids: list[int]):
    instruction, context = record["instruction"], record.get("context", "")
    key = (instruction, context)
    self._prompt_ids(record)
    return _fit_pair(self.tokenizer, {"instruction": instruction, "context": context},
                     self._prompts[key], chosen_ids, rejected_ids, max_length=self.max_length,
                     min_response_tokens=self.min_response_tokens, too_long=self.too_long,
                     fit=self._fit_prompt)

  def distinct(self, record: dict, chosen: str, rejected: str) -> bool:
    """False if the two responses to `record`'s prompt are identical within the window (also
    when equal as texts or empty); True otherwise, including a pair `tokenize_pairs` will
    reject for another reason (it reports that one itself)."""
    if chosen == rejected or not chosen or not rejected:
      return False
    if self._fits(record, chosen, rejected):  # Both whole: different texts, different tokens.
      return True
    _, error, _ = self._fit(record, *_encode(self.tokenizer, [chosen, rejected]))
    return error is None or error[0] != "identical_after_truncation"

  def visible_response(self, record: dict, response: str) -> str:
    """The start of `response` inside the window when it is its pair's longer side (all of it
    when it fits): a negative cut strictly inside it differs from it in what the model sees."""
    if self._fits(record, response):
      return response
    encoded = self.tokenizer(response, add_special_tokens=False, verbose=False,
                             return_offsets_mapping=True)
    # The other side empty: the window is then set by this response alone.
    fitted, _, _ = self._fit(record, list(encoded["input_ids"]), [])
    if fitted is None:
      return response
    kept = len(fitted[1])
    ends = [end for _, end in encoded["offset_mapping"]]
    return response if kept >= len(ends) else response[:ends[kept - 1]]


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
      "pair_index": np.full((len(mine),), -1, np.int32),
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
    batch["pair_index"][local] = index
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


# Batches per length-sorted window for a pair phase whose config does not set `group_by_length`.
PAIR_GROUP_BATCHES = 16


def training_pair_batches(examples: Sequence[dict], config, *, pad_id: int, start_step: int = 0,
                          process_index: int = 0,
                          process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The training batches of a pair phase (reward, DPO), whatever the pairs' source (built
  pairs, a pairs file, HH dialogues, the label phase's judged pairs): `pair_batches` with
  `config.train.batch_size`, `config.max_length`, `config.train.seed` and length grouping,
  `config.group_by_length` batches per window (`PAIR_GROUP_BATCHES` when the config has no such
  field; 0 turns grouping off and pads every batch to `max_length`).

  Yields:
    Pair batches (see the module docstring), this process's slice, from `start_step`.
  """
  return pair_batches(examples, batch_size=int(config.train.batch_size),
                      max_length=int(config.max_length), pad_id=pad_id,
                      seed=int(config.train.seed), start_step=start_step,
                      process_index=process_index, process_count=process_count,
                      group_by_length=int(config.get("group_by_length", PAIR_GROUP_BATCHES)))


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
                      pad_id: int, process_index: int = 0, process_count: int = 1,
                      by_length: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Finite pair batches covering every pair exactly once, in order (or by length).

  The last batch is filled up with padding pairs whose `pair_mask` is 0.

  Args:
    by_length: visit the pairs shortest first and pad each batch only to its longest pair
      rounded up to a multiple of `PAD_MULTIPLE` (one compiled shape per multiple): far fewer
      padding tokens for sums over all pairs, or per-pair values put back by `pair_index`.
    Others: as `pair_batches`.

  Yields:
    Pair batches; every process gets the same number.
  """
  _check_layout(batch_size, process_index, process_count)
  order = list(range(len(examples)))
  if by_length:
    order.sort(key=lambda i: _pair_length(examples[i]))
  for begin in range(0, len(examples), batch_size):
    pairs: list[int | None] = list(order[begin:begin + batch_size])
    pairs += [None] * (batch_size - len(pairs))
    yield _pair_batch(examples, pairs, max_length, pad_id, process_index, process_count,
                      PAD_MULTIPLE if by_length else 0)


def prompt_batch(tokenizer: Any, prompts: Sequence[str], max_prompt_length: int, *,
                 truncate: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises prompts into a left-padded batch, so all prompts end at the last column.

  Args:
    tokenizer: a Hugging Face fast tokenizer; its EOS id is the filler.
    prompts: prompt texts, already formatted (e.g. with `format_prompt`).
    max_prompt_length: P, the fixed width.
    truncate: by default a longer prompt is fitted: a template prompt with a context has the
      context cut (`fit_prompt`: the instruction and the context's start kept, the cut
      marked), as in training; any other (or one whose instruction alone is too long) keeps
      its last P tokens (the end holds the response header, which tells the model to answer).
      Both are counted and logged. False raises instead.

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
  cut = contexts_cut = 0
  for row, ids in enumerate(encoded):
    if not ids:
      raise UserError(f"prompt {row} is empty")
    if len(ids) > max_prompt_length:
      if not truncate:
        raise UserError(f"prompt {row} is {len(ids)} tokens, longer than max_prompt_length="
                        f"{max_prompt_length}")
      parts = _template_parts(prompts[row])
      fitted = parts and fit_prompt(tokenizer, *parts, max_prompt_length, prompt_ids=ids)
      if fitted:
        ids = fitted[1]
        contexts_cut += 1
      else:
        ids = ids[-max_prompt_length:]
        cut += 1
    prompt_ids[row, max_prompt_length - len(ids):] = ids
    prompt_mask[row, max_prompt_length - len(ids):] = 1.0
  if contexts_cut:
    logging.info("%d of %d prompts longer than max_prompt_length=%d had their context cut",
                 contexts_cut, len(prompts), max_prompt_length)
  if cut:
    logging.warning("%d of %d prompts longer than max_prompt_length=%d kept only their last "
                    "tokens", cut, len(prompts), max_prompt_length)
  return prompt_ids, prompt_mask
