"""Tests of the built-in educational dataset, its answer checker and its tokenizer."""

import collections
import hashlib
import json
import re

import numpy as np
import pytest
import transformers

from rlhf_jax.data import builtin
from rlhf_jax.errors import UserError

from conftest import SHARED_DATA as DATA_DIR  # noqa: E402 ($RLHF_JAX_DATA)
EVAL_SPLITS = ("validation", "test", "ood_1", "ood_2", "ood_3")


@pytest.fixture(scope="module")
def splits():
  return builtin.generate(seed=0)


def _question(record):
  return (record["instruction"], record["context"])


def _numbers(text):
  return [int(n) for n in re.findall(r"\d+", text)]


def _quoted_word(text):
  return re.search(r'"([a-z]+)"', text).group(1)


# --- generation -----------------------------------------------------------------------------
def test_same_seed_gives_identical_json_and_other_seed_differs():
  first = json.dumps(builtin.generate(seed=7, num_train=300, num_eval=50))
  again = json.dumps(builtin.generate(seed=7, num_train=300, num_eval=50))
  other = builtin.generate(seed=8, num_train=300, num_eval=50)
  assert first == again
  assert json.loads(first) != other
  # The held-out content itself depends on the seed, not only the sampling order.
  held_out = lambda s: {r["instruction"] for r in s["test"] if r["category"] == "arithmetic"}
  assert held_out(json.loads(first)) != held_out(other)


def test_split_sizes_levels_and_fields(splits):
  assert tuple(splits) == builtin.SPLITS
  assert len(splits["train"]) == builtin.DEFAULT_NUM_TRAIN
  for name in EVAL_SPLITS:
    assert 0 < len(splits[name]) <= builtin.DEFAULT_NUM_EVAL
  assert set(builtin.OOD_LEVELS) == {0, 1, 2, 3}
  expected_level = {"train": 0, "validation": 0, "test": 0, "ood_1": 1, "ood_2": 2, "ood_3": 3}
  for name, records in splits.items():
    for record in records:
      assert record["ood_level"] == expected_level[name]
      for field in ("instruction", "context", "response", "category", "answer"):
        assert isinstance(record[field], str)
      assert record["instruction"] and record["response"] and record["answer"]
  # Answers are short: a few words at most.
  assert max(len(r["answer"].split()) for s in splits.values() for r in s) <= 2


def test_categories_are_varied_and_some_records_have_context(splits):
  train = splits["train"]
  counts = collections.Counter(r["category"] for r in train)
  assert len(counts) >= 5
  assert min(counts.values()) >= len(train) // 10
  for category in counts:
    phrasings = {r["template"] for r in train if r["category"] == category}
    assert len(phrasings) >= 4, category
  with_context = [r for r in train if r["context"]]
  assert 0 < len(with_context) < len(train) // 4
  # The context holds what the answer is derived from.
  for record in with_context:
    if record["task"] == "capital":
      assert record["answer"] in record["context"]


def test_no_question_shared_between_train_and_evaluation(splits):
  train_instructions = {r["instruction"] for r in splits["train"]}
  train_questions = {_question(r) for r in splits["train"]}
  seen = set()
  for name in EVAL_SPLITS:
    questions = [_question(r) for r in splits[name]]
    assert len(set(questions)) == len(questions), f"{name} repeats a question"
    assert not train_questions & set(questions), name
    assert not train_instructions & {r["instruction"] for r in splits[name]}, name
    assert not seen & set(questions), f"{name} shares questions with another evaluation split"
    seen |= set(questions)


def test_held_out_numbers_and_words_never_appear_in_train(splits):
  # Canonical responses name the content in a fixed order ("3 plus 4 equals 7.",
  # '"cat" spelled backwards is tac.'), so they identify the question's content.
  content_tasks = ("add", "subtract", "multiply", "convert", "first_letter", "last_letter",
                   "letter_count", "backwards")
  train_responses = {r["response"] for r in splits["train"]}
  for name in ("validation", "test"):
    held_out = [r for r in splits[name] if r["task"] in content_tasks]
    assert held_out
    assert not train_responses & {r["response"] for r in held_out}, name


def test_evaluated_facts_were_all_seen_in_training(splits):
  # A table fact can only be known if it was trained on: val/test ask it with a new phrasing.
  train_responses = {r["response"] for r in splits["train"]}
  for name in ("validation", "test", "ood_1"):
    facts = [r for r in splits[name] if r["category"] in ("world_facts", "science")]
    assert facts
    assert all(r["response"] in train_responses for r in facts), name


def test_ood_1_uses_only_phrasings_never_trained_on(splits):
  mask = lambda text: re.sub(r'\d+|"[a-z]+"', "#", text)
  train_skeletons = {mask(r["instruction"]) for r in splits["train"]}
  train_templates = {r["template"] for r in splits["train"]}
  ood_1 = splits["ood_1"]
  assert {r["category"] for r in ood_1} == set(builtin.TRAIN_CATEGORIES)
  assert not train_templates & {r["template"] for r in ood_1}
  for record in ood_1:
    if record["category"] in ("arithmetic", "unit_conversion", "spelling"):
      assert mask(record["instruction"]) not in train_skeletons, record


def test_ood_2_content_is_larger_than_anything_in_train(splits):
  train, ood_2 = splits["train"], splits["ood_2"]
  assert {r["category"] for r in ood_2} == {"arithmetic", "unit_conversion", "spelling"}
  for task in ("add", "subtract", "multiply", "convert"):
    train_max = max(max(_numbers(r["instruction"])) for r in train if r["task"] == task)
    ood_min = min(min(_numbers(r["instruction"])) for r in ood_2 if r["task"] == task)
    assert ood_min > train_max, task
  for task in ("first_letter", "last_letter", "letter_count", "backwards"):
    train_max = max(len(_quoted_word(r["instruction"])) for r in train if r["task"] == task)
    ood_min = min(len(_quoted_word(r["instruction"])) for r in ood_2 if r["task"] == task)
    assert ood_min > train_max, task


def test_ood_3_is_a_category_absent_from_training(splits):
  ood_3_categories = {r["category"] for r in splits["ood_3"]}
  assert ood_3_categories == {builtin.HELD_OUT_CATEGORY}
  for name in ("train", "validation", "test", "ood_1", "ood_2"):
    assert not ood_3_categories & {r["category"] for r in splits[name]}
  assert not {r["task"] for r in splits["ood_3"]} & {r["task"] for r in splits["train"]}
  for record in splits["ood_3"]:
    (n,) = _numbers(record["instruction"])
    assert int(record["answer"]) in (n - 1, n + 1)


# --- answer checking ------------------------------------------------------------------------
def test_every_response_passes_and_every_corruption_fails(splits):
  rng = np.random.default_rng(0)
  for name, records in splits.items():
    for record in records:
      assert builtin.check_answer(record, record["response"]), record
      wrong = builtin.corrupt(record, rng)
      assert wrong != record["response"]
      assert not builtin.check_answer(record, wrong), (record, wrong)


def test_answers_are_correct_by_independent_computation(splits):
  ops = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b,
         "multiply": lambda a, b: a * b}
  for record in splits["test"] + splits["ood_2"]:
    task, answer = record["task"], record["answer"]
    if task in ops:
      a, b, _ = _numbers(record["response"])
      assert int(answer) == ops[task](a, b)
    elif task in ("first_letter", "last_letter", "letter_count", "backwards"):
      word = _quoted_word(record["instruction"])
      expected = {"first_letter": word[0], "last_letter": word[-1],
                  "letter_count": str(len(word)), "backwards": word[::-1]}[task]
      assert answer == expected


def _record(instruction, answer, task, context=""):
  return {"instruction": instruction, "context": context, "response": "", "category": "",
          "answer": answer, "task": task}


@pytest.mark.parametrize("response, correct", [
    ("7", True),
    ("3 plus 4 equals 7.", True),
    ("The answer is seven!", True),
    ("7.0", True),
    ("", False),
    ("8", False),
    ("77", False),
    ("-7", False),
    ("7 or 8", False),
    ("7 8 9 10 11", False),
    ("3 plus 4", False),  # only echoes the question
    ("3 plus 4 equals 3 or 7", False),  # 3 is asserted once more than the question says it
    ("3 plus 4 equals 7, so 7.", True),
])
def test_checker_on_arithmetic(response, correct):
  record = _record("What is 3 plus 4?", "7", "add")
  assert builtin.check_answer(record, response) is correct


@pytest.mark.parametrize("response, correct", [
    ("300", True),
    ("3 metres is 300 centimetres.", True),
    ("There are 300 cm in 3 m, because one metre is 100 cm.", True),  # echoes the context
    ("3000", False),
    ("300 or 3000", False),
    ("3", False),
])
def test_checker_on_unit_conversion_with_context(response, correct):
  record = _record("Using the fact given, how many centimetres are in 3 metres?", "300",
                   "convert", context="One metre is 100 centimetres.")
  assert builtin.check_answer(record, response) is correct


@pytest.mark.parametrize("record, response, correct", [
    (_record("What is the capital of France?", "Paris", "capital"), "Paris", True),
    (_record("What is the capital of France?", "Paris", "capital"), "it's paris!", True),
    (_record("What is the capital of France?", "Paris", "capital"), "Berlin", False),
    (_record("What is the capital of France?", "Paris", "capital"), "Paris or Berlin", False),
    (_record("What is the capital of France?", "Paris", "capital"), "Parisian", False),
    (_record("What is the capital of India?", "New Delhi", "capital"), "New Delhi.", True),
    (_record("What is the capital of India?", "New Delhi", "capital"), "Delhi", False),
    (_record("What class of animal is a bat?", "mammal", "animal_class"), "Bats are mammals.",
     True),
    (_record("What class of animal is a bat?", "mammal", "animal_class"), "a bird or a mammal",
     False),
    (_record("What position from the Sun is Mars?", "4", "planet_position"),
     "Mars is the fourth planet.", True),
    (_record("What position from the Sun is Mars?", "4", "planet_position"), "Mars is 4th.", True),
    (_record("What position from the Sun is Mars?", "4", "planet_position"),
     "fourth or fifth", False),
    (_record('What is the first letter of the word "cat"?', "c", "first_letter"), "C.", True),
    (_record('What is the first letter of the word "cat"?', "c", "first_letter"),
     "It's a c.", True),
    (_record('What is the first letter of the word "cat"?', "c", "first_letter"),
     "c or k", False),
    (_record('What is the first letter of the word "cat"?', "c", "first_letter"), "t", False),
    (_record('Spell "cat" backwards.', "tac", "backwards"), '"cat" backwards is "tac".', True),
    (_record('Spell "cat" backwards.', "tac", "backwards"), "tca", False),
    (_record('Spell "cat" backwards.', "tac", "backwards"), "tac or act", False),
    (_record('Spell "cat" backwards.', "tac", "backwards"), "cat", False),
    (_record("How many legs does a spider have?", "8", "legs"), "A spider has eight legs.", True),
    (_record("How many legs does a spider have?", "8", "legs"), "6 to 8", False),
])
def test_checker_on_other_kinds(record, response, correct):
  assert builtin.check_answer(record, response) is correct


def test_checker_without_task_falls_back_on_the_answer_form():
  number = {"instruction": "How many apples?", "context": "", "answer": "12"}
  assert builtin.check_answer(number, "There are twelve apples.")
  assert not builtin.check_answer(number, "12 or 13")
  phrase = {"instruction": "Who wrote it?", "context": "", "answer": "Jane Austen"}
  assert builtin.check_answer(phrase, "It was jane austen.")
  assert not builtin.check_answer(phrase, "Austen")
  with pytest.raises(UserError, match="answer"):
    builtin.check_answer({"instruction": "?"}, "12")


@pytest.mark.parametrize("record, response, correct", [
    # An explanation restates the question's values once per statement of the answer.
    (_record("What is 3 plus 4?", "7", "add"),
     "3 plus 4 equals 7, because adding 4 to 3 gives 7.", True),
    (_record("What is 3 plus 4?", "7", "add"), "7. If you add 3 and 4, you get seven.", True),
    (_record("What is 3 plus 4?", "7", "add"), "7, or maybe 8", False),
    (_record("What is 3 plus 4?", "7", "add"),
     "3 plus 4 equals 7, because adding 4 to 3 gives 7 or 8.", False),
    (_record("What is 3 plus 4?", "7", "add"), "7, because adding 4 to 3 gives 7 or 9.", False),
    # The conversion factor (and "one") follow from the unit names.
    (_record("How many centimetres are in 3 metres?", "300", "convert"),
     "3 metres is 300 centimetres, because each metre is 100 centimetres, and 3 times 100 is "
     "300.", True),
    (_record("How many centimetres are in 3 metres?", "300", "convert"),
     "3 metres is 300 centimetres: one metre is 100 centimetres.", True),
    (_record("How many centimetres are in 3 metres?", "300", "convert"),
     "3 metres is 300 centimetres, because one metre is 1000 centimetres.", False),
    (_record("How many centimetres are in 3 metres?", "300", "convert"), "300 or 3000", False),
    (_record("How many months are in 12 years?", "144", "convert"),
     "12 years is 144 months, because each year is 12 months, and 12 times 12 is 144.", True),
    (_record("What number comes after 7?", "8", "next_number"),
     "The number after 7 is 8, because 8 is one more than 7.", True),
    # Spelling out the question's word is no letter answer; other letters still are.
    (_record('What is the last letter of the word "cat"?', "t", "last_letter"),
     'The last letter of "cat" is t, because it is spelled c-a-t.', True),
    (_record('What is the first letter of the word "cat"?', "c", "first_letter"),
     "It is c: c-a-t.", True),
    (_record('What is the first letter of the word "cat"?', "c", "first_letter"), "c-a-t", False),
    (_record('What is the first letter of the word "cat"?', "c", "first_letter"),
     "It is c, or c-k.", False),
    (_record('Spell "cat" backwards.', "tac", "backwards"),
     '"cat" spelled backwards is tac, because it is spelled c-a-t, and read from the end that is '
     't-a-c.', True),
    (_record("What is the capital of France?", "Paris", "capital"),
     "The capital of France is Paris, because France lies in Europe, and its government sits in "
     "Paris.", True),
    (_record("What is the capital of France?", "Paris", "capital"),
     "Paris, because Berlin is in Germany.", False),
])
def test_checker_on_explained_answers_and_hedges(record, response, correct):
  assert builtin.check_answer(record, response) is correct


def test_corrupt_works_on_responses_without_the_answer():
  record = dict(_record("What is 3 plus 4?", "7", "add"), response="I would rather not guess.")
  wrong = builtin.corrupt(record, np.random.default_rng(0))
  assert wrong.startswith("The answer is ") and not builtin.check_answer(record, wrong)
  explained = dict(record, response="3 plus 4 equals 7, because adding 4 to 3 gives 7.")
  wrong = builtin.corrupt(explained, np.random.default_rng(0))
  # Every statement of the answer changes, to one wrong value.
  assert "7" not in wrong and len(set(_numbers(wrong)) - {3, 4}) == 1, wrong
  assert not builtin.check_answer(record, wrong)


# --- demonstrators --------------------------------------------------------------------------
# sha256 of json.dumps(generate(seed=0), sort_keys=True), computed before demonstrators existed:
# the default data must stay byte-identical until the default mix is changed on purpose.
DEFAULT_GENERATE_SHA256 = "d872568f70a6da57d019f8f566728da16bdb05134e37d640cf5237b2bb9f5a68"
SMALL_GENERATE_SHA256 = "feb6880dea58dbd010c0301101891cb49e5b968645daf44edccdaa7d77d7b742"


def test_default_generation_is_unchanged(splits):
  digest = lambda s: hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()
  assert digest(splits) == DEFAULT_GENERATE_SHA256
  assert digest(builtin.generate(seed=3, num_train=500, num_eval=40,
                                 demonstrators={"plain": 1.0})) == SMALL_GENERATE_SHA256


@pytest.fixture(scope="module")
def mixed():
  return builtin.generate(seed=0, num_train=4000, num_eval=200,
                          demonstrators=builtin.MIXED_DEMONSTRATORS)


def test_demonstrator_shares_match_the_configuration(mixed):
  shares = builtin.parse_demonstrators(builtin.MIXED_DEMONSTRATORS)
  assert set(shares) == set(builtin.DEMONSTRATORS) and 0 < shares["careless"] < 0.5
  for name, records in mixed.items():
    counts = collections.Counter(r["demonstrator"] for r in records)
    for demonstrator, share in shares.items():
      assert abs(counts[demonstrator] / len(records) - share) <= 0.01, (name, demonstrator)
  custom = builtin.generate(seed=2, num_train=3000, num_eval=20,
                            demonstrators="tutor=0.5,terse=0.2,careless=0.3")["train"]
  counts = collections.Counter(r["demonstrator"] for r in custom)
  assert {d: counts[d] / 3000 for d in counts} == pytest.approx(
      {"tutor": 0.5, "terse": 0.2, "careless": 0.3}, abs=0.01)


def test_mixed_data_asks_the_default_questions(mixed):
  default = builtin.generate(seed=0, num_train=4000, num_eval=200)
  question = lambda r: {k: v for k, v in r.items() if k not in ("response", "demonstrator")}
  for name in builtin.SPLITS:
    assert [question(r) for r in mixed[name]] == [question(r) for r in default[name]], name
    for record, plain in zip(mixed[name], default[name]):
      if record["demonstrator"] == "plain":
        assert record["response"] == plain["response"]
  again = builtin.generate(seed=0, num_train=4000, num_eval=200,
                           demonstrators=builtin.MIXED_DEMONSTRATORS)
  assert again == mixed


def test_every_style_in_every_category_and_split_with_several_phrasings(mixed):
  for name, records in mixed.items():
    assert {r["demonstrator"] for r in records} == set(builtin.DEMONSTRATORS), name
  for category in builtin.TRAIN_CATEGORIES:
    styles = {r["demonstrator"] for r in mixed["train"] if r["category"] == category}
    assert styles == set(builtin.DEMONSTRATORS), category
  # A phrasing's skeleton: the response with the question's content masked.
  def skeleton(record):
    text = re.sub(r"\d+", "#", record["response"])
    for word in re.findall(r"[A-Za-z]+", record["instruction"] + " " + record["answer"]):
      text = re.sub(rf"\b{re.escape(word)}\b", "_", text)
    return text
  for demonstrator in builtin.DEMONSTRATORS:
    for task in ("add", "convert", "capital", "backwards", "state_of_matter"):
      skeletons = {skeleton(r) for r in mixed["train"]
                   if r["demonstrator"] == demonstrator and r["task"] == task}
      assert len(skeletons) >= 2, (demonstrator, task)


def test_mixed_responses_are_right_unless_careless_or_evasive(mixed):
  rng = np.random.default_rng(0)
  for name, records in mixed.items():
    for record in records:
      right = record["demonstrator"] not in ("careless", "evasive")
      assert builtin.check_answer(record, record["response"]) is right, record
      wrong = builtin.corrupt(record, rng)
      assert wrong != record["response"] and not builtin.check_answer(record, wrong), record
  tutors = [r for r in mixed["train"] if r["demonstrator"] == "tutor"]
  assert all(builtin.explanation_spec(r) is not None for r in tutors)
  assert all(builtin.spelled_words(r["response"]) for r in tutors if r["category"] == "spelling")


@pytest.mark.parametrize("spec, message", [
    ("tutor=0.5,plane=0.5", "unknown demonstrator 'plane'"),
    ("tutor=0.5,plain=0.4", "sum to 1"),
    ("tutor=-0.5,plain=1.5", ">= 0"),
    ("tutor,plain=1", ">= 0"),
    ("tutor=half,plain=0.5", ">= 0"),
])
def test_bad_demonstrator_shares_are_user_errors(spec, message):
  with pytest.raises(UserError, match=re.escape(message)) as error:
    builtin.parse_demonstrators(spec)
  assert "data.demonstrators" in str(error.value)
  with pytest.raises(UserError, match="data.demonstrators"):
    builtin.generate(num_train=10, num_eval=5, demonstrators=spec)


# --- files ----------------------------------------------------------------------------------
def test_write_splits_round_trips_with_dolly_fields(tmp_path):
  splits = builtin.generate(seed=1, num_train=50, num_eval=10)
  paths = builtin.write_splits(splits, tmp_path / "builtin")
  assert set(paths) == set(builtin.SPLITS)
  for name, path in paths.items():
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == splits[name]
  dolly = DATA_DIR / "dolly" / "dolly_sample_1k.jsonl"
  if not dolly.exists():
    pytest.skip(f"shared test data not found at {dolly}")
  with dolly.open(encoding="utf-8") as f:
    dolly_fields = list(json.loads(f.readline()))
  first = json.loads(paths["train"].read_text(encoding="utf-8").splitlines()[0])
  assert list(first)[:len(dolly_fields)] == dolly_fields


# --- tokenizer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
  return list(builtin.record_texts(builtin.generate(seed=0, num_train=500, num_eval=20)["train"]))


def test_tokenizer_special_tokens_and_round_trip(corpus):
  tokenizer = builtin.train_tokenizer(corpus, vocab_size=400)
  eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
  assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id == eos_id
  assert len(tokenizer) <= 400
  # Byte-level: text never seen in the corpus (accents, symbols, odd spacing) round-trips.
  for text in corpus[:50] + ["Zürich  naïve ☃\n\ttabs", "What is 123456 plus 7?"]:
    ids = tokenizer(text)["input_ids"]
    assert eos_id not in ids  # no special tokens are added implicitly
    assert tokenizer.decode(ids) == text
  # Digits are single tokens, so numbers of every size share their embeddings.
  assert tokenizer.tokenize("90210") == list("90210")
  # Frequent corpus words become single tokens.
  assert len(tokenizer.tokenize("What")) == 1


def test_tokenizer_reloads_from_disk_and_is_deterministic(corpus, tmp_path):
  tokenizer = builtin.train_tokenizer(corpus, vocab_size=400, save_dir=tmp_path / "tok")
  again = builtin.train_tokenizer(corpus, vocab_size=400)
  assert tokenizer.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert reloaded.eos_token_id == reloaded.pad_token_id == tokenizer.eos_token_id
  assert reloaded.get_vocab() == tokenizer.get_vocab()
  texts = corpus[:20] + ["The capital of Peru is Lima.", "Zürich 42"]
  assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
  # Padding works and pads with eos (GPT-Neo has no separate pad token).
  batch = reloaded(["Paris", "The capital of France is Paris."], padding=True)
  assert batch["input_ids"][0][-1] == tokenizer.eos_token_id
  assert batch["attention_mask"][0][-1] == 0


def test_tokenizer_rejects_bad_arguments(corpus):
  with pytest.raises(UserError, match="vocab_size"):
    builtin.train_tokenizer(corpus, vocab_size=100)
  with pytest.raises(UserError, match="empty"):
    builtin.train_tokenizer([], vocab_size=400)


def test_generate_rejects_bad_sizes():
  with pytest.raises(UserError, match="num_train"):
    builtin.generate(num_train=0)
