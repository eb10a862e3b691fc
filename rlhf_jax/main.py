"""The rlhf-jax binary: one entry point for every phase (interface: CLI.md in the docs).

  python -m rlhf_jax.main [--phase=PHASE] [--config=configs/FILE.py] [--config.KEY=VALUE ...] [--workdir=DIR]

Without --phase it runs the whole pipeline on the built-in default, offline. Without --config a phase
uses its own default config file, `configs/PHASE.py` (so `--config.KEY=...` overrides still work).
Mistakes a user can fix end with one line on stderr and exit status 2, not a traceback.
"""

import contextlib
import importlib.resources
import io
import logging as std_logging
from logging import handlers as std_handlers
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rlhf_jax.errors import UserError
from rlhf_jax.phases import PHASES, canonical, run_phase  # noqa: F401 (run_phase: the API)


# Defined for absl's parsing and --help; the phase is read from argv before absl parses it (it
# picks the default config file), so the flag's value is never read.
flags.DEFINE_string(
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
    if "Error whilst parsing config file" in str(e):  # config_flags wraps the file's traceback.
      _fail(f"--config={config_path}: {str(e).strip().splitlines()[-1]}")
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


# The log file in the workdir: everything at INFO and above, whatever reaches the console.
LOG_FILE = "log.txt"
# Where this package's own code lives: its warnings reach the console, other libraries' do not.
_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent)


def _is_own_or_serious(record: std_logging.LogRecord) -> bool:
  """The console's filter by default: this package's warnings and anyone's errors.

  Other libraries' INFO and warnings (Orbax's save details, JAX's backend probing, transformers'
  "PyTorch was not found", Python warnings they raise) go to the log file only.
  """
  if record.levelno >= std_logging.ERROR:
    return True
  own = record.pathname.startswith(_PACKAGE_DIR) and not record.name.startswith("py.warnings")
  return own and record.levelno >= std_logging.WARNING


def _quiet_transformers() -> None:
  """Sends transformers' messages through Python logging (so to the log file) instead of its own
  stderr handler, including the one it prints while being imported ("PyTorch was not found")."""
  captured = io.StringIO()
  with contextlib.redirect_stderr(captured):  # transformers binds its handler to sys.stderr now.
    from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top
  hf_logging.disable_default_handler()
  hf_logging.enable_propagation()
  logger = std_logging.getLogger("transformers")
  origin = str(pathlib.Path(hf_logging.__file__).parents[1] / "__init__.py")
  for line in captured.getvalue().splitlines():  # Logged as coming from transformers, as it does.
    logger.handle(logger.makeRecord("transformers", std_logging.WARNING, origin, 0,
                                    line.removeprefix("[transformers] "), (), None))


def route_logs() -> std_handlers.MemoryHandler:
  """A quiet console and a complete log file.

  By default the console gets what the phases print (progress bars, one line per result), this
  package's warnings and anyone's errors; absl INFO lines and other libraries' chatter go only to
  the log file. absl's own `--verbosity=0` (INFO) or `--verbosity=1` (DEBUG) brings everything to
  the console as well. Records are buffered until `open_log_file` names the file (after
  multi-host start-up, when this process's index is known).

  Returns:
    The buffer `open_log_file` writes into the file.
  """
  verbosity = flags.FLAGS["verbosity"]
  console = logging.get_absl_handler()
  level = std_logging.INFO  # Of the log file.
  if verbosity.present:
    console.setLevel(logging.converter.absl_to_standard(verbosity.value))
    level = min(level, console.level)
  else:
    console.addFilter(_is_own_or_serious)
  logging.set_verbosity(logging.converter.standard_to_absl(level))
  std_logging.getLogger().setLevel(level)
  std_logging.captureWarnings(True)
  buffer = std_handlers.MemoryHandler(capacity=1 << 30, flushLevel=std_logging.CRITICAL + 1)
  buffer.setLevel(level)
  std_logging.getLogger().addHandler(buffer)
  _quiet_transformers()
  return buffer


def open_log_file(buffer: std_handlers.MemoryHandler, workdir: pathlib.Path) -> pathlib.Path:
  """Writes the buffered records and every later one to WORKDIR/log.txt (process 0) or
  WORKDIR/log.process{i}.txt (other processes of a multi-host job); returns its path."""
  import jax  # pylint: disable=g-import-not-at-top  (slow; after flags and logging are set)
  index = jax.process_index()
  path = workdir / (LOG_FILE if index == 0 else f"log.process{index}.txt")
  workdir.mkdir(parents=True, exist_ok=True)
  file_handler = std_logging.FileHandler(path, encoding="utf-8")
  file_handler.setFormatter(logging.PythonFormatter())
  file_handler.setLevel(buffer.level)
  root = std_logging.getLogger()
  buffer.setTarget(file_handler)
  buffer.flush()
  root.removeHandler(buffer)
  root.addHandler(file_handler)
  buffer.close()
  return path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  phase = _phase_from_argv(sys.argv)
  workdir = pathlib.Path(_WORKDIR.value)
  buffer = route_logs()
  try:
    from rlhf_jax import sharding
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    open_log_file(buffer, workdir)
    run_phase(phase, _CONFIG.value, workdir)
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail("interrupted")


def entry_point() -> None:
  # How the process starts (a malloc to preload, the devices it sees) is the launcher's business:
  # launch/local.py preloads tcmalloc where it is installed.
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry_point()
