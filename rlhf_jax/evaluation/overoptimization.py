"""Reward-model over-optimisation: gold and proxy score against the KL to SFT (Gao et al. 2022).

Two ways of spending KL budget are measured on held-out prompts:
  * best-of-n: from `num_samples` SFT samples per prompt scored by the reward model (the proxy)
    and by the simulated teacher (the gold), the expected scores of the proxy's favourite among
    n samples, at the analytic KL log n - (n - 1) / n (Stiennon et al. 2020);
  * PPO: the periodic held-out evaluations along training, each a point (KL, gold, proxy).
    The KL is a sampled estimate and may come out slightly negative near the start; such
    points are kept but not fitted, and are plotted at d = 0.

Gao, Schulman & Hilton 2022 ("Scaling laws for reward model overoptimization") fit, with
d = sqrt(KL) and R measured from the starting policy's value (R(d) - R(0)):
  * best-of-n: R(d) = d (a - b d);
  * RL:        R(d) = d (a - b log d).
Both are linear in (a, b), so `fit_gao` solves them by least squares. A positive b with the
gold score is over-optimisation: the gold score peaks and turns down while the proxy climbs.

Points are plain dicts, as written to `eval.json["overoptimization"]`:
`{"method": "best_of_n", "n": int, ...}` or `{"method": "ppo", "step": int, ...}`, both with
`kl`, `gold_mean` and `reward_mean` (None where not measured).
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import numpy as np

from rlhf_jax.evaluation import metrics

BEST_OF_N = "best_of_n"
PPO = "ppo"
DEFAULT_NS = (1, 2, 4, 8, 16)
# The functional form of each method (Gao et al. 2022, eq. 1 and 2).
FORMS = {BEST_OF_N: "d * (a - b * d)", PPO: "d * (a - b * log(d))"}
# Points needed for a fit besides the starting one (d = 0): two coefficients, one more point
# so that the fit is over-determined rather than an interpolation.
MIN_FIT_POINTS = 3


def best_of_n_kl(n: int) -> float:
  """Analytic KL(best-of-n || base) in nats: log n - (n - 1) / n (0 for n = 1)."""
  if n < 1:
    raise ValueError(f"best_of_n_kl: n must be >= 1, got {n}")
  return math.log(n) - (n - 1) / n


def best_of_n_weights(num_samples: int, n: int) -> np.ndarray:
  """Probability that the sample of each rank is the best of a uniformly random n-subset.

  With the samples sorted by the proxy in ascending order (rank 0 the worst), the sample of
  rank i is the best of an n-subset exactly when the subset holds it and n - 1 of the i samples
  below it: C(i, n - 1) of the C(num_samples, n) subsets. Averaging over all subsets this way is
  the unbiased estimator of best-of-n from num_samples >= n samples (Nakano et al. 2021, as
  Gao et al. 2022 use it), with far less variance than disjoint groups of n.

  Args:
    num_samples: samples per prompt.
    n: subset size, 1 <= n <= num_samples.

  Returns:
    float64 [num_samples], summing to 1, by ascending rank.
  """
  if not 1 <= n <= num_samples:
    raise ValueError(f"best_of_n_weights: need 1 <= n <= {num_samples}, got n={n}")
  counts = np.array([math.comb(i, n - 1) for i in range(num_samples)], dtype=np.float64)
  return counts / math.comb(num_samples, n)


def best_of_n_points(proxy_scores, gold_scores, *, ns: Sequence[int] = DEFAULT_NS,
                     baseline_gold=None) -> list[dict]:
  """Expected gold and proxy score of best-of-n, averaged over every n-subset of the samples.

  The proxy picks the best of n the way `metrics.best_of_n_indices` does: the highest proxy
  score, ties to the lowest sample index. Sorting by (proxy, -index) gives every subset's pick
  the highest rank within it, so the estimate equals the mean over all n-subsets exactly, ties
  included.

  Args:
    proxy_scores: float [num_prompts, num_samples], reward-model scores of SFT samples.
    gold_scores: float [num_prompts, num_samples], the teacher's gold scores of the same samples.
    ns: the n to evaluate, each in 1..num_samples.
    baseline_gold: float [num_prompts] (SFT's one answer to each prompt) or [num_prompts, K]
      (K SFT samples of each prompt: the win-rate against a random one of them), or None. Given,
      each point also has the expected gold win-rate against it (a tie half) of the proxy's pick,
      `gold_win_rate_vs_sft`, and of the teacher's own pick among the same n samples,
      `gold_picked_win_rate_vs_sft`: the most that choosing among n SFT samples can win,
      whatever the reward model (issue #21's "where it stops").

  Returns:
    One point per n: `{"method": "best_of_n", "n", "kl" (analytic), "gold_mean",
    "reward_mean"}` (plus the two win-rates with `baseline_gold`), means over prompts.
  """
  proxy_scores = np.asarray(proxy_scores, np.float64)
  gold_scores = np.asarray(gold_scores, np.float64)
  if proxy_scores.ndim != 2 or proxy_scores.shape != gold_scores.shape:
    raise ValueError(f"best_of_n_points: proxy {proxy_scores.shape} and gold "
                     f"{gold_scores.shape} must be the same [num_prompts, num_samples]")
  if not (np.all(np.isfinite(proxy_scores)) and np.all(np.isfinite(gold_scores))):
    raise ValueError("best_of_n_points: non-finite scores")
  num_prompts, num_samples = proxy_scores.shape
  # lexsort sorts by its last key first: the proxy ascending, then the index descending.
  index = np.broadcast_to(np.arange(num_samples), proxy_scores.shape)
  order = np.lexsort((-index, proxy_scores), axis=-1)
  proxy_sorted = np.take_along_axis(proxy_scores, order, axis=-1)
  gold_sorted = np.take_along_axis(gold_scores, order, axis=-1)
  mean_of_best = lambda sorted_values, weights: (
      float(np.mean(sorted_values @ weights)) if num_prompts else None)
  if baseline_gold is not None:
    baseline_gold = np.asarray(baseline_gold, np.float64)
    if baseline_gold.ndim == 1:
      baseline_gold = baseline_gold[:, None]
    if baseline_gold.ndim != 2 or baseline_gold.shape[0] != num_prompts:
      raise ValueError(f"best_of_n_points: baseline_gold {baseline_gold.shape} must be "
                       f"[num_prompts] or [num_prompts, K] with num_prompts = {num_prompts}")
    # Each sample against the baseline's K samples of its prompt: [num_prompts, num_samples].
    outcomes = metrics.win_outcomes(gold_scores, baseline_gold[:, None, :])
    outcomes_by_proxy = np.take_along_axis(outcomes, order, axis=-1)
    # The teacher's pick: any of the samples with the highest gold score (equal gold, equal
    # outcome), so sorting by gold alone ranks every subset's pick highest.
    outcomes_by_gold = np.take_along_axis(outcomes, np.argsort(gold_scores, axis=-1), axis=-1)
  points = []
  for n in ns:
    weights = best_of_n_weights(num_samples, n)
    point = {"method": BEST_OF_N, "n": int(n), "kl": best_of_n_kl(n),
             "gold_mean": mean_of_best(gold_sorted, weights),
             "reward_mean": mean_of_best(proxy_sorted, weights)}
    if baseline_gold is not None:
      point["gold_win_rate_vs_sft"] = mean_of_best(outcomes_by_proxy, weights)
      point["gold_picked_win_rate_vs_sft"] = mean_of_best(outcomes_by_gold, weights)
    points.append(point)
  return points


def _optional_float(row: Mapping[str, Any], key: str) -> float | None:
  value = row.get(key)
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def ppo_points(evaluations: Sequence[Mapping[str, Any]]) -> list[dict]:
  """PPO points from its periodic held-out evaluations, in step order.

  Args:
    evaluations: dicts with `step`, `kl` (mean KL to SFT, nats per sequence), `gold_mean` and
      `reward_mean` (either may be missing or None, e.g. no teacher on Dolly). Rows without a
      finite `kl` are left out: they cannot be placed on the x axis.

  Returns:
    `{"method": "ppo", "step", "kl", "gold_mean", "reward_mean"}` per evaluation, by step.
  """
  points = []
  for row in evaluations:
    kl = _optional_float(row, "kl")
    if kl is None:
      continue
    points.append({"method": PPO, "step": int(row["step"]), "kl": kl,
                   "gold_mean": _optional_float(row, "gold_mean"),
                   "reward_mean": _optional_float(row, "reward_mean")})
  return sorted(points, key=lambda point: point["step"])


def _design(method: str, d: np.ndarray) -> np.ndarray:
  """Columns multiplying (a, b) in R(d) - R(0) for `method`: [len(d), 2]."""
  if method == BEST_OF_N:
    return np.stack([d, -d * d], axis=-1)
  if method == PPO:
    # d log d -> 0 as d -> 0, so the starting point contributes a zero row.
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.stack([d, -d_log_d], axis=-1)
  raise ValueError(f"unknown over-optimisation method {method!r}; known: {sorted(FORMS)}")


def gao_curve(method: str, d, a: float, b: float) -> np.ndarray:
  """Gao et al.'s R(d) - R(0) for `method` at d = sqrt(KL) (float64, the shape of `d`)."""
  d = np.asarray(d, np.float64)
  return (_design(method, d.reshape(-1)) @ np.array([a, b])).reshape(d.shape)


def fit_gao(method: str, sqrt_kl, gains) -> tuple[float, float]:
  """Least-squares fit of Gao et al.'s form for `method`.

  Args:
    method: "best_of_n" (d (a - b d)) or "ppo" (d (a - b log d)).
    sqrt_kl: float [num_points], d = sqrt(KL) >= 0.
    gains: float [num_points], the score minus the starting policy's, R(d) - R(0).

  Returns:
    `(a, b)`.
  """
  d = np.asarray(sqrt_kl, np.float64).reshape(-1)
  gains = np.asarray(gains, np.float64).reshape(-1)
  if d.size != gains.size:
    raise ValueError(f"fit_gao: {d.size} sqrt_kl values but {gains.size} gains")
  if np.any(d < 0):
    raise ValueError("fit_gao: sqrt_kl must be >= 0")
  (a, b), *_ = np.linalg.lstsq(_design(method, d), gains, rcond=None)
  return float(a), float(b)


def _baseline(method: str, points: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The starting policy's point: best-of-1, or PPO's first evaluation (by step)."""
  if method == BEST_OF_N:
    return next((point for point in points if point.get("n") == 1), None)
  return min(points, key=lambda point: point["step"], default=None)


def fit_points(points: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Fits Gao et al.'s forms to each method's gold and proxy points, where they allow.

  The score is taken relative to the method's starting point (best-of-1, PPO's first
  evaluation), as Gao et al. do; a (method, metric) is fitted when the starting point and at
  least `MIN_FIT_POINTS` other points with KL > 0 have the metric.

  Args:
    points: as returned by `best_of_n_points` and `ppo_points` (other methods are ignored).

  Returns:
    One dict per fit: `{"method", "metric": "gold_mean" | "reward_mean", "form", "a", "b",
    "baseline" (R(0)), "baseline_kl", "num_points", "rmse"}`.
  """
  fits = []
  for method in FORMS:
    of_method = [point for point in points if point.get("method") == method]
    baseline = _baseline(method, of_method)
    if baseline is None:
      continue
    for metric in ("gold_mean", "reward_mean"):
      start = _optional_float(baseline, metric)
      usable = [point for point in of_method if point is not baseline
                and _optional_float(point, metric) is not None
                and (_optional_float(point, "kl") or 0.0) > 0]
      if start is None or len(usable) < MIN_FIT_POINTS:
        continue
      d = np.sqrt(np.array([point["kl"] for point in usable]))
      gains = np.array([point[metric] for point in usable]) - start
      a, b = fit_gao(method, d, gains)
      residuals = gains - gao_curve(method, d, a, b)
      fits.append({"method": method, "metric": metric, "form": FORMS[method], "a": a, "b": b,
                   "baseline": start, "baseline_kl": _optional_float(baseline, "kl"),
                   "num_points": len(usable) + 1,
                   "rmse": float(np.sqrt(np.mean(residuals ** 2)))})
  return fits


def describe_fit(fit: Mapping[str, Any]) -> str:
  """One line for a fit of `fit_points`, e.g. `R(d) = 1.000 + d (0.52 - 0.11 d) (5 points, RMSE 0.01)`."""
  sign = "-" if fit["b"] >= 0 else "+"  # The form is a - b ...; show b's sign folded in.
  b_term = "d" if fit["method"] == BEST_OF_N else "log d"
  return (f"R(d) = {fit['baseline']:.3f} + d ({fit['a']:.4g} {sign} {abs(fit['b']):.4g} {b_term}) "
          f"({fit['num_points']} points, RMSE {fit['rmse']:.3g})")
