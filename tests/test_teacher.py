"""Tests of the simulated teacher: the gold rubric, the noisy Bradley-Terry labeller, agreement."""

import collections
from collections.abc import Mapping

import numpy as np
import pytest

from rlhf_jax.data import builtin, teacher
from rlhf_jax.errors import UserError


def _question(instruction, answer, task, context=""):
  return {"instruction": instruction, "context": context, "answer": answer, "task": task}


# One question per task type, with hand-written responses in each style, best first:
# (question, correct explained, correct plain, correct terse, correct rambling, evasive,
#  {style: the same style with a wrong answer}).
EVASIVE = "I am not sure about that. You could look it up in a book."
RAMBLE = "Great question! {} I hope this helps! Have a lovely afternoon!"
CASES = {
    "arithmetic": (
        _question("What is 3 plus 4?", "7", "add"),
        "3 plus 4 equals 7, because adding 4 to 3 gives 7.", "3 plus 4 equals 7.", "7",
        RAMBLE.format("3 plus 4 equals 7."), EVASIVE,
        {"explained": "3 plus 4 equals 8, because adding 4 to 3 gives 8.",
         "plain": "3 plus 4 equals 8.", "terse": "8",
         "rambling": RAMBLE.format("3 plus 4 equals 8.")}),
    "conversion": (
        _question("How many centimetres are in 3 metres?", "300", "convert"),
        "3 metres is 300 centimetres, because each metre is 100 centimetres, and 3 times 100 "
        "is 300.", "3 metres is 300 centimetres.", "300",
        RAMBLE.format("3 metres is 300 centimetres."), "It depends on how you look at it.",
        {"explained": "3 metres is 30 centimetres, because each metre is 10 centimetres.",
         "plain": "3 metres is 3000 centimetres.", "terse": "3000",
         "rambling": RAMBLE.format("3 metres is 30 centimetres.")}),
    "world_fact": (
        _question("What is the capital of Kenya?", "Nairobi", "capital"),
        "The capital of Kenya is Nairobi, because Kenya lies in Africa, and its government sits "
        "in Nairobi.", "The capital of Kenya is Nairobi.", "Nairobi",
        RAMBLE.format("The capital of Kenya is Nairobi."), "Why not try to find out for yourself?",
        {"explained": "The capital of Kenya is Cairo, because Kenya lies in Africa.",
         "plain": "The capital of Kenya is Cairo.", "terse": "Cairo",
         "rambling": RAMBLE.format("The capital of Kenya is Cairo.")}),
    "spelling": (
        _question('What is the first letter of the word "lamp"?', "l", "first_letter"),
        'The first letter of "lamp" is l, because it is spelled l-a-m-p, which starts with l.',
        'The first letter of "lamp" is l.', "l", RAMBLE.format('The first letter of "lamp" is l.'),
        EVASIVE,
        {"explained": 'The first letter of "lamp" is m, because it is spelled l-a-m-p.',
         "plain": 'The first letter of "lamp" is p.', "terse": "p",
         "rambling": RAMBLE.format('The first letter of "lamp" is m.')}),
    "science": (
        _question("How many legs does a spider have?", "8", "legs"),
        "A spider has 8 legs, because it is an arachnid, and arachnids like it have 8 legs.",
        "A spider has 8 legs.", "8", RAMBLE.format("A spider has 8 legs."), EVASIVE,
        {"explained": "A spider has 6 legs, because it is an insect, and insects have 6 legs.",
         "plain": "A spider has 6 legs.", "terse": "6",
         "rambling": RAMBLE.format("A spider has 10 legs.")}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gold_ranks_the_styles_and_any_wrong_answer_below_a_right_one(case):
  question, explained, plain, terse, rambling, evasive, wrong = CASES[case]
  scores = [teacher.gold_score(question, r) for r in (explained, plain, terse, rambling, evasive)]
  assert scores == sorted(scores, reverse=True) and len(set(scores)) == 5, scores
  right = dict(explained=scores[0], plain=scores[1], terse=scores[2], rambling=scores[3])
  for style, response in wrong.items():
    assert not builtin.check_answer(question, response), response
    # Correctness dominates: below the right answer in the same style and every right answer.
    assert teacher.gold_score(question, response) < min(right.values()), (style, response)
  assert teacher.score_parts(question, explained)["explanation"] > 0
  assert teacher.score_parts(question, wrong["explained"])["explanation"] == 0


@pytest.mark.parametrize("question, response", [
    # The wrong operation, with the right operands and result.
    (_question("What is 3 plus 4?", "7", "add"), "3 plus 4 equals 7, because 3 times 4 is 7."),
    (_question("What is 3 plus 4?", "7", "add"), "3 plus 4 equals 7, because 7 minus 4 is 3."),
    # A connective without content, or with content about something else.
    (_question("What is 3 plus 4?", "7", "add"), "3 plus 4 equals 7, because."),
    (_question("What is 3 plus 4?", "7", "add"), "3 plus 4 equals 7, because I know it."),
    # The explanation carries no answer of its own.
    (_question("What is 3 plus 4?", "7", "add"), "Answer: 3 plus 4 equals 7."),
    (_question("How many centimetres are in 3 metres?", "300", "convert"),
     "3 metres is 300 centimetres, because each metre has many centimetres."),
    (_question("What is the capital of Kenya?", "Nairobi", "capital"),
     "The capital of Kenya is Nairobi, because Kenya lies in Asia."),
    (_question("What class of animal is a bat?", "mammal", "animal_class"),
     "The bat belongs to the mammal class, because like every mammal, it has feathers."),
    (_question("Which planet is third from the Sun?", "Earth", "planet_by_position"),
     "The third planet from the Sun is Earth, because there are three planets between Earth "
     "and the Sun."),
    (_question('Spell "cat" backwards.', "tac", "backwards"),
     '"cat" spelled backwards is tac, because that is how it goes.'),
])
def test_explanations_earn_credit_only_when_their_content_is_right(question, response):
  assert builtin.check_answer(question, response), response
  parts = teacher.score_parts(question, response)
  assert parts["explanation"] == 0 and parts["correct"] == teacher.RUBRIC["correct"]


def test_a_correct_explanation_earns_credit_in_other_words_too():
  question = _question("What is 9 minus 4?", "5", "subtract")
  assert teacher.explains(question, "9 minus 4 equals 5, since taking 4 away from 9 leaves 5.")
  assert teacher.explains(question, "Taking 4 away from 9 leaves 5, so the answer is 5.")
  assert not teacher.explains(question, "Adding 4 to 9 gives 5, so the answer is 5.")


def test_filler_length_and_hedging_cost_points():
  question = _question("What is 3 plus 4?", "7", "add")
  assert teacher.gold_score(question, "I think 3 plus 4 equals 7.") < teacher.gold_score(
      question, "3 plus 4 equals 7.")
  long = "3 plus 4 equals 7. " + " ".join(["Seven is the answer to this sum."] * 6)
  parts = teacher.score_parts(question, long)
  assert parts["length"] < 0 and parts["filler"] == 0
  assert teacher.score_parts(question, "")["evasion"] == teacher.RUBRIC["evasion"]


class _QuestionOnly(Mapping):
  """A record that records each key read and refuses those beyond the question's own."""

  def __init__(self, record):
    self._record, self.read = record, []

  def __getitem__(self, key):
    self.read.append(key)
    if key not in teacher.QUESTION_FIELDS:
      raise AssertionError(f"the teacher read {key!r}")
    return self._record[key]

  def __iter__(self):
    raise AssertionError("the teacher iterated over the record's fields")

  def __len__(self):
    raise AssertionError("the teacher asked for the record's size")

  def __contains__(self, key):
    return key in self._record


def test_gold_score_reads_only_the_question_fields():
  records = builtin.generate(seed=4, num_train=300, num_eval=10,
                             demonstrators=builtin.MIXED_DEMONSTRATORS)["train"][:60]
  for record in records:
    guarded = _QuestionOnly(record)
    score = teacher.gold_score(guarded, record["response"])
    assert set(guarded.read) <= set(teacher.QUESTION_FIELDS) and "answer" in guarded.read
    # The same text scores the same whoever wrote it and whatever the reference says.
    other = dict(record, demonstrator="tutor", response="something else entirely")
    assert teacher.gold_score(other, record["response"]) == score


def test_gold_scores_is_the_loop_and_checks_lengths():
  question = CASES["arithmetic"][0]
  responses = list(CASES["arithmetic"][1:6])
  np.testing.assert_array_equal(teacher.gold_scores([question] * 5, responses),
                                [teacher.gold_score(question, r) for r in responses])
  with pytest.raises(ValueError):
    teacher.gold_scores([question], responses)
  with pytest.raises(UserError, match="answer"):
    teacher.gold_score({"instruction": "What is 3 plus 4?"}, "7")


# --- the labeller ---------------------------------------------------------------------------
NUM_PAIRS = 10_000


def test_label_flip_rate_matches_the_configuration():
  # A 100-point gap: Bradley-Terry always prefers a, so every label against it is a flip.
  gold_a, gold_b = np.full(NUM_PAIRS, 100.0), np.zeros(NUM_PAIRS)
  for flip_rate in (0.0, 0.1, 0.25):
    labels = teacher.noisy_labels(gold_a, gold_b, temperature=0.5, flip_rate=flip_rate, seed=1)
    assert abs((~labels).mean() - flip_rate) <= 0.01, flip_rate


@pytest.mark.parametrize("gap, temperature", [(1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (-1.5, 0.5)])
def test_label_noise_follows_the_temperature_sigmoid(gap, temperature):
  gold_a, gold_b = np.full(NUM_PAIRS, gap), np.zeros(NUM_PAIRS)
  sigmoid = 1 / (1 + np.exp(-gap / temperature))
  labels = teacher.noisy_labels(gold_a, gold_b, temperature=temperature, flip_rate=0.0, seed=2)
  assert abs(labels.mean() - sigmoid) <= 0.01
  flipped = teacher.noisy_labels(gold_a, gold_b, temperature=temperature, flip_rate=0.25, seed=3)
  assert abs(flipped.mean() - (0.75 * sigmoid + 0.25 * (1 - sigmoid))) <= 0.01
  assert teacher.preference_probability(gold_a[:1], gold_b[:1], temperature, 0.25) == (
      pytest.approx(0.75 * sigmoid + 0.25 * (1 - sigmoid)))


def test_labels_are_reproducible_and_agreement_matches_its_expectation():
  rng = np.random.default_rng(0)
  gold_a, gold_b = rng.choice([6.5, 5.0, 4.0, 3.5, 1.0, -2.0], (2, NUM_PAIRS))
  labels = teacher.noisy_labels(gold_a, gold_b, seed=7)
  np.testing.assert_array_equal(labels, teacher.noisy_labels(gold_a, gold_b, seed=7))
  assert (labels != teacher.noisy_labels(gold_a, gold_b, seed=8)).any()
  agreement = teacher.gold_agreement(gold_a, gold_b, labels)
  assert agreement["pairs"] + agreement["ties"] == NUM_PAIRS and agreement["ties"] > 0
  expected = teacher.expected_agreement(gold_a, gold_b)
  assert abs(agreement["agreement"] - expected) <= 0.01
  # The noiseless labeller agrees on every ordered pair.
  assert teacher.gold_agreement(gold_a, gold_b, gold_a > gold_b)["agreement"] == 1.0


def test_gold_agreement_hand_computed_with_ties_left_out():
  gold_a = np.array([2.0, 1.0, 3.0, 0.0, 5.0])
  gold_b = np.array([1.0, 2.0, 3.0, 4.0, 1.0])
  labels = np.array([True, True, False, False, False])
  # Ordered pairs 0, 1, 3, 4: labels agree on 0 and 3; pair 2 is tied.
  assert teacher.gold_agreement(gold_a, gold_b, labels) == {"agreement": 0.5, "pairs": 4,
                                                            "ties": 1}
  assert teacher.gold_agreement(gold_a[2:3], gold_b[2:3], labels[2:3])["agreement"] is None


@pytest.mark.parametrize("temperature, flip_rate", [(0.0, 0.1), (-1.0, 0.1), (1.0, 0.5),
                                                    (1.0, -0.1)])
def test_bad_noise_settings_are_user_errors(temperature, flip_rate):
  with pytest.raises(UserError, match="teacher"):
    teacher.noisy_labels(np.zeros(2), np.ones(2), temperature=temperature, flip_rate=flip_rate)


# --- the teacher on generated data ----------------------------------------------------------
STYLE_ORDER = ("tutor", "plain", "terse", "rambler", "careless", "evasive")


def test_gold_order_of_generated_styles_and_the_labellers_ceiling():
  splits = builtin.generate(seed=0, num_train=3000, num_eval=100,
                            demonstrators=builtin.MIXED_DEMONSTRATORS)
  by_style = collections.defaultdict(list)
  for records in splits.values():  # every split, OOD included
    for record in records:
      by_style[record["demonstrator"]].append(record)
  scores = {}
  for style in STYLE_ORDER:
    sample = by_style[style][:30]
    assert len(sample) == 30
    scores[style] = teacher.gold_scores(sample, [r["response"] for r in sample])
  # Every sampled response of a better style scores above every one of the next style.
  for better, worse in zip(STYLE_ORDER, STYLE_ORDER[1:]):
    assert scores[better].min() > scores[worse].max(), (better, worse)
  # Two random mixed-style responses to one training question: the labeller's agreement with the
  # gold order (the ceiling of any reward model) at the default noise.
  responses = collections.defaultdict(list)
  for record in splits["train"]:
    responses[(record["instruction"], record["context"])].append(record)
  rng = np.random.default_rng(0)
  questions, first, second = [], [], []
  for group in responses.values():
    if len(group) >= 2:
      i, j = rng.choice(len(group), 2, replace=False)
      questions.append(group[i])
      first.append(group[i]["response"])
      second.append(group[j]["response"])
  gold_a, gold_b = teacher.gold_scores(questions, first), teacher.gold_scores(questions, second)
  agreement = teacher.gold_agreement(gold_a, gold_b, teacher.noisy_labels(gold_a, gold_b))
  assert agreement["pairs"] > 100
  assert 0.75 < agreement["agreement"] < 0.95
