"""The `label` phase: judged pairs of the policy's own samples, as InstructGPT collected them.

  python -m rlhf_jax.main --phase=label --config=configs/label.py --workdir=runs/default

Labellers (`labeler`):
  simulated  (default) K samples (`samples_per_prompt`) of the policy (`policy_checkpoint`,
             default WORKDIR/sft) to each of the first `train_prompts` training prompts and
             `heldout_prompts` validation prompts, drawn through the one generation function
             (`decode.generate_responses`); pairs of them judged by the simulated teacher
             (`data.teacher`: Bradley-Terry labels from its gold score with `teacher.temperature`
             and `teacher.flip_rate`, reproducible from `seed`). Built-in data only.
  web        the labelling page for people (`data.label_server`, extra [label]) on pairs sampled
             the same way (kept in `pairs_to_judge.jsonl`, so a restarted server shows the same
             pairs), or on `pairs_to_judge=FILE` (JSONL of prompt/response_a/response_b). Serves
             until Ctrl-C; judgements are appended to pairs.jsonl as they are made, and a later
             run resumes with the next unjudged pair.
  file       `labels=FILE`: a JSONL of judged pairs (`prompt` or `instruction`/`context`,
             `chosen`, `rejected`; optional `judgement` a|b|tie (default "a": chosen was shown
             first and won), `split` train|validation, `pair_id`, `annotator`), validated (a bad
             line is an error naming FILE:LINE) and copied into pairs.jsonl in the rows below.
             Without any `split`, a seeded `heldout_fraction` of the distinct prompts is held out.

Writes WORKDIR/label/ (or WORKDIR/`name`/):
  config.json   the run's config (`seed`: the samples, the order of each pair's sides and the
                teacher's noise; the policy, K, pairing, sampling), written at every start.
  pairs.jsonl   one judged pair a line (`data.labeling`'s rows: pair_id, split, prompt,
                instruction, context, chosen, rejected, labeler, annotator, judgement), what the
                reward phase reads by default; ties stay in the file (left out of training).
  summary.json  the counts and, on the built-in data, the labeller's agreement with the
                teacher's noiseless gold order per split: the ceiling for any reward model
                trained on these labels. The reward phase never reads it (training never sees
                gold). Its presence marks a finished simulated or file run, which a later run
                skips; an interrupted simulated run resumes at the next chunk of prompts
                (`chunk_size`) without duplicating or losing pairs (`labeling.collect_judged_pairs`).
"""

import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import phases
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import label_server
from rlhf_jax.data import labeling
from rlhf_jax.data import records
from rlhf_jax.data import teacher
from rlhf_jax.data.records import iter_jsonl
from rlhf_jax.errors import UserError, where
from rlhf_jax.evaluation import evaluate
from rlhf_jax.models import decode
from rlhf_jax.training import progress

LABELERS = ("simulated", "web", "file")
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILE = "summary.json"
PAIRS_TO_JUDGE_FILE = "pairs_to_judge.jsonl"
CONFIG_FILE = "config.json"


def run(config, workdir: pathlib.Path) -> None:
  phase_dir = phases.output_dir(config, workdir, "label")
  if config.labeler not in LABELERS:
    raise UserError(f"--config.labeler={config.labeler}: use one of {', '.join(LABELERS)}")
  summary_path = phase_dir / SUMMARY_FILE
  if summary_path.is_file() and config.labeler != "web":
    print(f"label: {phase_dir} holds a finished run ({summary_path.name}); skipping. Delete it "
          "or use another --workdir to label again.")
    return
  phase_dir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    # The settings that reproduce the pairs: the seed behind the samples, the side order and the
    # teacher's noise, the policy, K and the pairing.
    _write_json(phase_dir / CONFIG_FILE, config.to_dict())
  start = time.time()
  splits = records.load_splits(config.data)
  gold = GoldScores() if config.data.source == "builtin" else None
  if config.labeler == "file":
    counts = import_labels(config.labels, phase_dir / PAIRS_FILE,
                           heldout_fraction=config.heldout_fraction, seed=config.seed)
  elif config.labeler == "simulated":
    if gold is None:
      raise UserError(f"--config.labeler=simulated: the simulated teacher judges built-in "
                      f"questions only (data.source={config.data.source}); use labeler=web or "
                      "labeler=file")
    counts = _collect_simulated(config, workdir, phase_dir, _prompt_records(config, splits), gold)
  else:
    _serve_web(config, workdir, phase_dir, splits, gold)
    return
  if jax.process_index() != 0:
    return
  rows = read_rows(phase_dir / PAIRS_FILE)
  summary = {"labeler": config.labeler, "rows": len(rows), **counts,
             "per_split": count_rows(rows),
             "gold_agreement": (labeller_agreement(rows, records_by_prompt(splits), gold)
                                if gold is not None else None),
             "seconds": round(time.time() - start, 1)}
  _write_json(summary_path, summary)
  _print_summary(summary, phase_dir)


# ---------------------------------------------------------------------------------------------
# The simulated teacher.


class GoldScores:
  """The teacher's gold scores of (question, response), cached: each sample of a prompt is in
  K - 1 pairs, and the agreement report scores the same texts again."""

  def __init__(self):
    self._cache: dict[tuple[str, str, str], float] = {}

  def __call__(self, questions: Sequence[Mapping], responses: Sequence[str]) -> np.ndarray:
    """float64 [len(responses)] gold scores (`teacher.gold_score`)."""
    scores = np.empty(len(responses), np.float64)
    for i, (question, response) in enumerate(zip(questions, responses)):
      key = (question["instruction"], question.get("context", "") or "", response)
      if key not in self._cache:
        self._cache[key] = teacher.gold_score(question, response)
      scores[i] = self._cache[key]
    return scores


def simulated_judge(gold: GoldScores, *, temperature: float, flip_rate: float,
                    gold_ties: str = "label") -> labeling.JudgeFn:
  """`labeling`'s judge: the teacher's noisy Bradley-Terry label of each pair ('a' or 'b'),
  its noise drawn from the chunk's RNG (so a chunk's labels are the same whenever it runs).

  `gold_ties`: "label" judges a pair whose two responses have the same gold score like any other
  (Bradley-Terry: a coin flip), "tie" judges it 'tie' (kept in pairs.jsonl, left out of
  training)."""
  if gold_ties not in ("label", "tie"):
    raise UserError(f"--config.teacher.gold_ties={gold_ties}: use label or tie")

  def judge(questions, responses_a, responses_b, rng: np.random.Generator) -> list[str]:
    gold_a, gold_b = gold(questions, responses_a), gold(questions, responses_b)
    prefer_a = teacher.noisy_labels(gold_a, gold_b, temperature=temperature,
                                    flip_rate=flip_rate, seed=int(rng.integers(2 ** 63)))
    return ["tie" if gold_ties == "tie" and gold_order(a_score, b_score) == "tie"
            else "a" if a else "b"
            for a, a_score, b_score in zip(prefer_a, gold_a, gold_b)]

  return judge


def gold_order(gold_a: float, gold_b: float) -> str:
  """The noiseless judgement of a pair: the side with the higher gold score, 'tie' if equal."""
  if abs(gold_a - gold_b) <= 1e-9:
    return "tie"
  return "a" if gold_a > gold_b else "b"


def labeller_agreement(rows: Sequence[Mapping], by_prompt: Mapping[str, Mapping],
                       gold: GoldScores) -> dict:
  """The labeller's agreement with the teacher's noiseless gold order, per split.

  Args:
    rows: judged-pair rows (any labeller's), sides as shown (`labeling.shown_sides`).
    by_prompt: {formatted prompt: its question record} (`records_by_prompt`).
    gold: the teacher's scores.

  Returns:
    {split: {"agreement": fraction or None, "pairs": pairs compared (both the labeller and the
    gold order chose a side), "unmatched": rows whose prompt is no built-in question}}.
  """
  judged: dict[str, tuple[list[str], list[str]]] = {}
  unmatched: dict[str, int] = {}
  for row in rows:
    split = row.get("split", labeling.TRAIN_SPLIT)
    record = by_prompt.get(row["prompt"])
    if record is None:
      unmatched[split] = unmatched.get(split, 0) + 1
      continue
    gold_a, gold_b = gold([record, record], list(labeling.shown_sides(row)))
    judgements, reference = judged.setdefault(split, ([], []))
    judgements.append(row["judgement"])
    reference.append(gold_order(gold_a, gold_b))
  result = {}
  for split in sorted(set(judged) | set(unmatched)):
    fraction, compared = labeling.agreement(*judged.get(split, ([], [])))
    result[split] = {"agreement": fraction, "pairs": compared,
                     "unmatched": unmatched.get(split, 0)}
  return result


def records_by_prompt(splits: Mapping[str, Sequence[Mapping]]) -> dict[str, Mapping]:
  """{formatted prompt: record} over the splits pairs come from (train and validation)."""
  return {batching.record_prompt(r): r for split in labeling.SPLITS for r in splits.get(split, ())}


# ---------------------------------------------------------------------------------------------
# Sampling the policy.


def _prompt_records(config, splits) -> dict[str, list[dict]]:
  """The prompts to sample: the first `train_prompts` training and `heldout_prompts` validation
  records (held-out pairs come from held-out prompts only)."""
  chosen = {labeling.TRAIN_SPLIT: list(splits.get("train", []))[:config.train_prompts],
            labeling.HELDOUT_SPLIT: list(splits.get("validation", []))[:config.heldout_prompts]}
  for split, key in ((labeling.TRAIN_SPLIT, "train_prompts"),
                     (labeling.HELDOUT_SPLIT, "heldout_prompts")):
    if not chosen[split]:
      raise UserError(f"--config.{key}: no {split} prompts to label (data.source="
                      f"{config.data.source}); raise it or the data's {split} split")
  return chosen


def policy_sampler(config, workdir: pathlib.Path,
                   chunks: Sequence[labeling.Chunk]) -> labeling.SampleFn:
  """`labeling`'s sample_fn: one sample of the policy per record, through the one generation
  function, from the chunk's seed. The policy is loaded on the first call (a finished or fully
  resumed run never loads it); each call prints a progress line."""
  path = checkpoints.resolve_checkpoint(config.policy_checkpoint, workdir, "sft",
                                        key="policy_checkpoint")
  chunk_of = {id(chunk.records[0]): chunk.index for chunk in chunks if chunk.records}
  state: dict = {}

  def sample(chunk_records: Sequence[dict], seed: int) -> list[str]:
    if "policy" not in state:
      print(f"label: sampling {config.samples_per_prompt} responses per prompt from {path}",
            flush=True)
      state["policy"] = policy = evaluate.load_policy(
          "policy", path, config.model, sharding.mesh_from_config(config.mesh))
      state["settings"] = decode.SamplingSettings.from_config(
          config.sampling, policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id)
      state["progress"] = progress.Progress("label", len(chunks),
                                            start_step=chunk_of.get(id(chunk_records[0]), 0),
                                            unit="sample")
    policy = state["policy"]
    started = time.time()
    prompts = [batching.record_prompt(r) for r in chunk_records]
    texts = decode.generate_responses(
        policy.model, policy.params, policy.tokenizer, prompts, settings=state["settings"],
        batch_size=config.batch_size, max_prompt_length=config.max_prompt_length,
        rng=jax.random.key(seed)).texts
    state["progress"].update(chunk_of.get(id(chunk_records[0]), 0) + 1, {},
                             len(texts) / max(time.time() - started, 1e-9))
    return texts

  return sample


def _rows_path(phase_dir: pathlib.Path) -> pathlib.Path:
  """pairs.jsonl for process 0; other processes of a multi-host job make the same sampling
  calls in lockstep and write an identical private copy (resumed the same way)."""
  index = jax.process_index()
  return phase_dir / (PAIRS_FILE if index == 0 else f"pairs.process{index}.jsonl")


def _collect_simulated(config, workdir, phase_dir, prompt_records, gold) -> dict:
  chunks = labeling.plan_chunks(prompt_records, config.chunk_size)
  print(f"label: {sum(len(v) for v in prompt_records.values())} prompts "
        f"({', '.join(f'{len(v)} {k}' for k, v in prompt_records.items())}) x "
        f"{config.samples_per_prompt} samples, {config.pairing} pairs, in {len(chunks)} chunks; "
        f"simulated teacher (temperature {config.teacher.temperature}, flip rate "
        f"{config.teacher.flip_rate})", flush=True)
  result = labeling.collect_judged_pairs(
      str(_rows_path(phase_dir)), prompt_records,
      sample_fn=policy_sampler(config, workdir, chunks),
      judge=simulated_judge(gold, temperature=float(config.teacher.temperature),
                            flip_rate=float(config.teacher.flip_rate),
                            gold_ties=config.teacher.get("gold_ties", "label")),
      num_samples=config.samples_per_prompt, chunk_size=config.chunk_size, seed=config.seed,
      labeler="simulated", annotator="teacher", pairing=config.pairing)
  if result["resumed_at_chunk"]:
    print(f"label: resumed at chunk {result['resumed_at_chunk'] + 1} of {result['chunks']}")
  return {"resumed_at_chunk": result["resumed_at_chunk"], "identical_not_paired":
          result["identical"]}


# ---------------------------------------------------------------------------------------------
# The web labeller.


def pairs_to_show(config, workdir, prompt_records) -> list[dict]:
  """Pairs for people to judge, sampled exactly as the simulated labeller samples them (the same
  prompts, K samples, pairing, side order), as label_server's pairs."""
  chunks = labeling.plan_chunks(prompt_records, config.chunk_size)
  sample_fn = policy_sampler(config, workdir, chunks)
  shown_first = lambda questions, a, b, rng: ["a"] * len(a)  # Records the sides as drawn.
  pairs = []
  for chunk in chunks:
    rows, _ = labeling.judge_chunk(chunk, sample_fn=sample_fn, judge=shown_first,
                                   num_samples=config.samples_per_prompt, seed=config.seed,
                                   labeler="web", annotator="", pairing=config.pairing)
    for row in rows:
      response_a, response_b = labeling.shown_sides(row)
      pairs.append({"pair_id": row["pair_id"], "split": row["split"], "prompt": row["prompt"],
                    "instruction": row["instruction"], "context": row["context"],
                    "response_a": response_a, "response_b": response_b})
  return pairs


def _serve_web(config, workdir, phase_dir, splits, gold) -> None:
  if config.pairs_to_judge:
    pairs = label_server.order_sides(label_server.load_pairs_to_judge(config.pairs_to_judge),
                                     config.seed)
  else:
    cached = phase_dir / PAIRS_TO_JUDGE_FILE
    if cached.is_file():
      pairs = label_server.load_pairs_to_judge(str(cached))
    else:
      pairs = pairs_to_show(config, workdir, _prompt_records(config, splits))
      if jax.process_index() == 0:
        _write_atomically(cached, "".join(json.dumps(p, ensure_ascii=False) + "\n"
                                          for p in pairs))
  if jax.process_index() != 0:
    return
  label_server.serve(pairs, phase_dir / PAIRS_FILE, host=config.web.host, port=config.web.port,
                     token=config.web.token or None, double_share=config.web.double_share,
                     seed=config.seed, lease_seconds=config.web.lease_seconds)
  rows = label_server.load_judged_rows(phase_dir / PAIRS_FILE)
  reference = None
  if gold is not None:
    by_prompt = records_by_prompt(splits)
    reference = {}
    for row in rows:
      record = by_prompt.get(row["prompt"])
      if record is not None:
        reference[row["pair_id"]] = gold_order(*gold([record, record],
                                                     list(labeling.shown_sides(row))))
  print(f"label: {len(rows)} judgements in {phase_dir / PAIRS_FILE} "
        f"({count_rows(rows)}); the teacher's gold order is the reference:")
  print(label_server.format_report(label_server.annotator_report(rows, reference)))


# ---------------------------------------------------------------------------------------------
# Judged pairs from a file.


def _label_row(obj) -> tuple[dict | None, str | None]:
  """One user-given judged pair as a pairs.jsonl row, or (None, what is wrong)."""
  if not isinstance(obj, dict):
    return None, f"expected a JSON object, got {type(obj).__name__}"
  for field in ("chosen", "rejected", "prompt", "instruction", "context", "judgement", "split",
                "pair_id", "annotator", "labeler"):
    if field in obj and not isinstance(obj[field], str):
      return None, f"field {field!r} must be a string, got {type(obj[field]).__name__}"
  for field in ("chosen", "rejected"):
    if field not in obj:
      return None, f"missing field {field!r}"
  if "prompt" not in obj and "instruction" not in obj:
    return None, "missing field 'prompt' (or 'instruction' and optional 'context')"
  judgement = obj.get("judgement", "a")
  if judgement not in labeling.JUDGEMENTS:
    return None, f"field 'judgement' is {judgement!r}, expected one of {labeling.JUDGEMENTS}"
  split = obj.get("split", labeling.TRAIN_SPLIT)
  if split not in labeling.SPLITS:
    return None, f"field 'split' is {split!r}, expected one of {labeling.SPLITS}"
  if judgement != "tie" and obj["chosen"] == obj["rejected"]:
    return None, "chosen and rejected are identical (nothing was preferred)"
  prompt = obj.get("prompt")
  if prompt is None:
    prompt = batching.format_prompt(obj["instruction"], obj.get("context", ""))
  row = {"pair_id": obj.get("pair_id") or label_server.content_pair_id(
             prompt, obj["chosen"], obj["rejected"]),
         "split": split, "prompt": prompt}
  for field in ("instruction", "context"):
    if field in obj:
      row[field] = obj[field]
  row.update(chosen=obj["chosen"], rejected=obj["rejected"], labeler=obj.get("labeler", "file"),
             annotator=obj.get("annotator", "file"), judgement=judgement)
  return row, None


def import_labels(path: str, out_path: pathlib.Path, *, heldout_fraction: float,
                  seed: int) -> dict:
  """Validates a user's judged pairs and writes them as pairs.jsonl rows (atomically).

  Raises:
    UserError: a missing file, a bad line (not JSON, a missing or ill-typed field, an unknown
      judgement or split, identical sides, a pair judged twice by one annotator), naming
      FILE:LINE; no pairs; a held-out share that leaves a part empty.
  """
  if not path:
    raise UserError("--config.labels: give the JSONL file of judged pairs for labeler=file")
  rows, seen, any_split = [], {}, False
  for line, obj, error in iter_jsonl(path):
    location = where(path, line)
    if error is not None:
      raise UserError(f"{location}: {error[1]}")
    row, message = _label_row(obj)
    if message:
      raise UserError(f"{location}: {message}")
    key = (row["pair_id"], row["annotator"])
    if key in seen:
      raise UserError(f"{location}: pair {row['pair_id']!r} judged by {row['annotator']!r} "
                      f"repeats line {seen[key]}")
    seen[key] = line
    any_split |= "split" in obj
    rows.append(row)
  if not rows:
    raise UserError(f"{path}: no judged pairs in the file")
  if not any_split:
    _hold_out_prompts(rows, heldout_fraction, seed, path)
  if jax.process_index() == 0:
    _write_atomically(out_path, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                        for row in rows))
  return {"source": path}


def _hold_out_prompts(rows: list[dict], fraction: float, seed: int, path: str) -> None:
  """Marks the rows of a seeded `fraction` of the distinct prompts as held out (in place)."""
  prompts = list(dict.fromkeys(row["prompt"] for row in rows))
  count = int(round(fraction * len(prompts)))
  if not 0 < count < len(prompts):
    raise UserError(f"{path}: {len(prompts)} distinct prompts and no 'split' field leave the "
                    f"{'held-out' if count == 0 else 'training'} part empty at "
                    f"--config.heldout_fraction={fraction}; give more pairs or mark held-out "
                    "pairs with \"split\": \"validation\"")
  held_out = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:count]}
  for row in rows:
    row["split"] = labeling.HELDOUT_SPLIT if row["prompt"] in held_out else labeling.TRAIN_SPLIT


# ---------------------------------------------------------------------------------------------
# Files and the report.


def read_rows(path: pathlib.Path) -> list[dict]:
  """The rows of a pairs.jsonl this phase wrote (every line a JSON object)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def count_rows(rows: Sequence[Mapping]) -> dict:
  """{split: {"pairs", "ties"}}."""
  counts: dict[str, dict[str, int]] = {}
  for row in rows:
    split = counts.setdefault(row.get("split", labeling.TRAIN_SPLIT), {"pairs": 0, "ties": 0})
    split["pairs"] += 1
    split["ties"] += row["judgement"] == "tie"
  return counts


def _write_atomically(path: pathlib.Path, text: str) -> None:
  temporary = path.with_name(path.name + ".tmp")
  with open(temporary, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def _write_json(path: pathlib.Path, value) -> None:
  _write_atomically(path, json.dumps(value, indent=2) + "\n")


def _print_summary(summary: Mapping, phase_dir: pathlib.Path) -> None:
  per_split = ", ".join(f"{split} {c['pairs']} pairs ({c['ties']} ties)"
                        for split, c in summary["per_split"].items())
  identical = sum((summary.get("identical_not_paired") or {}).values())
  print(f"label: {summary['rows']} judged pairs in {phase_dir / PAIRS_FILE}: {per_split}"
        + (f"; identical samples not paired (this run): {identical}" if identical else "")
        + f"; {summary['seconds']:.0f} s")
  agreement = summary.get("gold_agreement")
  if agreement:
    percent = lambda value: "n/a" if value is None else f"{100 * value:.1f}%"
    print("label: the labeller agrees with the teacher's noiseless gold order on " + ", ".join(
        f"{split} {percent(a['agreement'])} of {a['pairs']} ordered pairs"
        for split, a in agreement.items())
          + " (the ceiling for a reward model trained on these labels)")
