"""Tests for rlhf_jax.data.batching: template, tokenisation, masks, packing, host slices."""

import collections
import itertools
import re

import numpy as np
import pytest

from rlhf_jax.data import batching
from rlhf_jax.data.records import load_records
from rlhf_jax.errors import UserError

from conftest import SHARED_DATA as DATA  # noqa: E402 ($RLHF_JAX_DATA)
TOKENIZER_DIR = DATA / "gpt2_tokenizer"
DOLLY_1K = DATA / "dolly" / "dolly_sample_1k.jsonl"
EOS = 50256
SFT_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


@pytest.fixture(scope="module")
def tokenizer():
  if not TOKENIZER_DIR.exists():
    pytest.skip(f"shared test data not found at {DATA}")
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def dolly():
  if not DOLLY_1K.exists():
    pytest.skip(f"shared test data not found at {DATA}")
  return load_records(str(DOLLY_1K))[0][:120]


def _synthetic_examples(n: int) -> list[dict]:
  """Examples whose first token is their index, so batches can be traced back."""
  return [{"prompt_ids": np.array([i, 7, 7][:1 + i % 3], np.int32),
           "response_ids": np.array([9] * (1 + i % 4), np.int32)} for i in range(n)]


def _first_tokens(batch: dict) -> list[int]:
  """The index of the example starting each segment of each row (synthetic examples)."""
  found = []
  for row in range(batch["input_ids"].shape[0]):
    starts = np.flatnonzero((batch["positions"][row] == 0) & (batch["segment_ids"][row] > 0))
    found.extend(int(batch["input_ids"][row, s]) for s in starts)
  return found


def _assert_same_batch(a: dict, b: dict):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_format_prompt_variants():
  plain = batching.format_prompt("  What is the capital of France? ")
  assert plain == "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
  assert plain == batching.PROMPT_TEMPLATE.format(instruction="What is the capital of France?")
  with_context = batching.format_prompt("Summarise.", "Paris is in France.\n")
  assert with_context == ("### Instruction:\nSummarise.\n\n### Context:\nParis is in France.\n\n"
                          "### Response:\n")
  assert batching.format_prompt("Q", "   ") == batching.format_prompt("Q")
  assert batching.PROMPT_TEMPLATE in batching.PROMPT_TEMPLATE_DOC
  assert batching.PROMPT_TEMPLATE_WITH_CONTEXT in batching.PROMPT_TEMPLATE_DOC


def test_separate_tokenisation_matches_joint(tokenizer, dolly):
  # The template's final newline makes the prompt/response boundary a token boundary.
  for record in dolly:
    prompt = batching.format_prompt(record["instruction"], record["context"])
    response = record["response"].strip()
    joint = tokenizer(prompt + response)["input_ids"]
    separate = tokenizer(prompt)["input_ids"] + tokenizer(response)["input_ids"]
    assert joint == separate


def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer, dolly):
  examples, stats = batching.tokenize_sft_examples(tokenizer, dolly, max_length=2048)
  assert stats["examples"] == len(dolly) and stats["truncated_responses"] == 0
  batches = list(batching.eval_batches(examples, batch_size=8, max_length=2048, pad_id=EOS))
  rows = [(batch, r) for batch in batches for r in range(8)][:len(dolly)]
  for record, (batch, r) in zip(dolly, rows):
    mask = batch["loss_mask"][r] > 0
    ids = batch["input_ids"][r]
    real = int((batch["segment_ids"][r] > 0).sum())
    # Targets are the next tokens of the row.
    np.testing.assert_array_equal(batch["targets"][r, :real - 1], ids[1:real])
    learned = tokenizer.decode(batch["targets"][r][mask])
    assert learned == record["response"].strip() + "<|endoftext|>"
    first = int(np.argmax(mask))
    assert tokenizer.decode(ids[:first + 1]) == batching.format_prompt(record["instruction"],
                                                                       record["context"])
    assert mask.sum() == real - 1 - first  # contiguous up to the segment's last prediction
    np.testing.assert_array_equal(batch["positions"][r, :real], np.arange(real))
    assert not batch["segment_ids"][r, real:].any() and not batch["loss_mask"][r, real:].any()


def test_long_responses_are_cut_without_eos_and_long_prompts_rejected(tokenizer):
  record = {"instruction": "Count.", "context": "", "response": " ".join(["one"] * 50)}
  prompt_len = len(tokenizer(batching.format_prompt("Count."))["input_ids"])
  tokenize_one = lambda record, max_length: batching.tokenize_sft_examples(
      tokenizer, [record], max_length=max_length)[0][0]
  example = tokenize_one(record, prompt_len + 10)
  assert example["truncated"]
  assert len(example["response_ids"]) == 10 and EOS not in example["response_ids"]
  fits = tokenize_one(dict(record, response="one"), prompt_len + 2)
  assert not fits["truncated"] and list(fits["response_ids"]) == [505, EOS]  # "one", EOS
  long = {"instruction": "word " * 40, "context": "", "response": "yes"}
  with pytest.raises(UserError, match=r"dolly.jsonl record 1: prompt is \d+ tokens"):
    batching.tokenize_sft_examples(tokenizer, [record, long], max_length=prompt_len + 10,
                                   source="dolly.jsonl")
  examples, stats = batching.tokenize_sft_examples(
      tokenizer, [record, long], max_length=prompt_len + 10, skip_bad_records=True)
  assert len(examples) == 1
  assert stats == {"examples": 1, "truncated_contexts": 0, "truncated_responses": 1,
                   "skipped": {"prompt_too_long": 1}}


def test_long_context_is_cut_to_leave_the_response_budget(tokenizer):
  # A 2,000-token context: the instruction, the start of the context, the cut marker and at
  # least min_response_tokens of the response fit; the loss is on the response tokens kept.
  context = " ".join(f"fact{i}" for i in range(1000))
  assert len(tokenizer(context, verbose=False)["input_ids"]) >= 2000
  response = " ".join(["answer"] * 300)
  record = {"instruction": "Summarise the facts.", "context": context, "response": response,
            "location": "dolly.jsonl:7"}
  max_length, budget = 512, 128
  examples, stats = batching.tokenize_sft_examples(tokenizer, [record], max_length=max_length,
                                                   min_response_tokens=budget)
  assert stats == {"examples": 1, "truncated_contexts": 1, "truncated_responses": 1,
                   "skipped": {}}
  (example,) = examples
  assert example["context_cut"] and example["truncated"]
  assert len(example["prompt_ids"]) + len(example["response_ids"]) == max_length
  assert len(example["response_ids"]) >= budget
  assert len(example["prompt_ids"]) > max_length - budget - 8  # the context fills its share
  prompt = tokenizer.decode(example["prompt_ids"])
  assert prompt.startswith("### Instruction:\nSummarise the facts.\n\n### Context:\nfact0 fact1 ")
  assert prompt.endswith("\n" + batching.CONTEXT_CUT_MARKER + "\n\n### Response:\n")
  kept = prompt[prompt.index("fact0"):prompt.index("\n" + batching.CONTEXT_CUT_MARKER)]
  assert context.startswith(kept) and len(kept) < len(context)
  assert tokenizer.decode(example["response_ids"]) == response[:len(tokenizer.decode(
      example["response_ids"]))]
  # A short response is not cut: the context leaves it all of its tokens.
  short = dict(record, response="Facts.")
  (example,), stats = batching.tokenize_sft_examples(tokenizer, [short], max_length=max_length,
                                                     min_response_tokens=budget)
  assert stats["truncated_contexts"] == 1 and stats["truncated_responses"] == 0
  assert tokenizer.decode(example["response_ids"]) == "Facts.<|endoftext|>"
  assert len(example["prompt_ids"]) + len(example["response_ids"]) <= max_length
  # The batch's loss mask covers exactly the response tokens kept.
  (batch,) = batching.eval_batches([example], batch_size=1, max_length=max_length, pad_id=EOS)
  assert batch["loss_mask"].sum() == len(example["response_ids"])


def test_instruction_longer_than_the_window_is_an_error_naming_the_record(tokenizer):
  long = {"instruction": "word " * 600, "context": "Some context.", "response": "yes",
          "location": "dolly.jsonl:963"}
  fine = {"instruction": "Q?", "context": "", "response": "A."}
  with pytest.raises(UserError, match=r"^dolly.jsonl:963: prompt is \d+ tokens even without its "
                     r"context, but at most max_length - 2 = 510 fit"):
    batching.tokenize_sft_examples(tokenizer, [fine, long], max_length=512,
                                   min_response_tokens=128)
  del long["location"]  # Without a location, its index in the source.
  with pytest.raises(UserError, match=r"^train record 1: prompt is"):
    batching.tokenize_sft_examples(tokenizer, [fine, long], max_length=512, source="train")
  with pytest.raises(UserError, match="min_response_tokens=512"):
    batching.tokenize_sft_examples(tokenizer, [fine], max_length=512, min_response_tokens=512)


def test_fit_prompt_keeps_prompts_that_fit_and_prompt_batch_fits_contexts(tokenizer):
  prompt = batching.format_prompt("Q?", "A short context.")
  assert batching.fit_prompt(tokenizer, "Q?", "A short context.", 100)[::2] == (prompt, False)
  # Generation prompts: a long context is cut as in training (the instruction kept); a prompt
  # whose instruction alone is too long keeps its last tokens.
  prompts = [batching.format_prompt("Q?", "word " * 300), batching.format_prompt("word " * 300),
             batching.format_prompt("Q?")]
  ids, mask = batching.prompt_batch(tokenizer, prompts, 64)
  rows = [tokenizer.decode(ids[r][mask[r] > 0]) for r in range(3)]
  assert rows[0] == batching.fit_prompt(tokenizer, "Q?", "word " * 300, 64)[0]
  assert rows[0].startswith("### Instruction:\nQ?\n\n### Context:\nword word")
  assert batching.CONTEXT_CUT_MARKER in rows[0] and mask[0].sum() <= 64
  assert rows[1].endswith("word\n\n### Response:\n") and mask[1].sum() == 64
  assert rows[2] == prompts[2]


def _segments(batch: dict) -> list[tuple]:
  """Each segment's (input ids, targets where learned, loss mask), independent of its row."""
  out = []
  for row in range(batch["input_ids"].shape[0]):
    for segment in set(batch["segment_ids"][row].tolist()) - {0}:
      where = batch["segment_ids"][row] == segment
      mask = batch["loss_mask"][row][where]
      out.append((tuple(batch["input_ids"][row][where]),
                  tuple(batch["targets"][row][where][mask > 0]), tuple(mask)))
      np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
  return out


def test_packing_keeps_the_learned_tokens(tokenizer, dolly):
  examples, _ = batching.tokenize_sft_examples(tokenizer, dolly, max_length=256,
                                               skip_bad_records=True)
  kwargs = dict(batch_size=4, max_length=256, pad_id=EOS, seed=1)
  packed, unpacked = [], []
  packed_rows = 0
  for batch in batching.sft_batches(examples, pack=True, **kwargs):
    assert batch["input_ids"].shape == (4, 256)
    for row in range(4):
      if len(packed) < len(examples):
        packed_rows += 1
        packed.extend(_segments({k: v[row:row + 1] for k, v in batch.items()}))
    if len(packed) >= len(examples):
      break
  # The first epoch fills whole rows, so its segments are exactly the first len(examples).
  assert len(packed) == len(examples)
  assert packed_rows < len(examples)  # packing did put several examples in some rows
  for batch in itertools.islice(batching.sft_batches(examples, pack=False, **kwargs),
                                len(examples) // 4 + 1):
    unpacked.extend(_segments(batch))
  assert collections.Counter(packed) == collections.Counter(unpacked[:len(examples)])
  # Independent reference: the learned tokens are every response's tokens (and EOS).
  expected = collections.Counter()
  for e in examples:
    expected.update(e["response_ids"].tolist())
  learned = collections.Counter(t for segment in packed for t in segment[1])
  assert learned == expected


def test_segments_are_contiguous_and_masked_at_their_ends():
  examples = _synthetic_examples(30)
  batch = next(batching.sft_batches(examples, batch_size=2, max_length=16, pad_id=EOS, seed=0,
                                    pack=True))
  for row in range(2):
    segments = batch["segment_ids"][row]
    real = segments[segments > 0]
    assert (np.diff(real) >= 0).all() and real[0] == 1 and (np.diff(real) <= 1).all()
    # The last token of each segment predicts nothing: no loss, target 0.
    ends = np.flatnonzero((segments > 0) & (np.append(segments[1:], 0) != segments))
    assert not batch["loss_mask"][row, ends].any() and not batch["targets"][row, ends].any()


@pytest.mark.parametrize("pack", [False, True])
def test_host_slices_concatenate_to_the_global_batch(pack):
  examples = _synthetic_examples(37)
  kwargs = dict(batch_size=8, max_length=12, pad_id=EOS, seed=5, pack=pack)
  global_batches = list(itertools.islice(batching.sft_batches(examples, **kwargs), 12))
  for count in (2, 4):
    hosts = [list(itertools.islice(
        batching.sft_batches(examples, process_index=i, process_count=count, **kwargs), 12))
             for i in range(count)]
    for step, expected in enumerate(global_batches):
      for key in SFT_KEYS:
        np.testing.assert_array_equal(
            np.concatenate([hosts[i][step][key] for i in range(count)]), expected[key])
  with pytest.raises(UserError, match="batch_size"):
    next(batching.sft_batches(examples, process_count=3, **kwargs))


@pytest.mark.parametrize("pack", [False, True])
def test_start_step_resumes_at_the_same_batch(pack):
  examples = _synthetic_examples(23)
  kwargs = dict(batch_size=4, max_length=10, pad_id=EOS, seed=2, pack=pack)
  fresh = list(itertools.islice(batching.sft_batches(examples, **kwargs), 30))
  for k in (1, 5, 6, 13, 29):  # several of these start in a later epoch or mid-epoch
    resumed = batching.sft_batches(examples, start_step=k, **kwargs)
    _assert_same_batch(next(resumed), fresh[k])
    if k + 1 < len(fresh):
      _assert_same_batch(next(resumed), fresh[k + 1])


def test_epochs_cover_every_example_and_are_reshuffled():
  examples = _synthetic_examples(20)
  stream = batching.sft_batches(examples, batch_size=4, max_length=8, pad_id=EOS, seed=0)
  seen = [t for batch in itertools.islice(stream, 10) for t in _first_tokens(batch)]
  epoch0, epoch1 = seen[:20], seen[20:40]
  assert sorted(epoch0) == sorted(epoch1) == list(range(20))
  assert epoch0 != epoch1


def test_eval_batches_cover_each_example_once():
  examples = _synthetic_examples(10)
  batches = list(batching.eval_batches(examples, batch_size=4, max_length=8, pad_id=EOS))
  assert len(batches) == 3
  assert [t for b in batches for t in _first_tokens(b)] == list(range(10))
  last = batches[-1]
  assert last["input_ids"].shape == (4, 8)
  assert not last["segment_ids"][2:].any() and not last["loss_mask"][2:].any()
  assert (last["input_ids"][2:] == EOS).all()
  total = sum(b["loss_mask"].sum() for b in batches)
  assert total == sum(len(e["response_ids"]) for e in examples)
  hosts = [list(batching.eval_batches(examples, batch_size=4, max_length=8, pad_id=EOS,
                                      process_index=i, process_count=2)) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 3
  merged = [t for h0, h1 in zip(*hosts) for t in _first_tokens(h0) + _first_tokens(h1)]
  assert merged == list(range(10))


PAIRS = [
    {"prompt": "### Instruction:\nWhat is 2 + 2?\n\n### Response:\n", "chosen": "4",
     "rejected": "5", "strategy": "corrupted"},
    {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello! How can I help?",
     "rejected": " Go away."},
    {"prompt": "Name a colour.\n", "chosen": "Blue is a colour.", "rejected": "Blue is a",
     "strategy": "truncated"},
]


def test_pair_batch_layout(tokenizer):
  examples, stats = batching.tokenize_pairs(tokenizer, PAIRS, max_length=32)
  assert stats["examples"] == 3
  batches = list(batching.eval_pair_batches(examples, batch_size=2, max_length=32, pad_id=EOS))
  assert len(batches) == 2
  for batch in batches:
    for key in ("input_ids", "segment_ids", "positions"):
      assert batch[key].shape == (2, 2, 32) and batch[key].dtype == np.int32
    assert batch["pair_mask"].shape == batch["strategy"].shape == (2,)
  rows = [(b, k) for b in batches for k in range(2)]
  for pair, (batch, k) in zip(PAIRS, rows):
    for side, name in enumerate(("chosen", "rejected")):  # pairs first: [pair, side, token]
      real = int(batch["segment_ids"][k, side].sum())
      assert tokenizer.decode(batch["input_ids"][k, side, :real]) == pair["prompt"] + pair[name]
      last = tokenizer(pair[name])["input_ids"][-1]
      assert batch["input_ids"][k, side, real - 1] == last  # no trailing EOS: score is read here
      np.testing.assert_array_equal(batch["positions"][k, side, :real], np.arange(real))
      assert not batch["segment_ids"][k, side, real:].any()
      assert batch["response_length"][k, side] == len(tokenizer(pair[name])["input_ids"])
    assert batch["strategy"][k] == batching.PAIR_STRATEGIES.index(pair.get("strategy", "human"))
  np.testing.assert_array_equal(batches[1]["pair_mask"], [1.0, 0.0])
  assert batches[1]["strategy"][1] == -1 and not batches[1]["segment_ids"][1].any()
  assert not batches[1]["response_length"][1].any()


def test_pair_batch_splits_keep_whole_pairs(tokenizer):
  """Gradient accumulation takes micro-batch rows i, i+k, ... of axis 0; every such split must
  keep each pair's chosen and rejected sequence together."""
  pairs = [dict(PAIRS[i % 3], chosen=f"{PAIRS[i % 3]['chosen']} {i}") for i in range(8)]
  examples, _ = batching.tokenize_pairs(tokenizer, pairs, max_length=32)
  batch = next(batching.eval_pair_batches(examples, batch_size=8, max_length=32, pad_id=EOS))
  accum = 4
  # The same split as `loop.accumulate_gradients`: micro-batch m holds rows m, m + k, ...
  micro = {key: value.reshape(value.shape[0] // accum, accum, *value.shape[1:]).swapaxes(0, 1)
           for key, value in batch.items()}
  for m in range(accum):
    for j in range(8 // accum):
      pair = pairs[m + j * accum]
      for side, name in enumerate(("chosen", "rejected")):
        real = int(micro["segment_ids"][m, j, side].sum())
        assert tokenizer.decode(micro["input_ids"][m, j, side, :real]) == (
            pair["prompt"] + pair[name])


def test_pair_batches_resume_and_split_across_hosts(tokenizer):
  pairs = [dict(PAIRS[i % 3], chosen=f"{PAIRS[i % 3]['chosen']} {i}") for i in range(11)]
  examples, _ = batching.tokenize_pairs(tokenizer, pairs, max_length=32)
  kwargs = dict(batch_size=4, max_length=32, pad_id=EOS, seed=3)
  fresh = list(itertools.islice(batching.pair_batches(examples, **kwargs), 8))
  _assert_same_batch(next(batching.pair_batches(examples, start_step=6, **kwargs)), fresh[6])
  # Every host holds its axis-0 slice of every global array, so concatenating the hosts'
  # parts (as jax.make_array_from_process_local_data does) gives the global batch back.
  for count in (2, 4):
    hosts = [list(itertools.islice(
        batching.pair_batches(examples, process_index=i, process_count=count, **kwargs), 3))
             for i in range(count)]
    for step in range(3):
      for key in fresh[step]:
        np.testing.assert_array_equal(
            np.concatenate([hosts[i][step][key] for i in range(count)]), fresh[step][key])
  eval_global = list(batching.eval_pair_batches(examples, batch_size=4, max_length=32,
                                                pad_id=EOS))
  eval_hosts = [list(batching.eval_pair_batches(examples, batch_size=4, max_length=32,
                                                pad_id=EOS, process_index=i, process_count=2))
                for i in range(2)]
  for step, expected in enumerate(eval_global):
    for key in expected:
      np.testing.assert_array_equal(
          np.concatenate([eval_hosts[0][step][key], eval_hosts[1][step][key]]), expected[key])


def test_tokenize_pairs_bad_cases(tokenizer):
  same_prefix = {"prompt": "Q:\n", "chosen": "the same start, then yes",
                 "rejected": "the same start, then no"}
  prompt_len = len(tokenizer("Q:\n")["input_ids"])
  with pytest.raises(UserError, match="pairs pair 0: chosen and rejected are identical"):
    batching.tokenize_pairs(tokenizer, [same_prefix], max_length=prompt_len + 3)
  examples, stats = batching.tokenize_pairs(tokenizer, [same_prefix, PAIRS[0]],
                                            max_length=prompt_len + 3, skip_bad_records=True)
  assert stats["skipped"] == {"identical_after_truncation": 1, "prompt_too_long": 1}
  assert examples == []
  differ_early = {"prompt": "Q:\n", "chosen": "yes it is true indeed", "rejected": "no, it is not"}
  examples, stats = batching.tokenize_pairs(tokenizer, [differ_early], max_length=prompt_len + 2)
  assert stats["truncated_responses"] == 2
  assert tokenizer.decode(examples[0]["chosen_ids"]) == "yes it"
  assert tokenizer.decode(examples[0]["rejected_ids"]) == "no,"


def test_tokenize_pairs_too_long_policies(tokenizer):
  pair = {"prompt": "What is the capital of France?\n", "chosen": "Paris is the capital.",
          "rejected": "The capital is Rome.", "location": "pairs.jsonl:7"}
  ids = lambda text: tokenizer(text)["input_ids"]
  prompt, chosen, rejected = ids(pair["prompt"]), ids(pair["chosen"]), ids(pair["rejected"])
  longest = max(len(chosen), len(rejected))
  max_length = len(prompt) + longest - 2  # two tokens too long
  with pytest.raises(UserError, match=re.escape("pairs.jsonl:7: prompt (")):
    batching.tokenize_pairs(tokenizer, [pair], max_length=max_length, too_long="error")
  examples, stats = batching.tokenize_pairs(tokenizer, [pair, PAIRS[2]], max_length=max_length,
                                            too_long="error", skip_bad_records=True)
  assert stats["skipped"] == {"too_long": 1} and len(examples) == 1
  # truncate_prompt: the prompt loses its first two tokens, both responses stay whole.
  examples, stats = batching.tokenize_pairs(tokenizer, [pair], max_length=max_length,
                                            too_long="truncate_prompt")
  assert stats["truncated_prompts"] == 1 and stats["truncated_responses"] == 0
  assert examples[0]["prompt_ids"].tolist() == prompt[2:]
  assert examples[0]["chosen_ids"].tolist() == chosen
  assert examples[0]["rejected_ids"].tolist() == rejected
  # A response that alone fills max_length leaves no room for the prompt.
  with pytest.raises(UserError, match="pairs.jsonl:7: .*the response alone does not fit"):
    batching.tokenize_pairs(tokenizer, [pair], max_length=longest, too_long="truncate_prompt")
  # truncate (the default): the whole prompt, each response cut at its end.
  examples, stats = batching.tokenize_pairs(tokenizer, [pair], max_length=max_length)
  room = max_length - len(prompt)
  assert examples[0]["prompt_ids"].tolist() == prompt
  assert examples[0]["chosen_ids"].tolist() == chosen[:room]
  assert examples[0]["rejected_ids"].tolist() == rejected[:room]
  with pytest.raises(UserError, match="too_long='drop'"):
    batching.tokenize_pairs(tokenizer, [pair], max_length=max_length, too_long="drop")

def test_prompt_batch_is_left_padded(tokenizer):
  prompts = [batching.format_prompt("Hi"), batching.format_prompt("What is the capital of "
                                                                  "France?", "Europe.")]
  ids, mask = batching.prompt_batch(tokenizer, prompts, 40)
  assert ids.shape == mask.shape == (2, 40) and ids.dtype == np.int32
  assert mask.dtype == np.float32
  assert (mask[:, -1] == 1).all()  # every prompt ends in the last column
  for row, prompt in enumerate(prompts):
    n = len(tokenizer(prompt)["input_ids"])
    np.testing.assert_array_equal(mask[row], [0] * (40 - n) + [1] * n)
    assert tokenizer.decode(ids[row, 40 - n:]) == prompt
    assert (ids[row, :40 - n] == EOS).all()
  cut_ids, cut_mask = batching.prompt_batch(tokenizer, prompts, 5)
  assert cut_mask.all()
  np.testing.assert_array_equal(cut_ids[1], tokenizer(prompts[1])["input_ids"][-5:])
  short = len(tokenizer(prompts[0])["input_ids"])
  with pytest.raises(UserError, match=f"prompt 1 is .* longer than max_prompt_length={short}"):
    batching.prompt_batch(tokenizer, prompts, short, truncate=False)


def test_length_grouped_pair_batches(tokenizer):
  """group_by_length: each epoch still holds every pair once, each batch is padded only to its
  longest pair rounded up to PAD_MULTIPLE (a batch padded to max_length holds the same real
  tokens), resume and the host split give the same batches, and padding falls."""
  rng = np.random.default_rng(0)
  pairs = [dict(prompt="Q: " + " ".join(["word"] * int(rng.integers(1, 40))) + "\nA:",
                chosen=f" yes {i}", rejected=f" no {i}") for i in range(64)]
  examples, _ = batching.tokenize_pairs(tokenizer, pairs, max_length=64)
  kwargs = dict(batch_size=8, max_length=64, pad_id=EOS, seed=1)
  grouped = list(itertools.islice(batching.pair_batches(examples, group_by_length=4, **kwargs),
                                  16))
  plain = list(itertools.islice(batching.pair_batches(examples, **kwargs), 8))
  for epoch in (grouped[:8], grouped[8:]):
    seen = sorted(tokenizer.decode(b["input_ids"][k, 0, :int(b["segment_ids"][k, 0].sum())])
                  for b in epoch for k in range(8))
    assert seen == sorted(p["prompt"] + p["chosen"] for p in pairs)
  for batch in grouped:
    width = batch["input_ids"].shape[-1]
    longest = int(batch["segment_ids"].sum(-1).max())
    assert width % batching.PAD_MULTIPLE == 0 and longest <= width < longest + batching.PAD_MULTIPLE
    widest = batching.pad_pair_batch(batch, 64, EOS)
    assert widest["input_ids"].shape == (8, 2, 64)
    np.testing.assert_array_equal(widest["input_ids"][..., :width], batch["input_ids"])
    assert (widest["input_ids"][..., width:] == EOS).all() and not widest["segment_ids"][..., width:].any()
  assert np.mean([b["input_ids"].shape[-1] for b in grouped]) < 0.8 * np.mean(
      [b["input_ids"].shape[-1] for b in plain])
  _assert_same_batch(next(batching.pair_batches(examples, start_step=11, group_by_length=4,
                                                **kwargs)), grouped[11])
  hosts = [list(itertools.islice(batching.pair_batches(
      examples, process_index=i, process_count=2, group_by_length=4, **kwargs), 4))
           for i in range(2)]
  for step in range(4):
    for key in grouped[step]:
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]), grouped[step][key])
  with pytest.raises(UserError, match="group_by_length"):
    next(batching.pair_batches(examples, group_by_length=-1, **kwargs))
