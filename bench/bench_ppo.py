"""One PPO iteration, ours against TRL's PPOTrainer, on the same models and the same work.

  python bench/bench_ppo.py                     # both setups
  python bench/bench_ppo.py --setup=synthetic   # or --setup=dolly

An iteration is the whole of one PPO update: sample 32 new tokens for each of 16 prompts
(temperature 0.7), score the rollout with the frozen reference and reward models and the value
model, compute KL-shaped rewards and GAE, then 4 epochs of 1 minibatch (16 episodes) of clipped
policy + value losses, backward and AdamW. Ours is `ppo.ppo_iteration` compiled once (jit, state
donated: what the PPO phase runs in the loop); TRL's is one pass of the loop in
`trl.experimental.ppo.PPOTrainer.train` (trl 1.12.0, the last release that has it), timed from a
`TrainerCallback` at each step end.

Both sides get the same four Hugging Face GPT-Neo models (random init from one `GPTNeoConfig`:
policy, reference = a copy of the policy, reward = `GPTNeoForSequenceClassification`, value = a copy
of the reward model, as TRL's examples do), converted to ours with `hf.hf_to_flax`, and the same
prompts, left-padded to the same width. Neither side can stop early, so both do the full work:
TRL runs with no stop token and no EOS in the models' configs (the script checks that every
`generate` call adds exactly 32 tokens), ours with an EOS id outside the vocabulary.

Setups:
  synthetic  hidden 64, 2 layers (global, local), vocabulary 1024; 16 random prompts of 16..32
             tokens (left-padded to 32).
  dolly      the same architecture with GPT-2's vocabulary (50257) and tokenizer
             (/work/shared/data/gpt2_tokenizer); the first 16 prompts of
             /work/shared/data/dolly/dolly_sample_1k.jsonl in the SFT template, each cut to its last
             128 tokens, left-padded to the longest.

The machine is shared: the sides alternate within each round (TRL with 1 torch thread, with 2,
then ours), rounds repeat, medians of the per-iteration times are reported and the speed-up is
taken against TRL's faster thread count (the first TRL iteration of the run and our compilation
are not timed), with `uptime` before and after. Needs bench/requirements.txt (trl==1.12.0).
"""

import copy
import dataclasses
import functools
import logging
import statistics
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from common import data_dir, machine_description, uptime
from rlhf_jax.configs import common
from rlhf_jax.data import batching
from rlhf_jax.data import records as records_lib
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import ppo

_SETUP = flags.DEFINE_enum("setup", "all", ["all", "synthetic", "dolly"], "Which setup to run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (medians reported).")
_ITERATIONS = flags.DEFINE_integer("iterations", 3, "Timed PPO iterations per side and round.")

_DATA = data_dir()  # $RLHF_JAX_DATA, or the shared folder beside the repository.
# TRL is timed with 1 and with 2 torch threads: on this 2-core machine shared with other jobs, 2
# threads can be much slower (OpenMP workers wait for busy cores); the comparison takes the faster.
_TORCH_THREADS = (1, 2)
BATCH, NEW_TOKENS, EPOCHS, MINIBATCHES = 16, 32, 4, 1
TEMPERATURE, LR, KL_COEF = 0.7, 1e-5, 0.05
HIDDEN, LAYERS, HEADS = 64, 2, 4
DOLLY_MAX_PROMPT = 128


@dataclasses.dataclass(frozen=True)
class Setup:
  """What both sides share: the architecture, the prompts and the tokenizer TRL pads with."""
  name: str
  vocab_size: int
  prompts: list[list[int]]  # Unpadded token ids, 16 rows.
  tokenizer: Any  # HF tokenizer; its pad id never reaches a model (TRL masks it to 0).

  @property
  def never_sampled(self) -> int:
    """A token id outside the vocabulary: as EOS it can never end a row."""
    return self.vocab_size


def gpt2_tokenizer():
  tokenizer = hf.load_tokenizer(_DATA / "gpt2_tokenizer")  # pad = eos (50256).
  tokenizer.padding_side = "left"
  return tokenizer


def synthetic_setup() -> Setup:
  rng = np.random.default_rng(0)
  vocab = 1024
  prompts = [rng.integers(0, vocab, n).tolist() for n in rng.integers(16, 33, BATCH)]
  # GPT-2's pad id (50256) lies outside this vocabulary, so it never occurs in prompts or samples.
  return Setup("synthetic (vocab 1024)", vocab, prompts, gpt2_tokenizer())


def dolly_setup() -> Setup:
  path = _DATA / "dolly" / "dolly_sample_1k.jsonl"
  if not path.exists():
    raise SystemExit(f"{path} not found (see /work/shared/data/SOURCES.md)")
  records, _ = records_lib.load_records(str(path))
  texts = [batching.format_prompt(r["instruction"], r.get("context", "")) for r in records[:BATCH]]
  tokenizer = gpt2_tokenizer()
  ids, mask = batching.prompt_batch(tokenizer, texts, DOLLY_MAX_PROMPT)
  prompts = [row[m > 0].tolist() for row, m in zip(ids, mask)]
  return Setup("Dolly + GPT-2 tokenizer (vocab 50257)", len(tokenizer), prompts, tokenizer)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """int32 ids [B, P] and float32 mask [B, P], P = the longest prompt."""
  width = max(len(p) for p in prompts)
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.float32)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt):] = prompt
    mask[row, width - len(prompt):] = 1.0
  return ids, mask


@dataclasses.dataclass(frozen=True)
class HFModels:
  policy: Any
  reference: Any
  reward: Any
  value: Any


def hf_models(setup: Setup) -> HFModels:
  """Random-init HF GPT-Neo policy/reference/reward/value from one config."""
  config = transformers.GPTNeoConfig(
      vocab_size=setup.vocab_size, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
      attention_types=[[["global", "local"], LAYERS // 2]], window_size=256,
      max_position_embeddings=2048, embed_dropout=0.0, attention_dropout=0.0,
      # No EOS: nothing ends a row early. No pad id either: neither side's models use it (TRL pads
      # and masks with the tokenizer's pad id, ours with the prompt mask).
      resid_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None, num_labels=1)
  torch.manual_seed(0)
  policy = transformers.GPTNeoForCausalLM(config)
  torch.manual_seed(1)
  reward = transformers.GPTNeoForSequenceClassification(config)
  return HFModels(policy=policy, reference=copy.deepcopy(policy), reward=reward,
                  value=copy.deepcopy(reward))


def to_flax(model) -> tuple[gpt_neo.GPTNeoConfig, dict]:
  config = gpt_neo.GPTNeoConfig.from_hf_dict(model.config.to_dict())
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return config, jax.tree.map(jnp.asarray, hf.hf_to_flax(tensors, config))


class Ours:
  """`ppo.ppo_iteration` compiled with the state donated, as the PPO phase runs it."""

  def __init__(self, setup: Setup, models: HFModels):
    config, policy_params = to_flax(models.policy)
    _, reward_params = to_flax(models.reward)
    policy, reward = gpt_neo.GPTNeo(config), gpt_neo.GPTNeo(config, score_head=True)
    settings = ppo.PPOSettings(
        sampling=decode.SamplingSettings(
            max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE,
            eos_token_id=setup.never_sampled, pad_token_id=setup.tokenizer.pad_token_id),
        num_epochs=EPOCHS, num_minibatches=MINIBATCHES, adaptive_kl=False,
        normalize_scores=False)
    # TRL's optimizer: AdamW (eps 1e-8, no weight decay), constant rate, no gradient clipping.
    tx = optim.make_optimizer(common.optim(LR, schedule="constant", eps=1e-8, clip_norm=0.0),
                              total_steps=1000)
    learner = jax.tree.map(jnp.copy, {"policy": policy_params, "value": reward_params})
    state = loop.create_train_state(learner, tx, jax.random.key(0),
                                    extra={"kl_coef": jnp.float32(KL_COEF),
                                           "reward_stats": {"mean": jnp.float32(0.0),
                                                            "std": jnp.float32(1.0)}})
    self.state = state.replace(params=state.params["policy"],
                               extra={**state.extra, "value": state.params["value"]})
    self.frozen = {"reference": policy_params, "reward": reward_params}
    ids, mask = left_pad(setup.prompts, setup.tokenizer.pad_token_id)
    self.batch = {"prompt_ids": ids, "prompt_mask": mask}
    ppo_models = ppo.Models(policy=policy, reference=policy, value=reward, reward=reward)
    self.step = jax.jit(functools.partial(ppo.ppo_iteration, models=ppo_models, settings=settings,
                                          tx=tx), donate_argnums=0)

  def run(self, iterations: int) -> list[float]:
    times = []
    for _ in range(iterations):
      start = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch, self.frozen)
      lengths = float(metrics["response_length"])  # Waits for the iteration.
      times.append(time.perf_counter() - start)
      assert lengths == NEW_TOKENS, lengths
    return times


class Trl:
  """TRL's PPOTrainer on the same models and prompts; `run` calls `train()` for N iterations."""

  def __init__(self, setup: Setup, models: HFModels, output_dir: str):
    import datasets
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    timer = self.timer = IterationTimer()
    dataset = datasets.Dataset.from_dict({"input_ids": setup.prompts})
    self.args = PPOConfig(
        output_dir=output_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        num_mini_batches=MINIBATCHES, num_ppo_epochs=EPOCHS, response_length=NEW_TOKENS,
        temperature=TEMPERATURE, learning_rate=LR, lr_scheduler_type="constant",
        kl_coef=KL_COEF, stop_token=None, stop_token_id=None, missing_eos_penalty=None,
        local_rollout_forward_batch_size=BATCH, num_sample_generations=0, total_episodes=BATCH,
        report_to="none", save_strategy="no", disable_tqdm=True, logging_strategy="no",
        seed=0, use_cpu=True)
    self.trainer = PPOTrainer(
        args=self.args, processing_class=setup.tokenizer, model=models.policy,
        ref_model=models.reference, reward_model=models.reward, value_model=models.value,
        train_dataset=dataset, eval_dataset=dataset, callbacks=[timer])
    self.trainer.log = lambda *args, **kwargs: None  # No console logging inside timed steps.
    transformers.logging.set_verbosity_error()
    # Watch TRL's sampling: how many tokens each call adds and how long it takes.
    self.generate_calls = []
    generate = models.policy.generate

    def watched_generate(*args, **kwargs):
      start = time.perf_counter()
      out = generate(*args, **kwargs)
      self.generate_calls.append((out.sequences.shape[1] - kwargs["input_ids"].shape[1],
                                  time.perf_counter() - start))
      return out
    models.policy.generate = watched_generate

  def run(self, iterations: int) -> tuple[list[float], list[float]]:
    """Per-iteration times and, per iteration, the time spent in `generate`."""
    self.args.total_episodes = BATCH * iterations
    self.args.num_total_batches = iterations
    self.timer.reset()
    self.generate_calls = []
    self.trainer.train()
    new_tokens = {n for n, _ in self.generate_calls}
    assert new_tokens == {NEW_TOKENS}, new_tokens  # Equal work: no early stop on TRL's side.
    return self.timer.durations(), [t for _, t in self.generate_calls]


class IterationTimer(transformers.TrainerCallback):
  """Stamps the start of training and the end of every PPO iteration (TRL's `step`)."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.stamps = []

  def on_train_begin(self, args, state, control, **kwargs):
    self.stamps.append(time.perf_counter())

  def on_step_end(self, args, state, control, **kwargs):
    self.stamps.append(time.perf_counter())

  def durations(self) -> list[float]:
    return list(np.diff(self.stamps))


def bench(setup: Setup) -> str:
  models = hf_models(setup)
  ours = Ours(setup, models)
  with tempfile.TemporaryDirectory() as output_dir:
    theirs = Trl(setup, models, output_dir)
    start = time.perf_counter()
    ours.run(1)  # Compilation.
    compile_s = time.perf_counter() - start
    theirs.run(1)  # Warm-up (allocator, first-call overheads).
    timed = {"ours": [], **{f"trl{n}": [] for n in _TORCH_THREADS},
             **{f"trl{n}_generate": [] for n in _TORCH_THREADS}}
    for round_index in range(_ROUNDS.value):
      line = []
      for threads in _TORCH_THREADS:
        torch.set_num_threads(threads)
        times, generate = theirs.run(_ITERATIONS.value)
        timed[f"trl{threads}"] += times
        timed[f"trl{threads}_generate"] += generate
        line.append(f"TRL {threads} thread(s) " + ", ".join(f"{t:.2f}" for t in times))
      times = ours.run(_ITERATIONS.value)
      timed["ours"] += times
      line.append("ours " + ", ".join(f"{t:.3f}" for t in times))
      print(f"{setup.name} round {round_index}: " + "; ".join(line) + " s", flush=True)
  median = {k: statistics.median(v) for k, v in timed.items()}
  # The comparison is against TRL at its faster thread count (the more conservative speed-up).
  best = min(_TORCH_THREADS, key=lambda n: median[f"trl{n}"])
  trl_s, trl_min = median[f"trl{best}"], min(timed[f"trl{best}"])
  ours_s, ours_min = median["ours"], min(timed["ours"])
  trl_cells = " | ".join(f"{median[f'trl{n}']:.2f} s ({median[f'trl{n}_generate']:.2f} s)"
                         for n in _TORCH_THREADS)
  prompt_width = max(len(p) for p in setup.prompts)
  return (f"| {setup.name} | {prompt_width} + {NEW_TOKENS} | {trl_cells} | {ours_s:.3f} s | "
          f"{trl_s / ours_s:.1f}x ({trl_min / ours_min:.1f}x) | {compile_s:.0f} s |")


def main(argv):
  del argv
  # accelerate logs an INFO line per gathered metric; keep the output to the measurements.
  logging.getLogger("accelerate").setLevel(logging.ERROR)
  print(machine_description())
  print("load before:", uptime(), flush=True)
  rows = ["| setup | tokens per row (prompt + new) | "
           + " | ".join(f"TRL, {n} torch thread(s): s/iteration (of which generate)"
                        for n in _TORCH_THREADS)
           + " | ours s/iteration | speed-up vs TRL's faster, medians (best iterations) | "
           "our compile |", "|---|---|" + "---|" * len(_TORCH_THREADS) + "---|---|---|"]
  if _SETUP.value in ("all", "synthetic"):
    rows.append(bench(synthetic_setup()))
  if _SETUP.value in ("all", "dolly"):
    rows.append(bench(dolly_setup()))
  print("load after:", uptime())
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
