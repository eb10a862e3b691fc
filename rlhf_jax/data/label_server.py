"""The labelling page for people (`labeler=web`): a small Starlette app served by uvicorn.

Install with `pip install -e ".[label]"`. The label phase calls `serve(pairs, out_path, ...)`;
tests build the app with `create_app(...)`.

Pairs to judge are dicts `{pair_id, prompt, response_a, response_b}` (optionally `split`, default
"train"), their two sides already in a random order (`order_sides`). They come from a policy or
from a JSONL file (`load_pairs_to_judge`).

What the page does: the annotator enters a name, sees the prompt and the two responses side by
side, chooses A, B, tie or both bad (keys 1/2/3/4 or a/b/t/x, then Enter), may add a note (n
focuses it; Enter in it submits), can skip (s) a pair and undo (u) their last judgement
(pressed again, the one before).
"Pair 12 of 200" is the pair's position in the list. A `double_share` of the pairs (drawn from
`seed`) goes to two different annotators, so agreement can be measured (`annotator_report`).

No label lost: each judgement is one line appended to `pairs.jsonl`, flushed and fsynced before
the response that confirms it returns; the page moves on only after that response. The rows are
the judged-pair rows every labeler writes (`prompt`, `chosen`, `rejected`, `labeler="web"`,
`annotator`, `judgement` 'a' | 'b' | 'tie', `split`, `pair_id`), plus `both_bad` (a tie for
training, kept apart in the report), `note`, `seconds` (from showing the pair to the judgement,
measured by the server) and `time` (Unix time). Which pairs are judged, and by whom, is read back
from the file on start, so a server killed at any moment (SIGKILL included) resumes with the
next unjudged pair; a torn last line (a write that never returned) is cut off. A thread lock
orders the writes, and an exclusive `flock` on `pairs.jsonl.lock` keeps a second server off the
same file. Each pair is leased to one annotator at a time (`lease_seconds`, after which an
abandoned pair can go to someone else), and a judgement is accepted only for the pair the
server assigned to that annotator and only while the pair still needs a judgement: a
single-annotated pair is never judged twice, and a pair id in a request cannot overwrite
anything (rows are never edited).

Undo: the annotator's last judgement is first appended (fsynced) to `pairs.undone.jsonl` next to
`pairs.jsonl`, then `pairs.jsonl` is rewritten without that row (temp file, fsync, atomic
rename, fsync of the directory), so `pairs.jsonl` always holds exactly the judgements in force,
readable without knowing about undo, and no judgement ever disappears without a trace. A kill
between the two steps leaves the judgement in force (the undo was never confirmed).

Security: binds 127.0.0.1 by default, and then accepts only a loopback Host header (a web page
elsewhere cannot reach it through DNS rebinding). Binding any other address needs a token
(generated and printed once when not given); every request must carry it (refused with 401):
the printed URL `/?token=...` sets an HttpOnly, SameSite=Strict cookie and redirects to `/`, and
scripts may send `Authorization: Bearer TOKEN`. Prompts and responses are untrusted: the page
sets them with `textContent` only, and a Content-Security-Policy allows no inline script. A
request that is not JSON, too large (`MAX_BODY_BYTES`) or malformed gets a 4xx with a message
and changes nothing on disk. Annotator names are not authenticated: anyone holding the token (or
on this machine, for loopback) can judge under any name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import pathlib
import re
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from rlhf_jax.data import labeling
from rlhf_jax.data.records import iter_jsonl
from rlhf_jax.errors import UserError, where

CHOICES = ("a", "b", "tie", "both_bad")
MAX_BODY_BYTES = 16 * 1024
MAX_NOTE_CHARS = 2000
MAX_ANNOTATOR_CHARS = 64
DEFAULT_PORT = 8765
DEFAULT_LEASE_SECONDS = 15 * 60
TOKEN_COOKIE = "rlhf_label_token"
_MISSING_EXTRA = "labeler=web needs the label extra: pip install -e \".[label]\""
# Pair ids travel in JSON and in the file; a plain alphabet keeps them unambiguous in messages.
_PAIR_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
# Tokens sit in a URL and a cookie: URL-safe characters only, long enough not to be guessed.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{16,256}$")
_PAGE_DIR = pathlib.Path(__file__).resolve().parent / "label_page"
_STATIC_FILES = {"label.js": "text/javascript; charset=utf-8",
                 "label.css": "text/css; charset=utf-8"}
_SECURITY_HEADERS = {
    # No inline script or style, nothing from elsewhere: untrusted text can never become code.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                                "form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ---------------------------------------------------------------------------------------------
# Pairs to judge.

def content_pair_id(prompt: str, response_a: str, response_b: str) -> str:
  """A stable id for a pair from its text; the same whichever side each response is on."""
  first, second = sorted((response_a, response_b))
  digest = hashlib.sha256(json.dumps([prompt, first, second]).encode("utf-8")).hexdigest()
  return digest[:16]


def _check_pair(obj: Any) -> tuple[dict | None, str | None]:
  """Validates one pair to judge; returns (pair, None) or (None, what is wrong)."""
  if not isinstance(obj, dict):
    return None, f"expected a JSON object, got {type(obj).__name__}"
  for field in ("prompt", "response_a", "response_b"):
    if field not in obj:
      return None, f"missing field {field!r}"
    if not isinstance(obj[field], str):
      return None, f"field {field!r} must be a string, got {type(obj[field]).__name__}"
  if obj["response_a"] == obj["response_b"]:
    return None, "fields 'response_a' and 'response_b' are identical (nothing to judge)"
  pair_id = obj.get("pair_id")
  if pair_id is None:
    pair_id = content_pair_id(obj["prompt"], obj["response_a"], obj["response_b"])
  elif not isinstance(pair_id, str) or not _PAIR_ID_RE.match(pair_id):
    return None, ("field 'pair_id' must be 1-128 characters from A-Z a-z 0-9 _ . : -, got "
                  f"{pair_id!r}")
  split = obj.get("split", labeling.TRAIN_SPLIT)
  if split not in labeling.SPLITS:
    return None, f"field 'split' is {split!r}, expected one of {labeling.SPLITS}"
  pair = {"pair_id": pair_id, "prompt": obj["prompt"], "response_a": obj["response_a"],
          "response_b": obj["response_b"], "split": split}
  for field in ("instruction", "context"):  # kept for fitting long prompts (load_judged_pairs)
    if field in obj:
      if not isinstance(obj[field], str):
        return None, f"field {field!r} must be a string, got {type(obj[field]).__name__}"
      pair[field] = obj[field]
  return pair, None


def check_pairs(pairs: Iterable[Mapping[str, Any]]) -> list[dict]:
  """Validates pairs given in memory (e.g. drawn from a policy); ids must be unique.

  Raises:
    UserError: naming the pair's index and what is wrong.
  """
  checked, seen = [], {}
  for index, obj in enumerate(pairs):
    pair, error = _check_pair(dict(obj) if isinstance(obj, Mapping) else obj)
    if error:
      raise UserError(f"pair {index}: {error}")
    pair_id = pair["pair_id"]
    if pair_id in seen:
      raise UserError(f"pair {index}: pair_id {pair_id!r} repeats pair {seen[pair_id]}")
    seen[pair_id] = index
    checked.append(pair)
  return checked


def load_pairs_to_judge(path: str) -> list[dict]:
  """Reads pairs to judge from JSON Lines: `prompt`, `response_a`, `response_b` per line.

  Optional per line: `pair_id` (default: a hash of the prompt and the two responses, so a
  regenerated file keeps its ids), `split` ("train", the default, or "validation"), and
  `instruction`, `context` (copied into the judged rows). Other fields are ignored.
  The sides are taken as given; `order_sides` puts them in a random order.

  Raises:
    UserError: naming `file:line` for a line that is not JSON, misses a field, has a
      non-string field, two identical responses, a bad or repeated pair id.
  """
  pairs, seen = [], {}
  for line, obj, error in iter_jsonl(path):
    if error:
      raise UserError(f"{where(path, line)}: {error[1]}")
    pair, message = _check_pair(obj)
    if message:
      raise UserError(f"{where(path, line)}: {message}")
    if pair["pair_id"] in seen:
      raise UserError(f"{where(path, line)}: pair_id {pair['pair_id']!r} repeats line "
                      f"{seen[pair['pair_id']]} (the same pair twice?)")
    seen[pair["pair_id"]] = line
    pairs.append(pair)
  if not pairs:
    raise UserError(f"{path}: no pairs to judge in the file")
  return pairs


def order_sides(pairs: Sequence[Mapping[str, Any]], seed: int) -> list[dict]:
  """Swaps response_a and response_b of a random half of the pairs (drawn from `seed`).

  Annotators then cannot learn that one side is, say, always the newer policy. Ids stay.
  """
  rng = np.random.default_rng(seed)
  swaps = rng.random(len(pairs)) < 0.5
  ordered = []
  for pair, swap in zip(pairs, swaps):
    pair = dict(pair)
    if swap:
      pair["response_a"], pair["response_b"] = pair["response_b"], pair["response_a"]
    ordered.append(pair)
  return ordered


def double_annotated_ids(pair_ids: Sequence[str], share: float, seed: int) -> set[str]:
  """The ids of the pairs that go to two annotators: round(share * n), drawn from `seed`.

  Drawn from the sorted ids, so the draw does not depend on the pairs' order.
  """
  if not 0.0 <= share <= 1.0:
    raise UserError(f"double_share must be in [0, 1], got {share}")
  ids = sorted(pair_ids)
  count = int(round(share * len(ids)))
  rng = np.random.default_rng(seed)
  return {ids[i] for i in rng.choice(len(ids), size=count, replace=False)} if count else set()


# ---------------------------------------------------------------------------------------------
# The file: judged-pair rows, appended and fsynced.

def judged_row(pair: Mapping[str, Any], *, annotator: str, choice: str, note: str,
               seconds: float | None, labeler: str = "web") -> dict:
  """The row written for one judgement of `pair` (sides as shown: 'a' is response_a).

  The rows of `rlhf_jax.data.labeling` (read by its `load_judged_pairs`, so the reward phase
  trains on the file as it is): `chosen`/`rejected` hold the preferred and the other response;
  for a tie (and for both bad, a tie with `both_bad`) they are response_a and response_b.
  """
  if choice not in CHOICES:
    raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
  a_wins = choice != "b"
  row = {
      "pair_id": pair["pair_id"],
      "split": pair.get("split", labeling.TRAIN_SPLIT),
      "prompt": pair["prompt"],
      "chosen": pair["response_a"] if a_wins else pair["response_b"],
      "rejected": pair["response_b"] if a_wins else pair["response_a"],
      "labeler": labeler,
      "annotator": annotator,
      "judgement": "tie" if choice == "both_bad" else choice,
      "both_bad": choice == "both_bad",
      "note": note,
      "seconds": None if seconds is None else round(seconds, 3),
      "time": round(time.time(), 3),
  }
  for field in ("instruction", "context"):
    if field in pair:
      row[field] = pair[field]
  return row


def row_choice(row: Mapping[str, Any]) -> str:
  """A judged row's choice as the page offers them: 'a', 'b', 'tie' or 'both_bad'."""
  return "both_bad" if row.get("both_bad") else row["judgement"]


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _append_line(path: pathlib.Path, row: Mapping[str, Any]) -> None:
  """Appends one JSON line and returns only once it is on disk (flush + fsync).

  A write that fails (a full disk) is cut back off, so the next line cannot land after
  half a line.
  """
  data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
  with open(path, "ab") as f:
    size = f.seek(0, os.SEEK_END)
    try:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    except OSError:
      with contextlib.suppress(OSError):
        f.truncate(size)
      raise


def _read_rows(path: pathlib.Path, *, repair: bool) -> list[dict]:
  """Reads the judged rows back; a torn last line left by a kill mid-write is left out.

  With `repair` the torn line is also cut off the file (the server does so on start).

  Raises:
    UserError: for a bad line anywhere but at the end (the file was edited by hand?).
  """
  if not path.exists():
    return []
  raw = path.read_bytes()
  lines = raw.split(b"\n")
  # A complete file ends with "\n", so the last element is b"". Anything else is a write that
  # never finished, hence never confirmed to the page: drop it.
  if lines[-1]:
    logging.warning("%s: %s an unfinished last line (%d bytes) left by an interrupted write",
                    path, "cutting off" if repair else "leaving out", len(lines[-1]))
    if repair:
      with open(path, "r+b") as f:
        f.truncate(len(raw) - len(lines[-1]))
        f.flush()
        os.fsync(f.fileno())
  rows = []
  for number, line in enumerate(lines[:-1], start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f"{where(path, number)}: not a JSON line ({e}); fix or remove it") from e
    if not isinstance(row, dict) or not isinstance(row.get("pair_id"), str) or not isinstance(
        row.get("annotator"), str) or row.get("judgement") not in ("a", "b", "tie"):
      raise UserError(f"{where(path, number)}: not a judged-pair row (needs string pair_id and "
                      "annotator, judgement 'a', 'b' or 'tie')")
    rows.append(row)
  return rows


def load_judged_rows(path: str | os.PathLike) -> list[dict]:
  """The rows of a pairs.jsonl with every field (annotator, seconds, note), for the report.

  The reward phase reads the same file with `labeling.load_judged_pairs`; this reader keeps
  what the report needs and changes nothing on disk.

  Raises:
    UserError: a missing file, or a line that is not a judged-pair row, naming file:line.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such file")
  return _read_rows(path, repair=False)


def _rewrite_without(path: pathlib.Path, index: int) -> None:
  """Rewrites the file without its `index`-th non-blank line, atomically."""
  lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
  del lines[index]
  temp = path.with_name(path.name + ".tmp")
  with open(temp, "wb") as f:
    f.write(b"".join(line + b"\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())
  os.replace(temp, path)
  _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# Assignment state.

class Conflict(Exception):
  """A request that is well formed but does not fit the current state (HTTP 409)."""


@dataclasses.dataclass
class _Lease:
  pair_id: str
  since: float  # `clock()` when the pair was shown


class LabelSession:
  """Which annotator judges which pair; every change goes to disk before it is confirmed.

  Thread-safe: all methods take one lock. State is derived from `out_path` on construction.
  Call `close()` to release the file lock (the app does on shutdown).
  """

  def __init__(self, pairs: Sequence[Mapping[str, Any]], out_path: str | os.PathLike, *,
               double_share: float = 0.1, seed: int = 0,
               lease_seconds: float = DEFAULT_LEASE_SECONDS,
               clock: Callable[[], float] = time.monotonic):
    self.pairs = check_pairs(pairs)
    if not self.pairs:
      raise UserError("no pairs to judge")
    self.out_path = pathlib.Path(out_path)
    self.undone_path = self.out_path.with_name(self.out_path.stem + ".undone.jsonl")
    self.out_path.parent.mkdir(parents=True, exist_ok=True)
    self._lock = threading.Lock()
    self._lock_file = open(self.out_path.with_name(self.out_path.name + ".lock"), "a")
    try:
      fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      self._lock_file.close()
      raise UserError(f"{self.out_path}: another label server is writing this file") from e
    self._clock = clock
    self.lease_seconds = lease_seconds
    self._index = {pair["pair_id"]: i for i, pair in enumerate(self.pairs)}
    doubles = double_annotated_ids(list(self._index), double_share, seed)
    self.required = {pid: 2 if pid in doubles else 1 for pid in self._index}
    self._leases: dict[str, _Lease] = {}
    self._skipped: dict[str, set[str]] = {}
    # A temp file from a rewrite that was killed before its rename is an old copy: drop it.
    self.out_path.with_name(self.out_path.name + ".tmp").unlink(missing_ok=True)
    self._rows = _read_rows(self.out_path, repair=True)
    self._judged: dict[str, set[str]] = {pid: set() for pid in self._index}
    unknown = 0
    for row in self._rows:
      if row["pair_id"] in self._judged:
        self._judged[row["pair_id"]].add(row["annotator"])
      else:
        unknown += 1
    if unknown:
      logging.warning("%s: %d judged rows are for pairs not in this round; kept, not counted",
                      self.out_path, unknown)

  def close(self) -> None:
    with self._lock:
      if not self._lock_file.closed:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

  # -- helpers (lock held) ----------------------------------------------------------------

  def _active_holders(self, pair_id: str, now: float) -> set[str]:
    return {name for name, lease in self._leases.items()
            if lease.pair_id == pair_id and now - lease.since < self.lease_seconds}

  def _open_for(self, pair_id: str, annotator: str, now: float) -> bool:
    """Whether `annotator` may be given `pair_id` now."""
    judged = self._judged[pair_id]
    if annotator in judged:
      return False
    others = self._active_holders(pair_id, now) - {annotator}
    return len(judged) + len(others) < self.required[pair_id]

  def _assign(self, annotator: str, retry_skipped: bool = False) -> str | None:
    now = self._clock()
    lease = self._leases.get(annotator)
    if lease and annotator not in self._judged[lease.pair_id] and (
        len(self._judged[lease.pair_id]) < self.required[lease.pair_id]):
      return lease.pair_id  # a reload shows the same pair
    self._leases.pop(annotator, None)
    if retry_skipped:
      self._skipped.pop(annotator, None)
    skipped = self._skipped.get(annotator, set())
    for pair in self.pairs:
      pid = pair["pair_id"]
      if pid not in skipped and self._open_for(pid, annotator, now):
        self._leases[annotator] = _Lease(pid, now)
        return pid
    return None

  def _last_row_index(self, annotator: str) -> int | None:
    for i in range(len(self._rows) - 1, -1, -1):
      if self._rows[i]["annotator"] == annotator and self._rows[i]["pair_id"] in self._index:
        return i
    return None

  def _view(self, annotator: str, pair_id: str | None, message: str | None = None,
            previous: Mapping[str, Any] | None = None) -> dict:
    """What the page shows: the assigned pair (or none), progress and what undo would undo."""
    last = self._last_row_index(annotator)
    view = {
        "annotator": annotator,
        "pair": None,
        "previous": previous,
        "judged_by_you": sum(1 for judged in self._judged.values() if annotator in judged),
        "judgements_done": sum(len(judged) for judged in self._judged.values()),
        "judgements_needed": sum(self.required.values()),
        "total": len(self.pairs),
        "skipped": len(self._skipped.get(annotator, ())),
        "undo_pair_id": None if last is None else self._rows[last]["pair_id"],
        "message": message,
    }
    if pair_id is not None:
      pair = self.pairs[self._index[pair_id]]
      view["pair"] = {"pair_id": pair_id, "prompt": pair["prompt"],
                      "response_a": pair["response_a"], "response_b": pair["response_b"],
                      "position": self._index[pair_id] + 1}
    return view

  def _check_assigned(self, annotator: str, pair_id: str) -> _Lease:
    lease = self._leases.get(annotator)
    if lease is None or lease.pair_id != pair_id:
      raise Conflict(f"pair {pair_id!r} is not the pair assigned to {annotator!r} (the server "
                     "restarted or the page is stale); showing your current pair")
    return lease

  # -- operations -------------------------------------------------------------------------

  def next(self, annotator: str, *, retry_skipped: bool = False) -> dict:
    """The annotator's current pair, assigning the next open one when they have none."""
    with self._lock:
      return self._view(annotator, self._assign(annotator, retry_skipped))

  def judge(self, annotator: str, pair_id: str, choice: str, note: str = "") -> dict:
    """Records a judgement of the pair assigned to `annotator`, on disk before returning.

    Raises:
      Conflict: the pair is not assigned to them, or no longer needs their judgement.
    """
    with self._lock:
      lease = self._check_assigned(annotator, pair_id)
      judged = self._judged[pair_id]
      if annotator in judged or len(judged) >= self.required[pair_id]:
        self._leases.pop(annotator, None)
        raise Conflict(f"pair {pair_id!r} needs no more judgements (judged by another "
                       "annotator after your assignment expired)")
      row = judged_row(self.pairs[self._index[pair_id]], annotator=annotator, choice=choice,
                       note=note, seconds=self._clock() - lease.since)
      _append_line(self.out_path, row)  # raises before any state changes if the disk fails
      self._rows.append(row)
      judged.add(annotator)
      del self._leases[annotator]
      return self._view(annotator, self._assign(annotator),
                        f"saved your judgement of pair {self._index[pair_id] + 1}")

  def skip(self, annotator: str, pair_id: str) -> dict:
    """Puts the assigned pair aside for this annotator (others may get it) and moves on."""
    with self._lock:
      self._check_assigned(annotator, pair_id)
      self._skipped.setdefault(annotator, set()).add(pair_id)
      del self._leases[annotator]
      return self._view(annotator, self._assign(annotator),
                        f"skipped pair {self._index[pair_id] + 1}")

  def undo(self, annotator: str, pair_id: str) -> dict:
    """Withdraws the annotator's last judgement (which must be of `pair_id`) and shows it again.

    The withdrawn row is appended to `pairs.undone.jsonl` first, then `pairs.jsonl` is
    rewritten without it (atomic rename).

    Raises:
      Conflict: `pair_id` is not the annotator's last judgement.
    """
    with self._lock:
      last = self._last_row_index(annotator)
      if last is None or self._rows[last]["pair_id"] != pair_id:
        raise Conflict(f"pair {pair_id!r} is not {annotator!r}'s last judgement; nothing undone")
      row = self._rows[last]
      _append_line(self.undone_path, {**row, "undone_time": round(time.time(), 3)})
      _rewrite_without(self.out_path, last)
      del self._rows[last]
      self._judged[pair_id].discard(annotator)
      self._skipped.get(annotator, set()).discard(pair_id)
      self._leases[annotator] = _Lease(pair_id, self._clock())
      return self._view(annotator, pair_id, f"undid your judgement of pair "
                        f"{self._index[pair_id] + 1}; judge it again",
                        previous={"choice": row_choice(row), "note": row.get("note", "")})

  def rows(self) -> list[dict]:
    """The judged rows in force, in file order."""
    with self._lock:
      return [dict(row) for row in self._rows]


# ---------------------------------------------------------------------------------------------
# Agreement and quality.

def annotator_report(rows: Iterable[Mapping[str, Any]],
                     reference: Mapping[str, str] | None = None) -> dict:
  """Agreement between annotators, with a reference, and a summary per annotator.

  Args:
    rows: judged-pair rows (any labeler's), with `pair_id`, `annotator`, `judgement` and
      optionally `both_bad` and `seconds`.
    reference: optional {pair_id: 'a' | 'b' | 'tie'}, e.g. the simulated teacher's gold order
      of the same pair with the same sides.

  Returns:
    {"annotators": {name: {"count", "ties" (not counting both bad), "both_bad",
                           "median_seconds" (None without timings),
                           "reference_agreement", "reference_pairs"}},
     "inter_annotator": {"pairs": pairs judged by two or more annotators,
                         "comparisons": pairs of annotators compared on them,
                         "agreement": share of comparisons with the same choice (a, b, tie and
                           both bad are four choices), or None without comparisons,
                         "decided_agreement", "decided_comparisons": the same over comparisons
                           where both chose a side,
                         "by_annotator_pair": {"A|B": {"comparisons", "agreement"}}}}.
    Agreement with the reference is `labeling.agreement`'s: over the pairs where both the
    annotator and the reference chose a side (a tie states no order to agree with);
    `reference_pairs` counts those pairs.
  """
  by_pair: dict[str, dict[str, Mapping[str, Any]]] = {}
  per_annotator: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    per_annotator.setdefault(row["annotator"], []).append(row)
    by_pair.setdefault(row["pair_id"], {})[row["annotator"]] = row

  annotators = {}
  for name, own in sorted(per_annotator.items()):
    seconds = [float(row["seconds"]) for row in own if row.get("seconds") is not None]
    choices = [row_choice(row) for row in own]
    fraction, compared = None, 0
    if reference is not None:
      referenced = [row for row in own if row["pair_id"] in reference]
      fraction, compared = labeling.agreement([row["judgement"] for row in referenced],
                                              [reference[row["pair_id"]] for row in referenced])
    annotators[name] = {
        "count": len(own), "ties": choices.count("tie"), "both_bad": choices.count("both_bad"),
        "median_seconds": statistics.median(seconds) if seconds else None,
        "reference_agreement": fraction, "reference_pairs": compared,
    }

  firsts, seconds_, by_annotator_pair = [], [], {}
  multi = 0
  for judged in by_pair.values():
    names = sorted(judged)
    multi += len(names) >= 2
    for i, first in enumerate(names):
      for second in names[i + 1:]:
        firsts.append(judged[first])
        seconds_.append(judged[second])
        counts = by_annotator_pair.setdefault(f"{first}|{second}", [0, 0])
        counts[0] += 1
        counts[1] += row_choice(judged[first]) == row_choice(judged[second])
  same = sum(row_choice(a) == row_choice(b) for a, b in zip(firsts, seconds_))
  decided, decided_n = labeling.agreement([row["judgement"] for row in firsts],
                                          [row["judgement"] for row in seconds_])
  return {
      "annotators": annotators,
      "inter_annotator": {
          "pairs": multi, "comparisons": len(firsts),
          "agreement": same / len(firsts) if firsts else None,
          "decided_agreement": decided, "decided_comparisons": decided_n,
          "by_annotator_pair": {key: {"comparisons": n, "agreement": hits / n}
                                for key, (n, hits) in sorted(by_annotator_pair.items())},
      },
  }


def format_report(report: Mapping[str, Any]) -> str:
  """The report as a short Markdown table and a line on agreement, for logs and READMEs."""
  def pct(value):
    return "-" if value is None else f"{100 * value:.1f}%"
  lines = ["| annotator | judgements | ties | both bad | median s | agrees with reference |",
           "|---|---|---|---|---|---|"]
  for name, s in report["annotators"].items():
    median = "-" if s["median_seconds"] is None else f"{s['median_seconds']:.1f}"
    ref = (f"{pct(s['reference_agreement'])} of {s['reference_pairs']}"
           if s["reference_pairs"] else "-")
    lines.append(f"| {name} | {s['count']} | {s['ties']} | {s['both_bad']} | {median} | {ref} |")
  inter = report["inter_annotator"]
  lines.append("")
  lines.append(f"Annotator-annotator agreement: {pct(inter['agreement'])} over "
               f"{inter['comparisons']} comparisons on {inter['pairs']} doubly judged pairs "
               f"({pct(inter['decided_agreement'])} over the {inter['decided_comparisons']} "
               "where both chose a side).")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The web app.

def is_loopback(host: str) -> bool:
  """Whether `host` (an address or "localhost") only accepts connections from this machine."""
  if host.lower() == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False  # a host name: it may resolve to anything


def resolve_token(host: str, token: str | None) -> tuple[str | None, bool]:
  """The token the server will require: the one given, a new one for a non-loopback host.

  Returns:
    (token or None, whether it was generated here and so must be printed).

  Raises:
    UserError: for a token that cannot sit in a URL or is too short to be secret.
  """
  if token is not None:
    if not _TOKEN_RE.match(token):
      raise UserError("the label server token must be 16-256 characters from A-Z a-z 0-9 _ -")
    return token, False
  if is_loopback(host):
    return None, False
  return secrets.token_urlsafe(24), True


class _BadRequest(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


async def _read_json(request) -> dict:
  """The request's JSON object, read with a size limit before any parsing."""
  content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
  if content_type != "application/json":
    raise _BadRequest(415, "send the request body as application/json")
  declared = request.headers.get("content-length")
  if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
    raise _BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes")
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > MAX_BODY_BYTES:
      raise _BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes")
  try:
    data = json.loads(body.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _BadRequest(400, f"request body is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise _BadRequest(400, "request body must be a JSON object")
  return data


def _field(data: Mapping[str, Any], name: str, *, optional: bool = False, default: Any = None,
           kind: type = str) -> Any:
  if name not in data:
    if optional:
      return default
    raise _BadRequest(422, f"missing field {name!r}")
  value = data[name]
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise _BadRequest(422, f"field {name!r} must be {kind.__name__}")
  return value


def _annotator(data: Mapping[str, Any]) -> str:
  name = _field(data, "annotator").strip()
  if not name or len(name) > MAX_ANNOTATOR_CHARS or not name.isprintable():
    raise _BadRequest(422, f"field 'annotator' must be 1-{MAX_ANNOTATOR_CHARS} printable "
                      "characters")
  return name


def _check_fields(data: Mapping[str, Any], allowed: set[str]) -> None:
  extra = sorted(set(data) - allowed)
  if extra:
    raise _BadRequest(422, f"unknown field(s): {', '.join(extra)}")


def create_app(pairs: Sequence[Mapping[str, Any]], out_path: str | os.PathLike, *,
               host: str = "127.0.0.1", token: str | None = None, double_share: float = 0.1,
               seed: int = 0, lease_seconds: float = DEFAULT_LEASE_SECONDS,
               clock: Callable[[], float] = time.monotonic):
  """The Starlette app of the labelling page (see the module docstring).

  Args:
    pairs: pairs to judge, {pair_id, prompt, response_a, response_b[, split]}, sides in the
      order to show them.
    out_path: the pairs.jsonl to append judgements to (and resume from).
    host: the address the server is reachable at; a non-loopback one requires `token`.
    token: the secret every request must carry; None with a loopback host means no token.
    double_share: share of the pairs that go to two annotators.
    seed: draws which pairs are doubly judged.
    lease_seconds: after this, a pair shown to an annotator who did not judge it may be
      given to another.
    clock: monotonic seconds (tests pass a fake one).

  Returns:
    The app; `app.state.session` is its `LabelSession` (closed on shutdown).

  Raises:
    UserError: a non-loopback host without a token, a bad token, bad pairs, or another
      server on the same file.
  """
  try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, RedirectResponse, Response
    from starlette.routing import Route
  except ImportError as e:
    raise UserError(_MISSING_EXTRA) from e

  def problem(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=_SECURITY_HEADERS)

  if token is None and not is_loopback(host):
    raise UserError(f"host {host!r} is reachable from other machines: it needs a token "
                    "(serve() makes one)")
  if token is not None:
    resolve_token(host, token)  # validates it
  session = LabelSession(pairs, out_path, double_share=double_share, seed=seed,
                         lease_seconds=lease_seconds, clock=clock)
  page = (_PAGE_DIR / "index.html").read_bytes()
  static = {name: (_PAGE_DIR / name).read_bytes() for name in _STATIC_FILES}
  loopback_names = {"127.0.0.1", "localhost", "[::1]", host.lower()}

  def allowed(request) -> Response | None:
    """None when the request may go on, else the refusal."""
    if token is None:
      host_header = request.headers.get("host", "")
      name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
      if name.lower() not in loopback_names:
        return problem(403, f"Host {host_header!r} is not this machine's loopback address")
      return None
    given = request.cookies.get(TOKEN_COOKIE) or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
      given = auth[7:].strip()
    if request.url.path == "/" and "token" in request.query_params:
      given = request.query_params["token"]
    if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
      return problem(401, "missing or wrong token: open the URL with ?token=... that the "
                     "server printed when it started")
    return None

  async def index(request):
    if (refusal := allowed(request)) is not None:
      return refusal
    if token is not None and "token" in request.query_params:
      # Keep the token out of the address bar and history: a cookie carries it from now on.
      response = RedirectResponse("/", status_code=303, headers=_SECURITY_HEADERS)
      response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
      return response
    return Response(page, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)

  async def static_file(request):
    if (refusal := allowed(request)) is not None:
      return refusal
    name = request.path_params["name"]
    if name not in static:
      return problem(404, f"no static file {name!r}")
    return Response(static[name], media_type=_STATIC_FILES[name], headers=_SECURITY_HEADERS)

  async def favicon(request):
    # Browsers ask for it on their own; an empty answer keeps their consoles free of 404s.
    return allowed(request) or Response(status_code=204, headers=_SECURITY_HEADERS)

  def endpoint(fields: set[str], action: Callable[[dict], dict]):
    async def handle(request):
      if (refusal := allowed(request)) is not None:
        return refusal
      try:
        data = await _read_json(request)
        _check_fields(data, fields)
        view = await run_in_threadpool(action, data)
      except _BadRequest as e:
        return problem(e.status, e.message)
      except Conflict as e:
        name = _annotator(data)
        view = await run_in_threadpool(session.next, name)
        return JSONResponse({"error": str(e), "state": view}, status_code=409,
                            headers=_SECURITY_HEADERS)
      return JSONResponse(view, headers=_SECURITY_HEADERS)
    return handle

  def do_next(data):
    return session.next(_annotator(data), retry_skipped=_field(
        data, "retry_skipped", optional=True, default=False, kind=bool))

  def do_judge(data):
    name, pair_id = _annotator(data), _field(data, "pair_id")
    choice = _field(data, "choice")
    if choice not in CHOICES:
      raise _BadRequest(422, f"field 'choice' must be one of {', '.join(CHOICES)}")
    note = _field(data, "note", optional=True, default="")
    if len(note) > MAX_NOTE_CHARS:
      raise _BadRequest(422, f"field 'note' is over {MAX_NOTE_CHARS} characters")
    return session.judge(name, pair_id, choice, note.strip())

  def do_skip(data):
    return session.skip(_annotator(data), _field(data, "pair_id"))

  def do_undo(data):
    return session.undo(_annotator(data), _field(data, "pair_id"))

  async def summary(request):
    if (refusal := allowed(request)) is not None:
      return refusal
    return JSONResponse(annotator_report(session.rows()), headers=_SECURITY_HEADERS)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    session.close()

  app = Starlette(routes=[
      Route("/", index, methods=["GET"]),
      Route("/static/{name}", static_file, methods=["GET"]),
      Route("/favicon.ico", favicon, methods=["GET"]),
      Route("/api/next", endpoint({"annotator", "retry_skipped"}, do_next), methods=["POST"]),
      Route("/api/judge", endpoint({"annotator", "pair_id", "choice", "note"}, do_judge),
            methods=["POST"]),
      Route("/api/skip", endpoint({"annotator", "pair_id"}, do_skip), methods=["POST"]),
      Route("/api/undo", endpoint({"annotator", "pair_id"}, do_undo), methods=["POST"]),
      Route("/api/summary", summary, methods=["GET"]),
  ], lifespan=lifespan)
  app.state.session = session
  return app


def page_url(host: str, port: int, token: str | None) -> str:
  """The URL to open: the host as given (loopback shown as 127.0.0.1), with the token."""
  shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
  if ":" in shown and not shown.startswith("["):
    shown = f"[{shown}]"
  return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(pairs: Sequence[Mapping[str, Any]], out_path: str | os.PathLike, *,
          host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          double_share: float = 0.1, seed: int = 0,
          lease_seconds: float = DEFAULT_LEASE_SECONDS,
          announce: Callable[[str], None] = print) -> None:
  """Serves the labelling page until Ctrl-C (or SIGTERM); judgements go to `out_path`.

  Prints the URL once (with the token when one is needed: it is printed nowhere else; the
  access log is off so it does not reappear there). Returns after a clean shutdown.
  """
  try:
    import uvicorn
  except ImportError as e:
    raise UserError(_MISSING_EXTRA) from e
  token, _ = resolve_token(host, token)
  app = create_app(pairs, out_path, host=host, token=token, double_share=double_share,
                   seed=seed, lease_seconds=lease_seconds)
  session = app.state.session
  elsewhere = "" if is_loopback(host) else "; from other machines use this machine's address"
  announce(f"Labelling page: {page_url(host, port, token)}  ({len(session.pairs)} pairs; "
           f"judgements go to {session.out_path}{elsewhere}; Ctrl-C stops)")
  try:
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
  finally:
    session.close()
