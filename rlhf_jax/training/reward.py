"""The reward model's pure pieces: pair scores, the Bradley-Terry loss (with centering and the
chosen responses' LM regulariser), held-out sums and the reward statistics on reference responses.

The phase that trains it (data, loop, summary) is `rlhf_jax.phases.reward`; its docstring gives the
loss, the pair strategies and the metrics.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import batching
from rlhf_jax.models import gpt_neo

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


def init_score_head(model: gpt_neo.GPTNeo, rng: jax.Array) -> dict:
  """A fresh `score` head as the model would initialise it: normal with std
  `score_init_std` (default 1/sqrt(d_model + 1))."""
  shape = gpt_neo.param_shapes(model)["score"]["kernel"]
  std = model.score_init_std or (model.config.hidden_size + 1) ** -0.5
  return {"kernel": std * jax.random.normal(rng, shape.shape, shape.dtype)}
