"""Tests for rlhf_jax.evaluation.metrics against sacrebleu, NumPy loops and hand-computed values."""

import json
import math

import numpy as np
import pytest
import sacrebleu

from rlhf_jax.evaluation import metrics

from conftest import SHARED_DATA as DATA_DIR  # noqa: E402 ($RLHF_JAX_DATA)

HYPOTHESES = [
    "The cat sat on the mat.",
    "There is a dog in the garden",
    "Paris is the capital of France.",
    "I like green eggs and ham very much",
]
REFERENCES = [
    "The cat is sitting on the mat.",
    "A dog is in the garden.",
    "Paris is the capital city of France.",
    "I do not like green eggs and ham.",
]


def _dolly_records(limit):
  path = DATA_DIR / "dolly" / "dolly_sample_1k.jsonl"
  if not path.exists():
    pytest.skip(f"shared test data not found: {path}")
  with path.open(encoding="utf-8") as f:
    return [json.loads(line) for _, line in zip(range(limit), f)]


# --- BLEU -----------------------------------------------------------------------------------


def test_corpus_bleu_equals_sacrebleu():
  result = metrics.corpus_bleu(HYPOTHESES, REFERENCES)
  expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES])
  assert result["score"] == pytest.approx(expected.score, abs=1e-9)
  assert 0.0 < result["score"] < 100.0
  assert result["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


def test_corpus_bleu_changes_with_a_hypothesis():
  before = metrics.corpus_bleu(HYPOTHESES, REFERENCES)["score"]
  changed = list(HYPOTHESES)
  changed[2] = "Paris is the capital city of France."  # Now identical to its reference.
  after = metrics.corpus_bleu(changed, REFERENCES)["score"]
  assert after > before
  assert after == pytest.approx(sacrebleu.corpus_bleu(changed, [REFERENCES]).score, abs=1e-9)


def test_corpus_bleu_identical_corpus_is_100():
  assert metrics.corpus_bleu(REFERENCES, REFERENCES)["score"] == pytest.approx(100.0)


def test_corpus_bleu_on_dolly_random_responses():
  # RR-style baseline on real data: each prompt's "response" is the next record's reference.
  records = _dolly_records(200)
  references = [record["response"] for record in records]
  shuffled = references[1:] + references[:1]
  result = metrics.corpus_bleu(shuffled, references)
  assert result["score"] == pytest.approx(
      sacrebleu.corpus_bleu(shuffled, [references]).score, abs=1e-9)
  assert result["score"] < metrics.corpus_bleu(references, references)["score"]


def test_corpus_bleu_empty_and_mismatched():
  empty = metrics.corpus_bleu([], [])
  assert math.isnan(empty["score"]) and empty["signature"] is None
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    metrics.corpus_bleu(["a", "b"], ["a"])


# --- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_shrinks_with_more_samples():
  rng = np.random.default_rng(123)
  small = rng.normal(0.5, 2.0, size=100)
  large = rng.normal(0.5, 2.0, size=10_000)
  widths = []
  for values in (small, large):
    mean, low, high = metrics.bootstrap_ci(values)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    widths.append(high - low)
  assert widths[1] < widths[0] / 5  # ~sqrt(100) narrower in theory.


def test_bootstrap_ci_matches_normal_theory():
  # For the mean of n normal values the 95% interval is about mean +- 1.96 * sd / sqrt(n).
  values = np.random.default_rng(7).normal(3.0, 1.5, size=2_000)
  mean, low, high = metrics.bootstrap_ci(values, num_resamples=2_000)
  half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
  assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
  assert (low + high) / 2 == pytest.approx(mean, abs=0.2 * half_width)


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
  stats = pytest.importorskip("scipy.stats", reason="scipy is an optional cross-check")
  values = np.random.default_rng(11).exponential(2.0, size=300)  # Skewed on purpose.
  _, low, high = metrics.bootstrap_ci(values, num_resamples=4_000, seed=1)
  reference = stats.bootstrap((values,), np.mean, n_resamples=4_000, method="percentile",
                              confidence_level=0.95, rng=np.random.default_rng(2))
  interval = reference.confidence_interval
  tolerance = 0.05 * (interval.high - interval.low)  # Monte Carlo noise of two RNG streams.
  assert low == pytest.approx(interval.low, abs=tolerance)
  assert high == pytest.approx(interval.high, abs=tolerance)


def test_bootstrap_ci_confidence_seed_and_edge_cases():
  values = np.random.default_rng(0).normal(size=500)
  _, low90, high90 = metrics.bootstrap_ci(values, confidence=0.90)
  _, low99, high99 = metrics.bootstrap_ci(values, confidence=0.99)
  assert low99 < low90 and high90 < high99
  assert metrics.bootstrap_ci(values, seed=5) == metrics.bootstrap_ci(values, seed=5)
  assert metrics.bootstrap_ci(np.full(10, 2.5)) == pytest.approx((2.5, 2.5, 2.5))
  assert all(math.isnan(v) for v in metrics.bootstrap_ci(np.array([])))
  with pytest.raises(ValueError, match="non-finite"):
    metrics.bootstrap_ci(np.array([1.0, np.nan]))
  with pytest.raises(ValueError, match="confidence"):
    metrics.bootstrap_ci(values, confidence=1.0)


# --- exact match ----------------------------------------------------------------------------


def _check_answer(record, response):
  """A stand-in checker: None where the record has no answer, else a containment test."""
  if record.get("answer") is None:
    return None
  return record["answer"] in response


def test_exact_match_hand_computed():
  records = [{"answer": "4"}, {"answer": "9"}, {"answer": "12"}, {"answer": None}]
  responses = ["2 + 2 = 4", "it is 8", "12", "anything"]
  # 2 of the 3 verifiable records are right; the unverifiable one is left out.
  assert metrics.exact_match(records, responses, _check_answer) == pytest.approx(2 / 3)


def test_exact_match_none_without_answers():
  records = _dolly_records(5)  # Dolly has no verifiable answers.
  responses = [record["response"] for record in records]
  assert metrics.exact_match(records, responses, None) is None
  assert metrics.exact_match([{"answer": None}] * 2, ["a", "b"], _check_answer) is None
  with pytest.raises(ValueError):
    metrics.exact_match([{}], ["a", "b"], _check_answer)


def test_oracle_best_of_n_exact_match_hand_computed():
  records = [{"answer": "4"}, {"answer": "9"}, {"answer": "12"}, {"answer": None}]
  candidates = [["2 + 2 = 4", "it is 8", "13", "x"],   # sample 1 of each record
                ["5", "it is 9", "11", "y"],            # sample 2
                ["4", "10", "14", "z"]]                 # sample 3
  # Record 1: samples 1 and 3 right; record 2: sample 2; record 3: none; record 4: no answer.
  assert metrics.oracle_exact_match(records, candidates, _check_answer) == pytest.approx(2 / 3)
  # One candidate: the oracle is that candidate's exact match.
  assert metrics.oracle_exact_match(records, candidates[:1], _check_answer) == \
      pytest.approx(metrics.exact_match(records, candidates[0], _check_answer))
  assert metrics.oracle_exact_match(records, candidates, None) is None
  assert metrics.oracle_exact_match(records, [], _check_answer) is None
  # The share of the gap to the oracle a gain closes: SFT 0.4, oracle 0.6, system 0.55.
  assert metrics.oracle_gap_closed(0.55, 0.4, 0.6) == pytest.approx(0.75)
  assert metrics.oracle_gap_closed(0.35, 0.4, 0.6) == pytest.approx(-0.25)
  assert metrics.oracle_gap_closed(0.5, 0.4, 0.4) is None
  assert metrics.oracle_gap_closed(None, 0.4, 0.6) is None


# --- best of N ------------------------------------------------------------------------------


def test_best_of_n_ties_go_to_first_and_nan_never_wins():
  scores = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [np.nan, 0.5, -1.0]])
  indices = metrics.best_of_n_indices(scores)
  np.testing.assert_array_equal(np.asarray(indices), [1, 0, 1])


# --- Response stats ------------------------------------------------------------------------


def test_response_stats_hand_computed():
  stats = metrics.response_stats([10, 20, 30, 40], [True, False, True, True])
  assert stats == {"length": pytest.approx(25.0), "eos_fraction": pytest.approx(0.75)}
  assert all(math.isnan(v) for v in metrics.response_stats([], []).values())


# --- system_metrics -------------------------------------------------------------------------


def test_system_metrics_keys_and_values():
  records = [{"answer": "a"}, {"answer": "x"}, {"answer": "b"}, {"answer": "c"}]
  rewards = np.array([0.5, 1.5, -1.0, 3.0])
  kl = np.array([0.1, 0.3, 0.2, 0.4])
  result = metrics.system_metrics(
      responses=HYPOTHESES, references=REFERENCES, rewards=rewards, kl=kl,
      lengths=[5, 6, 7, 8], ended_with_eos=[True, True, False, True], records=records,
      check_fn=_check_answer, num_resamples=200)
  assert set(result) == set(metrics.SYSTEM_METRIC_KEYS)
  assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
  assert result["bleu_signature"].startswith("nrefs:1")
  assert result["reward_mean"] == pytest.approx(1.0)
  low, high = result["reward_ci95"]
  assert low < 1.0 < high
  # Substring checks by hand: "a" in "The cat ...": yes; "x" in "There is a dog ...": no;
  # "b" in "Paris ...": no; "c" in "... very much": yes.
  assert result["exact_match"] == pytest.approx(0.5)
  assert result["kl_to_sft"] == pytest.approx(0.25)
  assert result["length"] == pytest.approx(6.5)
  assert result["eos_fraction"] == pytest.approx(0.75)
  assert result["num_samples"] == 4
  json.dumps(result, allow_nan=False)  # Plain JSON types only.


def test_reward_vs_sft_is_the_paired_difference_and_its_interval_is_narrow():
  """Prompts differ a lot (std 3) and the system adds 0.2 on each with a little noise: the
  unpaired intervals of system and SFT overlap, the paired one is tight around 0.2."""
  rng = np.random.default_rng(0)
  n = 200
  sft = rng.normal(5.0, 3.0, n)
  system = sft + 0.2 + rng.normal(0.0, 0.1, n)
  texts = ["x"] * n
  result = metrics.system_metrics(responses=texts, references=texts, rewards=system,
                                  sft_rewards=sft, num_resamples=500)
  sft_alone = metrics.system_metrics(responses=texts, references=texts, rewards=sft,
                                     num_resamples=500)
  assert result["reward_vs_sft"] == pytest.approx(np.mean(system - sft))
  low, high = result["reward_vs_sft_ci95"]
  assert 0.0 < low < result["reward_vs_sft"] < high < 0.4
  assert result["reward_ci95"][0] < sft_alone["reward_ci95"][1]  # Unpaired: they overlap.
  assert sft_alone["reward_vs_sft"] is None and sft_alone["reward_vs_sft_ci95"] is None
  with pytest.raises(ValueError, match="200 responses but 3 sft_rewards"):
    metrics.system_metrics(responses=texts, references=texts, rewards=system,
                           sft_rewards=sft[:3])


def test_system_metrics_missing_parts_are_none():
  records = _dolly_records(20)
  references = [record["response"] for record in records]
  result = metrics.system_metrics(responses=references[::-1], references=references,
                                  records=records, check_fn=None)
  assert set(result) == set(metrics.SYSTEM_METRIC_KEYS)
  for key in ("reward_mean", "reward_ci95", "exact_match", "kl_to_sft", "length",
              "eos_fraction"):
    assert result[key] is None, key
  assert result["num_samples"] == 20
  with pytest.raises(ValueError, match="4 responses but 3 rewards"):
    metrics.system_metrics(responses=HYPOTHESES, references=REFERENCES, rewards=[1.0, 2.0, 3.0])


# --- paired comparisons with SFT --------------------------------------------------------------


def test_paired_win_rate_with_ties_hand_computed():
  gold_system = [3.0, 1.0, 2.0, 2.0, 5.0, -1.0, 0.25, 4.0]
  gold_sft = [1.0, 1.0, 3.0, 2.0, 0.0, -0.5, 0.25, 3.5]
  # win, tie, loss, tie, win, loss, tie, win: (3 * 1 + 3 * 0.5 + 2 * 0) / 8.
  rate, low, high = metrics.paired_win_rate(gold_system, gold_sft, seed=3)
  assert rate == pytest.approx(4.5 / 8)
  assert 0.0 <= low <= rate <= high <= 1.0
  assert low < high
  assert metrics.paired_win_rate(gold_system, gold_sft, seed=3) == (rate, low, high)
  assert metrics.paired_win_rate([1.0, 2.0], [1.0, 2.0]) == pytest.approx((0.5, 0.5, 0.5))
  with pytest.raises(ValueError, match="3 system scores but 2 baseline"):
    metrics.paired_win_rate([1.0, 2.0, 3.0], [1.0, 2.0])


def test_paired_win_rate_ci_contains_the_estimate_and_covers_the_truth():
  rng = np.random.default_rng(0)
  # Discrete scores so that ties happen: for independent uniform {0, 1, 2} scores
  # P(win) = P(tie) = P(loss) = 1/3, so the true rate is 1/3 + 1/6 = 0.5.
  gold_sft = rng.integers(0, 3, size=600).astype(float)
  gold_system = rng.integers(0, 3, size=600).astype(float)
  rate, low, high = metrics.paired_win_rate(gold_system, gold_sft, seed=1, num_resamples=2000)
  assert low < rate < high
  assert low < 0.5 < high
  outcomes = np.where(gold_system > gold_sft, 1.0, np.where(gold_system < gold_sft, 0.0, 0.5))
  half_width = 1.96 * outcomes.std(ddof=1) / math.sqrt(outcomes.size)
  assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)


def test_win_rate_against_samples_hand_computed_and_through_system_metrics():
  gold = [2.0, 1.0, 0.0]
  samples = [[1.0, 2.0, 3.0, 2.0],   # win, tie, loss, tie -> 0.5
             [0.0, 0.0, 0.0, 0.0],   # all wins -> 1.0
             [0.0, 1.0, 0.0, -1.0]]  # tie, loss, tie, win -> 0.5
  rate, low, high = metrics.win_rate_against_samples(gold, samples, seed=0)
  assert rate == pytest.approx((0.5 + 1.0 + 0.5) / 3)
  assert low <= rate <= high
  # With one sample per prompt it is paired_win_rate.
  single = np.array(samples)[:, :1]
  assert metrics.win_rate_against_samples(gold, single, seed=4) == pytest.approx(
      metrics.paired_win_rate(gold, single[:, 0], seed=4))
  with pytest.raises(ValueError, match="baseline samples of shape"):
    metrics.win_rate_against_samples(gold, single[:2])
  result = metrics.system_metrics(responses=["a"] * 3, references=["b"] * 3, gold=gold,
                                  sft_sample_gold=samples, num_resamples=100)
  assert result["gold_win_rate_vs_sft_samples"] == pytest.approx(2.0 / 3)
  assert result["gold_win_rate_vs_sft"] is None  # No single SFT answer given.


def test_gold_agreement_hand_computed_and_through_system_metrics():
  gold = [3.0, 1.0, 2.0, 2.0, 5.0]
  sft_gold = [1.0, 2.0, 2.0, 0.0, 1.0]
  rewards = [0.9, 0.1, 0.4, 0.2, 0.3]
  sft_rewards = [0.2, 0.5, 0.0, 0.7, 0.3]
  # Gold-ordered prompts 0, 1, 3, 4 (prompt 2 is a gold tie, left out): the reward model agrees
  # on 0 and 1, disagrees on 3, ties on 4 (half): (1 + 1 + 0 + 0.5) / 4.
  assert metrics.gold_agreement(rewards, sft_rewards, gold, sft_gold) == pytest.approx(2.5 / 4)
  assert metrics.gold_agreement([1.0], [0.0], [2.0], [2.0]) is None  # No gold-ordered prompt.
  with pytest.raises(ValueError, match="differ"):
    metrics.gold_agreement([1.0, 2.0], [0.0], [1.0], [0.0])
  result = metrics.system_metrics(responses=["a"] * 5, references=["b"] * 5, rewards=rewards,
                                  sft_rewards=sft_rewards, gold=gold, sft_gold=sft_gold,
                                  num_resamples=100)
  assert result["reward_model_gold_agreement_vs_sft"] == pytest.approx(2.5 / 4)
  # Without the reward model's scores (or for SFT itself) there is nothing to agree with.
  result = metrics.system_metrics(responses=["a"] * 5, references=["b"] * 5, gold=gold,
                                  sft_gold=sft_gold, num_resamples=100)
  assert result["reward_model_gold_agreement_vs_sft"] is None


def test_paired_difference_ci_hand_computed():
  system = [1.0, 0.0, 1.0, 1.0, 0.0]
  sft = [0.0, 0.0, 1.0, 0.0, 1.0]
  mean, low, high = metrics.paired_difference_ci(system, sft, seed=0)
  assert mean == pytest.approx((1 + 0 + 0 + 1 - 1) / 5)
  assert -1.0 <= low <= mean <= high <= 1.0
  with pytest.raises(ValueError, match="2 system values but 1 baseline"):
    metrics.paired_difference_ci([1.0, 2.0], [1.0])


def test_system_metrics_gold_and_paired_exact_match():
  records = [{"answer": "4"}, {"answer": "9"}, {"answer": "12"}, {"answer": None},
             {"answer": "7"}]
  responses = ["it is 4", "it is 9", "it is 11", "anything", "it is 7"]
  sft_responses = ["it is 4", "it is 8", "it is 12", "nothing", "it is 6"]
  gold = np.array([2.0, 2.0, 0.0, 1.0, 3.0])
  sft_gold = np.array([2.0, 0.5, 1.0, 1.0, 0.0])
  texts = ["x"] * 5
  result = metrics.system_metrics(
      responses=responses, references=texts, records=records, check_fn=_check_answer,
      sft_responses=sft_responses, gold=gold, sft_gold=sft_gold, num_resamples=300)
  assert set(result) == set(metrics.SYSTEM_METRIC_KEYS)
  # Verifiable records 0, 1, 2, 4: system 1, 1, 0, 1; SFT 1, 0, 1, 0 -> (0 + 1 - 1 + 1) / 4.
  assert result["exact_match"] == pytest.approx(0.75)
  assert result["exact_match_vs_sft"] == pytest.approx(0.25)
  low, high = result["exact_match_vs_sft_ci95"]
  assert -1.0 <= low <= 0.25 <= high <= 1.0
  assert result["gold_mean"] == pytest.approx(1.6)
  assert result["gold_ci95"][0] <= 1.6 <= result["gold_ci95"][1]
  # tie, win, loss, tie, win.
  assert result["gold_win_rate_vs_sft"] == pytest.approx(3.0 / 5)
  low, high = result["gold_win_rate_vs_sft_ci95"]
  assert low <= 0.6 <= high
  json.dumps(result, allow_nan=False)

  sft_itself = metrics.system_metrics(responses=sft_responses, references=texts, records=records,
                                      check_fn=_check_answer, gold=sft_gold, num_resamples=300)
  assert sft_itself["gold_mean"] == pytest.approx(0.9)
  for key in ("gold_win_rate_vs_sft", "gold_win_rate_vs_sft_ci95", "exact_match_vs_sft",
              "exact_match_vs_sft_ci95"):
    assert sft_itself[key] is None, key
  no_gold = metrics.system_metrics(responses=responses, references=texts)
  assert no_gold["gold_mean"] is None and no_gold["gold_ci95"] is None
  with pytest.raises(ValueError, match="5 responses but 2 sft_gold"):
    metrics.system_metrics(responses=responses, references=texts, gold=gold, sft_gold=[1.0, 2.0])
