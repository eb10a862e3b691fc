"""The simulated teacher: a gold score of any response to a built-in question, and noisy labels.

As in the controlled RLHF studies (Ziegler et al. 2019's mock tasks, Gao et al. 2022's gold reward
model, AlpacaFarm's simulated annotators), a known gold preference judges the policy's own
samples, so the whole pipeline can be measured against the truth it is meant to learn.

The gold score reads only the response text and the question's own fields: `instruction`,
`context`, `answer` and `task` (the question type, which says what kind of answer to expect and
which explanation would be right). It never reads the reference `response`, the `demonstrator`
who wrote it, or any other field, so it scores anything a policy can produce, including hybrids
no demonstrator writes. `question_view` enforces this.

Rubric (points add up; `RUBRIC` holds the numbers):
  correct answer      +4.0  `builtin.check_answer`: the answer and no competing one. Dominates:
                            every other item together is worth less, so any right answer in a
                            given style beats any wrong one in the same style.
  correct explanation +1.5  a clause introduced by "because", "since", "as", ":", ";" or a dash
                            (or a clause followed by "so"/"therefore"), next to a statement of
                            the right answer, whose content is right (`builtin.explanation_spec`):
                            both operands and a word of the right operation, the conversion
                            factor with its unit, the country's continent, the symbol's Latin
                            name or letters, the class's mark, the word spelled out letter by
                            letter, ... It must contain every required element, nothing the spec
                            forbids (another operation, a wrong count, another continent) and no
                            answer other than the right one. A bare "because" earns nothing, and
                            so does any explanation of a wrong answer.
  full sentence       +1.0  some sentence of at least 4 words, ending in . ! or ?, states an
                            answer of the question's kind (right or wrong).
  filler              -0.75 per sentence without content: no number, no spelling-out, no word of
                            the question (beyond function words such as "what", "for", "you"),
                            of its answer or of a correct explanation, and no answer candidate
                            ("Great question!", "I hope this helps!").
  evasion             -1.0  no answer of the question's kind stated at all.
  hedging             -0.5  "maybe", "perhaps", "probably", "not sure", "I think", "guess",
                            "depends", "might be".
  length              -0.1  per word past a budget of 30 words.

So for one question: correct explained (6.5) > correct plain sentence (5.0) > correct bare answer
(4.0) > correct answer among two or more filler sentences (<= 3.5) > a wrong answer (<= 1.0) >
an evasive non-answer (<= -1.0, usually below -2 with its filler and hedging).

Labels follow Bradley-Terry: P(a preferred to b) = sigmoid((g_a - g_b) / temperature), and then
the label is flipped with probability `flip_rate` (AlpacaFarm flipped 25% of its simulated
annotators' labels), so P(a) = (1 - flip) * sigmoid + flip * (1 - sigmoid). Labels are
reproducible from a seed. `gold_agreement` reports how often labels agree with the noiseless gold
order, the ceiling for any reward model trained on them; pairs tied in gold have no gold order
and are left out (and counted).
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import builtin
from rlhf_jax.errors import UserError

# The question's own fields: all the gold score may read.
QUESTION_FIELDS = ("instruction", "context", "answer", "task")

RUBRIC = dict(correct=4.0, explanation=1.5, full_sentence=1.0, filler=-0.75, evasion=-1.0,
              hedging=-0.5, word_budget=30, per_word_over_budget=-0.1)

# A rubric step (one point: a full sentence, the evasion penalty) is preferred 88% of the time at
# temperature 0.5 and a correct explanation (1.5 points) 95%, so the Bradley-Terry noise blurs
# only near-ties, while a right against a wrong answer (4 points) is almost never misjudged before
# the flip. Flipping 10% of the labels on top models inattentive labellers. Together, a labeller
# agrees with the gold order on 87% of pairs of two mixed-style responses to one question
# (the default 40,000-record MIXED_DEMONSTRATORS training set, seed 0: 4,346 ordered pairs; 986
# pairs tied in gold left out), noisier than the gold order yet a clearly learnable signal for a
# small reward model. AlpacaFarm's 25% flips give 72% there, about the agreement between
# InstructGPT's human labellers: the realistic-noise setting, one argument away.
DEFAULT_TEMPERATURE = 0.5
DEFAULT_FLIP_RATE = 0.1

_FORWARD = re.compile(r"\b(?:because|since|as)\b|[:;]|\s[-\u2013\u2014]\s", re.IGNORECASE)
_BACKWARD = re.compile(r"\b(?:so|therefore|thus)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_HEDGES = ("maybe", "perhaps", "probably", "not sure", "i think", "guess", "depends",
           "might be")
# Words that say nothing about a question's content: English function words and the verbs
# questions are asked with ("Tell me ...", "What do you get when ...").
_FUNCTION_WORDS = frozenset("""
a an the and or but if of in on at to for from by with about into over under up down out off as
is are was were be been being am do does did have has had can could will would shall should may
might must it its this that these those there here what which who whom whose when where why how
many much some any each every all both no not nor so than too very just also you your yourself we
our us me my i he she him her they them their get gets got find take takes make makes made give
gives tell name use using used given according passage work think let please
""".split())


def question_view(record: Mapping[str, Any]) -> dict[str, Any]:
  """The question's own fields of a record (`QUESTION_FIELDS`), read one key at a time."""
  return {field: record[field] for field in QUESTION_FIELDS if field in record}


def _phrase_in(tokens: Sequence[str], phrase: str) -> bool:
  words = builtin.normalised_tokens(phrase)
  n = len(words)
  return n > 0 and any(list(tokens[i:i + n]) == words for i in range(len(tokens) - n + 1))


def _split_explanation(response: str) -> tuple[str, str] | None:
  """(the rest, the explanation clause) of a response, or None without a connective."""
  forward = _FORWARD.search(response)
  if forward:
    return response[:forward.start()], response[forward.end():]
  backward = _BACKWARD.search(response)
  if backward:
    return response[backward.end():], response[:backward.start()]
  return None


def explains(question: Mapping[str, Any], response: str) -> bool:
  """Whether `response` holds a correct explanation of the right answer (the rubric's +1.5)."""
  spec = builtin.explanation_spec(question)
  parts = _split_explanation(response)
  if spec is None or parts is None:
    return False
  rest, clause = parts
  answer = builtin.canonical_answer(question)
  if answer not in builtin.stated_answers(question, rest, count_echoes=False):
    return False  # explains nothing, or explains a wrong answer
  if any(c != answer for c in builtin.stated_answers(question, clause, count_echoes=False)):
    return False
  tokens = builtin.normalised_tokens(clause)
  if not all(any(_phrase_in(tokens, phrase) for phrase in group) for group in spec.required):
    return False
  if any(_phrase_in(tokens, phrase) for phrase in spec.forbidden):
    return False
  if spec.spellings:
    spelled = builtin.spelled_words(clause)
    if not spelled or any(word not in spec.spellings for word in spelled):
      return False
  return bool(spec.required or spec.spellings)


def _content_words(question: Mapping[str, Any]) -> frozenset[str]:
  """Words that show a sentence is about the question: its content words, its answer's, and
  those of a correct explanation."""
  prompt = f"{question.get('instruction', '')}\n{question.get('context', '')}"
  words = set(builtin.normalised_tokens(prompt))
  spec = builtin.explanation_spec(question)
  if spec is not None:
    for phrase in [p for group in spec.required for p in group] + list(spec.spellings):
      words |= set(builtin.normalised_tokens(phrase))
  return frozenset(words - _FUNCTION_WORDS) | set(builtin.normalised_tokens(
      str(question["answer"])))


def score_parts(question: Mapping[str, Any], response: str) -> dict[str, float]:
  """The rubric's items for one response (their sum is `gold_score`)."""
  question = question_view(question)
  if "answer" not in question:
    raise UserError("the teacher needs the question's 'answer' field to score a response")
  stated = builtin.stated_answers(question, response)
  sentences = [s for s in _SENTENCE_END.split(response.strip()) if s]
  content = _content_words(question)
  def is_filler(sentence: str) -> bool:
    tokens = builtin.normalised_tokens(sentence)
    return not (any(_NUMBER.fullmatch(t) for t in tokens) or builtin.spelled_words(sentence)
                or content & set(tokens)
                or builtin.stated_answers(question, sentence, count_echoes=False))
  full_sentence = any(
      len(s.split()) >= 4 and s.rstrip()[-1:] in ".!?"
      and builtin.stated_answers(question, s, count_echoes=False) for s in sentences)
  tokens = builtin.normalised_tokens(response)
  words = len(response.split())
  return {
      "correct": RUBRIC["correct"] * builtin.check_answer(question, response),
      "explanation": RUBRIC["explanation"] * explains(question, response),
      "full_sentence": RUBRIC["full_sentence"] * full_sentence,
      "filler": RUBRIC["filler"] * sum(map(is_filler, sentences)),
      "evasion": RUBRIC["evasion"] * (not stated),
      "hedging": RUBRIC["hedging"] * any(_phrase_in(tokens, h) for h in _HEDGES),
      "length": RUBRIC["per_word_over_budget"] * max(0, words - RUBRIC["word_budget"]),
  }


def gold_score(question: Mapping[str, Any], response: str) -> float:
  """The teacher's score of `response` to `question` (see the module docstring's rubric).

  Args:
    question: a built-in record or any mapping with the question's fields (`QUESTION_FIELDS`;
      `answer` is required); no other field is read.
    response: free text.

  Returns:
    The score; higher is better.
  """
  return float(sum(score_parts(question, response).values()))


def gold_scores(questions: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> np.ndarray:
  """`gold_score` of each (question, response) pair.

  Returns:
    [num] float64 scores.
  """
  if len(questions) != len(responses):
    raise ValueError(f"{len(questions)} questions but {len(responses)} responses")
  return np.array([gold_score(q, r) for q, r in zip(questions, responses)], dtype=np.float64)


def _check_noise(temperature: float, flip_rate: float) -> None:
  if not temperature > 0:
    raise UserError(f"teacher temperature must be > 0, got {temperature}")
  if not 0 <= flip_rate < 0.5:
    raise UserError(f"teacher flip_rate must be in [0, 0.5), got {flip_rate}")


def preference_probability(gold_a: np.ndarray, gold_b: np.ndarray,
                           temperature: float = DEFAULT_TEMPERATURE,
                           flip_rate: float = DEFAULT_FLIP_RATE) -> np.ndarray:
  """P(the labeller prefers a to b): (1 - flip) * sigmoid(d / T) + flip * (1 - sigmoid(d / T)).

  Args:
    gold_a, gold_b: [num] gold scores.

  Returns:
    [num] probabilities.
  """
  _check_noise(temperature, flip_rate)
  diff = (np.asarray(gold_a, np.float64) - np.asarray(gold_b, np.float64)) / temperature
  p = 0.5 * (1 + np.tanh(diff / 2))  # sigmoid, without overflow
  return (1 - flip_rate) * p + flip_rate * (1 - p)


def noisy_labels(gold_a: np.ndarray, gold_b: np.ndarray, *,
                 temperature: float = DEFAULT_TEMPERATURE, flip_rate: float = DEFAULT_FLIP_RATE,
                 seed: int = 0) -> np.ndarray:
  """The labeller's judgements of pairs: a Bradley-Terry draw, then a flip with `flip_rate`.

  Args:
    gold_a, gold_b: [num] gold scores of the two responses of each pair.
    temperature: the Bradley-Terry scale, in gold points.
    flip_rate: the probability that a judgement is inverted after the draw.
    seed: same seed and scores -> same labels.

  Returns:
    [num] bool: True where a is preferred.
  """
  _check_noise(temperature, flip_rate)
  gold_a, gold_b = np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)
  rng = np.random.default_rng(seed)
  diff = (gold_a - gold_b) / temperature
  bradley_terry = rng.random(gold_a.shape) < 0.5 * (1 + np.tanh(diff / 2))
  flipped = rng.random(gold_a.shape) < flip_rate
  return bradley_terry ^ flipped


def gold_agreement(gold_a: np.ndarray, gold_b: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """How often labels agree with the noiseless gold order.

  Args:
    gold_a, gold_b: [num] gold scores.
    labels: [num] bool, True where a was preferred.

  Returns:
    {"agreement": the fraction of pairs with a gold order whose label follows it (None without
     such pairs), "pairs": how many pairs have a gold order, "ties": pairs tied in gold, left
     out}.
  """
  gold_a, gold_b = np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)
  ordered = np.abs(gold_a - gold_b) > 1e-9
  agree = (np.asarray(labels, bool) == (gold_a > gold_b))[ordered]
  return {"agreement": float(agree.mean()) if agree.size else None, "pairs": int(ordered.sum()),
          "ties": int((~ordered).sum())}


def expected_agreement(gold_a: np.ndarray, gold_b: np.ndarray,
                       temperature: float = DEFAULT_TEMPERATURE,
                       flip_rate: float = DEFAULT_FLIP_RATE) -> float | None:
  """The expected `gold_agreement` of `noisy_labels` on these pairs (ties left out)."""
  gold_a, gold_b = np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)
  ordered = np.abs(gold_a - gold_b) > 1e-9
  if not ordered.any():
    return None
  p = preference_probability(gold_a, gold_b, temperature, flip_rate)
  return float(np.where(gold_a > gold_b, p, 1 - p)[ordered].mean())
