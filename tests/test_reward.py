"""Tests of the reward phase (rlhf_jax/training/reward.py): the Bradley-Terry loss against hand
computation, scores read at the last real token whatever the padding, gradient accumulation,
held-out splits, policy negatives, bad pair files through the binary, resume, export to
transformers, and learning on real HH-RLHF pairs."""

import collections
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoints
from rlhf_jax import main
from rlhf_jax.configs import export as export_config
from rlhf_jax.configs import reward as reward_config
from rlhf_jax.data import batching
from rlhf_jax.data import builtin
from rlhf_jax.data import preferences
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import reward
from conftest import write_pairs  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTH = 48


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
  return hf.load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_reward_model(make_hf_gpt_neo):
  """(our model, its params, the same weights as a transformers GPTNeoForSequenceClassification):
  a random 2-layer reward model; token 0 is EOS = pad, so test sequences avoid it."""
  source = make_hf_gpt_neo(vocab_size=64, hidden_size=32, window_size=4, classifier=True)
  config, params, kind, _ = hf.load_checkpoint(str(source.path))
  assert kind == hf.REWARD
  return gpt_neo.GPTNeo(config, score_head=True), jax.device_put(params), source.model


def pair_batch(rows: list[tuple[list[int], list[int]]], length: int, pad_id: int = 0,
               mask: list[float] | None = None) -> dict:
  """A pairs-first batch from token lists, built here independently of `batching`."""
  batch = {"input_ids": np.full((len(rows), 2, length), pad_id, np.int32),
           "segment_ids": np.zeros((len(rows), 2, length), np.int32),
           "positions": np.zeros((len(rows), 2, length), np.int32),
           "response_length": np.zeros((len(rows), 2), np.int32),
           "pair_mask": np.asarray(mask or [1.0] * len(rows), np.float32),
           "strategy": np.zeros((len(rows),), np.int32)}
  for b, sides in enumerate(rows):
    for side, tokens in enumerate(sides):
      batch["input_ids"][b, side, :len(tokens)] = tokens
      batch["segment_ids"][b, side, :len(tokens)] = 1
      batch["positions"][b, side, :len(tokens)] = np.arange(len(tokens))
      batch["response_length"][b, side] = len(tokens)
  return batch


# ---------------------------------------------------------------------------------------------
# The loss and the scores.


def softplus(x: float) -> float:
  return math.log1p(math.exp(x))


def test_loss_equals_hand_computed_values():
  scores = jnp.array([[2.0, 0.5], [-1.0, 0.0], [0.3, 0.3], [9.0, -9.0]])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # The last pair is padding: it must not count.
  loss, metrics = reward.preference_loss(scores, mask)
  # -log sigmoid(d) = log(1 + exp(-d)) for d = 1.5, -1.0, 0.0.
  expected = (softplus(-1.5) + softplus(1.0) + math.log(2.0)) / 3
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["weight"]) == 3
  assert float(metrics["accuracy"]) == pytest.approx((1 + 0 + 0.5) / 3)  # A tie counts one half.
  assert float(metrics["margin"]) == pytest.approx((1.5 - 1.0 + 0.0) / 3)

  loss, metrics = reward.preference_loss(scores, mask, margin=0.5, center_coef=0.1)
  # With margin 0.5: d - 0.5 = 1.0, -1.5, -0.5; centering 0.1 * (r_c + r_r)^2 = 0.625, 0.1, 0.036.
  expected = ((softplus(-1.0) + 0.625) + (softplus(1.5) + 0.1) + (softplus(0.5) + 0.036)) / 3
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["bt_loss"]) == pytest.approx(
      (softplus(-1.0) + softplus(1.5) + softplus(0.5)) / 3, rel=1e-6)


def torch_score(torch_model, tokens: list[int]) -> float:
  """The reward transformers computes for one unpadded sequence (an independent reference)."""
  import torch
  with torch.no_grad():
    return float(torch_model(torch.tensor([list(tokens)], dtype=torch.long)).logits[0, 0])


def test_pair_scores_read_the_last_real_token_whatever_the_padding(tiny_reward_model):
  model, params, torch_model = tiny_reward_model
  rng = np.random.default_rng(0)
  rows = [(list(rng.integers(1, 64, n)), list(rng.integers(1, 64, m)))
          for n, m in ((5, 9), (12, 3), (7, 7))]
  expected = np.array([[torch_score(torch_model, side) for side in pair] for pair in rows])
  # Right-padded, pairs first, one forward pass of the concatenated [2B, T] batch.
  scores = jax.jit(lambda p, b: reward.pair_scores(model, p, b))(params, pair_batch(rows, 16))
  np.testing.assert_allclose(np.asarray(scores), expected, atol=1e-5)
  # Left-padded rows (positions count real tokens) give the same scores.
  flat = [side for pair in rows for side in pair]
  ids = np.zeros((len(flat), 16), np.int32)
  segments = np.zeros_like(ids)
  for row, tokens in enumerate(flat):
    ids[row, 16 - len(tokens):], segments[row, 16 - len(tokens):] = tokens, 1
  out = jax.jit(lambda p, i, s: model.apply({"params": p}, i, s, gpt_neo.default_positions(s),
                                           lm_head=False))(params, ids, segments)
  np.testing.assert_allclose(np.asarray(out["scores"][:, -1]).reshape(-1, 2), expected,
                             atol=1e-5)


def test_lm_regulariser_is_the_chosen_responses_next_token_loss(tiny_reward_model):
  model, params, _ = tiny_reward_model
  rng = np.random.default_rng(2)
  # (prompt, chosen, rejected) token lists; the third pair is padding and must not count.
  triples = [(list(rng.integers(1, 64, p)), list(rng.integers(1, 64, c)),
              list(rng.integers(1, 64, r))) for p, c, r in ((4, 5, 3), (6, 2, 7), (3, 3, 3))]
  batch = pair_batch([(p + c, p + r) for p, c, r in triples], 16, mask=[1, 1, 0])
  batch["response_length"] = np.array([[len(c), len(r)] for _, c, r in triples], np.int32)
  expected_sum, count = 0.0, 0
  for prompt, chosen, _ in triples[:2]:  # Independently: full LM logits of the chosen row alone.
    tokens = np.array([prompt + chosen], np.int32)
    logits = model.apply({"params": params}, tokens, np.ones_like(tokens))["logits"][0]
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    for t in range(len(prompt), len(tokens[0])):  # Response tokens, predicted from t - 1.
      expected_sum -= log_probs[t - 1, tokens[0, t]]
      count += 1
  loss_fn = lambda coef: jax.jit(lambda p, b: reward.reward_loss(model, p, b, None, lm_coef=coef))
  loss, metrics = loss_fn(0.5)(params, batch)
  plain, _ = loss_fn(0.0)(params, batch)
  assert float(metrics["lm_loss"]) == pytest.approx(expected_sum / count, rel=1e-5)
  assert float(loss) == pytest.approx(float(plain) + 0.5 * expected_sum / count, rel=1e-5)


def test_accumulation_and_remat_equal_one_big_batch(tiny_reward_model):
  model, params, _ = tiny_reward_model
  remat_model = model.clone(remat=True)
  rng = np.random.default_rng(1)
  rows = [(list(rng.integers(1, 64, rng.integers(3, 12))),
           list(rng.integers(1, 64, rng.integers(3, 12)))) for _ in range(8)]
  # Padding pairs fall unevenly into the two micro-batches (rows 0,2,4,6 and 1,3,5,7: 3 and 2
  # real pairs), so only a pair-weighted combination equals the big batch.
  batch = pair_batch(rows, 12, mask=[1, 1, 1, 0, 1, 0, 0, 1])
  loss_fn = lambda m: lambda p, b, r: reward.reward_loss(m, p, b, None, margin=0.2,
                                                         center_coef=0.05)
  accumulate = lambda m, k: jax.jit(
      lambda p, b: loop.accumulate_gradients(loss_fn(m), p, b, jax.random.key(0), k))
  grads_1, loss_1, metrics_1 = accumulate(model, 1)(params, batch)
  # Two micro-batches of a rematerialised model: the same gradients as one plain big batch.
  grads_2, loss_2, metrics_2 = accumulate(remat_model, 2)(params, batch)
  assert float(loss_2) == pytest.approx(float(loss_1), rel=1e-5)
  assert float(metrics_2["accuracy"]) == pytest.approx(float(metrics_1["accuracy"]), rel=1e-5)
  assert float(metrics_2["weight"]) == float(metrics_1["weight"]) == 5
  for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_eval_metrics_against_numpy(tiny_reward_model):
  model, params, torch_model = tiny_reward_model
  rng = np.random.default_rng(2)
  rows = [(list(rng.integers(1, 64, rng.integers(2, 14))),
           list(rng.integers(1, 64, rng.integers(2, 14)))) for _ in range(6)]
  batch = pair_batch(rows, 14, mask=[1, 1, 1, 1, 1, 0])
  batch["strategy"] = np.array([2, 2, 1, 3, 2, -1], np.int32)
  sums = jax.jit(lambda p, b: reward.eval_sums(model, p, b))(params, batch)
  metrics = reward.summarize_eval({k: float(v) for k, v in jax.device_get(sums).items()})
  scores = np.array([[torch_score(torch_model, side) for side in pair] for pair in rows[:5]])
  lengths = np.array([[len(side) for side in pair] for pair in rows[:5]], np.float64)
  difference = scores[:, 0] - scores[:, 1]
  assert metrics["accuracy"] == pytest.approx(np.mean(difference > 0))
  assert metrics["margin"] == pytest.approx(np.mean(difference), abs=1e-5)
  won_by_length = np.where(lengths[:, 0] == lengths[:, 1], 0.5, lengths[:, 0] > lengths[:, 1])
  assert metrics["length_baseline_accuracy"] == pytest.approx(np.mean(won_by_length))
  assert metrics["length_correlation"] == pytest.approx(
      np.corrcoef(scores.ravel(), lengths.ravel())[0, 1], abs=1e-4)
  corrupted = [0, 1, 4]
  assert metrics["accuracy/corrupted"] == pytest.approx(np.mean(difference[corrupted] > 0))
  assert metrics["accuracy/other_response"] == float(difference[2] > 0)
  assert "accuracy/human" not in metrics  # Only strategies present in the held-out pairs.


# ---------------------------------------------------------------------------------------------
# Preference data.


def test_hh_held_out_split_shares_no_prompt_and_keeps_dialogue_ends(shared_data):
  path = shared_data / "preferences" / "hh_rlhf_helpful_base_sample_1k.jsonl"
  pairs, _ = preferences.load_pairs(str(path), skip_bad_records=True)
  # Two pairs with one prompt must land on the same side of the split.
  pairs = pairs + [dict(pairs[0], chosen=" Another answer.", location="extra:1")]
  train, held_out = preferences.split_by_prompt(pairs, 0.2, seed=0)
  assert len(train) + len(held_out) == len(pairs)
  assert not {p["prompt"] for p in train} & {p["prompt"] for p in held_out}
  prompts = {p["prompt"] for p in pairs}
  assert len({p["prompt"] for p in held_out}) == round(0.2 * len(prompts))
  # Long dialogues keep their end: the last "\n\nAssistant:" and both whole responses.
  gpt2 = hf.load_tokenizer(shared_data / "gpt2_tokenizer")
  examples, stats = batching.tokenize_pairs(gpt2, pairs[:200], max_length=160,
                                            too_long="truncate_prompt", skip_bad_records=True)
  assert stats["truncated_prompts"] > 0 and stats["truncated_responses"] == 0
  kept = [p for p in pairs[:200] if len(gpt2(p["chosen"])["input_ids"]) < 160
          and len(gpt2(p["rejected"])["input_ids"]) < 160]
  assert len(examples) == len(kept) and stats["skipped"] == {"too_long": 200 - len(kept)}
  for example, pair in zip(examples, kept):
    prompt_ids = gpt2(pair["prompt"])["input_ids"]
    assert example["prompt_ids"].tolist() == prompt_ids[len(prompt_ids) - len(example["prompt_ids"]):]
    if len(example["prompt_ids"]) >= 4:  # "\n\nAssistant:" is 4 tokens.
      assert gpt2.decode(example["prompt_ids"]).endswith("\n\nAssistant:")
    assert gpt2.decode(example["chosen_ids"]) == pair["chosen"]
    assert gpt2.decode(example["rejected_ids"]) == pair["rejected"]
    assert len(example["prompt_ids"]) + max(len(example["chosen_ids"]),
                                            len(example["rejected_ids"])) <= 160


def test_hh_file_pairs_train_in_length_grouped_batches(shared_data, monkeypatch):
  """A pairs file (HH dialogues, the hh_rlhf variant) goes through the same length-grouped
  batches as built pairs (`batching.training_pair_batches`, what the phase trains on): an epoch
  holds every pair once, each batch is padded to its longest pair rounded up to 16, far below
  max_length on average, and each pair's loss is the same as in the batch padded to max_length."""
  monkeypatch.setenv("RLHF_JAX_DATA", str(shared_data))
  config = reward_config.get_config("hh_rlhf")
  config.pairs.source = str(shared_data / "preferences" / "hh_rlhf_helpful_base_sample_1k.jsonl")
  assert config.max_length == 256 and config.group_by_length > 0
  gpt2 = hf.load_tokenizer(shared_data / "gpt2_tokenizer")
  train, _, _ = preferences.load_preference_pairs(config, sampler_factory=None)
  examples, _ = batching.tokenize_pairs(gpt2, train, max_length=config.max_length,
                                        too_long=config.pairs.too_long, skip_bad_records=True)
  config.train.batch_size = 16
  epoch = len(examples) // 16
  batches = list(itertools.islice(batching.training_pair_batches(examples, config, pad_id=50256),
                                  epoch))
  widths = [b["input_ids"].shape[-1] for b in batches]
  lengths = [int(b["segment_ids"].sum(-1).max()) for b in batches]
  assert all(w % batching.PAD_MULTIPLE == 0 and n <= w < n + batching.PAD_MULTIPLE
             for w, n in zip(widths, lengths)), (widths, lengths)
  # Padding: the share of the batches' tokens that are filler, grouped and at max_length.
  real = sum(int(b["segment_ids"].sum()) for b in batches)
  grouped_padding = 1 - real / sum(b["input_ids"].size for b in batches)
  full_padding = 1 - real / (epoch * 16 * 2 * config.max_length)
  assert np.mean(widths) < 0.8 * config.max_length, widths
  assert grouped_padding < 0.5 * full_padding, (grouped_padding, full_padding)
  side = lambda b, k, j: tuple(b["input_ids"][k, j, :int(b["segment_ids"][k, j].sum())].tolist())
  seen = collections.Counter((side(b, k, 0), side(b, k, 1)) for b in batches for k in range(16))
  whole = collections.Counter(
      (tuple(np.concatenate([e["prompt_ids"], e["chosen_ids"]]).tolist()),
       tuple(np.concatenate([e["prompt_ids"], e["rejected_ids"]]).tolist())) for e in examples)
  assert sum(seen.values()) == epoch * 16 and not seen - whole

  model_config = gpt_neo.tiny_config(vocab_size=50257, hidden_size=32, window_size=256,
                                     attention_layers=("global", "local"))
  model = gpt_neo.GPTNeo(model_config, score_head=True)
  params = gpt_neo.init_params(model, jax.random.key(0))
  per_pair = jax.jit(lambda batch: -jax.nn.log_sigmoid(
      jnp.subtract(*reward.pair_scores(model, params, batch).T)))
  loss = jax.jit(lambda batch: reward.reward_loss(model, params, batch, None)[0])
  for batch in [b for b in batches if b["input_ids"].shape[-1] < config.max_length][:3]:
    padded = batching.pad_pair_batch(batch, config.max_length, 50256)
    assert padded["input_ids"].shape[-1] == 256 > batch["input_ids"].shape[-1]
    np.testing.assert_allclose(per_pair(batch), per_pair(padded), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss(batch), loss(padded), rtol=1e-5, atol=1e-6)


def test_correct_policy_samples_are_resampled_then_replaced():
  records = builtin.generate(0, num_train=40, num_eval=4)["train"][:12]
  calls = []

  def sample_fn(batch, seed):
    calls.append((len(batch), seed))
    # Draw d of record i is correct while d < i % 3, then wrong.
    draws = [batch[:k].count(r) for k, r in enumerate(batch)]
    return [r["response"] if d < records.index(r) % 3 else
            builtin.corrupt(r, np.random.default_rng(d)) for r, d in zip(batch, draws)]

  pairs, stats = preferences.build_instruction_pairs(
      records, strategies={"policy_sample": 1.0}, copies=1, seed=5, corrupt_fn=builtin.corrupt,
      sample_fn=sample_fn, is_correct=builtin.check_answer, policy_tries=2)
  assert calls == [(24, 5)]  # Every draw in one call: one compiled sampler shape.
  # i % 3 == 0: the first draw is wrong; 1: the second; 2: both correct -> a corrupted negative.
  assert stats["policy_correct_resampled"] == 4 * 1 + 4 * 2
  assert stats["policy_unusable"] == stats["policy_replaced_by_corrupted"] == 4
  assert stats["by_strategy"] == {"policy_sample": 8, "corrupted": 4}
  assert len(pairs) == 12
  for pair in pairs:
    record = next(r for r in records
                  if batching.format_prompt(r["instruction"], r["context"]) == pair["prompt"])
    assert pair["chosen"] == record["response"]
    assert not builtin.check_answer(record, pair["rejected"])  # Never a correct negative.
    assert pair["strategy"] == ("corrupted" if records.index(record) % 3 == 2
                                else "policy_sample")


# ---------------------------------------------------------------------------------------------
# The phase.


@pytest.fixture(scope="module")
def tiny_hf_model(make_hf_gpt_neo, tiny_tokenizer_dir, tokenizer):
  """A tiny random HF GPT-Neo (a policy) with the tiny tokenizer saved next to it."""
  return make_hf_gpt_neo(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=64, tokenizer_dir=tiny_tokenizer_dir)




def small_config(init: pathlib.Path, pairs: pathlib.Path, steps: int = 4):
  config = reward_config.get_config()
  config.init_checkpoint = str(init)
  config.pairs.source = str(pairs)
  config.pairs.eval_fraction = 0.25
  config.max_length = LENGTH
  config.train.update(steps=steps, batch_size=4, log_every=1, eval_every=2, save_every=2)
  config.eval_batch_size = 4
  config.stats_samples = 10
  return config


class Preempted(Exception):
  pass


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_hf_model):
  """A 4-step reward run on a pairs file, and the same run interrupted after step 3 and
  resumed (checkpoint at step 2)."""
  root = tmp_path_factory.mktemp("reward_runs")
  pairs = write_pairs(root / "pairs.jsonl", 24)
  config = small_config(tiny_hf_model.path, pairs)
  main.run_phase("reward", config, root / "straight")

  real = batching.pair_batches

  def preempted_after_three(*args, **kwargs):
    for step, batch in enumerate(real(*args, **kwargs), start=1):
      if step == 4:
        raise Preempted  # Mid-run failure: the step-2 checkpoint is all that is left.
      yield batch

  batching.pair_batches = preempted_after_three
  try:
    with pytest.raises(Preempted):
      main.run_phase("reward", config, root / "resumed")
  finally:
    batching.pair_batches = real
  ckpts = checkpoints.Checkpoints(root / "resumed" / "reward" / "checkpoint", create=False)
  assert ckpts.latest_step() == 2 and not ckpts.manifest()["finished"]
  ckpts.close()
  main.run_phase("reward", config, root / "resumed")
  return root, config


def test_resume_gives_the_same_params_bit_exact(finished_run):
  root, _ = finished_run
  straight = checkpoints.load_model(root / "straight" / "reward")
  resumed = checkpoints.load_model(root / "resumed" / "reward")
  assert resumed["manifest"]["finished"] and resumed["manifest"]["step"] == 4
  for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["manifest"]["reward_stats"] == straight["manifest"]["reward_stats"]


@pytest.fixture(scope="module")
def exported(finished_run):
  """The finished reward checkpoint exported with --phase=export, loaded by transformers'
  AutoModelForSequenceClassification: (torch model, HF tokenizer)."""
  import transformers
  root, _ = finished_run
  export = export_config.get_config()
  export.checkpoint, export.hf_out = str(root / "straight" / "reward"), str(root / "hf")
  main.run_phase("export", export, root)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(root / "hf").eval()
  assert isinstance(model, transformers.GPTNeoForSequenceClassification)
  return model, transformers.AutoTokenizer.from_pretrained(root / "hf")


def test_phase_outputs_metrics_and_reward_stats(finished_run, exported, tokenizer, capsys):
  root, config = finished_run
  phase_dir = root / "straight" / "reward"
  metrics = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
  evals = [m for m in metrics if "eval/accuracy" in m]
  assert [m["step"] for m in evals] == [0, 2, 4]
  for key in ("eval/margin", "eval/length_baseline_accuracy", "eval/length_correlation",
              "eval/accuracy/human"):
    assert key in evals[-1], evals[-1]
  final = [m for m in metrics if "reward/mean" in m]
  assert len(final) == 1 and final[0]["step"] == 4
  manifest = checkpoints.describe_model(phase_dir)["manifest"]
  assert manifest["kind"] == hf.REWARD and manifest["score_head"]
  stats = manifest["reward_stats"]
  assert (stats["mean"], stats["std"]) == (final[0]["reward/mean"], final[0]["reward/std"])
  # Independently: transformers scores the distinct chosen responses of the training pairs.
  pairs, _ = preferences.load_pairs(config.pairs.source)
  train, _ = preferences.split_by_prompt(pairs, config.pairs.eval_fraction, config.pairs.seed)
  examples, _ = batching.tokenize_pairs(tokenizer, train, max_length=LENGTH)
  references = reward.reference_examples(examples, config.stats_samples, config.pairs.seed)
  assert len(references) == stats["samples"] == 10
  scores = [torch_score(exported[0], np.concatenate([r["prompt_ids"], r["response_ids"]]))
            for r in references]
  assert stats["mean"] == pytest.approx(np.mean(scores), abs=1e-4)
  assert stats["std"] == pytest.approx(np.std(scores), abs=1e-4)
  # A finished phase is skipped before its data is built.
  capsys.readouterr()
  main.run_phase("reward", config, root / "straight")
  assert "holds a finished run; skipping" in capsys.readouterr().out


def test_export_scores_like_transformers(finished_run, exported):
  import torch
  root, _ = finished_run
  hf_model, hf_tokenizer = exported
  texts = ["Question 1?\nYes, the fox.", "Question 2?\nno", "A longer one: the lazy dog sleeps."]
  encoded = [hf_tokenizer(t)["input_ids"] for t in texts]
  width = max(map(len, encoded))
  ids = np.full((len(texts), width), hf_tokenizer.eos_token_id, np.int32)  # Right-padded.
  segments = np.zeros_like(ids)
  for row, tokens in enumerate(encoded):
    ids[row, :len(tokens)], segments[row, :len(tokens)] = tokens, 1
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids, dtype=torch.long)).logits[:, 0].numpy()
  loaded = checkpoints.load_model(root / "straight" / "reward")
  model = gpt_neo.GPTNeo(loaded["config"], score_head=True)
  ours = jax.jit(lambda p, i, s: gpt_neo.sequence_scores(
      model.apply({"params": p}, i, s, lm_head=False)["scores"], s))(loaded["params"], ids,
                                                                    segments)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad data through the binary.


def run_binary(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_malformed_pair_file_fails_with_file_and_line(tmp_path, tiny_hf_model):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "Q?\n", "chosen": "Yes.", "rejected": "No."}) + "\n"
                 + json.dumps({"prompt": "Q2?\n", "chosen": "Same.", "rejected": "Same."}) + "\n")
  result = run_binary("--phase=reward", f"--workdir={tmp_path / 'run'}",
                      f"--config.init_checkpoint={tiny_hf_model.path}",
                      f"--config.pairs.source={bad}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr
  assert f"{bad}:2:" in errors[0] and "identical" in errors[0], errors[0]


def test_too_long_pair_in_a_file_names_its_line(tmp_path, tiny_hf_model):
  pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
  lines = pairs.read_text().splitlines()
  lines[5] = json.dumps({"prompt": "Q?\n", "chosen": "word " * 60, "rejected": "No."})
  pairs.write_text("\n".join(lines) + "\n")
  config = small_config(tiny_hf_model.path, pairs)
  with pytest.raises(UserError, match=f"{pairs}:6: prompt .* exceed max_length={LENGTH}"):
    main.run_phase("reward", config, tmp_path)


# ---------------------------------------------------------------------------------------------
# Learning on real preference data.


@pytest.mark.slow
def test_training_beats_the_untrained_model_on_hh_pairs(shared_data, make_hf_gpt_neo, tmp_path,
                                                        capsys, monkeypatch):
  init = make_hf_gpt_neo(vocab_size=50257, eos_token_id=50256, hidden_size=32,
                         max_position_embeddings=128, window_size=32,
                         tokenizer_dir=shared_data / "gpt2_tokenizer")
  monkeypatch.setenv("RLHF_JAX_DATA", str(shared_data))  # Where the hh_rlhf variant finds its file.
  config = reward_config.get_config("hh_rlhf")
  config.init_checkpoint = str(init.path)
  config.max_length = 128
  config.train.update(steps=120, batch_size=16, log_every=40, eval_every=0, save_every=0)
  config.stats_samples = 100
  main.run_phase("reward", config, tmp_path)
  out = capsys.readouterr().out
  assert "prefer-the-longer-response baseline" in out and "too_long" in out
  metrics = [json.loads(line) for line in (tmp_path / "reward" / "metrics.jsonl").read_text()
             .splitlines()]
  evals = [m for m in metrics if "eval/accuracy" in m]
  untrained, trained = evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]
  assert trained >= untrained + 0.04, (untrained, trained)
