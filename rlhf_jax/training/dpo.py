"""Direct Preference Optimisation as pure, jit-able pieces: sequence log-probabilities of pairs,
the DPO and IPO losses with TRL's metrics, and the `loss_fn(params, batch, rng)` of the shared loop.

DPO (Rafailov et al. 2023) trains the policy directly on preference pairs: with the implicit
reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), the loss is the Bradley-Terry loss of the
reward margin, -log sigmoid(r_chosen - r_rejected). IPO (Azar et al. 2023, eq. 17) regresses the
margin of per-token log-ratios to 1 / (2 beta) instead. Both follow TRL 1.16's `DPOTrainer`
(`_compute_loss`); where they differ, the docstring says so.

The reference model is frozen, so its log-probabilities are computed once per pair
(`reference_logps`: `pair_logps` with the reference's parameters over all pairs; TRL's
`precompute_ref_log_probs=True`), kept per pair outside the batches and looked up into each batch
as `ref_logps` (`with_reference`), so the reference is not kept in memory while training.
`make_eval_sums` and `summarize_eval` measure the loss and TRL's metrics on held-out pairs.

Batches are the reward model's pair batches (`rlhf_jax.data.batching`): `input_ids`,
`segment_ids`, `positions` int32 [B, 2, T], `[b, 0]` prompt + chosen and `[b, 1]` prompt +
rejected, right-padded; `response_length` int32 [B, 2]; `pair_mask` float32 [B]; plus
`ref_logps` float32 [B, 2] for the loss. Pair b's two rows are rows 2b and 2b + 1 of the one
[2B, T] forward pass. (TRL appends EOS to both responses, so its policy learns where answers
stop; the reward model's pair batches have no trailing EOS.)
"""

from typing import Callable, Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.training import ppo_core

Array = jax.Array
# logits_fn(params, input_ids, segment_ids, positions, rng) -> float logits [R, T, V]: position t
# predicts token t + 1. rng None means deterministic (no dropout).
LogitsFn = Callable[..., Array]

LOSS_TYPES = ("sigmoid", "ipo")


def _f32(x) -> Array:
  return jnp.asarray(x, dtype=jnp.float32)


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, ref_chosen_logps: Array,
             ref_rejected_logps: Array, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: Optional[Array] = None,
             rejected_lengths: Optional[Array] = None,
             pair_mask: Optional[Array] = None) -> Tuple[Array, Dict[str, Array]]:
  """The DPO or IPO loss of a batch of pairs, from sequence log-probabilities.

  With chosen/rejected log-ratios c = pi_c - ref_c, r = pi_r - ref_r and delta = c - r:
  - "sigmoid" (DPO): -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta), eps =
    `label_smoothing`, the probability that a label is flipped (conservative DPO, Mitchell 2023;
    TRL < 1.0's sigmoid loss). With eps = 0 this is TRL 1.16's "sigmoid", which ignores
    label_smoothing.
  - "ipo": (c / n_c - r / n_r - 1 / (2 beta))^2, n the response lengths in tokens: TRL 1.16's
    IPO, which averages the log-ratios per token (the IPO authors' form, per TRL's comment), so
    beta (the paper's tau) does not depend on the answers' lengths. Needs the lengths.
  The loss is the mean over real pairs (`pair_mask`).

  Args:
    policy_chosen_logps: float [B] summed log-probabilities of the chosen responses (policy).
    policy_rejected_logps: float [B] the same for the rejected responses.
    ref_chosen_logps: float [B] the chosen responses under the reference model.
    ref_rejected_logps: float [B] the rejected responses under the reference model.
    beta: > 0, the strength of the KL regularisation (DPO's beta, IPO's tau).
    loss_type: "sigmoid" or "ipo".
    label_smoothing: in [0, 0.5), "sigmoid" only.
    chosen_lengths: int/float [B] response tokens of the chosen sides ("ipo").
    rejected_lengths: int/float [B] response tokens of the rejected sides ("ipo").
    pair_mask: float32 [B], 1.0 for a real pair, 0.0 for a padding pair; None: all real.

  Returns:
    loss: float32 scalar.
    metrics: float32 scalars named as TRL's: `rewards/chosen`, `rewards/rejected` (means of
      beta * log-ratio), `rewards/accuracies` (share of pairs with chosen reward > rejected),
      `rewards/margins` (mean reward difference), `logps/chosen`, `logps/rejected` (means of
      the policy's summed log-probabilities). Means over real pairs; no gradient.

  Raises:
    UserError: for an unknown loss type, beta <= 0, or a bad label_smoothing.
  """
  if loss_type not in LOSS_TYPES:
    raise UserError(f"DPO loss_type {loss_type!r} is unknown: use one of {LOSS_TYPES}")
  if not beta > 0:
    raise UserError(f"DPO beta={beta} must be positive")
  if not 0.0 <= label_smoothing < 0.5:
    raise UserError(f"DPO label_smoothing={label_smoothing} must be in [0, 0.5)")
  if loss_type == "ipo" and label_smoothing:
    raise UserError("DPO label_smoothing applies to loss_type='sigmoid' only, not 'ipo'")
  # Padding pairs are zeroed before any arithmetic, so whatever they hold (NaN included)
  # reaches neither the loss nor its gradient.
  real = jnp.ones(jnp.shape(policy_chosen_logps), bool) if pair_mask is None else pair_mask > 0
  clean = lambda x: jnp.where(real, _f32(x), 0.0)
  policy_chosen_logps, policy_rejected_logps = clean(policy_chosen_logps), clean(
      policy_rejected_logps)
  chosen_logratios = policy_chosen_logps - jax.lax.stop_gradient(clean(ref_chosen_logps))
  rejected_logratios = policy_rejected_logps - jax.lax.stop_gradient(clean(ref_rejected_logps))
  if loss_type == "sigmoid":
    logits = beta * (chosen_logratios - rejected_logratios)
    per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
                - label_smoothing * jax.nn.log_sigmoid(-logits))
  else:
    if chosen_lengths is None or rejected_lengths is None:
      raise UserError("the IPO loss averages log-ratios per token: pass chosen_lengths and "
                      "rejected_lengths")
    per_token_margin = (chosen_logratios / jnp.maximum(clean(chosen_lengths), 1.0)
                        - rejected_logratios / jnp.maximum(clean(rejected_lengths), 1.0))
    per_pair = jnp.square(per_token_margin - 1.0 / (2.0 * beta))

  mean = lambda x: ppo_core.masked_mean(x, None if pair_mask is None else
                                        jnp.broadcast_to(_f32(pair_mask), x.shape))
  chosen_rewards = beta * chosen_logratios
  rejected_rewards = beta * rejected_logratios
  metrics = {
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/accuracies": mean(_f32(chosen_rewards > rejected_rewards)),
      "rewards/margins": mean(chosen_rewards - rejected_rewards),
      "logps/chosen": mean(policy_chosen_logps),
      "logps/rejected": mean(policy_rejected_logps),
  }
  return mean(per_pair), jax.lax.stop_gradient(metrics)


def response_mask(segment_ids: Array, response_length: Array) -> Array:
  """Where the response tokens of right-padded prompt + response rows are: float32 [R, T].

  A row's real tokens are its first L = sum(segment_ids > 0); its response is the last
  `response_length` of them.

  Args:
    segment_ids: int [R, T], 0 on padding.
    response_length: int [R] response tokens of each row.
  """
  positions = jnp.arange(segment_ids.shape[-1])[None, :]
  real_length = jnp.sum(segment_ids > 0, axis=-1, keepdims=True)
  start = real_length - response_length[:, None]
  return _f32((positions >= start) & (positions < real_length))


def sequence_logps(logits: Array, input_ids: Array, mask: Array) -> Array:
  """Summed log-probabilities of the tokens selected by `mask`, each given the tokens before it.

  Token t is scored by the logits at t - 1 (`ppo_core.logprobs_from_logits`), so position 0 is
  never scored (a response always follows a prompt).

  Args:
    logits: float [R, T, V], position t predicting token t + 1.
    input_ids: int [R, T].
    mask: float32 [R, T], 1.0 on the tokens to score (e.g. `response_mask`).

  Returns:
    float32 [R].
  """
  token_logps = ppo_core.logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
  return ppo_core.masked_sum(token_logps, mask[:, 1:], axis=-1)


def pair_logps(logits_fn: LogitsFn, params, batch: dict, rng=None) -> Array:
  """Summed response log-probabilities of both sides of every pair, in one [2B, T] forward pass.

  The policy's inside the loss; the reference's once per pair before training (stored as the
  batch's `ref_logps`): `jax.jit(functools.partial(pair_logps, logits_fn))(ref_params, batch)`.

  Args:
    logits_fn: see `LogitsFn` (`model_logits_fn` for a GPTNeo).
    params: the model's parameters.
    batch: a pair batch: `input_ids`, `segment_ids`, `positions` [B, 2, T], `response_length`
      [B, 2].
    rng: dropout key; None runs deterministically.

  Returns:
    float32 [B, 2]: column 0 the chosen, column 1 the rejected response (0.0 for padding pairs).
  """
  pairs, sides, length = batch["input_ids"].shape
  flat = lambda x: x.reshape(pairs * sides, *x.shape[2:])  # [B, 2, ...] -> [2B, ...]
  input_ids, segment_ids = flat(batch["input_ids"]), flat(batch["segment_ids"])
  logits = logits_fn(params, input_ids, segment_ids, flat(batch["positions"]), rng)
  mask = response_mask(segment_ids, flat(batch["response_length"]))
  return sequence_logps(logits, input_ids, mask).reshape(pairs, sides)


def model_logits_fn(model: gpt_neo.GPTNeo) -> LogitsFn:
  """The `LogitsFn` of a GPTNeo causal LM (dropout on when an rng is given)."""

  def logits_fn(params, input_ids, segment_ids, positions, rng):
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply({"params": params}, input_ids, segment_ids, positions,
                       deterministic=rng is None, rngs=rngs, lm_head=True)["logits"]

  return logits_fn


def make_loss_fn(logits_fn: LogitsFn, *, beta: float, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0) -> Callable:
  """`loss_fn(params, batch, rng) -> (loss, metrics)` of DPO for the shared train loop.

  The batch carries the reference log-probabilities (`ref_logps` [B, 2], computed once with
  `pair_logps`), so no reference forward pass runs while training. `metrics["weight"]` is the
  number of real pairs, which makes `loop.accumulate_gradients` exact over micro-batches.

  Args:
    logits_fn: the policy's `LogitsFn`.
    beta, loss_type, label_smoothing: see `dpo_loss`.
  """
  # Settings are checked here, once, rather than at the first traced step.
  dpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=beta,
           loss_type=loss_type, label_smoothing=label_smoothing,
           chosen_lengths=jnp.ones(1), rejected_lengths=jnp.ones(1))

  def loss_fn(params, batch, rng):
    logps = pair_logps(logits_fn, params, batch, rng)
    ref_logps = batch["ref_logps"]
    lengths = batch["response_length"]
    loss, metrics = dpo_loss(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1],
                             beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                             chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
                             pair_mask=batch["pair_mask"])
    return loss, {**metrics, "weight": jnp.sum(_f32(batch["pair_mask"]))}

  return loss_fn


def make_eval_sums(logits_fn: LogitsFn, *, beta: float, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0) -> Callable:
  """`eval_sums(params, batch) -> sums` of a held-out pair batch for the loop's `Evaluator`:
  the loss and TRL's metrics (see `dpo_loss`) times the batch's real pairs, and `weight`, the
  real pairs; `summarize_eval` turns the summed sums into means over every held-out pair.
  Deterministic (no dropout)."""
  loss_fn = make_loss_fn(logits_fn, beta=beta, loss_type=loss_type,
                         label_smoothing=label_smoothing)

  def eval_sums(params, batch: dict) -> Dict[str, Array]:
    loss, metrics = loss_fn(params, batch, None)
    weight = metrics.pop("weight")
    return {"loss": loss * weight, **{k: v * weight for k, v in metrics.items()},
            "weight": weight}

  return eval_sums


def summarize_eval(sums: Dict[str, float]) -> Dict[str, float]:
  """Means over the held-out pairs from `make_eval_sums`' summed sums."""
  weight = max(sums["weight"], 1e-12)
  return {k: v / weight for k, v in sums.items() if k != "weight"}


def with_reference(batch: dict, reference: np.ndarray) -> dict:
  """A pair batch with its pairs' reference log-probabilities (`ref_logps` float32 [B, 2], 0.0
  for padding pairs), looked up by `pair_index` (dropped) in `reference` [N, 2], the stored
  `pair_logps` of the batched examples under the reference model."""
  index = batch["pair_index"]
  ref_logps = np.where((index >= 0)[:, None], reference[np.maximum(index, 0)], 0.0)
  return {**{k: v for k, v in batch.items() if k != "pair_index"},
          "ref_logps": ref_logps.astype(np.float32)}


def reference_logps(logits_fn: LogitsFn, params, batches: Iterable[dict], count: int,
                    mesh) -> np.ndarray:
  """The reference model's `pair_logps` of `count` pairs, once, before training.

  Args:
    logits_fn, params: the reference model.
    batches: host pair batches covering each of the pairs once, in any order, with `pair_index`
      (e.g. `batching.eval_pair_batches(..., by_length=True)`), this process's rows of each
      global batch.
    count: the number of pairs.
    mesh: the device mesh the batches are split over; every process gets every pair's values.

  Returns:
    float32 [count, 2]: row i pair i's, column 0 the chosen, column 1 the rejected response.

  Raises:
    ValueError: a pair was not covered.
  """
  fields = ("input_ids", "segment_ids", "positions", "response_length", "pair_index")
  step = jax.jit(lambda p, b: (pair_logps(logits_fn, p, b), b["pair_index"]),
                 out_shardings=sharding.replicated(mesh))
  results = [step(params, sharding.shard_batch({k: b[k] for k in fields}, mesh))
             for b in batches]
  logps = np.full((count, 2), np.nan, np.float32)
  for values, index in jax.device_get(results):
    real = index >= 0
    logps[index[real]] = values[real]
  if np.isnan(logps).any():
    raise ValueError(f"reference_logps: {int(np.isnan(logps[:, 0]).sum())} of {count} pairs "
                     "were not in the batches")
  return logps
