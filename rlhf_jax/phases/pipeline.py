"""The whole pipeline (no --phase): each phase in turn in one workdir, skipping finished ones
(configs/pipeline.py lists them: init, sft, label, reward, ppo, eval)."""

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
    # An entry that is not a phase (ppo_gold) names the phase it runs.
    phases.run_phase(config[phase].get("phase", phase), config[phase], workdir)
  eval_dir = workdir / "eval"
  print(f"\npipeline: done in {time.time() - start:.0f} s. Report: {eval_dir / 'eval.md'}; "
        f"plots: {eval_dir / 'reward_by_system.png'}, {eval_dir / 'ood_robustness.png'}, "
        f"{eval_dir / 'overoptimization.png'}")
