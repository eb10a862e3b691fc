"""The one training loop every phase runs (SFT, reward, PPO).

A phase supplies pure pieces, grouped as `Run` (where, how long, what is logged), `Trainable`
(state and step), `Data` (batches) and `Evaluation`, and the loop does the rest:
  step_fn(state, batch[, frozen]) -> (state, metrics)   compiled once here (jit, donated state, fixed shapes);
                                              `make_train_step(loss_fn, tx, accum)` builds it from a
                                              `loss_fn(params, batch, rng) -> (loss, metrics)`;
  batches(start_step) -> iterator             host-local numpy batches, resumable at any step;
  eval_step(params, batch) -> sums            optional, compiled once, summed over the eval split.
The loop places batches on the mesh, logs (console, metrics.jsonl, TensorBoard), evaluates, saves
Orbax checkpoints every `save_every` steps and at the end, resumes from the newest checkpoint (params,
optimizer state, step, RNG; the step is the data position), saves and stops on SIGTERM, and stops
with a clear message on a NaN/inf loss, keeping the last good checkpoint.
"""

import contextlib
import dataclasses
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.training import progress

Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: step, params, optimizer state, RNG (key data),
  and `extra` (phase state such as PPO's value model and KL coefficient)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extra: Any


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       extra: Any = None) -> TrainState:
  """A fresh state at step 0 (call under jit with out_shardings to create it sharded)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(rng), extra={} if extra is None else extra)


def accumulate_gradients(loss_fn: Callable, params: Any, batch: Batch, rng: jax.Array,
                         accum_steps: int) -> tuple[Any, jax.Array, dict]:
  """Gradients of `loss_fn` over `batch`, computed in `accum_steps` micro-batches.

  `loss_fn(params, batch, rng) -> (loss, metrics)` returns a mean over its micro-batch; an optional
  `metrics["weight"]` (e.g. its number of target tokens) makes the combination exact: gradients, loss
  and metrics are weight-averaged, so k micro-batches equal one k-times-larger batch.
  Micro-batch i takes rows i, i+k, ... so each device contributes equally without any transfer.

  Returns: (grads, loss, metrics) with metrics["weight"] the summed weight.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, metrics), grads = grad_fn(params, batch, rng)
    return grads, loss, {**metrics, "weight": metrics.get("weight", jnp.ones(()))}
  for name, x in batch.items():
    if x.shape[0] % accum_steps:
      raise UserError(f"batch field {name!r} has {x.shape[0]} rows, not divisible by "
                      f"accum_steps={accum_steps}")
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)
  rngs = jax.random.split(rng, accum_steps)

  def body(carry, inputs):
    grads_sum, loss_sum, metrics_sum, weight_sum = carry
    (loss, metrics), grads = grad_fn(params, *inputs)
    weight = metrics.get("weight", jnp.ones(()))
    grads_sum = jax.tree.map(lambda a, g: a + weight * g, grads_sum, grads)
    metrics_sum = {k: metrics_sum[k] + weight * v for k, v in metrics.items() if k != "weight"}
    return (grads_sum, loss_sum + weight * loss, metrics_sum, weight_sum + weight), None

  first = jax.tree.map(lambda x: x[0], micro)
  _, metric_shapes = jax.eval_shape(loss_fn, params, first, rngs[0])
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()),
          {k: v for k, v in zeros(metric_shapes).items() if k != "weight"}, jnp.zeros(()))
  (grads, loss, metrics, weight), _ = jax.lax.scan(body, init, (micro, rngs))
  denominator = jnp.maximum(weight, 1e-12)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  return grads, loss / denominator, {**{k: v / denominator for k, v in metrics.items()},
                                     "weight": weight}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    accum_steps: int = 1, combine: Callable | None = None) -> Callable:
  """`step_fn(state, batch) -> (state, metrics)`: one optimizer step over a (global) batch.

  With `combine(frozen, params) -> model params` (LoRA: the frozen base joined with the trained
  adapters), the step is `step_fn(state, batch, frozen)` and `loss_fn` sees the combined tree,
  while gradients and optimizer state cover `state.params` only."""

  def step_fn(state: TrainState, batch: Batch, *frozen):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    loss_of = loss_fn if combine is None else (
        lambda params, b, r: loss_fn(combine(frozen[0], params), b, r))
    grads, loss, metrics = accumulate_gradients(loss_of, state.params, batch, step_rng, accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng))
    return new_state, metrics

  return step_fn


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `abstract`'s leaves placed on the matching `shardings`."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      abstract, shardings)


def abstract_train_state(param_shapes: Any, param_shardings: Any, tx: optax.GradientTransformation,
                         rng: jax.Array, mesh) -> TrainState:
  """The TrainState of `param_shapes` as ShapeDtypeStructs on its shardings (`state_shardings`):
  what `train` restores into or initialises onto, with nothing allocated."""
  abstract = jax.eval_shape(lambda p: create_train_state(p, tx, rng), param_shapes)
  return with_shardings(abstract, state_shardings(abstract, param_shardings, mesh))


def state_shardings(abstract_state: TrainState, param_shardings: Any, mesh,
                    extra_shardings: dict | None = None) -> TrainState:
  """Shardings for a whole TrainState: params as given, optimizer moments like their params (ZeRO),
  everything else (step, rng, counters, scalars) replicated.

  `extra_shardings` ({key: tree}) lays out trained models kept in `extra` (PPO's value model under
  "value"): those entries of `extra` take them, and so do optimizer moments whose path ends with
  the same key and parameter path (the longest match wins, so a value model's moments follow the
  value model even where its parameter names are the policy's)."""
  extra_shardings = extra_shardings or {}
  by_path = {tuple(str(k) for k in path): s
             for tree in (param_shardings, extra_shardings)
             for path, s in jax.tree_util.tree_leaves_with_path(tree)}
  replicated = sharding.replicated(mesh)

  def like_param(path, leaf):
    keys = tuple(str(k) for k in path)
    for start in range(len(keys)):  # Optimizer paths end with the parameter's path.
      found = by_path.get(keys[start:])
      if found is not None and len(found.spec) <= len(leaf.shape):
        return found
    return replicated

  opt = jax.tree_util.tree_map_with_path(like_param, abstract_state.opt_state)
  extra = jax.tree_util.tree_map_with_path(like_param, abstract_state.extra)
  extra = {**extra, **extra_shardings} if isinstance(extra, dict) else extra
  return TrainState(step=replicated, params=param_shardings, opt_state=opt,
                    rng=replicated, extra=extra)


def _host_metrics(pending: list[tuple[int, dict]]) -> list[tuple[int, dict[str, float]]]:
  """Fetches logged device metrics in one transfer."""
  fetched = jax.device_get([m for _, m in pending])
  return [(step, {k: float(np.mean(v)) for k, v in m.items()}) for (step, _), m in
          zip(pending, fetched)]


MiB = 2 ** 20


def memory_report(state: Any, frozen: Any = None, compiled: Any = None) -> dict[str, int]:
  """Bytes one device holds, from the real shardings of the (abstract or concrete) state.

  Args:
    state: a TrainState of arrays or ShapeDtypeStructs with shardings.
    frozen: the frozen models the step reads (PPO's reference and reward), or None.
    compiled: the compiled step (`jit(...).lower(...).compile()`), for XLA's own figure of the
      step's temporaries (activations, gradients, collectives' buffers), or None.
  Returns:
    dict of bytes per device: `params`, `optimizer` (moments and counters), `extra` (phase
    state, e.g. PPO's value model), `frozen`, `activations` (XLA temporaries; -1 when unknown),
    and `params_total`, the unsharded size of the params, for comparison.
  """
  activations = -1
  if compiled is not None:
    try:
      analysis = compiled.memory_analysis()
      activations = int(analysis.temp_size_in_bytes) if analysis is not None else -1
    except (NotImplementedError, AttributeError, jax.errors.JaxRuntimeError):
      pass  # Some backends do not report memory; the estimate is then left out.
  total = sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
              for x in jax.tree.leaves(state.params))
  return {"params": sharding.per_device_bytes(state.params),
          "optimizer": sharding.per_device_bytes(state.opt_state),
          "extra": sharding.per_device_bytes(state.extra),
          "frozen": sharding.per_device_bytes(frozen) if frozen is not None else 0,
          "activations": activations, "params_total": total}


def format_memory(report: dict[str, int], devices: int,
                  labels: dict[str, str] | None = None) -> str:
  """One console line of `memory_report`, in MiB per device; `labels` renames its parts (LoRA:
  the trained params are adapters, the frozen part is the base)."""
  labels = {"params": "params", "extra": "extra", "frozen": "frozen", **(labels or {})}
  mib = lambda key: f"{report[key] / MiB:.1f}"
  parts = [f"{labels['params']} {mib('params')} (of {mib('params_total')} unsharded)",
           f"optimizer {mib('optimizer')}"]
  parts += [f"{labels[key]} {mib(key)}" for key in ("extra", "frozen") if report[key]]
  if report["activations"] >= 0:
    parts.append(f"activations (XLA temporaries of one step) {mib('activations')}")
  held = sum(report[k] for k in ("params", "optimizer", "extra", "frozen"))
  held += max(report["activations"], 0)
  return (f"memory per device ({devices} devices), MiB: " + ", ".join(parts)
          + f"; total {held / MiB:.1f}")


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs of the step's inputs: what it was compiled for (an uncommitted array, e.g. a
  scalar made by jnp, goes wherever jit puts it, so it carries no sharding)."""
  def spec(x):
    placed = isinstance(x, jax.Array) and x.committed
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if placed else None)
  return jax.tree.map(spec, tree)


@dataclasses.dataclass
class Evaluator:
  """How to evaluate: a per-batch sums function, the batches, and how to turn sums into metrics."""
  step: Callable[[Any, Batch], dict]
  batches: Callable[[], Iterable[Batch]]
  summarize: Callable[[dict[str, float]], dict[str, float]]

  def run(self, compiled_step: Callable, params: Any, mesh, frozen: tuple = ()) -> dict[str, float]:
    """Sums `step(params, batch[, frozen])` over the batches (`frozen`: the Trainable's)."""
    totals: dict[str, float] = {}
    results = [compiled_step(params, sharding.shard_batch(b, mesh), *frozen)
               for b in self.batches()]
    for sums in jax.device_get(results):
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return {f"eval/{k}": v for k, v in self.summarize(totals).items()}


@dataclasses.dataclass(frozen=True)
class Run:
  """Where a phase trains and for how long.

  phase: name for messages ("sft", ...); outputs go to `phase_dir` (checkpoint/, metrics.jsonl,
    TensorBoard events).
  config: the phase's `train` section: steps, log_every, eval_every, save_every,
    keep_checkpoints, eval_at_start.
  mesh: the device mesh.
  manifest: saved with every checkpoint (`finished` and `step` are set here).
  tokenizer_dir: copied into the checkpoint so it is self-contained.
  progress_keys: metrics shown on the console line; `unit` names the items `Data.count_items`
    counts (throughput).
  final_manifest: `final evaluation metrics -> entries` added to the finished checkpoint's
    manifest (the reward model's statistics for PPO), so nothing changes `manifest` behind the
    loop's back.
  """
  phase: str
  phase_dir: pathlib.Path
  config: Any
  mesh: Any
  manifest: dict
  tokenizer_dir: str | pathlib.Path | None = None
  progress_keys: tuple[str, ...] = ("loss",)
  unit: str = "tok"
  final_manifest: Callable[[dict[str, float]], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Trainable:
  """What is trained and how one step changes it.

  abstract_state: TrainState of ShapeDtypeStructs carrying the target shardings.
  init_state: builds the fresh state (only called when there is nothing to resume); it is then
    placed on the shardings of `abstract_state`. It must return arrays the caller does not keep
    (load or copy them): the first step donates them, which deletes them.
  step_fn: `(state, batch[, frozen]) -> (state, metrics)`; compiled here with the state donated.
  frozen: arrays the step reads but never updates (PPO's reference and reward models), passed as
    `step_fn(state, batch, frozen)`: arguments, not closure constants, so they are neither baked
    into the compiled program nor copied per step.
  step_compiled: `step_fn` is already made of compiled parts (e.g. PPO with host reward
    sources: compiled rollout -> host scoring -> compiled update, the state donated and laid out
    on `abstract_state`'s shardings by the step itself); the loop calls it as it is.
  memory_labels: names of the memory line's parts ({"params": "adapters", "frozen": "frozen
    base"} with LoRA; see `format_memory`).
  """
  abstract_state: TrainState
  init_state: Callable[[], TrainState]
  step_fn: Callable
  frozen: Any = None
  step_compiled: bool = False
  memory_labels: dict | None = None


@dataclasses.dataclass(frozen=True)
class Data:
  """The training batches.

  batches: `start_step -> iterator` of host-local batches.
  count_items: items (tokens, pairs, ...) in a host batch, for throughput (`Run.unit`).
  widest_batch: for phases whose batches vary in length (length-grouped reward pairs): maps the
    first batch to one of the longest shape, for which the memory report is compiled, so it states
    the peak rather than the first step's need.
  """
  batches: Callable[[int], Iterator[Batch]]
  count_items: Callable[[Batch], float] | None = None
  widest_batch: Callable[[Batch], Batch] | None = None


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What is measured besides the training metrics (both optional).

  evaluator: every `eval_every` steps and at the end.
  milestone: an expensive evaluation (e.g. generation-based), `params -> metrics`, run before
    training (fresh start), at the end and every `milestone_every` steps (0: only those two);
    logged with an "eval/" prefix.
  """
  evaluator: Evaluator | None = None
  milestone: Callable[[Any], dict] | None = None
  milestone_every: int = 0

  def __bool__(self) -> bool:
    return self.evaluator is not None or self.milestone is not None


def restore_or_init(ckpts: checkpoints.Checkpoints, run: Run,
                    trainable: Trainable) -> tuple[TrainState | None, int, bool]:
  """The state to train from: the newest checkpoint's (params, optimizer state, step, RNG, extra)
  or a fresh one placed on the abstract state's shardings.

  Returns:
    (state, start step, resumed); state None when the newest checkpoint is a finished run.
  """
  abstract = trainable.abstract_state
  start = ckpts.latest_step()
  if start is None:
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.device_put(trainable.init_state(), shardings), 0, False
  if ckpts.manifest(start).get("finished"):
    print(f"{run.phase}: {ckpts.directory} holds a finished run (step {start}); skipping. Delete "
          "it or use another --workdir to train again.")
    return None, start, True
  print(f"{run.phase}: resuming from step {start} in {ckpts.directory}")
  restored = ckpts.restore(start, params=abstract.params, train_state=dict(
      step=abstract.step, opt_state=abstract.opt_state, rng=abstract.rng, extra=abstract.extra))
  return TrainState(params=restored["params"], **restored["train_state"]), start, True


@contextlib.contextmanager
def sigterm_guard() -> Iterator[Callable[[], bool]]:
  """Within the block, SIGTERM (preemption) only sets a flag, read by the yielded function, so
  the loop can finish its step, save and exit; the previous handler is restored afterwards.
  (Handlers only work in the main thread; elsewhere the flag never rises.)"""
  requested = threading.Event()
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.getsignal(signal.SIGTERM)
  if in_main_thread:
    signal.signal(signal.SIGTERM, lambda *_: requested.set())
  try:
    yield requested.is_set
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous)


def report_memory(run: Run, trainable: Trainable, compiled_step, first_inputs: tuple) -> None:
  """Logs and prints `memory_report` of the step compiled for `first_inputs` (after the first
  call, so this lowering finds it compiled unless `widest_batch` asked for another shape)."""
  # A step of compiled parts (`Trainable.step_compiled`) has no one program to ask.
  compiled = (compiled_step.lower(*first_inputs).compile() if hasattr(compiled_step, "lower")
              else None)
  report = memory_report(trainable.abstract_state, trainable.frozen, compiled)
  logging.info("%s: %s", run.phase, report)
  if jax.process_index() == 0:
    print(f"{run.phase}: {format_memory(report, run.mesh.size, trainable.memory_labels)}",
          flush=True)


class LogWindow:
  """The metrics of the steps since the last log line: fetched in one transfer, checked for a
  non-finite loss, averaged and written with the window's throughput."""

  def __init__(self, run: Run, writer: progress.MetricsWriter, bar: progress.Progress):
    self.run, self.writer, self.bar = run, writer, bar
    self.pending: list[tuple[int, dict]] = []
    self.items, self.start = 0.0, time.time()

  def add(self, step: int, metrics: dict, items: float) -> None:
    self.pending.append((step, metrics))
    self.items += items

  def flush(self, step: int, last_good: int, checkpoint_dir: pathlib.Path) -> None:
    """Writes the window's mean metrics at `step`.

    Raises:
      UserError: a logged loss is NaN/inf (naming the last good checkpoint `last_good`).
    """
    logged = _host_metrics(self.pending)
    self.pending = []
    for logged_step, values in logged:
      if not np.isfinite(values.get("loss", 0.0)):
        kept = (f"The last good checkpoint (step {last_good}) is kept in {checkpoint_dir}"
                if last_good else "No checkpoint was saved before it")
        raise UserError(
            f"{self.run.phase}: the loss became {values['loss']} at step {logged_step}; "
            f"stopped. {kept}; lower --config.optim.lr or check the data")
    elapsed = time.time() - self.start
    rate = self.items / elapsed if self.items and elapsed > 0 else None
    mean = {k: float(np.mean([v[k] for _, v in logged])) for k in logged[-1][1]}
    self.writer.write(step, {**mean, **({f"{self.run.unit}_per_second": rate} if rate else {})})
    self.bar.update(step, {k: mean[k] for k in self.run.progress_keys if k in mean}, rate)
    self.items, self.start = 0.0, time.time()


def train(run: Run, trainable: Trainable, data: Data,
          evaluation: Evaluation = Evaluation()) -> TrainState | None:
  """Runs (or resumes) a phase's training and returns the final state (None if already finished).

  Evaluates at step 0 (fresh start, `eval_at_start`), every `eval_every` steps and at the end;
  saves every `save_every` steps and, finished, at the end; on SIGTERM saves and stops; on a
  NaN/inf loss stops, keeping the last good checkpoint.
  """
  config, mesh = run.config, run.mesh
  ckpts = checkpoints.Checkpoints(run.phase_dir / "checkpoint", keep=int(config.keep_checkpoints))
  if run.tokenizer_dir is not None and jax.process_index() == 0 and not ckpts.tokenizer_dir.exists():
    from rlhf_jax.models import hf
    hf.copy_tokenizer(run.tokenizer_dir, ckpts.tokenizer_dir)
  state, start, resumed = restore_or_init(ckpts, run, trainable)
  if state is None:
    ckpts.close()
    return None
  shardings = jax.tree.map(lambda x: x.sharding, trainable.abstract_state)
  total = int(config.steps)
  compiled_step = (trainable.step_fn if trainable.step_compiled else
                   jax.jit(trainable.step_fn, out_shardings=(shardings, sharding.replicated(mesh)),
                           donate_argnums=0))
  evaluator = evaluation.evaluator
  # Replicated sums: every process reads the same totals, whatever its share of the mesh.
  compiled_eval = (jax.jit(evaluator.step, out_shardings=sharding.replicated(mesh))
                   if evaluator else None)
  # Lines after the restored step are logged again; a fresh start (nothing to resume, e.g. after
  # a run that failed before its first checkpoint) replaces all of them, step 0 included.
  writer = progress.MetricsWriter(run.phase_dir, resume_step=start if resumed else -1)
  window = LogWindow(run, writer, progress.Progress(run.phase, total, start, run.unit))
  frozen = () if trainable.frozen is None else (trainable.frozen,)

  def save(step: int, finished: bool = False, extra: dict | None = None) -> None:
    ckpts.save(step, params=state.params,
               manifest={**run.manifest, **(extra or {}), "finished": finished, "step": step},
               train_state=dict(step=state.step, opt_state=state.opt_state, rng=state.rng,
                                extra=state.extra))
    logging.info("%s: saved checkpoint at step %d", run.phase, step)

  def evaluate(step: int, milestone: bool = False) -> dict[str, float]:
    metrics = evaluator.run(compiled_eval, state.params, mesh, frozen) if evaluator else {}
    if milestone and evaluation.milestone:
      metrics.update({f"eval/{k}": v for k, v in evaluation.milestone(state.params).items()})
    writer.write(step, metrics)
    if jax.process_index() == 0:
      print(f"{run.phase} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
            flush=True)
    return metrics

  try:
    with sigterm_guard() as stop_requested:
      if evaluation and start == 0 and config.get("eval_at_start", True):
        evaluate(0, milestone=True)
      last_good = start
      batches = data.batches(start)
      for step in range(start + 1, total + 1):
        batch = next(batches)
        inputs = (state, sharding.shard_batch(batch, mesh)) + frozen
        if step == start + 1:
          widest = batch if data.widest_batch is None else data.widest_batch(batch)
          first_inputs = _abstract((state, sharding.shard_batch(widest, mesh)) + frozen)
        state, metrics = compiled_step(*inputs)
        if step == start + 1:
          report_memory(run, trainable, compiled_step, first_inputs)
        items = data.count_items(batch) * jax.process_count() if data.count_items else 0.0
        window.add(step, metrics, items)
        saving = step == total or (config.save_every and step % int(config.save_every) == 0)
        if step == total or step % int(config.log_every) == 0 or saving or stop_requested():
          window.flush(step, last_good, ckpts.directory)
        every = evaluation.milestone_every
        milestone = bool(evaluation.milestone and every and step % int(every) == 0)
        if step != total and (milestone or (evaluator and config.eval_every
                                            and step % int(config.eval_every) == 0)):
          evaluate(step, milestone=milestone)
        if stop_requested():
          save(step)
          raise UserError(f"{run.phase}: stopped by SIGTERM at step {step}; checkpoint saved, "
                          "rerun the same command to resume")
        if saving and step != total:
          save(step)
          last_good = step
      window.bar.done()
      final = evaluate(total, milestone=True) if evaluation else {}
      save(total, finished=True, extra=run.final_manifest(final) if run.final_manifest else None)
      return state
  finally:
    writer.close()
    ckpts.close()
