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
