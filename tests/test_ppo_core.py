"""Tests of the PPO mathematics against NumPy/SciPy references and hand-computed values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from rlhf_jax.errors import UserError
from rlhf_jax.training import ppo_core


def _mask_from_lengths(lengths, n):
  return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _random_lengths(rng, batch, n):
  """Row lengths that include a length-1 row and a full-length row."""
  lengths = rng.integers(1, n + 1, size=batch)
  lengths[0], lengths[1] = 1, n
  return lengths


def _with_garbage_on_padding(x, mask, value=np.nan):
  """Padding may hold anything (TRL stores a sentinel there): results must not depend on it."""
  return np.where(mask > 0, x, value).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# GAE


def _gae_reference(rewards, values, lengths, gamma, lam):
  """GAE straight from its definition, one row and one token at a time, in float64."""
  batch, n = rewards.shape
  advantages = np.zeros((batch, n))
  for b in range(batch):
    next_advantage = 0.0
    for t in reversed(range(lengths[b])):
      next_value = values[b, t + 1] if t + 1 < lengths[b] else 0.0  # episode ends at last token
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_advantage = delta + gamma * lam * next_advantage
      advantages[b, t] = next_advantage
  mask = _mask_from_lengths(lengths, n)
  return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_numpy_loop(gamma, lam):
  rng = np.random.default_rng(0)
  batch, n = 6, 9
  lengths = _random_lengths(rng, batch, n)
  mask = _mask_from_lengths(lengths, n)
  rewards = rng.normal(size=(batch, n)).astype(np.float32)
  values = rng.normal(size=(batch, n)).astype(np.float32)
  expected_adv, expected_ret = _gae_reference(rewards.astype(np.float64), values.astype(np.float64),
                                              lengths, gamma, lam)

  gae = jax.jit(ppo_core.gae)
  advantages, returns = gae(_with_garbage_on_padding(rewards, mask),
                            _with_garbage_on_padding(values, mask), mask, gamma, lam)

  np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, expected_ret, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, (advantages + values) * mask, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(advantages)[mask == 0] == 0)
  assert np.all(np.asarray(returns)[mask == 0] == 0)


@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_rloo_advantages_match_numpy_loop(group_size):
  """Each episode's return minus the mean return of the other answers to its prompt, written out
  one episode at a time; the same on every real token, 0 on padding."""
  rng = np.random.default_rng(group_size)
  prompts, n = 3, 7
  batch = prompts * group_size
  lengths = _random_lengths(rng, batch, n)
  mask = _mask_from_lengths(lengths, n)
  rewards = rng.normal(size=(batch, n)).astype(np.float32)
  returns = [rewards[b, :lengths[b]].astype(np.float64).sum() for b in range(batch)]
  expected = np.zeros((batch, n))
  for b in range(batch):
    group = range(b - b % group_size, b - b % group_size + group_size)
    others = [returns[j] for j in group if j != b]
    expected[b, :lengths[b]] = returns[b] - sum(others) / len(others)

  advantages = jax.jit(ppo_core.rloo_advantages, static_argnums=2)(
      _with_garbage_on_padding(rewards, mask), mask, group_size)

  np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(advantages)[mask == 0] == 0)
  # A constant added to every return of one prompt (its difficulty) changes nothing.
  shifted = rewards.copy()
  shifted[:group_size, 0] += 5.0
  np.testing.assert_allclose(ppo_core.rloo_advantages(shifted, mask, group_size), advantages,
                             rtol=1e-4, atol=1e-4)


def test_rloo_needs_two_answers_per_prompt():
  with pytest.raises(ValueError, match="at least 2"):
    ppo_core.rloo_advantages(np.zeros((4, 3), np.float32), np.ones((4, 3), np.float32), 1)


def test_gae_with_gamma_lam_one_is_monte_carlo_return_minus_value():
  """With gamma = lam = 1 the advantage telescopes to (sum of future rewards) - V_t."""
  rng = np.random.default_rng(1)
  batch, n = 4, 7
  lengths = _random_lengths(rng, batch, n)
  mask = _mask_from_lengths(lengths, n)
  rewards = rng.normal(size=(batch, n)).astype(np.float32) * mask
  values = rng.normal(size=(batch, n)).astype(np.float32) * mask
  reward_to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]

  advantages, returns = ppo_core.gae(rewards, values, mask, gamma=1.0, lam=1.0)

  np.testing.assert_allclose(advantages, (reward_to_go - values) * mask, atol=1e-5)
  np.testing.assert_allclose(returns, reward_to_go * mask, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Whitening and masked statistics


def test_whiten_hand_example():
  x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 7.0, 9.0]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
  # Real values 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3.
  scale = 1.0 / np.sqrt(5.0 / 3.0 + 1e-8)
  expected = np.array([[-1.5, -0.5, 0.5, 0.0], [1.5, 0.0, 0.0, 0.0]]) * scale

  whitened = np.asarray(jax.jit(ppo_core.whiten)(x, mask))

  np.testing.assert_allclose(whitened, expected, rtol=1e-6)
  real = whitened[mask > 0]
  np.testing.assert_allclose(real.mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(real.var(ddof=1), 1.0, rtol=1e-5)

  kept_mean = np.asarray(ppo_core.whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept_mean, (expected + 2.5) * mask, rtol=1e-6)
  np.testing.assert_allclose(kept_mean[mask > 0].mean(), 2.5, rtol=1e-6)
  np.testing.assert_allclose(kept_mean[mask > 0].var(ddof=1), 1.0, rtol=1e-5)


def test_whiten_biased_and_unmasked_match_numpy():
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(5, 8)) * 3 + 1).astype(np.float32)
  mask = _mask_from_lengths(_random_lengths(rng, 5, 8), 8)
  real = x[mask > 0].astype(np.float64)

  biased = np.asarray(ppo_core.whiten(x, mask, unbiased=False))
  np.testing.assert_allclose(biased[mask > 0], (real - real.mean()) / np.sqrt(real.var() + 1e-8),
                             rtol=1e-4, atol=1e-5)

  everything = np.asarray(ppo_core.whiten(x))
  flat = x.astype(np.float64)
  np.testing.assert_allclose(everything, (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8),
                             rtol=1e-4, atol=1e-5)


def test_masked_mean_and_var_ignore_padding_and_handle_empty_masks():
  x = np.array([[1.0, np.nan, np.inf], [3.0, 5.0, -np.inf]], np.float32)
  mask = np.array([[1, 0, 0], [1, 1, 0]], np.float32)
  assert float(ppo_core.masked_mean(x, mask)) == pytest.approx(3.0)
  np.testing.assert_allclose(ppo_core.masked_mean(x, mask, axis=1), [1.0, 4.0])
  assert float(ppo_core.masked_var(x, mask)) == pytest.approx(4.0)  # ddof=1 of 1, 3, 5
  assert float(ppo_core.masked_var(x, mask, unbiased=False)) == pytest.approx(8.0 / 3.0)
  empty = np.zeros_like(mask)
  assert float(ppo_core.masked_mean(x, empty)) == 0.0
  assert float(ppo_core.masked_var(x, empty)) == 0.0


# ---------------------------------------------------------------------------------------------
# KL controllers


@pytest.mark.parametrize("current_kl,expected", [
    (6.6, 0.1 * (1 + 0.1 * 512 / 10000)),   # error 0.1, inside the clip
    (6.0, 0.1),                             # on target: unchanged
    (12.0, 0.1 * (1 + 0.2 * 512 / 10000)),  # error 1.0 clipped to +0.2
    (0.0, 0.1 * (1 - 0.2 * 512 / 10000)),   # error -1.0 clipped to -0.2
    (4.5, 0.1 * (1 - 0.2 * 512 / 10000)),   # error exactly -0.25 -> clipped -0.2
])
def test_adaptive_kl_update_hand_values(current_kl, expected):
  update = jax.jit(functools.partial(ppo_core.adaptive_kl_update, target=6.0, horizon=10000))
  assert float(update(0.1, current_kl, 512)) == pytest.approx(expected, rel=1e-6)


def test_adaptive_kl_update_threads_state_through_scan():
  """The coefficient is the whole state: iterating the update under lax.scan matches a loop."""
  kls = np.array([10.0, 7.0, 5.0, 1.0], np.float32)

  def step(coef, kl):
    new = ppo_core.adaptive_kl_update(coef, kl, 64, target=6.0, horizon=1000)
    return new, new

  final, _ = jax.lax.scan(step, jnp.float32(0.2), kls)
  coef = 0.2
  for kl in kls:
    coef *= 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * 64 / 1000
  assert float(final) == pytest.approx(coef, rel=1e-6)


def test_fixed_kl_update_keeps_coefficient():
  assert float(jax.jit(ppo_core.fixed_kl_update)(0.05, 123.0, 512)) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------
# Rewards with KL shaping, EOS handling


def test_kl_penalty_rewards_places_score_on_last_real_token():
  n, coef = 5, 0.3
  # Row 0 stops with EOS at index 2; row 1 hits the length limit; row 2 is a single EOS token.
  lengths = np.array([3, 5, 1])
  mask = _mask_from_lengths(lengths, n)
  rng = np.random.default_rng(3)
  logprobs = rng.normal(size=(3, n)).astype(np.float32)
  ref_logprobs = rng.normal(size=(3, n)).astype(np.float32)
  scores = np.array([1.5, -2.0, 0.7], np.float32)

  rewards, non_score, kl = jax.jit(ppo_core.kl_penalty_rewards)(
      scores, _with_garbage_on_padding(logprobs, mask, 1.0),
      _with_garbage_on_padding(ref_logprobs, mask, np.nan), mask, coef)

  expected_kl = np.zeros((3, n))
  expected_rewards = np.zeros((3, n))
  for b in range(3):
    for t in range(lengths[b]):
      expected_kl[b, t] = logprobs[b, t] - ref_logprobs[b, t]
      expected_rewards[b, t] = -coef * expected_kl[b, t]
  expected_rewards[0, 2] += 1.5
  expected_rewards[1, 4] += -2.0
  expected_rewards[2, 0] += 0.7
  np.testing.assert_allclose(kl, expected_kl, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(non_score, -coef * expected_kl, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rewards, expected_rewards, rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(rewards)[mask == 0] == 0)
  # The scores are all there, once each.
  np.testing.assert_allclose(np.sum(np.asarray(rewards) - np.asarray(non_score), axis=1), scores,
                             rtol=1e-6)


def test_kl_penalty_rewards_k3_estimator():
  mask = _mask_from_lengths([2, 3], 3)
  logprobs = np.array([[-1.0, -2.0, 0.0], [-0.5, -0.1, -3.0]], np.float32)
  ref_logprobs = np.array([[-1.5, -1.0, 0.0], [-0.5, -0.4, -2.0]], np.float32)
  _, _, kl = ppo_core.kl_penalty_rewards(np.zeros(2, np.float32), logprobs, ref_logprobs, mask,
                                         0.1, kl_estimator="k3")
  log_r = (ref_logprobs - logprobs).astype(np.float64)
  np.testing.assert_allclose(kl, (np.exp(log_r) - 1 - log_r) * mask, rtol=1e-5, atol=1e-7)
  with pytest.raises(UserError, match="k2"):
    ppo_core.kl_penalty_rewards(np.zeros(2), logprobs, ref_logprobs, mask, 0.1, kl_estimator="k2")


def test_missing_eos_penalty_uses_last_real_token():
  eos, pad = 9, 9  # GPT-Neo pads with its EOS token: padding must not count as "ended".
  tokens = np.array([
      [4, 5, eos, pad, pad],  # ended with EOS
      [4, 5, 6, 7, 8],        # hit the length limit
      [eos, pad, pad, pad, pad],
      [4, 5, 6, pad, pad],    # stopped without EOS (truncated by another stop rule)
  ], np.int32)
  mask = _mask_from_lengths([3, 5, 1, 3], 5)
  has_eos = ppo_core.ended_with_eos(tokens, mask, eos)
  np.testing.assert_array_equal(has_eos, [True, False, True, False])

  scores = np.array([1.0, 2.0, -1.0, 0.5], np.float32)
  penalised = jax.jit(ppo_core.missing_eos_penalty)(scores, has_eos, 1.5)
  np.testing.assert_allclose(penalised, [1.0, 0.5, -1.0, -1.0])


# ---------------------------------------------------------------------------------------------
# PPO losses


def _random_ppo_batch(seed, batch=8, n=12):
  rng = np.random.default_rng(seed)
  mask = _mask_from_lengths(_random_lengths(rng, batch, n), n)
  old = rng.normal(-2.0, 1.0, size=(batch, n)).astype(np.float32)
  # Log-ratios with std 0.4 put many tokens outside [0.8, 1.2], on both sides.
  new = (old + rng.normal(0.0, 0.4, size=(batch, n))).astype(np.float32)
  advantages = rng.normal(size=(batch, n)).astype(np.float32)
  return mask, old, new, advantages


def test_policy_loss_matches_numpy_and_gradient_vanishes_on_clipped_tokens():
  mask, old, new, advantages = _random_ppo_batch(4)
  clip = 0.2
  real = mask > 0
  ratio = np.exp(new.astype(np.float64) - old)
  surrogate = advantages * ratio
  clipped_surrogate = advantages * np.clip(ratio, 1 - clip, 1 + clip)
  # PPO maximises the elementwise minimum of the two surrogates.
  objective = np.minimum(surrogate, clipped_surrogate)
  expected_loss = -objective[real].mean()
  clipped = clipped_surrogate < surrogate
  assert 0.1 < clipped[real].mean() < 0.9  # the data really exercises both regions

  loss_fn = jax.jit(ppo_core.ppo_policy_loss)
  loss, metrics = loss_fn(new, _with_garbage_on_padding(old, mask),
                          _with_garbage_on_padding(advantages, mask), mask, clip)
  assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
  assert float(metrics["clipfrac"]) == pytest.approx(clipped[real].mean(), rel=1e-6)
  assert float(metrics["ratio_mean"]) == pytest.approx(ratio[real].mean(), rel=1e-5)
  log_ratio = new.astype(np.float64) - old
  assert float(metrics["approx_kl"]) == pytest.approx(0.5 * (log_ratio[real] ** 2).mean(),
                                                      rel=1e-5)

  grad = np.asarray(jax.grad(lambda lp: loss_fn(lp, old, advantages, mask, clip)[0])(new))
  # d/d(new logprob) of -A * ratio is -A * ratio; clipped tokens and padding get nothing.
  expected_grad = np.where(real & ~clipped, -advantages * ratio / real.sum(), 0.0)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
  assert np.all(grad[real & clipped] == 0)


def test_value_loss_matches_numpy_and_gradient_vanishes_on_clipped_tokens():
  rng = np.random.default_rng(5)
  batch, n, clip = 8, 12, 0.2
  mask = _mask_from_lengths(_random_lengths(rng, batch, n), n)
  old = rng.normal(size=(batch, n)).astype(np.float32)
  new = (old + rng.normal(0.0, 0.3, size=(batch, n))).astype(np.float32)
  returns = (old + rng.normal(0.0, 0.5, size=(batch, n))).astype(np.float32)
  real = mask > 0
  err = (new.astype(np.float64) - returns) ** 2
  err_clipped = (np.clip(new, old - clip, old + clip).astype(np.float64) - returns) ** 2
  clipped = err_clipped > err
  assert 0.1 < clipped[real].mean() < 0.9

  loss_fn = jax.jit(ppo_core.ppo_value_loss)
  loss, metrics = loss_fn(new, _with_garbage_on_padding(old, mask),
                          _with_garbage_on_padding(returns, mask), mask, clip)
  assert float(loss) == pytest.approx(0.5 * np.maximum(err, err_clipped)[real].mean(), rel=1e-5)
  assert float(metrics["vf_clipfrac"]) == pytest.approx(clipped[real].mean(), rel=1e-6)
  assert float(metrics["value_error"]) == pytest.approx(err[real].mean(), rel=1e-5)

  grad = np.asarray(jax.grad(lambda v: loss_fn(v, old, returns, mask, clip)[0])(new))
  # d/dv of 0.5 * (v - R)^2 averaged over real tokens; the clipped error is constant in v.
  expected_grad = np.where(real & ~clipped, (new - returns) / real.sum(), 0.0)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimates_sums_and_k3_non_negative():
  rng = np.random.default_rng(6)
  batch, n = 6, 10
  mask = _mask_from_lengths(_random_lengths(rng, batch, n), n)
  logprobs = rng.normal(-3.0, 2.0, size=(batch, n)).astype(np.float32)
  ref_logprobs = rng.normal(-3.0, 2.0, size=(batch, n)).astype(np.float32)

  est = jax.jit(ppo_core.kl_estimates)(logprobs, _with_garbage_on_padding(ref_logprobs, mask),
                                       mask)

  log_r = (ref_logprobs.astype(np.float64) - logprobs) * mask
  k1 = (-log_r).sum(axis=1)
  k3 = ((np.exp(log_r) - 1 - log_r) * mask).sum(axis=1)
  np.testing.assert_allclose(est["k1"], k1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(est["k3"], k3, rtol=1e-4)
  assert float(est["k1_mean"]) == pytest.approx(k1.mean(), rel=1e-5, abs=1e-5)
  assert float(est["k3_mean"]) == pytest.approx(k3.mean(), rel=1e-4)
  assert np.all(np.asarray(est["k3"]) >= 0)

  # Non-negative per token too, including tiny log-ratios where rounding could go below zero.
  tiny = rng.normal(0.0, 1e-4, size=(64, 64)).astype(np.float32)
  per_token = ppo_core.per_token_kl(tiny, np.zeros_like(tiny), np.ones_like(tiny), "k3")
  assert np.all(np.asarray(per_token) >= 0)


def test_k3_is_second_order_for_tiny_differences():
  """For log r = d -> 0, k3 = d^2 / 2 + O(d^3): it matches the k2 estimator, and expm1 keeps it."""
  d = np.array([[1e-3, -1e-3, 3e-4, -2e-5]], np.float32)
  k3 = np.asarray(ppo_core.per_token_kl(np.zeros_like(d), d, np.ones_like(d), "k3"))
  np.testing.assert_allclose(k3, 0.5 * d.astype(np.float64) ** 2, rtol=2e-3)


def test_k1_and_k3_agree_in_expectation_on_close_distributions():
  """Both are unbiased for KL(p || q) on tokens sampled from p: their means meet the exact KL."""
  rng = np.random.default_rng(7)
  vocab, samples = 20, 200_000
  p_logits = rng.normal(size=vocab)
  q_logits = p_logits + 0.3 * rng.normal(size=vocab)  # a reference close to the policy
  log_p = scipy.special.log_softmax(p_logits)
  log_q = scipy.special.log_softmax(q_logits)
  exact = float(np.sum(np.exp(log_p) * (log_p - log_q)))
  tokens = rng.choice(vocab, size=(samples // 100, 100), p=np.exp(log_p))

  est = ppo_core.kl_estimates(log_p[tokens].astype(np.float32), log_q[tokens].astype(np.float32),
                              np.ones(tokens.shape, np.float32))
  per_token_k1 = float(est["k1_mean"]) / 100
  per_token_k3 = float(est["k3_mean"]) / 100
  assert per_token_k1 == pytest.approx(exact, rel=0.05)
  assert per_token_k3 == pytest.approx(exact, rel=0.05)
  assert per_token_k1 == pytest.approx(per_token_k3, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits


def test_logprobs_and_entropy_match_scipy_and_log_softmax():
  rng = np.random.default_rng(8)
  logits = (rng.normal(size=(3, 4, 11)) * 3).astype(np.float32)
  tokens = rng.integers(0, 11, size=(3, 4)).astype(np.int32)

  logprobs = np.asarray(jax.jit(ppo_core.logprobs_from_logits)(logits, tokens))
  entropy = np.asarray(jax.jit(ppo_core.entropy_from_logits)(logits))

  log_softmax = jax.nn.log_softmax(logits, axis=-1)
  np.testing.assert_allclose(
      logprobs, jnp.take_along_axis(log_softmax, tokens[..., None], axis=-1)[..., 0], rtol=1e-5)
  scipy_log_p = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
  scipy_logprobs = np.take_along_axis(scipy_log_p, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(logprobs, scipy_logprobs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(entropy, scipy.stats.entropy(np.exp(scipy_log_p), axis=-1),
                             rtol=1e-5, atol=1e-6)
  # d log p(token) / d logits = onehot(token) - softmax(logits).
  grad = jax.grad(lambda x: ppo_core.logprobs_from_logits(x, tokens).sum())(logits)
  expected_grad = np.eye(11)[tokens] - np.exp(scipy_log_p)
  np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_logprobs_and_entropy_are_stable():
  # Huge logits would overflow a naive softmax; -inf logits (banned tokens) must not give NaN.
  logits = np.array([[[1e4, 1e4 - 1.0, -np.inf, 1e4 - 2.0]]], np.float32)
  p = scipy.special.softmax(np.array([2.0, 1.0, 0.0]))
  entropy = ppo_core.entropy_from_logits(logits)
  np.testing.assert_allclose(entropy, [[-np.sum(p * np.log(p))]], rtol=1e-5)
  np.testing.assert_allclose(ppo_core.logprobs_from_logits(logits, np.array([[3]])),
                             [[np.log(p[2])]], rtol=1e-5)
  grad = jax.grad(lambda x: ppo_core.entropy_from_logits(x).sum())(jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(grad)))
  # bfloat16 logits are computed in float32.
  bf16 = ppo_core.entropy_from_logits(jnp.asarray([[[0.0, 0.0]]], jnp.bfloat16))
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, [[np.log(2.0)]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Minibatches


def test_minibatch_permutations_cover_the_batch_each_epoch():
  make = jax.jit(ppo_core.minibatch_permutations, static_argnums=(1, 2, 3))
  idx = np.asarray(make(jax.random.key(0), 12, 3, 4))
  assert idx.shape == (4, 3, 4) and idx.dtype == np.int32
  for epoch in idx:
    np.testing.assert_array_equal(np.sort(epoch.ravel()), np.arange(12))
  assert len({tuple(epoch.ravel()) for epoch in idx}) > 1  # reshuffled between epochs
  np.testing.assert_array_equal(idx, make(jax.random.key(0), 12, 3, 4))  # deterministic in rng


def test_minibatch_permutations_reject_bad_sizes():
  with pytest.raises(UserError, match="not divisible"):
    ppo_core.minibatch_permutations(jax.random.key(0), 10, 3, 1)
  with pytest.raises(UserError, match="positive"):
    ppo_core.minibatch_permutations(jax.random.key(0), 8, 0, 1)


# ---------------------------------------------------------------------------------------------
# Sequence-level advantages (RLOO whitening, GRPO, REINFORCE++), loss normalisations, KL loss


def _sign_case():
  """The audit's case: one prompt, answers 10/1/1 tokens long with returns 1.0/0.6/0.0."""
  lengths, returns, n = [10, 1, 1], [1.0, 0.6, 0.0], 10
  mask = _mask_from_lengths(lengths, n)
  rewards = np.zeros((3, n), np.float32)
  for row, (length, value) in enumerate(zip(lengths, returns)):
    rewards[row, length - 1] = value
  return rewards, mask


def test_rloo_whitened_per_sequence_keeps_the_signs_of_the_audit_case():
  rewards, mask = _sign_case()
  raw = ppo_core.rloo_advantages(rewards, mask, group_size=3)
  np.testing.assert_allclose(np.asarray(raw)[:, 0], [0.7, 0.1, -0.8], atol=1e-6)
  # The old per-token whitening: the 10-token answer pulls the mean to 0.525 and flips the
  # +0.1 answer's sign (the audit's +0.39 / -0.94 / -2.93).
  per_token = np.asarray(ppo_core.whiten(raw, mask))[:, 0]
  np.testing.assert_allclose(per_token, [0.39, -0.94, -2.93], atol=6e-3)

  whitened = np.asarray(jax.jit(ppo_core.whiten_sequence_advantages)(raw, mask))
  expected = np.array([0.7, 0.1, -0.8]) / np.std([0.7, 0.1, -0.8], ddof=1)  # mean is 0
  np.testing.assert_allclose(whitened[:, 0], expected, rtol=1e-5)
  np.testing.assert_array_equal(np.sign(whitened[:, 0]), [1, 1, -1])
  # Constant on each row's real tokens, 0 on padding.
  np.testing.assert_allclose(whitened, np.where(mask > 0, expected[:, None], 0.0), rtol=1e-5)


def test_whiten_sequence_advantages_matches_numpy():
  rng = np.random.default_rng(11)
  batch, n, k = 12, 9, 4
  lengths = _random_lengths(rng, batch, n)
  lengths[5] = 0  # a row without real tokens is left out of the statistics
  mask = _mask_from_lengths(lengths, n)
  rewards = rng.normal(size=(batch, n)).astype(np.float32)
  raw = np.asarray(ppo_core.rloo_advantages(rewards, mask, k))
  out = np.asarray(ppo_core.whiten_sequence_advantages(_with_garbage_on_padding(raw, mask), mask))

  # Reference: one advantage per non-empty sequence, plain mean and unbiased std over them.
  values = np.array([raw[b, 0] for b in range(batch) if lengths[b] > 0], np.float64)
  mean, var = values.mean(), values.var(ddof=1)
  expected = np.zeros((batch, n))
  for b in range(batch):
    expected[b, :lengths[b]] = (raw[b, 0] - mean) / np.sqrt(var + 1e-8)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _grpo_reference(scores, k, scale, eps=1e-4):
  """GRPO advantages one group at a time (TRL GRPOTrainer's formula), in float64."""
  scores = np.asarray(scores, np.float64)
  out = np.zeros_like(scores)
  for start in range(0, len(scores), k):
    group = scores[start:start + k]
    out[start:start + k] = group - group.mean()
    if scale == "group":
      out[start:start + k] /= group.std(ddof=1) + eps
  if scale == "batch":
    out /= scores.std(ddof=1) + eps
  return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_numpy(scale):
  rng = np.random.default_rng(12)
  k = 4
  scores = rng.normal(size=6 * k).astype(np.float32)
  scores[:k] = 1.0  # a group whose answers all score alike: advantages 0, not NaN
  scores[k:2 * k] = [1.0, 0.0, 0.0, 0.0]  # verifier-style 0/1 rewards
  fn = jax.jit(functools.partial(ppo_core.grpo_advantages, group_size=k, scale=scale))
  out = np.asarray(fn(scores))
  np.testing.assert_allclose(out, _grpo_reference(scores, k, scale), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[:k], 0.0)
  # The one right answer among four is pushed up, the three wrong ones down.
  assert out[k] > 0 and np.all(out[k + 1:2 * k] < 0)
  if scale == "group":  # hand value: centred 0.75 / std 0.5 (unbiased)
    assert out[k] == pytest.approx(0.75 / (0.5 + 1e-4), rel=1e-6)


def test_grpo_advantages_reject_bad_settings():
  with pytest.raises(UserError, match="group_size=1"):
    ppo_core.grpo_advantages(np.zeros(4, np.float32), 1)
  with pytest.raises(UserError, match="'std'"):
    ppo_core.grpo_advantages(np.zeros(4, np.float32), 2, scale="std")
  with pytest.raises(UserError, match="groups of 3"):
    ppo_core.grpo_advantages(np.zeros(4, np.float32), 3)


def test_to_tokens_and_sequence_values_round_trip():
  mask = _mask_from_lengths([3, 0, 5], 5)
  per_token = np.asarray(ppo_core.to_tokens(np.array([1.5, 2.0, -1.0], np.float32), mask))
  np.testing.assert_array_equal(per_token, np.where(mask > 0, [[1.5], [2.0], [-1.0]], 0.0))
  values, has_tokens = ppo_core.sequence_values(per_token, mask)
  np.testing.assert_array_equal(values, [1.5, 0.0, -1.0])
  np.testing.assert_array_equal(has_tokens, [1.0, 0.0, 1.0])


def test_reinforce_pp_advantages_match_numpy():
  rng = np.random.default_rng(13)
  batch, n, gamma = 6, 8, 0.9
  lengths = _random_lengths(rng, batch, n)
  mask = _mask_from_lengths(lengths, n)
  rewards = rng.normal(size=(batch, n)).astype(np.float32)
  expected_returns = np.zeros((batch, n))
  for b in range(batch):
    running = 0.0
    for t in reversed(range(lengths[b])):
      running = rewards[b, t] + gamma * running
      expected_returns[b, t] = running
  garbage = _with_garbage_on_padding(rewards, mask)
  np.testing.assert_allclose(ppo_core.reward_to_go(garbage, mask, gamma), expected_returns,
                             rtol=1e-5, atol=1e-6)
  real = mask > 0
  flat = expected_returns[real]
  expected = np.where(real, (expected_returns - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8), 0)
  np.testing.assert_allclose(ppo_core.reinforce_pp_advantages(garbage, mask, gamma), expected,
                             rtol=1e-5, atol=1e-5)


def _normalized_reference(per_token, lengths, normalization, max_tokens):
  rows = [per_token[b, :lengths[b]].astype(np.float64) for b in range(len(lengths))]
  if normalization == "token":
    return np.concatenate(rows).sum() / sum(lengths)
  if normalization == "sequence_mean":
    return np.mean([row.sum() / max(len(row), 1) for row in rows])
  return sum(row.sum() for row in rows) / (len(rows) * max_tokens)


@pytest.mark.parametrize("normalization", ["token", "sequence_mean", "constant"])
def test_sequence_loss_normalizations_match_numpy_and_accumulate_exactly(normalization):
  rng = np.random.default_rng(14)
  batch, n = 8, 10
  lengths = _random_lengths(rng, batch, n)
  lengths[3] = 0
  mask = _mask_from_lengths(lengths, n)
  per_token = _with_garbage_on_padding(rng.normal(size=(batch, n)), mask)
  max_tokens = 16 if normalization == "constant" else None
  loss = ppo_core.sequence_loss(per_token, mask, normalization, max_tokens)
  assert float(loss) == pytest.approx(
      _normalized_reference(per_token, lengths, normalization, max_tokens), rel=1e-5)
  # Two micro-batches, weight-averaged as loop.accumulate_gradients does, give the whole loss.
  halves = [slice(0, 3), slice(3, batch)]
  weights = [float(ppo_core.sequence_loss_weight(mask[h], normalization)) for h in halves]
  losses = [float(ppo_core.sequence_loss(per_token[h], mask[h], normalization, max_tokens))
            for h in halves]
  assert np.dot(weights, losses) / sum(weights) == pytest.approx(float(loss), rel=1e-5)
  with pytest.raises(UserError, match="'seq'"):
    ppo_core.sequence_loss(per_token, mask, "seq")


def test_policy_loss_with_grpo_normalization_matches_numpy():
  mask, old, new, advantages = _random_ppo_batch(15)
  clip = 0.2
  lengths = mask.sum(axis=1).astype(int)
  ratio = np.exp(new.astype(np.float64) - old)
  per_token = -np.minimum(advantages * ratio, advantages * np.clip(ratio, 1 - clip, 1 + clip))
  loss_fn = jax.jit(functools.partial(ppo_core.ppo_policy_loss, clip_range=clip,
                                      normalization="sequence_mean"))
  loss, _ = loss_fn(new, old, advantages, mask)
  assert float(loss) == pytest.approx(
      _normalized_reference(per_token, lengths, "sequence_mean", None), rel=1e-5)


def test_kl_loss_term_is_k3_with_its_gradient():
  rng = np.random.default_rng(16)
  batch, n, coef = 4, 6, 0.04
  mask = _mask_from_lengths([6, 1, 3, 4], n)
  logprobs = rng.normal(-2.0, 0.5, size=(batch, n)).astype(np.float32)
  ref = (logprobs + rng.normal(0.0, 0.3, size=(batch, n))).astype(np.float32)
  log_ratio = ref.astype(np.float64) - logprobs
  expected = np.where(mask > 0, coef * (np.exp(log_ratio) - log_ratio - 1.0), 0.0)
  term = ppo_core.kl_loss_term(logprobs, _with_garbage_on_padding(ref, mask), mask, coef)
  np.testing.assert_allclose(term, expected, rtol=1e-5, atol=1e-8)

  def total(lp, rf):
    return ppo_core.sequence_loss(ppo_core.kl_loss_term(lp, rf, mask, coef), mask, "token")

  grad_policy, grad_ref = jax.grad(total, argnums=(0, 1))(logprobs, ref)
  expected_grad = np.where(mask > 0, coef * (1.0 - np.exp(log_ratio)) / mask.sum(), 0.0)
  np.testing.assert_allclose(grad_policy, expected_grad, rtol=1e-4, atol=1e-8)
  np.testing.assert_array_equal(grad_ref, 0.0)  # the reference is a constant


def test_value_loss_masks_before_clipping_nan_on_padding_gives_finite_gradients():
  rng = np.random.default_rng(17)
  batch, n = 4, 6
  mask = _mask_from_lengths([6, 2, 4, 1], n)
  old = rng.normal(size=(batch, n)).astype(np.float32)
  new = (old + rng.normal(0.0, 0.3, size=(batch, n))).astype(np.float32)
  returns = (old + rng.normal(0.0, 0.5, size=(batch, n))).astype(np.float32)
  clean_loss, _ = ppo_core.ppo_value_loss(new, old, returns, mask, 0.2)
  clean_grad = jax.grad(lambda v: ppo_core.ppo_value_loss(v, old, returns, mask, 0.2)[0])(new)
  for garbage in (np.nan, np.inf, -np.inf):
    args = [_with_garbage_on_padding(x, mask, garbage) for x in (new, old, returns)]
    loss, metrics = ppo_core.ppo_value_loss(*args, mask, 0.2)
    grad = jax.grad(lambda v: ppo_core.ppo_value_loss(v, *args[1:], mask, 0.2)[0])(args[0])
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.isfinite(grad))
    assert float(loss) == pytest.approx(float(clean_loss), rel=1e-6)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)


def test_controller_kl_reads_the_penalty_estimator():
  rng = np.random.default_rng(18)
  mask = _mask_from_lengths([5, 3], 5)
  logprobs = rng.normal(-2.0, 0.5, size=(2, 5)).astype(np.float32)
  ref = (logprobs + rng.normal(0.0, 0.5, size=(2, 5))).astype(np.float32)
  estimates = ppo_core.kl_estimates(logprobs, ref, mask)
  for name in ("k1", "k3"):
    expected = np.mean(np.sum(ppo_core.per_token_kl(logprobs, ref, mask, name), axis=1))
    assert float(ppo_core.controller_kl(estimates, name)) == pytest.approx(float(expected))
  assert float(estimates["k1_mean"]) != pytest.approx(float(estimates["k3_mean"]))
  with pytest.raises(UserError, match="'k2'"):
    ppo_core.controller_kl(estimates, "k2")


def test_early_stop_applies_the_crossing_update_then_stops():
  approx_kls = np.array([0.1, 0.3, 0.9, 0.2, 1.5, 0.1], np.float32)
  np.testing.assert_array_equal(ppo_core.early_stop_applied(approx_kls, 0.5),
                                [True, True, True, False, False, False])
  np.testing.assert_array_equal(ppo_core.early_stop_applied(approx_kls, 0.0), [True] * 6)
  np.testing.assert_array_equal(ppo_core.early_stop_applied(approx_kls, 2.0), [True] * 6)
  np.testing.assert_array_equal(ppo_core.early_stop_applied(approx_kls, 0.05),
                                [True] + [False] * 5)

  # The scan form (what the update loop carries) agrees with the vector form.
  rng = np.random.default_rng(19)
  for bound in (0.0, 0.5, 0.8):
    kls = rng.uniform(0.0, 1.0, size=16).astype(np.float32)

    def step(stopped, kl, bound=bound):
      apply, stopped = ppo_core.early_stop_step(stopped, kl, bound)
      return stopped, apply

    _, applied = jax.lax.scan(step, jnp.zeros((), bool), kls)
    np.testing.assert_array_equal(applied, ppo_core.early_stop_applied(kls, bound))


def test_kl_estimates_k1_hand_computed_and_masked():
  """The one KL to a reference (moved from evaluation's mean_kl tests): k1 per sequence is the
  sum of log p_policy - log p_reference over real tokens; padding, even NaN/inf, is ignored."""
  logprobs_policy = np.array([[-1.0, -2.0, -0.5, 7.0], [-0.1, -3.0, np.nan, -np.inf]])
  logprobs_ref = np.array([[-1.5, -1.0, -0.5, 0.0], [-0.4, -2.0, 0.0, 0.0]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  for kl in (ppo_core.kl_estimates(logprobs_policy, logprobs_ref, mask),
             jax.jit(ppo_core.kl_estimates)(logprobs_policy, logprobs_ref, mask)):
    # Row 0: 0.5 - 1.0 + 0.0 = -0.5 ; row 1: 0.3 - 1.0 = -0.7.
    np.testing.assert_allclose(np.asarray(kl["k1"]), [-0.5, -0.7], rtol=1e-6)
    assert float(kl["k1_mean"]) == pytest.approx(-0.6, rel=1e-6)


def test_kl_estimates_k1_matches_numpy_loop():
  rng = np.random.default_rng(5)
  policy = rng.normal(-2.0, 1.0, size=(4, 9))
  reference = rng.normal(-2.0, 1.0, size=(4, 9))
  lengths = [9, 3, 0, 6]
  mask = np.array([[t < n for t in range(9)] for n in lengths], np.float32)
  kl = ppo_core.kl_estimates(policy, reference, mask)
  expected = [sum(policy[b, t] - reference[b, t] for t in range(lengths[b])) for b in range(4)]
  np.testing.assert_allclose(np.asarray(kl["k1"]), expected, rtol=1e-5, atol=1e-5)
  assert float(kl["k1_mean"]) == pytest.approx(np.mean(expected), rel=1e-5, abs=1e-5)
