"""The phases: each module's `run(config, workdir)` wires library code into one phase.

The phase table is kept apart from `main.py` so that code which runs phases (the pipeline, tests)
never imports the binary's module a second time: `python -m rlhf_jax.main` runs it as `__main__`,
and importing `rlhf_jax.main` again would define its absl flags twice. Phase modules are imported
when their phase runs, so `--phase=export` never loads the PPO code.
"""

import importlib
import pathlib

# phase -> "module:function" under rlhf_jax.phases; each takes (config, workdir: pathlib.Path).
PHASES = {
    "pipeline": "pipeline:run",
    "init": "init:run",
    "import": "hf_io:run_import",
    "export": "hf_io:run_export",
    "generate": "generate:run",
    "sft": "sft:run",
    "label": "label:run",
    "reward": "reward:run",
    "ppo": "ppo:run",
    "grpo": "grpo:run",
    "dpo": "dpo:run",
    "eval": "eval:run",
}
ALIASES = {"test": "eval"}


def canonical(phase: str) -> str:
  """The phase's name in PHASES (resolves aliases such as test = eval)."""
  return ALIASES.get(phase, phase)


def output_dir(config, workdir: pathlib.Path, phase: str) -> pathlib.Path:
  """WORKDIR/NAME, where a phase writes: NAME is the config's `name` (default: the phase's own
  name), so one phase can run twice in a workdir (the pipeline's `ppo` and `ppo_gold`)."""
  return pathlib.Path(workdir) / (config.get("name") or phase)


def run_phase(phase: str, config, workdir: pathlib.Path) -> None:
  """Runs one phase (or the pipeline) by name with its config, writing under `workdir`."""
  module_name, function = PHASES[canonical(phase)].split(":")
  getattr(importlib.import_module(f"{__name__}.{module_name}"), function)(config, workdir)
