"""DPO training against TRL's DPOTrainer, on this machine, in one process (issue #22's DPO step).

  python bench/bench_dpo.py                       # Anthropic HH-RLHF helpful pairs (shared data)
  python bench/bench_dpo.py --rounds=1 --train_pairs=64      # a quick smoke run

Both sides train the same ~7M-parameter GPT-Neo causal LM (GPT-2 vocabulary, hidden 128, 4
layers; the same random initial weights, also the frozen reference) for one epoch on the same
token ids: TRL's own tokenisation of the pairs (prompt, then each response + EOS), which ours
reuses, so neither side gets easier inputs. Pairs longer than `MAX_LENGTH` tokens are left out
of both. Batch 8 pairs, sigmoid loss with beta 0.1, AdamW with the same warmup + linear decay
and clipping, and the reference log-probabilities computed once before training on both sides:
  ours  `dpo.pair_logps` with the reference's parameters over the epoch's batches (jitted), then
        `loop.make_train_step(dpo.make_loss_fn(...))`, jitted, state donated; batches padded to
        the fixed `MAX_LENGTH`, or with --group_by_length=G length-grouped (multiples of 16);
  TRL   `trl.DPOTrainer(precompute_ref_log_probs=True)`, its collator padding to the longest
        sequence of each batch.
Reported: pairs trained per second (whole epoch, and after step 1, which holds our
compilation), the reference pass's seconds on each side (ours including its compilation), and
the epoch's mean loss and
rewards/accuracies as a sanity check. The ratio is ours / TRL of the medians.

Timings on a shared 2-core machine are noisy: the two sides alternate within each round (the
order flips every round), rounds repeat, medians are printed, with `uptime` before and after.
Needs bench/requirements.txt (trl; this benchmark was written against trl 1.16).
"""

import copy
import functools
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
from rlhf_jax.configs import common
from rlhf_jax.data import batching
from rlhf_jax.data import preferences
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import dpo
from rlhf_jax.training import loop
from rlhf_jax.training import optim

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (medians reported).")
_TRAIN_PAIRS = flags.DEFINE_integer("train_pairs", 512, "Training pairs per epoch (0: all).")
_GROUP = flags.DEFINE_integer(
    "group_by_length", 0, "Ours: length-grouped batches (G batches per sorted window, each "
    "padded to a multiple of 16); 0 pads all to MAX_LENGTH.")
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
  """One epoch of TRL's DPOTrainer: (pairs, seconds, seconds after step 1, pairs after step 1,
  steps, reference seconds, mean loss, mean rewards/accuracies)."""
  import transformers
  import trl
  steps = math.ceil(len(pairs) / BATCH)
  with PrecomputeClock(trl) as clock:
    trainer = make_trl_trainer(model, tokenizer, pairs, out_dir, steps)
  step_ends = []

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, *unused_args, **unused_kwargs):
      step_ends.append(time.perf_counter())

  trainer.add_callback(Clock())
  start = time.perf_counter()
  trainer.train()
  end = time.perf_counter()
  per_step = len(pairs) / len(step_ends)
  logged = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry][-1]
  return (len(pairs), end - start, end - step_ends[0], len(pairs) - per_step, len(step_ends),
          sum(clock.seconds), logged["loss"], logged["rewards/accuracies"])


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


def train_ours(config, params, examples, pad_id):
  """One epoch of our DPO step; returns as `train_trl`."""
  model = gpt_neo.GPTNeo(config)
  logits_fn = dpo.model_logits_fn(model)
  steps = math.ceil(len(examples) / BATCH)
  batches = batching.pair_batches(examples, batch_size=BATCH, max_length=MAX_LENGTH,
                                  pad_id=pad_id, seed=0, group_by_length=_GROUP.value)
  epoch = [next(batches) for _ in range(steps)]
  # The reference is the initial policy; its log-probabilities are computed once, per pair.
  reference_pass = jax.jit(functools.partial(dpo.pair_logps, logits_fn))
  start = time.perf_counter()
  for batch in epoch:
    batch["ref_logps"] = reference_pass(params, batch)
  jax.block_until_ready([batch["ref_logps"] for batch in epoch])
  reference_seconds = time.perf_counter() - start

  tx = optim.make_optimizer(common.optim(LR, warmup_steps=warmup_steps(steps), schedule="linear",
                                         end_lr_fraction=0.0, weight_decay=0.0, clip_norm=1.0),
                            steps)
  loss_fn = dpo.make_loss_fn(logits_fn, beta=BETA)
  state = loop.create_train_state(jax.tree.map(jnp.array, params), tx, jax.random.key(0))
  # Dropout is 0 on both sides, so the step runs deterministically, like TRL's.
  step = jax.jit(loop.make_train_step(lambda p, b, rng: loss_fn(p, b, None), tx),
                 donate_argnums=0)
  losses, accuracies = [], []
  start = time.perf_counter()
  for index, batch in enumerate(epoch):
    state, metrics = step(state, batch)
    losses.append(metrics["loss"])
    accuracies.append(metrics["rewards/accuracies"])
    if index == 0:  # The first step includes compilation.
      float(metrics["loss"])
      after_first = time.perf_counter()
  float(metrics["loss"])
  end = time.perf_counter()
  pairs = steps * BATCH
  return (pairs, end - start, end - after_first, pairs - BATCH, steps, reference_seconds,
          float(np.mean(jax.device_get(losses))), float(np.mean(jax.device_get(accuracies))))


def bench_hh() -> list[str]:
  import transformers
  if not PAIRS_FILE.is_file():
    return [f"(skipped: no shared data at {PAIRS_FILE})"]
  tokenizer = hf.load_tokenizer(_DATA / "gpt2_tokenizer")
  pairs = text_pairs(tokenizer)
  examples = our_examples(tokenizer, pairs)
  pad = tokenizer.eos_token_id
  config = gpt_neo.GPTNeoConfig(vocab_size=len(tokenizer), bos_token_id=pad, eos_token_id=pad,
                                **ARCH)
  import torch
  torch.manual_seed(0)
  torch_model = transformers.GPTNeoForCausalLM(hf_config(config))
  params = torch_params(torch_model, config)
  print(f"hh: {len(pairs)} training pairs; model {config.num_params / 1e6:.2f}M parameters",
        flush=True)

  results: dict[str, list[tuple]] = {"ours": [], "TRL": []}
  for round_index in range(_ROUNDS.value):
    order = list(results) if round_index % 2 == 0 else list(results)[::-1]
    for name in order:
      if name == "TRL":
        with tempfile.TemporaryDirectory() as out_dir:
          run = train_trl(copy.deepcopy(torch_model), tokenizer, pairs, out_dir)
      else:
        run = train_ours(config, params, examples, pad)
      results[name].append(run)
      count, seconds, steady_seconds, steady_pairs, steps, reference, loss, accuracy = run
      print(f"hh round {round_index} {name}: {steps} steps, {count:.0f} pairs in {seconds:.1f} s "
            f"({count / seconds:.1f}/s; after step 1 {steady_pairs / steady_seconds:.1f}/s), "
            f"reference pass {reference:.1f} s, mean loss {loss:.4f}, rewards/accuracies "
            f"{accuracy:.3f}", flush=True)

  lines = ["| trainer | steps | pairs/s (whole epoch) | pairs/s (after step 1) | reference pass (s) "
           "| mean loss | rewards/accuracies |", "|---|---|---|---|---|---|---|"]
  rate = lambda runs, a, b: statistics.median(r[a] / r[b] for r in runs)
  trl_rate, trl_steady = rate(results["TRL"], 0, 1), rate(results["TRL"], 3, 2)
  for name, runs in results.items():
    whole, steady = rate(runs, 0, 1), rate(runs, 3, 2)
    ratio = "" if name == "TRL" else f" (**{whole / trl_rate:.2f}x** TRL)"
    steady_ratio = "" if name == "TRL" else f" (**{steady / trl_steady:.2f}x**)"
    median = lambda i: statistics.median(r[i] for r in runs)
    lines.append(f"| {name} | {runs[0][4]} | {whole:.1f}{ratio} | {steady:.1f}{steady_ratio} | "
                 f"{median(5):.1f} | {median(6):.4f} | {median(7):.3f} |")
  return lines


def main(argv):
  del argv
  run_and_print(bench_hh, _TORCH_THREADS)


if __name__ == "__main__":
  app.run(main)
