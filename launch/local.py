"""Runs N processes of the rlhf-jax binary on this machine as one multi-process JAX job.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      --phase=sft --config=configs/sft.py --workdir=runs/local

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i` (a free
port unless `--port` is given), so `jax.distributed.initialize` joins them into one job with one
global device mesh; with `--devices_per_process=D` each process sees D fake CPU devices (XLA's
`--xla_force_host_platform_device_count`). Output lines are prefixed with `[i]`. If any process
fails, the others are stopped and the launcher exits with that status (else 0).
Used by the multi-host tests; also handy to try a multi-host setup without a cluster.
"""

import argparse
import os
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


def _stream(index: int, pipe, out) -> None:
  for line in iter(pipe.readline, ""):
    out.write(f"[{index}] {line}")
    out.flush()
  pipe.close()


def launch(num_processes: int, args: list[str], *, devices_per_process: int | None = None,
           port: int | None = None, program: list[str] | None = None) -> int:
  """Starts the processes, streams their prefixed output and returns the job's exit status.

  Args:
    num_processes: N, processes to start.
    args: arguments of every process (the binary's flags).
    devices_per_process: fake CPU devices per process (None: leave the devices alone).
    port: coordinator port on 127.0.0.1 (None: a free one).
    program: the command before `args` (default: this Python running `-m rlhf_jax.main`).
  Returns:
    0 if every process succeeded, else the status of the first that failed.
  """
  program = program or [sys.executable, "-m", "rlhf_jax.main"]
  address = f"127.0.0.1:{port or free_port()}"
  env = fake_devices_env(devices_per_process) if devices_per_process else dict(os.environ)
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
      usage="python launch/local.py --num_processes=N [--devices_per_process=D] [--port=P] "
            "-- BINARY_FLAGS...")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="fake CPU devices per process (XLA_FLAGS); default: leave devices alone")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="flags of python -m rlhf_jax.main")
  options = parser.parse_args(argv)
  args = options.args[1:] if options.args[:1] == ["--"] else options.args
  if options.num_processes < 1:
    parser.error("--num_processes must be at least 1")
  return launch(options.num_processes, args, devices_per_process=options.devices_per_process,
                port=options.port)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
