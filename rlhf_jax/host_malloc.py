"""tcmalloc for the binary, so XLA:CPU reuses its step temporaries instead of re-mapping them.

XLA:CPU allocates the temporaries of each execution of a compiled step as one block (295 MiB for
the built-in SFT step, several GiB for GPT-Neo 125M at batch 4 x 256) from one of its worker
threads. glibc's malloc serves a block that large with a fresh `mmap` and unmaps it on free, so
every step faults in and zeroes every page again: about 75,000 page faults per built-in SFT step
and 640,000 per 125M step (`getrusage`; `strace` shows one mmap/munmap pair of the block per
step). tcmalloc keeps freed pages for the next request: with it the 125M step takes ~100 faults
and runs about 30% faster, the built-in one about 20% (bench/RESULTS.md, "SFT"). What it costs:
the process keeps the memory it freed (125M: peak resident 7.1 GiB instead of 4.4 GiB).
No mallopt setting of glibc does the same: one arena without mmap (`M_ARENA_MAX=1`,
`M_MMAP_MAX=0`) stops the faults of the built-in step but makes the 125M step 25% slower and
doubles its memory (threads contend for the one arena; the heap fragments).

A malloc has to be chosen before the process starts, so the binary re-executes itself once with
tcmalloc in `LD_PRELOAD` when the system has it (Debian/Ubuntu: `apt-get install
libtcmalloc-minimal4`) and nothing else is preloaded; `RLHF_JAX_TCMALLOC=0` keeps the system's
malloc. Without tcmalloc installed nothing changes.
"""

import os
import pathlib
import sys
from typing import Mapping, Sequence

# Set to "0" to keep the system malloc; the re-executed process finds it set to the library.
ENV_SWITCH = "RLHF_JAX_TCMALLOC"
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
         "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")


def find_tcmalloc(dirs: Sequence[str] = _DIRS) -> str | None:
  """The path of an installed tcmalloc shared library, or None."""
  for directory in dirs:
    for name in _NAMES:
      path = pathlib.Path(directory) / name
      if path.is_file():
        return str(path)
  return None


def tcmalloc_env(env: Mapping[str, str], library: str | None) -> dict[str, str] | None:
  """`env` with `library` preloaded, or None when it should stay as it is: no library, not
  Linux, switched off (`RLHF_JAX_TCMALLOC=0`), already done, or another preload present (a
  user's own malloc or tool, which is left alone)."""
  if (library is None or not sys.platform.startswith("linux") or ENV_SWITCH in env
      or env.get("LD_PRELOAD")):
    return None
  return {**env, "LD_PRELOAD": library, ENV_SWITCH: library}


def reexec_with_tcmalloc(argv: Sequence[str], module: str = "rlhf_jax.main") -> None:
  """Replaces this process by `python -m module argv[1:]` with tcmalloc preloaded, if
  `tcmalloc_env` says so; otherwise returns and the caller goes on as it is."""
  env = tcmalloc_env(os.environ, find_tcmalloc())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", module, *argv[1:]], env)
