"""Model-free evaluation metrics: BLEU, bootstrap CIs, paired differences and win-rates, exact
match, best-of-N, length stats (the KL to a reference is `training.ppo.reference_kl`).

Everything here works on per-sample arrays and strings that the eval phase has already produced
(responses, reward-model scores, log-probabilities); no model is called. The functions return
plain Python floats (or `None` where a metric does not apply) so results go straight into
`eval.json`.
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import sacrebleu

# Bounds the memory of one bootstrap chunk (number of resampled indices held at once), so that
# 1,000 resamples of 100k values do not allocate a 100M-element index matrix.
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000

# The exact key set `system_metrics` returns; `report.py` and `eval.json` readers rely on it.
SYSTEM_METRIC_KEYS = (
    "bleu",
    "bleu_signature",
    "reward_mean",
    "reward_ci95",
    "reward_vs_sft",
    "reward_vs_sft_ci95",
    "exact_match",
    "exact_match_vs_sft",
    "exact_match_vs_sft_ci95",
    "gold_mean",
    "gold_ci95",
    "gold_win_rate_vs_sft",
    "gold_win_rate_vs_sft_ci95",
    "gold_win_rate_vs_sft_samples",
    "gold_win_rate_vs_sft_samples_ci95",
    "reward_model_gold_agreement_vs_sft",
    "kl_to_sft",
    "length",
    "eos_fraction",
    "num_samples",
)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
  """Corpus BLEU of `hypotheses` against one reference each, computed by sacrebleu.

  Args:
    hypotheses: `num_samples` system outputs.
    references: `num_samples` reference texts, aligned with `hypotheses`.

  Returns:
    `{"score": float in [0, 100], "signature": str}` (NaN and None for an empty corpus). The
    signature (e.g. `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`) makes the
    number reproducible, so reports print it next to the score.
  """
  if len(hypotheses) != len(references):
    raise ValueError(
        f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
  if not hypotheses:
    # sacrebleu fails on an empty corpus (and has no signature before scoring one); BLEU of
    # nothing is undefined.
    return {"score": math.nan, "signature": None}
  bleu = sacrebleu.metrics.BLEU()
  score = bleu.corpus_score(list(hypotheses), [list(references)]).score
  return {"score": float(score), "signature": str(bleu.get_signature())}


def bootstrap_ci(
    values: np.ndarray,
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
  """Percentile bootstrap confidence interval of the mean.

  Args:
    values: float [num_samples], e.g. one reward-model score per prompt. Must be finite.
    num_resamples: number of bootstrap resamples (with replacement, same size as `values`).
    confidence: two-sided coverage of the interval, in (0, 1).
    seed: seed of the resampling RNG, so reports are reproducible.

  Returns:
    `(mean, low, high)` as floats: the sample mean and the `(1 - confidence) / 2` and
    `(1 + confidence) / 2` percentiles of the resampled means. All NaN for no values.
  """
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
  if num_resamples < 1:
    raise ValueError(f"bootstrap_ci: num_resamples must be >= 1, got {num_resamples}")
  if values.size == 0:
    return math.nan, math.nan, math.nan
  if not np.all(np.isfinite(values)):
    # A NaN reward is a bug upstream; averaging it away would hide it.
    raise ValueError(f"bootstrap_ci: {int(np.sum(~np.isfinite(values)))} non-finite values")
  rng = np.random.default_rng(seed)
  n = values.size
  rows_per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
  resampled_means = []
  for start in range(0, num_resamples, rows_per_chunk):
    rows = min(rows_per_chunk, num_resamples - start)
    indices = rng.integers(0, n, size=(rows, n))
    resampled_means.append(values[indices].mean(axis=1))
  resampled_means = np.concatenate(resampled_means)
  tail = (1.0 - confidence) / 2.0 * 100.0
  low, high = np.percentile(resampled_means, [tail, 100.0 - tail])
  return float(values.mean()), float(low), float(high)


def exact_match(
    records: Sequence[Any],
    responses: Sequence[str],
    check_fn: Callable[[Any, str], bool | None] | None,
) -> float | None:
  """Fraction of responses that `check_fn` accepts, over records with a verifiable answer.

  Args:
    records: `num_samples` data records (whatever the data module yields).
    responses: `num_samples` generated responses, aligned with `records`.
    check_fn: `check_fn(record, response) -> bool`, the data set's answer checker (e.g. the
      built-in set's); it may return `None` for a record with no verifiable answer, which is then
      left out. Pass `None` for data sets without answers (Dolly).

  Returns:
    The fraction in [0, 1], or `None` when no record has a verifiable answer.
  """
  verdicts = answer_verdicts(records, responses, check_fn)
  if verdicts is None:
    return None
  checked = verdicts[~np.isnan(verdicts)]
  if not checked.size:
    return None
  return float(checked.mean())


def answer_verdicts(
    records: Sequence[Any],
    responses: Sequence[str],
    check_fn: Callable[[Any, str], bool | None] | None,
) -> np.ndarray | None:
  """Per-response verdicts of `check_fn`, the per-sample form of `exact_match`.

  Args:
    records: `num_samples` data records.
    responses: `num_samples` responses, aligned with `records`.
    check_fn: the answer checker (see `exact_match`), or None.

  Returns:
    float64 [num_samples]: 1.0 accepted, 0.0 rejected, NaN where the record has no verifiable
    answer; or `None` when `check_fn` is None.
  """
  if len(records) != len(responses):
    raise ValueError(f"exact_match: {len(records)} records but {len(responses)} responses")
  if check_fn is None:
    return None
  verdicts = [check_fn(record, response) for record, response in zip(records, responses)]
  return np.array([math.nan if verdict is None else float(bool(verdict)) for verdict in verdicts],
                  dtype=np.float64)


def oracle_exact_match(
    records: Sequence[Any],
    candidates: Sequence[Sequence[str]],
    check_fn: Callable[[Any, str], bool | None] | None,
) -> float | None:
  """The oracle best-of-n: the share of records on which ANY of n candidate responses is
  accepted by `check_fn` (the same verdicts as `exact_match`), e.g. n samples of the SFT policy:
  the exact match a perfect reranker of those samples would reach, and the ceiling that RL on a
  verifier reward sharpens the policy towards.

  Args:
    records: `num_samples` data records.
    candidates: n lists of `num_samples` responses (candidate j of every record), n >= 1.
    check_fn: the answer checker (see `exact_match`), or None.

  Returns:
    The fraction in [0, 1] over records with a verifiable answer, or `None` (no checker, no
    verifiable record, or no candidates).
  """
  if check_fn is None or not candidates:
    return None
  verdicts = np.stack([answer_verdicts(records, texts, check_fn) for texts in candidates])
  checked = ~np.isnan(verdicts[0])
  if not checked.any():
    return None
  return float(np.any(verdicts[:, checked] > 0, axis=0).mean())


def oracle_gap_closed(exact_match_system: float | None, exact_match_sft: float | None,
                      oracle: float | None) -> float | None:
  """The share of the gap between SFT's exact match and the oracle best-of-n that a system's
  gain closes: (system - SFT) / (oracle - SFT); `None` when a value is missing or there is no
  gap (the oracle no better than SFT)."""
  if None in (exact_match_system, exact_match_sft, oracle) or oracle <= exact_match_sft:
    return None
  return float((exact_match_system - exact_match_sft) / (oracle - exact_match_sft))


def paired_difference_ci(
    values_system,
    values_baseline,
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
  """Mean paired difference system - baseline on the same prompts, with a bootstrap CI.

  Both systems answer the same prompts, so the prompts' own spread of scores (most of either
  system's unpaired CI) cancels in the difference; the bootstrap resamples prompts.

  Args:
    values_system: float [num_prompts], e.g. reward-model scores or 0/1 exact-match verdicts.
    values_baseline: float [num_prompts], the baseline's (SFT's) values on the same prompts.
    num_resamples, confidence, seed: as for `bootstrap_ci`.

  Returns:
    `(mean, low, high)` of values_system - values_baseline (all NaN for no prompts).
  """
  values_system = np.asarray(values_system, np.float64).reshape(-1)
  values_baseline = np.asarray(values_baseline, np.float64).reshape(-1)
  if values_system.size != values_baseline.size:
    raise ValueError(f"paired_difference_ci: {values_system.size} system values but "
                     f"{values_baseline.size} baseline values")
  return bootstrap_ci(values_system - values_baseline, num_resamples=num_resamples,
                      confidence=confidence, seed=seed)


def win_outcomes(gold, baseline_samples) -> np.ndarray:
  """The judge's outcome of each answer against baseline samples: a win 1, a tie 0.5, a loss 0,
  averaged over the samples.

  Args:
    gold: float [...], the judge's scores of the answers.
    baseline_samples: float [..., K], its scores of K baseline samples per answer.

  Returns:
    float64 [...].
  """
  gold = np.asarray(gold, np.float64)
  return np.mean(0.5 + 0.5 * np.sign(gold[..., None] - baseline_samples), axis=-1)


def paired_win_rate(
    gold_system,
    gold_baseline,
    *,
    seed: int = 0,
    num_resamples: int = 1000,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
  """Win-rate of a system against a baseline judged by a score on the same prompts.

  For each prompt the judge (the simulated teacher's gold score) compares the system's response
  with the baseline's: a win counts 1, an exact tie 0.5, a loss 0. The rate is the mean outcome
  over prompts; its CI is the percentile bootstrap over prompts (`bootstrap_ci`).

  Args:
    gold_system: float [num_prompts], the judge's score of the system's response per prompt.
    gold_baseline: float [num_prompts], its score of the baseline's (SFT's) response to the same
      prompt.
    seed, num_resamples, confidence: as for `bootstrap_ci`.

  Returns:
    `(rate, low, high)` in [0, 1] (all NaN for no prompts).
  """
  gold_system = np.asarray(gold_system, np.float64).reshape(-1)
  gold_baseline = np.asarray(gold_baseline, np.float64).reshape(-1)
  if gold_system.size != gold_baseline.size:
    raise ValueError(f"paired_win_rate: {gold_system.size} system scores but "
                     f"{gold_baseline.size} baseline scores")
  if not (np.all(np.isfinite(gold_system)) and np.all(np.isfinite(gold_baseline))):
    raise ValueError("paired_win_rate: non-finite scores")
  outcomes = win_outcomes(gold_system, gold_baseline[:, None])
  return bootstrap_ci(outcomes, num_resamples=num_resamples, confidence=confidence, seed=seed)


def win_rate_against_samples(gold_system, gold_samples, *, seed: int = 0,
                             num_resamples: int = 1000,
                             confidence: float = 0.95) -> tuple[float, float, float]:
  """Win-rate of a system's answer against several baseline samples to the same prompt.

  Per prompt the outcome is the mean over the K baseline samples of win 1, tie 0.5, loss 0
  (`win_outcomes`); the rate is its mean over prompts, the CI the percentile bootstrap
  over prompts. It estimates the same quantity as `paired_win_rate` against one baseline answer
  per prompt (the chance that the system's answer beats a draw of the baseline), without the
  noise of that one draw: on the built-in task one SFT answer per prompt moved a policy's rate by
  several points between two draws.

  Args:
    gold_system: float [num_prompts], the judge's score of the system's answer per prompt.
    gold_samples: float [num_prompts, K], its scores of K baseline samples per prompt.

  Returns:
    `(rate, low, high)` in [0, 1].
  """
  gold_system = np.asarray(gold_system, np.float64).reshape(-1)
  gold_samples = np.asarray(gold_samples, np.float64)
  if gold_samples.ndim != 2 or gold_samples.shape[0] != gold_system.size:
    raise ValueError(f"win_rate_against_samples: {gold_system.size} system scores but baseline "
                     f"samples of shape {gold_samples.shape}")
  if not (np.all(np.isfinite(gold_system)) and np.all(np.isfinite(gold_samples))):
    raise ValueError("win_rate_against_samples: non-finite scores")
  outcomes = win_outcomes(gold_system, gold_samples)
  return bootstrap_ci(outcomes, num_resamples=num_resamples, confidence=confidence, seed=seed)


def gold_agreement(rewards, baseline_rewards, gold, baseline_gold) -> float | None:
  """How often the reward model orders a system's and the baseline's response to a prompt as the
  teacher does: the share of prompts whose two responses differ in gold score where the reward
  model prefers the one the teacher prefers (a reward tie counts half).

  It is the reward model's accuracy on the pairs that a policy's samples form with SFT's, the
  pairs its win-rate is judged on (issue #21: where a policy optimised against the reward model
  stops). None when no prompt has a gold difference.

  Args:
    rewards, baseline_rewards: float [num_prompts] reward-model scores of the two responses.
    gold, baseline_gold: float [num_prompts] the teacher's gold scores of the same responses.
  """
  arrays = [np.asarray(x, np.float64).reshape(-1)
            for x in (rewards, baseline_rewards, gold, baseline_gold)]
  if len({a.size for a in arrays}) != 1:
    raise ValueError(f"gold_agreement: sizes {[a.size for a in arrays]} differ")
  gold_order = np.sign(arrays[2] - arrays[3])
  ordered = gold_order != 0
  if not ordered.any():
    return None
  reward_order = np.sign(arrays[0] - arrays[1])[ordered]
  return float(np.mean(0.5 + 0.5 * reward_order * gold_order[ordered]))


def best_of_n_indices(scores: jnp.ndarray) -> jnp.ndarray:
  """Index of the highest-scoring candidate per prompt; jit-safe.

  Args:
    scores: float [num_prompts, n], reward-model score of each of the `n` candidates.

  Returns:
    int32 [num_prompts]. Ties go to the first candidate (argmax's rule). A NaN score never wins
    unless all of a prompt's scores are NaN (then candidate 0).
  """
  scores = jnp.asarray(scores)
  finite_or_floor = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  return jnp.argmax(finite_or_floor, axis=-1).astype(jnp.int32)


def response_stats(lengths, ended_with_eos) -> dict[str, float]:
  """Mean response length and the fraction of responses that ended with EOS.

  Args:
    lengths: int [num_samples], response lengths in tokens.
    ended_with_eos: bool [num_samples], True where generation stopped on EOS (False where it hit
      the length limit).

  Returns:
    `{"length": mean tokens, "eos_fraction": fraction in [0, 1]}`; NaN for no samples.
  """
  lengths = np.asarray(lengths, dtype=np.float64).reshape(-1)
  ended_with_eos = np.asarray(ended_with_eos, dtype=bool).reshape(-1)
  if lengths.size != ended_with_eos.size:
    raise ValueError(
        f"response_stats: {lengths.size} lengths but {ended_with_eos.size} eos flags")
  if lengths.size == 0:
    return {"length": math.nan, "eos_fraction": math.nan}
  return {"length": float(lengths.mean()), "eos_fraction": float(ended_with_eos.mean())}


def _none_if_nan(value: float) -> float | None:
  """`None` for NaN so that `eval.json` holds `null`, not the non-standard `NaN`."""
  return None if value is None or math.isnan(value) else float(value)


def system_metrics(
    *,
    responses: Sequence[str],
    references: Sequence[str],
    rewards=None,
    kl=None,
    lengths=None,
    ended_with_eos=None,
    records: Sequence[Any] | None = None,
    check_fn: Callable[[Any, str], bool | None] | None = None,
    sft_rewards=None,
    sft_responses: Sequence[str] | None = None,
    gold=None,
    sft_gold=None,
    sft_sample_gold=None,
    num_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
  """All metrics of one system on one split, as stored under `eval.json`'s `splits`.

  Args:
    responses: `num_samples` generated responses.
    references: `num_samples` reference responses.
    rewards: float [num_samples] reward-model scores, or None if not scored.
    kl: float [num_samples] per-sequence KL to SFT (`training.ppo.reference_kl`), or None where it
      does not apply (RR, whose responses are not sampled from a policy; SFT itself).
    lengths: int [num_samples] response lengths in tokens, or None (then also
      `ended_with_eos`).
    ended_with_eos: bool [num_samples], or None.
    records: `num_samples` data records for `check_fn`, or None.
    check_fn: the answer checker (see `exact_match`), or None when there are no answers.
    sft_rewards: float [num_samples] the SFT policy's scores on the same prompts, or None (SFT
      itself): gives the paired difference `reward_vs_sft` = mean(rewards - sft_rewards) with a
      bootstrap CI over prompts. Both systems answer the same prompts, so the prompts' own
      spread of scores (most of a system's CI) cancels in the difference.
    sft_responses: `num_samples` SFT responses to the same prompts, or None (SFT itself): with
      `records` and `check_fn` gives the paired exact-match difference `exact_match_vs_sft`
      (system minus SFT over the records with a verifiable answer) and its bootstrap CI.
    gold: float [num_samples] the simulated teacher's gold scores of `responses`, or None (no
      teacher, e.g. Dolly): gives `gold_mean` and `gold_ci95`.
    sft_gold: float [num_samples] its gold scores of SFT's responses to the same prompts, or
      None (SFT itself): with `gold` gives `gold_win_rate_vs_sft` (`paired_win_rate`: a win 1,
      a tie 0.5) and its bootstrap CI; with `rewards` and `sft_rewards` also
      `reward_model_gold_agreement_vs_sft` (`gold_agreement`).
    sft_sample_gold: float [num_samples, K] the teacher's gold scores of K more SFT samples per
      prompt, or None: with `gold` gives `gold_win_rate_vs_sft_samples` and its CI
      (`win_rate_against_samples`), for SFT's own answer too (about 0.5: how lucky its one draw
      was).
    num_resamples: bootstrap resamples for the CIs.
    seed: bootstrap seed.

  Returns:
    A dict with exactly `SYSTEM_METRIC_KEYS`: `bleu` (float), `bleu_signature` (str),
    `reward_mean` (float), `reward_ci95` ([low, high]), `reward_vs_sft` (float) and
    `reward_vs_sft_ci95` ([low, high]), `exact_match` (fraction), `exact_match_vs_sft`
    (difference of fractions) and `exact_match_vs_sft_ci95`, `gold_mean` and `gold_ci95`,
    `gold_win_rate_vs_sft` (fraction) and `gold_win_rate_vs_sft_ci95`,
    `gold_win_rate_vs_sft_samples` and its `_ci95`, `reward_model_gold_agreement_vs_sft`
    (fraction), `kl_to_sft`
    (mean nats per sequence), `length` (mean tokens), `eos_fraction`, `num_samples` (int). A
    metric that does not apply or has no data is `None`.
  """
  num_samples = len(responses)
  per_sample = {"references": references, "rewards": rewards, "kl": kl, "lengths": lengths,
                "ended_with_eos": ended_with_eos, "records": records, "sft_rewards": sft_rewards,
                "sft_responses": sft_responses, "gold": gold, "sft_gold": sft_gold,
                "sft_sample_gold": sft_sample_gold}
  for name, value in per_sample.items():
    if value is not None and len(value) != num_samples:
      raise ValueError(f"system_metrics: {num_samples} responses but {len(value)} {name}")

  bleu = corpus_bleu(responses, references)
  metrics = dict.fromkeys(SYSTEM_METRIC_KEYS)
  metrics.update(bleu=_none_if_nan(bleu["score"]), bleu_signature=bleu["signature"],
                 num_samples=num_samples)
  ci_args = {"num_resamples": num_resamples, "seed": seed}
  if rewards is not None and num_samples:
    mean, low, high = bootstrap_ci(np.asarray(rewards), **ci_args)
    metrics["reward_mean"] = mean
    metrics["reward_ci95"] = [low, high]
    if sft_rewards is not None:
      mean, low, high = paired_difference_ci(rewards, sft_rewards, **ci_args)
      metrics["reward_vs_sft"] = mean
      metrics["reward_vs_sft_ci95"] = [low, high]
  if records is not None:
    metrics["exact_match"] = exact_match(records, responses, check_fn)
    if sft_responses is not None and check_fn is not None:
      verdicts = answer_verdicts(records, responses, check_fn)
      sft_verdicts = answer_verdicts(records, sft_responses, check_fn)
      # The checker's None depends on the record only, so both systems are checked on the
      # same prompts.
      checked = ~np.isnan(verdicts) & ~np.isnan(sft_verdicts)
      if checked.any():
        mean, low, high = paired_difference_ci(verdicts[checked], sft_verdicts[checked],
                                               **ci_args)
        metrics["exact_match_vs_sft"] = mean
        metrics["exact_match_vs_sft_ci95"] = [low, high]
  if gold is not None and num_samples:
    mean, low, high = bootstrap_ci(np.asarray(gold), **ci_args)
    metrics["gold_mean"] = mean
    metrics["gold_ci95"] = [low, high]
    if sft_gold is not None:
      rate, low, high = paired_win_rate(gold, sft_gold, **ci_args)
      metrics["gold_win_rate_vs_sft"] = rate
      metrics["gold_win_rate_vs_sft_ci95"] = [low, high]
      if rewards is not None and sft_rewards is not None:
        metrics["reward_model_gold_agreement_vs_sft"] = gold_agreement(rewards, sft_rewards,
                                                                       gold, sft_gold)
    if sft_sample_gold is not None:
      rate, low, high = win_rate_against_samples(gold, sft_sample_gold, **ci_args)
      metrics["gold_win_rate_vs_sft_samples"] = rate
      metrics["gold_win_rate_vs_sft_samples_ci95"] = [low, high]
  if kl is not None and num_samples:
    metrics["kl_to_sft"] = _none_if_nan(float(np.mean(np.asarray(kl, dtype=np.float64))))
  if (lengths is None) != (ended_with_eos is None):
    raise ValueError("system_metrics: pass both lengths and ended_with_eos, or neither")
  if lengths is not None:
    stats = response_stats(lengths, ended_with_eos)
    metrics["length"] = _none_if_nan(stats["length"])
    metrics["eos_fraction"] = _none_if_nan(stats["eos_fraction"])
  return metrics
