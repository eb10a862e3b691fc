"""The eval phase (alias `test`): the trained systems side by side, in distribution and out of it.

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

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sampling
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import builtin
from rlhf_jax.data import records
from rlhf_jax.errors import UserError
from rlhf_jax.evaluation import metrics
from rlhf_jax.evaluation import report
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import ppo
from rlhf_jax.training import ppo_core


@dataclasses.dataclass
class Policy:
  """A loaded policy: its module, params and tokenizer."""
  name: str
  model: gpt_neo.GPTNeo
  params: dict
  tokenizer: object


@dataclasses.dataclass
class Responses:
  """One system's answers to one split: texts, per-sample lengths/EOS flags and KL to SFT."""
  texts: list[str]
  lengths: np.ndarray | None = None
  ended: np.ndarray | None = None
  kl: np.ndarray | None = None


def load_policy(name: str, path: str, model_settings, mesh=None) -> Policy:
  """A policy's module, tokenizer and params (sharded on `mesh`, like training; None: one device)."""
  info = checkpoints.describe_model(path)
  if info["tokenizer_dir"] is None:
    raise UserError(f"{path}: the {name} checkpoint has no tokenizer files")
  params = checkpoints.load_params(info, mesh)
  params = {k: v for k, v in params.items() if k != "score"}
  return Policy(name, gpt_neo.build(info["config"], model_settings), params,
                hf.load_tokenizer(info["tokenizer_dir"]))


def _phase_path(configured: str, workdir: pathlib.Path, phase: str, key: str) -> str:
  if configured:
    return configured
  if checkpoints.find_checkpoint_dir(workdir / phase) is None:
    raise UserError(f"eval: no {phase} checkpoint in {workdir / phase}; run --phase={phase} first "
                    f"or set --config.{key}")
  return str(workdir / phase)


class Scorer:
  """Reward-model scores of (prompt, response) texts, batched with fixed shapes (one compile)."""

  def __init__(self, path: str, model_settings, *, batch_size: int, max_length: int, mesh=None):
    info = checkpoints.describe_model(path)
    if not info["score_head"]:
      raise UserError(f"{path}: not a reward model (no score head)")
    if info["tokenizer_dir"] is None:
      raise UserError(f"{path}: the reward checkpoint has no tokenizer files")
    self.tokenizer = hf.load_tokenizer(info["tokenizer_dir"])
    self.model = gpt_neo.build(info["config"], model_settings, score_head=True)
    self.params = checkpoints.load_params(info, mesh)  # Sharded like training (None: one device).
    self.mesh = mesh
    self.batch_size, self.max_length = batch_size, max_length
    self._score = jax.jit(lambda params, ids, seg: gpt_neo.sequence_scores(
        self.model.apply({"params": params}, ids, seg, lm_head=False)["scores"], seg))

  def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
    """float32 [len(prompts)]: prompt + response (no EOS, right-padded), the response cut to fit."""
    encode = lambda texts: self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    pad = self.tokenizer.pad_token_id
    scores = []
    for start in range(0, len(prompts), self.batch_size):
      chunk_p = encode(prompts[start:start + self.batch_size])
      chunk_r = encode(responses[start:start + self.batch_size])
      ids = np.full((self.batch_size, self.max_length), pad, np.int32)
      seg = np.zeros((self.batch_size, self.max_length), np.int32)
      for row, (p, r) in enumerate(zip(chunk_p, chunk_r)):
        tokens = (p[-self.max_length:] + r)[:self.max_length]
        ids[row, :len(tokens)], seg[row, :len(tokens)] = tokens, 1
      seg[len(chunk_p):, 0] = 1  # Filler rows: one token, result dropped.
      if self.mesh is not None:
        ids, seg = sharding.global_batch((ids, seg), self.mesh)
      scores.append(sharding.to_host(self._score(self.params, ids, seg))[:len(chunk_p)])
    return np.concatenate(scores)


def generate_responses(policy: Policy, prompts: list[str], *, settings: sampling.SamplingSettings,
                       batch_size: int, max_prompt_length: int, rng: jax.Array,
                       sft: Policy | None = None) -> Responses:
  """Samples one response per prompt; with `sft` (same tokenizer), also the KL to SFT per sample.

  With params on a mesh, batches are split over its data x fsdp devices and results gathered."""
  temperature = settings.temperature or 1.0
  mesh = sharding.mesh_of(policy.params)

  @jax.jit
  def kl_to_sft(sft_params, ids, mask, samples):
    seqs = ppo._sequences(ids, mask, samples.tokens, samples.mask)
    sft_logprobs = ppo._response_outputs(sft.model, sft_params, seqs, ids.shape[1],
                                         settings.max_new_tokens, lm_head=True,
                                         temperature=temperature, tokens=samples.tokens)["logprobs"]
    return ppo_core.kl_estimates(samples.logprobs, sft_logprobs, samples.mask)["k1"]

  texts, lengths, ended, kls = [], [], [], []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    ids, mask = batching.prompt_batch(policy.tokenizer, padded, max_prompt_length)
    if mesh is not None:
      ids, mask = sharding.global_batch((ids, mask), mesh)
    rng, batch_rng = jax.random.split(rng)
    samples = sampling.generate(policy.model, policy.params, ids, mask, batch_rng, settings)
    if sft is not None:
      kls.append(sharding.to_host(kl_to_sft(sft.params, ids, mask, samples))[:len(chunk)])
    host = sharding.to_host(samples)
    for i in range(len(chunk)):
      n, eos = int(host.lengths[i]), bool(host.ended[i])
      texts.append(policy.tokenizer.decode(host.tokens[i, :n - int(eos)]))
      lengths.append(n)
      ended.append(eos)
  return Responses(texts, np.array(lengths), np.array(ended),
                   np.concatenate(kls) if kls else None)


def best_of_n(policy: Policy, scorer: Scorer, prompts: list[str], n: int, **kwargs) -> tuple:
  """RO: n samples per prompt from `policy`, the highest-scoring one kept. Returns
  (Responses, scores [len(prompts)])."""
  rng = kwargs.pop("rng")
  candidates, scores = [], []
  for rng_i in jax.random.split(rng, n):
    candidates.append(generate_responses(policy, prompts, rng=rng_i, **kwargs))
    scores.append(scorer(prompts, candidates[-1].texts))
  choice = np.asarray(metrics.best_of_n_indices(jnp.asarray(np.stack(scores, axis=1))))
  rows = np.arange(len(prompts))
  pick = lambda field: np.stack([getattr(c, field) for c in candidates], axis=1)[rows, choice]
  texts = [candidates[c].texts[i] for i, c in enumerate(choice)]
  return Responses(texts, pick("lengths"), pick("ended")), np.stack(scores, axis=1)[rows, choice]


def _splits_and_levels(config) -> tuple[dict[str, list[dict]], dict[int, str]]:
  """The evaluated splits (`test`, `ood_1`, ...; at most `num_prompts` each) and level names."""
  splits = records.load_splits(config.data)
  if config.data.source == "builtin":
    levels = dict(builtin.OOD_LEVELS)
    chosen = {report.ood_split_name(level): level for level in levels}
  else:
    levels = {0: "in-distribution (test split)"}
    chosen = {"test": 0}
    if splits.get("ood"):
      levels[1] = f"held-out categories ({', '.join(config.data.ood_categories)})"
      splits["ood_1"] = splits["ood"]
      chosen["ood_1"] = 1
  n = config.num_prompts
  return {name: splits[name][:n] for name in chosen if splits.get(name)}, levels


def run(config, workdir: pathlib.Path) -> None:
  out_dir = workdir / "eval"
  if (out_dir / "eval.json").is_file():
    print(f"eval: {out_dir} holds a finished report; skipping. Delete it or use another --workdir "
          "to evaluate again.")
    return
  mesh = sharding.mesh_from_config(config.mesh)
  splits, levels = _splits_and_levels(config)
  settings_args = dict(batch_size=config.batch_size, max_prompt_length=config.max_prompt_length)
  scorer = Scorer(_phase_path(config.reward_checkpoint, workdir, "reward", "reward_checkpoint"),
                  config.model, batch_size=config.batch_size,
                  max_length=config.max_prompt_length + config.sampling.max_new_tokens, mesh=mesh)
  sft = load_policy("SFT", _phase_path(config.sft_checkpoint, workdir, "sft", "sft_checkpoint"),
                    config.model, mesh)
  policies = [sft, load_policy("RLHF", _phase_path(config.ppo_checkpoint, workdir, "ppo",
                                                   "ppo_checkpoint"), config.model, mesh)]
  for entry in filter(None, (e.strip() for e in config.extra_checkpoints.split(","))):
    name, _, path = entry.rpartition("=")
    policies.append(load_policy(name or pathlib.Path(path).name, path, config.model, mesh))
  check_fn = builtin.check_answer if config.data.source == "builtin" else None
  same_tokenizer = lambda p: p.tokenizer.get_vocab() == sft.tokenizer.get_vocab()
  systems: dict[str, dict] = {"RR": {"splits": {}}, "SFT": {"splits": {}}, "RO": {"splits": {}}}
  systems.update({p.name: {"splits": {}} for p in policies[1:]})
  samples: list[dict] = []
  rng = jax.random.key(config.seed)

  for split, split_records in splits.items():
    prompts = [batching.format_prompt(r["instruction"], r.get("context", "")) for r in split_records]
    references = [r["response"] for r in split_records]
    print(f"eval: {split} ({len(prompts)} prompts)", flush=True)
    # RR: prompt order[k] gets the reference of prompt order[k + 1], never its own.
    order = np.random.default_rng(config.seed).permutation(len(prompts))
    donor = np.empty_like(order)
    donor[order] = np.roll(order, -1)
    answers: dict[str, tuple[Responses, np.ndarray]] = {}
    rr = Responses([references[d] for d in donor])
    answers["RR"] = (rr, scorer(prompts, rr.texts))
    for policy in policies:
      settings = sampling.SamplingSettings.from_config(
          config.sampling, policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id)
      rng, policy_rng = jax.random.split(rng)
      responses = generate_responses(policy, prompts, settings=settings, rng=policy_rng,
                                     sft=sft if same_tokenizer(policy) else None, **settings_args)
      answers[policy.name] = (responses, scorer(prompts, responses.texts))
      if policy is sft:
        rng, ro_rng = jax.random.split(rng)
        answers["RO"] = best_of_n(sft, scorer, prompts, config.best_of_n, settings=settings,
                                  rng=ro_rng, **settings_args)
    sft_scores = answers["SFT"][1]
    for name, (responses, scores) in answers.items():
      kl = responses.kl
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
