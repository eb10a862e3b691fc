"""Tests of the dpo phase (rlhf_jax/phases/dpo.py) on a tiny GPT-Neo and a small pairs file:
TRL's metric names, a run that learns its pairs, bit-exact resume with the stored reference
log-probabilities, the export as a transformers GPTNeoForCausalLM, bad pair files, and the eval
phase finding the DPO system."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import scipy.special

from rlhf_jax import checkpoints
from rlhf_jax import main
from rlhf_jax.configs import dpo as dpo_config
from rlhf_jax.configs import eval as eval_config
from rlhf_jax.configs import export as export_config
from rlhf_jax.data import batching
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.phases import dpo as dpo_phase
from rlhf_jax.phases import eval as eval_phase
from rlhf_jax.training import dpo
from conftest import write_pairs  # noqa: E402

LENGTH = 48
TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
  return hf.load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_hf_model(make_hf_gpt_neo, tiny_tokenizer_dir, tokenizer):
  """A tiny random HF GPT-Neo (the policy to start from) with the tiny tokenizer beside it."""
  return make_hf_gpt_neo(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=64, tokenizer_dir=tiny_tokenizer_dir)




def small_config(init: pathlib.Path, pairs: pathlib.Path, steps: int = 4, **train):
  config = dpo_config.get_config()
  config.init_checkpoint = str(init)
  config.pairs.source = str(pairs)
  config.pairs.eval_fraction = 0.25
  config.max_length = LENGTH
  config.train.update({**dict(steps=steps, batch_size=4, log_every=1, eval_every=2,
                              save_every=2), **train})
  config.eval_batch_size = 4
  config.reference_batch_size = 8
  return config


def read_metrics(phase_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]


class Preempted(Exception):
  pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf_model):
  """A 4-step DPO run on a pairs file, and the same run failing after step 3 (checkpoint at
  step 2) and resumed with the reference computation disabled: it must read the stored values."""
  root = tmp_path_factory.mktemp("dpo_runs")
  pairs = write_pairs(root / "pairs.jsonl", 24)
  config = small_config(tiny_hf_model.path, pairs)
  main.run_phase("dpo", config, root / "straight")

  real_batches, real_reference = batching.pair_batches, dpo.reference_logps

  def preempted_after_three(*args, **kwargs):
    for step, batch in enumerate(real_batches(*args, **kwargs), start=1):
      if step == 4:
        raise Preempted  # Mid-run failure: the step-2 checkpoint is all that is left.
      yield batch

  def no_recomputation(*args, **kwargs):
    raise AssertionError("the resumed run computed the reference log-probabilities again")

  batching.pair_batches = preempted_after_three
  try:
    with pytest.raises(Preempted):
      main.run_phase("dpo", config, root / "resumed")
  finally:
    batching.pair_batches = real_batches
  ckpts = checkpoints.Checkpoints(root / "resumed" / "dpo" / "checkpoint", create=False)
  assert ckpts.latest_step() == 2 and not ckpts.manifest()["finished"]
  ckpts.close()
  stored = dict(np.load(root / "resumed" / "dpo" / dpo_phase.REFERENCE_FILE))
  dpo.reference_logps = no_recomputation
  try:
    main.run_phase("dpo", config, root / "resumed")
  finally:
    dpo.reference_logps = real_reference
  return root, config, stored


def test_resume_is_bit_exact_and_reads_the_stored_reference(runs):
  root, _, stored_before_resume = runs
  straight = checkpoints.load_model(root / "straight" / "dpo")
  resumed = checkpoints.load_model(root / "resumed" / "dpo")
  assert resumed["manifest"]["finished"] and resumed["manifest"]["step"] == 4
  for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same metrics after the resume point (the data position and the RNG restored).
  after = lambda run: [m for m in read_metrics(root / run / "dpo") if m["step"] > 2]
  drop_rate = lambda m: {k: v for k, v in m.items() if not k.endswith("_per_second")}
  assert [drop_rate(m) for m in after("resumed")] == [drop_rate(m) for m in after("straight")]
  stored = np.load(root / "resumed" / "dpo" / dpo_phase.REFERENCE_FILE)
  for name in ("train", "held_out", "fingerprint"):
    np.testing.assert_array_equal(stored[name], stored_before_resume[name])
  assert stored["train"].shape == (18, 2) and stored["held_out"].shape == (6, 2)
  assert np.all(stored["train"] < 0)


def test_reference_values_are_the_initial_policys_log_probabilities(runs, tiny_hf_model):
  """The stored values against an independent computation: the initial model's summed
  log-probabilities of each response (EOS included), token by token with NumPy."""
  root, config, _ = runs
  stored = np.load(root / "straight" / "dpo" / dpo_phase.REFERENCE_FILE)
  pairs = dpo_phase.preferences.load_phase_pairs(
      config, root / "straight", hf.load_tokenizer(tiny_hf_model.path), None, phase="dpo",
      append_eos=True)
  loaded = checkpoints.load_model(tiny_hf_model.path)
  model = gpt_neo.GPTNeo(loaded["config"])
  eos = loaded["config"].eos_token_id
  for index in (0, 5, 17):
    example = pairs.train[index]
    for side, key in enumerate(("chosen_ids", "rejected_ids")):
      assert example[key][-1] == eos
      tokens = np.concatenate([example["prompt_ids"], example[key]])[None].astype(np.int32)
      logits = model.apply({"params": loaded["params"]}, tokens, np.ones_like(tokens))["logits"]
      log_p = scipy.special.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
      start = len(example["prompt_ids"])
      expected = sum(log_p[t - 1, tokens[0, t]] for t in range(start, tokens.shape[1]))
      assert stored["train"][index, side] == pytest.approx(expected, abs=1e-4)


def test_logs_trls_metric_names_for_training_and_held_out_pairs(runs):
  root, _, _ = runs
  metrics = read_metrics(root / "straight" / "dpo")
  train = [m for m in metrics if "loss" in m]
  evals = [m for m in metrics if "eval/loss" in m]
  assert [m["step"] for m in train] == [1, 2, 3, 4] and [m["step"] for m in evals] == [0, 2, 4]
  for m in train:
    assert set(TRL_NAMES) | {"logps/chosen", "logps/rejected", "grad_norm"} <= set(m), m
  for m in evals:
    assert {f"eval/{name}" for name in TRL_NAMES} <= set(m), m
  # Before any update the policy is the reference: every implicit reward is 0, the loss log 2.
  first = evals[0]
  assert first["eval/loss"] == pytest.approx(np.log(2), abs=1e-6)
  assert first["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
  assert first["eval/rewards/accuracies"] == 0.0
  manifest = checkpoints.describe_model(root / "straight" / "dpo")["manifest"]
  assert manifest["phase"] == "dpo" and manifest["kind"] == hf.CAUSAL_LM


@pytest.mark.slow  # A fourth phase run; test_dpo.py's loss-falls test covers the learning faster.
def test_a_short_run_learns_its_preferences(tmp_path, tiny_hf_model):
  pairs = write_pairs(tmp_path / "pairs.jsonl", 64)
  config = small_config(tiny_hf_model.path, pairs, steps=30, log_every=10, eval_every=0,
                        save_every=0)
  config.train.batch_size = 8
  config.optim.lr = 3e-3
  main.run_phase("dpo", config, tmp_path)
  metrics = read_metrics(tmp_path / "dpo")
  evals = [m for m in metrics if "eval/loss" in m]
  start, end = evals[0], evals[-1]
  assert end["eval/rewards/accuracies"] >= 0.9, end
  assert end["eval/rewards/margins"] > start["eval/rewards/margins"] + 0.5, (start, end)
  assert end["eval/loss"] < 0.5 * start["eval/loss"], (start, end)
  train = [m for m in metrics if "loss" in m]
  assert train[-1]["rewards/accuracies"] > train[0]["rewards/accuracies"]


def test_export_loads_as_transformers_causal_lm_with_the_same_logits(runs):
  import torch
  import transformers
  root, _, _ = runs
  export = export_config.get_config()
  export.checkpoint, export.hf_out = str(root / "straight" / "dpo"), str(root / "hf")
  main.run_phase("export", export, root)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
  assert isinstance(hf_model, transformers.GPTNeoForCausalLM)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(root / "hf")
  ids = np.asarray([hf_tokenizer("Question 3?\nYes, the lazy dog.")["input_ids"]], np.int32)
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  loaded = checkpoints.load_model(root / "straight" / "dpo")
  ours = gpt_neo.GPTNeo(loaded["config"]).apply({"params": loaded["params"]}, ids,
                                                np.ones_like(ids))["logits"]
  np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-4, rtol=1e-4)


def test_eval_finds_the_dpo_system(runs):
  root, _, _ = runs
  found = eval_phase.optional_policy_paths(eval_config.get_config(), root / "straight")
  assert ("DPO", str(root / "straight" / "dpo")) in found


def test_a_bad_pair_names_its_file_and_line(tmp_path, tiny_hf_model):
  pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
  lines = pairs.read_text().splitlines()
  lines[4] = json.dumps({"prompt": "Q?\n", "chosen": "Same.", "rejected": "Same."})
  pairs.write_text("\n".join(lines) + "\n")
  with pytest.raises(UserError, match=f"{pairs}:5: .*identical"):
    main.run_phase("dpo", small_config(tiny_hf_model.path, pairs), tmp_path)
  assert not (tmp_path / "dpo" / dpo_phase.REFERENCE_FILE).exists()


def test_stored_reference_of_other_pairs_stops_a_resume(runs, tmp_path, tiny_hf_model):
  """A partial run whose stored reference values belong to other pairs is not resumed on them."""
  root, _, _ = runs
  shutil.copytree(root / "straight" / "dpo", tmp_path / "dpo")  # Its checkpoint and its values.
  other = small_config(tiny_hf_model.path, write_pairs(tmp_path / "other.jsonl", 30))
  pairs = dpo_phase.preferences.load_phase_pairs(other, tmp_path, hf.load_tokenizer(
      tiny_hf_model.path), None, phase="dpo", append_eos=True)
  with pytest.raises(UserError, match="belong to other pairs"):
    dpo_phase.load_or_compute_reference(other, tmp_path / "dpo", str(tiny_hf_model.path), pairs,
                                        pad_id=0, mesh=None)
