"""Reward sources of the RL phases (rlhf_jax/training/rewards.py): the --config.reward.sources
syntax, weighted sums, the built-in verifier and gold sources, and the UserError each kind of
broken user function stops the run with (naming the function and what it returned)."""

import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import builtin
from rlhf_jax.data import teacher
from rlhf_jax.errors import UserError
from rlhf_jax.models import decode
from rlhf_jax.training import ppo
from rlhf_jax.training import rewards

MODULE = "reward_functions_for_tests"


@pytest.fixture(autouse=True)
def user_module(monkeypatch):
  """An importable module of reward functions, good and broken."""
  module = types.ModuleType(MODULE)
  module.length = lambda prompts, responses, records: [float(len(r)) for r in responses]
  module.raises = lambda prompts, responses, records: 1 / 0
  module.too_few = lambda prompts, responses, records: [1.0] * (len(responses) - 1)
  module.nan = lambda prompts, responses, records: [0.0] * (len(responses) - 1) + [float("nan")]
  module.words = lambda prompts, responses, records: ["good"] * len(responses)
  module.not_callable = 3
  monkeypatch.setitem(sys.modules, MODULE, module)
  return module


def _records(n: int = 4) -> list[dict]:
  return builtin.generate(seed=0, num_train=max(n, 8), num_eval=2)["train"][:n]


def test_sources_parse_with_weights_in_order():
  assert rewards.parse_sources("model") == (("model", 1.0),)
  assert rewards.parse_sources("model=1,verifier=2") == (("model", 1.0), ("verifier", 2.0))
  assert rewards.parse_sources(f" gold=0.5 , {MODULE}:length=-1e-2") == (
      ("gold", 0.5), (f"{MODULE}:length", -0.01))


@pytest.mark.parametrize("spec, message", [
    ("", "name at least one reward source"),
    ("modle", "unknown reward source 'modle'"),
    ("model=two", "the weight of 'model' is 'two', not a number"),
    ("model=inf", "must be finite"),
    ("model,model=2", "'model' is given twice"),
    ("package.module", "unknown reward source"),
])
def test_bad_sources_name_the_flag_and_the_problem(spec, message):
  with pytest.raises(UserError, match="--config.reward.sources") as error:
    rewards.parse_sources(spec)
  assert message in str(error.value)


def test_verifier_and_gold_score_responses_by_their_records():
  records = _records()
  responses = [f"The answer is {r['answer']}." for r in records[:2]] + ["I do not know.", ""]
  host = rewards.HostRewards(["verifier", "gold"], records, [r["instruction"] for r in records])
  scores = host(np.array([0, 1, 2, 3]), responses)
  expected_verdicts = [float(builtin.check_answer(r, t)) for r, t in zip(records, responses)]
  np.testing.assert_array_equal(scores["verifier"], expected_verdicts)
  assert scores["verifier"][:2].tolist() == [1.0, 1.0] and scores["verifier"][2:].sum() == 0
  np.testing.assert_allclose(scores["gold"], teacher.gold_scores(records, responses), rtol=1e-6)
  # Indices pick the records: the same response to another record is judged against that one.
  again = host(np.array([1, 1]), responses[:2])
  assert again["verifier"].tolist() == [float(builtin.check_answer(records[1], responses[0])),
                                        1.0]


def test_a_user_function_gets_prompts_responses_and_records(user_module):
  seen = {}

  def spy(prompts, responses, records):
    seen.update(prompts=prompts, responses=responses, records=records)
    return np.arange(len(responses), dtype=np.float64)

  user_module.spy = spy
  records = _records()
  prompts = [f"prompt {i}" for i in range(len(records))]
  host = rewards.HostRewards([f"{MODULE}:spy"], records, prompts)
  scores = host([2, 0], ["x", "y"])
  assert seen == {"prompts": ["prompt 2", "prompt 0"], "responses": ["x", "y"],
                  "records": [records[2], records[0]]}
  assert scores[f"{MODULE}:spy"].dtype == np.float32
  np.testing.assert_array_equal(scores[f"{MODULE}:spy"], [0.0, 1.0])


@pytest.mark.parametrize("function, message", [
    ("raises", r"reward source .*:raises: raised ZeroDivisionError: division by zero"),
    ("too_few", r"reward source .*:too_few: returned shape \(1,\) for 2 responses .*\[1\.0\]"),
    ("nan", r"reward source .*:nan: returned nan for response 1 \(1 of 2 not finite\): "
            r"\[0\.0, nan\]"),
    ("words", r"reward source .*:words: returned \['good', 'good'\], not numbers"),
])
def test_a_broken_function_stops_with_its_name_and_what_it_returned(function, message):
  records = _records()
  host = rewards.HostRewards([f"{MODULE}:{function}"], records, ["p"] * len(records))
  with pytest.raises(UserError, match=message):
    host([0, 1], ["a", "b"])


def test_a_function_that_does_not_import_is_named():
  with pytest.raises(UserError, match=r"reward source no_such_package\.mod:f: importing "
                                      r"no_such_package\.mod failed: ModuleNotFoundError"):
    rewards.HostRewards(["no_such_package.mod:f"], _records(), ["p"] * 4)
  with pytest.raises(UserError, match=rf"{MODULE} has no function 'missing'"):
    rewards.HostRewards([f"{MODULE}:missing"], _records(), ["p"] * 4)
  with pytest.raises(UserError, match=r"has no function 'not_callable' \(found int\)"):
    rewards.HostRewards([f"{MODULE}:not_callable"], _records(), ["p"] * 4)


def test_verifier_and_gold_need_records_with_answers():
  with pytest.raises(UserError, match="reward source gold needs records with answers"):
    rewards.HostRewards(["gold"], [{"instruction": "Say hi", "response": "hi"}], ["p"])


def test_weighted_sums_and_per_source_means_in_the_iteration():
  """`score_rollout` sums weight x source (the host sources passed in, the model scored inside),
  normalises the sum, and keeps each source's own scores for the reward/SOURCE means."""
  settings = ppo.PPOSettings(
      sampling=decode.SamplingSettings(max_new_tokens=3, eos_token_id=0, pad_token_id=0),
      reward_weights=(("verifier", 2.0), (f"{MODULE}:length", -0.5)), adaptive_kl=False,
      advantage_estimator="rloo", samples_per_prompt=2)
  assert settings.host_sources == ("verifier", f"{MODULE}:length")
  assert not settings.uses_reward_model
  host = {"verifier": jnp.asarray([1.0, 0.0, 1.0, 1.0]),
          f"{MODULE}:length": jnp.asarray([4.0, 2.0, 0.0, 6.0])}
  combined = ppo.combine_scores(settings, host)
  np.testing.assert_allclose(combined, [0.0, -1.0, 2.0, -1.0])
  normalized = ppo.normalize_scores(combined, {"mean": 0.5, "std": 2.0}, settings)
  np.testing.assert_allclose(normalized, [-0.25, -0.75, 0.75, -0.75])
  with_model = ppo.PPOSettings(sampling=settings.sampling,
                               reward_weights=(("model", 1.0), ("gold", 3.0)))
  assert with_model.host_sources == ("gold",) and with_model.uses_reward_model
  np.testing.assert_allclose(
      ppo.combine_scores(with_model, {"model": jnp.asarray([1.0, 2.0]),
                                      "gold": jnp.asarray([0.5, -1.0])}), [2.5, -1.0])
