"""Reward-model training against TRL's RewardTrainer, on this machine, in one process.

  python bench/bench_reward.py                 # Anthropic HH-RLHF helpful pairs (shared data)
  python bench/bench_reward.py --rounds=2 --train_pairs=512

Both sides train the same ~7M-parameter GPT-Neo (GPT-2 vocabulary, hidden 128, 4 layers; the
same random initial weights, HF `GPTNeoForSequenceClassification` layout) for one epoch on the
same pre-tokenised pairs (prompt + response, no EOS, at most `MAX_LENGTH` tokens; longer pairs
are left out of both), batch 16 pairs, AdamW with the same warmup + linear decay and clipping,
the same number of optimizer steps:
  ours         `loop.make_train_step(reward.reward_loss)`, jitted, state donated, on the batches
               the reward phase trains on (`batching.training_pair_batches` with the hh_rlhf
               config's `group_by_length`: length-grouped, each batch padded to its longest pair
               rounded up to 16; --group_by_length=0 pads all to `MAX_LENGTH`);
  TRL          `trl.RewardTrainer` on the same token ids (`chosen_ids` / `rejected_ids` columns,
               so TRL neither re-tokenises nor appends EOS), its collator padding to the longest
               pair of each (random) batch;
  TRL grouped  the same with the Trainer's own length grouping
               (`train_sampling_strategy="group_by_length"`, a `length` column of each pair's
               longer side), so both sides pad little.
Warm-up, not timed: one whole epoch of ours (it compiles every batch width the epoch has; our
compile time is printed) and a 2-step run of each TRL setting. Then each round trains a fresh
copy of the initial model for one epoch on each side. Reported: pairs trained per second (whole
epoch) and, for the trained models, the held-out pairwise accuracy from our evaluator, next to
the "prefer the longer response" baseline. The ratios are ours / TRL of the medians.

Timings on a shared 2-core machine are noisy: the sides alternate within each round (the order
flips every round), rounds repeat, medians are printed, with `uptime` before and after. Needs
bench/requirements-trl116.txt (trl 1.16).
"""

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
from rlhf_jax.configs import common
from rlhf_jax.configs import reward as reward_config
from rlhf_jax.data import batching
from rlhf_jax.data import preferences
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import reward

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (medians reported).")
_TRAIN_PAIRS = flags.DEFINE_integer("train_pairs", 0, "Training pairs per epoch (0: all).")
_GROUP = flags.DEFINE_integer(
    "group_by_length", -1, "Ours: batches per length-sorted window (-1: the hh_rlhf reward "
    "config's group_by_length, what the phase runs); 0 pads all to MAX_LENGTH.")
_TRL_SETTINGS = flags.DEFINE_list("trl", ["random", "grouped"],
                                  "TRL samplers to time: random (its default), grouped.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch threads for TRL (the machine has 2 cores).")
_DATA = data_dir()  # $RLHF_JAX_DATA, or the shared folder beside the repository.
PAIRS_FILE = _DATA / "preferences" / "hh_rlhf_helpful_base_test.jsonl.gz"
MAX_LENGTH = 256
BATCH = 16
LR = 5e-4
EVAL_FRACTION = 0.1
ARCH = dict(hidden_size=128, num_layers=4, num_heads=4,
            attention_layers=("global", "local", "global", "local"), window_size=256,
            max_position_embeddings=MAX_LENGTH)


def load_data(tokenizer) -> tuple[list[dict], list[dict], dict]:
  """Training and held-out examples (held-out: 10% of the prompts), pairs that fit only."""
  pairs, load_stats = preferences.load_pairs(str(PAIRS_FILE), skip_bad_records=True)
  train, held_out = preferences.split_by_prompt(pairs, EVAL_FRACTION, seed=0)
  tokenize = lambda part: batching.tokenize_pairs(tokenizer, part, max_length=MAX_LENGTH,
                                                  skip_bad_records=True, too_long="error")
  train_examples, train_stats = tokenize(train)
  eval_examples, _ = tokenize(held_out)
  if _TRAIN_PAIRS.value:
    train_examples = train_examples[:_TRAIN_PAIRS.value]
  return train_examples, eval_examples, {"load": load_stats, "train": train_stats}


def initial_model(config: gpt_neo.GPTNeoConfig, eos: int):
  """A seeded random `GPTNeoForSequenceClassification` (one label, pad = EOS) and its params."""
  import torch
  import transformers
  fields = config.to_hf_dict()
  fields.pop("model_type")
  fields.update(num_labels=1, pad_token_id=eos)
  torch.manual_seed(0)
  model = transformers.GPTNeoForSequenceClassification(transformers.GPTNeoConfig(**fields))
  return model, torch_params(model, config)


def torch_params(model, config) -> dict:
  return hf.hf_to_flax({k: v.detach().numpy() for k, v in model.state_dict().items()}, config)


def optimizer_config(steps: int):
  return common.optim(LR, warmup_steps=warmup_steps(steps), schedule="linear",
                      end_lr_fraction=0.0, weight_decay=0.0, clip_norm=1.0)


def warmup_steps(steps: int) -> int:
  return max(1, round(0.1 * steps))


class Ours:
  """Our reward step, compiled once (`jax.jit`, state donated) and reused by every epoch."""

  def __init__(self, config, params, examples, pad_id, group_by_length):
    self.model = gpt_neo.GPTNeo(config, score_head=True)
    self.params, self.examples, self.pad_id = params, examples, pad_id
    self.steps = math.ceil(len(examples) / BATCH)
    self.tx = optim.make_optimizer(optimizer_config(self.steps), self.steps)
    self.step = jax.jit(loop.make_train_step(
        lambda p, b, r: reward.reward_loss(self.model, p, b, r), self.tx), donate_argnums=0)
    # The reward phase's batches: its config with this benchmark's sizes.
    self.config = reward_config.get_config("hh_rlhf")
    self.config.max_length, self.config.train.batch_size, self.config.train.seed = (
        MAX_LENGTH, BATCH, 0)
    if group_by_length >= 0:
      self.config.group_by_length = group_by_length

  def batches(self) -> list[dict]:
    """The epoch's batches, built before the clock starts (as TRL's are tokenised before)."""
    return list(itertools.islice(batching.training_pair_batches(
        self.examples, self.config, pad_id=self.pad_id), self.steps))

  def train(self):
    """One epoch from the initial weights: (params, pairs, seconds, steps)."""
    epoch = self.batches()
    state = loop.create_train_state(jax.tree.map(jnp.array, self.params), self.tx,
                                    jax.random.key(0))
    start = time.perf_counter()
    for batch in epoch:
      state, metrics = self.step(state, batch)
    float(metrics["loss"])  # Waits for the last step.
    seconds = time.perf_counter() - start
    return state.params, self.steps * BATCH, seconds, self.steps


def train_trl(model, tokenizer, examples, out_dir, grouped: bool, limit: int = 0):
  """One epoch (or `limit` pairs) of TRL's RewardTrainer on the same token ids, with its default
  random sampler or its length-grouped one; returns (model, pairs, seconds, steps)."""
  import datasets
  import trl
  if limit:
    examples = examples[:limit]
  rows = []
  for e in examples:
    chosen = np.concatenate([e["prompt_ids"], e["chosen_ids"]]).tolist()
    rejected = np.concatenate([e["prompt_ids"], e["rejected_ids"]]).tolist()
    rows.append({"chosen_ids": chosen, "rejected_ids": rejected,
                 "length": max(len(chosen), len(rejected))})
  dataset = datasets.Dataset.from_list(rows)
  steps = math.ceil(len(examples) / BATCH)
  args = trl.RewardConfig(
      output_dir=str(out_dir), per_device_train_batch_size=BATCH, num_train_epochs=1,
      learning_rate=LR, lr_scheduler_type="linear", warmup_steps=warmup_steps(steps),
      weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
      max_length=MAX_LENGTH, use_cpu=True, save_strategy="no", eval_strategy="no",
      report_to="none", logging_steps=steps, disable_tqdm=True, seed=0,
      dataloader_num_workers=0,
      train_sampling_strategy="group_by_length" if grouped else "random",
      length_column_name="length",
      # TRL's RewardConfig turns gradient checkpointing on by default; ours does not remat here.
      gradient_checkpointing=False)
  trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
  # Keep the `length` column for the Trainer's length-grouped sampler (TRL drops every column but
  # its own before the sampler reads it; its collator reads only the ids).
  trainer._signature_columns = ["chosen_ids", "rejected_ids", "margin", "length"]  # pylint: disable=protected-access
  start = time.perf_counter()
  trainer.train()
  seconds = time.perf_counter() - start
  if trainer.state.global_step != steps:
    raise AssertionError(f"TRL ran {trainer.state.global_step} steps, expected {steps}")
  return model, len(examples), seconds, steps


def held_out_metrics(config, params, eval_examples, pad_id) -> dict:
  model = gpt_neo.GPTNeo(config, score_head=True)
  step = jax.jit(lambda p, b: reward.eval_sums(model, p, b))
  totals: dict[str, float] = {}
  for batch in batching.eval_pair_batches(eval_examples, batch_size=BATCH,
                                          max_length=MAX_LENGTH, pad_id=pad_id):
    for key, value in jax.device_get(step(params, batch)).items():
      totals[key] = totals.get(key, 0.0) + float(value)
  return reward.summarize_eval(totals)


def bench_hh() -> list[str]:
  import copy
  if not PAIRS_FILE.is_file():
    return [f"(skipped: no shared data at {PAIRS_FILE})"]
  tokenizer = hf.load_tokenizer(_DATA / "gpt2_tokenizer")
  train_examples, eval_examples, stats = load_data(tokenizer)
  pad = tokenizer.eos_token_id
  config = gpt_neo.GPTNeoConfig(vocab_size=len(tokenizer), bos_token_id=pad, eos_token_id=pad,
                                **ARCH)
  torch_model, params = initial_model(config, pad)
  initial = held_out_metrics(config, params, eval_examples, pad)
  ours = Ours(config, params, train_examples, pad, _GROUP.value)
  epoch = ours.batches()
  real = sum(int(b["segment_ids"].sum()) for b in epoch)
  widths = [b["input_ids"].shape[-1] for b in epoch]
  print(f"hh: {len(train_examples)} training pairs ({stats['train']['skipped']} left out), "
        f"{len(eval_examples)} held-out; model {config.num_params / 1e6:.2f}M parameters; "
        f"untrained held-out accuracy {initial['accuracy']:.3f}, prefer-longer baseline "
        f"{initial['length_baseline_accuracy']:.3f}; ours: group_by_length "
        f"{ours.config.group_by_length}, batch widths mean {np.mean(widths):.0f} "
        f"({len(set(widths))} distinct), real tokens {real / sum(b['input_ids'].size for b in epoch):.0%}"
        " of the padded batches", flush=True)

  start = time.perf_counter()
  ours.train()  # Warm-up: compiles every width of the epoch.
  print(f"hh warm-up: ours {time.perf_counter() - start:.1f} s (compiling {len(set(widths))} "
        "shapes)", flush=True)
  names = ["ours"] + [f"TRL {setting}" for setting in _TRL_SETTINGS.value]
  for name in names[1:]:
    with tempfile.TemporaryDirectory() as out_dir:
      start = time.perf_counter()
      train_trl(copy.deepcopy(torch_model), tokenizer, train_examples, out_dir,
                grouped=name.endswith("grouped"), limit=2 * BATCH)
      print(f"hh warm-up: {name} 2 steps {time.perf_counter() - start:.1f} s", flush=True)

  results: dict[str, list[tuple]] = {name: [] for name in names}
  for round_index in range(_ROUNDS.value):
    order = names if round_index % 2 == 0 else names[::-1]
    for name in order:
      if name.startswith("TRL"):
        with tempfile.TemporaryDirectory() as out_dir:
          model, *timing = train_trl(copy.deepcopy(torch_model), tokenizer, train_examples,
                                     out_dir, grouped=name.endswith("grouped"))
        trained = torch_params(model, config)
      else:
        trained, *timing = ours.train()
      accuracy = held_out_metrics(config, trained, eval_examples, pad)["accuracy"]
      results[name].append((*timing, accuracy))
      pairs, seconds, steps = timing
      print(f"hh round {round_index} {name}: {steps} steps, {pairs:.0f} pairs in {seconds:.1f} s "
            f"({pairs / seconds:.1f}/s), held-out accuracy {accuracy:.4f}", flush=True)

  rate = {name: statistics.median(r[0] / r[1] for r in runs) for name, runs in results.items()}
  lines = ["| trainer | steps | pairs/s (one epoch, median) | ours / this | "
           "held-out accuracy after the epoch |", "|---|---|---|---|---|"]
  for name, runs in results.items():
    ratio = "" if name == "ours" else f"**{rate['ours'] / rate[name]:.2f}x**"
    lines.append(f"| {name} | {runs[0][2]} | {rate[name]:.1f} | {ratio} | "
                 f"{statistics.median(r[3] for r in runs):.4f} |")
  lines.append(f"\n{len(train_examples)} training pairs, {len(eval_examples)} held-out pairs "
               f"(pairs longer than {MAX_LENGTH} tokens left out); untrained accuracy "
               f"{initial['accuracy']:.4f}, prefer-the-longer-response baseline "
               f"{initial['length_baseline_accuracy']:.4f}.")
  return lines


def main(argv):
  del argv
  run_and_print(bench_hh, _TORCH_THREADS.value)


if __name__ == "__main__":
  app.run(main)
