"""Shared pytest fixtures.

- `shared_data`: the project's real test data directory, skipping when absent: $RLHF_JAX_DATA (the
  variable the configs read too), else the project's shared folder beside the repository.
- `tiny_tokenizer_dir`: a byte-level BPE tokenizer trained on a few sentences, saved as an HF directory.
- `make_hf_gpt_neo`: builds, seeds and saves tiny random Hugging Face GPT-Neo checkpoints.
Plain helpers for tests (import them with `from conftest import ...`): `left_padded`,
`hf_position_ids`, `load_cleanly`.

Everything is built offline from `transformers`/`tokenizers` in a session temp directory.
"""

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import pytest

# One compilation cache for the whole run, shared by the xdist workers and the binaries the tests
# start: many tests run a phase two or three times (straight, interrupted, resumed), and each run
# compiles the same steps again; XLA's persistent cache (keyed by the program, the backend and
# the flags) returns the same executable, which cut test_dpo_phase.py's CPU time by about a third.
# Set in the controller before jax is imported anywhere; the workers and subprocesses inherit it.
_CACHE_VARIABLES = dict(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def pytest_configure(config):
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # An xdist worker (the controller set it up), or the user chose a cache.
  config.jit_cache_dir = tempfile.mkdtemp(prefix="rlhf_jax_tests_jit_cache_")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=config.jit_cache_dir, **_CACHE_VARIABLES)


def pytest_unconfigure(config):
  if getattr(config, "jit_cache_dir", None):
    shutil.rmtree(config.jit_cache_dir, ignore_errors=True)


SHARED_DATA = pathlib.Path(os.environ.get("RLHF_JAX_DATA")
                           or pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")

EOS = "<|endoftext|>"
# Text to train the tiny tokenizer on: a few sentences are enough for a few dozen merges.
_TOKENIZER_CORPUS = (
    "### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis is the capital.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Reinforcement learning from human feedback trains a reward model on preference pairs.",
    "A language model predicts the next token; greedy decoding takes the most likely one.",
    "Hello world! Numbers like 12, 345 and 6789 appear too, with punctuation: (a) [b] {c}.",
)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """$RLHF_JAX_DATA or /work/shared/data (see its SOURCES.md); skips the test when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared test data not found at {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
  """An HF tokenizer directory (byte-level BPE, ~300 tokens, EOS `<|endoftext|>` = id 0).

  Byte-level, like GPT-2's, so any text round-trips; trained here so no test needs the network.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  import transformers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(list(_TOKENIZER_CORPUS) * 4, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS,
                                              bos_token=EOS, unk_token=EOS)
  out = tmp_path_factory.mktemp("tiny_tokenizer")
  fast.save_pretrained(out)
  return out


@dataclasses.dataclass(frozen=True)
class HFModel:
  """A saved tiny HF checkpoint and the torch model it was saved from (eval mode, float32)."""
  path: pathlib.Path
  model: Any  # GPTNeoForCausalLM or GPTNeoForSequenceClassification.

  @property
  def config(self):
    return self.model.config


def randomize_(model, seed: int, scale: float = 0.2) -> None:
  """Overwrites every parameter with seeded noise, biases and LayerNorms included.

  HF's own initialisation (std 0.02, zero biases, unit LayerNorm) leaves attention nearly uniform
  and biases invisible, so a parity test on it could miss swapped or dropped tensors.
  """
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      is_norm_scale = ".ln_" in name and name.endswith("weight")  # ln_1, ln_2, ln_f scales.
      param.copy_(1.0 + 0.1 * noise if is_norm_scale else scale * noise)


@pytest.fixture(scope="session")
def make_hf_gpt_neo(tmp_path_factory) -> Callable[..., HFModel]:
  """Factory for tiny random HF GPT-Neo checkpoints, cached per argument set for the session.

  make_hf_gpt_neo(attention_layers=("global", "local"), hidden_size=32, num_heads=4,
                  vocab_size=300, window_size=4, max_position_embeddings=128, seed=0,
                  classifier=False, tokenizer_dir=None, **config_overrides) -> HFModel

  `classifier=True` builds a `GPTNeoForSequenceClassification` with one label and `pad_token_id`
  equal to EOS (as `rlhf_jax.models.hf.save_checkpoint` writes reward models). `tokenizer_dir`
  saves that tokenizer with the model (its vocabulary must fit `vocab_size`).
  """
  cache: dict[tuple, HFModel] = {}

  def make(attention_layers=("global", "local"), hidden_size=32, num_heads=4, vocab_size=300,
           window_size=4, max_position_embeddings=128, seed=0, classifier=False,
           tokenizer_dir=None, eos_token_id=0, **config_overrides) -> HFModel:
    key = (tuple(attention_layers), hidden_size, num_heads, vocab_size, window_size,
           max_position_embeddings, seed, classifier, str(tokenizer_dir), eos_token_id,
           tuple(sorted(config_overrides.items())))
    if key in cache:
      return cache[key]
    import torch
    import transformers
    config = transformers.GPTNeoConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_layers=len(attention_layers),
        num_heads=num_heads, attention_types=[[[kind], 1] for kind in attention_layers],
        window_size=window_size, max_position_embeddings=max_position_embeddings,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, **config_overrides)
    torch.manual_seed(seed)
    if classifier:
      config.num_labels = 1
      config.pad_token_id = eos_token_id
      model = transformers.GPTNeoForSequenceClassification(config)
    else:
      model = transformers.GPTNeoForCausalLM(config)
    randomize_(model, seed)
    model.eval()
    path = tmp_path_factory.mktemp("hf_gpt_neo")
    model.save_pretrained(path)
    if tokenizer_dir is not None:
      transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    cache[key] = HFModel(path=path, model=model)
    return cache[key]

  return make


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists: (ids int32 [B, T], mask int32 [B, T]), T = the longest row."""
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return ids, mask


def hf_position_ids(mask: np.ndarray) -> np.ndarray:
  """What HF `generate` passes for a left-padded batch: cumsum(mask) - 1, clipped at 0 on padding."""
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


class _WarningRecords(logging.Handler):
  """Collects the messages of WARNING and above."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def load_cleanly(model_class, path: pathlib.Path, **kwargs):
  """`model_class.from_pretrained(path)` that fails on any missing, unexpected or mismatched weight,
  whether reported in the loading info or only as a logged warning (transformers' load report)."""
  import transformers
  records = _WarningRecords()
  logger = transformers.utils.logging.get_logger("transformers")
  logger.addHandler(records)
  try:
    model, info = model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
  finally:
    logger.removeHandler(records)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys") and not info.get("error_msgs"), info
  words = ("load report", "weight", "initialized", "missing", "unexpected", "mismatch")
  weight_warnings = [m for m in records.messages if any(w in m.lower() for w in words)]
  assert not weight_warnings, weight_warnings
  return model.eval()


def write_pairs(path: pathlib.Path, count: int) -> pathlib.Path:
  """`count` preference pairs with a learnable preference ("Yes, <words>." over "no <words>"),
  as JSONL at `path` (prompt / chosen / rejected)."""
  rng = np.random.default_rng(0)
  words = "the quick brown fox jumps over a lazy dog while cats sleep in the sun".split()
  with open(path, "w") as f:
    for i in range(count):
      good = " ".join(rng.choice(words, rng.integers(2, 6)))
      f.write(json.dumps({"prompt": f"Question {i}?\n", "chosen": f"Yes, {good}.",
                          "rejected": f"no {good}"}) + "\n")
  return path


def save_tiny_sft_and_reward(workdir: pathlib.Path, tokenizer_dir) -> tuple:
  """Tiny random SFT and reward checkpoints in WORKDIR/sft and WORKDIR/reward (the tiny
  tokenizer's vocabulary), for phase tests of PPO, GRPO and LoRA. Returns (model config, sft
  params, reward params)."""
  import jax  # Here, not at the top: pytest_configure sets the cache variables before jax loads.
  from rlhf_jax import checkpoints
  from rlhf_jax.models import gpt_neo
  from rlhf_jax.models import hf
  tokenizer = hf.load_tokenizer(tokenizer_dir)
  config = gpt_neo.tiny_config(vocab_size=len(tokenizer), hidden_size=32, num_heads=2,
                               window_size=8, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.eos_token_id)
  model = gpt_neo.GPTNeo(config, score_head=True)
  init = jax.jit(lambda key: gpt_neo.init_params(model, key))
  sft_params = {k: v for k, v in init(jax.random.key(0)).items() if k != "score"}
  reward_params = init(jax.random.key(1))
  checkpoints.save_model(workdir / "sft", sft_params, config, kind=hf.CAUSAL_LM, phase="sft",
                         tokenizer_dir=tokenizer_dir)
  checkpoints.save_model(workdir / "reward", reward_params, config, kind=hf.REWARD,
                         phase="reward", tokenizer_dir=tokenizer_dir,
                         reward_stats={"mean": 0.5, "std": 2.0})
  return config, sft_params, reward_params


def tiny_ppo_config():
  """configs/ppo.py shrunk for phase tests on `save_tiny_sft_and_reward`'s checkpoints: 16 training
  prompts, 4 iterations of 4 prompts x 6 new tokens, checkpoints every 2, no held-out eval."""
  from rlhf_jax.configs import ppo as ppo_config
  config = ppo_config.get_config()
  config.data.update(dict(num_train=16, num_eval=4))
  config.eval_prompts = 0
  config.rollout.update(dict(max_prompt_length=24, max_new_tokens=6))
  config.train.update(dict(steps=4, batch_size=4, log_every=2, save_every=2, keep_checkpoints=2))
  config.ppo.normalize_samples = 16
  config.eval_batch_size = 8
  return config
