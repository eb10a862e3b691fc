"""SFT: the next-token loss on response tokens (training step) and its held-out sums.

The phase that runs it through the shared loop is `rlhf_jax.phases.sft`.
"""

import math

import jax
import jax.numpy as jnp

from rlhf_jax.models import gpt_neo


# Tokens whose vocabulary logits exist at once: ~64 MB of float32 logits (320 tokens for GPT-2's
# vocabulary), at most 1024 (measured best for the built-in 1024-token vocabulary).
_LOGITS_BUDGET = 1 << 24


def loss_chunk_size(vocab_size: int) -> int:
  """Tokens per chunk of the LM head in the losses below: a multiple of 64 in [64, 1024]."""
  return max(64, min(1024, _LOGITS_BUDGET // vocab_size // 64 * 64))


# The LM head runs only on `loss_mask` positions (like TRL's chunked NLL): they are sorted to the
# front and projected onto the vocabulary a chunk at a time, and chunks without any are skipped.
# The full [B, T, V] logits never exist: with prompts, padding and GPT-2's 50k vocabulary they are
# most of a step's time and memory. Values and gradients are those of the full-logits computation.


def _hidden_and_head(model: gpt_neo.GPTNeo, params, batch: dict, rng):
  """Final hidden states [B, T, D] (after ln_f) and the tied LM head [V, D], in compute dtype."""
  rngs = {} if rng is None else {"dropout": rng}
  hidden = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                       batch["positions"], deterministic=rng is None, rngs=rngs,
                       lm_head=False)["hidden"]
  # GPT-Neo's LM head is the token embedding (as in `GPTNeo.__call__`).
  return hidden, params["wte"]["embedding"].astype(hidden.dtype)


def _loss_chunks(hidden: jax.Array, batch: dict, chunk: int, groups: int):
  """Loss positions first, in chunks, per group of rows.

  The rows are split into `groups` consecutive blocks (one per batch shard: a data-parallel
  device sorts and projects only its own rows, so nothing is gathered across devices), and each
  block is sorted on its own. Chunk k holds the k-th `chunk` positions of every block.

  Returns:
    (hidden [K, G * C, D], targets int32 [K, G * C], mask float32 [K, G * C], unsort: maps
    per-position values [K, G * C] back to [B, T]).
  """
  rows, length = hidden.shape[:2]
  groups = math.gcd(rows, groups)
  size = rows // groups * length  # Positions per group.
  chunk = min(chunk, size)  # A chunk beyond the group's positions would be padding only.
  chunks = -(-size // chunk)
  mask = jnp.asarray(batch["loss_mask"], jnp.float32).reshape(groups, size)
  order = jnp.argsort(mask <= 0, axis=1, stable=True)

  def sorted_chunks(x) -> jax.Array:
    x = jnp.asarray(x)
    x = x.reshape(groups, size, *x.shape[2:])
    x = jnp.take_along_axis(x, order.reshape(groups, size, *[1] * (x.ndim - 2)), axis=1)
    x = jnp.pad(x, [(0, 0), (0, chunks * chunk - size)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(groups, chunks, chunk, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(chunks, groups * chunk, *x.shape[3:])

  def unsort(x: jax.Array) -> jax.Array:
    x = x.reshape(chunks, groups, chunk).swapaxes(0, 1).reshape(groups, chunks * chunk)[:, :size]
    out = jnp.zeros((groups, size), x.dtype).at[jnp.arange(groups)[:, None], order].set(x)
    return out.reshape(rows, length)

  return sorted_chunks(hidden), sorted_chunks(batch["targets"]), sorted_chunks(mask), unsort


def _chunk_logits(h: jax.Array, head: jax.Array, targets: jax.Array):
  """float32 logits [C, V] of a chunk, with the target logit, max logit and logsumexp [C]."""
  logits = jnp.einsum("cd,vd->cv", h, head, preferred_element_type=jnp.float32)
  target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  top = jnp.max(logits, axis=-1)
  # logsumexp - target logit: no [C, V] log-probabilities are materialised.
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
  return logits, target, top, lse


def token_losses(model: gpt_neo.GPTNeo, params, batch: dict, *, rng=None,
                 groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood and correctness of `batch["targets"]` at `loss_mask` tokens.

  Differentiable (each chunk's logits are recomputed in the backward pass, not stored); training
  uses `sft_loss`, which computes its gradient more cheaply.

  Args:
    batch: an LM batch (`input_ids`, `segment_ids`, `positions`, `targets` int32 [B, T] and
      `loss_mask` float32 [B, T]).
    rng: dropout key; None runs deterministically.
    groups: the number of batch shards (data x fsdp devices); any value gives the same result.
  Returns:
    (nll float32 [B, T], correct float32 [B, T]: the target has the highest logit, a tie counts),
    both 0 where `loss_mask` is 0.
  """
  hidden, head = _hidden_and_head(model, params, batch, rng)
  h, targets, mask, unsort = _loss_chunks(hidden, batch, loss_chunk_size(head.shape[0]), groups)

  def losses(h, targets, mask):
    _, target, top, lse = _chunk_logits(h, head, targets)
    real = mask > 0
    return jnp.where(real, lse - target, 0.0), jnp.where(real & (target >= top), 1.0, 0.0)

  @jax.checkpoint
  def chunk_losses(h, targets, mask):
    zeros = jnp.zeros(mask.shape, jnp.float32)
    return jax.lax.cond(jnp.any(mask > 0), losses, lambda *_: (zeros, zeros), h, targets, mask)

  _, (nll, correct) = jax.lax.scan(lambda carry, xs: (carry, chunk_losses(*xs)), None,
                                   (h, targets, mask))
  return unsort(nll), unsort(correct)


def _count_correct(target: jax.Array, top: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where((target >= top) & (weights != 0), 1.0, 0.0))


@jax.custom_vjp
def _weighted_nll(h: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array):
  """(sum of weights * nll, number of correct tokens with a weight) over `_loss_chunks` chunks.

  Its gradient is computed in the forward pass (`_weighted_nll_fwd`), as fused linear cross
  entropy does: the per-token weights are known there, so each chunk's logits are used once for
  the loss and the gradient, and neither stored nor recomputed.
  """
  def body(totals, xs):
    h_c, targets_c, weights_c = xs

    def compute():
      _, target, top, lse = _chunk_logits(h_c, head, targets_c)
      return jnp.sum(weights_c * (lse - target)), _count_correct(target, top, weights_c)

    zero = jnp.zeros((), jnp.float32)
    out = jax.lax.cond(jnp.any(weights_c != 0), compute, lambda: (zero, zero))
    return (totals[0] + out[0], totals[1] + out[1]), None

  zero = jnp.zeros((), jnp.float32)
  totals, _ = jax.lax.scan(body, (zero, zero), (h, targets, weights))
  return totals


def _weighted_nll_fwd(h, head, targets, weights):
  def body(carry, xs):
    loss, correct, d_head = carry
    h_c, targets_c, weights_c = xs

    def compute():
      logits, target, top, lse = _chunk_logits(h_c, head, targets_c)
      # d (weighted nll) / d logits = weight * (softmax - one_hot(target)).
      d_logits = (jnp.exp(logits - lse[:, None])
                  - jax.nn.one_hot(targets_c, head.shape[0], dtype=jnp.float32))
      d_logits = (d_logits * weights_c[:, None]).astype(h_c.dtype)
      d_h = jnp.einsum("cv,vd->cd", d_logits, head, preferred_element_type=jnp.float32)
      d_head_c = jnp.einsum("cv,cd->vd", d_logits, h_c, preferred_element_type=jnp.float32)
      return (jnp.sum(weights_c * (lse - target)), _count_correct(target, top, weights_c),
              d_h.astype(h_c.dtype), d_head_c)

    def skip():
      return zero, zero, jnp.zeros_like(h_c), jnp.zeros(head.shape, jnp.float32)

    l, c, d_h, d_head_c = jax.lax.cond(jnp.any(weights_c != 0), compute, skip)
    return (loss + l, correct + c, d_head + d_head_c), d_h

  zero = jnp.zeros((), jnp.float32)
  (loss, correct, d_head), d_h = jax.lax.scan(
      body, (zero, zero, jnp.zeros(head.shape, jnp.float32)), (h, targets, weights))
  return (loss, correct), (d_h, d_head.astype(head.dtype))


def _weighted_nll_bwd(residuals, cotangents):
  d_h, d_head = residuals
  scale = cotangents[0]  # `correct` has no gradient.
  return (d_h * scale.astype(d_h.dtype), d_head * scale.astype(d_head.dtype), None, None)


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def sft_loss(model: gpt_neo.GPTNeo, params, batch: dict, rng, *,
             groups: int = 1) -> tuple[jax.Array, dict]:
  """Mean NLL over response tokens (`loss_mask`); metrics weighted by the number of such tokens.

  Differentiable once (reverse mode), as training needs; the LM head's gradient is computed in
  the forward pass (see `_weighted_nll`). `groups`: as in `token_losses`.
  """
  hidden, head = _hidden_and_head(model, params, batch, rng)
  h, targets, mask, _ = _loss_chunks(hidden, batch, loss_chunk_size(head.shape[0]), groups)
  tokens = jnp.sum(batch["loss_mask"])
  denominator = jnp.maximum(tokens, 1.0)
  loss, correct = _weighted_nll(h, head, targets, mask / denominator)
  return loss, {"weight": tokens, "token_accuracy": correct / denominator}


def sft_eval_sums(model: gpt_neo.GPTNeo, params, batch: dict, *, groups: int = 1) -> dict:
  """Summed NLL, correct tokens and token count over one eval batch (`groups`: see
  `token_losses`)."""
  nll, correct = token_losses(model, params, batch, groups=groups)
  mask = batch["loss_mask"]
  return {"nll": jnp.sum(nll * mask), "correct": jnp.sum(correct * mask), "tokens": jnp.sum(mask)}


def summarize_eval(sums: dict) -> dict:
  tokens = max(sums["tokens"], 1.0)
  loss = sums["nll"] / tokens
  return {"loss": loss, "perplexity": float(jnp.exp(loss)), "token_accuracy": sums["correct"] / tokens}
