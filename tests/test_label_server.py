"""Tests for rlhf_jax.data.label_server without a browser (the browser: test_label_web.py).

The app is driven through Starlette's TestClient (in process, no socket), or the session
directly from threads.
"""

import json
import pathlib
import re
import threading

import pytest

pytest.importorskip("starlette", reason="the label extra is not installed (pip install -e "
                    "'.[test]')")
pytest.importorskip("httpx", reason="httpx (Starlette's TestClient) is not installed")
from starlette.testclient import TestClient  # noqa: E402

from rlhf_jax.data import label_server, labeling  # noqa: E402
from rlhf_jax.errors import UserError  # noqa: E402

BASE = "http://127.0.0.1"  # a loopback Host header, as a browser on this machine sends


def _pairs(n):
  return [{"pair_id": f"p{i}", "prompt": f"question {i}?", "response_a": f"answer A{i}",
           "response_b": f"answer B{i}"} for i in range(1, n + 1)]


def _rows(path):
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]


class _Clock:
  """A fake monotonic clock the tests move by hand."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def out(tmp_path):
  return tmp_path / "label" / "pairs.jsonl"


def _client(pairs, out, **kwargs):
  return TestClient(label_server.create_app(pairs, out, **kwargs), base_url=BASE)


def _next(client, annotator):
  response = client.post("/api/next", json={"annotator": annotator})
  assert response.status_code == 200, response.text
  return response.json()


def _judge(client, annotator, pair_id, choice, note=""):
  return client.post("/api/judge", json={"annotator": annotator, "pair_id": pair_id,
                                         "choice": choice, "note": note})


# ---------------------------------------------------------------------------------------------
# Pairs to judge.

def test_load_pairs_to_judge(tmp_path):
  path = tmp_path / "to_judge.jsonl"
  path.write_text(json.dumps({"prompt": "p", "response_a": "x", "response_b": "y"}) + "\n\n"
                  + json.dumps({"prompt": "q", "response_a": "1", "response_b": "2",
                                "pair_id": "train:3:0-1", "split": "validation",
                                "extra": 1}) + "\n")
  first, second = label_server.load_pairs_to_judge(str(path))
  # No id given: a hash of the text, the same with the sides swapped.
  assert first["pair_id"] == label_server.content_pair_id("p", "x", "y")
  assert first["pair_id"] == label_server.content_pair_id("p", "y", "x")
  assert first["split"] == "train"
  assert second == {"pair_id": "train:3:0-1", "prompt": "q", "response_a": "1",
                    "response_b": "2", "split": "validation"}


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"prompt": "p", "response_a": "x"}', "missing field 'response_b'"),
    ('{"prompt": "p", "response_a": "x", "response_b": 3}', "field 'response_b' must be a string"),
    ('{"prompt": "p", "response_a": "x", "response_b": "x"}', "identical"),
    ('{"prompt": "p", "response_a": "x", "response_b": "y", "pair_id": "a b"}', "pair_id"),
    ('{"prompt": "p", "response_a": "x", "response_b": "y", "split": "test"}', "field 'split'"),
    ('{"prompt": "p0", "response_a": "x", "response_b": "y"}', "repeats line 1"),
])
def test_load_pairs_to_judge_names_file_and_line(tmp_path, line, message):
  path = tmp_path / "to_judge.jsonl"
  path.write_text(json.dumps({"prompt": "p0", "response_a": "x", "response_b": "y"}) + "\n"
                  + line + "\n")
  with pytest.raises(UserError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
    label_server.load_pairs_to_judge(str(path))


def test_pairs_given_in_memory_are_checked():
  pairs = _pairs(2) + [{"pair_id": "p1", "prompt": "q", "response_a": "x", "response_b": "y"}]
  with pytest.raises(UserError, match="pair 2: pair_id 'p1' repeats pair 0"):
    label_server.check_pairs(pairs)
  with pytest.raises(UserError, match="pair 0: missing field 'response_b'"):
    label_server.check_pairs([{"prompt": "q", "response_a": "x"}])
  with pytest.raises(UserError, match="no pairs to judge"):
    label_server.LabelSession([], "unused.jsonl")


def test_order_sides_and_double_share_are_seeded():
  pairs = _pairs(40)
  ordered = label_server.order_sides(pairs, seed=3)
  assert ordered == label_server.order_sides(pairs, seed=3)
  swapped = [o["response_a"] == p["response_b"] for o, p in zip(ordered, pairs)]
  assert 5 < sum(swapped) < 35  # about half
  assert [o["pair_id"] for o in ordered] == [p["pair_id"] for p in pairs]
  ids = [p["pair_id"] for p in pairs]
  doubles = label_server.double_annotated_ids(ids, 0.25, seed=1)
  assert len(doubles) == 10 and doubles <= set(ids)
  assert doubles == label_server.double_annotated_ids(list(reversed(ids)), 0.25, seed=1)
  with pytest.raises(UserError, match="double_share"):
    label_server.double_annotated_ids(ids, 1.5, seed=1)


# ---------------------------------------------------------------------------------------------
# Judging, writing, resuming.

def test_judgements_are_written_with_the_chosen_side_and_read_by_the_reward_reader(out):
  pairs = _pairs(5)
  pairs[4]["split"] = "validation"
  with _client(pairs, out, double_share=0.0) as client:
    view = _next(client, "ann")
    assert view["pair"]["position"] == 1 and view["total"] == 5
    for pair, choice in zip(pairs, ["a", "b", "tie", "both_bad", "b"]):
      response = _judge(client, "ann", pair["pair_id"], choice, note=f"  note {choice} ")
      assert response.status_code == 200, response.text
    assert response.json()["pair"] is None  # all judged
  rows = _rows(out)
  assert [r["pair_id"] for r in rows] == ["p1", "p2", "p3", "p4", "p5"]
  assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["judgement"]) == (
      "answer A1", "answer B1", "a")
  assert (rows[1]["chosen"], rows[1]["rejected"], rows[1]["judgement"]) == (
      "answer B2", "answer A2", "b")
  assert (rows[2]["judgement"], rows[2]["both_bad"]) == ("tie", False)
  assert (rows[3]["judgement"], rows[3]["both_bad"]) == ("tie", True)
  assert rows[0]["note"] == "note a" and rows[0]["labeler"] == "web"
  assert all(r["annotator"] == "ann" and r["seconds"] >= 0 for r in rows)
  # The reward phase's reader takes the file as it is: ties (both bad too) left out.
  train, heldout, stats = labeling.load_judged_pairs(str(out))
  assert [p["pair_id"] for p in train] == ["p1", "p2"] and [p["pair_id"] for p in heldout] == ["p5"]
  assert stats["ties"] == {"train": 2}
  assert [labeling.shown_sides(r) for r in rows[:2]] == [("answer A1", "answer B1"),
                                                         ("answer A2", "answer B2")]


def test_resumes_after_restart_and_cuts_a_torn_line(out):
  pairs = _pairs(6)
  with _client(pairs, out) as client:
    _next(client, "ann")
    for pid in ("p1", "p2", "p3"):
      assert _judge(client, "ann", pid, "a").status_code == 200
  # A write that never returned (killed mid-line): not confirmed, so cut on restart.
  with open(out, "ab") as f:
    f.write(b'{"pair_id": "p4", "annot')
  with _client(pairs, out) as client:
    assert _next(client, "ann")["pair"]["pair_id"] == "p4"
    assert _next(client, "bob")["pair"]["pair_id"] == "p5"  # p4 is ann's now
  assert [r["pair_id"] for r in _rows(out)] == ["p1", "p2", "p3"]
  assert out.read_bytes().endswith(b"\n")


def test_a_rewrite_killed_before_its_rename_leaves_the_judgements_in_force(out):
  with _client(_pairs(3), out) as client:
    _next(client, "ann")
    _judge(client, "ann", "p1", "a")
  # An undo killed after writing its temp copy and before the atomic rename.
  out.with_name("pairs.jsonl.tmp").write_text("")
  with _client(_pairs(3), out) as client:
    view = _next(client, "ann")
    assert view["pair"]["pair_id"] == "p2" and view["undo_pair_id"] == "p1"
  assert [r["pair_id"] for r in _rows(out)] == ["p1"]
  assert not out.with_name("pairs.jsonl.tmp").exists()


def test_a_bad_line_inside_the_file_is_an_error_naming_it(out):
  out.parent.mkdir(parents=True)
  out.write_text('{"pair_id": "p1", "annotator": "a", "judgement": "a"}\nnot json\n')
  with pytest.raises(UserError, match=re.escape(f"{out}:2: not a JSON line")):
    label_server.create_app(_pairs(2), out)


def test_a_second_server_on_the_same_file_is_refused(out):
  app = label_server.create_app(_pairs(2), out)
  with pytest.raises(UserError, match="another label server"):
    label_server.create_app(_pairs(2), out)
  app.state.session.close()
  label_server.create_app(_pairs(2), out).state.session.close()


# ---------------------------------------------------------------------------------------------
# Bad and forged requests: a 4xx with a message, nothing on disk.

@pytest.mark.parametrize("kwargs, status, message", [
    ({"content": b"annotator=ann", "headers": {"Content-Type": "text/plain"}}, 415, "json"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
     "not valid JSON"),
    ({"json": ["a", "list"]}, 400, "JSON object"),
    ({"json": {"annotator": "ann", "pair_id": "p1"}}, 422, "missing field 'choice'"),
    ({"json": {"annotator": "ann", "pair_id": "p1", "choice": "c"}}, 422, "field 'choice'"),
    ({"json": {"annotator": "ann", "pair_id": 1, "choice": "a"}}, 422, "field 'pair_id'"),
    ({"json": {"annotator": "", "pair_id": "p1", "choice": "a"}}, 422, "field 'annotator'"),
    ({"json": {"annotator": "x" * 65, "pair_id": "p1", "choice": "a"}}, 422,
     "field 'annotator'"),
    ({"json": {"annotator": "ann", "pair_id": "p1", "choice": "a", "note": "n" * 2001}}, 422,
     "field 'note'"),
    ({"json": {"annotator": "ann", "pair_id": "p1", "choice": "a", "winner": "a"}}, 422,
     "unknown field(s): winner"),
    ({"json": {"annotator": "ann", "pair_id": "p1", "choice": "a", "note": "n" * 20000}}, 413,
     "over 16384 bytes"),
])
def test_malformed_or_oversized_requests_get_4xx_and_write_nothing(out, kwargs, status, message):
  with _client(_pairs(3), out) as client:
    assert _next(client, "ann")["pair"]["pair_id"] == "p1"
    response = client.post("/api/judge", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert _next(client, "ann")["pair"]["pair_id"] == "p1"  # still assigned, still unjudged
  assert not out.exists()


def test_an_oversized_body_without_content_length_is_refused(out):
  def chunks():  # a streamed body: no Content-Length header to check first
    for _ in range(40):
      yield b" " * 1024
  with _client(_pairs(2), out) as client:
    _next(client, "ann")
    response = client.post("/api/judge", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
  assert not out.exists()


def test_forged_pair_ids_are_refused(out):
  with _client(_pairs(4), out, double_share=0.0) as client:
    assert _next(client, "ann")["pair"]["pair_id"] == "p1"
    assert _next(client, "bob")["pair"]["pair_id"] == "p2"
    # Another annotator's pair, an unassigned pair, an unknown id: refused, nothing written.
    for pid in ("p2", "p4", "no-such-pair"):
      response = _judge(client, "ann", pid, "a")
      assert response.status_code == 409, response.text
      assert response.json()["state"]["pair"]["pair_id"] == "p1"  # what to show instead
    assert not out.exists()
    assert _judge(client, "ann", "p1", "b").status_code == 200
    # A judged pair cannot be judged again (it is no longer assigned), nor undone by others.
    assert _judge(client, "ann", "p1", "a").status_code == 409
    response = client.post("/api/undo", json={"annotator": "bob", "pair_id": "p1"})
    assert response.status_code == 409
  assert [(r["pair_id"], r["judgement"]) for r in _rows(out)] == [("p1", "b")]


# ---------------------------------------------------------------------------------------------
# Skip, undo, leases, double annotation.

def test_skip_and_undo(out):
  with _client(_pairs(3), out, double_share=0.0) as client:
    assert _next(client, "ann")["pair"]["pair_id"] == "p1"
    view = client.post("/api/skip", json={"annotator": "ann", "pair_id": "p1"}).json()
    assert view["pair"]["pair_id"] == "p2" and view["skipped"] == 1
    assert _next(client, "bob")["pair"]["pair_id"] == "p1"  # a skipped pair goes to others
    view = _judge(client, "ann", "p2", "b", note="first try").json()
    assert view["undo_pair_id"] == "p2" and view["pair"]["pair_id"] == "p3"
    view = client.post("/api/undo", json={"annotator": "ann", "pair_id": "p2"}).json()
    # The undone pair is shown again with the earlier choice; the file no longer holds it,
    # the undone log does.
    assert view["pair"]["pair_id"] == "p2"
    assert view["previous"] == {"choice": "b", "note": "first try"}
    assert _rows(out) == []
    undone = _rows(out.with_name("pairs.undone.jsonl"))
    assert [(r["pair_id"], r["judgement"]) for r in undone] == [("p2", "b")]
    assert _judge(client, "ann", "p2", "a").status_code == 200
    view = _judge(client, "ann", "p3", "a").json()
    assert view["pair"] is None and view["skipped"] == 1
    # Nothing else left: the skipped pair comes back on request, unless bob judged it.
    assert _judge(client, "bob", "p1", "tie").status_code == 200
    view = client.post("/api/next", json={"annotator": "ann", "retry_skipped": True}).json()
    assert view["pair"] is None
  assert [(r["pair_id"], r["annotator"], r["judgement"]) for r in _rows(out)] == [
      ("p2", "ann", "a"), ("p3", "ann", "a"), ("p1", "bob", "tie")]


def test_an_abandoned_pair_is_reassigned_after_its_lease(out):
  clock = _Clock()
  with _client(_pairs(2), out, double_share=0.0, lease_seconds=60, clock=clock) as client:
    assert _next(client, "ann")["pair"]["pair_id"] == "p1"
    assert _next(client, "bob")["pair"]["pair_id"] == "p2"
    assert _next(client, "cat")["pair"] is None  # both leased
    clock.now += 61
    assert _next(client, "cat")["pair"]["pair_id"] == "p1"
    clock.now += 5
    assert _judge(client, "cat", "p1", "a").status_code == 200
    # ann comes back: the pair needs no more judgements, the page is told and moves on.
    response = _judge(client, "ann", "p1", "b")
    assert response.status_code == 409 and "needs no more judgements" in response.json()["error"]
  rows = _rows(out)
  assert [(r["pair_id"], r["annotator"]) for r in rows] == [("p1", "cat")]
  assert rows[0]["seconds"] == 5.0  # from showing the pair to the judgement, server-timed


def test_doubly_judged_pairs_go_to_two_different_annotators(out):
  with _client(_pairs(4), out, double_share=1.0) as client:
    for name in ("ann", "bob", "cat"):
      view = _next(client, name)
      while view["pair"] is not None:
        view = _judge(client, name, view["pair"]["pair_id"], "a").json()
  rows = _rows(out)
  judged = {}
  for row in rows:
    judged.setdefault(row["pair_id"], []).append(row["annotator"])
  assert judged == {f"p{i}": ["ann", "bob"] for i in range(1, 5)}


def test_concurrent_annotators_never_judge_a_single_pair_twice(out):
  pairs = _pairs(60)
  doubles = label_server.double_annotated_ids([p["pair_id"] for p in pairs], 0.2, seed=0)
  errors = []
  with _client(pairs, out, double_share=0.2, seed=0) as client:
    def annotate(name, choice):
      try:
        view = _next(client, name)
        while view["pair"] is not None:
          response = _judge(client, name, view["pair"]["pair_id"], choice)
          if response.status_code not in (200, 409):
            errors.append(response.text)
            return
          view = response.json() if response.status_code == 200 else response.json()["state"]
      except Exception as e:  # noqa: BLE001 - reported below
        errors.append(repr(e))
    threads = [threading.Thread(target=annotate, args=(f"ann{i}", "ab"[i % 2])) for i in range(4)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join(timeout=120)
  assert not errors
  rows = _rows(out)  # every line parses: the file is valid JSON Lines
  judged = {}
  for row in rows:
    judged.setdefault(row["pair_id"], []).append(row["annotator"])
  assert set(judged) == {p["pair_id"] for p in pairs}
  for pid, names in judged.items():
    assert len(names) == len(set(names)) == (2 if pid in doubles else 1), (pid, names)
  assert len(rows) == 60 + len(doubles)
  labeling.load_judged_pairs(str(out))  # and the reward reader accepts it


def test_session_from_threads_directly(out):
  """The lock, not the HTTP layer, is what keeps threads apart: hammer the session itself."""
  session = label_server.LabelSession(_pairs(200), out, double_share=0.0)
  try:
    def annotate(name):
      view = session.next(name)
      while view["pair"] is not None:
        view = session.judge(name, view["pair"]["pair_id"], "a")
    threads = [threading.Thread(target=annotate, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join(timeout=120)
  finally:
    session.close()
  ids = [r["pair_id"] for r in _rows(out)]
  assert sorted(ids) == sorted(p["pair_id"] for p in _pairs(200))


# ---------------------------------------------------------------------------------------------
# Security.

def test_non_loopback_host_needs_a_token(out):
  with pytest.raises(UserError, match="needs a token"):
    label_server.create_app(_pairs(2), out, host="0.0.0.0")
  with pytest.raises(UserError, match="token must be"):
    label_server.create_app(_pairs(2), out, host="0.0.0.0", token="short")
  token, generated = label_server.resolve_token("0.0.0.0", None)
  assert generated and len(token) >= 32
  assert label_server.resolve_token("127.0.0.1", None) == (None, False)
  assert label_server.resolve_token("localhost", None) == (None, False)
  assert not label_server.is_loopback("example.org")
  assert label_server.is_loopback("::1")


def test_every_request_must_carry_the_token(out):
  token = "a-secret-token-0123456789"
  body = {"annotator": "ann", "pair_id": "p1", "choice": "a"}
  with TestClient(label_server.create_app(_pairs(2), out, host="0.0.0.0", token=token),
                  base_url="http://192.0.2.7:8765") as client:
    for method, path in (("get", "/"), ("get", "/static/label.js"), ("get", "/api/summary")):
      assert getattr(client, method)(path).status_code == 401
    assert client.post("/api/next", json={"annotator": "ann"}).status_code == 401
    assert client.post("/api/judge", json=body).status_code == 401
    bad = {"Authorization": "Bearer not-the-token-0123456789"}
    assert client.post("/api/judge", json=body, headers=bad).status_code == 401
    assert client.get("/?token=not-the-token-0123456789").status_code == 401
    assert not out.exists()
    good = {"Authorization": f"Bearer {token}"}
    assert client.post("/api/next", json={"annotator": "ann"}, headers=good).status_code == 200
    # The printed URL: sets an HttpOnly SameSite=Strict cookie, redirects to a clean URL.
    response = client.get(f"/?token={token}", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert client.get("/").status_code == 200  # the cookie now carries the token
    assert client.post("/api/judge", json=body).status_code == 200
  assert len(_rows(out)) == 1


def test_loopback_server_refuses_foreign_host_headers(out):
  # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example.
  with TestClient(label_server.create_app(_pairs(2), out),
                  base_url="http://evil.example:8765") as client:
    assert client.get("/").status_code == 403
    assert client.post("/api/next", json={"annotator": "ann"}).status_code == 403
  with _client(_pairs(2), out) as client:
    response = client.get("/")
    assert response.status_code == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_page_sets_untrusted_text_with_text_content_only():
  script = (pathlib.Path(label_server.__file__).parent / "label_page" / "label.js").read_text()
  script = re.sub(r"//[^\n]*", "", script)  # the code, not its comments
  assert "textContent" in script
  assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)
  html = (pathlib.Path(label_server.__file__).parent / "label_page" / "index.html").read_text()
  # No inline script or handler: the Content-Security-Policy would block them anyway.
  assert "<script>" not in html and not re.search(r"\son[a-z]+\s*=", html)


# ---------------------------------------------------------------------------------------------
# Agreement and quality.

def test_annotator_report():
  def row(pid, name, judgement, seconds, both_bad=False):
    return {"pair_id": pid, "annotator": name, "judgement": judgement, "seconds": seconds,
            "both_bad": both_bad}
  rows = [
      row("p1", "ann", "a", 2.0), row("p1", "bob", "a", 4.0),
      row("p2", "ann", "b", 6.0), row("p2", "bob", "a", 8.0),
      row("p3", "ann", "tie", 10.0), row("p3", "bob", "tie", 1.0, both_bad=True),
      row("p4", "ann", "a", 3.0),
  ]
  reference = {"p1": "a", "p2": "b", "p3": "a", "p4": "b"}
  report = label_server.annotator_report(rows, reference)
  ann, bob = report["annotators"]["ann"], report["annotators"]["bob"]
  assert (ann["count"], ann["ties"], ann["both_bad"]) == (4, 1, 0)
  assert (bob["count"], bob["ties"], bob["both_bad"]) == (3, 0, 1)
  assert ann["median_seconds"] == 4.5 and bob["median_seconds"] == 4.0
  # ann decided p1 (right), p2 (right), p4 (wrong); her tie on p3 is not compared.
  assert ann["reference_agreement"] == pytest.approx(2 / 3) and ann["reference_pairs"] == 3
  assert bob["reference_agreement"] == pytest.approx(1 / 2) and bob["reference_pairs"] == 2
  inter = report["inter_annotator"]
  # p1 agree; p2 disagree; p3 tie vs both bad: different choices.
  assert (inter["pairs"], inter["comparisons"]) == (3, 3)
  assert inter["agreement"] == pytest.approx(1 / 3)
  assert inter["decided_agreement"] == pytest.approx(1 / 2) and inter["decided_comparisons"] == 2
  assert inter["by_annotator_pair"] == {"ann|bob": {"comparisons": 3,
                                                    "agreement": pytest.approx(1 / 3)}}
  table = label_server.format_report(report)
  assert "| ann | 4 | 1 | 0 | 4.5 | 66.7% of 3 |" in table
  assert "33.3% over 3 comparisons on 3 doubly judged pairs" in table
  empty = label_server.annotator_report([])
  assert empty["inter_annotator"]["agreement"] is None and empty["annotators"] == {}


def test_summary_endpoint_reports_the_file(out):
  with _client(_pairs(2), out, double_share=1.0) as client:
    for name in ("ann", "bob"):
      view = _next(client, name)
      while view["pair"] is not None:
        view = _judge(client, name, view["pair"]["pair_id"], "a").json()
    report = client.get("/api/summary").json()
  assert report["annotators"]["ann"]["count"] == 2
  assert report["inter_annotator"]["agreement"] == 1.0


def test_load_judged_rows_keeps_every_field_and_changes_nothing(out):
  with _client(_pairs(2), out) as client:
    _next(client, "ann")
    _judge(client, "ann", "p1", "both_bad", note="both wrong")
  with open(out, "ab") as f:
    f.write(b'{"pair_id": "p2"')  # torn: left out, not cut
  before = out.read_bytes()
  (row,) = label_server.load_judged_rows(out)
  assert (row["annotator"], row["note"], row["both_bad"]) == ("ann", "both wrong", True)
  assert out.read_bytes() == before
  with pytest.raises(UserError, match="no such file"):
    label_server.load_judged_rows(out.with_name("missing.jsonl"))


def test_a_failed_write_is_cut_back_and_not_confirmed(out, monkeypatch):
  real_fsync = label_server.os.fsync
  calls = {"n": 0}

  def failing_fsync(fd):
    calls["n"] += 1
    if calls["n"] == 2:  # the second judgement's write
      raise OSError(28, "No space left on device")
    real_fsync(fd)

  monkeypatch.setattr(label_server.os, "fsync", failing_fsync)
  app = label_server.create_app(_pairs(3), out, double_share=0.0)
  with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
    _next(client, "ann")
    assert _judge(client, "ann", "p1", "a").status_code == 200
    assert _judge(client, "ann", "p2", "a").status_code == 500  # not confirmed
    assert [r["pair_id"] for r in _rows(out)] == ["p1"]  # the half-written line was cut
    assert _judge(client, "ann", "p2", "b").status_code == 200  # still assigned: try again
  assert [(r["pair_id"], r["judgement"]) for r in _rows(out)] == [("p1", "a"), ("p2", "b")]


def test_serve_prints_the_url_once_and_stops_cleanly_on_ctrl_c(tmp_path):
  pytest.importorskip("uvicorn")
  import signal
  import socket
  import subprocess
  import sys
  import time
  import urllib.error
  import urllib.request
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  token = "serve-test-token-0123456789"
  out = tmp_path / "pairs.jsonl"
  script = ("from rlhf_jax.data import label_server as ls\n"
            f"ls.serve({_pairs(3)!r}, {str(out)!r}, port={port}, token={token!r})\n"
            "print('serve returned', flush=True)\n")
  process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}/"
    deadline, status = time.monotonic() + 60, None
    while time.monotonic() < deadline and status is None:
      try:
        urllib.request.urlopen(url, timeout=5)
        status = 200
      except urllib.error.HTTPError as e:
        status = e.code
      except OSError:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    assert status == 401  # up, and the token is required even on loopback when given
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
  finally:
    process.kill()
  assert process.returncode == 0, output
  assert output.count(f"Labelling page: {url}?token={token}") == 1
  assert output.count(token) == 1  # printed once, nowhere else
  assert "serve returned" in output and "Traceback" not in output
