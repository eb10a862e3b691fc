"""The optimizer every phase uses: AdamW behind global-norm clipping, with warmup and decay.

Config section `optim` (see configs/common.py):
  lr, warmup_steps, schedule (cosine | linear | constant), end_lr_fraction,
  b1, b2, eps (1e-8 is PyTorch's default, 1e-5 the TF/lm-human-preferences one used for PPO),
  weight_decay (not applied to biases, LayerNorm parameters or embeddings), clip_norm (0 disables).
"""

import math

import flax
import jax
import optax

from rlhf_jax.errors import UserError


def _check(optim_config) -> None:
  """Rejects settings that would train in the wrong direction or not at all."""
  lr, end_fraction = float(optim_config.lr), float(optim_config.end_lr_fraction)
  if not math.isfinite(lr) or lr <= 0:
    raise UserError(f"--config.optim.lr={optim_config.lr}: the learning rate must be positive")
  if not 0 <= end_fraction <= 1:
    raise UserError(f"--config.optim.end_lr_fraction={optim_config.end_lr_fraction}: must be in "
                    "[0, 1] (the final learning rate is lr times this)")
  if int(optim_config.warmup_steps) < 0:
    raise UserError(f"--config.optim.warmup_steps={optim_config.warmup_steps}: must be >= 0")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine / linear decay to `lr * end_lr_fraction`, or constant."""
  _check(optim_config)
  lr, warmup = float(optim_config.lr), int(optim_config.warmup_steps)
  end = lr * float(optim_config.end_lr_fraction)
  decay_steps = max(total_steps - warmup, 1)
  if optim_config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim_config.end_lr_fraction))
  elif optim_config.schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif optim_config.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise UserError(f"--config.optim.schedule={optim_config.schedule}: use cosine, linear or constant")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only (kernels), as is usual for transformers."""
  # Empty subtrees (PPO's `value` when no value model is trained) must stay in the mask's tree.
  empty = flax.traverse_util.empty_node
  flat = flax.traverse_util.flatten_dict(params, keep_empty_nodes=True)
  return flax.traverse_util.unflatten_dict(
      {k: v if v is empty else k[-1] == "kernel" for k, v in flat.items()})


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  """AdamW with clipping and the schedule above (gradient accumulation lives in the train step)."""
  schedule = learning_rate_schedule(optim_config, total_steps)
  adamw = optax.adamw(schedule, b1=float(optim_config.b1), b2=float(optim_config.b2),
                      eps=float(optim_config.eps), weight_decay=float(optim_config.weight_decay),
                      mask=_decay_mask)
  clip = float(optim_config.clip_norm)
  return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def current_lr(optim_config, total_steps: int, step: jax.Array) -> jax.Array:
  """The learning rate applied at `step` (for logging)."""
  return learning_rate_schedule(optim_config, total_steps)(step)
