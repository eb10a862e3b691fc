"""The built-in educational QA dataset: generated, verifiable, offline, and its tokenizer.

The project must run its whole pipeline offline on 2 CPU cores in minutes, so it ships a dataset
that the package generates itself, deterministically from a seed, in Dolly's record format. A ~1-3M
parameter GPT-Neo trained from scratch can learn it, and every question has one short answer that a
script can check, so SFT, reward modelling, PPO and evaluation all have an exact-match ground truth.

Categories (the training mix is uniform over the first five):
  arithmetic       addition, subtraction, multiplication of small integers (also as word problems).
  unit_conversion  metres/centimetres, kilograms/grams, hours/minutes, ... (one phrasing gives the
                   conversion factor as `context`).
  world_facts      capitals, chemical symbols, planets' order, animal classes (shipped tables; the
                   capital question sometimes gives a `context` table row to read the answer from).
  spelling         first / last letter, number of letters, a word backwards.
  science          legs of animals, states of matter, water's boiling/freezing points, how many
                   days in a week and the like.
  counting         the number before / after n: held out of training entirely (`ood_3`).

Splits (`generate`): `train`, `validation`, `test` are in-distribution (`ood_level` 0) and never
share an instruction with each other or with the OOD splits. For categories with
numbers or words as content, validation and test use held-out content (number pairs, quantities,
words); for table facts they ask a fact seen in training with a phrasing not used for that fact in
training (a model cannot know a fact it never saw). `ood_1` uses phrasings (templates) held out of
training entirely, `ood_2` larger numbers and longer words than any in training, `ood_3` the
held-out `counting` category. See `OOD_LEVELS`.

Records are Dolly's (`instruction`, `context`, `response`, `category`) plus `answer` (the canonical
short answer), `ood_level`, `task` (the question type, which `check_answer` uses to know what kind
of answer to expect) and `template` (the phrasing's id, `task/index`).

Demonstrators (`DEMONSTRATORS`, issue #21): by default every response is the canonical answer
sentence. `generate(demonstrators=...)` has simulated writers of mixed quality answer instead, as
in crowd-written data: a tutor who explains correctly, a plain, a terse, a rambling, an evasive and
a careless (wrong) writer, in configured shares (`MIXED_DEMONSTRATORS` is the recommended mix).
Such records name their writer in `demonstrator`, for analysis only: nothing that scores text may
read it (see rlhf_jax/data/teacher.py).
"""

import dataclasses
import functools
import itertools
import json
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from rlhf_jax.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# The corpus has a few hundred distinct words, so 1024 tokens make almost every word (and prompt
# template word) a single token, keeping sequences short for fast CPU training, while the
# 1024 x d_model embedding stays a small part (~10%) of a 1-3M parameter model.
DEFAULT_VOCAB_SIZE = 1024
# 40,000 training records: every one of the ~6,200 distinct training questions about 6 times
# (at 4,000 an arithmetic question type got ~270 records, fewer than its distinct questions). SFT's
# 600 steps see each record about once, so more records cost no time there; measured on the
# default pipeline (one run each): held-out exact match 47% -> 55% and reward-model pair accuracy
# 71% -> 76% against 4,000 records, for ~35 s more policy sampling in the reward phase.
DEFAULT_NUM_TRAIN = 40000
# Per evaluation split; small enough that sampling 4 systems on 6 splits stays cheap on CPU.
DEFAULT_NUM_EVAL = 200

SPLITS = ("train", "validation", "test", "ood_1", "ood_2", "ood_3")
OOD_LEVELS: dict[int, str] = {
    0: "in-distribution (seen categories, phrasings and ranges; unseen questions)",
    1: "unseen phrasings (question templates held out of training)",
    2: "larger numbers and longer words than in training",
    3: "a category never seen in training (counting)",
}
SPLIT_OOD_LEVEL = {"train": 0, "validation": 0, "test": 0, "ood_1": 1, "ood_2": 2, "ood_3": 3}
TRAIN_CATEGORIES = ("arithmetic", "unit_conversion", "world_facts", "spelling", "science")
HELD_OUT_CATEGORY = "counting"

# Answer kinds: how `check_answer` finds competing answers in a free-text response.
_NUMBER, _LETTER, _REVERSAL, _ENTITY, _TEXT = "number", "letter", "reversal", "entity", "text"
# Single-letter English words: never used as letter answers (see `_letter_ok`), so a response may
# say "a" or "I" without it counting as a second letter.
_ONE_LETTER_WORDS = ("a", "i")

# --------------------------------------------------------------------------------------------
# Tables shipped with the module. Names are ASCII; no capital contains its country's name (so
# "Mexico City" is left out) and no chemical symbol is a common English word (He, In, As, ...).
# --------------------------------------------------------------------------------------------
_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Greece", "Athens"), ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("South Korea", "Seoul"), ("Nigeria", "Abuja"),
    ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Ethiopia", "Addis Ababa"), ("the United Kingdom", "London"),
    ("the United States", "Washington"), ("Brazil", "Brasilia"),
)
_ELEMENTS = (
    ("hydrogen", "H"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"), ("fluorine", "F"),
    ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"),
    ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"), ("argon", "Ar"), ("potassium", "K"),
    ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"),
    ("tin", "Sn"), ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"), ("nickel", "Ni"),
    ("uranium", "U"), ("lithium", "Li"), ("titanium", "Ti"), ("platinum", "Pt"), ("krypton", "Kr"),
)
_PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
_ANIMAL_CLASSES = (
    ("dog", "mammal"), ("horse", "mammal"), ("whale", "mammal"), ("bat", "mammal"),
    ("dolphin", "mammal"), ("elephant", "mammal"), ("lion", "mammal"), ("rabbit", "mammal"),
    ("eagle", "bird"), ("penguin", "bird"), ("owl", "bird"), ("parrot", "bird"),
    ("ostrich", "bird"), ("sparrow", "bird"), ("frog", "amphibian"), ("toad", "amphibian"),
    ("salamander", "amphibian"), ("newt", "amphibian"), ("snake", "reptile"),
    ("lizard", "reptile"), ("crocodile", "reptile"), ("tortoise", "reptile"), ("shark", "fish"),
    ("salmon", "fish"), ("trout", "fish"), ("tuna", "fish"), ("goldfish", "fish"),
    ("ant", "insect"), ("bee", "insect"), ("beetle", "insect"), ("butterfly", "insect"),
    ("mosquito", "insect"),
)
_CLASS_NAMES = ("mammal", "bird", "amphibian", "reptile", "fish", "insect")
_LEGS = (
    ("spider", 8), ("scorpion", 8), ("ant", 6), ("bee", 6), ("beetle", 6), ("butterfly", 6),
    ("grasshopper", 6), ("dog", 4), ("cat", 4), ("horse", 4), ("cow", 4), ("lion", 4),
    ("frog", 4), ("chicken", 2), ("duck", 2), ("ostrich", 2), ("crab", 10), ("lobster", 10),
)
_STATES = (
    ("iron", "solid"), ("wood", "solid"), ("stone", "solid"), ("sand", "solid"), ("salt", "solid"),
    ("glass", "solid"), ("gold", "solid"), ("water", "liquid"), ("milk", "liquid"),
    ("honey", "liquid"), ("olive oil", "liquid"), ("vinegar", "liquid"), ("orange juice", "liquid"),
    ("oxygen", "gas"), ("helium", "gas"), ("nitrogen", "gas"), ("neon", "gas"), ("air", "gas"),
    ("carbon dioxide", "gas"),
)
_STATE_NAMES = ("solid", "liquid", "gas")
# (verb, verb with s, noun, scale, degrees)
_WATER = (
    ("boil", "boils", "boiling", "Celsius", 100), ("freeze", "freezes", "freezing", "Celsius", 0),
    ("boil", "boils", "boiling", "Fahrenheit", 212),
    ("freeze", "freezes", "freezing", "Fahrenheit", 32),
)
# (counted things, the whole, how many)
_HOW_MANY = (
    ("days", "a week", 7), ("hours", "a day", 24), ("months", "a year", 12),
    ("weeks", "a year", 52), ("days", "a normal year", 365), ("planets", "the solar system", 8),
    ("continents", "the world", 7), ("colours", "a rainbow", 7), ("sides", "a triangle", 3),
    ("sides", "a square", 4), ("sides", "a hexagon", 6), ("sides", "an octagon", 8),
    ("wheels", "a bicycle", 2), ("wheels", "a tricycle", 3),
)
# (from unit, its singular, to unit, factor)
_CONVERSIONS = (
    ("metres", "metre", "centimetres", 100), ("kilometres", "kilometre", "metres", 1000),
    ("kilograms", "kilogram", "grams", 1000), ("litres", "litre", "millilitres", 1000),
    ("hours", "hour", "minutes", 60), ("minutes", "minute", "seconds", 60),
    ("days", "day", "hours", 24), ("weeks", "week", "days", 7), ("years", "year", "months", 12),
    ("centimetres", "centimetre", "millimetres", 10),
)
# Facts a tutor explains answers with (and the teacher checks explanations against): where each
# country lies, the Latin names behind symbols that are not made of their element's letters, what
# marks each animal class, the group that sets an animal's legs, what each state of matter does,
# and a note that makes each counted fact memorable.
_CONTINENTS = {
    **dict.fromkeys(("France", "Germany", "Italy", "Spain", "Portugal", "Russia", "Norway",
                     "Sweden", "Finland", "Greece", "Ireland", "Poland", "Austria", "Hungary",
                     "Denmark", "Belgium", "the Netherlands", "Switzerland",
                     "the United Kingdom"), "Europe"),
    **dict.fromkeys(("Japan", "China", "India", "Thailand", "Turkey", "Iran", "South Korea",
                     "Vietnam", "Indonesia", "the Philippines"), "Asia"),
    **dict.fromkeys(("Egypt", "Kenya", "Nigeria", "Ghana", "Morocco", "Ethiopia"), "Africa"),
    **dict.fromkeys(("Canada", "Cuba", "the United States"), "North America"),
    **dict.fromkeys(("Peru", "Chile", "Argentina", "Colombia", "Venezuela", "Brazil"),
                    "South America"),
    "Australia": "Oceania",
}
_LATIN_NAMES = {"Na": "natrium", "K": "kalium", "Fe": "ferrum", "Cu": "cuprum", "Ag": "argentum",
                "Sn": "stannum", "Au": "aurum", "Hg": "hydrargyrum", "Pb": "plumbum"}
# class -> (what every member does, the word that shows it)
_CLASS_FEATURES = {
    "mammal": ("feeds its young on milk", "milk"), "bird": ("has feathers and lays eggs",
                                                          "feathers"),
    "amphibian": ("starts life in water and later lives on land", "land"),
    "reptile": ("has dry, scaly skin", "scaly"), "fish": ("breathes through gills", "gills"),
    "insect": ("has six legs and a pair of antennae", "antennae"),
}
_LEG_GROUPS = {
    "spider": "arachnid", "scorpion": "arachnid", "ant": "insect", "bee": "insect",
    "beetle": "insect", "butterfly": "insect", "grasshopper": "insect", "dog": "mammal",
    "cat": "mammal", "horse": "mammal", "cow": "mammal", "lion": "mammal", "frog": "amphibian",
    "chicken": "bird", "duck": "bird", "ostrich": "bird", "crab": "crustacean",
    "lobster": "crustacean",
}
# state -> (what it does, the word that shows it)
_STATE_FEATURES = {"solid": ("keeps its own shape", "keeps"),
                   "liquid": ("flows and takes the shape of its container", "flows"),
                   "gas": ("spreads out to fill any space", "spreads")}
# (counted things, the whole) -> (a note, the word that shows it)
_HOW_MANY_NOTES = {
    ("days", "a week"): ("they run from Monday to Sunday", "monday"),
    ("hours", "a day"): ("a day runs from midnight to midnight", "midnight"),
    ("months", "a year"): ("they run from January to December", "january"),
    ("weeks", "a year"): ("a calendar year is just over {answer} weeks long", "calendar"),
    ("days", "a normal year"): ("only a leap year has an extra day", "leap"),
    ("planets", "the solar system"): ("they run from Mercury out to Neptune", "mercury"),
    ("continents", "the world"): ("they include Africa, Asia and Europe", "africa"),
    ("colours", "a rainbow"): ("they run from red to violet", "violet"),
    ("sides", "a triangle"): ("tri means three", "tri"),
    ("sides", "a square"): ("all {answer} sides of a square are equal", "equal"),
    ("sides", "a hexagon"): ("hex means six", "hex"),
    ("sides", "an octagon"): ("octo means eight", "octo"),
    ("wheels", "a bicycle"): ("bi means two", "bi"),
    ("wheels", "a tricycle"): ("tri means three", "tri"),
}
_SHORT_WORDS = """
cat dog sun hat cup pen box bus car map egg fox pig cow owl bee ant rat bat jam pot fan
bed leg arm ear eye lip toe hen van web zoo bag key log net rug mud fog ice oak elm gem
tree fish bird frog milk cake lamp ship rain snow wind star moon book door desk ball kite
rock sand leaf rose corn rice salt soup bell drum coat shoe sock ring nest hill lake road
farm wolf bear deer duck goat lion seal crab worm king song word gold iron wood wool lime
plum pear bean nose hand foot neck tail wing barn boat cart sled rope coin card vase bowl
apple bread chair table plant grape lemon melon tiger horse sheep mouse snake whale shark
eagle robin stone cloud storm river beach field grass flame smoke water juice honey sugar
candy clock watch phone house train truck plane wheel brush paint chalk paper glove
scarf skirt shirt spoon knife plate glass queen ghost giant dream music dance smile light
night green black brown white""".split()
_LONG_WORDS = """
elephant giraffe penguin dolphin octopus kangaroo squirrel butterfly mosquito tortoise
crocodile flamingo hedgehog mountain volcano painting chocolate sandwich biscuit pancake
umbrella blanket kitchen bathroom cupboard computer keyboard notebook calendar triangle
rectangle pentagon hexagon library hospital airport station football baseball
basketball dinosaur skeleton treasure adventure mystery festival birthday universe
sunshine rainbow thunder lightning blizzard tornado hurricane teaspoon saucepan
backpack envelope magazine lantern compass diamond emerald sapphire scissors
""".split()
_NAMES = ("Sam", "Mia", "Leo", "Ana", "Tom", "Zoe", "Ben", "Eva", "Max", "Lily")
_THINGS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells")

# Number words a free-text response may use instead of digits (canonical form is digits).
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS: dict[str, int] = {
    **{word: value for value, word in enumerate(_UNITS)},
    **{word: 20 + 10 * index for index, word in enumerate(_TENS)},
    **{word: value for value, word in enumerate(
        "zeroth first second third fourth fifth sixth seventh eighth ninth tenth".split())},
}


# --------------------------------------------------------------------------------------------
# Question types.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Task:
  """One question type: its content items, phrasings and canonical response.

  Attributes:
    name: the task id stored in each record's `task` field.
    category: the Dolly `category` of its records.
    kind: how answers are compared (`_NUMBER`, `_LETTER`, `_REVERSAL`, `_ENTITY`).
    templates: in-distribution phrasings, `(instruction, context)` format strings.
    held_out: phrasings never used in training (`ood_1`).
    response: format string of the canonical response; ends with the answer.
    items: in-distribution content, dicts of format fields including `answer`.
    large_items: out-of-range content for `ood_2` (bigger numbers, longer words), or ().
    split_by_item: True to hold out items for validation/test (numbers, words); False to hold
      out (item, phrasing) pairs (table facts, which a model can only know if it saw them).
    choices: for `_ENTITY` tasks, every possible answer (competitors in `check_answer`).
    plurals: whether entity answers may appear in plural ("mammals").
  """
  name: str
  category: str
  kind: str
  templates: tuple[tuple[str, str], ...]
  held_out: tuple[tuple[str, str], ...]
  response: str
  items: tuple[dict[str, Any], ...]
  large_items: tuple[dict[str, Any], ...] = ()
  split_by_item: bool = True
  choices: tuple[str, ...] = ()
  plurals: bool = False


def _q(*instructions: str) -> tuple[tuple[str, str], ...]:
  """Phrasings without a context."""
  return tuple((instruction, "") for instruction in instructions)


def _article(noun: str) -> str:
  """'an eagle', 'a dog'."""
  return ("an " if noun[0] in "aeiou" else "a ") + noun


def _add_items(low: int, high: int) -> tuple[dict[str, Any], ...]:
  return tuple(dict(a=a, b=b, answer=a + b)
               for a in range(low, high + 1) for b in range(low, high + 1))


def _subtract_items(low: int, high: int) -> tuple[dict[str, Any], ...]:
  # a - b == b would put the answer in the question, where echoing it would pass the checker.
  return tuple(dict(a=a, b=b, answer=a - b)
               for a in range(low + 1, high + 1) for b in range(low, a) if a != 2 * b)


def _multiply_items(low: int, high: int) -> tuple[dict[str, Any], ...]:
  return tuple(dict(a=a, b=b, answer=a * b)
               for a in range(low, high + 1) for b in range(low, high + 1))


def _conversion_items(low: int, high: int) -> tuple[dict[str, Any], ...]:
  return tuple(dict(q=q, frm=frm, frm_one=frm_one, to=to, factor=factor, answer=q * factor)
               for frm, frm_one, to, factor in _CONVERSIONS for q in range(low, high + 1))


def _word_ok(word: str) -> bool:
  """Words usable in spelling questions.

  Excludes palindromes (backwards == the word itself, already in the question) and words that are,
  or reverse to, number words ("net" -> "ten"), which the checker reads as numbers.
  """
  return (word != word[::-1] and word not in _NUMBER_WORDS and word[::-1] not in _NUMBER_WORDS
          and len(set(word)) > 1)


def _letter_ok(letter: str) -> bool:
  """Letters usable as answers: not 'a' or 'i', which are also English words."""
  return letter not in _ONE_LETTER_WORDS


def _spelling_items(words: Sequence[str], task: str) -> tuple[dict[str, Any], ...]:
  """Content of one spelling task: the usable words, each with its answer."""
  answers = {
      "first_letter": lambda w: w[0],
      "last_letter": lambda w: w[-1],
      "letter_count": len,
      "backwards": lambda w: w[::-1],
  }
  items = []
  for word in dict.fromkeys(words):  # de-duplicates, keeps the order
    answer = answers[task](word)
    if _word_ok(word) and (not isinstance(answer, str) or len(answer) > 1 or _letter_ok(answer)):
      items.append(dict(word=word, answer=answer))
  return tuple(items)


def _counting_items(direction: str) -> tuple[dict[str, Any], ...]:
  step = 1 if direction == "after" else -1
  return tuple(dict(n=n, answer=n + step) for n in range(3, 41))


def _build_tasks() -> tuple[_Task, ...]:
  """All question types, in a fixed order."""
  # Word problems name their numbers in the instruction, so that no two questions share one.
  word_problem_add = (
      "{name} has {a} {things} and is given {b} more. How many {things} does {name} have now?")
  word_problem_sub = (
      "{name} has {a} {things} and gives {b} away. How many {things} does {name} have left?")
  return (
      _Task(
          "add", "arithmetic", _NUMBER,
          _q("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.",
             "What do you get when you add {a} and {b}?", word_problem_add),
          _q("Work out the total of {a} and {b}.", "{a} added to {b} makes what number?"),
          "{a} plus {b} equals {answer}.", _add_items(1, 20), _add_items(21, 99)),
      _Task(
          "subtract", "arithmetic", _NUMBER,
          _q("What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.",
             "What do you get when you take {b} away from {a}?", word_problem_sub),
          _q("Work out the difference between {a} and {b}.",
             "{b} taken from {a} leaves what number?"),
          "{a} minus {b} equals {answer}.", _subtract_items(1, 20), _subtract_items(21, 99)),
      _Task(
          "multiply", "arithmetic", _NUMBER,
          _q("What is {a} times {b}?", "What is {a} x {b}?", "Multiply {a} by {b}.",
             "What is the product of {a} and {b}?",
             "What do you get when you multiply {a} and {b}?"),
          _q("Work out {a} groups of {b}.", "{a} multiplied by {b} makes what number?"),
          "{a} times {b} equals {answer}.", _multiply_items(2, 12), _multiply_items(13, 25)),
      _Task(
          "convert", "unit_conversion", _NUMBER,
          _q("How many {to} are in {q} {frm}?", "Convert {q} {frm} to {to}.",
             "What is {q} {frm} in {to}?", "{q} {frm} equals how many {to}?")
          + (("Using the fact given, how many {to} are in {q} {frm}?",
              "One {frm_one} is {factor} {to}."),),
          _q("If something measures {q} {frm}, how many {to} is that?",
             "Express {q} {frm} as {to}."),
          "{q} {frm} is {answer} {to}.", _conversion_items(2, 20), _conversion_items(25, 99)),
      _Task(
          "capital", "world_facts", _ENTITY,
          _q("What is the capital of {country}?", "What is the capital city of {country}?",
             "Which city is the capital of {country}?")
          + (("According to the passage, what is the capital of {country}?",
              "Country: {country}. Capital city: {answer}."),),
          _q("Name the capital of {country}.",
             "The government of {country} sits in which city?"),
          "The capital of {country} is {answer}.",
          tuple(dict(country=c, answer=a) for c, a in _CAPITALS),
          split_by_item=False, choices=tuple(a for _, a in _CAPITALS)),
      _Task(
          "chemical_symbol", "world_facts", _ENTITY,
          _q("What is the chemical symbol for {element}?",
             "Which chemical symbol stands for {element}?",
             "What symbol is used for {element} in chemistry?",
             "Give the chemical symbol of {element}."),
          _q("In the periodic table, how is {element} written as a symbol?",
             "{element} is abbreviated by which chemical symbol?"),
          "The chemical symbol for {element} is {answer}.",
          tuple(dict(element=e, answer=s) for e, s in _ELEMENTS),
          split_by_item=False, choices=tuple(s for _, s in _ELEMENTS)),
      _Task(
          "planet_by_position", "world_facts", _ENTITY,
          _q("Which planet is {ordinal} from the Sun?",
             "What is the {ordinal} planet from the Sun?",
             "Counting from the Sun, which planet comes {ordinal}?",
             "Name the {ordinal} planet from the Sun."),
          _q("Of all the planets, which one is {ordinal} closest to the Sun?",
             "Going outward from the Sun, which planet do you reach {ordinal}?"),
          "The {ordinal} planet from the Sun is {answer}.",
          tuple(dict(ordinal=o, answer=p) for o, p in zip(_ORDINALS, _PLANETS)),
          split_by_item=False, choices=_PLANETS),
      _Task(
          "planet_position", "world_facts", _NUMBER,
          _q("What position from the Sun is {planet}?",
             "Counting from the Sun, what number planet is {planet}?",
             "Where is {planet} in the order of planets from the Sun?",
             "Which number is {planet} in the order of the planets from the Sun?"),
          _q("Going outward from the Sun, at what place in the line of planets is {planet}?",
             "What is the rank of {planet} by distance from the Sun?"),
          "Counting from the Sun, {planet} is planet number {answer}.",
          tuple(dict(planet=p, answer=i + 1) for i, p in enumerate(_PLANETS)),
          split_by_item=False),
      _Task(
          "animal_class", "world_facts", _ENTITY,
          _q("What class of animal is {animal_a}?",
             "Which class of animals does the {animal} belong to?",
             "To which group of animals does the {animal} belong?",
             "{animal_a} is which class of animal?"),
          _q("In biology, the {animal} is grouped in which class?",
             "Classify the {animal}: what class of animal is it?"),
          "The {animal} belongs to the {answer} class.",
          tuple(dict(animal=a, animal_a=_article(a), answer=c) for a, c in _ANIMAL_CLASSES),
          split_by_item=False, choices=_CLASS_NAMES, plurals=True),
      _Task(
          "first_letter", "spelling", _LETTER,
          _q('What is the first letter of the word "{word}"?',
             'What letter does "{word}" start with?',
             'Which letter begins the word "{word}"?', 'Name the first letter of "{word}".'),
          _q('The word "{word}" begins with which letter?',
             'Tell me the initial letter of "{word}".'),
          'The first letter of "{word}" is {answer}.',
          _spelling_items(_SHORT_WORDS, "first_letter"),
          _spelling_items(_LONG_WORDS, "first_letter")),
      _Task(
          "last_letter", "spelling", _LETTER,
          _q('What is the last letter of the word "{word}"?', 'What letter does "{word}" end with?',
             'Which letter ends the word "{word}"?', 'Name the last letter of "{word}".'),
          _q('The word "{word}" finishes with which letter?',
             'Tell me the final letter of "{word}".'),
          'The last letter of "{word}" is {answer}.',
          _spelling_items(_SHORT_WORDS, "last_letter"),
          _spelling_items(_LONG_WORDS, "last_letter")),
      _Task(
          "letter_count", "spelling", _NUMBER,
          _q('How many letters are in the word "{word}"?', 'How many letters does "{word}" have?',
             'Count the letters in "{word}".',
             'What is the length of the word "{word}" in letters?'),
          _q('"{word}" is spelled with how many letters?',
             'Tell me the number of letters in "{word}".'),
          'The word "{word}" has {answer} letters.',
          _spelling_items(_SHORT_WORDS, "letter_count"),
          _spelling_items(_LONG_WORDS, "letter_count")),
      _Task(
          "backwards", "spelling", _REVERSAL,
          _q('Spell "{word}" backwards.', 'What is "{word}" written backwards?',
             'Reverse the letters of "{word}".', 'How is "{word}" spelled in reverse?'),
          _q('Write the word "{word}" from the last letter to the first.',
             'If you read "{word}" from right to left, what do you get?'),
          '"{word}" spelled backwards is {answer}.',
          _spelling_items(_SHORT_WORDS, "backwards"), _spelling_items(_LONG_WORDS, "backwards")),
      _Task(
          "legs", "science", _NUMBER,
          _q("How many legs does {animal_a} have?", "{animal_a} has how many legs?",
             "What is the number of legs on {animal_a}?", "Count the legs of {animal_a}."),
          _q("If you counted every leg on {animal_a}, what number would you get?",
             "Tell me the leg count of {animal_a}."),
          "{animal_a} has {answer} legs.",
          tuple(dict(animal_a=_article(a), answer=n) for a, n in _LEGS), split_by_item=False),
      _Task(
          "state_of_matter", "science", _ENTITY,
          _q("What state of matter is {stuff} at room temperature?",
             "At room temperature, what state of matter is {stuff} in?",
             "In which state of matter do we find {stuff} at room temperature?",
             "What is the state of matter of {stuff} at room temperature?"),
          _q("Think of {stuff} sitting on a table at room temperature. What state of matter is it?",
             "Tell me the state of matter {stuff} takes at room temperature."),
          "At room temperature, {stuff} is a {answer}.",
          tuple(dict(stuff=s, answer=state) for s, state in _STATES),
          split_by_item=False, choices=_STATE_NAMES, plurals=True),
      _Task(
          "water_temperature", "science", _NUMBER,
          _q("At what temperature in degrees {scale} does water {verb}?",
             "What is the {noun} point of water in degrees {scale}?",
             "Water {verbs} at how many degrees {scale}?",
             "How many degrees {scale} does it take for water to {verb}?"),
          _q("In degrees {scale}, what temperature makes water {verb}?",
             "Tell me the {noun} point of water on the {scale} scale."),
          "Water {verbs} at {answer} degrees {scale}.",
          tuple(dict(verb=v, verbs=vs, noun=n, scale=s, answer=d) for v, vs, n, s, d in _WATER),
          split_by_item=False),
      _Task(
          "how_many", "science", _NUMBER,
          _q("How many {part} are in {whole}?", "How many {part} does {whole} have?",
             "What is the number of {part} in {whole}?",
             "Tell me how many {part} there are in {whole}."),
          _q("Count the {part} in {whole}: how many are there?",
             "{whole} is made up of how many {part}?"),
          "{whole} has {answer} {part}.",
          tuple(dict(part=p, whole=w, answer=n) for p, w, n in _HOW_MANY), split_by_item=False),
      _Task(
          "next_number", HELD_OUT_CATEGORY, _NUMBER,
          _q("What number comes after {n}?", "Which number is one more than {n}?",
             "When counting up, what number follows {n}?", "What is the next number after {n}?"),
          (), "The number after {n} is {answer}.", _counting_items("after")),
      _Task(
          "previous_number", HELD_OUT_CATEGORY, _NUMBER,
          _q("What number comes before {n}?", "Which number is one less than {n}?",
             "When counting up, what number comes just before {n}?",
             "What is the number right before {n}?"),
          (), "The number before {n} is {answer}.", _counting_items("before")),
  )


_TASKS = _build_tasks()
_TASKS_BY_NAME = {task.name: task for task in _TASKS}


# --------------------------------------------------------------------------------------------
# Answer checking.
# --------------------------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
  """Lower-cased words and numbers of `text`; number words become digits ("fourth" -> "4")."""
  text = text.lower()
  text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
  text = re.sub(r"['\u2019]s\b", "", text)  # possessives: "oxygen's" must not yield a letter "s"
  text = re.sub(r"['\u2019]", "", text)  # contractions: "don't" must not yield a letter "t"
  text = re.sub(r"(\d)(?:st|nd|rd|th)\b", r"\1", text)  # 4th -> 4
  raw = re.findall(r"(?<![\w.])-\d+(?:\.\d+)?|\d+(?:\.\d+)?|[^\W\d_]+", text)
  tokens: list[str] = []
  after_tens_word = False  # "twenty one" / "twenty-one" -> 21, but "20, one" stays two numbers
  for token in raw:
    if token in _NUMBER_WORDS:
      value = _NUMBER_WORDS[token]
      if after_tens_word and 1 <= value <= 9 and token in _UNITS:
        tokens[-1] = str(int(tokens[-1]) + value)
        after_tens_word = False
        continue
      after_tens_word = token in _TENS
      token = str(value)
    else:
      after_tens_word = False
      if re.fullmatch(r"-?\d+(?:\.\d+)?", token):
        number = float(token)
        token = str(int(number)) if number.is_integer() else str(number)
    tokens.append(token)
  return tokens


def _is_number(token: str) -> bool:
  return re.fullmatch(r"-?\d+(?:\.\d+)?", token) is not None


@functools.cache
def _entity_forms(task_name: str) -> tuple[tuple[tuple[str, ...], str], ...]:
  """(token sequence, canonical answer) for every way a choice may be written, longest first."""
  task = _TASKS_BY_NAME[task_name]
  forms = []
  for choice in task.choices:
    canonical = " ".join(_tokens(choice))
    words = tuple(_tokens(choice))
    forms.append((words, canonical))
    if task.plurals:
      forms.append((words[:-1] + (words[-1] + "s",), canonical))
      forms.append((words[:-1] + (words[-1] + "es",), canonical))
  return tuple(sorted(forms, key=lambda form: -len(form[0])))


def _candidates(text: str, kind: str, answer: str, task: _Task | None) -> list[str]:
  """The possible answers of `kind` that `text` asserts, in order, in canonical form."""
  tokens = _tokens(text)
  if kind == _NUMBER:
    return [token for token in tokens if _is_number(token)]
  if kind == _LETTER:
    return [t for t in tokens if len(t) == 1 and t.isalpha() and t not in _ONE_LETTER_WORDS]
  if kind == _REVERSAL:
    # A competing reversal is any other arrangement of the same letters ("tca" for "tac").
    return [token for token in tokens if sorted(token) == sorted(answer)]
  if kind == _ENTITY:
    found, position = [], 0
    forms = _entity_forms(task.name)
    while position < len(tokens):
      for words, canonical in forms:
        if tuple(tokens[position:position + len(words)]) == words:
          found.append(canonical)
          position += len(words)
          break
      else:
        position += 1
    return found
  # _TEXT: only the answer itself is recognised.
  words = _tokens(answer)
  return [answer for i in range(len(tokens)) if tokens[i:i + len(words)] == words]


def _canonical_answer(record: Mapping[str, Any]) -> tuple[str, str, _Task | None]:
  """(answer in canonical form, answer kind, task or None) of a record."""
  if "answer" not in record:
    raise UserError("record has no 'answer' field; check_answer needs the canonical answer")
  answer = str(record["answer"])
  task = _TASKS_BY_NAME.get(record.get("task", ""))
  if task is not None:
    kind = task.kind
  elif _is_number(answer.strip()):
    kind = _NUMBER
  elif len(answer.strip()) == 1 and answer.strip().isalpha():
    kind = _LETTER
  else:
    kind = _TEXT
  tokens = _tokens(answer)
  canonical = " ".join(tokens) if kind in (_ENTITY, _TEXT) else (tokens[0] if tokens else "")
  return canonical, kind, task


_SPELLED = re.compile(r"(?<![\w-])[^\W\d_](?:-[^\W\d_])+(?![\w-])")


def spelled_words(text: str) -> list[str]:
  """The words `text` spells out letter by letter ("c-a-t" -> "cat"), lower-cased, in order."""
  return [match.group().replace("-", "").lower() for match in _SPELLED.finditer(text)]


def normalised_tokens(text: str) -> list[str]:
  """`text`'s words and numbers as `check_answer` reads them (lower case, number words as
  digits)."""
  return _tokens(text)


def _prompt(record: Mapping[str, Any]) -> str:
  return f"{record.get('instruction', '')}\n{record.get('context', '')}"


def _drop_question_spellings(text: str, prompt: str) -> str:
  """`text` without the spellings-out of the question's own words ("c-a-t" for "cat"), forwards
  or backwards: they restate the question, and their letters are no letter answers."""
  prompt_words = set(_tokens(prompt))
  def keep_or_drop(match: re.Match) -> str:
    word = match.group().replace("-", "").lower()
    return " " if word in prompt_words or word[::-1] in prompt_words else match.group()
  return _SPELLED.sub(keep_or_drop, text)


def _implied_values(record: Mapping[str, Any], task: _Task | None) -> list[str]:
  """Values the question implies without stating them, which an explanation may use: a
  conversion's factor (from the unit names) and 1 ("one metre is 100 centimetres"), and the 1 a
  count steps by ("8 is one more than 7")."""
  if task is None:
    return []
  if task.name in ("next_number", "previous_number"):
    return ["1"]
  if task.name != "convert":
    return []
  words = set(_tokens(_prompt(record)))
  factors = [str(factor) for frm, frm_one, to, factor in _CONVERSIONS
             if (frm in words or frm_one in words) and to in words]
  return factors + ["1"] if factors else []


def stated_answers(record: Mapping[str, Any], response: str, *,
                   count_echoes: bool = True) -> list[str]:
  """The answers of the question's kind that `response` states beyond restating the question.

  The heart of `check_answer` (see its rule). With `count_echoes=False` every value the question
  states or implies is set aside however often it is repeated (for reading one clause of a
  response, such as an explanation, on its own).

  Args:
    record: the question (`answer`, and normally `task`, `instruction`, `context`).
    response: free text.
    count_echoes: whether a question value may be repeated only once per statement of the answer.

  Returns:
    The stated candidates in canonical form, in order; may include the answer itself.
  """
  answer, kind, task = _canonical_answer(record)
  prompt = _prompt(record)
  asserted = _candidates(_drop_question_spellings(response, prompt), kind, answer, task)
  allowed: dict[str, int] = {}
  for echo in _candidates(prompt, kind, answer, task) + _implied_values(record, task):
    if echo != answer:
      allowed[echo] = allowed.get(echo, 0) + 1
  # A question value may be restated alongside each statement of the answer: "3 plus 4 equals 7,
  # because adding 4 to 3 gives 7" restates both numbers twice and states 7 twice.
  statements = max(1, asserted.count(answer))
  stated, used = [], dict.fromkeys(allowed, 0)
  for candidate in asserted:
    if candidate in allowed and (not count_echoes
                                 or used[candidate] < allowed[candidate] * statements):
      used[candidate] += 1
    else:
      stated.append(candidate)
  return stated


def canonical_answer(record: Mapping[str, Any]) -> str:
  """`record`'s answer as `check_answer` compares it ("Paris" -> "paris", "four" -> "4")."""
  return _canonical_answer(record)[0]


def check_answer(record: Mapping[str, Any], response: str) -> bool:
  """Decides whether a free-text response answers `record`'s question correctly.

  The rule, designed so that a policy cannot game it by hedging:
  1. Normalise: lower-case, drop punctuation, possessives and thousands separators, read number
     words and ordinals as digits ("four", "fourth", "4th" -> "4"). A spelling-out of a word of
     the question ("c-a-t" for "cat", forwards or backwards) is dropped: its letters restate the
     question and are no letter answers.
  2. Collect the candidate answers of the record's answer kind the response asserts: every number
     for number answers; every single letter (except the words "a" and "I") for letter answers;
     every arrangement of the answer's letters for a word spelled backwards; every entry of the
     task's table ("Paris", "Berlin", ...; plurals allowed for classes and states) otherwise.
  3. Remove the candidates that merely restate the question. The question's values are those
     occurring in the instruction or context, and those it implies: a conversion's factor and 1
     (derived from the unit names: "one metre is 100 centimetres") and a count's step of 1. Each
     may be repeated once per occurrence there, per statement of the answer: "3 plus 4 equals 7,
     because adding 4 to 3 gives 7" states 7 twice, so 3 and 4 may appear twice each, while
     "3 plus 4 equals 3 or 7" has one 3 too many. The correct answer itself is never removed.
  4. Correct iff something remains and everything that remains is the canonical answer, so an
     empty response, a wrong answer, or a list of answers ("7 or 8", "Paris, Lyon") is wrong.
  The generator never puts an answer into its own question (no "8 minus 4"), so echoing the
  question never passes. What this rule still accepts is a question value repeated next to the
  right answer ("7 or 3" for "3 plus 4", "300 or 100 centimetres" for 3 metres); the right answer
  must be there and nothing the question neither states nor implies may be, which leaves a
  policy nothing to gain from guessing. Records without a known `task` fall back on the answer's
  form: a number, a letter, or else a phrase that must appear.

  Args:
    record: a record with `answer` (and normally `task`, `instruction`, `context`).
    response: the model's free-text response.

  Returns:
    True iff the response states the answer and no competing answer.
  """
  answer, _, _ = _canonical_answer(record)
  if not answer:
    return False
  stated = stated_answers(record, response)
  return bool(stated) and all(candidate == answer for candidate in stated)


def corrupt(record: Mapping[str, Any], rng: np.random.Generator) -> str:
  """A response in the record's own style that states a wrong answer of the same kind.

  Every whole-word occurrence of the answer in the response (once in a canonical response; a
  tutor's explanation restates it, and a spelling-out such as "c-a-t" is left alone) is replaced
  by one wrong value: a nearby number, another letter, another arrangement of the letters, or
  another entry of the task's table, never a value the prompt mentions. A response that does not
  state the answer (an evasive or careless demonstrator's) becomes "The answer is WRONG.".

  Args:
    record: a generated record (with `task`, `answer`, `response`).
    rng: the source of randomness (the reward phase's seeded generator).

  Returns:
    The wrong response; `check_answer(record, result)` is False.
  """
  answer, kind, task = _canonical_answer(record)
  display = str(record["answer"])
  prompt = f"{record.get('instruction', '')}\n{record.get('context', '')}"
  in_prompt = set(_candidates(prompt, kind, answer, task))
  if kind == _NUMBER:
    value = int(float(answer))
    # Off-by-a-little, off-by-a-place and off-by-a-factor-of-ten errors, as a learner makes them.
    near = [value + d for d in (-3, -2, -1, 1, 2, 3)]
    near += [value + d for d in (-10, 10) if value >= 20] + [value + d for d in (-100, 100)
                                                             if value >= 200]
    near += [value * 10, value // 10] if value >= 100 and value % 10 == 0 else []
    # At least 2, so that wrong answers read naturally ("1 legs", "planet number 0" do not).
    options = [str(v) for v in near if v >= 2 and v != value and str(v) not in in_prompt]
  elif kind == _LETTER:
    options = [c for c in "bcdefghjklmnopqrstuvwxyz" if c != answer and c not in in_prompt]
  elif kind == _REVERSAL:
    # Up to 2000 arrangements is plenty for the short and long words used here.
    arrangements = itertools.islice(itertools.permutations(display), 2000)
    options = sorted({"".join(p) for p in arrangements} - {display, answer} - in_prompt)
  elif kind == _ENTITY:
    options = [c for c in task.choices if " ".join(_tokens(c)) not in in_prompt | {answer}]
  else:
    raise UserError(f"cannot build a wrong answer for task {record.get('task')!r}: "
                    "corrupt() needs a built-in record")
  if not options:
    raise UserError(f"no wrong answer available for question {record.get('instruction')!r}")
  wrong = options[int(rng.integers(len(options)))]
  response = str(record["response"])
  whole_word = rf"(?<![\w-]){re.escape(display)}(?![\w-])"
  # Case-sensitive first: a letter answer "t" must not match the word "The" (no whole word, but
  # a bare answer may be capitalised, "C").
  matches = (list(re.finditer(whole_word, response))
             or list(re.finditer(whole_word, response, re.IGNORECASE)))
  if not matches:
    return f"The answer is {wrong}."
  for match in reversed(matches):
    response = response[:match.start()] + wrong + response[match.end():]
  return response


# --------------------------------------------------------------------------------------------
# Demonstrators: who writes each record's response.
# --------------------------------------------------------------------------------------------
# tutor     the answer sentence plus a short, correct explanation (the operation with its operands,
#           the conversion factor, the fact's context, the word spelled out letter by letter);
# plain     the canonical answer sentence (the only writer before issue #21);
# terse     the bare answer;
# rambler   the answer sentence among filler sentences;
# evasive   a non-answer;
# careless  a wrong answer, written by one of tutor, plain, terse or rambler (`corrupt`).
DEMONSTRATORS = ("tutor", "plain", "terse", "rambler", "evasive", "careless")
_ANSWERING_STYLES = ("tutor", "plain", "terse", "rambler")
# Today's data: every response is the canonical sentence (records carry no `demonstrator` field,
# so `generate(seed)` is byte-identical to the data before demonstrators existed).
DEFAULT_DEMONSTRATORS = "plain=1.0"
# The recommended realistic mix. Crowd-written instruction data varies in quality (Dolly's
# responses range from explained answers to one word, off-topic or wrong), and RLHF can only
# amplify behaviour the SFT policy already samples: with a quarter of the demonstrations
# explained, the SFT policy explains often enough for a reward model to see the difference, while
# plain and terse answers stay the majority style. Careless (15%) and evasive (5%) writers make
# one demonstration in five unhelpful, enough that avoiding wrong answers and non-answers
# matters, yet few enough that the SFT policy still learns the facts; ramblers (10%) give filler
# a share worth penalising.
MIXED_DEMONSTRATORS = "tutor=0.25,plain=0.3,terse=0.15,rambler=0.1,evasive=0.05,careless=0.15"

_TERSE = ("{answer}", "{answer}.")
_TUTOR = ("{sentence}, because {explanation}.", "{sentence}. This is because {explanation}.",
          "{sentence}: {explanation}.")
_FILLER_BEFORE = ("Great question!", "Thanks for asking.", "Oh, I love questions like this.",
                  "Let me help you with that.")
_FILLER_AFTER = ("I hope this helps!", "Learning new facts is always fun.",
                 "Feel free to ask me anything else.", "Have a lovely afternoon!")
_EVASIVE = (
    "That is a tricky question, and I would rather not guess.",
    "I am not sure about that. You could look it up in a book.",
    "It depends on how you look at it, so I cannot really say.",
    "Good question! I do not know, but a teacher could tell you.",
    "Why not try to find out for yourself?",
)
_OPERATION_WORDS = {
    "add": ("plus", "add", "adding", "added", "sum", "together"),
    "subtract": ("minus", "subtract", "subtracting", "take away", "taking", "away", "leaves",
                 "difference"),
    "multiply": ("times", "multiply", "multiplying", "multiplied", "groups", "product"),
}
_OPERATION_EXPLANATIONS = {
    "add": ("adding {b} to {a} gives {answer}", "{a} and {b} added together make {answer}",
            "the sum of {a} and {b} is {answer}"),
    "subtract": ("taking {b} away from {a} leaves {answer}", "{a} take away {b} is {answer}",
                 "the difference between {a} and {b} is {answer}"),
    "multiply": ("{a} groups of {b} make {answer}", "multiplying {a} by {b} gives {answer}",
                 "the product of {a} and {b} is {answer}"),
}


@dataclasses.dataclass(frozen=True)
class ExplanationSpec:
  """What a correct explanation of one question's answer contains (phrases are lower-case and
  matched on `normalised_tokens`, so "six" matches "6").

  Attributes:
    required: groups of phrases; a correct explanation contains a phrase of every group (both
      operands and a word of the operation; the factor and a unit; the country's continent, ...).
    forbidden: phrases a correct explanation never contains (another operation's words, another
      continent, another class's mark, a wrong count).
    spellings: for spelling questions, the words whose letter-by-letter spelling-out ("c-a-t")
      explains the answer; one must be spelled out and no other word may be.
  """
  required: tuple[tuple[str, ...], ...]
  forbidden: tuple[str, ...] = ()
  spellings: tuple[str, ...] = ()


def _others(table: Mapping[Any, tuple[str, str]], own: str) -> tuple[str, ...]:
  """The marker words of a feature table other than `own`."""
  return tuple(sorted({word for _, word in table.values()} - {own}))


def _explanations(task_name: str, f: Mapping[str, str]) -> tuple[tuple[str, ...], ExplanationSpec]:
  """A tutor's explanation phrasings of one question (format fields `f`) and what makes them
  correct. Every phrasing restates the answer or none of the question's values, so that
  `check_answer` accepts it (see its rule 3)."""
  answer = f["answer"]
  if task_name in _OPERATION_WORDS:
    others = tuple(w for op, words in _OPERATION_WORDS.items() if op != task_name for w in words)
    return (tuple(p.format(**f) for p in _OPERATION_EXPLANATIONS[task_name]),
            ExplanationSpec(((f["a"],), (f["b"],), _OPERATION_WORDS[task_name]), others))
  if task_name == "convert":
    phrasings = ("each {frm_one} is {factor} {to}, and {q} times {factor} is {answer}",
                 "there are {factor} {to} in every {frm_one}, so {q} {frm} make {answer} {to}",
                 "one {frm_one} is {factor} {to}")
    return (tuple(p.format(**f) for p in phrasings),
            ExplanationSpec(((f["factor"],), (f["frm"], f["frm_one"], f["to"]))))
  if task_name == "capital":
    continent = _CONTINENTS[f["country"]]
    phrasings = (f"{f['country']} lies in {continent}, and its government sits in {answer}",
                 f"{answer} is the seat of government of {f['country']}, a country in {continent}")
    others = tuple(sorted({c.lower() for c in _CONTINENTS.values()} - {continent.lower()}))
    return phrasings, ExplanationSpec(((continent.lower(),),), others)
  if task_name == "chemical_symbol":
    latin = _LATIN_NAMES.get(answer)
    if latin:
      return ((f"its symbol comes from the Latin name {latin}",
               f"{answer} is short for {latin}, its Latin name"),
              ExplanationSpec(((latin,),), tuple(n for n in _LATIN_NAMES.values() if n != latin)))
    return ((f"its symbol is taken from the letters of the name {f['element']}",
             f"{answer} is made of letters from {f['element']}"),
            ExplanationSpec((("letter", "letters"), (f["element"],)),
                            tuple(_LATIN_NAMES.values())))
  if task_name == "planet_by_position":
    closer = _PLANETS.index(answer)
    be, count_be = (("is no planet", "no planet is") if closer == 0 else
                    ("is one planet", "one planet is") if closer == 1 else
                    (f"are {_UNITS[closer]} planets", f"{_UNITS[closer]} planets are"))
    wrong = tuple(str(j) for j in range(len(_PLANETS)) if j != closer)
    return ((f"there {be} between {answer} and the Sun",
             f"{count_be} closer to the Sun than {answer}"),
            ExplanationSpec(((("no", "0") if closer == 0 else (str(closer),)),
                             ("planet", "planets")), wrong + (("no",) if closer else ())))
  if task_name == "planet_position":
    position = int(answer) - 1
    before = _PLANETS[position - 1] if position > 0 else None
    after = _PLANETS[position + 1] if position < len(_PLANETS) - 1 else None
    if before and after:
      phrasings = (f"it comes just after {before} and before {after}",
                   f"it lies between {before} and {after}")
    elif after:
      phrasings = (f"it is the closest planet to the Sun, just before {after}",
                   f"it comes just before {after}")
    else:
      phrasings = (f"it is the farthest planet from the Sun, just after {before}",
                   f"it comes just after {before}")
    neighbours = tuple(p.lower() for p in (before, after) if p)
    far = tuple(p.lower() for i, p in enumerate(_PLANETS) if abs(i - position) > 1)
    return phrasings, ExplanationSpec((neighbours,), far)
  if task_name == "animal_class":
    feature, word = _CLASS_FEATURES[answer]
    return ((f"like every {answer}, it {feature}",
             f"the {f['animal']} {feature}, as every {answer} does"),
            ExplanationSpec(((word,),), _others(_CLASS_FEATURES, word)))
  if task_name in ("first_letter", "last_letter", "letter_count", "backwards"):
    word = f["word"]
    spelled, backwards = "-".join(word), "-".join(word[::-1])
    phrasings = {
        "first_letter": (f"it is spelled {spelled}, which starts with {answer}",
                         f"spelled out, it is {spelled}, and its first letter is {answer}"),
        "last_letter": (f"it is spelled {spelled}, which ends with {answer}",
                        f"spelled out, it is {spelled}, and its last letter is {answer}"),
        "letter_count": (f"it is spelled {spelled}, which is {answer} letters",
                         f"spelling it out as {spelled} gives {answer} letters"),
        "backwards": (f"it is spelled {spelled}, and read from the end that is {backwards}",
                      f"reading {spelled} from right to left gives {backwards}"),
    }[task_name]
    spellings = (word, word[::-1]) if task_name == "backwards" else (word,)
    return phrasings, ExplanationSpec((), (), spellings)
  if task_name == "legs":
    animal_a = f["animal_a"]
    group = _LEG_GROUPS[animal_a.split()[-1].lower()]
    others = sorted(set(_LEG_GROUPS.values()) - {group})
    return ((f"it is {_article(group)}, and {group}s like it have {answer} legs",
             f"{animal_a} is {_article(group)}, and {group}s like it walk on {answer} legs"),
            ExplanationSpec(((group, group + "s"),),
                            tuple(others) + tuple(g + "s" for g in others)))
  if task_name == "state_of_matter":
    feature, word = _STATE_FEATURES[answer]
    return ((f"a {answer} {feature}, and so does {f['stuff']}",
             f"{f['stuff']} {feature}, which is what a {answer} does"),
            ExplanationSpec(((word,),), _others(_STATE_FEATURES, word)))
  if task_name == "water_temperature":
    if f["verb"] == "boil":
      phrasings, word, other = (("at sea level, that is where water turns to steam",
                                 "that is the temperature at which water turns to steam at sea "
                                 "level"), "steam", "ice")
    else:
      phrasings, word, other = (("that is where liquid water turns to ice",
                                 "below that temperature, water turns to ice"), "ice", "steam")
    return phrasings, ExplanationSpec(((word,),), (other,))
  if task_name == "how_many":
    note, word = _HOW_MANY_NOTES[(f["part"], f["whole"])]
    return (note.format(**f),), ExplanationSpec(((word,),), _others(_HOW_MANY_NOTES, word))
  if task_name in ("next_number", "previous_number"):
    up, down = ("up", "more", "plus", "add", "after"), ("down", "less", "minus", "before")
    if task_name == "next_number":
      return ((f"counting up from {f['n']}, the next number is {answer}",
               f"{answer} is one more than {f['n']}"),
              ExplanationSpec(((f["n"],), up[:4]), down))
    return ((f"counting down from {f['n']}, the number before it is {answer}",
             f"{answer} is one less than {f['n']}"),
            ExplanationSpec(((f["n"],), down), up))
  raise ValueError(f"no explanations for task {task_name!r}")


# The fields that identify a question's content item (with its answer) from its text.
_KEY_FIELDS = {
    "add": ("a", "b"), "subtract": ("a", "b"), "multiply": ("a", "b"),
    "convert": ("q", "frm", "to"), "capital": ("country",), "chemical_symbol": ("element",),
    "planet_by_position": ("ordinal",), "planet_position": ("planet",),
    "animal_class": ("animal",), "first_letter": ("word",), "last_letter": ("word",),
    "letter_count": ("word",), "backwards": ("word",), "legs": ("animal_a",),
    "state_of_matter": ("stuff",), "water_temperature": ("scale",),
    "how_many": ("part", "whole"), "next_number": ("n",), "previous_number": ("n",),
}


@functools.cache
def _items_by_answer(task_name: str) -> dict[str, list[dict[str, Any]]]:
  task = _TASKS_BY_NAME[task_name]
  index: dict[str, list[dict[str, Any]]] = {}
  for item in task.items + task.large_items:
    index.setdefault(str(item["answer"]), []).append(item)
  return index


def _contains(tokens: Sequence[str], phrase: Sequence[str]) -> bool:
  n = len(phrase)
  return n > 0 and any(list(tokens[i:i + n]) == list(phrase) for i in range(len(tokens) - n + 1))


@functools.lru_cache(maxsize=65536)
def _explanation_spec(task_name: str, instruction: str, context: str,
                      answer: str) -> ExplanationSpec | None:
  prompt = f"{instruction}\n{context}"
  prompt_tokens = _tokens(prompt)
  # Spelling questions quote their word (and may say "word" besides, itself a word of the set).
  present = lambda key, value: (f'"{value}"' in prompt.lower() if key == "word"
                                else _contains(prompt_tokens, _tokens(value)))
  for item in _items_by_answer(task_name).get(answer, ()):
    if all(present(key, str(item[key])) for key in _KEY_FIELDS[task_name]):
      return _explanations(task_name, {key: str(value) for key, value in item.items()})[1]
  return None


def explanation_spec(question: Mapping[str, Any]) -> ExplanationSpec | None:
  """What a correct explanation of a built-in question's answer contains.

  Reads only the question's own fields: `task`, `instruction`, `context` and `answer` (the
  content is recognised in the question's text, like a teacher who knows the tables).

  Returns:
    The spec, or None for a question the built-in tables do not know (no explanation of it can
    be checked).
  """
  task_name = str(question.get("task", ""))
  if task_name not in _KEY_FIELDS or "answer" not in question:
    return None
  return _explanation_spec(task_name, str(question.get("instruction", "")),
                           str(question.get("context", "")), str(question["answer"]))


def parse_demonstrators(spec: str | Mapping[str, float],
                        field: str = "data.demonstrators") -> dict[str, float]:
  """Demonstrator shares from "tutor=0.25,plain=0.75", "mixed" (MIXED_DEMONSTRATORS) or a mapping.

  Raises:
    UserError: naming `field`, for an unknown demonstrator, a malformed or negative share, or
      shares that do not sum to 1.
  """
  if isinstance(spec, str) and spec.strip() == "mixed":
    spec = MIXED_DEMONSTRATORS
  if isinstance(spec, str):
    shares: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
      name, equals, value = part.partition("=")
      try:
        shares[name.strip()] = float(value) if equals else float("nan")
      except ValueError:
        shares[name.strip()] = float("nan")
  else:
    shares = {str(name): float(value) for name, value in dict(spec).items()}
  for name, value in shares.items():
    if name not in DEMONSTRATORS:
      raise UserError(f"{field}: unknown demonstrator {name!r} in {spec!r}; known: "
                      f"{', '.join(DEMONSTRATORS)}")
    if not value >= 0:
      raise UserError(f"{field}: demonstrator {name!r} needs a share >= 0 (NAME=SHARE), got "
                      f"{spec!r}")
  if abs(sum(shares.values()) - 1) > 1e-6:
    raise UserError(f"{field}: demonstrator shares must sum to 1, got {sum(shares.values()):g} "
                    f"in {spec!r}")
  return {name: shares.get(name, 0.0) for name in DEMONSTRATORS}


def _assign_demonstrators(shares: Mapping[str, float], num: int,
                          rng: np.random.Generator) -> list[str]:
  """`num` writers in exactly the configured shares (largest remainders), shuffled."""
  exact = {name: share * num for name, share in shares.items()}
  counts = {name: int(value) for name, value in exact.items()}
  by_remainder = sorted(exact, key=lambda name: (counts[name] - exact[name], name))
  for name in by_remainder[:num - sum(counts.values())]:
    counts[name] += 1
  writers = [name for name in DEMONSTRATORS for _ in range(counts[name])]
  return [writers[i] for i in rng.permutation(num)]


def _write(task: _Task, record: Mapping[str, Any], fields: Mapping[str, str], demonstrator: str,
           rng: np.random.Generator) -> str:
  """The response `demonstrator` writes to `record`'s question (`fields`: the item's fields)."""
  pick = lambda options: options[int(rng.integers(len(options)))]
  sentence = record["response"]  # the canonical sentence, which ends with "."
  if demonstrator == "plain":
    return sentence
  if demonstrator == "terse":
    return pick(_TERSE).format(answer=record["answer"])
  if demonstrator == "tutor":
    explanation = pick(_explanations(task.name, fields)[0])
    return pick(_TUTOR).format(sentence=sentence[:-1], explanation=explanation)
  if demonstrator == "rambler":
    after = [_FILLER_AFTER[i] for i in rng.permutation(len(_FILLER_AFTER))[:1 + rng.integers(2)]]
    return " ".join([pick(_FILLER_BEFORE), sentence, *after])
  if demonstrator == "evasive":
    return pick(_EVASIVE)
  if demonstrator == "careless":
    style = pick(_ANSWERING_STYLES)
    right = _write(task, record, fields, style, rng)
    return corrupt(dict(record, response=right), rng)
  raise ValueError(f"unknown demonstrator {demonstrator!r}")


# --------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------
def _render(task: _Task, split: str, item_index: int, template_index: int,
            rng: np.random.Generator, demonstrator: str | None = None,
            style_rng: np.random.Generator | None = None) -> dict[str, Any]:
  """One record of `split`: an item of `task` asked with one of its phrasings.

  `ood_2` takes its items from `task.large_items` and `ood_1` its phrasings from `task.held_out`;
  template ids number the held-out phrasings after the in-distribution ones. With a
  `demonstrator`, that writer's response replaces the canonical one (its choices drawn from
  `style_rng`, so that `rng`, and with it every question, stays the same) and the record says
  who wrote it.
  """
  item = (task.large_items if split == "ood_2" else task.items)[item_index]
  held_out = split == "ood_1"
  instruction, context = (task.held_out if held_out else task.templates)[template_index]
  # Word-problem decoration only; it changes no answer.
  fields = dict(item, name=_NAMES[int(rng.integers(len(_NAMES)))],
                things=_THINGS[int(rng.integers(len(_THINGS)))])
  fields = {key: str(value) for key, value in fields.items()}
  capitalise = lambda s: s[:1].upper() + s[1:]
  template_id = len(task.templates) + template_index if held_out else template_index
  record = {
      "instruction": capitalise(instruction.format(**fields)),
      "context": capitalise(context.format(**fields)),
      "response": capitalise(task.response.format(**fields)),
      "category": task.category,
      "answer": fields["answer"],
      "ood_level": SPLIT_OOD_LEVEL[split],
      "task": task.name,
      "template": f"{task.name}/{template_id}",
  }
  if demonstrator is not None:
    record["response"] = _write(task, record, fields, demonstrator, style_rng)
    record["demonstrator"] = demonstrator
  return record


@dataclasses.dataclass
class _Pools:
  """(item index, template index) questions of one task, per in-distribution split."""
  train: list[tuple[int, int]]
  validation: list[tuple[int, int]]
  test: list[tuple[int, int]]
  test_items: list[int]


def _split_task(task: _Task, rng: np.random.Generator) -> _Pools:
  """Holds out items (numbers, words) or (item, phrasing) pairs (table facts) for evaluation."""
  num_templates = len(task.templates)
  if task.split_by_item:
    order = rng.permutation(len(task.items)).tolist()
    num_eval = max(1, len(order) // 10)
    val_items, test_items = order[:num_eval], order[num_eval:2 * num_eval]
    train_items = order[2 * num_eval:]
    pairs = lambda items: [(i, t) for i in items for t in range(num_templates)]
    return _Pools(pairs(train_items), pairs(val_items), pairs(test_items), test_items)
  # A fact must be seen in training to be knowable: every item keeps all but two phrasings for
  # training, and is asked once in validation and once in test with the other two.
  train, validation, test = [], [], []
  for item in range(len(task.items)):
    templates = rng.permutation(num_templates).tolist()
    validation.append((item, templates[0]))
    test.append((item, templates[1]))
    train.extend((item, t) for t in templates[2:])
  return _Pools(train, validation, test, list(range(len(task.items))))


def _round_robin(pools: Mapping[str, list[list[tuple[_Task, Any]]]], num: int,
                 rng: np.random.Generator) -> list[tuple[_Task, Any]]:
  """Up to `num` distinct questions, balanced over categories, then over their tasks."""
  queues = {category: [list(q) for q in task_queues if q]
            for category, task_queues in pools.items()}
  for task_queues in queues.values():
    for queue in task_queues:
      order = rng.permutation(len(queue))
      queue[:] = [queue[i] for i in order]
  chosen: list[tuple[_Task, Any]] = []
  turn = {category: 0 for category in queues}
  while len(chosen) < num and any(queues.values()):
    for category in sorted(queues):
      task_queues = queues[category]
      if not task_queues or len(chosen) >= num:
        continue
      queue = task_queues[turn[category] % len(task_queues)]
      chosen.append(queue.pop())
      if not queue:
        task_queues.remove(queue)
      else:
        turn[category] += 1
  order = rng.permutation(len(chosen))
  return [chosen[i] for i in order]


def _shares(total: int, parts: int) -> list[int]:
  """`total` split into `parts` near-equal integers, the larger ones first."""
  return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def generate(seed: int = 0, num_train: int = DEFAULT_NUM_TRAIN,
             num_eval: int = DEFAULT_NUM_EVAL,
             demonstrators: str | Mapping[str, float] = DEFAULT_DEMONSTRATORS
             ) -> dict[str, list[dict[str, Any]]]:
  """Generates the built-in dataset's splits, deterministically from `seed`.

  Args:
    seed: selects the held-out content and the sampling; same seed -> identical output.
    num_train: training records, split evenly over the 5 training categories and then over each
      category's question types; a question type with fewer distinct training questions than
      its share repeats them (like epochs), each one before any twice.
    num_eval: records per evaluation split, distinct questions balanced over categories; a split
      is smaller when its categories have fewer distinct questions.
    demonstrators: the writers' shares of every split's responses ("NAME=SHARE,...", see
      `DEMONSTRATORS`, `MIXED_DEMONSTRATORS`), exact to one record per split. Only plain writers
      (the default) give the canonical records without a `demonstrator` field; any other mix
      asks the same questions (same seed) and stores each response's writer in `demonstrator`.

  Returns:
    {split: records} for `SPLITS`.
  """
  if num_train < 1 or num_eval < 1:
    raise UserError(f"builtin dataset: num_train ({num_train}) and num_eval ({num_eval}) must be "
                    "positive")
  shares = parse_demonstrators(demonstrators)
  mixed = shares["plain"] != 1.0
  # The writers draw from their own stream, so that a mix asks exactly the default's questions.
  style_rng = np.random.default_rng([seed, 21])
  writers = lambda num: (_assign_demonstrators(shares, num, style_rng) if mixed else [None] * num)
  rng = np.random.default_rng(seed)
  tasks = {category: [t for t in _TASKS if t.category == category]
           for category in TRAIN_CATEGORIES}
  pools = {task.name: _split_task(task, rng)
           for task in _TASKS if task.category != HELD_OUT_CATEGORY}

  train, train_writers = [], iter(writers(num_train))
  for category, category_quota in zip(TRAIN_CATEGORIES, _shares(num_train, len(TRAIN_CATEGORIES))):
    for task, quota in zip(tasks[category], _shares(category_quota, len(tasks[category]))):
      pool = pools[task.name].train
      # Whole shuffled passes over the pool, like epochs: every training question (so every
      # fact) is seen once before any is seen twice.
      passes = -(-quota // len(pool))
      questions = [pool[i] for _ in range(passes) for i in rng.permutation(len(pool))][:quota]
      train.extend(_render(task, "train", item, template, rng, next(train_writers), style_rng)
                   for item, template in questions)
  splits = {"train": [train[i] for i in rng.permutation(len(train))]}

  # {split: {category: [[(task, (item, template)), ...] per task]}}: the distinct questions.
  eval_questions = {
      split: {c: [[(t, q) for q in getattr(pools[t.name], split)] for t in tasks[c]]
              for c in TRAIN_CATEGORIES}
      for split in ("validation", "test")}
  # Unseen phrasings of held-out content (numbers, words) or of any fact.
  eval_questions["ood_1"] = {
      c: [[(t, (i, h)) for i in pools[t.name].test_items for h in range(len(t.held_out))]
          for t in tasks[c]] for c in TRAIN_CATEGORIES}
  # Training phrasings of content larger than any in training.
  eval_questions["ood_2"] = {
      c: [[(t, (i, p)) for i in range(len(t.large_items)) for p in range(len(t.templates))]
          for t in tasks[c] if t.large_items] for c in TRAIN_CATEGORIES}
  # The category never trained on.
  eval_questions["ood_3"] = {
      HELD_OUT_CATEGORY: [
          [(t, (i, p)) for i in range(len(t.items)) for p in range(len(t.templates))]
          for t in _TASKS if t.category == HELD_OUT_CATEGORY]}
  for split, questions in eval_questions.items():
    chosen = _round_robin(questions, num_eval, rng)
    splits[split] = [_render(task, split, item, template, rng, writer, style_rng)
                     for (task, (item, template)), writer in zip(chosen, writers(len(chosen)))]
  return splits


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | pathlib.Path) -> pathlib.Path:
  """Writes records as JSONL (one object a line, Dolly's fields first), creating parent dirs."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return path


def write_splits(splits: Mapping[str, Iterable[Mapping[str, Any]]],
                 directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """Writes each split to `directory/SPLIT.jsonl`; returns {split: path}."""
  return {name: write_jsonl(records, pathlib.Path(directory) / f"{name}.jsonl")
          for name, records in splits.items()}


def record_texts(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
  """The instruction, context and response texts of records (a tokenizer-training corpus)."""
  for record in records:
    for field in ("instruction", "context", "response"):
      if record.get(field):
        yield str(record[field])


# --------------------------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    save_dir: str | pathlib.Path | None = None
                    ) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE tokenizer (GPT-2 style) on a corpus.

  `<|endoftext|>` (id 0) is bos, eos, unk and pad, as in GPT-Neo, which has no separate pad token.
  Digits are split one per token so that numbers of any size share the same few embeddings,
  which the arithmetic and `ood_2` questions need. Byte-level: any text round-trips, including
  characters never seen in the corpus. Deterministic for the same corpus.

  Args:
    texts: the training corpus (e.g. prompts and responses of the training split).
    vocab_size: the largest vocabulary (the corpus may support fewer merges); >= 257.
    save_dir: if given, `save_pretrained` there, so that `AutoTokenizer.from_pretrained`
      reloads it.

  Returns:
    The tokenizer.
  """
  num_bytes = len(pre_tokenizers.ByteLevel.alphabet())
  if vocab_size <= num_bytes:
    raise UserError(f"tokenizer vocab_size {vocab_size} must exceed the {num_bytes} byte symbols")
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.ByteLevel(add_prefix_space=False),
      pre_tokenizers.Digits(individual_digits=True),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  texts = list(texts)
  if not any(texts):
    raise UserError("cannot train a tokenizer on an empty corpus")
  tokenizer.train_from_iterator(texts, trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
      pad_token=EOS_TOKEN)
  if save_dir is not None:
    fast.save_pretrained(str(save_dir))
  return fast
