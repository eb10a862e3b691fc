"""Reward sources of the RL phases: `--config.reward.sources` (syntax in ../shared/CLI.md).

  "model"                    the reward phase's model (scored inside the compiled PPO step)
  "verifier"                 1.0 when the built-in answer checker accepts the response, else 0.0
                             (`builtin.check_answer`)
  "gold"                     the simulated teacher's gold score (`teacher.gold_scores`)
  "package.module:function"  any Python function called as function(prompts, responses, records)
                             (three lists of one length) returning one float per response
  "model=1,verifier=2"       a weighted sum (a source without "=W" weighs 1)

Every source but "model" runs on the host between the compiled rollout and the compiled update
(`ppo.HostRewardStep`). A function that fails to import, raises, returns the wrong shape or a
non-finite value stops the run with a `UserError` naming the source and what it returned.
"""

import importlib
import math
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from rlhf_jax.data import builtin
from rlhf_jax.data import teacher
from rlhf_jax.errors import UserError

BUILTIN_SOURCES = ("model", "verifier", "gold")
_FUNCTION = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")

RewardFunction = Callable[[list[str], list[str], list[Mapping]], Sequence[float]]


def parse_sources(spec: str, key: str = "--config.reward.sources") -> tuple[tuple[str, float], ...]:
  """"model=1,verifier=2" -> (("model", 1.0), ("verifier", 2.0)), in the given order.

  Raises:
    UserError: empty, an unknown name, a weight that is not a finite number, or a repeated source.
  """
  weights: dict[str, float] = {}
  for part in (p.strip() for p in str(spec).split(",")):
    if not part:
      continue
    name, _, weight = part.partition("=") if "=" in part else (part, "", "1")
    name = name.strip()
    try:
      value = float(weight)
    except ValueError:
      raise UserError(f"{key}={spec}: the weight of {name!r} is {weight!r}, not a number") from None
    if not math.isfinite(value):
      raise UserError(f"{key}={spec}: the weight of {name!r} must be finite")
    if name not in BUILTIN_SOURCES and not _FUNCTION.match(name):
      raise UserError(f"{key}={spec}: unknown reward source {name!r}: use model, verifier, gold "
                      "or package.module:function, optionally with =WEIGHT")
    if name in weights:
      raise UserError(f"{key}={spec}: reward source {name!r} is given twice")
    weights[name] = value
  if not weights:
    raise UserError(f"{key}={spec!r}: name at least one reward source (e.g. model)")
  return tuple(weights.items())


def verifier(prompts: list[str], responses: list[str], records: list[Mapping]) -> list[float]:
  """1.0 for a response `builtin.check_answer` accepts, else 0.0."""
  del prompts
  return [float(builtin.check_answer(r, text)) for r, text in zip(records, responses)]


def gold(prompts: list[str], responses: list[str], records: list[Mapping]) -> np.ndarray:
  """The simulated teacher's gold score of each response (`teacher.gold_scores`)."""
  del prompts
  return teacher.gold_scores(records, responses)


def load_function(name: str) -> RewardFunction:
  """The host function of a source: `verifier`, `gold`, or an imported "package.module:function".

  Raises:
    UserError: the module does not import, or has no such callable.
  """
  if name == "verifier":
    return verifier
  if name == "gold":
    return gold
  module_name, function_name = name.split(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # Any import-time failure of the user's module stops the run.
    raise UserError(f"reward source {name}: importing {module_name} failed: "
                    f"{type(e).__name__}: {e}") from None
  function = getattr(module, function_name, None)
  if not callable(function):
    raise UserError(f"reward source {name}: {module_name} has no function {function_name!r}"
                    + (f" (found {type(function).__name__})" if function is not None else ""))
  return function


def check_scores(name: str, values, count: int) -> np.ndarray:
  """A source's returned scores as float32 [count], or a UserError saying what it returned."""
  shown = repr(values)
  shown = shown if len(shown) <= 120 else shown[:117] + "..."
  try:
    scores = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError):
    raise UserError(f"reward source {name}: returned {shown}, not numbers (one float per "
                    f"response, {count} of them)") from None
  if scores.shape != (count,):
    raise UserError(f"reward source {name}: returned shape {scores.shape} for {count} "
                    f"responses (one float each expected): {shown}")
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size:
    raise UserError(f"reward source {name}: returned {scores[bad[0]]} for response {bad[0]} "
                    f"({bad.size} of {count} not finite): {shown}")
  return scores.astype(np.float32)


class HostRewards:
  """The host sources' scores of responses to training prompts, by the prompts' record index.

  `host_rewards(indices [n], responses [n]) -> {source: float32 [n]}`, each checked by
  `check_scores`; a source that raises stops the run with a UserError naming it.
  """

  def __init__(self, names: Sequence[str], records: Sequence[Mapping], prompts: Sequence[str]):
    self.records, self.prompts = list(records), list(prompts)
    for name in names:
      if name in ("verifier", "gold") and not all(r.get("answer") for r in self.records):
        raise UserError(f"reward source {name} needs records with answers (the built-in data, "
                        "--config.data.source=builtin)")
    self.functions = {name: load_function(name) for name in names}

  def __call__(self, indices, responses: Sequence[str]) -> dict[str, np.ndarray]:
    indices = [int(i) for i in indices]
    prompts = [self.prompts[i] for i in indices]
    records = [self.records[i] for i in indices]
    out = {}
    for name, function in self.functions.items():
      try:
        values = function(prompts, list(responses), records)
      except UserError:
        raise
      except Exception as e:  # The user's function failed: stop with its name and the error.
        raise UserError(f"reward source {name}: raised {type(e).__name__}: {e}") from None
      out[name] = check_scores(name, values, len(responses))
    return out
