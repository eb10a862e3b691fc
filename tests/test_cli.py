"""The binary end to end (subprocesses, offline): import, export, generate, and one-line errors."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import torch
import transformers

from rlhf_jax.data import batching

from conftest import load_cleanly

REPO = pathlib.Path(__file__).resolve().parents[1]
NEW_TOKENS = 32


def run_binary(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  """`python -m rlhf_jax.main ARGS` with the hub switched off, as a user would run it offline."""
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def policy_dir(make_hf_gpt_neo, tiny_tokenizer_dir):
  """A tiny HF causal LM saved with the tiny tokenizer (vocabulary sizes agree)."""
  vocab = len(transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
  return make_hf_gpt_neo(attention_layers=("global", "local"), window_size=4, vocab_size=vocab,
                         tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def imported(policy_dir, tmp_path_factory) -> pathlib.Path:
  """WORKDIR after `--phase=import` of `policy_dir`."""
  workdir = tmp_path_factory.mktemp("cli_work")
  result = run_binary("--phase=import", f"--config.hf_model={policy_dir.path}", f"--workdir={workdir}")
  assert "import:" in result.stdout
  return workdir


def test_import_writes_a_finished_checkpoint_with_tokenizer(imported):
  checkpoint = imported / "import" / "checkpoint"
  assert (checkpoint / "tokenizer" / "tokenizer.json").is_file()
  assert [p.name for p in checkpoint.iterdir() if p.name.isdigit()] == ["0"]
  # A second run finds the finished output and skips.
  again = run_binary("--phase=import", f"--config.hf_model={checkpoint}", f"--workdir={imported}")
  assert "holds a finished checkpoint; skipping" in again.stdout  # On stdout, like every phase.


def test_export_round_trip_is_bit_identical(policy_dir, imported, tmp_path):
  run_binary("--phase=export", f"--config.checkpoint={imported / 'import'}",
             f"--config.hf_out={tmp_path}", f"--workdir={imported}")
  loaded = load_cleanly(transformers.AutoModelForCausalLM, tmp_path)
  original = policy_dir.model.state_dict()
  assert loaded.state_dict().keys() == original.keys()
  for name, value in original.items():
    assert torch.equal(loaded.state_dict()[name], value), name
  ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 21]])
  with torch.no_grad():
    assert torch.equal(loaded(ids).logits, policy_dir.model(ids).logits)
  assert (tmp_path / "PROMPT_TEMPLATE.md").read_text().startswith("# Prompt format")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert tokenizer("Hello world")["input_ids"] == \
      transformers.AutoTokenizer.from_pretrained(str(policy_dir.path))("Hello world")["input_ids"]
  # The export phase ships the prompt template as the tokenizer's chat template.
  message = {"role": "user", "content": "Name a planet.", "context": "Mars is a planet."}
  assert tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True) == \
      batching.format_prompt("Name a planet.", "Mars is a planet.")


def test_export_bfloat16(policy_dir, imported, tmp_path):
  run_binary("--phase=export", f"--config.checkpoint={imported / 'import' / 'checkpoint'}",
             f"--config.hf_out={tmp_path}", "--config.dtype=bfloat16", f"--workdir={imported}")
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  loaded = load_cleanly(transformers.AutoModelForCausalLM, tmp_path, dtype=torch.bfloat16)
  for name, value in policy_dir.model.state_dict().items():
    assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16)), name


def test_reward_model_import_and_export(make_hf_gpt_neo, tiny_tokenizer_dir, tmp_path):
  vocab = len(transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
  source = make_hf_gpt_neo(attention_layers=("global", "local"), window_size=4, vocab_size=vocab,
                           classifier=True, tokenizer_dir=tiny_tokenizer_dir)
  run_binary("--phase=import", f"--config.hf_model={source.path}", f"--workdir={tmp_path}")
  run_binary("--phase=export", f"--config.checkpoint={tmp_path / 'import'}",
             f"--config.hf_out={tmp_path / 'hf'}", f"--workdir={tmp_path}")
  loaded = load_cleanly(transformers.AutoModelForSequenceClassification, tmp_path / "hf")
  ids = torch.tensor([[0, 0, 5, 17, 42, 9], [3, 77, 21, 8, 8, 64]])
  mask = (ids != 0).long()
  with torch.no_grad():
    ours = loaded(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    theirs = source.model(ids, attention_mask=mask,
                          position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
  np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-4, rtol=0)


def test_generate_greedy_matches_hf(policy_dir, imported, tmp_path):
  prompts = ["Hello world", "The quick brown fox jumps over", "A", "Reinforcement learning from"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  run_binary("--phase=generate", f"--config.checkpoint={imported / 'import'}",
             f"--config.prompts={tmp_path / 'prompts.txt'}", "--config.use_template=False",
             "--config.temperature=0", f"--config.max_new_tokens={NEW_TOKENS}",
             "--config.batch_size=3", f"--workdir={tmp_path}")  # 3: the second batch has a filler row.
  results = [json.loads(line) for line in
             (tmp_path / "generate" / "generations.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in results] == prompts

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(policy_dir.path))
  eos = tokenizer.eos_token_id
  for prompt, result in zip(prompts, results):
    # One prompt at a time: HF's own greedy continuation, with no padding involved at all.
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
      out = policy_dir.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=eos)
    new = out[0, ids.shape[1]:].tolist()
    ended = eos in new
    new = new[:new.index(eos) + 1] if ended else new
    assert result["num_tokens"] == len(new) and result["ended_with_eos"] == ended
    expected = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False)
    assert result["response"] == expected, prompt


# The binary as a fresh `pip install -e .` runs it: without torch (only the test extra installs it).
_WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; "
                  "runpy.run_module('rlhf_jax.main', run_name='__main__', alter_sys=True)")
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.MULTILINE)


def _tiny_init(workdir: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
  result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "--phase=init",
                           "--config.data.num_train=200", "--config.vocab_size=300",
                           f"--workdir={workdir}", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_console_is_quiet_and_the_log_file_has_the_rest(tmp_path):
  result = _tiny_init(tmp_path / "quiet")
  console = result.stdout + result.stderr
  # The phase's one result line, and nothing else: no absl INFO, no Orbax, no transformers advice.
  assert console.strip().splitlines() == [
      f"init: built-in GPT-Neo (0.86M parameters, vocab 300) and tokenizer -> "
      f"{tmp_path / 'quiet' / 'init' / 'checkpoint'}"], console
  assert not _ABSL_LINE.search(console) and "PyTorch was not found" not in console
  log = (tmp_path / "quiet" / "log.txt").read_text()
  assert re.search(r"^I\d{4} .* hf\.py:\d+\] Saved tokenizer", log, re.MULTILINE), log[:2000]
  assert re.search(r"^W\d{4} .*\] PyTorch was not found", log, re.MULTILINE), log[:2000]
  assert "checkpoint_manager.py" in log  # Orbax's chatter is kept there too.

  # absl's own --verbosity brings the INFO lines back to the console (the log file keeps them).
  verbose = _tiny_init(tmp_path / "verbose", "--verbosity=0")
  assert re.search(r"^I\d{4} .* hf\.py:\d+\] Saved tokenizer", verbose.stderr, re.MULTILINE)
  assert "PyTorch was not found" in verbose.stderr
  assert "Saved tokenizer" in (tmp_path / "verbose" / "log.txt").read_text()


# ---- Errors: non-zero exit and exactly one line on stderr, naming what is wrong. ----


def _one_line_error(result: subprocess.CompletedProcess) -> str:
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "Traceback" not in result.stderr
  return lines[0]


def test_unknown_phase():
  line = _one_line_error(run_binary("--phase=trian", check=False))
  assert "--phase=trian" in line and "unknown phase" in line


def test_missing_config_file(tmp_path):
  line = _one_line_error(run_binary("--phase=import", f"--config={tmp_path / 'nope.py'}", check=False))
  assert str(tmp_path / "nope.py") in line and "no such config file" in line


def test_misspelled_config_variant_lists_the_valid_ones():
  line = _one_line_error(run_binary("--phase=sft", "--config=configs/sft.py:gpt_neo_125",
                                    check=False))
  assert "configs/sft.py:gpt_neo_125" in line and "unknown variant 'gpt_neo_125'" in line, line
  assert "builtin, gpt_neo_125m, gpt_neo_1p3b, gpt_neo_2p7b" in line, line


def test_unknown_config_key():
  line = _one_line_error(run_binary("--phase=import", "--config.hf_modle=x", check=False))
  assert "--config.hf_modle" in line and "no such key" in line


def test_user_error_inside_a_phase(tmp_path):
  line = _one_line_error(run_binary("--phase=import", f"--config.hf_model={tmp_path}",
                                    f"--workdir={tmp_path / 'work'}", check=False))
  assert str(tmp_path) in line and "config.json" in line


def test_empty_data_file_names_the_file(imported, tmp_path):
  # An empty Dolly file used to reach the SFT evaluator and die there with KeyError: 'tokens'.
  empty = tmp_path / "dolly.jsonl"
  empty.write_text("")
  line = _one_line_error(run_binary("--phase=sft", f"--config.data.source={empty}",
                                    f"--config.init_checkpoint={imported / 'import'}",
                                    f"--workdir={tmp_path / 'work'}", check=False))
  assert f"{empty}: no records" in line, line


def test_hub_id_offline_through_the_binary(tmp_path):
  line = _one_line_error(run_binary("--phase=import", "--config.hf_model=rlhf-jax-tests/no-such-model",
                                    f"--workdir={tmp_path}", check=False))
  assert "rlhf-jax-tests/no-such-model" in line and "hub" in line


def test_eval_with_a_missing_checkpoint_names_the_path(tmp_path):
  missing = tmp_path / "no_such_reward_model"
  line = _one_line_error(run_binary("--phase=eval", f"--config.reward_checkpoint={missing}",
                                    f"--workdir={tmp_path}", check=False))
  assert str(missing) in line, line
  # The alias, in a workdir where no phase has run: names the checkpoint it looked for.
  line = _one_line_error(run_binary("--phase=test", f"--workdir={tmp_path}", check=False))
  assert str(tmp_path / "reward") in line and "--phase=reward" in line, line
