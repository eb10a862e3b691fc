"""Tests for rlhf_jax.evaluation.overoptimization: the best-of-n estimator against brute force,
Gao et al.'s fits on synthetic points, PPO points, and the plot written by the report."""

import itertools
import json
import math

from matplotlib import image as mpl_image
import numpy as np
import pytest

from rlhf_jax.evaluation import metrics
from rlhf_jax.evaluation import overoptimization as overopt
from rlhf_jax.evaluation import report


def _brute_force_best_of_n(proxy, gold, n):
  """Mean over prompts of the mean over every n-subset of the proxy-argmax's scores."""
  gold_means, proxy_means = [], []
  for proxy_row, gold_row in zip(proxy, gold):
    picks = []
    for subset in itertools.combinations(range(len(proxy_row)), n):
      subset = list(subset)
      # The project's best-of-n rule: the highest proxy, ties to the lowest index.
      best = subset[int(np.asarray(metrics.best_of_n_indices(proxy_row[subset][None]))[0])]
      picks.append(best)
    gold_means.append(np.mean(gold_row[picks]))
    proxy_means.append(np.mean(proxy_row[picks]))
  return np.mean(gold_means), np.mean(proxy_means)


def test_best_of_n_estimator_equals_brute_force_enumeration():
  rng = np.random.default_rng(0)
  # Rounded proxy scores so that ties within a prompt occur and the tie rule matters.
  proxy = np.round(rng.normal(size=(5, 7)), 1)
  proxy[0, 2] = proxy[0, 5] = proxy[0].max() + 1.0  # A tie at the top.
  gold = rng.normal(size=(5, 7))
  points = overopt.best_of_n_points(proxy, gold, ns=(1, 2, 3, 4, 7))
  for point in points:
    n = point["n"]
    gold_mean, proxy_mean = _brute_force_best_of_n(proxy, gold, n)
    assert point["method"] == "best_of_n"
    assert point["gold_mean"] == pytest.approx(gold_mean, abs=1e-12), n
    assert point["reward_mean"] == pytest.approx(proxy_mean, abs=1e-12), n
    assert point["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
  # n = 1 is the plain mean; n = all is the argmax.
  assert points[0]["gold_mean"] == pytest.approx(gold.mean())
  assert points[-1]["gold_mean"] == pytest.approx(
      gold[np.arange(5), np.asarray(metrics.best_of_n_indices(proxy))].mean())


def test_best_of_n_win_rates_against_sft_equal_brute_force_enumeration():
  """Each point's expected win-rate against SFT's answer (a tie half), by the proxy's pick and
  by the teacher's own pick, equals the mean over every n-subset."""
  rng = np.random.default_rng(1)
  proxy = np.round(rng.normal(size=(6, 5)), 1)
  gold = rng.integers(0, 4, size=(6, 5)).astype(float)  # Integer gold: ties with SFT occur.
  sft_gold = rng.integers(0, 4, size=6).astype(float)
  outcome = lambda g, prompt: 0.5 + 0.5 * np.sign(g - sft_gold[prompt])
  points = overopt.best_of_n_points(proxy, gold, ns=(1, 2, 5), baseline_gold=sft_gold)
  for point in points:
    n = point["n"]
    by_proxy, by_gold = [], []
    for prompt in range(6):
      for subset in itertools.combinations(range(5), n):
        subset = list(subset)
        pick = subset[int(np.asarray(metrics.best_of_n_indices(proxy[prompt, subset][None]))[0])]
        by_proxy.append(outcome(gold[prompt, pick], prompt))
        by_gold.append(outcome(gold[prompt, subset].max(), prompt))
    assert point["gold_win_rate_vs_sft"] == pytest.approx(np.mean(by_proxy), abs=1e-12), n
    assert point["gold_picked_win_rate_vs_sft"] == pytest.approx(np.mean(by_gold), abs=1e-12), n
  # The teacher's pick never wins less than the reward model's, and more samples never hurt it.
  assert all(p["gold_picked_win_rate_vs_sft"] >= p["gold_win_rate_vs_sft"] - 1e-12
             for p in points)
  assert np.all(np.diff([p["gold_picked_win_rate_vs_sft"] for p in points]) >= -1e-12)
  assert "gold_win_rate_vs_sft" not in overopt.best_of_n_points(proxy, gold, ns=(1,))[0]
  # Against K baseline samples per prompt: the mean over them of the one-answer rates; against
  # the candidates themselves, best-of-1 is exactly 0.5 (every sample against every other).
  many = rng.integers(0, 4, size=(6, 3)).astype(float)
  against_many = overopt.best_of_n_points(proxy, gold, ns=(1, 2, 5), baseline_gold=many)
  for k, point in enumerate(against_many):
    one_by_one = [overopt.best_of_n_points(proxy, gold, ns=(point["n"],),
                                           baseline_gold=many[:, j])[0] for j in range(3)]
    for key in ("gold_win_rate_vs_sft", "gold_picked_win_rate_vs_sft"):
      assert point[key] == pytest.approx(np.mean([p[key] for p in one_by_one]), abs=1e-12)
  itself = overopt.best_of_n_points(proxy, gold, ns=(1,), baseline_gold=gold)[0]
  assert itself["gold_win_rate_vs_sft"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="baseline_gold"):
    overopt.best_of_n_points(proxy, gold, ns=(1,), baseline_gold=sft_gold[:3])


def test_best_of_n_weights_and_kl():
  for num_samples, n in ((16, 1), (16, 4), (16, 16), (5, 3)):
    weights = overopt.best_of_n_weights(num_samples, n)
    assert weights.sum() == pytest.approx(1.0)
    assert np.all(np.diff(weights) >= 0)  # Better ranks are picked more often.
  assert overopt.best_of_n_kl(1) == 0.0
  assert overopt.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
  with pytest.raises(ValueError):
    overopt.best_of_n_weights(4, 5)
  with pytest.raises(ValueError, match="same"):
    overopt.best_of_n_points(np.zeros((2, 4)), np.zeros((2, 3)))


@pytest.mark.parametrize("method,a,b", [("best_of_n", 0.8, 0.3), ("ppo", 0.5, 0.2),
                                        ("ppo", 1.2, -0.1)])
def test_fit_recovers_known_coefficients(method, a, b):
  d = np.sqrt(np.array([0.05, 0.3, 0.8, 1.5, 2.4, 4.0]))
  gains = overopt.gao_curve(method, d, a, b)
  fitted_a, fitted_b = overopt.fit_gao(method, d, gains)
  assert (fitted_a, fitted_b) == pytest.approx((a, b), abs=1e-9)
  # With noise the least-squares fit stays close.
  noisy = gains + np.random.default_rng(1).normal(0.0, 0.005, d.size)
  fitted_a, fitted_b = overopt.fit_gao(method, d, noisy)
  assert fitted_a == pytest.approx(a, abs=0.05) and fitted_b == pytest.approx(b, abs=0.05)


def test_fit_points_relative_to_the_start_and_only_where_points_allow():
  start_gold, start_reward = 2.0, -1.0
  ns = (1, 2, 4, 8, 16)
  d = np.sqrt([overopt.best_of_n_kl(n) for n in ns])
  bon = [{"method": "best_of_n", "n": n, "kl": overopt.best_of_n_kl(n),
          "gold_mean": start_gold + float(overopt.gao_curve("best_of_n", x, 0.6, 0.25)),
          "reward_mean": start_reward + 0.9 * float(x)} for n, x in zip(ns, d)]
  steps = (0, 10, 20, 30, 40)
  kls = (0.0, 0.4, 1.1, 2.0, 3.5)
  ppo = overopt.ppo_points([
      {"step": step, "kl": kl, "reward_mean": 0.1 * step,
       "gold_mean": 1.0 + float(overopt.gao_curve("ppo", math.sqrt(kl), 0.7, 0.4))}
      for step, kl in zip(steps[::-1], kls[::-1])] + [{"step": 50, "kl": None}])
  assert [point["step"] for point in ppo] == list(steps)  # Sorted, the KL-less row left out.
  fits = {(fit["method"], fit["metric"]): fit for fit in overopt.fit_points(bon + ppo)}
  assert set(fits) == {("best_of_n", "gold_mean"), ("best_of_n", "reward_mean"),
                       ("ppo", "gold_mean"), ("ppo", "reward_mean")}
  gold_fit = fits[("best_of_n", "gold_mean")]
  assert (gold_fit["a"], gold_fit["b"]) == pytest.approx((0.6, 0.25), abs=1e-9)
  assert gold_fit["baseline"] == start_gold and gold_fit["num_points"] == 5
  assert gold_fit["rmse"] == pytest.approx(0.0, abs=1e-9)
  ppo_fit = fits[("ppo", "gold_mean")]
  assert (ppo_fit["a"], ppo_fit["b"]) == pytest.approx((0.7, 0.4), abs=1e-9)
  assert "0.7 - 0.4 log d" in overopt.describe_fit(ppo_fit)
  # Three points (two besides the start) are too few for a fit.
  assert overopt.fit_points(bon[:3] + ppo[:3]) == []
  # No gold measured (Dolly): only the reward-model fits.
  no_gold = [{**point, "gold_mean": None} for point in bon]
  assert [fit["metric"] for fit in overopt.fit_points(no_gold)] == ["reward_mean"]


def test_report_writes_the_overoptimization_plot_and_points(tmp_path):
  rng = np.random.default_rng(0)
  proxy = rng.normal(size=(30, 16))
  gold = 0.5 * proxy + rng.normal(size=(30, 16)) - 0.1 * proxy ** 2
  points = overopt.best_of_n_points(proxy, gold) + overopt.ppo_points(
      [{"step": 20 * i, "kl": 0.4 * i, "gold_mean": 0.3 * i - 0.05 * i * i,
        "reward_mean": 0.4 * i} for i in range(6)])
  results = {"systems": {"SFT": {"splits": {"test": {"reward_mean": 0.1, "gold_mean": 1.0,
                                                     "gold_ci95": [0.8, 1.2]}}}}}
  paths = report.write_report(tmp_path, results, ood_levels={}, samples=[],
                              overoptimization=points)
  png = paths["overoptimization.png"]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  pixels = mpl_image.imread(png)
  assert pixels.shape[:2] == (600, 1200)
  assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20
  loaded = json.loads(paths["eval.json"].read_text())
  assert loaded["overoptimization"] == points
  assert {(fit["method"], fit["metric"]) for fit in loaded["overoptimization_fits"]} == {
      ("best_of_n", "gold_mean"), ("best_of_n", "reward_mean"), ("ppo", "gold_mean"),
      ("ppo", "reward_mean")}
  assert "## Over-optimisation" in paths["eval.md"].read_text()
  assert "overoptimization" not in results  # The caller's dict is not changed.

  without = report.write_report(tmp_path / "none", results, ood_levels={}, samples=[])
  assert "overoptimization.png" not in without
  assert not (tmp_path / "none" / "overoptimization.png").exists()
  assert "overoptimization" not in json.loads(without["eval.json"].read_text())
