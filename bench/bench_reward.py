"""Reward-model training against TRL's RewardTrainer, on this machine, in one process.

  python bench/bench_reward.py                 # Anthropic HH-RLHF helpful pairs (shared data)
  python bench/bench_reward.py --rounds=2 --train_pairs=512

Both sides train the same ~7M-parameter GPT-Neo (GPT-2 vocabulary, hidden 128, 4 layers; the
same random initial weights, HF `GPTNeoForSequenceClassification` layout) for one epoch on the
same pre-tokenised pairs (prompt + response, no EOS, at most `MAX_LENGTH` tokens; longer pairs
are left out of both), batch 16 pairs, AdamW with the same warmup + linear decay and clipping:
  ours  `loop.make_train_step(reward.reward_loss)`, jitted, state donated (what the reward phase
        runs); batches padded to the fixed `MAX_LENGTH`, or with --group_by_length=G
        length-grouped and padded to a multiple of 16 (later shapes compile mid-epoch, which
        the "after step 1" figure then includes);
  TRL   `trl.RewardTrainer` on the same token ids (`chosen_ids` / `rejected_ids` columns, so TRL
        neither re-tokenises nor appends EOS), its collator padding to the longest in each batch.
Reported: pairs trained per second (whole epoch, and after step 1, which holds our compilation)
and, for both trained models, the held-out pairwise accuracy from our evaluator, next to the
"prefer the longer response" baseline. The ratio is ours / TRL of the medians.

Timings on a shared 2-core machine are noisy: the two sides alternate within each round (the
order flips every round), rounds repeat, medians are printed, with `uptime` before and after.
Needs bench/requirements.txt (trl).
"""

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
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import reward

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (medians reported).")
_TRAIN_PAIRS = flags.DEFINE_integer("train_pairs", 0, "Training pairs per epoch (0: all).")
_GROUP = flags.DEFINE_integer(
    "group_by_length", 0, "Ours: length-grouped batches (reward config's group_by_length; each "
    "batch padded to a multiple of 16, one compile per multiple); 0 pads all to MAX_LENGTH.")
_TORCH_THREADS = 2
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
  train, held_out = reward.split_by_prompt(pairs, EVAL_FRACTION, seed=0)
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


def train_ours(config, params, examples, pad_id):
  """One epoch of our reward step. Returns (params, pairs, seconds, seconds after step 1,
  pairs after step 1, steps)."""
  model = gpt_neo.GPTNeo(config, score_head=True)
  steps = math.ceil(len(examples) / BATCH)
  tx = optim.make_optimizer(optimizer_config(steps), steps)
  state = loop.create_train_state(jax.tree.map(jnp.array, params), tx, jax.random.key(0))
  step = jax.jit(loop.make_train_step(lambda p, b, r: reward.reward_loss(model, p, b, r), tx),
                 donate_argnums=0)
  batches = batching.pair_batches(examples, batch_size=BATCH, max_length=MAX_LENGTH,
                                  pad_id=pad_id, seed=0, group_by_length=_GROUP.value)
  start = time.perf_counter()
  for index in range(steps):
    state, metrics = step(state, next(batches))
    if index == 0:  # The first step includes compilation.
      float(metrics["loss"])
      after_first = time.perf_counter()
  float(metrics["loss"])
  end = time.perf_counter()
  pairs = steps * BATCH
  return state.params, pairs, end - start, end - after_first, pairs - BATCH, steps


def train_trl(model, tokenizer, examples, out_dir):
  """One epoch of TRL's RewardTrainer on the same token ids; returns as `train_ours`."""
  import datasets
  import transformers
  import trl
  dataset = datasets.Dataset.from_list([
      {"chosen_ids": np.concatenate([e["prompt_ids"], e["chosen_ids"]]).tolist(),
       "rejected_ids": np.concatenate([e["prompt_ids"], e["rejected_ids"]]).tolist()}
      for e in examples])
  steps = math.ceil(len(examples) / BATCH)
  args = trl.RewardConfig(
      output_dir=str(out_dir), per_device_train_batch_size=BATCH, num_train_epochs=1,
      learning_rate=LR, lr_scheduler_type="linear", warmup_steps=warmup_steps(steps),
      weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
      max_length=MAX_LENGTH, use_cpu=True, save_strategy="no", eval_strategy="no",
      report_to="none", logging_steps=steps, disable_tqdm=True, seed=0,
      dataloader_num_workers=0,
      # TRL's RewardConfig turns gradient checkpointing on by default; ours does not remat here.
      gradient_checkpointing=False)
  trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
  step_ends = []

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, *unused_args, **unused_kwargs):
      step_ends.append(time.perf_counter())

  trainer.add_callback(Clock())
  start = time.perf_counter()
  trainer.train()
  end = time.perf_counter()
  pairs = len(examples)
  per_step = pairs / len(step_ends)
  return model, pairs, end - start, end - step_ends[0], pairs - per_step, len(step_ends)


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
  print(f"hh: {len(train_examples)} training pairs ({stats['train']['skipped']} left out), "
        f"{len(eval_examples)} held-out; model {config.num_params / 1e6:.2f}M parameters; "
        f"untrained held-out accuracy {initial['accuracy']:.3f}, prefer-longer baseline "
        f"{initial['length_baseline_accuracy']:.3f}", flush=True)

  results: dict[str, list[tuple]] = {"ours": [], "TRL": []}
  for round_index in range(_ROUNDS.value):
    order = list(results) if round_index % 2 == 0 else list(results)[::-1]
    for name in order:
      if name == "TRL":
        with tempfile.TemporaryDirectory() as out_dir:
          model, *timing = train_trl(copy.deepcopy(torch_model), tokenizer, train_examples,
                                     out_dir)
        trained = torch_params(model, config)
      else:
        trained, *timing = train_ours(config, params, train_examples, pad)
      accuracy = held_out_metrics(config, trained, eval_examples, pad)["accuracy"]
      results[name].append((*timing, accuracy))
      pairs, seconds, steady_seconds, steady_pairs, steps = timing
      print(f"hh round {round_index} {name}: {steps} steps, {pairs:.0f} pairs in {seconds:.1f} s "
            f"({pairs / seconds:.1f}/s; after step 1 {steady_pairs / steady_seconds:.1f}/s), "
            f"held-out accuracy {accuracy:.4f}", flush=True)

  lines = ["| trainer | steps | pairs/s (whole epoch) | pairs/s (after step 1) | "
           "held-out accuracy after the epoch |", "|---|---|---|---|---|"]
  rate = lambda runs, a, b: statistics.median(r[a] / r[b] for r in runs)
  trl_rate, trl_steady = rate(results["TRL"], 0, 1), rate(results["TRL"], 3, 2)
  for name, runs in results.items():
    whole, steady = rate(runs, 0, 1), rate(runs, 3, 2)
    ratio = "" if name == "TRL" else f" (**{whole / trl_rate:.2f}x** TRL)"
    steady_ratio = "" if name == "TRL" else f" (**{steady / trl_steady:.2f}x**)"
    lines.append(f"| {name} | {runs[0][4]} | {whole:.1f}{ratio} | {steady:.1f}{steady_ratio} | "
                 f"{statistics.median(r[5] for r in runs):.4f} |")
  lines.append(f"\n{len(train_examples)} training pairs, {len(eval_examples)} held-out pairs "
               f"(pairs longer than {MAX_LENGTH} tokens left out); untrained accuracy "
               f"{initial['accuracy']:.4f}, prefer-the-longer-response baseline "
               f"{initial['length_baseline_accuracy']:.4f}.")
  return lines


def main(argv):
  del argv
  run_and_print(bench_hh, _TORCH_THREADS)


if __name__ == "__main__":
  app.run(main)
