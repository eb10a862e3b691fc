"""SFT benchmarks against the Hugging Face PyTorch references, on this machine, in one process.

  python bench/bench_sft.py --part=step    # compiled train step vs GPTNeoForCausalLM + AdamW
  python bench/bench_sft.py --part=dolly   # SFT on Dolly records vs TRL's SFTTrainer
  python bench/bench_sft.py                # both

Part `step`: tokens/s of one optimizer step (forward, backward, clipping, AdamW) of
`loop.make_train_step(sft_loss)` (jitted, state donated: what the SFT phase runs) and of the same
step in PyTorch (`GPTNeoForCausalLM(labels=...)`, `clip_grad_norm_`, `torch.optim.AdamW`), on
random weights and tokens, for GPT-Neo 125M (batch 4 x 256) and the built-in tiny model
(configs/init.py, batch 32 x 96). Model FLOPs utilisation = (6 * N * tokens + 12 * layers *
hidden * length * tokens) / step time / the float32 matmul peak measured here with a large jnp
matmul (N: parameters without the position table, whose lookups do no arithmetic; the attention
term counts the full length x length scores, as PaLM's MFU does).

Part `dolly`: the same Dolly training records (GPT-2 tokenizer, max length 256, batch 16, one
epoch, same initial weights, same AdamW / clipping / warmup + linear decay) trained by our SFT step
(packed and unpacked rows) and by TRL's `SFTTrainer` on prompt-completion data (loss on the
completion only, TRL's default batching: padded to the longest in each batch, no packing since TRL
packing needs flash attention). Reported: response tokens trained per second and the validation
loss (our evaluator on the same validation examples, for every trained model) after the epoch.

Timings on a shared 2-core machine are noisy: the two sides alternate within each round, rounds
repeat, medians are printed, with `uptime` before and after. Needs bench/requirements.txt.

Environment: XLA:CPU allocates each execution's temporaries as one large block, which glibc maps
afresh every call (page faults and zeroing: ~75k faults per tiny step, ~640k per 125M step). The
local launcher preloads tcmalloc when it is installed (launch/local.py), which reuses the block;
this benchmark runs as started, so run it with and without
`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4` (applies to both sides, which
share the process), or with glibc's transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`);
bench/RESULTS.md has runs with each setting.
"""

import os
# PyTorch's OpenMP threads spin while waiting by default; on a shared, oversubscribed machine that
# made its step up to 7x slower (measured: 4.4 s vs 0.6 s per tiny step). Sleeping waits are
# the fair setting for it here. Must be set before torch (libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import math
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from common import cpu_seconds, data_dir, machine_description, uptime
from rlhf_jax.configs import common
from rlhf_jax.configs import init as init_config
from rlhf_jax.data import batching
from rlhf_jax.data import records as records_lib
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import sft

_PART = flags.DEFINE_enum("part", "all", ["all", "step", "dolly"], "Which benchmark to run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds per comparison (medians reported).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed optimizer steps per side and round (part step).")
_TRAIN_RECORDS = flags.DEFINE_integer("train_records", 384, "Dolly training records (part dolly).")
_EVAL_RECORDS = flags.DEFINE_integer("eval_records", 64, "Dolly validation records (part dolly).")
_TORCH_THREADS = 2
_DATA = data_dir()  # $RLHF_JAX_DATA, or the shared folder beside the repository.


def matmul_peak(size: int = 4096, repeats: int = 5) -> float:
  """float32 FLOP/s of the best of `repeats` jitted size x size matmuls."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


# ---------------------------------------------------------------------------------------------
# Part 1: the train step.


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  config: gpt_neo.GPTNeoConfig
  batch: int
  length: int

  @property
  def tokens(self) -> int:
    return self.batch * self.length

  def flops_per_step(self) -> float:
    c = self.config
    matmul_params = c.num_params - c.max_position_embeddings * c.hidden_size
    per_token = 6 * matmul_params + 12 * c.num_layers * c.hidden_size * self.length
    return per_token * self.tokens


def shapes() -> list[Shape]:
  arch = init_config.get_config().arch.to_dict()
  arch["attention_layers"] = tuple(arch["attention_layers"])
  tiny = gpt_neo.GPTNeoConfig(vocab_size=1024, bos_token_id=0, eos_token_id=0, **arch)
  neo_125m = gpt_neo.GPTNeoConfig()  # The defaults are GPT-Neo 125M's.
  return [Shape("GPT-Neo 125M", neo_125m, 4, 256), Shape("built-in tiny", tiny, 32, 96)]


def lm_batch(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
  """Full rows of random tokens, every next token a target."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, shape.config.vocab_size, (shape.batch, shape.length + 1)).astype(np.int32)
  mask = np.ones((shape.batch, shape.length), np.float32)
  return dict(input_ids=ids[:, :-1], targets=ids[:, 1:],
              segment_ids=np.ones((shape.batch, shape.length), np.int32),
              positions=np.broadcast_to(np.arange(shape.length, dtype=np.int32),
                                        (shape.batch, shape.length)).copy(),
              loss_mask=mask)


def optim_config():
  return common.optim(1e-4, schedule="constant", weight_decay=0.0, clip_norm=1.0)


class JaxStep:
  """Our compiled SFT step, as the SFT phase builds it."""

  def __init__(self, shape: Shape):
    model = gpt_neo.GPTNeo(shape.config)
    tx = optim.make_optimizer(optim_config(), 1000)
    self.state = jax.jit(lambda: loop.create_train_state(
        gpt_neo.init_params(model, jax.random.key(0)), tx, jax.random.key(1)))()
    self.step = jax.jit(loop.make_train_step(lambda p, b, r: sft.sft_loss(model, p, b, r), tx),
                        donate_argnums=0)
    self.batch = lm_batch(shape)

  def run(self, steps: int) -> float:
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    return float(metrics["loss"])  # Waits for the last step.


def hf_config(config: gpt_neo.GPTNeoConfig):
  import transformers
  fields = config.to_hf_dict()
  fields.pop("model_type")
  return transformers.GPTNeoConfig(**fields)


class TorchStep:
  """The same step in Hugging Face PyTorch: loss over all next tokens, clipping, AdamW."""

  def __init__(self, shape: Shape):
    import torch
    import transformers
    torch.manual_seed(0)
    self.model = transformers.GPTNeoForCausalLM(hf_config(shape.config)).train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
    batch = lm_batch(shape)
    self.ids = torch.tensor(batch["input_ids"], dtype=torch.long)

  def run(self, steps: int) -> float:
    import torch
    for _ in range(steps):
      loss = self.model(input_ids=self.ids, labels=self.ids).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.optimizer.step()
      self.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def time_steps(side, steps: int) -> tuple[float, float]:
  """(wall seconds, CPU seconds) per step, after one warm-up step."""
  side.run(1)  # Warm-up (compilation for JAX, allocator warm-up for PyTorch).
  start, start_cpu = time.perf_counter(), cpu_seconds()
  side.run(steps)
  return (time.perf_counter() - start) / steps, (cpu_seconds() - start_cpu) / steps


def bench_step(peak: float) -> list[str]:
  lines = ["| shape | ours tok/s | PyTorch tok/s | ratio (wall) | ours MFU | PyTorch MFU | "
           "ours CPU s/step | PyTorch CPU s/step | ratio (CPU time) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for shape in shapes():
    sides = {"ours": JaxStep(shape), "torch": TorchStep(shape)}
    times = {"ours": [], "torch": []}
    for round_index in range(_ROUNDS.value):
      order = ["ours", "torch"] if round_index % 2 == 0 else ["torch", "ours"]
      for name in order:
        times[name].append(time_steps(sides[name], _STEPS.value))
      print(f"{shape.name} round {round_index}: " + ", ".join(
          f"{n} {times[n][-1][0]:.3f} s/step ({times[n][-1][1]:.3f} CPU s)" for n in times),
            flush=True)
    ours, theirs = (statistics.median(t for t, _ in times[n]) for n in ("ours", "torch"))
    ours_cpu, theirs_cpu = (statistics.median(c for _, c in times[n]) for n in ("ours", "torch"))
    flops = shape.flops_per_step()
    lines.append(f"| {shape.name} (batch {shape.batch} x {shape.length}) | "
                 f"{shape.tokens / ours:,.0f} | {shape.tokens / theirs:,.0f} | "
                 f"**{theirs / ours:.2f}x** | {flops / ours / peak:.1%} | "
                 f"{flops / theirs / peak:.1%} | {ours_cpu:.3f} | {theirs_cpu:.3f} | "
                 f"{theirs_cpu / ours_cpu:.2f}x |")
    print(lines[-1], flush=True)
    del sides
  return lines


# ---------------------------------------------------------------------------------------------
# Part 2: SFT on Dolly against TRL.

MAX_LENGTH = 256
BATCH = 16
LR = 5e-4
DOLLY_ARCH = dict(hidden_size=128, num_layers=2, num_heads=4, attention_layers=("global", "local"),
                  window_size=256, max_position_embeddings=MAX_LENGTH)


def dolly_data(tokenizer):
  """Train and validation records whose prompt fits (so both sides train on the same records)."""
  data_config = common.data(str(_DATA / "dolly" / "dolly_sample_1k.jsonl"))
  data_config.validation_fraction = 0.1
  splits = records_lib.load_splits(data_config)

  def fitting(records, count):
    kept = []
    for record in records:
      prompt = batching.format_prompt(record["instruction"], record["context"])
      if len(tokenizer(prompt)["input_ids"]) < MAX_LENGTH:
        kept.append(record)
    return kept[:count]

  return fitting(splits["train"], _TRAIN_RECORDS.value), fitting(splits["validation"],
                                                                  _EVAL_RECORDS.value)


def warmup_steps(steps: int) -> int:
  return max(1, round(0.1 * steps))


@dataclasses.dataclass
class Epoch:
  """What one training epoch cost: totals, and the same after the first step (which includes
  XLA compilation on our side)."""
  steps: int
  tokens: float  # Response tokens trained.
  seconds: float
  cpu: float
  steady_tokens: float = 0.0
  steady_seconds: float = 0.0
  steady_cpu: float = 0.0
  loss: float = math.nan  # Validation loss after the epoch.

  def rates(self) -> dict[str, float]:
    return {"wall": self.tokens / self.seconds,
            "steady": self.steady_tokens / max(self.steady_seconds, 1e-9),
            "cpu": self.tokens / self.cpu,
            "steady_cpu": self.steady_tokens / max(self.steady_cpu, 1e-9)}


def train_ours(config, initial_params, examples, pad_id, *, pack: bool):
  """One epoch of our SFT step (the phase's compiled step): (params, Epoch)."""
  model = gpt_neo.GPTNeo(config)
  # Rows in one epoch: plan it with the batcher itself (batch size 1 yields row by row).
  rows, seen = 0, 0
  for row in batching.sft_batches(examples, batch_size=1, max_length=MAX_LENGTH, pad_id=pad_id,
                                  seed=0, pack=pack):
    rows += 1
    seen += int(row["segment_ids"].max())
    if seen >= len(examples):
      break
  steps = math.ceil(rows / BATCH)
  tx = optim.make_optimizer(common.optim(LR, warmup_steps=warmup_steps(steps), schedule="linear",
                                         end_lr_fraction=0.0, clip_norm=1.0), steps)
  state = loop.create_train_state(jax.tree.map(jnp.array, initial_params), tx, jax.random.key(0))
  step = jax.jit(loop.make_train_step(lambda p, b, r: sft.sft_loss(model, p, b, r), tx),
                 donate_argnums=0)
  batches = batching.sft_batches(examples, batch_size=BATCH, max_length=MAX_LENGTH, pad_id=pad_id,
                                 seed=0, pack=pack)
  tokens, start, start_cpu = 0.0, time.perf_counter(), cpu_seconds()
  for index in range(steps):
    batch = next(batches)
    state, metrics = step(state, batch)
    tokens += float(batch["loss_mask"].sum())
    if index == 0:  # The first step includes compilation.
      float(metrics["loss"])
      first = (tokens, time.perf_counter(), cpu_seconds())
  float(metrics["loss"])
  end, end_cpu = time.perf_counter(), cpu_seconds()
  return state.params, Epoch(steps, tokens, end - start, end_cpu - start_cpu,
                             tokens - first[0], end - first[1], end_cpu - first[2])


def train_trl(initial_model, tokenizer, train_records, out_dir):
  """One epoch of TRL's SFTTrainer: (torch model, Epoch); the tokens after step 1 are estimated
  as the epoch's mean per step (TRL's batches are not seen from here)."""
  import copy
  import datasets
  import transformers
  import trl

  def as_prompt_completion(records):
    return datasets.Dataset.from_list([
        {"prompt": batching.format_prompt(r["instruction"], r["context"]),
         "completion": r["response"].strip()} for r in records])

  model = copy.deepcopy(initial_model)
  steps = math.ceil(len(train_records) / BATCH)
  args = trl.SFTConfig(
      output_dir=str(out_dir), per_device_train_batch_size=BATCH, num_train_epochs=1,
      learning_rate=LR, lr_scheduler_type="linear", warmup_steps=warmup_steps(steps),
      weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
      max_length=MAX_LENGTH, packing=False, completion_only_loss=True, use_cpu=True,
      save_strategy="no", eval_strategy="no", report_to="none", logging_steps=steps,
      disable_tqdm=True, seed=0, dataloader_num_workers=0)
  trainer = trl.SFTTrainer(model=model, args=args, train_dataset=as_prompt_completion(train_records),
                           processing_class=tokenizer)
  # Trained tokens: labels that are not -100 (TRL folds the completion mask into `labels`).
  tokens = float(sum(int(np.sum(np.asarray(labels) != -100))
                     for labels in trainer.train_dataset["labels"]))
  step_ends = []

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, *unused_args, **unused_kwargs):
      step_ends.append((time.perf_counter(), cpu_seconds()))

  trainer.add_callback(Clock())
  start, start_cpu = time.perf_counter(), cpu_seconds()
  trainer.train()
  end, end_cpu = time.perf_counter(), cpu_seconds()
  steps = len(step_ends)
  return model, Epoch(steps, tokens, end - start, end_cpu - start_cpu,
                      tokens * (steps - 1) / steps, end - step_ends[0][0], end_cpu - step_ends[0][1])


def validation_loss(config, params, eval_examples, pad_id) -> float:
  model = gpt_neo.GPTNeo(config)
  step = jax.jit(lambda p, b: sft.sft_eval_sums(model, p, b))
  totals = {"nll": 0.0, "tokens": 0.0, "correct": 0.0}
  for batch in batching.eval_batches(eval_examples, batch_size=BATCH, max_length=MAX_LENGTH,
                                     pad_id=pad_id):
    for key, value in jax.device_get(step(params, batch)).items():
      totals[key] += float(value)
  return totals["nll"] / totals["tokens"]


def torch_params(model, config) -> dict:
  return hf.hf_to_flax({k: v.detach().numpy() for k, v in model.state_dict().items()}, config)


def bench_dolly() -> list[str]:
  import torch
  import transformers
  if not _DATA.is_dir():
    return [f"(skipped: no shared data at {_DATA})"]
  tokenizer = hf.load_tokenizer(_DATA / "gpt2_tokenizer")
  train_records, eval_records = dolly_data(tokenizer)
  examples, stats = batching.tokenize_sft_examples(tokenizer, train_records, max_length=MAX_LENGTH)
  eval_examples, _ = batching.tokenize_sft_examples(tokenizer, eval_records, max_length=MAX_LENGTH)
  config = gpt_neo.GPTNeoConfig(vocab_size=len(tokenizer), **DOLLY_ARCH)
  torch.manual_seed(0)
  initial_model = transformers.GPTNeoForCausalLM(hf_config(config))
  initial_params = torch_params(initial_model, config)
  pad = tokenizer.eos_token_id
  initial_loss = validation_loss(config, initial_params, eval_examples, pad)
  print(f"dolly: {len(examples)} training examples ({stats['truncated_responses']} responses "
        f"truncated), {len(eval_examples)} validation; initial validation loss {initial_loss:.3f}",
        flush=True)

  results: dict[str, list[Epoch]] = {"ours (packed)": [], "ours (unpacked)": [], "TRL": []}
  for round_index in range(_ROUNDS.value):
    order = list(results) if round_index % 2 == 0 else list(results)[::-1]
    for name in order:
      with tempfile.TemporaryDirectory() as out_dir:
        if name == "TRL":
          model, epoch = train_trl(initial_model, tokenizer, train_records, out_dir)
          params = torch_params(model, config)
        else:
          params, epoch = train_ours(config, initial_params, examples, pad,
                                     pack=name == "ours (packed)")
      epoch.loss = validation_loss(config, params, eval_examples, pad)
      results[name].append(epoch)
      rates = epoch.rates()
      print(f"dolly round {round_index} {name}: {epoch.steps} steps, {epoch.tokens:.0f} response "
            f"tokens in {epoch.seconds:.1f} s, {epoch.cpu:.1f} CPU s ({rates['wall']:,.0f}/s; "
            f"after step 1 {rates['steady']:,.0f}/s, {rates['steady_cpu']:,.0f}/CPU s), "
            f"validation loss {epoch.loss:.4f}", flush=True)

  lines = ["| trainer | steps | response tokens | response tok/s, whole epoch | "
           "response tok/s, after step 1 | response tok per CPU s, after step 1 | "
           "validation loss after the epoch |",
           "|---|---|---|---|---|---|---|"]
  medians = {name: {key: statistics.median(e.rates()[key] for e in runs)
                    for key in ("wall", "steady", "steady_cpu")} for name, runs in results.items()}
  for name, runs in results.items():
    cells = []
    for key in ("wall", "steady", "steady_cpu"):
      value = medians[name][key]
      versus = "" if name == "TRL" else f" (**{value / medians['TRL'][key]:.2f}x**)"
      cells.append(f"{value:,.0f}{versus}")
    loss = statistics.median(e.loss for e in runs)
    lines.append(f"| {name} | {runs[0].steps} | {runs[0].tokens:.0f} | {' | '.join(cells)} | "
                 f"{loss:.4f} |")
  lines.append(f"\nInitial validation loss (same weights for all): {initial_loss:.4f}.")
  return lines


def main(argv):
  del argv
  import torch
  torch.set_num_threads(_TORCH_THREADS)
  print(machine_description())
  print(f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r} "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} torch threads {_TORCH_THREADS}")
  print("load before:", uptime(), flush=True)
  peak = matmul_peak()
  print(f"float32 matmul peak (jnp, 4096^2): {peak / 1e9:.1f} GFLOP/s", flush=True)
  report = []
  if _PART.value in ("all", "step"):
    report += bench_step(peak) + [""]
  if _PART.value in ("all", "dolly"):
    report += bench_dolly()
  print("load after:", uptime())
  print("\n".join(report))


if __name__ == "__main__":
  app.run(main)
