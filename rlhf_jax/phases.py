"""The phase table: every phase's name and the function that runs it.

Kept apart from `main.py` so that code which runs phases (the pipeline, tests) never imports the
binary's module a second time: `python -m rlhf_jax.main` runs it as `__main__`, and importing
`rlhf_jax.main` again would define its absl flags twice.
"""

import importlib
import pathlib

# phase -> "module:function"; each function takes (config, workdir: pathlib.Path).
PHASES = {
    "pipeline": "rlhf_jax.pipeline:run",
    "init": "rlhf_jax.convert:run_init",
    "import": "rlhf_jax.convert:run_import",
    "export": "rlhf_jax.convert:run_export",
    "generate": "rlhf_jax.generate:run",
    "sft": "rlhf_jax.training.sft:run",
    "reward": "rlhf_jax.training.reward:run",
    "ppo": "rlhf_jax.training.ppo:run",
    "eval": "rlhf_jax.evaluation.evaluate:run",
}
ALIASES = {"test": "eval"}


def canonical(phase: str) -> str:
  """The phase's name in PHASES (resolves aliases such as test = eval)."""
  return ALIASES.get(phase, phase)


def run_phase(phase: str, config, workdir: pathlib.Path) -> None:
  """Runs one phase (or the pipeline) by name with its config, writing under `workdir`."""
  module_name, function = PHASES[canonical(phase)].split(":")
  getattr(importlib.import_module(module_name), function)(config, workdir)
