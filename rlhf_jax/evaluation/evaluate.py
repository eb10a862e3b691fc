"""Evaluation of trained systems: loading policies, reward-model scoring of texts, answers through
the one generation path (with the KL to SFT), best-of-N, PPO's held-out evaluation, and the splits
the `eval` phase (`rlhf_jax.phases.eval`) compares the systems on.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import builtin
from rlhf_jax.data import records
from rlhf_jax.data import teacher
from rlhf_jax.errors import UserError
from rlhf_jax.evaluation import metrics
from rlhf_jax.evaluation import report
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.training import ppo


@dataclasses.dataclass
class Policy:
  """A loaded policy: its module, params and tokenizer."""
  name: str
  model: gpt_neo.GPTNeo
  params: dict
  tokenizer: object


def load_policy(name: str, path: str, model_settings, mesh=None) -> Policy:
  """A policy's module, tokenizer and params (sharded on `mesh`, like training; None: one device)."""
  info = checkpoints.describe_model(path)
  tokenizer = checkpoints.load_tokenizer(info, name)
  params = checkpoints.load_params(info, mesh)
  params = {k: v for k, v in params.items() if k != "score"}
  return Policy(name, gpt_neo.build(info["config"], model_settings), params, tokenizer)


class Scorer:
  """Reward-model scores of (prompt, response) texts, batched with fixed shapes (one compile)."""

  def __init__(self, path: str, model_settings, *, batch_size: int, max_length: int, mesh=None):
    info = checkpoints.describe_model(path)
    if not info["score_head"]:
      raise UserError(f"{path}: not a reward model (no score head)")
    self.tokenizer = checkpoints.load_tokenizer(info, "reward")
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


def answer(policy: Policy, prompts: list[str], *, settings: decode.SamplingSettings,
           batch_size: int, max_prompt_length: int, rng: jax.Array,
           sft: Policy | None = None) -> decode.Responses:
  """One response per prompt (`decode.generate_responses`); with `sft` (same tokenizer), also
  `extras["kl"]`, the KL to SFT per sample (`ppo.reference_kl`)."""
  per_batch = None
  if sft is not None:
    per_batch = lambda ids, mask, samples: {"kl": ppo.reference_kl(
        sft.model, sft.params, ids, mask, samples, settings.temperature or 1.0)}
  return decode.generate_responses(policy.model, policy.params, policy.tokenizer, prompts,
                                   settings=settings, batch_size=batch_size,
                                   max_prompt_length=max_prompt_length, rng=rng,
                                   per_batch=per_batch)


def sample_candidates(policy: Policy, scorer: Scorer, prompts: list[str], n: int, *,
                      rng: jax.Array, **kwargs) -> tuple[list[decode.Responses], np.ndarray]:
  """n samples per prompt from `policy` (`answer`, one pass per sample index), scored by the
  reward model. Returns (n `Responses` aligned with `prompts`, scores [len(prompts), n])."""
  candidates, scores = [], []
  for rng_i in jax.random.split(rng, n):
    candidates.append(answer(policy, prompts, rng=rng_i, **kwargs))
    scores.append(scorer(prompts, candidates[-1].texts))
  return candidates, np.stack(scores, axis=1)


def pick_best(candidates: list[decode.Responses],
              scores: np.ndarray) -> tuple[decode.Responses, np.ndarray, np.ndarray]:
  """Best-of-N among `candidates` (the highest score; ties to the lowest index, as
  `metrics.best_of_n_indices`). Returns (responses, their scores [P], the chosen index [P])."""
  choice = np.asarray(metrics.best_of_n_indices(jnp.asarray(scores)))
  rows = np.arange(len(choice))
  pick = lambda field: np.stack([getattr(c, field) for c in candidates], axis=1)[rows, choice]
  chosen = lambda field: [getattr(candidates[c], field)[i] for i, c in enumerate(choice)]
  responses = decode.Responses(chosen("texts"), chosen("token_ids"), chosen("logprobs"),
                               pick("lengths"), pick("ended"))
  return responses, scores[rows, choice], choice


def best_of_n(policy: Policy, scorer: Scorer, prompts: list[str], n: int, *, rng: jax.Array,
              **kwargs) -> tuple[decode.Responses, np.ndarray]:
  """RO: n samples per prompt from `policy`, the highest-scoring one kept. Returns
  (responses, scores [len(prompts)])."""
  responses, scores, _ = pick_best(*sample_candidates(policy, scorer, prompts, n, rng=rng,
                                                      **kwargs))
  return responses, scores


def read_policy_evaluations(metrics_path) -> list[dict]:
  """The held-out evaluations a policy phase logged (`eval/kl` with `eval/score` and/or
  `eval/gold_mean`) in its metrics.jsonl, as `overoptimization.ppo_points` reads them:
  `{"step", "kl", "reward_mean", "gold_mean"}` (None where not logged); [] without the file."""
  if not os.path.isfile(metrics_path):
    return []
  evaluations = []
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      row = json.loads(line)
      if "eval/kl" not in row:
        continue
      evaluations.append({"step": row["step"], "kl": row["eval/kl"],
                          "reward_mean": row.get("eval/score"),
                          "gold_mean": row.get("eval/gold_mean")})
  return evaluations


def held_out_policy_eval(models: ppo.Models, tokenizer, prompts: list[str],
                         verifiable: list[dict], *, reference, reward_params,
                         settings: ppo.PPOSettings, batch_size: int, max_prompt_length: int,
                         seed: int):
  """`params -> metrics` on held-out prompts (a policy phase's periodic evaluation), on samples
  drawn with the rollout settings: `score` (the reward model's mean; left out when
  `reward_params` is None), `kl` (mean KL to the reference, nats per sequence) and, on
  `verifiable` records (aligned with `prompts`; empty: not measured), `gold_mean` (the simulated
  teacher's mean gold score of the same samples) and greedy `exact_match`. Logged as eval/score,
  eval/kl, eval/gold_mean, eval/exact_match: the over-optimisation curve's points.

  The frozen models are arguments of the compiled calls (not constants baked into them)."""
  greedy = dataclasses.replace(settings.sampling, temperature=0.0)
  eos = settings.sampling.eos_token_id

  def score_and_kl(reward_params, reference, ids, mask, samples):
    out = {"kl": ppo.reference_kl(models.reference, reference, ids, mask, samples,
                                  settings.temperature)}
    if reward_params is not None:
      out["score"] = ppo.score_responses(models.reward, reward_params, ids, mask, samples.tokens,
                                         samples.mask, eos)
    return out

  score_and_kl = jax.jit(score_and_kl)
  generate = lambda params, sampling, rng, per_batch=None: decode.generate_responses(
      models.policy, params, tokenizer, prompts, settings=sampling, batch_size=batch_size,
      max_prompt_length=max_prompt_length, rng=rng, per_batch=per_batch)

  def evaluate(params) -> dict:
    sampled = generate(params, settings.sampling, jax.random.key(seed),
                       lambda ids, mask, samples: score_and_kl(reward_params, reference, ids,
                                                               mask, samples))
    result = {name: float(np.mean(sampled.extras[name])) for name in ("score", "kl")
              if name in sampled.extras}
    if verifiable:
      result["gold_mean"] = float(np.mean(teacher.gold_scores(verifiable, sampled.texts)))
      texts = generate(params, greedy, jax.random.key(0)).texts
      result["exact_match"] = metrics.exact_match(verifiable, texts, builtin.check_answer)
    return result

  return evaluate


def splits_and_levels(config) -> tuple[dict[str, list[dict]], dict[int, str]]:
  """The evaluated splits (`test`, `ood_1`, ...; at most `eval_prompts` each) and level names."""
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
  n = config.eval_prompts
  return {name: splits[name][:n] for name in chosen if splits.get(name)}, levels
