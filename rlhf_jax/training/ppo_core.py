"""The mathematics of RLHF-PPO as pure, jit-able JAX functions.

This reproduces the canonical recipe of Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences" (OpenAI lm-human-preferences), as analysed in Huang et al., "The N Implementation
Details of RLHF with PPO", and as implemented in TRL's `PPOTrainer`. Where this module departs from
one of them, the docstring says so and why.

Conventions shared by every function:
- Arrays are over *response tokens* only: shape [B, N] with N = max new tokens. Prompts are
  left-padded elsewhere and never appear here.
- `mask`: float32 [B, N], 1.0 on real response tokens (up to and including EOS) and 0.0 on the
  padding after a row ended. Real tokens form a prefix of each row (the sampler stops a row at EOS
  and pads the rest), and every function relies on that.
- Values on padding positions may be garbage (TRL fills them with a sentinel logprob): every masked
  reduction selects with `jnp.where`, so neither their value nor a NaN/inf there leaks into results
  or gradients.
- Everything is computed in float32, whatever dtype the model produced.
"""

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo

Array = jax.Array


def _f32(x) -> Array:
  return jnp.asarray(x, dtype=jnp.float32)


def masked_sum(x: Array, mask: Optional[Array] = None, axis=None, keepdims: bool = False) -> Array:
  """Sums `x` over the positions where `mask` > 0, ignoring whatever `x` holds elsewhere.

  Args:
    x: float [...] values.
    mask: float32 of `x`'s shape (1.0 = real, 0.0 = padding), or None for no mask.
    axis: axes to reduce (None: all).
    keepdims: keep reduced axes with size 1.

  Returns:
    float32 sum with `axis` reduced.
  """
  x = _f32(x)
  if mask is None:
    return jnp.sum(x, axis=axis, keepdims=keepdims)
  mask = _f32(mask)
  return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis, keepdims=keepdims)


def masked_mean(x: Array, mask: Optional[Array] = None, axis=None, keepdims: bool = False) -> Array:
  """Mean of `x` over the positions where `mask` > 0 (TRL `masked_mean`).

  Where the mask selects nothing the mean is defined as 0.0 rather than NaN (TRL divides 0/0),
  so that a metric over an empty minibatch slice cannot poison a compiled training step.

  Args:
    x: float [...] values.
    mask: float32 of `x`'s shape, or None for the plain mean.
    axis: axes to reduce (None: all).
    keepdims: keep reduced axes with size 1.

  Returns:
    float32 mean with `axis` reduced.
  """
  if mask is None:
    return jnp.mean(_f32(x), axis=axis, keepdims=keepdims)
  count = jnp.sum(_f32(mask), axis=axis, keepdims=keepdims)
  total = masked_sum(x, mask, axis=axis, keepdims=keepdims)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def masked_var(x: Array, mask: Optional[Array] = None, unbiased: bool = True) -> Array:
  """Variance of `x` over all positions where `mask` > 0 (TRL `masked_var`).

  With `unbiased=True` (TRL's default, and this project's) the biased estimate is multiplied by
  Bessel's correction n / (n - 1), n = number of masked-in elements. TRL raises for n <= 1; a
  compiled function cannot, so for n <= 1 the biased estimate (0.0) is returned instead.
  lm-human-preferences uses `tf.nn.moments`, i.e. the biased estimate: pass `unbiased=False`.

  Args:
    x: float [...] values.
    mask: float32 of `x`'s shape, or None to use every element.
    unbiased: apply Bessel's correction.

  Returns:
    float32 scalar variance.
  """
  x = _f32(x)
  mean = masked_mean(x, mask)
  variance = masked_mean(jnp.square(x - mean), mask)
  if not unbiased:
    return variance
  n = jnp.float32(x.size) if mask is None else jnp.sum(_f32(mask))
  return jnp.where(n > 1, variance * n / jnp.where(n > 1, n - 1, 1.0), variance)


def whiten(x: Array, mask: Optional[Array] = None, shift_mean: bool = True, eps: float = 1e-8,
           unbiased: bool = True) -> Array:
  """Whitens `x` with one mean and variance taken over all its masked-in elements.

  `(x - mean) * rsqrt(var + eps)`, plus `mean` again when `shift_mean=False` (rescale only: used
  for rewards, whose sign carries meaning). Statistics are global over the batch, not per row, as
  in lm-human-preferences `whiten` and TRL `masked_whiten`. The variance is unbiased (Bessel's
  correction) as in TRL; see `masked_var`. Unlike TRL, padding positions of the result are set to
  0.0 here (TRL does it as a separate `masked_fill` afterwards for advantages).

  Args:
    x: float [B, N] (any shape) values, e.g. advantages.
    mask: float32 of `x`'s shape, or None to whiten every element.
    shift_mean: if False the mean is added back, so only the scale changes.
    eps: added to the variance before the reciprocal square root.
    unbiased: Bessel's correction for the variance.

  Returns:
    float32 of `x`'s shape.
  """
  x = _f32(x)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask, unbiased=unbiased)
  whitened = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    whitened = whitened + mean
  if mask is not None:
    whitened = jnp.where(_f32(mask) > 0, whitened, 0.0)
  return whitened


def ended_with_eos(tokens: Array, mask: Array, eos_token_id: int) -> Array:
  """Whether each response's last real token is EOS: bool [B].

  TRL tests `any(response == eos)`. That is wrong for GPT-Neo, whose tokenizer pads with the EOS
  token, so this looks at the last real token instead.

  Args:
    tokens: int32 [B, N] response tokens.
    mask: float32 [B, N] response mask.
    eos_token_id: the EOS token id.
  """
  last = gpt_neo.last_token_index(_f32(mask))
  last_token = jnp.take_along_axis(tokens, jnp.maximum(last, 0)[:, None], axis=-1)[:, 0]
  return (last >= 0) & (last_token == eos_token_id)


def missing_eos_penalty(scores: Array, has_eos: Array, penalty: float) -> Array:
  """Subtracts `penalty` from the score of every response that did not end with EOS.

  TRL semantics of `missing_eos_penalty` (`scores[~contain_eos_token] -= penalty`): the reward
  model's score is kept and lowered, so the policy learns to finish its answers within the token
  budget. (lm-human-preferences and early TRL instead *replaced* the score by a fixed
  `penalty_reward_value`; that is not offered here.)

  Args:
    scores: float32 [B] reward-model scores.
    has_eos: bool [B], e.g. from `ended_with_eos`.
    penalty: non-negative amount subtracted (0.0 disables it).

  Returns:
    float32 [B] penalised scores.
  """
  return jnp.where(has_eos, _f32(scores), _f32(scores) - penalty)


def per_token_kl(logprobs: Array, ref_logprobs: Array, mask: Array, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(policy || reference) on sampled tokens, 0.0 on padding.

  Estimators from Schulman, "Approximating KL Divergence" (2020), with log r = ref - logp:
  - "k1": logp - ref (unbiased, can be negative per token; Ziegler et al. and TRL's default).
  - "k3": (r - 1) - log r (unbiased, never negative; TRL's `kl_estimator="k3"`).

  Args:
    logprobs: float [B, N] policy log-probabilities of the sampled tokens.
    ref_logprobs: float [B, N] reference-model log-probabilities of the same tokens.
    mask: float32 [B, N] response mask.
    estimator: "k1" or "k3".

  Returns:
    float32 [B, N].
  """
  real = _f32(mask) > 0
  log_ratio = jnp.where(real, _f32(ref_logprobs) - _f32(logprobs), 0.0)
  if estimator == "k1":
    kl = -log_ratio
  elif estimator == "k3":
    # expm1 keeps precision for tiny log-ratios; the clamp only removes rounding below zero, as
    # (r - 1) - log r >= 0 holds exactly.
    kl = jnp.maximum(jnp.expm1(log_ratio) - log_ratio, 0.0)
  else:
    raise UserError(f"KL estimator {estimator!r} is unknown: use 'k1' or 'k3'")
  return jnp.where(real, kl, 0.0)


def kl_estimates(logprobs: Array, ref_logprobs: Array, mask: Array) -> Dict[str, Array]:
  """KL(policy || reference) of sampled responses, per sequence and averaged over the batch.

  Args:
    logprobs: float [B, N] policy log-probabilities of the sampled tokens.
    ref_logprobs: float [B, N] reference log-probabilities of the same tokens.
    mask: float32 [B, N] response mask.

  Returns:
    `k1`, `k3`: float32 [B] sums over each response's real tokens (a sequence-level KL estimate);
    `k1_mean`, `k3_mean`: float32 scalars, their batch means (TRL's `objective/kl` is `k1_mean`).
    See `per_token_kl` for the estimators.
  """
  out = {}
  for name in ("k1", "k3"):
    per_sequence = jnp.sum(per_token_kl(logprobs, ref_logprobs, mask, name), axis=-1)
    out[name] = per_sequence
    out[f"{name}_mean"] = jnp.mean(per_sequence)
  return out


def kl_penalty_rewards(scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array,
                       kl_coef, kl_estimator: str = "k1") -> Tuple[Array, Array, Array]:
  """Per-token rewards: a KL penalty on every real token plus the score on the last one.

  rewards[b, t] = -kl_coef * kl[b, t] + scores[b] * [t == last real token of row b]
  (Ziegler et al. 2019, eq. 2; TRL `PPOTrainer`). A row that stopped at EOS gets its score on the
  EOS token; a row that hit the length limit gets it at position N - 1. TRL puts the score one
  position *after* the last real token when that fits; here it stays on the last real token so
  that the score sits inside the mask and GAE (which ends each episode there) sees it.

  Args:
    scores: float [B] reward-model scores (after any normalisation / missing-EOS penalty).
    logprobs: float [B, N] policy log-probabilities of the sampled tokens (at rollout time).
    ref_logprobs: float [B, N] reference log-probabilities of the same tokens.
    mask: float32 [B, N] response mask.
    kl_coef: float scalar (a traced value is fine: the adaptive controller changes it).
    kl_estimator: "k1" (default, as Ziegler et al. and TRL) or "k3"; see `per_token_kl`.

  Returns:
    rewards: float32 [B, N], 0.0 on padding.
    non_score_reward: float32 [B, N], the KL part -kl_coef * kl, 0.0 on padding.
    kl: float32 [B, N], the per-token KL estimate, 0.0 on padding.
  """
  kl = per_token_kl(logprobs, ref_logprobs, mask, kl_estimator)
  non_score_reward = -_f32(kl_coef) * kl
  positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
  is_last = positions[None, :] == gpt_neo.last_token_index(_f32(mask))[:, None]
  rewards = non_score_reward + jnp.where(is_last, _f32(scores)[:, None], 0.0)
  return rewards, non_score_reward, kl


def gae(rewards: Array, values: Array, mask: Array, gamma=1.0, lam=0.95) -> Tuple[Array, Array]:
  """Generalized advantage estimation (Schulman et al. 2016) over response tokens.

  delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}, computed
  backwards with a reverse `lax.scan`. The episode ends at each row's last real token: the value
  after it is 0 and nothing flows back from padding. (lm-human-preferences and TRL only take 0
  after position N - 1; TRL additionally keeps one padded value, see its `padding_mask_p1`.
  Ending the episode at EOS is the textbook treatment of a terminal state.)

  Args:
    rewards: float [B, N], e.g. from `kl_penalty_rewards`.
    values: float [B, N] value-head predictions at rollout time (V_t predicts the return from t).
    mask: float32 [B, N] response mask.
    gamma: discount (1.0 in Ziegler et al. and TRL).
    lam: GAE lambda (0.95 in Ziegler et al. and TRL).

  Returns:
    advantages: float32 [B, N], 0.0 on padding (not whitened: see `whiten`).
    returns: float32 [B, N] = advantages + values, the value-function targets, 0.0 on padding.
  """
  real = _f32(mask) > 0
  rewards = jnp.where(real, _f32(rewards), 0.0)
  values = jnp.where(real, _f32(values), 0.0)
  # The mask is a prefix, so the shifted masked values are exactly "V_{t+1}, or 0 once it ended".
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  # Deltas are 0 on padding, so the recursion below yields exactly 0 there and enters each
  # row's last real token with A = 0.
  deltas = rewards + gamma * next_values - values

  def step(next_advantage, delta):
    advantage = delta + gamma * lam * next_advantage
    return advantage, advantage

  # Scan over time ([N, B] slices), last token first; outputs come back in forward order.
  _, advantages = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32), deltas.T,
                               reverse=True)
  advantages = advantages.T
  returns = jnp.where(real, advantages + values, 0.0)
  return advantages, returns


def rloo_advantages(rewards: Array, mask: Array, group_size: int) -> Array:
  """REINFORCE-leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

  Rows b*k .. b*k+k-1 (k = `group_size`) answer the same prompt. Each episode's return is the sum
  of its per-token rewards (score + KL penalty); its baseline is the mean return of the OTHER k-1
  answers to the same prompt, so the prompt's own difficulty cancels exactly instead of being
  left to a learned value model. The advantage is the same on every response token of the row.

  Args:
    rewards: float [B*k, N] per-token rewards (e.g. from `kl_penalty_rewards`).
    mask: float32 [B*k, N] response mask.
    group_size: k >= 2 answers per prompt, adjacent rows.

  Returns:
    float32 [B*k, N]: (return - leave-one-out baseline) on real tokens, 0.0 on padding.
  """
  if group_size < 2:
    raise ValueError(f"rloo needs at least 2 answers per prompt, got group_size={group_size}")
  returns = masked_sum(rewards, mask, axis=1).reshape(-1, group_size)  # [B, k]
  baseline = (jnp.sum(returns, axis=1, keepdims=True) - returns) / (group_size - 1)
  advantages = (returns - baseline).reshape(-1, 1)
  return jnp.where(_f32(mask) > 0, advantages, 0.0)


def sequence_values(per_token: Array, mask: Array) -> Tuple[Array, Array]:
  """The one value of each row that is constant over its real tokens (e.g. RLOO advantages).

  Args:
    per_token: float [B, N], the same value on every real token of a row.
    mask: float32 [B, N] response mask.

  Returns:
    values: float32 [B], the row's value (0.0 for a row without real tokens).
    has_tokens: float32 [B], 1.0 for a row with at least one real token.
  """
  has_tokens = _f32(jnp.any(_f32(mask) > 0, axis=-1))
  return masked_mean(per_token, mask, axis=-1), has_tokens


def to_tokens(per_sequence: Array, mask: Array) -> Array:
  """Puts one value per row on every real token of the row: float32 [B, N], 0.0 on padding.

  Args:
    per_sequence: float [B].
    mask: float32 [B, N] response mask.
  """
  return jnp.where(_f32(mask) > 0, _f32(per_sequence)[:, None], 0.0)


def whiten_sequence_advantages(advantages: Array, mask: Array, eps: float = 1e-8) -> Array:
  """Whitens advantages that are constant per sequence over SEQUENCES, not tokens.

  What PPO calls instead of `whiten` for RLOO (and any estimator whose advantage is one value
  per response): one (mean, variance) over the B sequences, each counted once, as TRL's
  `RLOOTrainer` normalises its [B] advantages. Whitening them per token (as `whiten` does for
  GAE) weights each sequence by its length, and the length-weighted mean can exceed a positive
  advantage and flip its sign: one prompt, answers 10/1/1 tokens long with returns 1.0/0.6/0.0,
  leave-one-out advantages +0.7/+0.1/-0.8 become +0.39/-0.94/-2.93 per token; here they stay
  +0.93/+0.13/-1.06 (unbiased variance, like `whiten`). Rows without real tokens are left out
  of the statistics.

  Args:
    advantages: float [B, N], constant over each row's real tokens (e.g. `rloo_advantages`).
    mask: float32 [B, N] response mask.
    eps: added to the variance before the reciprocal square root (as `whiten`).

  Returns:
    float32 [B, N]: the whitened per-sequence advantage on real tokens, 0.0 on padding.
  """
  values, has_tokens = sequence_values(advantages, mask)
  return to_tokens(whiten(values, has_tokens, eps=eps), mask)


GRPO_SCALES = ("group", "batch", "none")


def grpo_advantages(scores: Array, group_size: int, *, scale: str = "group",
                    eps: float = 1e-4) -> Array:
  """GRPO's advantages: each answer's score against the other answers to the same prompt.

  A = (score - mean of its group) / (std + eps), rows b*k .. b*k+k-1 (k = `group_size`)
  answering one prompt (Shao et al. 2024, DeepSeekMath, section 4.1.2, outcome supervision;
  TRL `GRPOTrainer`, whose `scale_rewards` values these are, with its eps = 1e-4 and unbiased std):
  - "group": std of the k scores of the group (GRPO);
  - "batch": std of all B*k scores (Hu et al. 2025, REINFORCE++'s global normalisation);
  - "none": no scaling (Liu et al. 2025, Dr. GRPO: the std division over-weights prompts whose
    answers all score alike, a question-level difficulty bias).
  One value per sequence: put it on the tokens with `to_tokens`; never whiten it per token.

  Args:
    scores: float [B*k] sequence rewards.
    group_size: k >= 2 answers per prompt, adjacent rows.
    scale: "group", "batch" or "none".
    eps: added to the std (not the variance), as TRL.

  Returns:
    float32 [B*k].
  """
  if group_size < 2:
    raise UserError(f"GRPO compares the answers to one prompt: group_size={group_size} must be "
                    ">= 2 (rollout.samples_per_prompt)")
  if scale not in GRPO_SCALES:
    raise UserError(f"GRPO advantage scale {scale!r} is unknown: use one of {GRPO_SCALES}")
  scores = _f32(scores)
  if scores.shape[0] % group_size:
    raise UserError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
  grouped = scores.reshape(-1, group_size)
  centred = (grouped - jnp.mean(grouped, axis=1, keepdims=True)).reshape(-1)
  if scale == "none":
    return centred
  if scale == "group":
    std = jnp.repeat(jnp.std(grouped, axis=1, ddof=1), group_size)
  else:
    std = jnp.std(scores, ddof=1)
  return centred / (std + eps)


def reward_to_go(rewards: Array, mask: Array, gamma=1.0) -> Array:
  """Discounted return from each token to the end of its response: float32 [B, N], 0 on padding.

  G_t = sum_{s >= t} gamma^(s - t) r_s over real tokens (GAE with V = 0 and lambda = 1).

  Args:
    rewards: float [B, N] per-token rewards (e.g. `kl_penalty_rewards`).
    mask: float32 [B, N] response mask.
    gamma: discount.
  """
  returns, _ = gae(rewards, jnp.zeros_like(_f32(rewards)), mask, gamma=gamma, lam=1.0)
  return returns


def reinforce_pp_advantages(rewards: Array, mask: Array, gamma=1.0) -> Array:
  """REINFORCE++ advantages (Hu et al. 2025): the reward-to-go, whitened over the whole batch.

  Per-token rewards carry the KL penalty on every token and the score on the last one
  (`kl_penalty_rewards`), so the return differs from token to token and whitening over tokens
  is the method's own (OpenRLHF `reinforce`). "REINFORCE++ with a baseline" (OpenRLHF
  `reinforce_baseline`) first subtracts each prompt's mean score: pass
  `grpo_advantages(scores, k, scale="none")` as the scores of `kl_penalty_rewards`.

  Args:
    rewards: float [B, N] per-token rewards.
    mask: float32 [B, N] response mask.
    gamma: discount (1.0 in the paper).

  Returns:
    float32 [B, N], 0.0 on padding. Already normalised: do not whiten again.
  """
  return whiten(reward_to_go(rewards, mask, gamma), mask)


def kl_loss_term(logprobs: Array, ref_logprobs: Array, mask: Array, coef,
                 estimator: str = "k3") -> Array:
  """KL to the reference as a per-token LOSS term (GRPO), not a reward penalty (PPO).

  coef * k3, k3 = exp(ref - logp) - (ref - logp) - 1 (TRL `GRPOTrainer`'s `per_token_kl`, added
  as `beta * per_token_kl` to the per-token loss before the loss normalisation). The gradient
  flows through `logprobs` (d k3 / d logp = 1 - exp(ref - logp)); the reference is a constant.
  Reduce it with the policy loss's own `sequence_loss` normalisation.

  Args:
    logprobs: float [B, N] current-policy log-probabilities of the sampled tokens.
    ref_logprobs: float [B, N] reference log-probabilities of the same tokens.
    mask: float32 [B, N] response mask.
    coef: its coefficient (GRPO's beta; 0.04 in DeepSeekMath, 0.0 in TRL's default).
    estimator: "k3" (GRPO) or "k1"; see `per_token_kl`.

  Returns:
    float32 [B, N], 0.0 on padding.
  """
  return _f32(coef) * per_token_kl(logprobs, jax.lax.stop_gradient(_f32(ref_logprobs)), mask,
                                   estimator)


LOSS_NORMALIZATIONS = ("token", "sequence_mean", "constant")


def sequence_loss(per_token_loss: Array, mask: Array, normalization: str = "token",
                  max_tokens: Optional[int] = None) -> Array:
  """Reduces a per-token loss [B, N] to a scalar, in one of the policy-gradient literature's ways.

  - "token": sum over all real tokens / their number (DAPO, Yu et al. 2025; TRL's PPO and
    `loss_type="bnpo"`): every token weighs the same, so long answers weigh more.
  - "sequence_mean": each row's mean over its real tokens, then the mean over rows (GRPO,
    Shao et al. 2024; TRL `loss_type="grpo"`): a token of a short answer weighs more. A row
    without real tokens counts as 0 (TRL clamps its count to 1).
  - "constant": sum over real tokens / (B * max_tokens) (Dr. GRPO, Liu et al. 2025; TRL
    `loss_type="dr_grpo"`, max_tokens = max_completion_length): no length bias at all.

  All three are linear in `per_token_loss`, so a KL term may be reduced separately and added.
  With gradient accumulation, weight each micro-batch by `sequence_loss_weight`.

  Args:
    per_token_loss: float [B, N].
    mask: float32 [B, N] response mask.
    normalization: "token", "sequence_mean" or "constant".
    max_tokens: the constant of "constant"; default N (the response budget).

  Returns:
    float32 scalar.
  """
  if normalization == "token":
    return masked_mean(per_token_loss, mask)
  if normalization == "sequence_mean":
    return jnp.mean(masked_mean(per_token_loss, mask, axis=-1))
  if normalization == "constant":
    max_tokens = mask.shape[-1] if max_tokens is None else max_tokens
    return masked_sum(per_token_loss, mask) / (mask.shape[0] * max_tokens)
  raise UserError(f"loss normalization {normalization!r} is unknown: use one of "
                  f"{LOSS_NORMALIZATIONS}")


def sequence_loss_weight(mask: Array, normalization: str = "token") -> Array:
  """The `metrics["weight"]` that makes `loop.accumulate_gradients` exact for `sequence_loss`.

  Micro-batch losses averaged with these weights equal the loss of the whole batch: real tokens
  for "token", rows for "sequence_mean" and "constant".

  Args:
    mask: float32 [B, N] response mask of the micro-batch.
    normalization: as `sequence_loss`.

  Returns:
    float32 scalar.
  """
  if normalization == "token":
    return jnp.sum(_f32(mask) > 0).astype(jnp.float32)
  if normalization in ("sequence_mean", "constant"):
    return jnp.float32(mask.shape[0])
  raise UserError(f"loss normalization {normalization!r} is unknown: use one of "
                  f"{LOSS_NORMALIZATIONS}")


def ppo_policy_loss(new_logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                    clip_range=0.2, normalization: str = "token",
                    max_tokens: Optional[int] = None) -> Tuple[Array, Dict[str, Array]]:
  """PPO's clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

  per-token loss max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(new - old),
  reduced by `sequence_loss` with `normalization`: by default the mean over all real tokens of the
  minibatch (token-level, as TRL's PPO; GRPO passes its own). `old_logprobs` and `advantages` are
  treated as constants (stop_gradient).

  Args:
    new_logprobs: float [B, N] log-probabilities of the sampled tokens under the current params.
    old_logprobs: float [B, N] the same at rollout time.
    advantages: float [B, N] (usually whitened).
    mask: float32 [B, N] response mask.
    clip_range: the epsilon of the ratio clip.
    normalization: "token" (default), "sequence_mean" or "constant"; see `sequence_loss`.
    max_tokens: the constant of "constant" (default N).

  Returns:
    loss: float32 scalar.
    metrics: float32 scalars `clipfrac` (fraction of real tokens where the clipped term is the
      larger one, i.e. its gradient is zero), `approx_kl` (masked mean of 0.5 * (new - old)^2: the
      k2 estimator of KL(old || new) in Schulman's note, which TRL logs as `approxkl`; TRL averages
      over padding too), `ratio_mean` (masked mean of the ratio).
  """
  real = _f32(mask) > 0
  old_logprobs = jax.lax.stop_gradient(_f32(old_logprobs))
  advantages = jax.lax.stop_gradient(_f32(advantages))
  log_ratio = jnp.where(real, _f32(new_logprobs) - old_logprobs, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  loss = sequence_loss(jnp.maximum(unclipped, clipped), mask, normalization, max_tokens)
  metrics = {
      "clipfrac": masked_mean(_f32(clipped > unclipped), mask),
      "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask),
      "ratio_mean": masked_mean(ratio, mask),
  }
  return loss, jax.lax.stop_gradient(metrics)


def ppo_value_loss(new_values: Array, old_values: Array, returns: Array, mask: Array,
                   clip_range_value=0.2) -> Tuple[Array, Dict[str, Array]]:
  """Clipped value loss of Ziegler et al. / TRL.

  loss = 0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2)), v_clipped = clip(v, v_old - c,
  v_old + c): the new prediction may not move more than c away from the rollout-time one.
  Padding is masked out before clipping and squaring, so garbage (NaN, inf) at a padded position
  changes neither the loss nor its gradient.

  Args:
    new_values: float [B, N] value-head predictions under the current params.
    old_values: float [B, N] predictions at rollout time.
    returns: float [B, N] targets, from `gae`.
    mask: float32 [B, N] response mask.
    clip_range_value: c.

  Returns:
    loss: float32 scalar.
    metrics: float32 scalars `vf_clipfrac` (fraction of real tokens where the clipped error is
      the larger one) and `value_error` (masked mean of (v - R)^2, unclipped).
  """
  # Padding positions are replaced by 0 BEFORE any arithmetic: a NaN or inf there would
  # otherwise reach the loss's gradient through the clip and the square (0 * NaN = NaN), even
  # though the masked mean selects it away in the forward value.
  real = _f32(mask) > 0
  new_values = jnp.where(real, _f32(new_values), 0.0)
  old_values = jax.lax.stop_gradient(jnp.where(real, _f32(old_values), 0.0))
  returns = jax.lax.stop_gradient(jnp.where(real, _f32(returns), 0.0))
  clipped_values = jnp.clip(new_values, old_values - clip_range_value,
                            old_values + clip_range_value)
  unclipped_error = jnp.square(new_values - returns)
  clipped_error = jnp.square(clipped_values - returns)
  loss = 0.5 * masked_mean(jnp.maximum(unclipped_error, clipped_error), mask)
  metrics = {
      "vf_clipfrac": masked_mean(_f32(clipped_error > unclipped_error), mask),
      "value_error": masked_mean(unclipped_error, mask),
  }
  return loss, jax.lax.stop_gradient(metrics)


def logprobs_from_logits(logits: Array, tokens: Array) -> Array:
  """Log-probabilities of `tokens` under `logits`: logits[token] - logsumexp(logits).

  Gathers before normalising, so no [B, N, V] log-softmax is kept. Callers that sampled with a
  temperature must pass logits / temperature (Huang et al., detail "temperature in training").

  Args:
    logits: float [B, N, V] (any float dtype; computed in float32).
    tokens: int32 [B, N] token ids in [0, V).

  Returns:
    float32 [B, N].
  """
  # Subtracting the row maximum first keeps float32 precision for large logits (1e4 has an ulp
  # of 1e-3); the maximum is a constant of the softmax, so it carries no gradient.
  logits = _f32(logits)
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  picked = jnp.take_along_axis(shifted, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(shifted, axis=-1)


def entropy_from_logits(logits: Array) -> Array:
  """Entropy of the softmax distribution of each position, -sum(p * log p), in nats.

  log p comes from `log_softmax` (logsumexp inside), so large logits do not overflow; tokens
  with probability 0 (logit -inf) contribute 0 rather than 0 * -inf = NaN, in value and gradient.

  Args:
    logits: float [B, N, V].

  Returns:
    float32 [B, N].
  """
  log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
  present = log_p > -jnp.inf
  safe_log_p = jnp.where(present, log_p, 0.0)
  return -jnp.sum(jnp.where(present, jnp.exp(safe_log_p) * safe_log_p, 0.0), axis=-1)


def adaptive_kl_update(kl_coef, current_kl, n_steps, *, target, horizon) -> Array:
  """One step of Ziegler et al.'s adaptive KL controller (lm-human-preferences, TRL).

  e = clip(current_kl / target - 1, -0.2, 0.2);  kl_coef * (1 + e * n_steps / horizon).
  Pure: the coefficient is the controller's whole state, threaded through by the caller.

  Args:
    kl_coef: float scalar, the current coefficient beta.
    current_kl: float scalar, the measured KL (batch mean of per-sequence k1 sums).
    n_steps: number of episodes (responses) in the batch just collected.
    target: the KL to steer towards (> 0).
    horizon: episodes over which the error is corrected (> 0).

  Returns:
    float32 scalar, the new coefficient.
  """
  proportional_error = jnp.clip(_f32(current_kl) / target - 1.0, -0.2, 0.2)
  return _f32(kl_coef) * (1.0 + proportional_error * n_steps / horizon)


def fixed_kl_update(kl_coef, current_kl, n_steps) -> Array:
  """The fixed KL controller: same signature as `adaptive_kl_update`, coefficient unchanged.

  Returns:
    float32 scalar `kl_coef`.
  """
  del current_kl, n_steps  # A fixed coefficient ignores the measurement.
  return _f32(kl_coef)


def controller_kl(estimates: Dict[str, Array], estimator: str) -> Array:
  """The KL the adaptive controller reads: the penalty's own estimator, never another one.

  Steering with k1 while the reward is penalised with k3 (or the reverse) would hold the wrong
  quantity at `kl_target`.

  Args:
    estimates: the dict of `kl_estimates`.
    estimator: the penalty's `kl_estimator`, "k1" or "k3".

  Returns:
    float32 scalar: the batch mean of per-sequence sums of that estimator.
  """
  if estimator not in ("k1", "k3"):
    raise UserError(f"KL estimator {estimator!r} is unknown: use 'k1' or 'k3'")
  return estimates[f"{estimator}_mean"]


def early_stop_step(stopped: Array, approx_kl: Array, bound) -> Tuple[Array, Array]:
  """One optimizer update of the approx-KL early stop: "apply the step that crossed, then stop".

  TRL (`PPOTrainer`'s `early_stopping`) applies the minibatch step whose KL crossed the bound and
  only then breaks out of the minibatch and epoch loops. For a `lax.scan` over updates, carry
  `stopped` (initially False) and, with `apply` False, skip the update's work as well as its
  result (`lax.cond`), so the stopped tail costs nothing.

  Args:
    stopped: bool scalar, whether an earlier update crossed the bound.
    approx_kl: float scalar, this update's approx-KL (measured on its own minibatch, before
      the step, as `ppo_policy_loss` returns it).
    bound: the approx-KL bound; <= 0 disables the early stop.

  Returns:
    apply: bool scalar, whether this update is applied (no earlier update crossed).
    stopped: bool scalar, the carry for the next update (this one crossed, or an earlier one).
  """
  apply = jnp.logical_not(stopped)
  if bound is None or (isinstance(bound, (int, float)) and bound <= 0):
    return apply, jnp.asarray(stopped, bool)
  return apply, jnp.logical_or(stopped, apply & (_f32(approx_kl) > bound))


def early_stop_applied(approx_kls: Array, bound) -> Array:
  """Which of a sequence of updates are applied under `early_stop_step`: bool [U].

  Update u is applied when no update before it crossed the bound; the one that crossed is
  applied, every later one is not. (The same rule in vector form, for tests and metrics.)

  Args:
    approx_kls: float [U], the approx-KL each update measured (a skipped update's value is
      ignored).
    bound: the approx-KL bound; <= 0 disables the early stop.
  """
  approx_kls = _f32(approx_kls)
  if bound is None or bound <= 0:
    return jnp.ones(approx_kls.shape, bool)
  crossed = approx_kls > bound
  crossed_before = jnp.cumsum(crossed.astype(jnp.int32)) - crossed.astype(jnp.int32)
  return crossed_before == 0


def minibatch_permutations(rng: Array, batch_size: int, num_minibatches: int,
                           num_epochs: int) -> Array:
  """Row indices of shuffled minibatches, a fresh permutation of the batch per PPO epoch.

  Shaped so that the update can be one compiled `lax.scan` over epochs and minibatches; every row
  is used exactly once per epoch (TRL draws `np.random.permutation` per epoch the same way).

  Args:
    rng: a JAX PRNG key.
    batch_size: rollouts per PPO batch (static).
    num_minibatches: minibatches per epoch (static); must divide `batch_size`.
    num_epochs: PPO epochs over the batch (static).

  Returns:
    int32 [num_epochs, num_minibatches, batch_size // num_minibatches].

  Raises:
    UserError: if the sizes are not positive or `num_minibatches` does not divide `batch_size`.
  """
  if min(batch_size, num_minibatches, num_epochs) < 1:
    raise UserError(f"PPO batch_size ({batch_size}), num_minibatches ({num_minibatches}) and "
                    f"num_epochs ({num_epochs}) must all be positive")
  if batch_size % num_minibatches:
    raise UserError(f"PPO batch_size ({batch_size}) is not divisible by num_minibatches "
                    f"({num_minibatches})")
  keys = jax.random.split(rng, num_epochs)
  permutations = jax.vmap(lambda key: jax.random.permutation(key, batch_size))(keys)
  return permutations.reshape(num_epochs, num_minibatches,
                              batch_size // num_minibatches).astype(jnp.int32)
