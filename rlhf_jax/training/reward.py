"""The reward-model phase: a Bradley-Terry loss on preference pairs, through the shared loop.

  python -m rlhf_jax.main --phase=reward --config=configs/reward.py --workdir=runs/default

The model is the GPT-Neo trunk with a scalar `score` head read at the last real token of
prompt+response (the layout of HF `GPTNeoForSequenceClassification`, so `--phase=export`
writes one), initialised from `config.init_checkpoint` (default: this workdir's `sft/`). A
checkpoint without a score head gets a fresh one, normal with the model's default std
1/sqrt(d_model + 1); a checkpoint with one (an imported reward model) keeps it.

Preference pairs (`config.pairs.source`):
  * a file (`.jsonl` / `.jsonl.gz`: `{"prompt", "chosen", "rejected"}` lines or Anthropic
    HH-RLHF dialogues, see `rlhf_jax.data.preferences`). Held-out pairs are `pairs.eval_file`,
    or the pairs of a seeded `pairs.eval_fraction` of the file's distinct prompts (whole
    prompts, so no prompt is both trained on and held out).
  * "build": pairs built from the instruction data of the `data` section. `chosen` is the
    reference response, `rejected` a negative (`pairs.negatives_per_record` per record), each
    made by one strategy with the shares of `pairs.strategies`:
      other_response  another record's response: fluent but not an answer to this prompt;
      corrupted       the reference with a factually wrong answer (`builtin.corrupt`; built-in
                      set only). The negatives that teach the reward model to check facts,
                      which is what PPO needs from it; the default gives them the largest share.
      truncated       the reference cut at a random word boundary (complete answers win);
      shuffled        the reference's words in a random order (coherent text wins);
      policy_sample   a sample of the initial (SFT) policy, drawn with the project's sampler
                      (`generate.generate_texts`): the negatives closest to what PPO produces.
                      On the built-in set a sample that `builtin.check_answer` finds correct
                      is not a negative: each record gets `pairs.policy_tries` draws, the
                      first wrong one is its negative, and if every draw was correct (or
                      empty) the record is *replaced*: it gets a `corrupted` negative instead
                      (skipped where there is no corrupt function). Other data has no checker,
                      so its samples are taken as worse than the reference. All of this is
                      counted and printed.
    Held-out pairs are built the same way (`pairs.eval_negatives_per_record` per record) from
    the validation split; a held-out pair whose prompt is also a training prompt is dropped
    and counted.
  A bad pair (chosen == rejected, an empty side, longer than `max_length` under
  `pairs.too_long`) raises naming its file:line (or index), or with `pairs.skip_bad_records` is
  skipped and counted; the counts are printed.

Loss: -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2,
averaged over pairs (`loss.margin`, `loss.center_coef`: the centering of "Helping or Herding",
TRL's `center_rewards_coefficient`). Both sides are scored in one forward pass of the
concatenated [2B, T] batch; `train.accum_steps` and `model.remat` work as in every phase.
`loss.lm_coef` > 0 adds that times the next-token loss of the chosen responses under the
model's own tied LM head (`chosen_lm_loss`, logged as `lm_loss`): the SFT regulariser of GRM
(Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward Model for
LLMs"), which keeps the trunk's hidden states able to generate the preferred answers while the
score head trains, so the knowledge SFT put there is not trained away. It costs one vocabulary
projection of the chosen rows; the exported model is unchanged (the LM head is the tied
embedding).

Metrics (metrics.jsonl, TensorBoard, console): training `loss`, `accuracy`, `margin`; on the
held-out pairs every `train.eval_every` steps and at the end `eval/accuracy` (a tie counts one
half), `eval/margin`, `eval/loss`, `eval/length_baseline_accuracy` (prefer the longer response,
ties one half), `eval/length_correlation` (Pearson, reward vs response tokens over all held-out
responses) and `eval/accuracy/<strategy>`; at the end `reward/mean` and `reward/std`, the
reward on reference responses (distinct chosen responses of the training pairs, at most
`stats_samples`), saved as `manifest["reward_stats"]` for PPO's normalisation.
Writes WORKDIR/reward/{checkpoint/, metrics.jsonl, TensorBoard events}.
"""

import collections
import math
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sampling
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import builtin
from rlhf_jax.data import preferences
from rlhf_jax.data import records
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import progress
from rlhf_jax.training import sft

BUILD = "build"  # `pairs.source` value: build pairs from the `data` section's records.


# ------------------------------------------------------------------------------------------
# Scores, loss and metrics (pure, jit-able).
# ------------------------------------------------------------------------------------------
def _score_rows(model: gpt_neo.GPTNeo, params, batch: dict, rng) -> tuple[jax.Array, jax.Array]:
  """One forward pass of the concatenated [2B, T] batch: (rewards float32 [B, 2], final hidden
  states [2B, T, D]; pair b is rows 2b (chosen) and 2b + 1 (rejected))."""
  pairs, sides, length = batch["input_ids"].shape
  flat = lambda x: x.reshape(pairs * sides, length)  # [B, 2, T] -> [2B, T]
  segment_ids = flat(batch["segment_ids"])
  rngs = {} if rng is None else {"dropout": rng}
  out = model.apply({"params": params}, flat(batch["input_ids"]), segment_ids,
                    flat(batch["positions"]), deterministic=rng is None, rngs=rngs,
                    lm_head=False)
  scores = gpt_neo.sequence_scores(out["scores"], segment_ids).reshape(pairs, sides)
  return scores, out["hidden"]


def pair_scores(model: gpt_neo.GPTNeo, params, batch: dict, *, rng=None) -> jax.Array:
  """Rewards of both sides of every pair, from one forward pass of the concatenated batch.

  Args:
    model: a GPTNeo with a score head.
    params: its parameters.
    batch: a pair batch (see `rlhf_jax.data.batching`): `input_ids`, `segment_ids`,
      `positions`, int32 [B, 2, T].
    rng: dropout key; None runs deterministically.

  Returns:
    float32 [B, 2]: column 0 the chosen, column 1 the rejected reward, each read at the last
    real token of its sequence.
  """
  return _score_rows(model, params, batch, rng)[0]


def chosen_lm_loss(params, hidden: jax.Array, batch: dict) -> jax.Array:
  """Mean next-token loss of the chosen responses under the model's own (tied) LM head.

  Args:
    params: the reward model's parameters (`wte` is the LM head).
    hidden: final hidden states [2B, T, D] from `_score_rows`.
    batch: the pair batch (`input_ids`, `segment_ids` [B, 2, T], `response_length` [B, 2],
      `pair_mask` [B]).

  Returns:
    float32 scalar: mean negative log-likelihood per chosen response token of the real pairs.
  """
  chosen_hidden = hidden[0::2, :-1]  # Rows of the chosen sides; position t predicts token t+1.
  logits = jnp.einsum("btd,vd->btv", chosen_hidden,
                      params["wte"]["embedding"].astype(chosen_hidden.dtype),
                      preferred_element_type=jnp.float32)
  tokens = batch["input_ids"][:, 0]
  targets = tokens[:, 1:]
  log_probs = jax.nn.log_softmax(logits)
  token_loss = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  # Response tokens are the last `response_length` real tokens of the row; they are predicted
  # from the columns just before them.
  real = jnp.sum(batch["segment_ids"][:, 0] > 0, axis=1)
  start = real - batch["response_length"][:, 0]
  columns = jnp.arange(targets.shape[1])[None]
  predicts_response = ((columns >= start[:, None] - 1) & (columns < real[:, None] - 1)
                       & (batch["pair_mask"][:, None] > 0)).astype(jnp.float32)
  return jnp.sum(token_loss * predicts_response) / jnp.maximum(jnp.sum(predicts_response), 1.0)


def _wins(difference: jax.Array) -> jax.Array:
  """1 where `difference` > 0, 1/2 on a tie, else 0 (float32): pairwise accuracy per pair."""
  return (difference > 0).astype(jnp.float32) + 0.5 * (difference == 0).astype(jnp.float32)


def preference_loss(scores: jax.Array, pair_mask: jax.Array, *, margin: float = 0.0,
                    center_coef: float = 0.0) -> tuple[jax.Array, dict]:
  """The Bradley-Terry loss of scored pairs, averaged over the real pairs.

  Args:
    scores: float32 [B, 2], (chosen, rejected) rewards.
    pair_mask: float32 [B], 1.0 for real pairs, 0.0 for padding.
    margin: the loss is -log sigmoid(r_c - r_r - margin).
    center_coef: adds center_coef * (r_c + r_r)^2, pulling rewards towards mean 0.

  Returns:
    (loss, metrics): metrics `weight` (number of real pairs, which makes gradient
    accumulation exact), `accuracy`, `margin` (mean r_c - r_r), `bt_loss` (the loss without
    centering), `chosen_reward`, `rejected_reward`.
  """
  chosen, rejected = scores[:, 0], scores[:, 1]
  difference = chosen - rejected
  bt_loss = -jax.nn.log_sigmoid(difference - margin)
  per_pair = bt_loss + center_coef * jnp.square(chosen + rejected)
  count = jnp.sum(pair_mask)
  mean = lambda x: jnp.sum(x * pair_mask) / jnp.maximum(count, 1.0)
  return mean(per_pair), {
      "weight": count, "accuracy": mean(_wins(difference)), "margin": mean(difference),
      "bt_loss": mean(bt_loss), "chosen_reward": mean(chosen), "rejected_reward": mean(rejected)}


def reward_loss(model: gpt_neo.GPTNeo, params, batch: dict, rng, *, margin: float = 0.0,
                center_coef: float = 0.0, lm_coef: float = 0.0) -> tuple[jax.Array, dict]:
  """`loss_fn(params, batch, rng)` of the reward phase: `preference_loss` of the pair scores,
  plus `lm_coef` times `chosen_lm_loss` (metric `lm_loss`) when `lm_coef` > 0."""
  scores, hidden = _score_rows(model, params, batch, rng)
  loss, metrics = preference_loss(scores, batch["pair_mask"], margin=margin,
                                  center_coef=center_coef)
  if lm_coef > 0:
    lm_loss = chosen_lm_loss(params, hidden, batch)
    loss = loss + lm_coef * lm_loss
    metrics = {**metrics, "lm_loss": lm_loss}
  return loss, metrics


def eval_sums(model: gpt_neo.GPTNeo, params, batch: dict, *, margin: float = 0.0) -> dict:
  """Sums over one held-out pair batch, turned into metrics by `summarize_eval`.

  Returns:
    float32 scalars: `pairs`, `correct`, `margin`, `loss`, `length_correct` (the longer
    response is the chosen one), the sums `n`, `r`, `rr`, `l`, `ll`, `rl` over every real
    response (r = reward, l = response tokens) for the Pearson correlation, and
    `pairs/<strategy>`, `correct/<strategy>` for every strategy of `PAIR_STRATEGIES`.
  """
  scores = pair_scores(model, params, batch)
  mask = batch["pair_mask"]
  difference = scores[:, 0] - scores[:, 1]
  won = _wins(difference) * mask
  lengths = batch["response_length"].astype(jnp.float32)
  per_response = jnp.broadcast_to(mask[:, None], scores.shape)
  total = lambda x: jnp.sum(x * per_response)
  sums = {
      "pairs": jnp.sum(mask), "correct": jnp.sum(won), "margin": jnp.sum(difference * mask),
      "loss": jnp.sum(-jax.nn.log_sigmoid(difference - margin) * mask),
      "length_correct": jnp.sum(_wins(lengths[:, 0] - lengths[:, 1]) * mask),
      "n": jnp.sum(per_response), "r": total(scores), "rr": total(scores * scores),
      "l": total(lengths), "ll": total(lengths * lengths), "rl": total(scores * lengths),
  }
  for index, name in enumerate(batching.PAIR_STRATEGIES):
    of_strategy = (batch["strategy"] == index).astype(jnp.float32) * mask
    sums[f"pairs/{name}"] = jnp.sum(of_strategy)
    sums[f"correct/{name}"] = jnp.sum(won * of_strategy)
  return sums


def pearson_from_sums(n: float, x: float, xx: float, y: float, yy: float, xy: float) -> float:
  """Pearson correlation from the sums of x, x^2, y, y^2, xy over n items (NaN if a variable
  is constant)."""
  if n < 2:
    return math.nan
  covariance = xy / n - (x / n) * (y / n)
  variance_x, variance_y = xx / n - (x / n) ** 2, yy / n - (y / n) ** 2
  if variance_x <= 0 or variance_y <= 0:
    return math.nan
  return covariance / math.sqrt(variance_x * variance_y)


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
  """Held-out metrics from the summed `eval_sums` (the Evaluator adds the `eval/` prefix)."""
  pairs = max(sums["pairs"], 1.0)
  metrics = {
      "accuracy": sums["correct"] / pairs, "margin": sums["margin"] / pairs,
      "loss": sums["loss"] / pairs, "length_baseline_accuracy": sums["length_correct"] / pairs,
      "length_correlation": pearson_from_sums(*(sums[k] for k in ("n", "r", "rr", "l", "ll",
                                                                   "rl"))),
  }
  for name in batching.PAIR_STRATEGIES:
    if sums.get(f"pairs/{name}", 0.0) > 0:
      metrics[f"accuracy/{name}"] = sums[f"correct/{name}"] / sums[f"pairs/{name}"]
  return metrics


def reference_sums(model: gpt_neo.GPTNeo, params, batch: dict) -> dict:
  """Sums of the reward over one batch of single sequences (`input_ids`, `segment_ids`,
  `positions` int32 [B, T]; an all-padding row is not counted): `n`, `sum`, `sum_sq`."""
  out = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                    batch["positions"], lm_head=False)
  scores = gpt_neo.sequence_scores(out["scores"], batch["segment_ids"])
  real = (jnp.max(batch["segment_ids"], axis=1) > 0).astype(jnp.float32)
  return {"n": jnp.sum(real), "sum": jnp.sum(scores * real),
          "sum_sq": jnp.sum(scores * scores * real)}


def summarize_reference(sums: dict[str, float]) -> dict[str, float]:
  """Mean and (population) standard deviation of the reward from `reference_sums`."""
  n = max(sums["n"], 1.0)
  mean = sums["sum"] / n
  return {"mean": mean, "std": math.sqrt(max(sums["sum_sq"] / n - mean * mean, 0.0))}


# ------------------------------------------------------------------------------------------
# Preference data.
# ------------------------------------------------------------------------------------------
def split_by_prompt(pairs: Sequence[dict], fraction: float,
                    seed: int) -> tuple[list[dict], list[dict]]:
  """(train, held-out): the pairs of a seeded `fraction` of the distinct prompts are held out,
  so no prompt is in both; file order is kept within each part."""
  if not 0.0 < fraction < 1.0:
    raise UserError(f"pairs.eval_fraction={fraction}: must be in (0, 1), or set pairs.eval_file")
  prompts = list(dict.fromkeys(p["prompt"] for p in pairs))
  count = int(round(fraction * len(prompts)))
  held_out = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:count]}
  return ([p for p in pairs if p["prompt"] not in held_out],
          [p for p in pairs if p["prompt"] in held_out])


def drop_shared_prompts(train: Sequence[dict], held_out: Sequence[dict]) -> tuple[list[dict], int]:
  """Held-out pairs whose prompt is not a training prompt, and how many were dropped."""
  seen = {p["prompt"] for p in train}
  kept = [p for p in held_out if p["prompt"] not in seen]
  return kept, len(held_out) - len(kept)


def sample_policy_negatives(records_: Sequence[dict], *,
                            sample_fn: Callable[[list[dict], int], list[str]],
                            is_correct: Callable[[dict, str], bool], tries: int,
                            seed: int = 0) -> tuple[list[str | None], dict]:
  """Policy samples usable as negatives: wrong (per `is_correct`) and non-empty.

  Each record gets `tries` draws, all sampled in one call (one compiled shape instead of one
  per retry); the first usable draw is its negative, as if it had been resampled until then.

  Args:
    records_: instruction records.
    sample_fn: `(records, seed) -> one response per record`.
    is_correct: whether a response answers its record correctly.
    tries: draws per record.
    seed: passed to `sample_fn`.

  Returns:
    (samples, stats): one sample per record, None where every draw was correct or empty;
    stats `policy_samples` (records), `policy_correct_resampled` and `policy_empty_resampled`
    (draws before the used one, or all draws of an unusable record, that were correct / empty),
    `policy_unusable` (records left with None).
  """
  tries = max(int(tries), 1)
  drawn = sample_fn([record for record in records_ for _ in range(tries)], seed)
  samples: list[str | None] = [None] * len(records_)
  correct = empty = 0
  for index, record in enumerate(records_):
    for text in drawn[index * tries:(index + 1) * tries]:
      text = text.strip()
      if not text:
        empty += 1
      elif is_correct(record, text):
        correct += 1
      else:
        samples[index] = text
        break
  return samples, {"policy_samples": len(records_), "policy_correct_resampled": correct,
                   "policy_empty_resampled": empty,
                   "policy_unusable": sum(s is None for s in samples)}


def build_instruction_pairs(records_: Sequence[dict], *, strategies: dict[str, float],
                            copies: int, seed: int,
                            corrupt_fn: Callable | None = None,
                            sample_fn: Callable[[list[dict], int], list[str]] | None = None,
                            is_correct: Callable[[dict, str], bool] = lambda r, t: False,
                            policy_tries: int = 1) -> tuple[list[dict], dict]:
  """Pairs from instruction records: `copies` negatives per record, strategies by share.

  The records are repeated `copies` times; a seeded `policy_sample` share of these slots gets
  policy samples (see `sample_policy_negatives`), the rest go to `preferences.build_pairs`
  with the other shares. A slot whose policy samples were all unusable gets a `corrupted`
  negative instead when `corrupt_fn` is given, else it is skipped; both are counted.

  Returns:
    (pairs, stats): stats `records`, `pairs`, `by_strategy`, `skipped` (per strategy), the
    policy counts of `sample_policy_negatives` and `policy_replaced_by_corrupted`.
  """
  unknown = sorted(set(strategies) - set(preferences.BUILT_STRATEGIES))
  if unknown:
    raise UserError(f"pairs.strategies: unknown strategy {unknown}; known: "
                    f"{preferences.BUILT_STRATEGIES}")
  if any(float(v) < 0 for v in strategies.values()) or sum(strategies.values()) <= 0:
    raise UserError(f"pairs.strategies: shares must be non-negative with a positive sum, got "
                    f"{dict(strategies)}")
  if copies < 1:
    raise UserError(f"pairs.negatives_per_record={copies}: must be at least 1")
  shares = {k: float(v) for k, v in strategies.items() if float(v) > 0}
  if "policy_sample" in shares and sample_fn is None:
    raise UserError("pairs.strategies: 'policy_sample' has a positive share but there is no "
                    "policy to sample from")
  slots = [record for _ in range(copies) for record in records_]
  order = np.random.default_rng(seed).permutation(len(slots))
  n_policy = int(round(shares.get("policy_sample", 0.0) / sum(shares.values()) * len(slots)))
  other_shares = {k: v for k, v in shares.items() if k != "policy_sample"}
  pairs: list[dict] = []
  made: collections.Counter[str] = collections.Counter()
  skipped: collections.Counter[str] = collections.Counter()

  def add(part: list[dict], part_shares: dict[str, float], part_seed: int, **kwargs) -> None:
    if not part:
      return
    built, stats = preferences.build_pairs(part, strategies=part_shares, seed=part_seed,
                                           corrupt_fn=corrupt_fn, **kwargs)
    pairs.extend(built)
    made.update(stats["by_strategy"])
    skipped.update(stats["skipped"])

  add([slots[i] for i in order[n_policy:]], other_shares, seed)
  policy_stats: dict[str, int] = {}
  if n_policy:
    policy_slots = [slots[i] for i in order[:n_policy]]
    samples, policy_stats = sample_policy_negatives(policy_slots, sample_fn=sample_fn,
                                                    is_correct=is_correct, tries=policy_tries,
                                                    seed=seed)
    usable = [i for i, s in enumerate(samples) if s is not None]
    unusable = [policy_slots[i] for i, s in enumerate(samples) if s is None]
    add([policy_slots[i] for i in usable], {"policy_sample": 1.0}, seed + 1,
        policy_samples=[samples[i] for i in usable])
    if corrupt_fn is not None:
      add(unusable, {"corrupted": 1.0}, seed + 2)
      policy_stats["policy_replaced_by_corrupted"] = len(unusable)
    elif unusable:
      skipped["policy_sample"] += len(unusable)
  return pairs, {"records": len(records_), "pairs": len(pairs), "by_strategy": dict(made),
                 "skipped": dict(skipped), **policy_stats}


def make_policy_sampler(model: gpt_neo.GPTNeo, params, tokenizer, *, temperature: float,
                        max_new_tokens: int, batch_size: int, max_prompt_length: int,
                        seed: int) -> Callable[[list[dict], int], list[str]]:
  """`(records, seed) -> responses`: samples of the policy for the records' prompts, through
  the project's one sampler, reproducible for a given `seed` (the phase's `pairs.seed` plus
  the call's seed)."""
  from rlhf_jax import generate
  settings = sampling.SamplingSettings(
      max_new_tokens=max_new_tokens, temperature=temperature,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

  def sample(records_: list[dict], call_seed: int) -> list[str]:
    prompts = [batching.format_prompt(r["instruction"], r.get("context", "")) for r in records_]
    results = generate.generate_texts(
        model, params, tokenizer, prompts, settings=settings,
        batch_size=min(batch_size, len(prompts)), max_prompt_length=max_prompt_length,
        rng=jax.random.fold_in(jax.random.key(seed), call_seed))
    return [r["response"] for r in results]

  return sample


def load_preference_pairs(config, sampler_factory: Callable[[], Callable]
                          ) -> tuple[list[dict], list[dict], dict]:
  """The training and held-out pairs a reward config describes (see the module docstring).

  Args:
    config: the reward config (`pairs`, `data`).
    sampler_factory: builds the policy sampler (`make_policy_sampler`); called only when
      policy samples are needed.

  Returns:
    (train pairs, held-out pairs, stats: `train` and `eval` stats of the loader/builder and
    `eval_dropped_shared_prompt`).
  """
  pairs_config = config.pairs
  if pairs_config.source != BUILD:
    train, train_stats = preferences.load_pairs(pairs_config.source,
                                                skip_bad_records=pairs_config.skip_bad_records)
    if pairs_config.eval_file:
      held_out, eval_stats = preferences.load_pairs(
          pairs_config.eval_file, skip_bad_records=pairs_config.skip_bad_records)
    else:
      train, held_out = split_by_prompt(train, pairs_config.eval_fraction, pairs_config.seed)
      eval_stats = {"source": f"{pairs_config.source} (held-out prompts)", "kept": len(held_out)}
  else:
    splits = records.load_splits(config.data)
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
        is_correct=is_correct, policy_tries=pairs_config.policy_tries)
    train, train_stats = build("train", pairs_config.negatives_per_record, pairs_config.seed)
    held_out, eval_stats = build("validation", pairs_config.eval_negatives_per_record,
                                 pairs_config.seed + 1000)
  held_out, dropped = drop_shared_prompts(train, held_out)
  if not train or not held_out:
    raise UserError(f"pairs.source={pairs_config.source}: {len(train)} training and "
                    f"{len(held_out)} held-out pairs; both must be non-empty")
  return train, held_out, {"train": train_stats, "eval": eval_stats,
                           "eval_dropped_shared_prompt": dropped}


def reference_examples(examples: Sequence[dict], limit: int, seed: int) -> list[dict]:
  """Distinct (prompt, chosen) sequences of tokenised pairs, at most `limit` in a seeded
  order, as `{"prompt_ids", "response_ids"}` examples for `batching.eval_batches`."""
  distinct = {}
  for example in examples:
    key = (example["prompt_ids"].tobytes(), example["chosen_ids"].tobytes())
    distinct.setdefault(key, {"prompt_ids": example["prompt_ids"],
                              "response_ids": example["chosen_ids"]})
  chosen = list(distinct.values())
  order = np.random.default_rng(seed).permutation(len(chosen))[:max(int(limit), 1)]
  return [chosen[i] for i in sorted(order)]


# ------------------------------------------------------------------------------------------
# The phase.
# ------------------------------------------------------------------------------------------
def initial_checkpoint(config, workdir: pathlib.Path) -> str:
  """The checkpoint the reward model starts from: the config's, else this workdir's SFT."""
  if config.init_checkpoint:
    return config.init_checkpoint
  if checkpoints.find_checkpoint_dir(workdir / "sft") is None:
    raise UserError(f"reward: no SFT checkpoint in {workdir / 'sft'}; run --phase=sft first or "
                    "set --config.init_checkpoint (an Orbax or HF checkpoint)")
  return str(workdir / "sft")


def init_score_head(model: gpt_neo.GPTNeo, rng: jax.Array) -> dict:
  """A fresh `score` head as the model would initialise it: normal with std
  `score_init_std` (default 1/sqrt(d_model + 1))."""
  shape = gpt_neo.param_shapes(model)["score"]["kernel"]
  std = model.score_init_std or (model.config.hidden_size + 1) ** -0.5
  return {"kernel": std * jax.random.normal(rng, shape.shape, shape.dtype)}


def _finished(phase_dir: pathlib.Path) -> bool:
  found = checkpoints.find_checkpoint_dir(phase_dir)
  if found is None:
    return False
  saved = checkpoints.Checkpoints(found, create=False)
  try:
    return bool(saved.manifest().get("finished"))
  finally:
    saved.close()


def _describe_counts(stats: dict) -> str:
  skipped = {k: v for k, v in stats.items() if v}
  return ", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"


def run(config, workdir: pathlib.Path) -> None:
  phase_dir = workdir / "reward"
  if _finished(phase_dir):
    # Checked before building the data, which may sample the policy.
    print(f"reward: {phase_dir / 'checkpoint'} holds a finished run; skipping. Delete it or use "
          "another --workdir to train again.")
    return
  mesh = sharding.mesh_from_config(config.mesh)
  info = checkpoints.describe_model(initial_checkpoint(config, workdir))
  if info["tokenizer_dir"] is None:
    raise UserError(f"{info['source']}: the initial checkpoint has no tokenizer files")
  tokenizer = hf.load_tokenizer(info["tokenizer_dir"])
  model_config = sft.with_dropout(info["config"], config.model)
  model = gpt_neo.build(model_config, config.model, score_head=True)
  param_shapes = gpt_neo.param_shapes(model)
  param_shardings = sharding.param_shardings(gpt_neo.logical_axes(model), param_shapes, mesh)
  trunk_shardings = {k: v for k, v in param_shardings.items() if k != "score"}
  loaded: dict[str, Any] = {}  # The initial parameters, read at most once.

  def initial_params() -> dict:
    if "params" not in loaded:
      loaded["params"] = dict(checkpoints.load_params(
          info, param_shardings if info["score_head"] else trunk_shardings))
    return loaded["params"]

  def sampler_factory():
    pairs_config = config.pairs
    policy = gpt_neo.build(info["config"], config.model)
    print(f"reward: sampling policy negatives from {info['source']}")
    return make_policy_sampler(
        policy, {k: v for k, v in initial_params().items() if k != "score"}, tokenizer,
        temperature=pairs_config.policy_temperature,
        max_new_tokens=pairs_config.policy_max_new_tokens,
        batch_size=pairs_config.policy_batch_size, max_prompt_length=config.max_length,
        seed=pairs_config.seed)

  train_pairs, eval_pairs, data_stats = load_preference_pairs(config, sampler_factory)
  tokenize = lambda pairs, name: batching.tokenize_pairs(
      tokenizer, pairs, max_length=config.max_length,
      skip_bad_records=config.pairs.skip_bad_records, source=name,
      too_long=config.pairs.too_long)
  train_examples, train_tokens = tokenize(train_pairs, "training pairs")
  eval_examples, eval_tokens = tokenize(eval_pairs, "held-out pairs")
  if not train_examples or not eval_examples:
    raise UserError(f"reward: {len(train_examples)} training and {len(eval_examples)} held-out "
                    "pairs left after tokenisation; check max_length and the data")
  _print_data_summary(data_stats, train_tokens, eval_tokens, eval_examples)

  tx = optim.make_optimizer(config.optim, config.train.steps)
  rng = jax.random.key(config.train.seed)
  abstract = loop.abstract_train_state(param_shapes, param_shardings, tx, rng, mesh)

  def init_state():
    params = dict(initial_params())
    if "score" not in params:
      params["score"] = init_score_head(model, jax.random.fold_in(rng, 1))
    return loop.create_train_state(params, tx, rng)

  pad_id = tokenizer.pad_token_id
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  eval_args = dict(batch_size=config.eval_batch_size, max_length=config.max_length, pad_id=pad_id,
                   **hosts)
  latest: dict[str, float] = {}  # The last held-out metrics, for the final summary.

  def summarize(sums):
    latest.update(summarize_eval(sums))
    return dict(latest)

  evaluator = loop.Evaluator(
      step=lambda params, batch: eval_sums(model, params, batch, margin=config.loss.margin),
      batches=lambda: batching.eval_pair_batches(eval_examples, **eval_args),
      summarize=summarize)
  references = reference_examples(train_examples, config.stats_samples, config.pairs.seed)
  reference_evaluator = loop.Evaluator(
      step=lambda params, batch: reference_sums(model, params, batch),
      batches=lambda: batching.eval_batches(references, **eval_args),
      summarize=summarize_reference)
  compiled_reference = jax.jit(reference_evaluator.step)
  # Saved with every checkpoint; the evaluation at the start and at the end fills it in, so the
  # final (finished) checkpoint carries the trained model's statistics for PPO.
  reward_stats = {"mean": 0.0, "std": 1.0, "samples": len(references)}

  def reference_statistics(params) -> dict:
    measured = reference_evaluator.run(compiled_reference, params, mesh)
    reward_stats.update(mean=measured["eval/mean"], std=measured["eval/std"])
    return {"reward_mean": reward_stats["mean"], "reward_std": reward_stats["std"]}

  margin, center_coef = float(config.loss.margin), float(config.loss.center_coef)
  lm_coef = float(config.loss.get("lm_coef", 0.0))
  state = loop.train(
      phase="reward", phase_dir=phase_dir, config=config.train, mesh=mesh,
      abstract_state=abstract, init_state=init_state,
      step_fn=loop.make_train_step(
          lambda p, b, r: reward_loss(model, p, b, r, margin=margin, center_coef=center_coef,
                                      lm_coef=lm_coef),
          tx, config.train.accum_steps),
      batches=lambda start: batching.pair_batches(
          train_examples, batch_size=config.train.batch_size, max_length=config.max_length,
          pad_id=pad_id, seed=config.train.seed, start_step=start,
          group_by_length=int(config.group_by_length), **hosts),
      manifest=checkpoints.make_manifest(model_config, kind=hf.REWARD, score_head=True,
                                         phase="reward", reward_stats=reward_stats),
      evaluator=evaluator, count_items=lambda b: float(b["pair_mask"].sum()), unit="pair",
      progress_keys=("loss", "accuracy"), tokenizer_dir=info["tokenizer_dir"],
      milestone_eval=reference_statistics,
      widest_batch=lambda b: batching.pad_pair_batch(b, config.max_length, pad_id))
  if state is None:
    return
  writer = progress.MetricsWriter(phase_dir, resume_step=int(config.train.steps))
  writer.write(int(config.train.steps), {"reward/mean": reward_stats["mean"],
                                         "reward/std": reward_stats["std"]})
  writer.close()
  if jax.process_index() == 0:
    _print_final_summary(latest, eval_examples, reward_stats, phase_dir)


def _print_data_summary(data_stats: dict, train_tokens: dict, eval_tokens: dict,
                        eval_examples: Sequence[dict]) -> None:
  if jax.process_index() != 0:
    return
  for name, stats, tokens in (("training", data_stats["train"], train_tokens),
                              ("held-out", data_stats["eval"], eval_tokens)):
    made = stats.get("by_strategy")
    made_text = f" by strategy {made}" if made else ""
    policy = {k: v for k, v in stats.items() if k.startswith("policy_")}
    skipped = {**stats.get("skipped", {}), **tokens["skipped"]}
    print(f"reward: {tokens['examples']} {name} pairs{made_text}; skipped "
          f"{_describe_counts(skipped)}; truncated {tokens['truncated_responses']} responses, "
          f"{tokens['truncated_prompts']} prompts"
          + (f"; policy samples: {_describe_counts(policy)}" if policy else ""))
  if data_stats["eval_dropped_shared_prompt"]:
    print(f"reward: dropped {data_stats['eval_dropped_shared_prompt']} held-out pairs whose "
          "prompt is also a training prompt")


def _print_final_summary(metrics: dict, eval_examples: Sequence[dict], reward_stats: dict,
                         phase_dir: pathlib.Path) -> None:
  counts = collections.Counter(batching.PAIR_STRATEGIES[e["strategy_id"]] for e in eval_examples)
  print(f"reward: held-out pairwise accuracy {metrics['accuracy']:.3f} on {len(eval_examples)} "
        f"pairs (prefer-the-longer-response baseline {metrics['length_baseline_accuracy']:.3f}; "
        f"reward-length correlation {metrics['length_correlation']:.3f}; mean margin "
        f"{metrics['margin']:.3f})")
  per_strategy = sorted(((metrics[f"accuracy/{name}"], name) for name in counts))
  print("reward: accuracy per strategy (hardest first): " + ", ".join(
      f"{name} {accuracy:.3f} ({counts[name]} pairs)" for accuracy, name in per_strategy))
  print(f"reward: reward on {reward_stats['samples']} reference responses: mean "
        f"{reward_stats['mean']:.4g}, std {reward_stats['std']:.4g} (saved in the checkpoint "
        f"manifest for PPO); checkpoint in {phase_dir / 'checkpoint'}, metrics in "
        f"{phase_dir / 'metrics.jsonl'}")
