"""The config files: variants match by exact name, real-data paths come from RLHF_JAX_DATA (or a
flag), and every docstring says its command, machine, time and result."""

import importlib
import pathlib
import re

import pytest

from rlhf_jax.configs import common

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {
    "sft": ("builtin", "gpt_neo_125m", "gpt_neo_1p3b", "gpt_neo_2p7b"),
    "reward": ("builtin", "hh_rlhf", "gpt_neo_125m", "gpt_neo_125m_hh_rlhf"),
    "ppo": ("builtin", "verifier", "gpt_neo_125m"),
    "grpo": ("builtin", "gpt_neo_125m"),
    "dpo": ("builtin", "hh_rlhf"),
    "eval": ("builtin", "gpt_neo_125m"),
    "pipeline": ("default", "full", "iterated", "overoptimize"),
}


def _module(name: str):
  return importlib.import_module(f"rlhf_jax.configs.{name}")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_match_by_exact_name(name):
  module = _module(name)
  for variant in VARIANTS[name]:
    module.get_config(variant)
  for wrong in ("gpt_neo_125", "gpt_neo_125M", "gpt_neo_", "Builtin", "gpt_neo_125m_x"):
    with pytest.raises(ValueError) as error:
      module.get_config(wrong)
    assert f"unknown variant {wrong!r}" in str(error.value)
    assert ", ".join(VARIANTS[name]) in str(error.value)  # Lists the valid names.


def test_the_overoptimize_pipeline_changes_only_ppos_kl_and_length():
  pipeline = _module("pipeline")
  default, overopt = pipeline.get_config("default"), pipeline.get_config("overoptimize")
  assert (overopt.ppo.ppo.init_kl_coef, overopt.ppo.ppo.adaptive_kl) == (0.01, False)
  assert (overopt.ppo.train.steps, overopt.ppo.train.eval_every) == (150, 10)
  assert overopt.phases == default.phases
  for phase in ("sft", "label", "reward", "eval"):
    assert overopt[phase].to_dict() == default[phase].to_dict(), phase


def test_the_large_variants_differ_from_125m():
  sft = _module("sft")
  assert sft.get_config("gpt_neo_125m").model.dtype == "float32"
  for variant in ("gpt_neo_1p3b", "gpt_neo_2p7b"):
    config = sft.get_config(variant)
    assert (config.model.dtype, config.model.remat, config.train.accum_steps) == ("bfloat16", True, 4)


def test_real_data_paths_come_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv(common.DATA_ENV, raising=False)
  reward = _module("reward")
  # Unset: the path names the variable, so "no such file" says what to set.
  assert reward.get_config("hh_rlhf").pairs.source == (
      "$RLHF_JAX_DATA/preferences/hh_rlhf_helpful_base_test.jsonl.gz")
  monkeypatch.setenv(common.DATA_ENV, str(tmp_path))
  assert reward.get_config("hh_rlhf").pairs.source == str(
      tmp_path / "preferences" / "hh_rlhf_helpful_base_test.jsonl.gz")


def test_configs_do_not_look_around_the_repository():
  for path in sorted((REPO / "configs").glob("*.py")):
    text = path.read_text()
    assert "__file__" not in text and "shared/data" not in text and "parents[" not in text, path


@pytest.mark.parametrize("name", ["init", "sft", "label", "reward", "ppo", "grpo", "dpo", "eval",
                                  "pipeline"])
def test_docstring_gives_command_machine_time_and_result(name):
  doc = _module(name).__doc__
  assert "python -m rlhf_jax.main" in doc
  for word in ("Machine", "Time", "Result"):
    assert re.search(rf"\b{word}\b", doc), (name, word)


def test_the_full_pipeline_adds_ppo_on_the_gold_score_under_its_own_name():
  pipeline = _module("pipeline")
  default, full = pipeline.get_config(), pipeline.get_config("full")
  assert default.phases == "init,sft,label,reward,ppo,eval"
  assert full.phases == "init,sft,label,reward,ppo,ppo_gold,grpo,dpo,eval"
  assert full.dpo.loss.beta == 0.1 and full.dpo.data is full.data
  assert (full.grpo.name, full.grpo.reward.sources) == ("grpo", "verifier")
  assert full.grpo.ppo.advantage_estimator == "grpo" and "phase" not in full.grpo
  assert (full.ppo_gold.phase, full.ppo_gold.name, full.ppo_gold.reward.sources) == (
      "ppo", "ppo_gold", "gold")
  assert (full.ppo.name, full.ppo.reward.sources) == ("ppo", "model")
  assert "phase" not in full.ppo and "ppo_gold" not in default
  full.data.seed = 3  # One shared data section, the added entry included.
  assert full.ppo_gold.data.seed == full.label.data.seed == 3


def test_label_teacher_defaults_are_the_teachers():
  from rlhf_jax.data import teacher
  config = _module("label").get_config()
  assert config.teacher.temperature == teacher.DEFAULT_TEMPERATURE
  assert config.teacher.flip_rate == teacher.DEFAULT_FLIP_RATE
