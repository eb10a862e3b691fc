"""The labelling page in a real headless browser (Debian's chromium, driven by selenium).

The server runs as a subprocess on 127.0.0.1 (a free port) with a non-loopback host configured,
so it requires a token; nothing is sent off this machine. An annotator judges 5 pairs with the
keyboard, the server is SIGKILLed and restarted, the page resumes at pair 6, undo and a new
judgement of pair 5 work from the keyboard, and pairs.jsonl holds exactly the 5 judgements with
the sides chosen. A pair whose texts carry a script tag and
an `<img onerror>` shows them as text and runs nothing. The test saves a screenshot of the page
to docs/label_page.png.

Needs `chromium` and `chromedriver` on PATH (`apt-get install -y chromium chromium-driver`;
.ci/run installs them) and selenium (the `test` extra); skips with the reason otherwise. It
never downloads a browser: the driver and browser paths are given, so Selenium Manager is not
asked for one.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "label_page.png"
TOKEN = "test-token-0123456789abcdef"
# Configured as the server's host so the token is required; the server binds 127.0.0.1 only.
CONFIGURED_HOST = "0.0.0.0"
SCRIPT_RESPONSE = "<script>window.__labelXss = 'script ran'</script>Paris."
IMG_RESPONSE = "<img src=x onerror=\"window.__labelXss = 'onerror ran'\"> Lyon."
SCRIPT_PROMPT = "What is the capital of France? <b>bold?</b>"
PAIRS = [
    {"pair_id": "p1", "prompt": "What is 7 times 8?",
     "response_a": "7 times 8 is 56.", "response_b": "7 times 8 is 54."},
    {"pair_id": "p2", "prompt": SCRIPT_PROMPT,
     "response_a": SCRIPT_RESPONSE, "response_b": IMG_RESPONSE},
    {"pair_id": "p3", "prompt": "How many centimetres are in 3 metres?",
     "response_a": "There are 300 centimetres in 3 metres.", "response_b": "300."},
    {"pair_id": "p4", "prompt": "Spell the word 'garden' backwards.",
     "response_a": "nedrag", "response_b": "gardne"},
    {"pair_id": "p5", "prompt": "What is 15 minus 9?",
     "response_a": "15 minus 9 is 7.", "response_b": "15 minus 9 is 6."},
    {"pair_id": "p6",
     "prompt": "### Instruction:\nWhat is the boiling point of water at sea level in degrees "
               "Celsius?\n\n### Response:\n",
     "response_a": "Water boils at 100 degrees Celsius at sea level.",
     "response_b": "Water boils at 90 degrees Celsius at sea level, and at lower temperatures "
                   "higher up, because the air pressure is lower there."},
    {"pair_id": "p7", "prompt": "What is 2 plus 2?", "response_a": "4", "response_b": "5"},
    {"pair_id": "p8", "prompt": "Name a primary colour.", "response_a": "Red.",
     "response_b": "Green."},
]
# (keys pressed, expected choice, note) for pairs 1-5: digits and letters, a note typed in the
# note box and submitted with Enter from there.
JUDGEMENTS = [
    ("1", "a", ""),
    ("b", "b", ""),
    ("3", "tie", "close call"),
    ("x", "both_bad", ""),
    ("2", "b", ""),
]
SERVER = """
import sys, uvicorn
from rlhf_jax.data import label_server
pairs_path, out_path, host, token, port = sys.argv[1:6]
app = label_server.create_app(label_server.load_pairs_to_judge(pairs_path), out_path,
                              host=host, token=token, double_share=0.0, seed=0)
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)
"""


def _browser_paths():
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  driver = shutil.which("chromedriver")
  if not chromium or not driver:
    pytest.skip("no Debian chromium/chromedriver on PATH (apt-get install -y chromium "
                "chromium-driver); the browser test needs them and downloads nothing")
  return chromium, driver


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url, *, data=None, headers=None):
  """(status, body) of a request to the local server; no redirects are followed."""
  class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
      return None
  opener = urllib.request.build_opener(NoRedirect)
  request = urllib.request.Request(url, data=data, headers=headers or {})
  try:
    with opener.open(request, timeout=10) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


class _Server:
  """The label server as a subprocess that can be SIGKILLed and started again."""

  def __init__(self, tmp_path, port):
    self.port = port
    self.base = f"http://127.0.0.1:{port}"
    self.script = tmp_path / "server.py"
    self.script.write_text(SERVER)
    self.pairs_path = tmp_path / "to_judge.jsonl"
    self.pairs_path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    self.out_path = tmp_path / "label" / "pairs.jsonl"
    self.log = tmp_path / "server.log"
    self.process = None

  def start(self):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(self.log, "ab") as log:
      self.process = subprocess.Popen(
          [sys.executable, str(self.script), str(self.pairs_path), str(self.out_path),
           CONFIGURED_HOST, TOKEN, str(self.port)], stdout=log, stderr=subprocess.STDOUT,
          env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise AssertionError(f"label server exited: {self.log.read_text()}")
      try:
        status, _ = _request(self.base + "/", headers={"Authorization": f"Bearer {TOKEN}"})
        if status == 200:
          return
      except OSError:
        pass
      time.sleep(0.2)
    raise AssertionError(f"label server did not start in 60 s: {self.log.read_text()}")

  def kill(self):
    if self.process is not None and self.process.poll() is None:
      self.process.send_signal(signal.SIGKILL)
      self.process.wait(timeout=10)

  def rows(self):
    if not self.out_path.exists():
      return []
    return [json.loads(line) for line in self.out_path.read_text().splitlines()]


@pytest.fixture
def server(tmp_path):
  srv = _Server(tmp_path, _free_port())
  yield srv
  srv.kill()


@pytest.fixture
def browser():
  chromium, driver_path = _browser_paths()
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--window-size=1280,720", "--force-device-scale-factor=1"):
    options.add_argument(argument)
  driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
  driver.set_page_load_timeout(30)
  yield driver
  driver.quit()


def _wait_text(driver, element_id, expected, timeout=20):
  try:
    WebDriverWait(driver, timeout).until(
        lambda d: expected in d.find_element(By.ID, element_id).text)
  except TimeoutException:
    status = driver.find_element(By.ID, "status").text
    raise AssertionError(f"#{element_id} never showed {expected!r}; it shows "
                         f"{driver.find_element(By.ID, element_id).text!r}; status {status!r}")


def _keys(driver, *keys):
  ActionChains(driver).send_keys(*keys).perform()


def test_requests_without_the_token_are_refused(server):
  server.start()
  judge = json.dumps({"annotator": "mallory", "pair_id": "p1", "choice": "a"}).encode()
  json_header = {"Content-Type": "application/json"}
  assert _request(server.base + "/")[0] == 401
  assert _request(server.base + "/static/label.js")[0] == 401
  assert _request(server.base + "/api/next", data=b'{"annotator": "mallory"}',
                  headers=json_header)[0] == 401
  assert _request(server.base + "/api/judge", data=judge, headers=json_header)[0] == 401
  wrong = {**json_header, "Authorization": "Bearer wrong-token-0123456789"}
  assert _request(server.base + "/api/judge", data=judge, headers=wrong)[0] == 401
  assert _request(server.base + "/?token=wrong-token-0123456789")[0] == 401
  assert not server.out_path.exists()
  # The printed URL's token sets the cookie and redirects to a URL without it.
  status, _ = _request(server.base + f"/?token={TOKEN}")
  assert status == 303


def test_annotator_judges_with_the_keyboard_and_resumes_after_sigkill(server, browser):
  server.start()
  browser.get(server.base + f"/?token={TOKEN}")
  assert "token" not in browser.current_url  # the cookie carries it; the address bar does not
  browser.find_element(By.ID, "name").send_keys("alice", Keys.ENTER)

  for index, (key, choice, note) in enumerate(JUDGEMENTS):
    _wait_text(browser, "progress", f"Pair {index + 1} of {len(PAIRS)}")
    pair = PAIRS[index]
    assert browser.find_element(By.ID, "prompt").text == pair["prompt"].strip()
    assert browser.find_element(By.ID, "response-a").text == pair["response_a"]
    if pair["pair_id"] == "p2":
      # Untrusted text is shown as text: the tags are visible characters, no element was made
      # from them, and neither the script nor the onerror handler ran.
      assert browser.find_element(By.ID, "response-b").text == IMG_RESPONSE
      assert browser.find_element(By.ID, "prompt").text == SCRIPT_PROMPT
      for element_id in ("prompt", "response-a", "response-b"):
        assert browser.find_elements(By.CSS_SELECTOR, f"#{element_id} *") == []
      time.sleep(0.5)  # an <img src=x> would have failed to load and fired onerror by now
      assert browser.execute_script("return window.__labelXss === undefined")
      assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    _keys(browser, key)
    if note:
      _keys(browser, "n")
      _keys(browser, note, Keys.ENTER)  # Enter in the note box submits
    else:
      _keys(browser, Keys.ENTER)
    _wait_text(browser, "status", f"saved your judgement of pair {index + 1}")

  _wait_text(browser, "progress", f"Pair 6 of {len(PAIRS)}")
  assert len(server.rows()) == 5
  # Nothing failed in the page so far: no script error, no Content-Security-Policy violation.
  assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

  # Kill the server mid-round; a judgement tried while it is down is not saved and the page
  # stays on pair 6.
  server.kill()
  _keys(browser, "1", Keys.ENTER)
  _wait_text(browser, "status", "Not saved")
  assert browser.find_element(By.ID, "progress").text == f"Pair 6 of {len(PAIRS)}"
  assert len(server.rows()) == 5

  server.start()
  browser.get(server.base + "/")  # the name and the token cookie are remembered
  _wait_text(browser, "progress", f"Pair 6 of {len(PAIRS)}")
  assert browser.find_element(By.ID, "prompt").text == PAIRS[5]["prompt"].strip()
  _keys(browser, "1")  # chosen, not submitted: the screenshot shows a selection
  SCREENSHOT.parent.mkdir(exist_ok=True)
  browser.save_screenshot(str(SCREENSHOT))

  # Undo (u) withdraws the last judgement and shows pair 5 again with its choice selected;
  # Enter judges it again.
  _keys(browser, "u")
  _wait_text(browser, "status", "undid your judgement of pair 5")
  assert browser.find_element(By.ID, "progress").text == f"Pair 5 of {len(PAIRS)}"
  selected = browser.find_elements(By.CSS_SELECTOR, "button.choice.selected")
  assert [button.get_attribute("data-choice") for button in selected] == ["b"]
  assert len(server.rows()) == 4
  _keys(browser, Keys.ENTER)
  _wait_text(browser, "progress", f"Pair 6 of {len(PAIRS)}")

  rows = server.rows()
  assert len(rows) == 5
  assert [row["pair_id"] for row in rows] == ["p1", "p2", "p3", "p4", "p5"]
  for row, pair, (_, choice, note) in zip(rows, PAIRS, JUDGEMENTS):
    winner, loser = ((pair["response_b"], pair["response_a"]) if choice == "b"
                     else (pair["response_a"], pair["response_b"]))
    assert (row["chosen"], row["rejected"]) == (winner, loser), row
    assert row["judgement"] == {"both_bad": "tie"}.get(choice, choice)
    assert row["both_bad"] == (choice == "both_bad")
    assert row["note"] == note
    assert row["annotator"] == "alice" and row["labeler"] == "web"
    assert row["prompt"] == pair["prompt"] and row["seconds"] >= 0
