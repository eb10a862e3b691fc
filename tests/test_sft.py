"""Tests of SFT (rlhf_jax/training/sft.py and the phase, rlhf_jax/phases/sft.py): the loss is on
response tokens only, packing gives the unpacked loss, a small set is overfitted, and the phase end
to end: through the phase table in process (files, export, skip when finished, Dolly records) and the binary in
a subprocess (SIGTERM then resume, a malformed records file)."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoints
from rlhf_jax import main
from rlhf_jax.configs import common
from rlhf_jax.configs import export as export_config
from rlhf_jax.configs import init as init_config
from rlhf_jax.configs import sft as sft_config
from rlhf_jax.data import batching
from rlhf_jax.data import builtin
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import sft

REPO = pathlib.Path(__file__).resolve().parents[1]
# Row length for built-in records with the tiny byte-level tokenizer (few merges, long sequences).
LENGTH = 128


def builtin_examples(tokenizer, count: int, max_length: int = LENGTH) -> list[dict]:
  records = builtin.generate(0, num_train=max(count, 16), num_eval=4)["train"][:count]
  examples, stats = batching.tokenize_sft_examples(tokenizer, records, max_length=max_length)
  assert stats["examples"] == count and not stats["truncated_responses"]
  return examples


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
  return hf.load_tokenizer(tiny_tokenizer_dir)


def compiled_init(model: gpt_neo.GPTNeo, seed: int = 0):
  return jax.jit(lambda rng: gpt_neo.init_params(model, rng))(jax.random.key(seed))


# ---------------------------------------------------------------------------------------------
# The loss.


class HiddenAsParams:
  """Stands in for the model: its final hidden states are the parameter `hidden`, and its LM head
  is `wte.embedding` as in GPT-Neo, so the test sets the logits and reads exact gradients."""

  def apply(self, variables, input_ids, segment_ids, positions, *, deterministic, rngs, lm_head):
    del input_ids, segment_ids, positions, deterministic, rngs
    assert not lm_head  # sft computes the head itself, only where the loss needs it.
    return {"hidden": variables["params"]["hidden"]}


def examples_by_row(batch: dict, examples: list[dict]) -> list[dict]:
  """The example in each (unpacked) row, found by its tokens."""
  by_tokens = {np.concatenate([e["prompt_ids"], e["response_ids"]]).tobytes(): e for e in examples}
  rows = []
  for ids, segments in zip(batch["input_ids"], batch["segment_ids"]):
    rows.append(by_tokens[ids[segments > 0].tobytes()])
  return rows


@pytest.mark.parametrize("logits_budget, groups", [(None, 1), (64 * 320, 1), (64 * 320, 4)],
                         ids=["one_chunk", "chunks_of_64", "chunks_of_64_per_row"])
def test_loss_and_gradients_only_on_response_tokens(tokenizer, logits_budget, groups,
                                                    monkeypatch):
  """Loss, d loss / d hidden and d loss / d head against NumPy: prompt and padding positions get
  exactly zero gradient. With a small logits budget the head runs in chunks of 64 tokens, some of
  them without any response token (skipped); with 4 groups each row is sorted on its own (as
  each data-parallel device does with its rows)."""
  if logits_budget is not None:
    monkeypatch.setattr(sft, "_LOGITS_BUDGET", logits_budget)
  examples = builtin_examples(tokenizer, 4)
  batch = next(batching.sft_batches(examples, batch_size=4, max_length=LENGTH,
                                    pad_id=tokenizer.eos_token_id, seed=0))
  vocab, width = len(tokenizer), 16
  rng = np.random.default_rng(0)
  params = {"hidden": rng.normal(size=(4, LENGTH, width)).astype(np.float32),
            "wte": {"embedding": rng.normal(size=(vocab, width)).astype(np.float32) / 2}}
  loss, grads = jax.value_and_grad(
      lambda p: sft.sft_loss(HiddenAsParams(), p, batch, None, groups=groups)[0])(params)

  # The response positions, rebuilt from the examples: position t predicts token t + 1.
  mask = np.zeros((4, LENGTH), bool)
  for row, example in enumerate(examples_by_row(batch, examples)):
    prompt, response = len(example["prompt_ids"]), len(example["response_ids"])
    mask[row, prompt - 1:prompt + response - 1] = True
    np.testing.assert_array_equal(batch["targets"][row, mask[row]], example["response_ids"])
  np.testing.assert_array_equal(batch["loss_mask"], mask.astype(np.float32))
  if logits_budget is not None:
    assert sft.loss_chunk_size(vocab) == 64 and mask.sum() < 4 * LENGTH - 64

  hidden, head = params["hidden"].astype(np.float64), params["wte"]["embedding"].astype(np.float64)
  logits = hidden @ head.T
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  one_hot = np.eye(vocab)[batch["targets"]]
  nll = -(log_probs * one_hot).sum(-1)
  np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-6)
  d_logits = np.where(mask[..., None], np.exp(log_probs) - one_hot, 0.0) / mask.sum()
  np.testing.assert_allclose(grads["hidden"], d_logits @ head, atol=1e-7)
  np.testing.assert_allclose(grads["wte"]["embedding"],
                             np.einsum("btv,btd->vd", d_logits, hidden), atol=1e-6)
  assert np.all(np.asarray(grads["hidden"])[~mask] == 0.0)  # Exactly: prompts teach nothing.

  # The per-token path (evaluation; differentiable through recomputed chunks) agrees too.
  sums = sft.sft_eval_sums(HiddenAsParams(), params, batch, groups=groups)
  np.testing.assert_allclose(sums["nll"], nll[mask].sum(), rtol=1e-6)
  assert sums["tokens"] == mask.sum()
  nll_per_token = sft.token_losses(HiddenAsParams(), params, batch, groups=groups)[0]
  np.testing.assert_allclose(nll_per_token, np.where(mask, nll, 0.0), rtol=1e-5, atol=1e-6)
  per_token_grads = jax.grad(lambda p: jnp.sum(
      sft.token_losses(HiddenAsParams(), p, batch, groups=groups)[0]) / mask.sum())(params)
  np.testing.assert_allclose(per_token_grads["hidden"], d_logits @ head, atol=1e-7)
  np.testing.assert_allclose(per_token_grads["wte"]["embedding"],
                             np.einsum("btv,btd->vd", d_logits, hidden), atol=1e-6)


def test_prompt_targets_do_not_change_the_loss(tokenizer):
  """With the real model: rewriting every target outside the responses leaves the loss bit-equal;
  rewriting one response target changes it. The loss equals a NumPy mean over response tokens."""
  model = gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=len(tokenizer), hidden_size=32,
                                             max_position_embeddings=LENGTH, initializer_range=0.2))
  params = compiled_init(model)
  examples = builtin_examples(tokenizer, 4)
  batch = next(batching.sft_batches(examples, batch_size=4, max_length=LENGTH,
                                    pad_id=tokenizer.eos_token_id, seed=0))
  loss_fn = jax.jit(lambda b: sft.sft_loss(model, params, b, None)[0])
  loss = float(loss_fn(batch))

  outside = batch["loss_mask"] == 0
  rng = np.random.default_rng(1)
  changed = dict(batch, targets=np.where(outside, rng.integers(0, len(tokenizer), outside.shape),
                                         batch["targets"]).astype(np.int32))
  assert (changed["targets"] != batch["targets"]).sum() > 50
  assert float(loss_fn(changed)) == loss

  row, column = np.argwhere(~outside)[3]
  one_response_target = {k: v.copy() for k, v in batch.items()}
  one_response_target["targets"][row, column] = (batch["targets"][row, column] + 1) % len(tokenizer)
  assert abs(float(loss_fn(one_response_target)) - loss) > 1e-4

  logits = np.asarray(jax.jit(lambda b: model.apply(
      {"params": params}, b["input_ids"], b["segment_ids"], b["positions"])["logits"])(batch),
                      np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, nll[~outside].mean(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Packing.


def numbered_examples(count: int, vocab: int, seed: int) -> list[dict]:
  """Random examples whose first token is their index, so a packed segment names its example."""
  rng = np.random.default_rng(seed)
  examples = []
  for index in range(count):
    prompt = np.concatenate([[index], rng.integers(0, vocab - 1, rng.integers(1, 8))])
    response = np.append(rng.integers(0, vocab - 1, rng.integers(1, 10)), vocab - 1)
    examples.append({"prompt_ids": prompt.astype(np.int32),
                     "response_ids": response.astype(np.int32), "truncated": False})
  return examples


def per_segment_nll(token_nll: np.ndarray, batch: dict) -> list[tuple[int, float]]:
  """(example index, summed response NLL) for every segment of every row."""
  sums = []
  for row in range(batch["input_ids"].shape[0]):
    for segment in range(1, batch["segment_ids"][row].max() + 1):
      columns = batch["segment_ids"][row] == segment
      example = int(batch["input_ids"][row][columns][0])
      sums.append((example, float((token_nll[row] * batch["loss_mask"][row])[columns].sum())))
  return sums


def test_packed_loss_equals_unpacked():
  """Summed response NLL per example is the same packed or not: segment masks (global and local
  attention) and per-segment positions isolate the examples sharing a row."""
  vocab, length, rows, count = 64, 48, 4, 20
  model = gpt_neo.GPTNeo(gpt_neo.tiny_config(
      vocab_size=vocab, hidden_size=32, num_heads=4, window_size=4,
      max_position_embeddings=length, initializer_range=0.3))
  params = compiled_init(model)
  examples = numbered_examples(count, vocab, seed=0)
  nll_fn = jax.jit(lambda b: sft.token_losses(model, params, b)[0])
  batch_args = dict(batch_size=rows, max_length=length, pad_id=vocab - 1)

  unpacked = {}
  for batch in batching.eval_batches(examples, **batch_args):
    unpacked.update(per_segment_nll(np.asarray(nll_fn(batch)), batch))
  assert sorted(unpacked) == list(range(count))

  packed, packed_batches = [], []
  for batch in batching.sft_batches(examples, seed=3, pack=True, **batch_args):
    packed_batches.append(batch)
    packed += per_segment_nll(np.asarray(nll_fn(batch)), batch)
    if len({example for example, _ in packed}) == count:
      break
  assert max(b["segment_ids"].max() for b in packed_batches) >= 3  # Rows really are packed.
  for example, total in packed:
    np.testing.assert_allclose(total, unpacked[example], rtol=1e-5, atol=1e-5,
                               err_msg=f"example {example}")
  np.testing.assert_allclose(sum(total for _, total in packed[:count]),
                             sum(unpacked.values()), rtol=1e-5)

  # The comparison is sensitive to both mechanisms: positions counted across the row, or one
  # segment for the whole row, change the packed losses.
  def max_difference(transform) -> float:
    worst = 0.0
    for batch in packed_batches:
      for example, total in per_segment_nll(np.asarray(nll_fn(transform(batch))), batch):
        worst = max(worst, abs(total - unpacked[example]))
    return worst

  no_position_reset = lambda b: dict(
      b, positions=np.asarray(gpt_neo.default_positions(jnp.asarray(b["segment_ids"]))))
  one_segment = lambda b: dict(b, segment_ids=(b["segment_ids"] > 0).astype(np.int32))
  assert max_difference(no_position_reset) > 1e-2
  assert max_difference(one_segment) > 1e-2


# ---------------------------------------------------------------------------------------------
# Training.


def test_sft_overfits_a_small_fixed_set(tokenizer):
  examples = builtin_examples(tokenizer, 8)
  model = gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=len(tokenizer), hidden_size=32,
                                             max_position_embeddings=LENGTH))
  steps = 80
  tx = optim.make_optimizer(common.optim(1e-2, warmup_steps=10, schedule="constant"), steps)
  state = jax.jit(lambda: loop.create_train_state(
      gpt_neo.init_params(model, jax.random.key(0)), tx, jax.random.key(1)))()
  step = jax.jit(loop.make_train_step(lambda p, b, r: sft.sft_loss(model, p, b, r), tx),
                 donate_argnums=0)
  batches = batching.sft_batches(examples, batch_size=8, max_length=LENGTH,
                                 pad_id=tokenizer.eos_token_id, seed=0)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, next(batches))
    losses.append(metrics["loss"])
  losses = np.asarray(jax.device_get(losses))
  assert losses[0] > 3.0  # Starts near log(vocab).
  assert losses[-1] < 0.05, losses[-10:]
  assert float(metrics["token_accuracy"]) == 1.0


# ---------------------------------------------------------------------------------------------
# The phase end to end.


def small_builtin_config(steps: int = 4):
  """configs/sft.py on a small slice of the built-in set: seconds instead of minutes."""
  config = sft_config.get_config()
  config.data.num_train, config.data.num_eval = 64, 8
  config.train.update(steps=steps, batch_size=8, log_every=2, eval_every=2, save_every=2)
  config.eval_prompts = 0
  return config


def tensorboard_scalars(phase_dir: pathlib.Path) -> dict[str, list[int]]:
  """{tag: [steps]} from the TensorBoard event files (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  scalars: dict[str, list[int]] = {}
  for path in sorted(phase_dir.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(event.step)
  return scalars


@pytest.mark.slow
def test_phase_writes_metrics_checkpoint_events_and_exports_to_transformers(tmp_path, capsys):
  import torch
  import transformers
  # A smaller built-in model than configs/init.py's (sft finds WORKDIR/init as a user's run would).
  init = init_config.get_config()
  init.data.num_train, init.vocab_size = 64, 512
  init.arch.update(hidden_size=32, num_layers=2, attention_layers=("global", "local"))
  main.run_phase("init", init, tmp_path)
  main.run_phase("sft", small_builtin_config(), tmp_path)
  phase_dir = tmp_path / "sft"

  # metrics.jsonl: one object per logged step with `step`, training `loss`, and `eval/loss`.
  metrics = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
  train_steps = [m["step"] for m in metrics if "loss" in m]
  eval_steps = [m["step"] for m in metrics if "eval/loss" in m]
  assert train_steps == [2, 4] and eval_steps == [0, 2, 4], metrics
  assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
  scalars = tensorboard_scalars(phase_dir)
  assert scalars["loss"] == [2, 4] and scalars["eval/loss"] == [0, 2, 4], scalars

  ckpts = checkpoints.Checkpoints(phase_dir / "checkpoint", create=False)
  assert ckpts.latest_step() == 4 and ckpts.manifest()["finished"]
  assert ckpts.manifest()["phase"] == "sft" and ckpts.manifest()["kind"] == hf.CAUSAL_LM
  ckpts.close()
  assert (phase_dir / "checkpoint" / "tokenizer").is_dir()

  # Rerunning the finished phase is skipped, with a message, and changes nothing.
  before = (phase_dir / "metrics.jsonl").read_text()
  capsys.readouterr()
  main.run_phase("sft", small_builtin_config(), tmp_path)
  assert "holds a finished run (step 4); skipping" in capsys.readouterr().out
  assert (phase_dir / "metrics.jsonl").read_text() == before

  # Export: transformers loads the directory and computes the logits our model computes.
  export = export_config.get_config()
  export.checkpoint, export.hf_out = str(phase_dir / "checkpoint"), str(tmp_path / "hf")
  main.run_phase("export", export, tmp_path)
  hf_model = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "hf").eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  assert (tmp_path / "hf" / "PROMPT_TEMPLATE.md").is_file()
  prompt = batching.format_prompt("What is the capital of France?") + "Paris."
  ids = np.asarray([hf_tokenizer(prompt)["input_ids"]], np.int32)
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  loaded = checkpoints.load_model(phase_dir / "checkpoint")
  ours = gpt_neo.GPTNeo(loaded["config"]).apply({"params": loaded["params"]}, ids,
                                                np.ones_like(ids))["logits"]
  np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-4, rtol=1e-4)


def binary(*args: str) -> list[str]:
  return [sys.executable, "-m", "rlhf_jax.main", *args]


def run_binary(args: list[str], **kwargs) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        **kwargs)


def error_lines(stderr: str) -> list[str]:
  """The user-facing error lines (absl's INFO/WARNING log lines share stderr)."""
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tiny_hf_model(make_hf_gpt_neo, tiny_tokenizer_dir, tokenizer):
  """A tiny random HF GPT-Neo with the tiny tokenizer saved next to it (EOS is id 0)."""
  return make_hf_gpt_neo(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=LENGTH, tokenizer_dir=tiny_tokenizer_dir)


@pytest.mark.slow
def test_sigterm_saves_and_rerun_finishes(tmp_path, tiny_hf_model):
  steps = 60
  command = binary("--phase=sft", f"--workdir={tmp_path}",
                   f"--config.init_checkpoint={tiny_hf_model.path}", f"--config.max_length={LENGTH}",
                   "--config.data.num_train=64", "--config.data.num_eval=8",
                   f"--config.train.steps={steps}", "--config.train.batch_size=4",
                   "--config.train.log_every=1", "--config.train.eval_every=0",
                   "--config.train.save_every=0", "--config.eval_prompts=0")
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  with open(tmp_path / "stderr.txt", "w") as stderr:
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr,
                               text=True)
    # Wait (on the output, not the clock) until training is under way, then preempt.
    seen = []
    for line in process.stdout:
      seen.append(line)
      if line.startswith("sft 2/"):
        process.send_signal(signal.SIGTERM)
        break
    seen += process.stdout.readlines()
    returncode = process.wait(timeout=600)
  stderr = (tmp_path / "stderr.txt").read_text()
  assert any(line.startswith("sft 2/") for line in seen), "".join(seen) + stderr
  assert returncode != 0
  assert "Traceback" not in stderr
  errors = error_lines(stderr)
  assert len(errors) == 1 and "stopped by SIGTERM at step" in errors[0], stderr
  stopped_at = int(errors[0].split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert 2 <= stopped_at < steps
  ckpts = checkpoints.Checkpoints(tmp_path / "sft" / "checkpoint", create=False)
  assert ckpts.latest_step() == stopped_at and not ckpts.manifest()["finished"]
  ckpts.close()

  rerun = run_binary(command)
  assert rerun.returncode == 0, rerun.stderr
  assert f"sft: resuming from step {stopped_at}" in rerun.stdout
  ckpts = checkpoints.Checkpoints(tmp_path / "sft" / "checkpoint", create=False)
  assert ckpts.latest_step() == steps and ckpts.manifest()["finished"]
  ckpts.close()
  logged = [json.loads(line)["step"] for line in
            (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]
  assert logged == list(range(1, steps + 1))  # Each step logged once across the two runs.


# ---------------------------------------------------------------------------------------------
# Dolly records with the GPT-2 tokenizer.


@pytest.fixture(scope="module")
def gpt2_sized_model(shared_data, make_hf_gpt_neo):
  """A tiny random HF GPT-Neo with GPT-2's vocabulary and tokenizer files saved next to it."""
  return make_hf_gpt_neo(vocab_size=50257, eos_token_id=50256, hidden_size=32,
                         max_position_embeddings=128, window_size=32,
                         tokenizer_dir=shared_data / "gpt2_tokenizer")


@pytest.mark.slow
def test_dolly_records_through_sft(shared_data, gpt2_sized_model, tmp_path, capsys):
  config = sft_config.get_config()
  config.init_checkpoint = str(gpt2_sized_model.path)
  config.data.source = str(shared_data / "dolly" / "dolly_sample_1k.jsonl")
  config.data.validation_fraction, config.data.test_fraction = 0.01, 0.01
  config.data.skip_bad_records = True  # Some Dolly prompts are longer than 128 tokens.
  config.max_length = 128
  config.eval_prompts = 0
  config.train.update(steps=3, batch_size=4, log_every=1, eval_every=0, save_every=0)
  main.run_phase("sft", config, tmp_path)
  out = capsys.readouterr().out
  assert "training examples" in out and "sft: done" in out
  stats_line = next(line for line in out.splitlines() if "training examples" in line)
  assert "prompt_too_long" in stats_line  # The skipped records are counted and reported.
  metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
  losses = [m["loss"] for m in metrics if "loss" in m]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert np.log(50257) - 3 < losses[0] < np.log(50257) + 8  # A random model over GPT-2's vocab.
  assert any("eval/loss" in m for m in metrics)
  info = checkpoints.describe_model(tmp_path / "sft")
  assert info["config"].vocab_size == 50257 and info["manifest"]["finished"]
  assert hf.load_tokenizer(info["tokenizer_dir"])("Hello world")["input_ids"] == [15496, 995]


def test_malformed_records_file_fails_with_file_and_line(shared_data, gpt2_sized_model, tmp_path):
  lines = (shared_data / "dolly" / "dolly_sample_1k.jsonl").read_text().splitlines()[:5]
  broken = json.loads(lines[2])
  del broken["response"]
  lines[2] = json.dumps(broken)
  bad = tmp_path / "bad.jsonl"
  bad.write_text("\n".join(lines) + "\n")
  result = run_binary(binary("--phase=sft", f"--workdir={tmp_path / 'run'}",
                             f"--config.init_checkpoint={gpt2_sized_model.path}",
                             f"--config.data.source={bad}"))
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  errors = error_lines(result.stderr)
  assert len(errors) == 1, result.stderr
  assert f"{bad}:3" in errors[0] and "response" in errors[0], errors[0]


# Runs with 4 CPU devices (a flag read when JAX starts, hence a subprocess).
_SHARDED_LOSS_SCRIPT = """
import re
import jax, numpy as np
from rlhf_jax import sharding
from rlhf_jax.models import gpt_neo
from rlhf_jax.training import sft
mesh = sharding.make_mesh(data=4, fsdp=1)
model = gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=384, hidden_size=32,
                                           max_position_embeddings=64))
params = jax.jit(lambda: gpt_neo.init_params(model, jax.random.key(0)))()
rows, length, width = 8, 64, 32
rng = np.random.default_rng(0)
ids = rng.integers(0, 384, (rows, length)).astype(np.int32)
batch = dict(input_ids=ids, targets=np.roll(ids, -1, 1),
             segment_ids=np.ones((rows, length), np.int32),
             positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
             loss_mask=(rng.random((rows, length)) < 0.3).astype(np.float32))
grad = lambda groups: jax.jit(jax.value_and_grad(
    lambda p, b: sft.sft_loss(model, p, b, None, groups=groups)[0]))
loss, grads = grad(1)(params, batch)
sharded = (jax.device_put(params, sharding.replicated(mesh)), sharding.shard_batch(batch, mesh))
sharded_loss, sharded_grads = grad(4)(*sharded)
np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)
for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(grads)):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
hlo = grad(4).lower(*sharded).compile().as_text()
largest = 0
for line in hlo.splitlines():
  collective = re.match(
      r"\\s*%\\S+ = (.*?) (all-gather|all-reduce|all-to-all|collective-permute)[-a-z]*\\(", line)
  if collective:  # The output shapes, e.g. "(f32[], f32[384,32]{1,0})".
    for dims in re.findall(r"\\[([0-9,]+)\\]", collective.group(1)):
      largest = max(largest, int(np.prod([int(d) for d in dims.split(",")])))
print("largest collective", largest, "hidden", rows * length * width)
assert largest < rows * length * width
"""


@pytest.mark.slow
def test_sharded_loss_projects_each_devices_own_rows():
  """With the batch split over 4 devices, the loss equals the one-device loss and no device
  receives the hidden states of others' rows: every collective is smaller than them."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_LOSS_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert "largest collective" in result.stdout
