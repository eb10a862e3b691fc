"""Writes the eval phase's report: eval.json, eval.md, its plots and samples.jsonl.

The figures are drawn on a private `Figure` with an Agg canvas instead of `pyplot`, so writing a
report neither switches the process-wide matplotlib backend nor leaves figures open.
"""

from collections.abc import Mapping, Sequence
import json
import math
import os
from pathlib import Path
import textwrap
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from rlhf_jax.errors import UserError
from rlhf_jax.evaluation import overoptimization as overopt

IN_DISTRIBUTION_SPLIT = "test"
# Fixed size and dpi so every plot is exactly 1200 x 600 pixels.
FIGURE_SIZE_INCHES = (12.0, 6.0)
FIGURE_DPI = 100

SYSTEM_DESCRIPTIONS = {
    "RR": "random responses (another prompt's reference response)",
    "SFT": "the supervised fine-tuned policy",
    "RO": "best-of-N samples from SFT, ranked by the reward model",
    "RLHF": "the PPO policy",
    "RLHF-gold": "PPO on the simulated teacher's gold score (the upper bound of RLHF)",
    "GRPO": "the GRPO policy",
    "DPO": "the DPO policy",
}

_MISSING = "n/a"


def ood_split_name(level: int) -> str:
  """The `splits` key of an OOD level: level 0 is the in-distribution `test` split."""
  return IN_DISTRIBUTION_SPLIT if level == 0 else f"ood_{level}"


def to_json_safe(value: Any) -> Any:
  """Converts a results tree to plain JSON types.

  NumPy/JAX scalars and arrays become Python numbers and lists, tuples become lists, NaN and
  infinities become `None` (JSON has no NaN), paths become strings, and objects with
  `to_dict()` (e.g. `ml_collections.ConfigDict`) become dicts. Anything else is written as its
  `str()` so that an odd config value cannot crash the report at the end of a long evaluation.
  """
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {str(key): to_json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_safe(item) for item in value]
  if hasattr(value, "tolist"):  # NumPy and JAX arrays and scalars.
    return to_json_safe(value.tolist())
  if hasattr(value, "to_dict"):
    return to_json_safe(value.to_dict())
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  return str(value)


def _write_atomically(path: Path, write_fn) -> None:
  """Writes through a temporary file and renames it, so a crash never leaves half a file."""
  tmp_path = path.with_name(path.name + ".tmp")
  write_fn(tmp_path)
  os.replace(tmp_path, path)


def _write_text(path: Path, text: str) -> None:
  _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _number(value: Any) -> float | None:
  """A finite float, or None for missing/NaN values."""
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def _split_metrics(system: Mapping[str, Any], split: str) -> Mapping[str, Any]:
  return (system.get("splits") or {}).get(split) or {}


def _format(value: Any, spec: str) -> str:
  number = _number(value)
  return _MISSING if number is None else format(number, spec)


def _format_percent(value: Any) -> str:
  number = _number(value)
  return _MISSING if number is None else f"{100.0 * number:.1f}%"


def _format_reward(metrics: Mapping[str, Any], key: str = "reward_mean",
                   ci_key: str = "reward_ci95", sign: str = "") -> str:
  mean = _number(metrics.get(key))
  if mean is None:
    return _MISSING
  ci = metrics.get(ci_key) or [None, None]
  low, high = _number(ci[0]), _number(ci[1])
  if low is None or high is None:
    return f"{mean:{sign}.3f}"
  return f"{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def _format_percent_ci(metrics: Mapping[str, Any], key: str, ci_key: str,
                       sign: str = "") -> str:
  """A fraction and its CI in percent (points when signed), e.g. `62.5% [55.0%, 70.0%]`."""
  value = _number(metrics.get(key))
  if value is None:
    return _MISSING
  unit = "" if sign else "%"
  ci = metrics.get(ci_key) or [None, None]
  low, high = _number(ci[0]), _number(ci[1])
  text = f"{100.0 * value:{sign}.1f}{unit}"
  if low is None or high is None:
    return text
  return f"{text} [{100.0 * low:{sign}.1f}{unit}, {100.0 * high:{sign}.1f}{unit}]"


def _has_metric(systems: Mapping[str, Any], split: str, key: str) -> bool:
  return any(_number(_split_metrics(system, split).get(key)) is not None
             for system in systems.values())


def _markdown_table(systems: Mapping[str, Any], split: str) -> list[str]:
  """One row per system; the gold and paired exact-match columns only where some system has
  them (the built-in task's teacher; Dolly has neither)."""
  columns = [
      ("BLEU", lambda m: _format(m.get("bleu"), ".2f")),
      ("reward (95% CI)", _format_reward),
      ("reward - SFT (paired 95% CI)",
       lambda m: _format_reward(m, "reward_vs_sft", "reward_vs_sft_ci95", sign="+")),
  ]
  if _has_metric(systems, split, "gold_mean"):
    columns += [
        ("gold (95% CI)", lambda m: _format_reward(m, "gold_mean", "gold_ci95")),
        ("gold win-rate vs SFT (95% CI)",
         lambda m: _format_percent_ci(m, "gold_win_rate_vs_sft", "gold_win_rate_vs_sft_ci95")),
    ]
  if _has_metric(systems, split, "gold_win_rate_vs_sft_samples"):
    columns.append(("gold win-rate vs SFT's samples (95% CI)",
                    lambda m: _format_percent_ci(m, "gold_win_rate_vs_sft_samples",
                                                 "gold_win_rate_vs_sft_samples_ci95")))
  if _has_metric(systems, split, "reward_model_gold_agreement_vs_sft"):
    # The reward model's accuracy on the pairs each system's answers form with SFT's.
    columns.append(("reward model agrees with gold vs SFT",
                    lambda m: _format_percent(m.get("reward_model_gold_agreement_vs_sft"))))
  columns.append(("exact match", lambda m: _format_percent(m.get("exact_match"))))
  if _has_metric(systems, split, "exact_match_vs_sft"):
    columns.append(("exact match - SFT (points, paired 95% CI)",
                    lambda m: _format_percent_ci(m, "exact_match_vs_sft",
                                                 "exact_match_vs_sft_ci95", sign="+")))
  if _has_metric(systems, split, "exact_match_oracle_gap_closed"):
    # SFT's row: the oracle best-of-8 itself (any of 8 SFT samples right); the others' rows: the
    # share of the gap from SFT's exact match to it that their gain closes.
    columns.append(("oracle best-of-8 (SFT) / share of its gap closed",
                    lambda m: f"oracle {_format_percent(m['oracle_best_of_8_exact_match'])}"
                    if "oracle_best_of_8_exact_match" in m
                    else _format_percent(m.get("exact_match_oracle_gap_closed"))))
  columns += [
      ("KL to SFT (nats)", lambda m: _format(m.get("kl_to_sft"), ".3f")),
      ("length (tokens)", lambda m: _format(m.get("length"), ".1f")),
      ("ended with EOS", lambda m: _format_percent(m.get("eos_fraction"))),
      ("samples", lambda m: _MISSING if m.get("num_samples") is None else str(m["num_samples"])),
  ]
  lines = ["| system | " + " | ".join(title for title, _ in columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for name, system in systems.items():
    metrics = _split_metrics(system, split)
    cells = [str(name).replace("|", "\\|")] + [cell(metrics) for _, cell in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _other_splits(systems: Mapping[str, Any], ood_levels: Mapping[int, str]) -> list[str]:
  """Splits other than the in-distribution one: OOD levels in order, then any others by name."""
  present = {split for system in systems.values() for split in (system.get("splits") or {})}
  ordered = [ood_split_name(level) for level in sorted(ood_levels) if level != 0]
  ordered = [split for split in ordered if split in present]
  rest = sorted(present - set(ordered) - {IN_DISTRIBUTION_SPLIT})
  return ordered + rest


def _bleu_signature(results: Mapping[str, Any]) -> str | None:
  if results.get("bleu_signature"):
    return results["bleu_signature"]
  for system in results["systems"].values():
    for metrics in (system.get("splits") or {}).values():
      if metrics and metrics.get("bleu_signature"):
        return metrics["bleu_signature"]
  return None


def _overoptimization_markdown(points: Sequence[Mapping[str, Any]],
                               fits: Sequence[Mapping[str, Any]]) -> list[str]:
  lines = ["## Over-optimisation (`overoptimization.png`)", "",
           "Gold (teacher) and reward-model score of best-of-n samples from SFT and of PPO along "
           "training, on held-out prompts, against d = sqrt(KL to SFT).", "",
           "| method | n / step | KL (nats) | sqrt(KL) | gold | reward-model score "
           "| gold win-rate vs SFT: reward model's pick / teacher's pick |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for point in points:
    kl = _number(point.get("kl"))
    where = point.get("n", point.get("step"))
    win_rates = (f"{_format_percent(point.get('gold_win_rate_vs_sft'))} / "
                 f"{_format_percent(point.get('gold_picked_win_rate_vs_sft'))}"
                 if point.get("gold_win_rate_vs_sft") is not None else _MISSING)
    lines.append(
        f"| {point.get('method')} | {_MISSING if where is None else where} "
        f"| {_format(kl, '.3f')} "
        f"| {_MISSING if kl is None else format(math.sqrt(max(kl, 0.0)), '.3f')} "
        f"| {_format(point.get('gold_mean'), '.3f')} | {_format(point.get('reward_mean'), '.3f')} "
        f"| {win_rates} |")
  lines.append("")
  if any(point.get("gold_win_rate_vs_sft") is not None for point in points):
    lines += ["The win-rates are best-of-n's against SFT's samples of each prompt (a tie "
              "half): picked by the reward model, and picked by the teacher among the same n "
              "samples (the most that choosing among SFT's samples can win).", ""]
  if fits:
    lines += ["Fits of Gao et al. (2022)'s forms to the score minus the starting point's "
              "(least squares):", ""]
    for fit in fits:
      lines.append(f"- {fit['method']}, {fit['metric']}: {overopt.describe_fit(fit)}")
    lines.append("")
  return lines


def _markdown(results: Mapping[str, Any], ood_levels: Mapping[int, str]) -> str:
  systems = results["systems"]
  lines = ["# Evaluation report", ""]
  described = [name for name in systems if name in SYSTEM_DESCRIPTIONS]
  if described:
    lines.append("Systems: " + "; ".join(
        f"**{name}** = {SYSTEM_DESCRIPTIONS[name]}" for name in described) + ".")
    lines.append("")
  lines += [
      "Reward is the mean reward-model score with a 95% percentile-bootstrap confidence "
      "interval; reward - SFT is the mean over prompts of the system's score minus the SFT "
      "policy's on the same prompt, with a bootstrap interval over prompts (the prompts' own "
      "spread of scores, most of a system's interval, cancels in it); KL to SFT is the mean "
      "per-response sum of log p_policy - log p_SFT over the sampled tokens.",
      "",
      *(["Gold is the simulated teacher's score of the responses (95% bootstrap CI); the gold "
         "win-rate vs SFT is the share of prompts on which the teacher prefers the system's "
         "response to SFT's (a tie counts half), with a bootstrap interval over prompts; exact "
         "match - SFT is the paired difference on the same prompts, in percentage points.", ""]
        if _has_metric(systems, IN_DISTRIBUTION_SPLIT, "gold_mean") else []),
      *(["The oracle best-of-8 is the share of prompts on which any of 8 SFT samples is right; "
         "each other system's share of its gap is (its exact match - SFT's) / (oracle - SFT's).",
         ""] if _has_metric(systems, IN_DISTRIBUTION_SPLIT, "exact_match_oracle_gap_closed")
        else []),
      f"## In-distribution (`{IN_DISTRIBUTION_SPLIT}`)",
      "",
      *_markdown_table(systems, IN_DISTRIBUTION_SPLIT),
      "",
  ]
  other_splits = _other_splits(systems, ood_levels)
  if other_splits:
    lines += ["## Out of distribution", ""]
  level_of_split = {ood_split_name(level): level for level in ood_levels}
  for split in other_splits:
    level = level_of_split.get(split)
    title = f"`{split}`" if level is None else f"Level {level}: {ood_levels[level]} (`{split}`)"
    lines += [f"### {title}", "", *_markdown_table(systems, split), ""]
  if results.get("overoptimization"):
    lines += _overoptimization_markdown(results["overoptimization"],
                                        results.get("overoptimization_fits") or [])
  signature = _bleu_signature(results)
  lines.append(f"BLEU: sacrebleu, signature `{signature}`." if signature else
               "BLEU: sacrebleu (no signature recorded).")
  lines.append("")
  return "\n".join(lines)


def _new_figure() -> Figure:
  figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def _save_png(figure: Figure, path: Path) -> None:
  # print_png renders at the figure's own dpi and size, ignoring any global savefig rcParams
  # (e.g. bbox "tight") that would change the pixel size.
  _write_atomically(path, lambda tmp: figure.canvas.print_png(str(tmp)))


def _wrap(label: str, width: int = 16) -> str:
  return "\n".join(textwrap.wrap(str(label), width)) or str(label)


def _system_colors(names: Sequence[str]) -> dict[str, Any]:
  """One colour per system, the same in both plots."""
  palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
  return {name: palette(index % palette.N) for index, name in enumerate(names)}


def _bar_panel(axes, systems: Mapping[str, Any], colors: Mapping[str, Any], key: str,
               ci_key: str, ylabel: str, what: str) -> None:
  """Bars of one metric per system on the in-distribution split, with 95% CI error bars."""
  names = list(systems)
  any_bar = False
  for x, name in enumerate(names):
    metrics = _split_metrics(systems[name], IN_DISTRIBUTION_SPLIT)
    mean = _number(metrics.get(key))
    if mean is None:
      axes.annotate(_MISSING, (x, 0.0), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", color="gray")
      continue
    any_bar = True
    ci = metrics.get(ci_key) or [None, None]
    low, high = _number(ci[0]), _number(ci[1])
    has_ci = low is not None and high is not None
    yerr = [[max(mean - low, 0.0)], [max(high - mean, 0.0)]] if has_ci else None
    axes.bar(x, mean, yerr=yerr, capsize=8, color=colors[name], edgecolor="black",
             linewidth=0.6)
    # The value label sits beyond the end of the error bar, on the side the bar points to.
    tip = (high if mean >= 0 else low) if has_ci else mean
    axes.annotate(f"{mean:.3f}", (x, tip), xytext=(0, 5 if mean >= 0 else -5),
                  textcoords="offset points", ha="center",
                  va="bottom" if mean >= 0 else "top", fontsize=11)
  if not any_bar:
    axes.text(0.5, 0.5, f"no {what} recorded", transform=axes.transAxes,
              ha="center", va="center", color="gray")
  axes.axhline(0.0, color="black", linewidth=0.8)
  axes.set_xticks(range(len(names)), [_wrap(name) for name in names])
  axes.set_xlim(-0.6, len(names) - 0.4)
  axes.margins(y=0.15)
  axes.set_xlabel("system")
  axes.set_ylabel(ylabel)
  axes.grid(axis="y", alpha=0.3)


def _plot_reward_by_system(results: Mapping[str, Any], path: Path) -> None:
  """Reward-model score per system; beside it the teacher's gold score when it was measured."""
  systems = results["systems"]
  colors = _system_colors(list(systems))
  figure = _new_figure()
  with_gold = _has_metric(systems, IN_DISTRIBUTION_SPLIT, "gold_mean")
  panels = figure.subplots(1, 2) if with_gold else [figure.add_subplot()]
  _bar_panel(panels[0], systems, colors, "reward_mean", "reward_ci95",
             "mean reward-model score (reward-model units)", "reward-model scores")
  if with_gold:
    panels[0].set_title("Reward-model score")
    _bar_panel(panels[1], systems, colors, "gold_mean", "gold_ci95",
               "mean gold score (simulated teacher's units)", "gold scores")
    panels[1].set_title("Gold score (simulated teacher)")
    figure.suptitle(f"Score per system on the in-distribution split (`{IN_DISTRIBUTION_SPLIT}`); "
                    "error bars: 95% bootstrap CI")
  else:
    panels[0].set_title(f"Reward-model score per system on the in-distribution split "
                        f"(`{IN_DISTRIBUTION_SPLIT}`); error bars: 95% bootstrap CI")
  _save_png(figure, path)


def _plot_overoptimization(points: Sequence[Mapping[str, Any]],
                           fits: Sequence[Mapping[str, Any]], path: Path) -> None:
  """Gold (left) and reward-model score (right) against sqrt(KL to SFT), one colour per method;
  Gao et al.'s fitted curves dashed."""
  methods = list(dict.fromkeys(str(point.get("method")) for point in points))
  colors = _system_colors(methods)
  figure = _new_figure()
  panels = figure.subplots(1, 2)
  for axes, (metric, ylabel, title) in zip(panels, (
      ("gold_mean", "mean gold score (simulated teacher's units)", "Gold score"),
      ("reward_mean", "mean reward-model score (reward-model units)", "Reward-model score"))):
    drawn = False
    for method in methods:
      of_method = [point for point in points if str(point.get("method")) == method
                   and _number(point.get("kl")) is not None
                   and _number(point.get(metric)) is not None]
      if not of_method:
        continue
      drawn = True
      # In training order (PPO's steps) or n order (best-of-n, whose KL grows with n): a PPO
      # run's KL goes up and down under its controller, and its path is what the line shows.
      of_method.sort(key=lambda point: (point.get("step", point.get("n")) or 0, point["kl"]))
      d = [math.sqrt(max(point["kl"], 0.0)) for point in of_method]
      axes.plot(d, [point[metric] for point in of_method], marker="o", linewidth=2,
                color=colors[method], label=method)
      if method == overopt.BEST_OF_N:
        for x, point in zip(d, of_method):
          axes.annotate(f"n={point.get('n')}", (x, point[metric]), xytext=(4, -12),
                        textcoords="offset points", fontsize=9, color=colors[method])
      # Each fit is drawn over its own points' range (plus 20%): a quadratic best-of-n fit
      # extrapolated to PPO's far larger KL would dive off the chart and hide the data.
      grid = np.linspace(0.0, max(max(d), 1e-3) * 1.2, 200)
      for fit in fits:
        if fit["method"] == method and fit["metric"] == metric:
          axes.plot(grid, fit["baseline"] + overopt.gao_curve(method, grid, fit["a"], fit["b"]),
                    linestyle="--", linewidth=1.5, color=colors[method],
                    label=f"{method} fit: {overopt.FORMS.get(method, '')}")
    if not drawn:
      axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center",
                color="gray")
    else:
      axes.legend(loc="best", fontsize=9)
    axes.set_xlabel("sqrt(KL to SFT) (sqrt nats)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
  figure.suptitle("Over-optimisation on held-out prompts: best-of-n and PPO against "
                  "sqrt(KL to SFT); dashed: Gao et al. (2022) fits")
  _save_png(figure, path)


def _curve(system: Mapping[str, Any], metric: str, levels: Sequence[int]) -> np.ndarray:
  """A system's metric per OOD level: from `ood_curve`, else read off the per-level splits.

  Returns float64 [len(levels)] with NaN where the value is missing (matplotlib leaves a gap).
  """
  curve = (system.get("ood_curve") or {}).get(metric)
  values = []
  for level in levels:
    if curve is not None:
      value = curve[level] if level < len(curve) else None
    else:
      value = _split_metrics(system, ood_split_name(level)).get(metric)
    number = _number(value)
    values.append(math.nan if number is None else number)
  return np.asarray(values, dtype=np.float64)


def _levels(results: Mapping[str, Any], ood_levels: Mapping[int, str]) -> list[int]:
  """Levels to plot: those named in `ood_levels`, or as many as the longest curve has."""
  if ood_levels:
    return sorted(ood_levels)
  longest = max((len(curve) for system in results["systems"].values()
                 for curve in (system.get("ood_curve") or {}).values()), default=1)
  return list(range(longest))


def _plot_ood_robustness(results: Mapping[str, Any], ood_levels: Mapping[int, str],
                         path: Path) -> None:
  systems = results["systems"]
  names = list(systems)
  colors = _system_colors(names)
  levels = _levels(results, ood_levels)
  curves = {metric: {name: _curve(systems[name], metric, levels) for name in names}
            for metric in ("exact_match", "reward_mean", "bleu")}
  # Data sets without verifiable answers (Dolly) have no exact match: show BLEU instead.
  has_exact_match = any(np.isfinite(curve).any() for curve in curves["exact_match"].values())
  if has_exact_match:
    left = ("exact_match", 100.0, "exact match (% of prompts)", "Exact match")
  else:
    left = ("bleu", 1.0, "BLEU (0-100)", "BLEU (no verifiable answers: exact match n/a)")
  right = ("reward_mean", 1.0, "mean reward-model score (reward-model units)",
           "Reward-model score")

  figure = _new_figure()
  panels = figure.subplots(1, 2)
  tick_labels = [_wrap(f"{level}: {ood_levels.get(level, '')}".rstrip(": "), 18)
                 for level in levels]
  for axes, (metric, scale, ylabel, title) in zip(panels, (left, right)):
    drawn = False
    for name in names:
      values = curves[metric][name] * scale
      if np.isfinite(values).any():
        drawn = True
      axes.plot(range(len(levels)), values, marker="o", linewidth=2, color=colors[name],
                label=name)
    if not drawn:
      axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center",
                color="gray")
    if metric == "exact_match":
      axes.set_ylim(-2.0, 102.0)  # The whole 0-100% scale, so small gaps do not look large.
    elif metric == "bleu":
      axes.set_ylim(bottom=0.0)
    axes.set_xticks(range(len(levels)), tick_labels)
    axes.set_xlabel("OOD level (distance from the training distribution)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
  handles, labels = panels[0].get_legend_handles_labels()
  if handles:
    figure.legend(handles, [_wrap(label, 30) for label in labels], loc="outside lower center",
                  ncol=min(len(handles), 6), title="system")
  figure.suptitle("Robustness under distribution shift, per system")
  _save_png(figure, path)


def _write_samples(path: Path, samples: Sequence[Mapping[str, Any]]) -> None:
  lines = []
  for index, sample in enumerate(samples):
    if not isinstance(sample, Mapping):
      raise ValueError(f"write_report: sample {index} is a {type(sample).__name__}, not a dict")
    lines.append(json.dumps(to_json_safe(sample), ensure_ascii=False, allow_nan=False))
  _write_text(path, "".join(line + "\n" for line in lines))


def write_report(
    out_dir: str | os.PathLike,
    results: Mapping[str, Any],
    *,
    ood_levels: Mapping[int, str],
    samples: Sequence[Mapping[str, Any]],
    overoptimization: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
  """Writes the evaluation report files into `out_dir` (created if missing).

  Args:
    out_dir: the eval phase's directory, e.g. `WORKDIR/eval`.
    results: `{"systems": {name: {"splits": {split: metrics}, "ood_curve": {metric: [per
      level 0..k]}}}, "config": {...}, "bleu_signature": str}`, with `metrics` as returned by
      `metrics.system_metrics` and splits `test` (in-distribution) and `ood_1`, `ood_2`, ...
      Systems appear in the report in the dict's order. Missing metrics (`None`, NaN, absent
      keys, absent splits or curves) are shown as "n/a" or left out of the plots.
    ood_levels: `{level: name}`, level 0 being the in-distribution split; the names label the
      OOD plot's x axis and the OOD tables.
    samples: one dict per prompt, by convention `{"prompt": str, "reference": str, "systems":
      {name: {"response": str, "reward": float}}}`; written as given, one JSON line each.
    overoptimization: points of `overoptimization.best_of_n_points` and `.ppo_points`, or None.
      When there are any, `eval.json` gets them under `"overoptimization"` and Gao et al.'s fits
      (`overoptimization.fit_points`) under `"overoptimization_fits"`, eval.md a section, and
      `overoptimization.png` is drawn; with none, neither key nor plot.

  Returns:
    `{file name: path}` for `eval.json`, `eval.md`, `reward_by_system.png`,
    `ood_robustness.png`, `samples.jsonl` and, with over-optimisation points,
    `overoptimization.png`.
  """
  out_dir = Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise UserError(f"{out_dir}: the eval output directory is an existing file")
  if not isinstance(results.get("systems"), Mapping):
    raise ValueError("write_report: results must hold a 'systems' dict")
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {name: out_dir / name for name in (
      "eval.json", "eval.md", "reward_by_system.png", "ood_robustness.png", "samples.jsonl")}
  if overoptimization:
    points = to_json_safe(list(overoptimization))
    results = {**results, "overoptimization": points,
               "overoptimization_fits": overopt.fit_points(points)}
    paths["overoptimization.png"] = out_dir / "overoptimization.png"

  _write_text(paths["eval.json"],
              json.dumps(to_json_safe(results), indent=2, ensure_ascii=False, allow_nan=False)
              + "\n")
  _write_text(paths["eval.md"], _markdown(results, ood_levels))
  _plot_reward_by_system(results, paths["reward_by_system.png"])
  _plot_ood_robustness(results, ood_levels, paths["ood_robustness.png"])
  _write_samples(paths["samples.jsonl"], samples)
  if "overoptimization.png" in paths:
    _plot_overoptimization(results["overoptimization"], results["overoptimization_fits"],
                           paths["overoptimization.png"])
  return paths
