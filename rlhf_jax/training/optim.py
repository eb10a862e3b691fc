"""The optimizer every phase uses: AdamW behind global-norm clipping, with warmup and decay.

Config section `optim` (see configs/common.py):
  lr, warmup_steps, schedule (cosine | linear | constant), end_lr_fraction,
  b1, b2, eps, weight_decay (not applied to biases, LayerNorm parameters or embeddings),
  clip_norm (0 disables).

Steps are OPTIMIZER UPDATES everywhere here: `total_steps` and `warmup_steps` count calls of the
optimizer, not iterations of a phase. SFT and the reward model make one update per train step;
PPO makes epochs x minibatches per iteration (gradient accumulation stays inside one update), so
its schedule is sized with `num_updates`.

The `eps` is PyTorch's, not TensorFlow's. optax's Adam adds `eps` OUTSIDE the square root of the
bias-corrected second moment, update = m_hat / (sqrt(v_hat) + eps), exactly as torch.optim.Adam /
AdamW (default 1e-8). TF1's `tf.train.AdamOptimizer`, which lm-human-preferences used with
epsilon 1e-5, adds its "epsilon hat" to the square root of the UNcorrected moment and folds the
bias corrections into the step size: lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps_hat)
= lr * m_hat / (sqrt(v_hat) + eps_hat / sqrt(1 - b2^t)). TF's eps_hat is therefore PyTorch's eps
growing with the update count t: eps = eps_hat / sqrt(1 - b2^t), 31.6 eps_hat at t = 1 with
b2 = 0.999, 1.6 eps_hat at t = 480 (PPO's 60 x 4 x 2 updates), eps_hat only in the limit. So
eps=1e-5 here is 1e-5 in PyTorch's form, a weaker damping than lm-human-preferences' early on.
optax's `eps_root` does not give TF's form either: it is added INSIDE the square root,
m_hat / (sqrt(v_hat + eps_root) + eps), to keep Adam differentiable at v = 0. It matters where
sqrt(v_hat) is not much larger than eps: a clipped gradient of norm 1 spread over ~1e6-1e8
parameters has a per-parameter RMS of 1e-3-1e-4, so TF's early eps of 3e-4 damps the first
hundreds of updates of many parameters, and rarely used ones (embedding rows) much longer. To
reproduce lm-human-preferences, set `optim.eps_form = "tf"` (an optional key, default "pytorch";
`scale_by_tf_adam`).
"""

import math
from typing import Dict, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.errors import UserError


EPS_FORMS = ("pytorch", "tf")


def _check(optim_config) -> None:
  """Rejects settings that would train in the wrong direction or not at all."""
  eps_form = optim_config.get("eps_form", "pytorch")
  if eps_form not in EPS_FORMS:
    raise UserError(f"--config.optim.eps_form={eps_form}: use one of {', '.join(EPS_FORMS)}")
  lr, end_fraction = float(optim_config.lr), float(optim_config.end_lr_fraction)
  if not math.isfinite(lr) or lr <= 0:
    raise UserError(f"--config.optim.lr={optim_config.lr}: the learning rate must be positive")
  if not 0 <= end_fraction <= 1:
    raise UserError(f"--config.optim.end_lr_fraction={optim_config.end_lr_fraction}: must be in "
                    "[0, 1] (the final learning rate is lr times this)")
  if int(optim_config.warmup_steps) < 0:
    raise UserError(f"--config.optim.warmup_steps={optim_config.warmup_steps}: must be >= 0")


def num_updates(iterations: int, epochs: int = 1, minibatches: int = 1) -> int:
  """Optimizer updates of a run: what `total_steps` of the schedule must count.

  PPO-style phases update epochs x minibatches times per iteration. Sizing the schedule in
  iterations instead makes a linear decay over 60 iterations with 4 x 2 updates each reach its
  end at iteration 7.5, and miscounts the warmup the same way.

  Args:
    iterations: iterations (train steps) of the run.
    epochs: passes over each iteration's batch.
    minibatches: optimizer updates per pass (accumulation micro-batches are not updates).

  Returns:
    iterations * epochs * minibatches.

  Raises:
    UserError: if a count is not positive.
  """
  counts = dict(iterations=iterations, epochs=epochs, minibatches=minibatches)
  if any(int(value) < 1 for value in counts.values()):
    raise UserError("the optimizer's update count needs positive " +
                    ", ".join(f"{name}={value}" for name, value in counts.items()))
  return int(iterations) * int(epochs) * int(minibatches)


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine / linear decay to `lr * end_lr_fraction`, or constant.

  `total_steps` and `warmup_steps` count optimizer updates; the schedule is evaluated at the
  update's count before it (0 for the first), so it reaches its end value at count
  `total_steps`, right after the last update, which uses the last value above it.
  """
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


def subtree_norms(tree, keys: Sequence[str]) -> Dict[str, jax.Array]:
  """Global L2 norm of each named top-level subtree, e.g. PPO's policy and value gradients.

  Args:
    tree: a dict whose top-level keys are exactly `keys`.
    keys: subtree names.

  Returns:
    {key: float32 scalar norm} (0.0 for an empty subtree).
  """
  _check_subtree_keys(tree, keys)
  return {key: optax.global_norm(tree[key]) for key in keys}


def _check_subtree_keys(tree, keys: Sequence[str]) -> None:
  if not hasattr(tree, "keys") or set(tree.keys()) != set(keys):
    found = sorted(tree.keys()) if hasattr(tree, "keys") else type(tree).__name__
    raise ValueError(f"clipping by subtree needs a tree with top-level keys {sorted(keys)}, "
                     f"got {found}: every leaf must belong to exactly one clipped subtree")


def clip_by_subtree_norm(max_norm: float,
                         keys: Sequence[str] = ("policy", "value")) -> optax.GradientTransformation:
  """Clips each named subtree of the updates by its OWN global norm (optax's rule per subtree).

  Clipping the joint policy + value tree lets a large value-loss gradient shrink the policy's
  step (and a joint `grad_norm` hides it). Log `subtree_norms(grads, keys)` beside it: the norms
  this transform clips by.

  Args:
    max_norm: the largest norm each subtree keeps (> 0).
    keys: the top-level keys of the updates tree; each leaf must be under one of them.
  """
  clip = optax.clip_by_global_norm(max_norm)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    _check_subtree_keys(updates, keys)
    return {key: clip.update(updates[key], optax.EmptyState())[0] for key in keys}, state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_tf_adam(b1: float, b2: float, eps_hat: float) -> optax.GradientTransformation:
  """Adam's direction in TF1's `tf.train.AdamOptimizer` form (epsilon hat), without the lr.

  sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps_hat), with the uncorrected moments m, v: the
  same as optax's `scale_by_adam` with a PyTorch-form eps of eps_hat / sqrt(1 - b2^t) at update
  t (see the module docstring). State: optax's `ScaleByAdamState`.

  Args:
    b1, b2: the moments' decay rates.
    eps_hat: TF's epsilon (1e-5 in lm-human-preferences).
  """

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    step = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    updates = jax.tree.map(lambda m, v: step * m / (jnp.sqrt(v) + eps_hat), mu, nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim_config, total_steps: int,
                   clip_subtrees: Sequence[str] = ()) -> optax.GradientTransformation:
  """AdamW with clipping and the schedule above (gradient accumulation lives in the train step).

  Args:
    optim_config: the `optim` config section.
    total_steps: optimizer updates of the whole run (see `num_updates`).
    clip_subtrees: if given (e.g. ("policy", "value")), `clip_norm` applies to each of these
      top-level subtrees separately (`clip_by_subtree_norm`) instead of to the whole tree.
  """
  schedule = learning_rate_schedule(optim_config, total_steps)
  b1, b2, eps = float(optim_config.b1), float(optim_config.b2), float(optim_config.eps)
  weight_decay = float(optim_config.weight_decay)
  if optim_config.get("eps_form", "pytorch") == "tf":
    # optax.adamw's own chain with TF's Adam direction in place of scale_by_adam.
    adamw = optax.chain(scale_by_tf_adam(b1, b2, eps),
                        optax.add_decayed_weights(weight_decay, _decay_mask),
                        optax.scale_by_learning_rate(schedule))
  else:
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=_decay_mask)
  clip = float(optim_config.clip_norm)
  if clip <= 0:
    return adamw
  if clip_subtrees:
    return optax.chain(clip_by_subtree_norm(clip, tuple(clip_subtrees)), adamw)
  return optax.chain(optax.clip_by_global_norm(clip), adamw)
