// The labelling page. Every text that comes from the server (prompts, responses, names,
// messages) is set with textContent, never innerHTML: it is untrusted and must stay text.
"use strict";

const NAME_KEY = "rlhf_label_annotator";
const KEY_CHOICES = {"1": "a", "a": "a", "2": "b", "b": "b", "3": "tie", "t": "tie",
                     "4": "both_bad", "x": "both_bad"};
const state = {annotator: null, view: null, choice: null, busy: false};

function $(id) { return document.getElementById(id); }

function setStatus(text, isError) {
  $("status").textContent = text || "";
  $("status").classList.toggle("error", Boolean(isError));
}

async function api(path, body) {
  let response;
  try {
    response = await fetch(path, {method: "POST", credentials: "same-origin",
                                  headers: {"Content-Type": "application/json"},
                                  body: JSON.stringify(body)});
  } catch (e) {
    const error = new Error("the server cannot be reached; nothing was saved. " +
                            "Press Enter (or the button) again when it is back.");
    error.status = 0;
    throw error;
  }
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.error) || ("HTTP " + response.status));
    error.status = response.status;
    error.data = data;
    throw error;
  }
  return data;
}

function selectChoice(choice) {
  state.choice = choice;
  for (const button of document.querySelectorAll("button.choice")) {
    const selected = button.dataset.choice === choice;
    button.classList.toggle("selected", selected);
    button.setAttribute("aria-pressed", selected ? "true" : "false");
  }
  $("submit").disabled = !choice || !state.view || !state.view.pair;
}

function render(view) {
  state.view = view;
  $("who").textContent = "Annotator: " + view.annotator;
  $("login").hidden = true;
  // Keys go to the page again (not to the name or the note box) once a pair is shown.
  if (document.activeElement === $("name") || document.activeElement === $("note")) {
    document.activeElement.blur();
  }
  const pair = view.pair;
  $("work").hidden = !pair;
  $("done").hidden = Boolean(pair);
  $("undo").disabled = !view.undo_pair_id;
  $("done-undo").disabled = !view.undo_pair_id;
  if (pair) {
    $("progress").textContent = "Pair " + pair.position + " of " + view.total;
    $("prompt").textContent = pair.prompt;
    $("response-a").textContent = pair.response_a;
    $("response-b").textContent = pair.response_b;
    $("note").value = view.previous ? view.previous.note : "";
    selectChoice(view.previous ? view.previous.choice : null);
  } else {
    $("progress").textContent = "Done (" + view.judged_by_you + " judged by you)";
    $("done-skipped").hidden = !view.skipped;
    selectChoice(null);
  }
  $("progress").title = view.judgements_done + " of " + view.judgements_needed +
                        " judgements made in all";
  setStatus(view.message, false);
}

async function call(path, body) {
  if (state.busy) return;
  state.busy = true;
  try {
    render(await api(path, Object.assign({annotator: state.annotator}, body)));
  } catch (error) {
    if (error.status === 409 && error.data && error.data.state) {
      render(error.data.state);  // the server says what to show instead
    }
    setStatus("Not saved: " + error.message, true);
  } finally {
    state.busy = false;
  }
}

function currentPairId() { return state.view && state.view.pair && state.view.pair.pair_id; }

function submit() {
  if (!state.choice || !currentPairId()) return;
  call("/api/judge", {pair_id: currentPairId(), choice: state.choice,
                      note: $("note").value.trim()});
}

function skip() { if (currentPairId()) call("/api/skip", {pair_id: currentPairId()}); }

function undo() {
  if (state.view && state.view.undo_pair_id) {
    call("/api/undo", {pair_id: state.view.undo_pair_id});
  }
}

function start(name) {
  state.annotator = name;
  localStorage.setItem(NAME_KEY, name);
  call("/api/next", {});
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey || !state.annotator) return;
  const target = event.target;
  if (target.id === "note") {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); submit(); }
    else if (event.key === "Escape") { target.blur(); }
    return;
  }
  if (target.tagName === "INPUT" || target.tagName === "TEXTAREA") return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (key === "Enter") { event.preventDefault(); submit(); return; }
  if (key === "u") { event.preventDefault(); undo(); return; }
  if (!currentPairId()) return;
  if (key in KEY_CHOICES) { event.preventDefault(); selectChoice(KEY_CHOICES[key]); }
  else if (key === "n") { event.preventDefault(); $("note").focus(); }
  else if (key === "s") { event.preventDefault(); skip(); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name").value.trim();
    if (name) start(name);
  });
  for (const button of document.querySelectorAll("button.choice")) {
    button.addEventListener("click", () => { selectChoice(button.dataset.choice); button.blur(); });
  }
  $("submit").addEventListener("click", (event) => { event.target.blur(); submit(); });
  $("skip").addEventListener("click", (event) => { event.target.blur(); skip(); });
  $("undo").addEventListener("click", (event) => { event.target.blur(); undo(); });
  $("done-undo").addEventListener("click", (event) => { event.target.blur(); undo(); });
  $("retry-skipped").addEventListener("click", () => call("/api/next", {retry_skipped: true}));
  $("switch").addEventListener("click", () => {
    localStorage.removeItem(NAME_KEY);
    state.annotator = null;
    state.view = null;
    $("work").hidden = true;
    $("done").hidden = true;
    $("login").hidden = false;
    $("who").textContent = "";
    $("progress").textContent = "";
    $("name").focus();
  });
  document.addEventListener("keydown", onKey);
  const saved = localStorage.getItem(NAME_KEY);
  if (saved) {
    $("name").value = saved;
    start(saved);
  }
});
