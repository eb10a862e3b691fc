"""One GRPO iteration, ours against TRL 1.16's GRPOTrainer, in one process (issue #22).

  python bench/bench_grpo.py                       # 3 rounds x 3 timed iterations per side
  python bench/bench_grpo.py --rounds=1 --iterations=1      # a quick smoke run

An iteration: 16 prompts, 4 answers each (group size 4) of exactly 32 new tokens sampled at
temperature 0.7, the answers decoded and scored on the host by the same Python reward function,
advantages normalised within each prompt's group (mean and std, TRL scale_rewards="group"), the
reference model's log-probabilities for the k3 KL loss term (beta 0.04), then ONE optimizer step
(AdamW, lr 1e-5 constant, eps 1e-8, no weight decay, gradients clipped at norm 1) on the clipped
policy loss, GRPO's per-answer length normalisation (TRL loss_type="grpo"):
  ours  what `--phase=grpo` runs: configs/grpo.py (advantage_estimator grpo, kl_penalty loss,
        kl_estimator k3, loss_normalization sequence_mean, no value model) with the sizes above,
        `ppo.settings_from_config`, and `ppo.HostRewardStep` (compiled rollout -> host reward ->
        compiled update, the state donated);
  TRL   `trl.GRPOTrainer` (num_generations 4, per_device_train_batch_size 64 completions,
        steps_per_generation 1, num_iterations 1: one optimizer step per generation, as ours),
        loss_type "grpo", beta 0.04, epsilon 0.2, no gradient checkpointing, torch on the CPU.
Both sides get the same model: a seeded random HF `GPTNeoForCausalLM` (GPT-2 vocabulary, hidden
128, 4 layers, as the DPO benchmark's) saved to a directory, which TRL loads as policy and as
reference and ours converts with `hf.hf_to_flax`; the same prompts (the first 16 Dolly records
whose SFT-template prompt has at most 64 GPT-2 tokens; TRL tokenises the text, ours gets the same
ids, left-padded to the longest on both sides); the same reward function (`reward_function`:
distinct words per answer, a cheap deterministic function of the decoded text). Neither side
can stop early: ours samples with an EOS id outside the vocabulary, TRL with
`min_new_tokens=32` (the script checks TRL's mean completion length is 32).

Timing: TRL runs ONE `train()` of 1 + rounds x len(torch threads) x iterations steps; a
`TrainerCallback` stamps every step end (so each TRL step's time is generation + scoring +
forward/backward + optimizer + the Trainer's own bookkeeping) and, after each round's TRL
steps, runs our iterations (timed apart, TRL's clock restarted after them). Warm-up excluded:
TRL's first step and our first iteration (its compilation, printed). TRL is timed with 1 and 2
torch threads (on a shared 2-core machine 2 threads can be slower) and the ratio is taken
against its faster setting. Medians and best iterations; `uptime` before and after.
Needs bench/requirements-trl116.txt (trl 1.16).
"""

import dataclasses
import logging
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
from rlhf_jax.configs import grpo as grpo_config
from rlhf_jax.data import batching
from rlhf_jax.data import records as records_lib
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import ppo

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (medians reported).")
_ITERATIONS = flags.DEFINE_integer("iterations", 3, "Timed iterations per side, setting, round.")
_THREADS = flags.DEFINE_list("torch_threads", ["1", "2"], "torch thread counts TRL is timed at.")

_DATA = data_dir()  # $RLHF_JAX_DATA, or the shared folder beside the repository.
PROMPTS, GROUP, NEW_TOKENS, MAX_PROMPT = 16, 4, 32, 64
TEMPERATURE, LR, BETA, CLIP = 0.7, 1e-5, 0.04, 0.2
ARCH = dict(hidden_size=128, num_layers=4, num_heads=4,
            attention_types=[[["global", "local"], 2]], window_size=256,
            max_position_embeddings=256)
SOURCE = "distinct_words"


def reward_function(completions: list[str]) -> list[float]:
  """The benchmark's reward: distinct whitespace-separated words per answer, / 10."""
  return [len(set(text.split())) / 10.0 for text in completions]


def prompts_and_tokenizer():
  """The first `PROMPTS` Dolly prompts (SFT template) of at most `MAX_PROMPT` tokens."""
  path = _DATA / "dolly" / "dolly_sample_1k.jsonl"
  if not path.exists():
    raise SystemExit(f"{path} not found (see /work/shared/data/SOURCES.md)")
  tokenizer = hf.load_tokenizer(_DATA / "gpt2_tokenizer")  # pad = eos (50256).
  records, _ = records_lib.load_records(str(path))
  prompts = []
  for record in records:
    text = batching.record_prompt(record)
    if len(tokenizer(text)["input_ids"]) <= MAX_PROMPT:
      prompts.append(text)
    if len(prompts) == PROMPTS:
      return prompts, tokenizer
  raise SystemExit(f"fewer than {PROMPTS} short prompts in {path}")


def save_model(tokenizer, directory: str):
  """A seeded random HF GPT-Neo causal LM saved to `directory` (no dropout); returns it."""
  import torch
  import transformers
  config = transformers.GPTNeoConfig(
      vocab_size=len(tokenizer), embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **ARCH)
  torch.manual_seed(0)
  model = transformers.GPTNeoForCausalLM(config)
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return model


class Ours:
  """What `--phase=grpo` runs, on the benchmark's model, prompts and reward function."""

  def __init__(self, hf_model, tokenizer, prompts: list[str]):
    config = grpo_config.get_config()
    config.reward.sources = SOURCE
    config.rollout.update(dict(samples_per_prompt=GROUP, max_new_tokens=NEW_TOKENS,
                               temperature=TEMPERATURE, max_prompt_length=MAX_PROMPT))
    config.ppo.update(dict(num_minibatches=1, num_epochs=1, init_kl_coef=BETA, clip_range=CLIP))
    config.optim = common.optim(LR, schedule="constant", eps=1e-8, weight_decay=0.0,
                                clip_norm=1.0)
    config.train.update(dict(steps=1000, batch_size=PROMPTS))
    settings = ppo.settings_from_config(config, tokenizer, ((SOURCE, 1.0),))
    # No early stop: an EOS id outside the vocabulary is never sampled (TRL: min_new_tokens).
    self.settings = dataclasses.replace(settings, sampling=dataclasses.replace(
        settings.sampling, eos_token_id=len(tokenizer)))
    assert self.settings.advantage_estimator == "grpo" and not self.settings.uses_critic
    model_config = gpt_neo.GPTNeoConfig.from_hf_dict(hf_model.config.to_dict())
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = jax.tree.map(jnp.asarray, hf.hf_to_flax(tensors, model_config))
    policy = gpt_neo.GPTNeo(model_config)
    models = ppo.Models(policy=policy, reference=policy, value=None, reward=None)
    tx = ppo.make_optimizer(config)
    mesh = sharding.mesh_from_config(config.mesh)
    state = loop.create_train_state({"policy": jax.tree.map(jnp.copy, params), "value": {}}, tx,
                                    jax.random.key(0),
                                    extra={"kl_coef": jnp.float32(BETA),
                                           "reward_stats": {"mean": jnp.float32(0.0),
                                                            "std": jnp.float32(1.0)}})
    state = state.replace(params=state.params["policy"], extra={**state.extra, "value": {}})
    shardings = loop.state_shardings(
        state, sharding.param_shardings(gpt_neo.logical_axes(policy),
                                        gpt_neo.param_shapes(policy), mesh), mesh)
    self.state = jax.device_put(state, shardings)
    self.frozen = {"reference": params, "reward": None}
    ids, mask = batching.prompt_batch(tokenizer, prompts, MAX_PROMPT, truncate=False)
    width = int(mask.sum(axis=1).max())  # Left-padded to the longest prompt, as TRL pads.
    self.batch = {"prompt_ids": ids[:, -width:], "prompt_mask": mask[:, -width:],
                  "record_index": np.arange(len(prompts), dtype=np.int32)}
    self.step = ppo.HostRewardStep(
        models=models, settings=self.settings, tx=tx, tokenizer=tokenizer,
        host_rewards=lambda indices, responses: {SOURCE: np.asarray(
            reward_function(list(responses)), np.float32)},
        state_shardings=shardings, mesh=mesh)

  def breakdown(self, iterations: int) -> dict[str, float]:
    """Median seconds of each part of `HostRewardStep` (rollout, host decode + reward, the
    compiled scoring + update), each waited for: where our iteration's time goes."""
    parts = {"rollout": [], "host": [], "learn": []}
    step = self.step
    for _ in range(iterations):
      start = time.perf_counter()
      rolled, keys = jax.block_until_ready(step.rollout(self.state, self.batch))
      parts["rollout"].append(time.perf_counter() - start)
      start = time.perf_counter()
      scores = step.host_rewards(np.repeat(self.batch["record_index"], GROUP),
                                 step.responses(rolled))
      scores = sharding.global_batch({k: np.asarray(v, np.float32) for k, v in scores.items()},
                                     step.mesh)
      parts["host"].append(time.perf_counter() - start)
      start = time.perf_counter()
      self.state, metrics = jax.block_until_ready(
          step.learn(self.state, self.frozen, rolled, keys, scores))
      parts["learn"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in parts.items()}

  def run(self, iterations: int) -> list[float]:
    times = []
    for _ in range(iterations):
      start = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch, self.frozen)
      length = float(metrics["response_length"])  # Waits for the iteration.
      times.append(time.perf_counter() - start)
      assert length == NEW_TOKENS, length
    return times


def trl_trainer(model_dir: str, tokenizer, prompts: list[str], out_dir: str, steps: int,
                callback):
  import datasets
  import transformers
  import trl
  args = trl.GRPOConfig(
      output_dir=out_dir, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
      steps_per_generation=1, num_iterations=1, gradient_accumulation_steps=1,
      max_completion_length=NEW_TOKENS, temperature=TEMPERATURE, top_k=0, top_p=1.0,
      generation_kwargs={"min_new_tokens": NEW_TOKENS},
      beta=BETA, loss_type="grpo", scale_rewards="group", epsilon=CLIP,
      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
      adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
      max_steps=steps, gradient_checkpointing=False, disable_dropout=True, bf16=False,
      use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
      log_completions=False, shuffle_dataset=False, seed=0, dataloader_num_workers=0)
  def distinct_words(prompts, completions, **unused_kwargs):
    del prompts
    return reward_function(completions)

  trainer = trl.GRPOTrainer(
      model=model_dir, reward_funcs=distinct_words, args=args,
      train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
      callbacks=[callback])
  # Logged every step (each step's completion lengths are checked), but not printed.
  trainer.remove_callback(transformers.PrinterCallback)
  return trainer


class Interleave:
  """A TrainerCallback (built lazily: transformers is imported inside) that stamps TRL's step
  ends, sets torch's thread count per block of steps, and runs our iterations between rounds."""

  def __new__(cls, ours: Ours, threads: list[int]):
    import torch
    import transformers

    class Callback(transformers.TrainerCallback):

      def __init__(self):
        self.plan = [None]  # Step 1: warm-up.
        for _ in range(_ROUNDS.value):
          for n in threads:
            self.plan += [n] * _ITERATIONS.value
        self.trl = {n: [] for n in threads}
        self.ours, self.compile_s, self.step = [], None, 0

      def on_train_begin(self, *unused_args, **unused_kwargs):
        torch.set_num_threads(threads[0])
        self.last = time.perf_counter()

      def on_step_end(self, *unused_args, **unused_kwargs):
        now = time.perf_counter()
        setting = self.plan[self.step]
        if setting is not None:
          self.trl[setting].append(now - self.last)
        self.step += 1
        if setting is None:  # After TRL's warm-up step: compile ours.
          start = time.perf_counter()
          ours.run(1)
          self.compile_s = time.perf_counter() - start
        elif (self.step - 1) % (len(threads) * _ITERATIONS.value) == 0:  # A round's TRL is done.
          times = ours.run(_ITERATIONS.value)
          self.ours += times
          print(f"round {len(self.ours) // _ITERATIONS.value - 1}: TRL " + "; ".join(
              f"{n} thread(s) " + ", ".join(f"{t:.2f}" for t in self.trl[n][-_ITERATIONS.value:])
              for n in threads) + " s; ours " + ", ".join(f"{t:.3f}" for t in times) + " s",
                flush=True)
        if self.step < len(self.plan):
          torch.set_num_threads(self.plan[self.step])
        self.last = time.perf_counter()

    return Callback()


def bench() -> list[str]:
  import torch
  prompts, tokenizer = prompts_and_tokenizer()
  threads = [int(n) for n in _THREADS.value]
  with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as out_dir:
    hf_model = save_model(tokenizer, model_dir)
    ours = Ours(hf_model, tokenizer, prompts)
    callback = Interleave(ours, threads)
    trainer = trl_trainer(model_dir, tokenizer, prompts, out_dir, len(callback.plan), callback)
    # Where TRL's time goes: its `generate` calls, timed (one per step).
    generate, generate_s = trainer.model.generate, []

    def timed_generate(*args, **kwargs):
      start = time.perf_counter()
      out = generate(*args, **kwargs)
      generate_s.append((torch.get_num_threads(), time.perf_counter() - start))
      return out
    trainer.model.generate = timed_generate
    print(f"{len(prompts)} prompts of {int(ours.batch['prompt_mask'].sum(1).min())}.."
          f"{ours.batch['prompt_ids'].shape[1]} tokens x {GROUP} answers x {NEW_TOKENS} new "
          f"tokens; model {hf_model.num_parameters() / 1e6:.2f}M parameters", flush=True)
    trainer.train()
    parts = ours.breakdown(_ITERATIONS.value)
  logs = trainer.state.log_history
  lengths = {entry.get("completions/mean_length") for entry in logs} - {None}
  assert lengths == {float(NEW_TOKENS)}, lengths  # Equal work: TRL never stopped early.
  generated = {m: [t for n, t in generate_s[1:] if n == m] for m in threads}
  median = {n: statistics.median(callback.trl[n]) for n in threads}
  best = min(threads, key=lambda n: median[n])
  ours_s = statistics.median(callback.ours)
  trl_cells = " | ".join(f"{median[n]:.2f} s" for n in threads)
  return [
      "| setup | " + " | ".join(f"TRL 1.16, {n} torch thread(s): s/iteration" for n in threads)
      + " | ours s/iteration | speed-up vs TRL's faster: medians (best iterations) | "
      "our compile (once) |",
      "|---|" + "---|" * len(threads) + "---|---|---|",
      f"| {PROMPTS} prompts x {GROUP} answers x {NEW_TOKENS} tokens | {trl_cells} | "
      f"{ours_s:.3f} s | **{median[best] / ours_s:.1f}x** "
      f"({min(callback.trl[best]) / min(callback.ours):.1f}x) | {callback.compile_s:.0f} s |",
      f"\n{len(callback.ours)} timed iterations of ours, {len(callback.trl[best])} of TRL per "
      f"thread setting; TRL's mean completion length {lengths}.",
      "Where the time goes (medians): TRL's `generate` "
      + ", ".join(f"{statistics.median(generated[m]):.2f} s at {m} thread(s)"
                  for m in threads if generated[m])
      + f" ({len(generate_s)} calls seen); ours: rollout (compiled sampler) {parts['rollout']:.3f} s, host decode + reward "
      f"{parts['host']:.3f} s, compiled scoring + advantages + update {parts['learn']:.3f} s.",
  ]


def main(argv):
  del argv
  # accelerate logs an INFO line per gathered metric; keep the output to the measurements.
  logging.getLogger("accelerate").setLevel(logging.ERROR)
  run_and_print(bench, int(_THREADS.value[0]))


if __name__ == "__main__":
  app.run(main)
