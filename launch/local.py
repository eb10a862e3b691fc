"""Runs the rlhf-jax binary on this machine: one process, or N processes as one multi-process job.

  python launch/local.py -- --phase=sft --config=configs/sft.py --workdir=runs/default
  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      --phase=sft --config=configs/sft.py --workdir=runs/local

One process (the default) runs `python -m rlhf_jax.main FLAGS` with this terminal. With N > 1,
each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i` (a free
port unless `--port` is given), so `jax.distributed.initialize` joins them into one job with one
global device mesh; with `--devices_per_process=D` each process sees D fake CPU devices (XLA's
`--xla_force_host_platform_device_count`). Their output lines are prefixed with `[i]`. If any
process fails, the others are stopped and the launcher exits with that status (else 0).
Used by the multi-host tests; also handy to try a multi-host setup without a cluster.

tcmalloc. XLA:CPU allocates the temporaries of each execution of a compiled step as one block
(295 MiB for the built-in SFT step, several GiB for GPT-Neo 125M at batch 4 x 256). glibc's malloc
serves a block that large with a fresh `mmap` and unmaps it on free, so every step faults in and
zeroes every page again (about 75,000 page faults per built-in SFT step, 640,000 per 125M step).
tcmalloc keeps freed pages for the next request: the 125M step runs about 30% faster, the built-in
one about 20%, at the price of keeping freed memory (125M: peak resident 7.1 GiB instead of
4.4 GiB); bench/RESULTS.md ("SFT") has the measurements, and why no glibc `mallopt` setting does the
same. A malloc has to be chosen before a process starts, so this launcher preloads tcmalloc
(`LD_PRELOAD`) into the processes it starts, never into itself, when the library is installed
(Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`), the platform is Linux and nothing else is
preloaded already. `--no-tcmalloc` or `RLHF_JAX_TCMALLOC=0` keeps the system malloc;
`RLHF_JAX_TCMALLOC=/path/to/libtcmalloc.so` names the library. Only CPU runs were measured; the
package itself never re-executes a process, so `python -m rlhf_jax.main` keeps the system malloc
unless the user preloads one (`LD_PRELOAD=... python -m rlhf_jax.main ...`).
"""

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  """A TCP port nobody listens on right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# XLA:CPU with several (fake) devices: its concurrency-optimised scheduler lets the devices of one
# process start independent collectives in different orders, which deadlocks now and then (about
# 1 run in 3 of a sharded train step on 8 fake devices, 2 cores); the plain scheduler does not.
FAKE_DEVICE_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def fake_devices_env(devices: int, env: dict[str, str] | None = None) -> dict[str, str]:
  """`env` (default: this environment) with `devices` fake CPU devices for JAX."""
  env = dict(os.environ if env is None else env)
  names = ("--xla_force_host_platform_device_count",) + tuple(
      f.split("=")[0] for f in FAKE_DEVICE_FLAGS)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(names)]
  flags += [f"--xla_force_host_platform_device_count={devices}", *FAKE_DEVICE_FLAGS]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  return env


# Set to "0" to keep the system malloc, or to the path of a tcmalloc library to preload that one.
TCMALLOC_ENV = "RLHF_JAX_TCMALLOC"
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                 "/usr/lib", "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")


def find_tcmalloc(dirs=_LIBRARY_DIRS) -> str | None:
  """The path of an installed tcmalloc shared library (the minimal one first), or None."""
  for directory in dirs:
    for name in _TCMALLOC_NAMES:
      path = pathlib.Path(directory) / name
      if path.is_file():
        return str(path)
  return None


def tcmalloc_env(env: dict[str, str], library: str | None) -> dict[str, str]:
  """A copy of `env` for a child process, with `library` in LD_PRELOAD when it should be: a
  library was found, the platform is Linux, `RLHF_JAX_TCMALLOC` is not "0", and nothing is
  preloaded already (a user's own malloc or tool is left alone)."""
  env = dict(env)
  switch = env.get(TCMALLOC_ENV, "")
  if switch == "0" or env.get("LD_PRELOAD") or not sys.platform.startswith("linux"):
    return env
  library = switch or library
  if library:
    env["LD_PRELOAD"] = library
  return env


def _stream(index: int, pipe, out) -> None:
  for line in iter(pipe.readline, ""):
    out.write(f"[{index}] {line}")
    out.flush()
  pipe.close()


def launch(num_processes: int, args: list[str], *, devices_per_process: int | None = None,
           port: int | None = None, program: list[str] | None = None,
           tcmalloc: bool = True) -> int:
  """Starts the processes and returns the job's exit status.

  Args:
    num_processes: N, processes to start. One process keeps this terminal and gets no multi-host
      flags; several stream their output with a `[i]` prefix.
    args: arguments of every process (the binary's flags).
    devices_per_process: fake CPU devices per process (None: leave the devices alone).
    port: coordinator port on 127.0.0.1 (None: a free one).
    program: the command before `args` (default: this Python running `-m rlhf_jax.main`).
    tcmalloc: preload tcmalloc into the processes when it is installed (see `tcmalloc_env`);
      this process's own environment is never changed.
  Returns:
    0 if every process succeeded, else the status of the first that failed.
  """
  program = program or [sys.executable, "-m", "rlhf_jax.main"]
  env = fake_devices_env(devices_per_process) if devices_per_process else dict(os.environ)
  if tcmalloc:
    env = tcmalloc_env(env, find_tcmalloc())
  if num_processes == 1:
    return subprocess.run(program + list(args), env=env, check=False).returncode
  address = f"127.0.0.1:{port or free_port()}"
  processes, threads = [], []
  for index in range(num_processes):
    command = program + list(args) + [f"--coordinator_address={address}",
                                      f"--num_processes={num_processes}",
                                      f"--process_id={index}"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    processes.append(process)
    thread = threading.Thread(target=_stream, args=(index, process.stdout, sys.stdout),
                              daemon=True)
    thread.start()
    threads.append(thread)
  status = 0
  remaining = set(range(num_processes))
  # Wait for all; the first failure stops the rest (a peer left waiting in a collective would hang).
  while remaining:
    for index in sorted(remaining):
      try:
        code = processes[index].wait(timeout=0.2)
      except subprocess.TimeoutExpired:
        continue
      remaining.discard(index)
      if code != 0 and status == 0:
        status = code
        print(f"[launch] process {index} exited with status {code}; stopping the others",
              file=sys.stderr, flush=True)
        for other in remaining:
          processes[other].terminate()
  for thread in threads:
    thread.join()
  return status


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="python launch/local.py [--num_processes=N] [--devices_per_process=D] [--port=P] "
            "[--no-tcmalloc] -- BINARY_FLAGS...")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="fake CPU devices per process (XLA_FLAGS); default: leave devices alone")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("--tcmalloc", action=argparse.BooleanOptionalAction, default=True,
                      help="preload tcmalloc into the processes when it is installed (default)")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="flags of python -m rlhf_jax.main")
  options = parser.parse_args(argv)
  args = options.args[1:] if options.args[:1] == ["--"] else options.args
  if options.num_processes < 1:
    parser.error("--num_processes must be at least 1")
  return launch(options.num_processes, args, devices_per_process=options.devices_per_process,
                port=options.port, tcmalloc=options.tcmalloc)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
