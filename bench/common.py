"""What the benchmarks share: the machine's description, the load, timers, and the real data.

The scripts in bench/ import it as `common` (their own directory is on `sys.path` when run as
`python bench/bench_X.py`).
"""

import importlib
import os
import pathlib
import platform
import resource
import subprocess
import time
from typing import Callable


def data_dir() -> pathlib.Path:
  """The real data (Dolly, HH-RLHF, the GPT-2 tokenizer): $RLHF_JAX_DATA, as for the configs, or
  else the project's shared folder beside the repository, where the recorded runs found it."""
  default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  return pathlib.Path(os.environ.get("RLHF_JAX_DATA") or default)


def cpu_name() -> str:
  """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown CPU"


def machine_description(libraries: tuple[str, ...] = ("torch", "transformers", "trl")) -> str:
  """CPU, cores, Python, jax (and its backend), and the versions of `libraries` that are installed
  (torch with its thread count): the line each benchmark prints before its tables."""
  import jax  # pylint: disable=g-import-not-at-top
  parts = [f"Python {platform.python_version()}",
           f"jax {jax.__version__} ({jax.default_backend()})"]
  for name in libraries:
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    threads = f" ({module.get_num_threads()} threads)" if name == "torch" else ""
    parts.append(f"{name} {module.__version__}{threads}")
  return f"{cpu_name()}, {os.cpu_count()} cores; " + ", ".join(parts)


def uptime() -> str:
  """`uptime`'s line: the load average, printed before and after each benchmark."""
  return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def cpu_seconds() -> float:
  """CPU time of this process (all threads, user + system)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], object]) -> float:
  """Wall seconds of one call of `fn`."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run_and_print(bench: Callable[[], list[str]], torch_threads: int) -> None:
  """Runs a benchmark that compares against PyTorch with `torch_threads` threads, printing the
  machine, the load before and after, and the benchmark's result lines."""
  import torch
  torch.set_num_threads(torch_threads)
  print(machine_description())
  print("load before:", uptime(), flush=True)
  lines = bench()
  print("load after:", uptime())
  print("\n".join(lines))
