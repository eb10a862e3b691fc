"""The `eval` phase (alias `test`): the trained systems side by side, in distribution and out of it.

  python -m rlhf_jax.main --phase=eval --config=configs/eval.py --workdir=runs/default

Systems, all answering the same prompts with the same sampler and settings:
  RR    random responses: the reference response of another prompt of the same split;
  SFT   the SFT policy;
  RO    reward-only: best-of-N samples of the SFT policy, ranked by the reward model;
  RLHF  the PPO policy;
  RLHF-gold, GRPO, DPO   when WORKDIR/ppo_gold (PPO on the simulated teacher's gold score: the
        upper bound of RLHF), WORKDIR/grpo or WORKDIR/dpo holds a checkpoint (or the config names
        one: `ppo_gold_checkpoint`, `grpo_checkpoint`, `dpo_checkpoint`);
  plus any extra checkpoints (`extra_checkpoints`, e.g. an exported HF model or a base model).
On the built-in data every response is also judged by the simulated teacher (`data.teacher`):
per system and split the gold mean with its CI, the gold win-rate against SFT's response to the
same prompt (a tie half, bootstrap CI over prompts), the same against all of RO's SFT samples of
that prompt (`gold_win_rate_vs_sft_samples`: the same quantity without the noise of SFT's one
draw; RO's own pick is among them), the reward model's agreement with the teacher on the pairs a
system's answers form with SFT's, and the paired exact-match difference to SFT
(`metrics.system_metrics`); under SFT, per split, `oracle_best_of_8_exact_match`: the share of
prompts where any of 8 SFT samples is right (the first 8 of the samples RO ranks), and under each
other system `exact_match_oracle_gap_closed`, the share of the gap from SFT's exact match to that
oracle its own gain closes. Over-optimisation (`overoptimization.png`, `eval.json`'s
`overoptimization`): best-of-n for n = 1, 2, 4, ..., `overoptimization_samples` from that many
SFT samples per in-distribution (`test`) prompt, scored by the reward model and the teacher
(the same sampling pass gives RO, the best of its first `best_of_n`), and PPO's held-out
evaluations along training from WORKDIR/ppo/metrics.jsonl (and ppo_gold's), plotted against
sqrt(KL to SFT).
Every response is scored as text: re-tokenised with the reward model's tokenizer and scored at its
last token, so systems with other tokenizers (and RR) are scored exactly like the policies. KL to
SFT is the per-sequence sum of log p_policy - log p_SFT over sampled tokens (policies sharing the
SFT tokenizer); for RO it is the analytic best-of-N value log N - (N-1)/N (Stiennon et al. 2020).

Writes WORKDIR/eval/ (or WORKDIR/`name`/) {eval.json, eval.md, reward_by_system.png,
ood_robustness.png, overoptimization.png (built-in data), samples.jsonl}.
"""

import math
import pathlib
import zlib

import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import phases
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import builtin
from rlhf_jax.data import teacher
from rlhf_jax.evaluation import evaluate
from rlhf_jax.evaluation import metrics
from rlhf_jax.evaluation import overoptimization
from rlhf_jax.evaluation import report
from rlhf_jax.models import decode


# SFT samples per prompt of the oracle best-of-n exact match (`metrics.oracle_exact_match`),
# reported under SFT as `oracle_best_of_8_exact_match`, and each other system's share of the gap
# to it (`exact_match_oracle_gap_closed`); the first of the same samples RO ranks.
ORACLE_N = 8

# Policy systems evaluated when their phase has a checkpoint in the workdir (or the config names
# one): (system, config key, the phase's WORKDIR subdirectory).
OPTIONAL_POLICIES = (("RLHF-gold", "ppo_gold_checkpoint", "ppo_gold"),
                     ("GRPO", "grpo_checkpoint", "grpo"), ("DPO", "dpo_checkpoint", "dpo"))


def optional_policy_paths(config, workdir: pathlib.Path) -> list[tuple[str, str]]:
  """(system, checkpoint) of the `OPTIONAL_POLICIES` that are given or present in the workdir."""
  found = []
  for system, key, phase in OPTIONAL_POLICIES:
    given = config.get(key, "")
    if given:
      found.append((system, given))
    elif checkpoints.find_checkpoint_dir(workdir / phase) is not None:
      found.append((system, str(workdir / phase)))
  return found


def sampling_key(seed: int, split: str, system: str) -> jax.Array:
  """The sampling key of one system on one split, from the eval seed and the two names only.

  A system's answers then stay the same whichever other systems are evaluated beside it (a key
  handed down a chain of splits would move every later draw when one more policy joined).
  """
  key = jax.random.key(seed)
  for name in (split, system):
    key = jax.random.fold_in(key, zlib.crc32(name.encode()))
  return key


def policy_points(workdir: pathlib.Path) -> list[dict]:
  """Over-optimisation points of the PPO runs along training: their held-out evaluations in
  WORKDIR/ppo/metrics.jsonl (method "ppo") and WORKDIR/ppo_gold/metrics.jsonl ("ppo_gold")."""
  points = []
  for method, phase in ((overoptimization.PPO, "ppo"), ("ppo_gold", "ppo_gold")):
    # PPO's held-out evaluation logs eval/kl, eval/score (none for PPO on gold alone) and, on
    # the built-in data, eval/gold_mean (`evaluate.held_out_policy_eval`).
    for point in overoptimization.ppo_points(
        evaluate.read_policy_evaluations(workdir / phase / "metrics.jsonl")):
      points.append({**point, "method": method})
  return points


def run(config, workdir: pathlib.Path) -> None:
  out_dir = phases.output_dir(config, workdir, "eval")
  if (out_dir / "eval.json").is_file():
    print(f"eval: {out_dir} holds a finished report; skipping. Delete it or use another --workdir "
          "to evaluate again.")
    return
  mesh = sharding.mesh_from_config(config.mesh)
  settings_args = dict(batch_size=config.eval_batch_size,
                       max_prompt_length=config.max_prompt_length)
  checkpoint = lambda given, phase: checkpoints.resolve_checkpoint(given, workdir, phase,
                                                                   key=f"{phase}_checkpoint")
  scorer = evaluate.Scorer(checkpoint(config.reward_checkpoint, "reward"),
                           config.model, batch_size=config.eval_batch_size,
                           max_length=config.max_prompt_length + config.sampling.max_new_tokens,
                           mesh=mesh)
  sft = evaluate.load_policy("SFT", checkpoint(config.sft_checkpoint, "sft"), config.model, mesh)
  policies = [sft, evaluate.load_policy("RLHF", checkpoint(config.ppo_checkpoint, "ppo"),
                                        config.model, mesh)]
  for name, path in optional_policy_paths(config, workdir):
    print(f"eval: {name} from {path}")
    policies.append(evaluate.load_policy(name, path, config.model, mesh))
  for entry in filter(None, (e.strip() for e in config.extra_checkpoints.split(","))):
    name, _, path = entry.rpartition("=")
    policies.append(evaluate.load_policy(name or pathlib.Path(path).name, path, config.model, mesh))
  # After the checkpoints: a missing one is named before the built-in set is generated (seconds).
  splits, levels = evaluate.splits_and_levels(config)
  builtin_data = config.data.source == "builtin"
  check_fn = builtin.check_answer if builtin_data else None
  # The simulated teacher judges built-in questions only (no gold on Dolly).
  gold_fn = teacher.gold_scores if builtin_data else None
  same_tokenizer = lambda p: p.tokenizer.get_vocab() == sft.tokenizer.get_vocab()
  systems: dict[str, dict] = {"RR": {"splits": {}}, "SFT": {"splits": {}}, "RO": {"splits": {}}}
  systems.update({p.name: {"splits": {}} for p in policies[1:]})
  samples: list[dict] = []
  points: list[dict] = []

  for split, split_records in splits.items():
    prompts = [batching.record_prompt(r) for r in split_records]
    references = [r["response"] for r in split_records]
    print(f"eval: {split} ({len(prompts)} prompts)", flush=True)
    # RR: prompt order[k] gets the reference of prompt order[k + 1], never its own.
    order = np.random.default_rng(config.seed).permutation(len(prompts))
    donor = np.empty_like(order)
    donor[order] = np.roll(order, -1)
    answers: dict[str, tuple[decode.Responses, np.ndarray]] = {}
    oracle = curve_args = candidate_gold = None
    gold: dict[str, np.ndarray] = {}
    rr = decode.Responses([references[d] for d in donor], [], [], None, None)
    answers["RR"] = (rr, scorer(prompts, rr.texts))
    for policy in policies:
      settings = decode.SamplingSettings.from_config(
          config.sampling, policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id)
      responses = evaluate.answer(policy, prompts, settings=settings,
                                  rng=sampling_key(config.seed, split, policy.name),
                                  sft=sft if same_tokenizer(policy) else None, **settings_args)
      answers[policy.name] = (responses, scorer(prompts, responses.texts))
      if policy is sft:
        # On the in-distribution split one sampling pass serves RO (best of the first N) and
        # the over-optimisation curve (best-of-n for n up to overoptimization_samples).
        curve = (gold_fn is not None and split == report.IN_DISTRIBUTION_SPLIT
                 and config.overoptimization_samples > 0)
        num = max(config.best_of_n, config.overoptimization_samples if curve else 0,
                  ORACLE_N if check_fn is not None else 0)
        candidates, scores = evaluate.sample_candidates(sft, scorer, prompts, num,
                                                        rng=sampling_key(config.seed, split, "RO"),
                                                        settings=settings, **settings_args)
        oracle = metrics.oracle_exact_match(split_records,
                                            [c.texts for c in candidates[:ORACLE_N]], check_fn)
        ro, ro_scores, choice = evaluate.pick_best(candidates[:config.best_of_n],
                                                   scores[:, :config.best_of_n])
        answers["RO"] = (ro, ro_scores)
        if gold_fn is not None:
          # Every SFT sample judged once: RO's gold, the win-rates against SFT's samples and
          # the curve.
          candidate_gold = np.stack([gold_fn(split_records, c.texts) for c in candidates], 1)
          gold["RO"] = candidate_gold[np.arange(len(prompts)), choice]
        if curve:
          # The curve stops at overoptimization_samples even when the oracle drew more.
          curve_n = max(config.overoptimization_samples, config.best_of_n)
          curve_args = dict(
              proxy_scores=scores[:, :curve_n], gold_scores=candidate_gold[:, :curve_n],
              ns=[n for n in overoptimization.DEFAULT_NS if n <= config.overoptimization_samples])
    if gold_fn is not None:
      for name, (responses, _) in answers.items():
        if name not in gold:
          gold[name] = gold_fn(split_records, responses.texts)
    if curve_args is not None:
      # Best-of-n win-rates against a random one of the same SFT samples (by the reward model's
      # pick and by the teacher's): where learning from this reward model, and from SFT's
      # samples, stops.
      points += overoptimization.best_of_n_points(**curve_args,
                                                  baseline_gold=curve_args["gold_scores"])
    sft_scores, sft_texts = answers["SFT"][1], answers["SFT"][0].texts
    for name, (responses, scores) in answers.items():
      kl = responses.extras.get("kl")
      if name == "RO":
        n = config.best_of_n
        kl = np.full(len(prompts), math.log(n) - (n - 1) / n)
      is_sft = name == "SFT"
      systems[name]["splits"][split] = metrics.system_metrics(
          responses=responses.texts, references=references, rewards=scores, kl=kl,
          lengths=responses.lengths, ended_with_eos=responses.ended, records=split_records,
          check_fn=check_fn, sft_rewards=None if is_sft else sft_scores,
          sft_responses=None if is_sft else sft_texts, gold=gold.get(name),
          sft_gold=None if is_sft or not gold else gold["SFT"], sft_sample_gold=candidate_gold,
          seed=config.seed)
    if oracle is not None:
      sft_split = systems["SFT"]["splits"][split]
      sft_split[f"oracle_best_of_{ORACLE_N}_exact_match"] = oracle
      for name in answers:
        if name not in ("SFT", "RR"):
          split_metrics = systems[name]["splits"][split]
          split_metrics["exact_match_oracle_gap_closed"] = metrics.oracle_gap_closed(
              split_metrics["exact_match"], sft_split["exact_match"], oracle)
    if split == report.IN_DISTRIBUTION_SPLIT:
      for i, prompt in enumerate(prompts[:config.num_samples]):
        samples.append({"prompt": prompt, "reference": references[i], "systems": {
            name: {"response": r.texts[i], "reward": float(s[i]),
                   **({"gold": float(gold[name][i])} if name in gold else {})}
            for name, (r, s) in answers.items()}})

  for system in systems.values():
    system["ood_curve"] = {metric: [system["splits"].get(report.ood_split_name(level), {}).get(metric)
                                    for level in sorted(levels)]
                           for metric in ("reward_mean", "exact_match", "bleu", "gold_mean")}
  if gold_fn is not None:
    points += policy_points(workdir)
  signature = next((s["bleu_signature"] for sys in systems.values()
                    for s in sys["splits"].values() if s.get("bleu_signature")), None)
  results = {"systems": systems, "config": config.to_dict(), "bleu_signature": signature,
             "ood_levels": {str(k): v for k, v in levels.items()}}
  if jax.process_index() == 0:
    paths = report.write_report(out_dir, results, ood_levels=levels, samples=samples,
                                overoptimization=points or None)
    print((out_dir / "eval.md").read_text())
    print("eval: report written:\n" + "\n".join(f"  {p}" for p in paths.values()))
