"""The `eval` phase (alias `test`): the trained systems side by side, in distribution and out of it.

  python -m rlhf_jax.main --phase=eval --config=configs/eval.py --workdir=runs/default

Systems, all answering the same prompts with the same sampler and settings:
  RR    random responses: the reference response of another prompt of the same split;
  SFT   the SFT policy;
  RO    reward-only: best-of-N samples of the SFT policy, ranked by the reward model;
  RLHF  the PPO policy;
  plus any extra checkpoints (`extra_checkpoints`, e.g. an exported HF model or a base model).
Every response is scored as text: re-tokenised with the reward model's tokenizer and scored at its
last token, so systems with other tokenizers (and RR) are scored exactly like the policies. KL to
SFT is the per-sequence sum of log p_policy - log p_SFT over sampled tokens (policies sharing the
SFT tokenizer); for RO it is the analytic best-of-N value log N - (N-1)/N (Stiennon et al. 2020).

Writes WORKDIR/eval/{eval.json, eval.md, reward_by_system.png, ood_robustness.png, samples.jsonl}.
"""

import math
import pathlib

import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import builtin
from rlhf_jax.evaluation import evaluate
from rlhf_jax.evaluation import metrics
from rlhf_jax.evaluation import report
from rlhf_jax.models import decode


def run(config, workdir: pathlib.Path) -> None:
  out_dir = workdir / "eval"
  if (out_dir / "eval.json").is_file():
    print(f"eval: {out_dir} holds a finished report; skipping. Delete it or use another --workdir "
          "to evaluate again.")
    return
  mesh = sharding.mesh_from_config(config.mesh)
  splits, levels = evaluate.splits_and_levels(config)
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
  for entry in filter(None, (e.strip() for e in config.extra_checkpoints.split(","))):
    name, _, path = entry.rpartition("=")
    policies.append(evaluate.load_policy(name or pathlib.Path(path).name, path, config.model, mesh))
  check_fn = builtin.check_answer if config.data.source == "builtin" else None
  same_tokenizer = lambda p: p.tokenizer.get_vocab() == sft.tokenizer.get_vocab()
  systems: dict[str, dict] = {"RR": {"splits": {}}, "SFT": {"splits": {}}, "RO": {"splits": {}}}
  systems.update({p.name: {"splits": {}} for p in policies[1:]})
  samples: list[dict] = []
  rng = jax.random.key(config.seed)

  for split, split_records in splits.items():
    prompts = [batching.record_prompt(r) for r in split_records]
    references = [r["response"] for r in split_records]
    print(f"eval: {split} ({len(prompts)} prompts)", flush=True)
    # RR: prompt order[k] gets the reference of prompt order[k + 1], never its own.
    order = np.random.default_rng(config.seed).permutation(len(prompts))
    donor = np.empty_like(order)
    donor[order] = np.roll(order, -1)
    answers: dict[str, tuple[decode.Responses, np.ndarray]] = {}
    rr = decode.Responses([references[d] for d in donor], [], [], None, None)
    answers["RR"] = (rr, scorer(prompts, rr.texts))
    for policy in policies:
      settings = decode.SamplingSettings.from_config(
          config.sampling, policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id)
      rng, policy_rng = jax.random.split(rng)
      responses = evaluate.answer(policy, prompts, settings=settings, rng=policy_rng,
                                  sft=sft if same_tokenizer(policy) else None, **settings_args)
      answers[policy.name] = (responses, scorer(prompts, responses.texts))
      if policy is sft:
        rng, ro_rng = jax.random.split(rng)
        answers["RO"] = evaluate.best_of_n(sft, scorer, prompts, config.best_of_n,
                                           settings=settings, rng=ro_rng, **settings_args)
    sft_scores = answers["SFT"][1]
    for name, (responses, scores) in answers.items():
      kl = responses.extras.get("kl")
      if name == "RO":
        n = config.best_of_n
        kl = np.full(len(prompts), math.log(n) - (n - 1) / n)
      systems[name]["splits"][split] = metrics.system_metrics(
          responses=responses.texts, references=references, rewards=scores, kl=kl,
          lengths=responses.lengths, ended_with_eos=responses.ended, records=split_records,
          check_fn=check_fn, sft_rewards=None if name == "SFT" else sft_scores,
          seed=config.seed)
    if split == report.IN_DISTRIBUTION_SPLIT:
      for i, prompt in enumerate(prompts[:config.num_samples]):
        samples.append({"prompt": prompt, "reference": references[i], "systems": {
            name: {"response": r.texts[i], "reward": float(s[i])} for name, (r, s) in answers.items()}})

  for system in systems.values():
    system["ood_curve"] = {metric: [system["splits"].get(report.ood_split_name(level), {}).get(metric)
                                    for level in sorted(levels)]
                           for metric in ("reward_mean", "exact_match", "bleu")}
  signature = next((s["bleu_signature"] for sys in systems.values()
                    for s in sys["splits"].values() if s.get("bleu_signature")), None)
  results = {"systems": systems, "config": config.to_dict(), "bleu_signature": signature,
             "ood_levels": {str(k): v for k, v in levels.items()}}
  if jax.process_index() == 0:
    paths = report.write_report(out_dir, results, ood_levels=levels, samples=samples)
    print((out_dir / "eval.md").read_text())
    print("eval: report written:\n" + "\n".join(f"  {p}" for p in paths.values()))
