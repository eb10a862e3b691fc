"""The whole pipeline (no --phase): each phase in turn in one workdir, skipping finished ones."""

import pathlib
import time

from rlhf_jax import phases
from rlhf_jax.errors import UserError


def run(config, workdir: pathlib.Path) -> None:
  names = [p.strip() for p in config.phases.split(",") if p.strip()]
  unknown = [p for p in names if p not in config]
  if unknown:
    raise UserError(f"--config.phases: unknown phase(s) {', '.join(unknown)}")
  start = time.time()
  for index, phase in enumerate(names, 1):
    print(f"\n=== [{index}/{len(names)}] {phase} (elapsed {time.time() - start:.0f} s) ===",
          flush=True)
    phases.run_phase(phase, config[phase], workdir)
  print(f"\npipeline: done in {time.time() - start:.0f} s. Report: {workdir / 'eval' / 'eval.md'}; "
        f"plots: {workdir / 'eval' / 'reward_by_system.png'}, "
        f"{workdir / 'eval' / 'ood_robustness.png'}")
