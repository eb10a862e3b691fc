"""Tests of the optimizer (rlhf_jax/training/optim.py): schedules against hand-computed values,
AdamW with clipping and kernel-only weight decay against PyTorch's, and config validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.configs import common
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.training import optim


def schedule_values(config, total_steps: int, steps) -> np.ndarray:
  schedule = optim.learning_rate_schedule(config, total_steps)
  return np.array([float(schedule(step)) for step in steps])


def test_warmup_then_cosine_matches_hand_computed_values():
  lr, warmup, total, end = 2e-3, 10, 110, 0.1
  config = common.optim(lr, warmup_steps=warmup, schedule="cosine", end_lr_fraction=end)
  steps = [0, 1, 5, 9, 10, 35, 60, 85, 109, 110, 150]

  def expected(t):
    if t < warmup:
      return lr * t / warmup
    progress = min(t - warmup, total - warmup) / (total - warmup)
    return lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress)))

  np.testing.assert_allclose(schedule_values(config, total, steps),
                             [expected(t) for t in steps], rtol=1e-6, atol=1e-12)
  # Landmarks, by hand: half-way through the decay the cosine is at the mid-point.
  np.testing.assert_allclose(schedule_values(config, total, [60]), [lr * (end + (1 - end) / 2)],
                             rtol=1e-6)


def test_warmup_then_linear_matches_hand_computed_values():
  lr, warmup, total, end = 1e-2, 4, 24, 0.25
  config = common.optim(lr, warmup_steps=warmup, schedule="linear", end_lr_fraction=end)
  steps = [0, 2, 4, 9, 14, 24, 30]
  expected = [0.0, lr / 2, lr, lr * (1 - 0.75 * 5 / 20), lr * (1 - 0.75 * 10 / 20), lr * end,
              lr * end]
  np.testing.assert_allclose(schedule_values(config, total, steps), expected, rtol=1e-6,
                             atol=1e-12)


def test_constant_and_no_warmup():
  config = common.optim(3e-4, warmup_steps=0, schedule="constant")
  np.testing.assert_allclose(schedule_values(config, 10, [0, 1, 10, 100]), [3e-4] * 4, rtol=1e-7)
  cosine = common.optim(3e-4, warmup_steps=0, schedule="cosine", end_lr_fraction=0.0)
  np.testing.assert_allclose(schedule_values(cosine, 10, [0, 5, 10]), [3e-4, 1.5e-4, 0.0],
                             rtol=1e-6, atol=1e-12)


def random_params(seed: int = 0) -> dict:
  """A real GPT-Neo parameter tree (kernels, biases, LayerNorm scales, embeddings) of noise."""
  model = gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=16, hidden_size=8, num_heads=2,
                                             max_position_embeddings=8))
  shapes = gpt_neo.param_shapes(model)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_weight_decay_only_on_kernels():
  lr, decay = 0.1, 0.5
  config = common.optim(lr, schedule="constant", weight_decay=decay)
  params = random_params()
  tx = optim.make_optimizer(config, total_steps=10)
  # Zero gradients: Adam's step is 0, so only decoupled weight decay moves a parameter.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  after = optax.apply_updates(params, updates)
  decayed = []
  for path, value in jax.tree_util.tree_leaves_with_path(after):
    name = jax.tree_util.keystr(path)
    before = params
    for key in path:
      before = before[key.key]
    if name.endswith("['kernel']"):
      decayed.append(name)
      np.testing.assert_allclose(value, before * (1 - lr * decay), rtol=1e-6, err_msg=name)
    else:  # biases, LayerNorm scale/bias, token and position embeddings
      np.testing.assert_array_equal(value, before, err_msg=name)
  assert sorted(decayed) == sorted(
      f"['h']['{block}']['{layer}']['kernel']" for block, layer in [
          ("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "out_proj"),
          ("mlp", "c_fc"), ("mlp", "c_proj")])


def test_weight_decay_accepts_an_empty_subtree():
  """PPO without a value model keeps `value: {}` beside the policy in the optimised tree."""
  lr, decay = 0.1, 0.5
  tx = optim.make_optimizer(common.optim(lr, schedule="constant", weight_decay=decay), 10)
  params = {"policy": random_params(), "value": {}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  after = optax.apply_updates(params, updates)
  assert after["value"] == {}
  kernel = params["policy"]["h"]["mlp"]["c_fc"]["kernel"]
  np.testing.assert_allclose(after["policy"]["h"]["mlp"]["c_fc"]["kernel"],
                             kernel * (1 - lr * decay), rtol=1e-6)


def test_adamw_with_clipping_matches_pytorch():
  """Our optimizer against torch.optim.AdamW + clip_grad_norm_, kernels in the decayed group and
  the learning rate set by hand each step; gradients of changing norms make clipping matter."""
  import torch
  lr, warmup, total, end, decay, clip = 1e-2, 2, 6, 0.1, 0.1, 1.0
  config = common.optim(lr, warmup_steps=warmup, schedule="cosine", end_lr_fraction=end,
                        b1=0.9, b2=0.95, eps=1e-8, weight_decay=decay, clip_norm=clip)
  params = random_params(seed=1)
  tx = optim.make_optimizer(config, total)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  tensors = [torch.tensor(np.array(value), requires_grad=True) for _, value in flat]
  groups = [
      {"params": [t for n, t in zip(names, tensors) if n.endswith("['kernel']")],
       "weight_decay": decay},
      {"params": [t for n, t in zip(names, tensors) if not n.endswith("['kernel']")],
       "weight_decay": 0.0}]
  torch_opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)

  def lr_at(t):
    if t < warmup:
      return lr * t / warmup
    progress = (t - warmup) / (total - warmup)
    return lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress)))

  rng = np.random.default_rng(2)
  norms_seen = []
  for t, scale in enumerate([5.0, 0.3, 2.0, 0.05, 8.0, 1.0]):
    grads = [(scale * rng.normal(size=x.shape) / math.sqrt(len(flat) * x.size)).astype(np.float32)
             for _, x in flat]
    norms_seen.append(math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)))
    updates, opt_state = update(jax.tree_util.tree_unflatten(treedef, grads), opt_state, params)
    params = optax.apply_updates(params, updates)
    for tensor, grad in zip(tensors, grads):
      tensor.grad = torch.tensor(grad)
    torch.nn.utils.clip_grad_norm_(tensors, clip)
    for group in torch_opt.param_groups:
      group["lr"] = lr_at(t)
    torch_opt.step()
  assert min(norms_seen) < clip < max(norms_seen)  # Some steps clipped, some not.
  for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(params), tensors):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "--config.optim.lr=0.0"),
    ("lr", -1e-3, "--config.optim.lr=-0.001"),
    ("lr", float("nan"), "--config.optim.lr=nan"),
    ("schedule", "exponential", "--config.optim.schedule=exponential"),
    ("end_lr_fraction", -0.5, "--config.optim.end_lr_fraction=-0.5"),
    ("end_lr_fraction", 2.0, "--config.optim.end_lr_fraction=2.0"),
    ("warmup_steps", -3, "--config.optim.warmup_steps=-3"),
])
def test_bad_settings_are_user_errors(field, value, message):
  config = common.optim(1e-3)
  config[field] = value
  with pytest.raises(UserError, match=message.replace(".", r"\.")):
    optim.make_optimizer(config, total_steps=100)


def applied_learning_rates(tx, updates_count: int, weight_decay: float) -> np.ndarray:
  """The learning rate each of `updates_count` real updates of `tx` applied.

  With zero gradients Adam's step is 0, so an update only decays the weight:
  p <- p - lr_t * weight_decay * p, and lr_t = -(change) / (weight_decay * p).
  """
  params = {"kernel": jnp.ones((4,), jnp.float32)}
  zeros = jax.tree.map(jnp.zeros_like, params)

  def step(carry, _):
    params, opt_state = carry
    updates, opt_state = tx.update(zeros, opt_state, params)
    lr = -updates["kernel"][0] / (weight_decay * params["kernel"][0])
    return (optax.apply_updates(params, updates), opt_state), lr

  _, lrs = jax.lax.scan(step, (params, tx.init(params)), None, length=updates_count)
  return np.asarray(lrs, np.float64)


def test_num_updates_counts_epochs_and_minibatches():
  assert optim.num_updates(60, 4, 2) == 480
  assert optim.num_updates(7) == 7
  with pytest.raises(UserError, match="minibatches=0"):
    optim.num_updates(60, 4, 0)


def test_linear_schedule_sized_in_updates_ends_at_the_last_ppo_update():
  """60 iterations x 4 epochs x 2 minibatches = 480 updates, warmup 16 updates: the learning rate
  the real optimizer applies climbs for 16 updates, decays linearly to the end over the rest, and
  the last update (index 479) is the last one above the end value."""
  lr, warmup, decay = 1e-3, 16, 0.1
  config = common.optim(lr, warmup_steps=warmup, schedule="linear", end_lr_fraction=0.0,
                        weight_decay=decay, clip_norm=0.0)
  total = optim.num_updates(60, epochs=4, minibatches=2)
  applied = applied_learning_rates(optim.make_optimizer(config, total), total, decay)
  u = np.arange(total)
  expected = np.where(u < warmup, lr * u / warmup, lr * (total - u) / (total - warmup))
  np.testing.assert_allclose(applied, expected, rtol=2e-3, atol=1e-9)
  assert applied[warmup] == pytest.approx(lr, rel=1e-3)  # warmup ends after 16 updates
  assert applied[-1] == pytest.approx(lr / (total - warmup), rel=2e-3) and applied[-1] > 0
  schedule = optim.learning_rate_schedule(config, total)
  assert float(schedule(total)) == 0.0  # the end, reached at the count after the last update
  # The audit's defect: sized in iterations, the same schedule is over at update 60 (iteration
  # 7.5 of 60) and its warmup lasts 16 updates = 2 iterations, not 16.
  wrong = applied_learning_rates(optim.make_optimizer(config, 60), total, decay)
  np.testing.assert_allclose(wrong[60:], 0.0, atol=1e-9)
  assert wrong[59] > 1e-6


def test_clip_by_subtree_norm_clips_each_subtree_by_its_own_norm():
  rng = np.random.default_rng(3)
  policy = {"a": rng.normal(size=(5,)), "b": {"c": rng.normal(size=(2, 3))}}
  policy = jax.tree.map(lambda x: (0.5 * x / np.sqrt(sum(np.sum(y ** 2) for y in
                                                           jax.tree.leaves(policy)))), policy)
  value = {"w": (100.0 * rng.normal(size=(4,)))}
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), {"policy": policy, "value": value})
  norms = optim.subtree_norms(grads, ("policy", "value"))
  assert float(norms["policy"]) == pytest.approx(0.5, rel=1e-5)
  assert float(norms["value"]) == pytest.approx(np.linalg.norm(value["w"]), rel=1e-5)

  tx = optim.clip_by_subtree_norm(1.0, ("policy", "value"))
  clipped, _ = jax.jit(tx.update)(grads, tx.init(grads))
  # The policy's norm is under the bound: untouched, bit for bit. The value is scaled to norm 1.
  jax.tree.map(np.testing.assert_array_equal, clipped["policy"], grads["policy"])
  np.testing.assert_allclose(clipped["value"]["w"], value["w"] / np.linalg.norm(value["w"]),
                             rtol=1e-5)
  # The joint clip would have shrunk the policy's gradient ~100x: what the audit flagged.
  joint, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert float(optax.global_norm(joint["policy"])) < 0.006

  # An empty value subtree (PPO without a value model) is fine; a stray key is an error.
  empty = {"policy": grads["policy"], "value": {}}
  out, _ = tx.update(empty, tx.init(empty))
  assert out["value"] == {}
  with pytest.raises(ValueError, match="top-level keys"):
    tx.update({**grads, "extra": jnp.ones(2)}, tx.init(grads))


def test_make_optimizer_with_clip_subtrees_is_subtree_clip_then_adamw():
  config = common.optim(1e-2, schedule="constant", weight_decay=0.1, clip_norm=1.0)
  params = {"policy": random_params(4), "value": {"w": jnp.ones((3,), jnp.float32)}}
  ours = optim.make_optimizer(config, 10, clip_subtrees=("policy", "value"))
  reference = optax.chain(optim.clip_by_subtree_norm(1.0, ("policy", "value")),
                          optim.make_optimizer(_without_clip(config), 10))
  rng = np.random.default_rng(5)
  states = [tx.init(params) for tx in (ours, reference)]
  trees = [params, params]
  for scale in (0.1, 30.0, 2.0):
    grads = jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32),
                         params)
    for i, tx in enumerate((ours, reference)):
      updates, states[i] = tx.update(grads, states[i], trees[i])
      trees[i] = optax.apply_updates(trees[i], updates)
  jax.tree.map(np.testing.assert_array_equal, trees[0], trees[1])


def _without_clip(config):
  config = config.copy_and_resolve_references()
  config.clip_norm = 0.0
  return config


def test_tf_eps_form_matches_tf1_adam_and_the_docstring_equivalence():
  """eps_form="tf": TF1 AdamOptimizer's update, lr_t = lr sqrt(1 - b2^t) / (1 - b1^t),
  p -= lr_t m / (sqrt(v) + eps_hat), written out in NumPy; at update t it equals optax's
  (PyTorch-form) Adam with eps = eps_hat / sqrt(1 - b2^t)."""
  lr, b1, b2, eps_hat = 1e-2, 0.9, 0.999, 1e-3
  config = common.optim(lr, schedule="constant", b1=b1, b2=b2, eps=eps_hat, clip_norm=0.0)
  config.eps_form = "tf"
  tx = optim.make_optimizer(config, 10)
  rng = np.random.default_rng(6)
  params = {"kernel": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  state = tx.init(params)
  p, m, v = np.asarray(params["kernel"], np.float64), np.zeros(5), np.zeros(5)
  for t in range(1, 7):
    grad = rng.normal(scale=10.0 ** -rng.integers(1, 5), size=5)  # some below eps_hat
    m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad ** 2
    p = p - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps_hat)
    updates, state = tx.update({"kernel": jnp.asarray(grad, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["kernel"], p, rtol=1e-5, atol=1e-7)

  grad = jnp.asarray(rng.normal(scale=1e-4, size=5), jnp.float32)
  for t in (1, 3):
    tf_tx = optim.scale_by_tf_adam(b1, b2, eps_hat)
    torch_form = optax.scale_by_adam(b1, b2, eps=eps_hat / math.sqrt(1 - b2 ** t))
    for transform in (tf_tx, torch_form):
      state = transform.init(grad)
      for _ in range(t):
        out, state = transform.update(grad, state)
      if transform is tf_tx:
        tf_out = out
    np.testing.assert_allclose(tf_out, out, rtol=1e-5)
  config.eps_form = "keras"
  with pytest.raises(UserError, match="--config.optim.eps_form=keras"):
    optim.make_optimizer(config, 10)
