"""The whole pipeline (no --phase): each phase in turn in one workdir, skipping finished ones
(configs/pipeline.py lists them: init, sft, label, reward, ppo, eval), then, with `rounds` > 0,
iterated RLHF as Anthropic's online rounds did it (Bai et al. 2022, section 4.5).

Round R (1, 2, ...) runs the label, reward, ppo and eval phases, unchanged, with their configs'
paths pointed at the round's inputs and WORKDIR/round_R as their workdir:
  label   samples of the current policy (round 1: WORKDIR/sft; later: round R-1's PPO policy)
          judged by the configured labeller (the simulated teacher), seed `label.seed` + R - 1;
  reward  from WORKDIR/sft, on every round's judgements so far: pairs.source is
          round_R/all_pairs.jsonl, the rows of round_1/label/pairs.jsonl ... round_R's in order,
          each pair_id prefixed with its round ("round_1/train:3:0-1") so that ids stay unique;
  ppo     against round R's reward model, starting from the SFT policy (`ppo_init=sft`) or from
          round R-1's PPO policy (`ppo_init=last`); the KL reference is the SFT policy;
  eval    SFT, RO and round R's RLHF, judged by the teacher (gold mean, gold win-rate vs SFT).
Each phase skips its finished output and resumes a partial one, so a killed run restarts where it
stopped; a round whose eval.json exists is skipped whole. After each round the gold score and the
round's time are printed and saved in WORKDIR/rounds.json.
"""

import copy
import json
import pathlib
import time

from rlhf_jax import phases
from rlhf_jax.errors import UserError

ROUND_PHASES = ("label", "reward", "ppo", "eval")
ROUNDS_FILE = "rounds.json"
ALL_PAIRS_FILE = "all_pairs.jsonl"  # In WORKDIR/round_R: every round's judgements so far.
PPO_INIT = ("sft", "last")


def run(config, workdir: pathlib.Path) -> None:
  workdir = pathlib.Path(workdir)
  names = [p.strip() for p in config.phases.split(",") if p.strip()]
  unknown = [p for p in names if p not in config]
  if unknown:
    raise UserError(f"--config.phases: unknown phase(s) {', '.join(unknown)}")
  rounds = int(config.get("rounds", 0))
  if rounds:
    _check_rounds(config)
  start = time.time()
  for index, phase in enumerate(names, 1):
    print(f"\n=== [{index}/{len(names)}] {phase} (elapsed {time.time() - start:.0f} s) ===",
          flush=True)
    # An entry that is not a phase (ppo_gold) names the phase it runs.
    phases.run_phase(config[phase].get("phase", phase), config[phase], workdir)
  if rounds:
    run_rounds(config, workdir, rounds, start)
    return
  eval_dir = workdir / "eval"
  print(f"\npipeline: done in {time.time() - start:.0f} s. Report: {eval_dir / 'eval.md'}; "
        f"plots: {eval_dir / 'reward_by_system.png'}, {eval_dir / 'ood_robustness.png'}, "
        f"{eval_dir / 'overoptimization.png'}")


# ---------------------------------------------------------------------------------------------
# Iterated rounds.


def _check_rounds(config) -> None:
  if int(config.rounds) < 0:
    raise UserError(f"--config.rounds={config.rounds}: must be >= 0")
  if config.get("ppo_init", "sft") not in PPO_INIT:
    raise UserError(f"--config.ppo_init={config.ppo_init}: use one of {', '.join(PPO_INIT)}")
  missing = [p for p in ROUND_PHASES if p not in config]
  if missing:
    raise UserError(f"--config.rounds={config.rounds}: the config has no {', '.join(missing)} "
                    "section (use --config=configs/pipeline.py:iterated)")
  if config.label.labeler == "web":
    raise UserError("--config.label.labeler=web: the page serves until Ctrl-C, so rounds cannot "
                    "follow it; label each round with labeler=file (the page's pairs.jsonl)")


def round_dir(workdir: pathlib.Path, index: int) -> pathlib.Path:
  """WORKDIR/round_R: the workdir of round R's phases."""
  return pathlib.Path(workdir) / f"round_{index}"


def round_configs(config, workdir: pathlib.Path, index: int) -> dict:
  """Round `index`'s phase configs: copies of the pipeline's label, reward, ppo and eval sections
  whose checkpoint and pairs keys name the round's inputs (WORKDIR/round_R is their workdir)."""
  workdir = pathlib.Path(workdir)
  sft = config.ppo.sft_checkpoint or str(workdir / "sft")
  here, previous = round_dir(workdir, index), round_dir(workdir, index - 1)
  current_policy = sft if index == 1 else str(previous / "ppo")
  label, reward, ppo, evaluation = (copy.deepcopy(config[p]) for p in ROUND_PHASES)
  label.policy_checkpoint = current_policy
  label.seed = int(config.label.seed) + index - 1  # New samples and labelling noise each round.
  reward.init_checkpoint = config.reward.init_checkpoint or sft
  reward.pairs.source = str(here / ALL_PAIRS_FILE)
  ppo.sft_checkpoint = sft
  ppo.reward_checkpoint = str(here / "reward")
  ppo.policy_checkpoint = current_policy if config.ppo_init == "last" and index > 1 else ""
  evaluation.sft_checkpoint = sft
  evaluation.reward_checkpoint = str(here / "reward")
  evaluation.ppo_checkpoint = str(here / ppo.name)
  return {"label": label, "reward": reward, "ppo": ppo, "eval": evaluation}


def label_files(configs: dict, workdir: pathlib.Path, index: int) -> list[pathlib.Path]:
  """The label phase's pairs.jsonl of rounds 1..`index`."""
  return [round_dir(workdir, k) / configs["label"].name / "pairs.jsonl"
          for k in range(1, index + 1)]


def merge_judgements(sources: list[pathlib.Path], out: pathlib.Path) -> int:
  """Writes the judged rows of `sources` (round 1's first) to `out`, each `pair_id` prefixed with
  its file's round directory ("round_2/train:3:0-1"): the label phase numbers pairs by prompt,
  and rounds judge the same prompts, so the ids would repeat. Written through a temporary file
  (a kill leaves the old file or the new one); returns the number of rows."""
  rows = 0
  partial = out.with_suffix(".jsonl.tmp")
  with open(partial, "w", encoding="utf-8") as f:
    for source in sources:
      prefix = source.parent.parent.name  # round_K
      with open(source, encoding="utf-8") as lines:
        for line in lines:
          if not line.strip():
            continue
          row = json.loads(line)
          row["pair_id"] = f"{prefix}/{row['pair_id']}"
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
          rows += 1
  partial.replace(out)
  return rows


def run_rounds(config, workdir: pathlib.Path, rounds: int, start: float) -> None:
  """Rounds 1..`rounds` (finished ones skipped); WORKDIR/rounds.json after each."""
  summary_path = workdir / ROUNDS_FILE
  previous = _read_rounds(summary_path)
  results = []
  for index in range(1, rounds + 1):
    configs = round_configs(config, workdir, index)
    here = round_dir(workdir, index)
    report = here / configs["eval"].name / "eval.json"
    known = previous.get(index)
    if report.is_file() and known is not None:
      print(f"\n=== round {index}/{rounds}: finished ({report}); skipping ===", flush=True)
      results.append(known)
      continue
    resumed = here.is_dir()
    round_start, seconds = time.time(), {}
    for phase in ROUND_PHASES:
      print(f"\n=== round {index}/{rounds}: {phase} (elapsed {time.time() - start:.0f} s) ===",
            flush=True)
      phase_start = time.time()
      if phase == "reward":
        count = merge_judgements(label_files(configs, workdir, index), here / ALL_PAIRS_FILE)
        print(f"pipeline: the reward model of round {index} trains on {count} judgements of "
              f"rounds 1-{index} ({here / ALL_PAIRS_FILE})", flush=True)
      phases.run_phase(phase, configs[phase], here)
      seconds[phase] = round(time.time() - phase_start, 1)
    entry = round_result(configs, here, index, policy=configs["label"].policy_checkpoint,
                         seconds=seconds, resumed=resumed)
    entry["seconds"] = round(time.time() - round_start, 1)
    results.append(entry)
    _write_rounds(summary_path, config, results)
    print(f"\n{describe_round(entry, rounds)} (elapsed {time.time() - start:.0f} s)", flush=True)
  _write_rounds(summary_path, config, results)
  print(f"\npipeline: {rounds} rounds done in {time.time() - start:.0f} s (this run). Per round "
        f"(gold mean of RLHF on the test prompts, win-rate vs SFT): {summary_path}")
  for entry in results:
    print("  " + describe_round(entry, rounds))


def round_result(configs: dict, here: pathlib.Path, index: int, *, policy: str,
                 seconds: dict, resumed: bool) -> dict:
  """Round `index`'s numbers from its phases' files: RLHF's and SFT's gold mean and RLHF's gold
  win-rate vs SFT per split (eval.json), the judgements (pairs.jsonl rows: this round's, and all
  rounds' so far, what the reward model read; ties included), the reward model's held-out accuracy
  and gold accuracy."""
  results = json.loads((here / configs["eval"].name / "eval.json").read_text())
  systems = results["systems"]
  splits = {}
  for split, rlhf in systems["RLHF"]["splits"].items():
    splits[split] = {key: rlhf.get(key) for key in (
        "gold_mean", "gold_ci95", "gold_win_rate_vs_sft", "gold_win_rate_vs_sft_ci95",
        "exact_match", "kl_to_sft", "reward_vs_sft")}
    splits[split]["sft_gold_mean"] = systems["SFT"]["splits"][split].get("gold_mean")
  label_rows = _count_rows(here / configs["label"].name / "pairs.jsonl")
  judgements = _count_rows(pathlib.Path(configs["reward"].pairs.source))
  final_reward = _last_metrics(here / "reward" / "metrics.jsonl", "eval/accuracy")
  return {"round": index, "policy_labelled": policy,
          "ppo_init": configs["ppo"].policy_checkpoint or configs["ppo"].sft_checkpoint,
          "judgements": label_rows, "judgements_so_far": judgements,
          "reward_accuracy": final_reward.get("eval/accuracy"),
          "reward_gold_accuracy": final_reward.get("eval/gold_accuracy"),
          "splits": splits, "phase_seconds": seconds, "resumed": resumed}


def describe_round(entry: dict, rounds: int) -> str:
  """One line: the round's gold numbers on the in-distribution test split and its time."""
  test = entry["splits"].get("test") or next(iter(entry["splits"].values()))
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
  num = lambda x, digits=3: "n/a" if x is None else f"{x:.{digits}f}"
  low, high = test.get("gold_win_rate_vs_sft_ci95") or (None, None)
  seconds = entry.get("seconds")
  return (f"round {entry['round']}/{rounds}: RLHF gold mean {num(test.get('gold_mean'))} (SFT "
          f"{num(test.get('sft_gold_mean'))}), gold win-rate vs SFT "
          f"{pct(test.get('gold_win_rate_vs_sft'))} [{pct(low)}, {pct(high)}], KL to SFT "
          f"{num(test.get('kl_to_sft'), 2)}; reward model on {entry['judgements_so_far']} "
          f"judgements (gold accuracy {pct(entry.get('reward_gold_accuracy'))}); round time "
          f"{'n/a' if seconds is None else f'{seconds:.0f} s'}"
          + (" (resumed)" if entry.get("resumed") else ""))


def _count_rows(path: pathlib.Path) -> int:
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if line.strip())


def _last_metrics(path: pathlib.Path, key: str) -> dict:
  """The last metrics.jsonl row holding `key`, merged with any later rows (the reward phase logs
  its gold accuracy in a row after the final evaluation)."""
  merged: dict = {}
  if not path.is_file():
    return merged
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if key in row:
      merged = dict(row)
    elif merged:
      merged.update(row)
  return merged


def _read_rounds(path: pathlib.Path) -> dict[int, dict]:
  if not path.is_file():
    return {}
  return {entry["round"]: entry for entry in json.loads(path.read_text()).get("rounds", [])}


def _write_rounds(path: pathlib.Path, config, results: list[dict]) -> None:
  """rounds.json: {"ppo_init", "rounds": [one entry per finished round]}, written whole through
  a temporary file so a kill never leaves half of it."""
  text = json.dumps({"ppo_init": config.ppo_init, "rounds": results}, indent=2)
  partial = path.with_suffix(".json.tmp")
  partial.write_text(text + "\n")
  partial.replace(path)
