"""The rlhf-jax binary: one entry point for every phase (interface: CLI.md in the docs).

  python -m rlhf_jax.main [--phase=PHASE] [--config=configs/FILE.py] [--config.KEY=VALUE ...] [--workdir=DIR]

Without --phase it runs the whole pipeline on the built-in default, offline. Without --config a phase
uses its own default config file, `configs/PHASE.py` (so `--config.KEY=...` overrides still work).
Mistakes a user can fix end with one line on stderr and exit status 2, not a traceback.
"""

import importlib.resources
import logging as std_logging
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rlhf_jax import host_malloc
from rlhf_jax.errors import UserError
from rlhf_jax.phases import PHASES, canonical, run_phase  # noqa: F401 (run_phase: the API)


_PHASE = flags.DEFINE_string(
    "phase", None, f"One of {', '.join(p for p in PHASES if p != 'pipeline')} (alias: test = eval). "
    "Default: the whole pipeline.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Everything a run writes goes under it.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (default: auto-detected on "
    "TPU pods, SLURM and MPI; single process otherwise).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file: configs/FILE.py[:ARG].")


def default_config_path(phase: str) -> str:
  """The config file a phase uses when --config is not given."""
  return str(importlib.resources.files("rlhf_jax.configs") / f"{phase}.py")


def _phase_from_argv(argv: list[str]) -> str:
  phase = "pipeline"
  for i, arg in enumerate(argv):
    if arg.startswith("--phase="):
      phase = arg.split("=", 1)[1]
    elif arg == "--phase" and i + 1 < len(argv):
      phase = argv[i + 1]
  return canonical(phase)


def _fail(message: str) -> "NoReturn":
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors, and the phase's default config file filled in."""
  phase = _phase_from_argv(argv)
  if phase not in PHASES:
    _fail(f"--phase={phase}: unknown phase; choose one of "
          f"{', '.join(p for p in PHASES if p != 'pipeline')} (or omit --phase for the pipeline)")
  config_path = _config_path(argv)
  if config_path is None:
    config_path = default_config_path(phase)
    argv = argv[:1] + [f"--config={config_path}"] + argv[1:]
  if not pathlib.Path(config_path.split(":", 1)[0]).is_file():
    _fail(f"--config={config_path}: no such config file")
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value  # config_flags defers errors in the config file itself; surface them here.
    return remaining
  except flags.Error as e:
    _fail(_first_line(e))
  except (KeyError, AttributeError) as e:
    # ml_collections reports an unknown override key as just the missing name, e.g. "'x'".
    key = str(e).strip("'\" ").split("'")[0]
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if key in o[len("--config."):].split(".")] or overrides
    flag = named[0] if named else "--config"
    _fail(f"{flag}: no such key ({key!r}) in {config_path}")
  except (OSError, ValueError, TypeError) as e:
    _fail(f"--config={config_path}: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _quiet_libraries(record) -> bool:
  """Drops INFO chatter of Orbax (every save/restore detail) and JAX's backend probing."""
  noisy = "/orbax/" in record.pathname or record.name.startswith("jax._src")
  return record.levelno >= std_logging.WARNING or not noisy


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().python_handler.addFilter(_quiet_libraries)
  phase = _phase_from_argv(sys.argv)
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    from rlhf_jax import sharding
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    run_phase(phase, _CONFIG.value, workdir)
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail("interrupted")


def entry_point() -> None:
  # With tcmalloc installed, once more with it preloaded: XLA:CPU steps run 20-30% faster.
  host_malloc.reexec_with_tcmalloc(sys.argv)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry_point()
