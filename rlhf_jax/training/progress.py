"""Where training metrics go: `metrics.jsonl`, TensorBoard event files, and a console progress line.

Only process 0 writes; other processes get a writer that does nothing, so callers need no checks.
"""

import json
import math
import pathlib
import sys
import time

import jax


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors it to TensorBoard."""

  def __init__(self, phase_dir: pathlib.Path, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = phase_dir / "metrics.jsonl"
    self._tensorboard = None
    if not self.enabled:
      return
    phase_dir.mkdir(parents=True, exist_ok=True)
    self._drop_after(resume_step)
    from tensorboardX import SummaryWriter
    self._tensorboard = SummaryWriter(str(phase_dir), flush_secs=30)

  def _drop_after(self, step: int) -> None:
    """On resume, forget lines logged after the restored step (they will be logged again)."""
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    for key, value in clean.items():
      if value is not None:
        self._tensorboard.add_scalar(key, value, step)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


class Progress:
  """A console progress line: phase, step/total, a bar, chosen metrics, throughput, ETA.

  On a terminal the line updates in place; in a log file each update is its own line.
  """

  def __init__(self, phase: str, total_steps: int, start_step: int = 0, unit: str = "tok"):
    self.phase, self.total, self.unit = phase, total_steps, unit
    self.enabled = jax.process_index() == 0
    self._start_step, self._start_time = start_step, time.time()
    self._tty = sys.stdout.isatty()

  def update(self, step: int, metrics: dict[str, float], items_per_second: float | None) -> None:
    if not self.enabled:
      return
    done = step / max(self.total, 1)
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    elapsed = time.time() - self._start_time
    steps_done = max(step - self._start_step, 1)
    eta = elapsed / steps_done * (self.total - step)
    shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    rate = f" | {items_per_second:,.0f} {self.unit}/s" if items_per_second else ""
    line = (f"{self.phase} {step}/{self.total} [{bar}] {shown}{rate} | "
            f"elapsed {_format_duration(elapsed)} ETA {_format_duration(eta)}")
    print(("\r" + line) if self._tty else line, end="" if self._tty else "\n", flush=True)

  def done(self) -> None:
    if self.enabled and self._tty:
      print(flush=True)
