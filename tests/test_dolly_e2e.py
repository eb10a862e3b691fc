"""The README's GPT-Neo on Dolly command sequence, end to end through the binary, on real records.

The commands are the README's "GPT-Neo 125M from the hub, SFT on databricks-dolly-15k, reward
model, PPO, eval" sequence, as the `gpt_neo_125m` config variants define it, followed by the export
of the policy and of the reward model. This test's commands and the README's differ only in
  * stand-ins: a small random-init Hugging Face GPT-Neo directory built here (2 layers, width 64,
    GPT-Neo's global/local attention, the GPT-2 tokenizer of the shared data) for
    `EleutherAI/gpt-neo-125M`; the shared real Dolly records `dolly/dolly_sample_1k.jsonl` for
    `databricks/databricks-dolly-15k` (`--config.data.source=`); a temporary `--workdir`;
  * step counts and sizes, so it runs in minutes on 2 CPU cores: `OVERRIDES` below lists every
    one (steps, batch sizes, held-out and evaluation prompts, sampled tokens, one policy draw per
    record, `max_length` 1024 -> 640, which the file's longest instruction, 559 tokens, still
    fits). Every data rule stays the variants' own, so each real record goes through the same
    fitting (contexts cut, responses cut, counted) as in the README's run, and no
    `skip_bad_records` is needed.
It finishes by loading both exports with `transformers` and checking their logits against the
Orbax checkpoints, loaded with the project's loader (`checkpoints.load_model`).

The shared data folder is $RLHF_JAX_DATA, by default `../shared/data` beside the repository; the
test is skipped when it is missing.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("RLHF_JAX_DATA", REPO.parent / "shared" / "data"))
DOLLY = DATA / "dolly" / "dolly_sample_1k.jsonl"
TOKENIZER = DATA / "gpt2_tokenizer"

# Everything this test sets beyond the README's commands, per phase: step counts and sizes. The
# windows shrink only as far as the records of dolly_sample_1k.jsonl allow (its longest
# instruction is 559 tokens); every record still goes through the fitting rules.
OVERRIDES = {
    "sft": ["--config.train.steps=2", "--config.train.batch_size=2",
            "--config.train.eval_at_start=False", "--config.eval_batch_size=2",
            "--config.data.validation_fraction=0.01", "--config.max_length=640"],
    "reward": ["--config.train.steps=2", "--config.train.batch_size=2",
               "--config.train.eval_at_start=False", "--config.eval_batch_size=16",
               "--config.data.validation_fraction=0.01", "--config.max_length=640",
               "--config.group_by_length=0", "--config.pairs.policy_max_new_tokens=8",
               "--config.pairs.policy_tries=1", "--config.pairs.policy_batch_size=128",
               "--config.stats_samples=8"],
    "ppo": ["--config.train.steps=1", "--config.train.batch_size=4",
            "--config.train.eval_at_start=False", "--config.rollout.max_new_tokens=8",
            "--config.eval_prompts=4", "--config.eval_batch_size=4",
            "--config.data.validation_fraction=0.01", "--config.ppo.normalize_samples=8"],
    "eval": ["--config.eval_prompts=4", "--config.eval_batch_size=4", "--config.best_of_n=2",
             "--config.overoptimization_samples=2", "--config.sampling.max_new_tokens=8",
             "--config.num_samples=2"],
}


def _run(workdir: pathlib.Path, *args: str) -> str:
  """Runs the binary; fails the test with its output unless it succeeds. Returns stdout."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             RLHF_JAX_DATA=str(DATA))
  command = [sys.executable, "-m", "rlhf_jax.main", *args, f"--workdir={workdir}"]
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, (" ".join(command), done.stdout[-3000:], done.stderr[-3000:])
  return done.stdout


def _random_gpt_neo(path: pathlib.Path) -> None:
  """A small random-init HF GPT-Neo with the shared GPT-2 tokenizer: EleutherAI/gpt-neo-125M's
  architecture (global/local attention, GPT-2 vocabulary, 2048 positions) at width 64."""
  import torch
  import transformers
  config = transformers.GPTNeoConfig(
      vocab_size=50257, hidden_size=64, num_layers=2, num_heads=4,
      attention_types=[[["global", "local"], 1]], window_size=256, max_position_embeddings=2048,
      intermediate_size=256, bos_token_id=50256, eos_token_id=50256)
  torch.manual_seed(0)
  transformers.GPTNeoForCausalLM(config).save_pretrained(path)
  transformers.AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(path)


@pytest.mark.slow
def test_readme_gpt_neo_commands_on_real_dolly_records(tmp_path):
  if not (DOLLY.is_file() and TOKENIZER.is_dir()):
    pytest.skip(f"shared data not found at {DATA} (set RLHF_JAX_DATA)")
  import torch
  import transformers

  from rlhf_jax import checkpoints
  from rlhf_jax.models import gpt_neo

  hub_stand_in, workdir = tmp_path / "gpt-neo-random", tmp_path / "neo"
  _random_gpt_neo(hub_stand_in)
  data = f"--config.data.source={DOLLY}"

  _run(workdir, "--phase=import", f"--config.hf_model={hub_stand_in}")
  out = _run(workdir, "--phase=sft", "--config=configs/sft.py:gpt_neo_125m", data,
             *OVERRIDES["sft"])
  # Long contexts are fitted, not rejected, and the fitting is counted.
  assert "contexts truncated" in out and "responses truncated" in out, out
  out = _run(workdir, "--phase=reward", "--config=configs/reward.py:gpt_neo_125m", data,
             *OVERRIDES["reward"])
  assert "truncated" in out and "held-out pairwise accuracy" in out, out
  _run(workdir, "--phase=ppo", "--config=configs/ppo.py:gpt_neo_125m", data, *OVERRIDES["ppo"])
  _run(workdir, "--phase=eval", "--config=configs/eval.py:gpt_neo_125m", data,
       *OVERRIDES["eval"])
  report = json.loads((workdir / "eval" / "eval.json").read_text())
  assert {"SFT", "RLHF"} <= set(report["systems"]), report["systems"].keys()
  _run(workdir, "--phase=export", f"--config.checkpoint={workdir / 'ppo'}",
       f"--config.hf_out={workdir / 'hf_policy'}")
  _run(workdir, "--phase=export", f"--config.checkpoint={workdir / 'reward'}",
       f"--config.hf_out={workdir / 'hf_reward'}")

  # Both exports load with transformers and compute what the Orbax checkpoints compute.
  tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "hf_policy")
  texts = ["### Instruction:\nWhat is Dolly?\n\n### Response:\nA data set.",
           "### Instruction:\nName a river.\n\n### Response:\nThe Rhine"]
  encoded = [tokenizer(t)["input_ids"] for t in texts]
  width = max(map(len, encoded))
  ids = np.full((len(texts), width), tokenizer.eos_token_id, np.int32)  # Right-padded.
  segments = np.zeros_like(ids)
  for row, tokens in enumerate(encoded):
    ids[row, :len(tokens)], segments[row, :len(tokens)] = tokens, 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)

  policy = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf_policy").eval()
  with torch.no_grad():
    expected = policy(torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(segments)).logits.numpy()
  loaded = checkpoints.load_model(workdir / "ppo")
  ours = gpt_neo.GPTNeo(loaded["config"]).apply({"params": loaded["params"]}, ids, segments,
                                                positions)["logits"]
  real = segments > 0
  np.testing.assert_allclose(np.asarray(ours)[real], expected[real], atol=2e-4, rtol=1e-4)

  reward = transformers.AutoModelForSequenceClassification.from_pretrained(
      workdir / "hf_reward").eval()
  with torch.no_grad():
    expected = reward(torch.tensor(ids, dtype=torch.long)).logits[:, 0].numpy()
  loaded = checkpoints.load_model(workdir / "reward")
  model = gpt_neo.GPTNeo(loaded["config"], score_head=True)
  out = model.apply({"params": loaded["params"]}, ids, segments, positions, lm_head=False)
  np.testing.assert_allclose(np.asarray(gpt_neo.sequence_scores(out["scores"], segments)),
                             expected, atol=1e-4)
