"""Tests of the shared training loop (rlhf_jax/training/loop.py), driven directly from Python.

The loop runs a tiny GPT-Neo on synthetic SFT examples; what is checked: gradient accumulation
equals one large batch, an interrupted run resumes bit-exactly (params, optimizer state, RNG,
data position, metrics), a finished phase is skipped, and a NaN loss stops the run keeping the
last good checkpoint.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.configs import common
from rlhf_jax.data import batching
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import sft

VOCAB = 64
EOS = VOCAB - 1
MAX_LENGTH = 32
BATCH = 4


def tiny_model(dropout: float = 0.0) -> gpt_neo.GPTNeo:
  # A large initial scale makes losses differ clearly between examples (at GPT-Neo's 0.02 every
  # token's loss is close to log(VOCAB), which would hide weighting mistakes).
  config = gpt_neo.tiny_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, window_size=8,
                               max_position_embeddings=MAX_LENGTH, initializer_range=0.3,
                               embed_dropout=dropout, attention_dropout=dropout,
                               resid_dropout=dropout)
  return gpt_neo.GPTNeo(config)


def init_params(model: gpt_neo.GPTNeo, seed: int = 0):
  """`gpt_neo.init_params` compiled (seconds faster than running it op by op)."""
  return jax.jit(lambda rng: gpt_neo.init_params(model, rng))(jax.random.key(seed))


def random_examples(count: int, seed: int) -> list[dict]:
  """SFT examples of random tokens with varied prompt/response lengths (responses end in EOS)."""
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(count):
    prompt = rng.integers(0, EOS, rng.integers(2, 12)).astype(np.int32)
    response = np.append(rng.integers(0, EOS, rng.integers(1, 14)), EOS).astype(np.int32)
    examples.append({"prompt_ids": prompt, "response_ids": response, "truncated": False})
  return examples


def host_tree(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b) -> None:
  """Bit-exact equality of two pytrees with the same structure."""
  leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(host_tree(a))
  leaves_b, tree_b = jax.tree_util.tree_flatten(host_tree(b))
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    assert np.array_equal(x, y), f"differs at {jax.tree_util.keystr(path)}"


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.


def record_gradients() -> optax.GradientTransformation:
  """Passes updates through unchanged and keeps the last ones in its state (to read gradients)."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda updates, state, params=None: (updates, updates))


def relative_error(actual, expected) -> float:
  return float(optax.global_norm(jax.tree.map(jnp.subtract, actual, expected))
               / optax.global_norm(expected))


def test_accumulation_equals_one_large_batch():
  """k micro-batches with different target-token counts give the step of the whole batch."""
  model = tiny_model()
  params = init_params(model)
  examples = random_examples(8, seed=1)
  batch = next(batching.sft_batches(examples, batch_size=8, max_length=MAX_LENGTH, pad_id=EOS,
                                    seed=0))
  loss_fn = lambda p, b, r: sft.sft_loss(model, p, b, None)
  accum = 4
  # Micro-batch i takes rows i, i + k, ...: their target-token counts must differ, otherwise a
  # plain mean of micro-batch means would pass too.
  tokens = [batch["loss_mask"][i::accum].sum() for i in range(accum)]
  assert len(set(tokens)) > 1, tokens

  # SGD, so that parameter differences are not rescaled away as Adam's first step would.
  tx = optax.chain(record_gradients(), optax.sgd(0.1))
  state = loop.create_train_state(params, tx, jax.random.key(0))
  after_1, metrics_1 = jax.jit(loop.make_train_step(loss_fn, tx, 1))(state, batch)
  after_k, metrics_k = jax.jit(loop.make_train_step(loss_fn, tx, accum))(state, batch)
  grads_1, grads_k = after_1.opt_state[0], after_k.opt_state[0]

  np.testing.assert_allclose(metrics_k["loss"], metrics_1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_k["weight"], batch["loss_mask"].sum())
  np.testing.assert_allclose(metrics_k["token_accuracy"], metrics_1["token_accuracy"], rtol=1e-6)
  # float32 summation order differs between the two; the error is rounding only (~1e-6).
  assert relative_error(grads_k, grads_1) < 1e-5
  # Parameters of size ~0.3 agree to ~1e-6 relative (SGD step 0.1 x gradient rounding).
  for p1, pk in zip(jax.tree.leaves(after_1.params), jax.tree.leaves(after_k.params)):
    np.testing.assert_allclose(pk, p1, rtol=1e-6, atol=1e-6)

  # The plain mean of the micro-batches' mean losses is far off: the weighting by target tokens
  # is what makes the combination exact.
  micro_loss = jax.jit(lambda b: loss_fn(params, b, None)[0])
  plain = np.mean([micro_loss({k: v[i::accum] for k, v in batch.items()}) for i in range(accum)])
  assert abs(plain - float(metrics_1["loss"])) > 1e-3


def test_accumulation_rejects_indivisible_batch():
  model = tiny_model()
  batch = next(batching.sft_batches(random_examples(6, seed=2), batch_size=6,
                                    max_length=MAX_LENGTH, pad_id=EOS, seed=0))
  with pytest.raises(UserError, match="accum_steps=4"):
    loop.accumulate_gradients(lambda p, b, r: sft.sft_loss(model, p, b, None),
                              gpt_neo.param_shapes(model), batch, jax.random.key(0), 4)


# ---------------------------------------------------------------------------------------------
# Runs of `loop.train`.


class Interrupted(Exception):
  """Stands in for a crash or preemption in the middle of a run."""


class Runner:
  """Builds everything `loop.train` needs for a tiny SFT run, once, so runs share compilations."""

  def __init__(self, *, steps: int, dropout: float = 0.0, poison_step: int | None = None):
    self.steps = steps
    self.model = tiny_model(dropout)
    self.mesh = sharding.make_mesh()
    self.examples = random_examples(24, seed=3)
    self.eval_examples = random_examples(6, seed=4)
    self.poison_step = poison_step
    self.tx = optim.make_optimizer(common.optim(1e-2, warmup_steps=2), steps)
    rng = jax.random.key(7)
    shapes = gpt_neo.param_shapes(self.model)
    param_shardings = sharding.param_shardings(gpt_neo.logical_axes(self.model), shapes, self.mesh)
    abstract = jax.eval_shape(lambda p: loop.create_train_state(p, self.tx, rng), shapes)
    state_shardings = loop.state_shardings(abstract, param_shardings, self.mesh)
    self.abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract,
        state_shardings)
    # Fresh arrays on every call, as a phase loads them: the loop donates the state to the step.
    init = jax.jit(lambda: loop.create_train_state(
        gpt_neo.init_params(self.model, jax.random.key(0)), self.tx, jax.random.key(7)))
    self.init_state = init

    def loss_fn(p, batch, r):
      loss, metrics = sft.sft_loss(self.model, p, batch, r)
      # `scale` is 1 except at the poisoned step, where NaN reaches loss, gradients and params.
      return loss * batch["scale"][0], metrics

    self.step_fn = loop.make_train_step(loss_fn, self.tx)
    self.evaluator = loop.Evaluator(
        step=lambda p, b: sft.sft_eval_sums(self.model, p, b),
        batches=lambda: batching.eval_batches(self.eval_examples, batch_size=BATCH,
                                              max_length=MAX_LENGTH, pad_id=EOS),
        summarize=sft.summarize_eval)

  def batches(self, log: list, fail_at_step: int | None = None):
    """`start_step -> iterator`; records (step, batch) in `log` and raises before `fail_at_step`."""

    def make(start: int):
      log.append(("start", start))
      data = batching.sft_batches(self.examples, batch_size=BATCH, max_length=MAX_LENGTH,
                                  pad_id=EOS, seed=5, start_step=start)
      for step, batch in enumerate(data, start=start + 1):
        if step == fail_at_step:
          raise Interrupted(f"interrupted before step {step}")
        scale = np.nan if step == self.poison_step else 1.0
        batch["scale"] = np.full((BATCH,), scale, np.float32)
        log.append((step, batch))
        yield batch

    return make

  def train(self, workdir: pathlib.Path, batches, *, save_every: int = 2, log_every: int = 1,
            eval_every: int = 3):
    config = common.train(self.steps, BATCH, log_every=log_every, save_every=save_every,
                          eval_every=eval_every, keep_checkpoints=2)
    return loop.train(
        loop.Run(phase="sft", phase_dir=workdir / "sft", config=config, mesh=self.mesh,
                 manifest=checkpoints.make_manifest(self.model.config, kind=hf.CAUSAL_LM,
                                                    score_head=False, phase="sft")),
        loop.Trainable(abstract_state=self.abstract, init_state=self.init_state,
                       step_fn=self.step_fn),
        loop.Data(batches=batches, count_items=lambda b: float((b["segment_ids"] > 0).sum())),
        loop.Evaluation(evaluator=self.evaluator))


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  lines = (workdir / "sft" / "metrics.jsonl").read_text().splitlines()
  # Throughput is wall-clock dependent; everything else must repeat exactly.
  return [{k: v for k, v in json.loads(line).items() if k != "tok_per_second"} for line in lines]


@pytest.fixture(scope="module")
def runner():
  """One runner for the tests below: the step and eval functions compile once."""
  return Runner(steps=7, dropout=0.1)  # Dropout: resuming must restore the RNG too.


def test_resume_after_interruption_is_bit_exact(runner, tmp_path, capsys):
  straight_log, first_log, resumed_log = [], [], []
  straight = runner.train(tmp_path / "straight", runner.batches(straight_log))

  # Crash while fetching the batch of step 6: the newest checkpoint is step 4.
  with pytest.raises(Interrupted):
    runner.train(tmp_path / "resumed", runner.batches(first_log, fail_at_step=6))
  ckpts = checkpoints.Checkpoints(tmp_path / "resumed" / "sft" / "checkpoint", create=False)
  assert ckpts.latest_step() == 4
  assert not ckpts.manifest()["finished"]
  ckpts.close()
  capsys.readouterr()
  resumed = runner.train(tmp_path / "resumed", runner.batches(resumed_log))
  assert "resuming from step 4" in capsys.readouterr().out

  assert int(resumed.step) == int(straight.step) == runner.steps
  assert_trees_equal(resumed.params, straight.params)
  assert_trees_equal(resumed.opt_state, straight.opt_state)
  assert_trees_equal(resumed.rng, straight.rng)

  # The data position is restored: the resumed run asks for step 4 onwards and gets the
  # batches the uninterrupted run trained on at the same steps.
  assert resumed_log[0] == ("start", 4)
  straight_batches = dict(straight_log[1:])
  assert [step for step, _ in resumed_log[1:]] == list(range(5, runner.steps + 1))
  for step, batch in resumed_log[1:]:
    assert_trees_equal(batch, straight_batches[step])

  # metrics.jsonl reads as if nothing had happened: steps logged after the checkpoint by the
  # interrupted run were dropped and logged again, with the same values.
  assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "straight")

  # The final checkpoint holds the final state and is marked finished.
  ckpts = checkpoints.Checkpoints(tmp_path / "resumed" / "sft" / "checkpoint", create=False)
  assert ckpts.latest_step() == runner.steps and ckpts.manifest()["finished"]
  restored = ckpts.restore(params=runner.abstract.params)["params"]
  ckpts.close()
  assert_trees_equal(restored, straight.params)

  # Run again, the finished phase is skipped: no data read, nothing trained or logged.
  metrics_before = (tmp_path / "resumed" / "sft" / "metrics.jsonl").read_text()
  rerun_log = []
  assert runner.train(tmp_path / "resumed", runner.batches(rerun_log)) is None
  assert f"holds a finished run (step {runner.steps}); skipping" in capsys.readouterr().out
  assert rerun_log == []
  assert (tmp_path / "resumed" / "sft" / "metrics.jsonl").read_text() == metrics_before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(runner, tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "poison_step", 5)
  # Metrics are fetched every 3 steps and at saves: the NaN of step 5 is seen at the save of
  # step 6, which must therefore not happen.
  with pytest.raises(UserError) as error:
    runner.train(tmp_path, runner.batches([]), save_every=2, log_every=3, eval_every=0)
  message = str(error.value)
  assert "loss became nan at step 5" in message
  assert "last good checkpoint (step 4)" in message
  assert str(tmp_path / "sft" / "checkpoint") in message

  ckpts = checkpoints.Checkpoints(tmp_path / "sft" / "checkpoint", create=False)
  assert ckpts.latest_step() == 4
  restored = ckpts.restore(params=runner.abstract.params)["params"]
  ckpts.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(host_tree(restored)))
  # Nothing after the last good step was logged as if it were good.
  logged = {m["step"]: m for m in read_metrics(tmp_path)}
  assert max(logged) == 4 and np.isfinite(logged[4]["loss"])


def test_nan_before_any_checkpoint_then_fresh_rerun(runner, tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "poison_step", 2)
  with pytest.raises(UserError) as error:
    runner.train(tmp_path, runner.batches([]), save_every=0, log_every=1, eval_every=0)
  assert "loss became nan at step 2" in str(error.value)
  assert "no checkpoint was saved" in str(error.value).lower()
  assert checkpoints.find_checkpoint_dir(tmp_path / "sft") is None
  assert [m["step"] for m in read_metrics(tmp_path)] == [0, 1]  # eval at 0, then step 1.

  # The rerun starts fresh and its metrics replace the failed run's (no second step-0 line).
  monkeypatch.setattr(runner, "poison_step", None)
  runner.train(tmp_path, runner.batches([]), save_every=0, log_every=1, eval_every=0)
  steps = [m["step"] for m in read_metrics(tmp_path)]
  assert steps == [0] + list(range(1, runner.steps + 1)) + [runner.steps], steps
