"""DPO training against TRL's DPOTrainer, on this machine, in one process (issue #22's DPO step).

  python bench/bench_dpo.py                       # Anthropic HH-RLHF helpful pairs (shared data)
  python bench/bench_dpo.py --rounds=1 --train_pairs=64      # a quick smoke run

Both sides train the same ~7M-parameter GPT-Neo causal LM (GPT-2 vocabulary, hidden 128, 4
layers, the GRPO benchmark's model; the same random initial weights, also the frozen reference)
for one epoch on the same token ids: TRL's own tokenisation of the pairs (prompt, then each
response + EOS), which ours reuses, so neither side gets easier inputs. Pairs longer than
`MAX_LENGTH` tokens are left out of both. Batch 8 pairs, the same number of optimizer steps,
sigmoid loss with beta 0.1, AdamW with the same warmup + linear decay and clipping, and the
reference log-probabilities computed once before training on both sides:
  ours  what `--phase=dpo` runs: the reference pass (`dpo.pair_logps` over length-sorted
        batches of 8, as `dpo.reference_logps`, jitted once here), then `loop.make_train_step(dpo.make_loss_fn(...))`, jitted once, state
        donated, on `batching.training_pair_batches` with configs/dpo.py's length grouping
        (--group_by_length=0 pads all to `MAX_LENGTH`), each batch with its pairs' reference
        values (`dpo.with_reference`);
  TRL   `trl.DPOTrainer(precompute_ref_log_probs=True)`, its collator padding to the longest
        sequence of each (random) batch.
Warm-up, not timed: one whole run of ours (compiling every batch width of the epoch and of the
reference pass) and a 2-step TRL run. Then each round trains a fresh copy of the initial model
on each side. Reported: pairs per second of the training steps, and with the reference pass
added; the reference pass's seconds; the epoch's mean loss and rewards/accuracies as a sanity
check. The ratios are ours / TRL of the medians.

Timings on a shared 2-core machine are noisy: the two sides alternate within each round (the
order flips every round), rounds repeat, medians are printed, with `uptime` before and after.
Needs bench/requirements-trl116.txt (trl 1.16).
"""

import copy
import itertools
import math
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from common import data_dir, run_and_print
from rlhf_jax import sharding
from rlhf_jax.configs import common
from rlhf_jax.configs import dpo as dpo_config
from rlhf_jax.data import batching
from rlhf_jax.data import preferences
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import dpo
from rlhf_jax.training import loop
from rlhf_jax.training import optim

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (medians reported).")
_TRAIN_PAIRS = flags.DEFINE_integer("train_pairs", 256, "Training pairs per epoch (0: all).")
_GROUP = flags.DEFINE_integer(
    "group_by_length", -1, "Ours: batches per length-sorted window (-1: configs/dpo.py's "
    "group_by_length, what the phase runs); 0 pads all to MAX_LENGTH.")
_TORCH_THREADS = 2
_DATA = data_dir()  # $RLHF_JAX_DATA, or the shared folder beside the repository.
PAIRS_FILE = _DATA / "preferences" / "hh_rlhf_helpful_base_test.jsonl.gz"
MAX_LENGTH = 256
BATCH = 8
LR = 5e-4
BETA = 0.1
ARCH = dict(hidden_size=128, num_layers=4, num_heads=4,
            attention_layers=("global", "local", "global", "local"), window_size=256,
            max_position_embeddings=MAX_LENGTH)


def text_pairs(tokenizer) -> list[dict]:
  """HH pairs as text whose prompt + longer response + EOS fit `MAX_LENGTH` tokens."""
  pairs, _ = preferences.load_pairs(str(PAIRS_FILE), skip_bad_records=True)
  count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
  fitting = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
             for p in pairs
             if count(p["prompt"]) + max(count(p["chosen"]), count(p["rejected"])) + 1 < MAX_LENGTH]
  return fitting[:_TRAIN_PAIRS.value] if _TRAIN_PAIRS.value else fitting


def hf_config(config: gpt_neo.GPTNeoConfig):
  import transformers
  fields = config.to_hf_dict()
  fields.pop("model_type")
  return transformers.GPTNeoConfig(**fields)


def torch_params(model, config) -> dict:
  return hf.hf_to_flax({k: v.detach().numpy() for k, v in model.state_dict().items()}, config)


def warmup_steps(steps: int) -> int:
  return max(1, round(0.1 * steps))


class PrecomputeClock:
  """Times TRL's reference pass (`DPOTrainer._precompute_ref_logps`, run inside `__init__`)."""

  def __init__(self, trl):
    self.seconds, self._trl = [], trl
    self._original = trl.DPOTrainer._precompute_ref_logps

  def __enter__(self):
    original, seconds = self._original, self.seconds

    def timed(trainer, *args, **kwargs):
      start = time.perf_counter()
      out = original(trainer, *args, **kwargs)
      seconds.append(time.perf_counter() - start)
      return out

    self._trl.DPOTrainer._precompute_ref_logps = timed
    return self

  def __exit__(self, *unused):
    self._trl.DPOTrainer._precompute_ref_logps = self._original


def make_trl_trainer(model, tokenizer, pairs, out_dir, steps):
  import datasets
  import trl
  args = trl.DPOConfig(
      output_dir=str(out_dir), per_device_train_batch_size=BATCH, num_train_epochs=1,
      learning_rate=LR, lr_scheduler_type="linear", warmup_steps=warmup_steps(steps),
      weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
      beta=BETA, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=True,
      use_cpu=True, bf16=False, save_strategy="no", eval_strategy="no", report_to="none",
      logging_steps=steps, disable_tqdm=True, seed=0, dataloader_num_workers=0,
      gradient_checkpointing=False)
  return trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                        train_dataset=datasets.Dataset.from_list(pairs),
                        processing_class=tokenizer)


def train_trl(model, tokenizer, pairs, out_dir):
  """One epoch of TRL's DPOTrainer: (pairs, seconds of training steps, steps, reference
  seconds, mean loss, mean rewards/accuracies). The reference pass is timed wherever TRL runs it
  (in `__init__` or at the start of `train()`) and is not counted in the training seconds."""
  import trl
  steps = math.ceil(len(pairs) / BATCH)
  with PrecomputeClock(trl) as clock:
    trainer = make_trl_trainer(model, tokenizer, pairs, out_dir, steps)
    before = sum(clock.seconds)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start - (sum(clock.seconds) - before)
  if trainer.state.global_step != steps:
    raise AssertionError(f"TRL ran {trainer.state.global_step} steps, expected {steps}")
  logged = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry][-1]
  return (len(pairs), seconds, steps, sum(clock.seconds), logged["loss"],
          logged["rewards/accuracies"])


def our_examples(tokenizer, pairs) -> list[dict]:
  """TRL's own token ids of the pairs (a trainer built only to tokenise them), as our examples."""
  import trl
  with tempfile.TemporaryDirectory() as out_dir:
    args = trl.DPOConfig(output_dir=out_dir, max_length=None, report_to="none", use_cpu=True)
    import transformers
    model = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=len(tokenizer), hidden_size=8, num_layers=1, num_heads=1,
        attention_types=[[["global"], 1]]))
    import datasets
    dataset = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=datasets.Dataset.from_list(pairs),
                             processing_class=tokenizer).train_dataset
  examples = [{"prompt_ids": np.asarray(row["prompt_ids"], np.int32),
               "chosen_ids": np.asarray(row["chosen_ids"], np.int32),
               "rejected_ids": np.asarray(row["rejected_ids"], np.int32),
               "strategy_id": 0} for row in dataset]
  longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                for e in examples)
  if longest > MAX_LENGTH:
    raise ValueError(f"a pair has {longest} tokens after TRL's tokenisation (> {MAX_LENGTH})")
  return examples


class Ours:
  """What `--phase=dpo` runs, on the benchmark's sizes: the step compiled once (state donated),
  the reference pass `dpo.reference_logps` over length-sorted batches, and the training batches
  `batching.training_pair_batches` with configs/dpo.py's length grouping."""

  def __init__(self, config, params, examples, pad_id):
    self.params, self.examples, self.pad_id = params, examples, pad_id
    self.config = dpo_config.get_config("hh_rlhf")
    self.config.max_length, self.config.train.batch_size, self.config.train.seed = (
        MAX_LENGTH, BATCH, 0)
    if _GROUP.value >= 0:
      self.config.group_by_length = _GROUP.value
    self.mesh = sharding.mesh_from_config(self.config.mesh)
    self.logits_fn = dpo.model_logits_fn(gpt_neo.GPTNeo(config))
    self.steps = math.ceil(len(examples) / BATCH)
    self.tx = optim.make_optimizer(common.optim(
        LR, warmup_steps=warmup_steps(self.steps), schedule="linear", end_lr_fraction=0.0,
        weight_decay=0.0, clip_norm=1.0), self.steps)
    self.reference_step = jax.jit(lambda p, b: dpo.pair_logps(self.logits_fn, p, b))
    loss_fn = dpo.make_loss_fn(self.logits_fn, beta=BETA)
    # Dropout is 0 on both sides, so the step runs deterministically, like TRL's.
    self.step = jax.jit(loop.make_train_step(lambda p, b, rng: loss_fn(p, b, None), self.tx),
                        donate_argnums=0)

  def reference_pass(self) -> np.ndarray:
    """The reference log-probabilities [N, 2] of every pair, as `dpo.reference_logps` computes
    them for the phase (`dpo.pair_logps` over length-sorted batches), with the jitted function
    kept across runs: `dpo.reference_logps` jits anew on each call (the phase calls it once), so
    the warm-up compiles it here once and the timed rounds do not recompile."""
    logps = np.full((len(self.examples), 2), np.nan, np.float32)
    for batch in batching.eval_pair_batches(self.examples, batch_size=BATCH,
                                            max_length=MAX_LENGTH, pad_id=self.pad_id,
                                            by_length=True):
      index = batch.pop("pair_index")
      values = np.asarray(self.reference_step(self.params, {
          k: batch[k] for k in ("input_ids", "segment_ids", "positions", "response_length")}))
      logps[index[index >= 0]] = values[index >= 0]
    assert not np.isnan(logps).any()
    return logps

  def batches(self) -> list[dict]:
    return list(itertools.islice(batching.training_pair_batches(
        self.examples, self.config, pad_id=self.pad_id), self.steps))

  def train(self):
    """One epoch from the initial weights, reference pass first: as `train_trl`."""
    epoch = self.batches()  # Built before the clock starts, as TRL's are tokenised before.
    start = time.perf_counter()
    reference = self.reference_pass()
    reference_seconds = time.perf_counter() - start
    state = loop.create_train_state(jax.tree.map(jnp.array, self.params), self.tx,
                                    jax.random.key(0))
    losses, accuracies = [], []
    start = time.perf_counter()
    for batch in epoch:
      state, metrics = self.step(state, dpo.with_reference(batch, reference))
      losses.append(metrics["loss"])
      accuracies.append(metrics["rewards/accuracies"])
    float(metrics["loss"])  # Waits for the last step.
    seconds = time.perf_counter() - start
    pairs = self.steps * BATCH
    return (pairs, seconds, self.steps, reference_seconds,
            float(np.mean(jax.device_get(losses))), float(np.mean(jax.device_get(accuracies))))


def bench_hh() -> list[str]:
  import torch
  import transformers
  if not PAIRS_FILE.is_file():
    return [f"(skipped: no shared data at {PAIRS_FILE})"]
  tokenizer = hf.load_tokenizer(_DATA / "gpt2_tokenizer")
  pairs = text_pairs(tokenizer)
  examples = our_examples(tokenizer, pairs)
  pad = tokenizer.eos_token_id
  config = gpt_neo.GPTNeoConfig(vocab_size=len(tokenizer), bos_token_id=pad, eos_token_id=pad,
                                **ARCH)
  torch.manual_seed(0)
  torch_model = transformers.GPTNeoForCausalLM(hf_config(config))
  params = torch_params(torch_model, config)
  ours = Ours(config, params, examples, pad)
  epoch = ours.batches()
  widths = [b["input_ids"].shape[-1] for b in epoch]
  real = sum(int(b["segment_ids"].sum()) for b in epoch)
  print(f"hh: {len(pairs)} training pairs; model {config.num_params / 1e6:.2f}M parameters; "
        f"ours: group_by_length {ours.config.group_by_length}, batch widths mean "
        f"{np.mean(widths):.0f} ({len(set(widths))} distinct), real tokens "
        f"{real / sum(b['input_ids'].size for b in epoch):.0%} of the padded batches", flush=True)

  start = time.perf_counter()
  ours.train()  # Warm-up: compiles every width of the epoch and of the reference pass.
  print(f"hh warm-up: ours {time.perf_counter() - start:.1f} s", flush=True)
  with tempfile.TemporaryDirectory() as out_dir:
    start = time.perf_counter()
    train_trl(copy.deepcopy(torch_model), tokenizer, pairs[:2 * BATCH], out_dir)
    print(f"hh warm-up: TRL 2 steps {time.perf_counter() - start:.1f} s", flush=True)

  results: dict[str, list[tuple]] = {"ours": [], "TRL": []}
  for round_index in range(_ROUNDS.value):
    order = list(results) if round_index % 2 == 0 else list(results)[::-1]
    for name in order:
      if name == "TRL":
        with tempfile.TemporaryDirectory() as out_dir:
          run = train_trl(copy.deepcopy(torch_model), tokenizer, pairs, out_dir)
      else:
        run = ours.train()
      results[name].append(run)
      count, seconds, steps, reference, loss, accuracy = run
      print(f"hh round {round_index} {name}: {steps} steps, {count:.0f} pairs in {seconds:.1f} s "
            f"({count / seconds:.1f}/s), reference pass {reference:.1f} s, mean loss "
            f"{loss:.4f}, rewards/accuracies {accuracy:.3f}", flush=True)

  median = lambda runs, f: statistics.median(f(r) for r in runs)
  train_rate = {n: median(runs, lambda r: r[0] / r[1]) for n, runs in results.items()}
  total_rate = {n: median(runs, lambda r: r[0] / (r[1] + r[3])) for n, runs in results.items()}
  lines = ["| trainer | steps | pairs/s, training steps (ours / TRL) | pairs/s with the reference "
           "pass (ours / TRL) | reference pass (s) | mean loss | rewards/accuracies |",
           "|---|---|---|---|---|---|---|"]
  for name, runs in results.items():
    ratio = lambda rate: "" if name == "TRL" else f" (**{rate[name] / rate['TRL']:.2f}x**)"
    lines.append(f"| {name} | {runs[0][2]} | {train_rate[name]:.1f}{ratio(train_rate)} | "
                 f"{total_rate[name]:.1f}{ratio(total_rate)} | {median(runs, lambda r: r[3]):.1f} | "
                 f"{median(runs, lambda r: r[4]):.4f} | {median(runs, lambda r: r[5]):.3f} |")
  return lines


def main(argv):
  del argv
  run_and_print(bench_hh, _TORCH_THREADS)


if __name__ == "__main__":
  app.run(main)
