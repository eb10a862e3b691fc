"""Decoding: the one compiled sampler and the one host-side generation function.

`generate` is the compiled sampler, used by every caller (the generate and eval phases, PPO
rollouts and its held-out evaluation, the reward phase's policy negatives); `generate_responses`
is the one host-side path around it: prompts -> fixed-shape padded batches -> `generate` ->
decoded responses with their token ids, logprobs and EOS flags.

Prompts arrive left-padded to a common width P, so every row's next token goes to the same cache
column. One prefill pass fills a preallocated KV cache of width P + max_new_tokens and yields the
first next-token logits (LM head on the last column only); then a `lax.while_loop` samples one
token per iteration until every row has produced EOS or `max_new_tokens` are out. The whole thing
is one jitted function: no Python per token. On CPU, for models too big to stay in cache, its decoding steps use
`feature_major_step`: the same computation with weights as [out, in] and activations as [D, B],
the matmul layout XLA:CPU streams weights fastest in at a few rows.

Logprobs returned are `log_softmax(logits / temperature)` of the sampled tokens (of `logits` when
greedy), before top-k / top-p filtering. PPO recomputes exactly this quantity in its update, so
behaviour and learner logprobs agree (see "The N Implementation Details of RLHF with PPO", on
temperature).
"""

import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.models import gpt_neo

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How to sample. temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_token_id: int = 50256
  pad_token_id: int = 50256

  @classmethod
  def from_config(cls, config, eos_token_id: int, pad_token_id: int | None = None) -> "SamplingSettings":
    """From a config section with fields max_new_tokens, temperature, top_k, top_p."""
    return cls(max_new_tokens=int(config.max_new_tokens), temperature=float(config.temperature),
               top_k=int(config.top_k), top_p=float(config.top_p), eos_token_id=eos_token_id,
               pad_token_id=eos_token_id if pad_token_id is None else pad_token_id)


@dataclasses.dataclass(frozen=True)
class Samples:
  """Generated responses, all [B, N] with N = max_new_tokens.

  tokens: int32; pad_token_id after a row's EOS.
  logprobs: float32 log-probability of each token (see module docstring); 0 on padding.
  mask: float32, 1.0 on real response tokens (EOS included), 0.0 after.
  lengths: int32 [B], number of real response tokens.
  ended: bool [B], whether the row produced EOS.
  """
  tokens: Array
  logprobs: Array
  mask: Array
  lengths: Array
  ended: Array


jax.tree_util.register_dataclass(
    Samples, data_fields=["tokens", "logprobs", "mask", "lengths", "ended"], meta_fields=[])


def process_logits(logits: Array, settings: SamplingSettings) -> Array:
  """Temperature, then top-k and top-p filtering: float32 [B, V] -> [B, V] (-inf where filtered)."""
  logits = logits / settings.temperature
  if settings.top_k > 0:
    kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if settings.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token crossing the threshold included).
    keep = cumulative - jax.nn.softmax(sorted_logits, axis=-1) < settings.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def first_max_index(x: Array) -> Array:
  """argmax over the last axis (the first of ties): int32 [...] from float [..., V].

  The same as `jnp.argmax`, as a max and then a min over the indices that reach it: XLA:CPU runs
  argmax as one (value, index) reduction that is not vectorised, 20 us per decoding step at
  [8, 1024] against 5 us this way.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)
  return jnp.minimum(first, x.shape[-1] - 1)  # A NaN row (never equal to its max) stays in range.


def _first_index(condition: Array, fallback: Array) -> Array:
  """The first index along the last axis where `condition` holds, else `fallback` [...]."""
  index = jax.lax.broadcasted_iota(jnp.int32, condition.shape, condition.ndim - 1)
  first = jnp.min(jnp.where(condition, index, condition.shape[-1]), axis=-1)
  return jnp.where(first < condition.shape[-1], first, fallback)


def _last_index(condition: Array) -> Array:
  """The last index along the last axis where `condition` holds (0 if none)."""
  index = jax.lax.broadcasted_iota(jnp.int32, condition.shape, condition.ndim - 1)
  return jnp.maximum(jnp.max(jnp.where(condition, index, -1), axis=-1), 0)


def sample_categorical(rng: Array, logits: Array) -> Array:
  """One draw per row from softmax(logits): int32 [B] from float32 [B, V] (-inf = never drawn).

  Inverse CDF with one uniform per row: the first token whose cumulative probability reaches
  u * total. `jax.random.categorical` (the Gumbel-max trick) draws a noise value for every
  vocabulary entry at every step, which on CPU cost 3x more than this at GPT-2's vocabulary.
  The CDF is taken in two levels, over ~sqrt(V) blocks of ~sqrt(V) tokens and then inside the
  block that u falls in, because a cumulative sum over the whole vocabulary is a slow scan on
  XLA:CPU (at [8, 1024]: 20 us per decoding step this way, 29 us with one flat cumsum).
  A token of probability 0 is never drawn, whatever the rounding of the sums.
  """
  batch, vocab = logits.shape
  block = math.isqrt(vocab - 1) + 1 if vocab > 1 else 1  # ceil(sqrt(V))
  groups = -(-vocab // block)
  # Unnormalised weights: u is scaled by their total below, so a softmax's divide is not needed.
  logits = logits.astype(jnp.float32)
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = jnp.pad(probs, ((0, 0), (0, groups * block - vocab))).reshape(batch, groups, block)
  group_mass = jnp.sum(probs, axis=-1)  # [B, G]
  group_cdf = jnp.cumsum(group_mass, axis=-1)
  # u > 0, so a block (or token) of probability 0, a flat step of the CDF, is never the first
  # to reach it; the `> 0` conditions below make that hold under rounding too.
  u = jax.random.uniform(rng, (batch,), minval=jnp.finfo(jnp.float32).tiny) * group_cdf[:, -1]
  has_mass = group_mass > 0
  group = _first_index((group_cdf >= u[:, None]) & has_mass, _last_index(has_mass))
  take = lambda x: jnp.take_along_axis(x, group[:, None], axis=1)[:, 0]
  inside = jnp.take_along_axis(probs, group[:, None, None], axis=1)[:, 0]  # [B, block]
  rest = u - (take(group_cdf) - take(group_mass))  # u's place inside the block
  inside_cdf = jnp.cumsum(inside, axis=-1)
  nonzero = inside > 0
  position = _first_index((inside_cdf >= rest[:, None]) & nonzero, _last_index(nonzero))
  return jnp.minimum(group * block + position, vocab - 1).astype(jnp.int32)


def _choose(logits: Array, rng: Array, settings: SamplingSettings) -> tuple[Array, Array]:
  """Picks the next token [B] and its logprob [B] from float32 logits [B, V]."""
  if settings.temperature == 0:
    scaled = logits
    token = first_max_index(logits)
  else:
    scaled = logits / settings.temperature
    token = sample_categorical(rng, process_logits(logits, settings))
  # log_softmax(scaled)[token], without writing out the whole [B, V] log_softmax.
  logprob = (jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
             - jax.nn.logsumexp(scaled, axis=-1))
  return token.astype(jnp.int32), logprob


def feature_major_weights(params: dict) -> list[dict]:
  """Per-layer block weights for `feature_major_step`: every Dense kernel as [out, in].

  Args:
    params: unstacked parameters (`h_0`, `h_1`, ...; see `gpt_neo.unstack_layers`).

  Returns:
    One dict per layer, the block's parameter tree with each `kernel` transposed. The copies are
    made once (inside a jitted sampler: once per call) and kept behind an optimization barrier,
    without which XLA folds the transposes back into the step's matmuls.
  """
  count = sum(1 for name in params if name.startswith("h_"))
  transpose = lambda path, x: x.T if path[-1].key == "kernel" else x
  return jax.lax.optimization_barrier(
      [jax.tree_util.tree_map_with_path(transpose, params[f"h_{i}"]) for i in range(count)])


def feature_major_step(config: gpt_neo.GPTNeoConfig, weights: Sequence[dict], final_norm: dict,
                       x: Array, layer_caches: Sequence[tuple[Array, Array]], masks: tuple[Array, Array],
                       cache_index: Array, dtype=jnp.float32
                       ) -> tuple[Array, list[tuple[Array, Array]]]:
  """One decoding step of the blocks and `ln_f` with activations laid out [D, B].

  The same computation as `gpt_neo.GPTNeo.__call__` for one new token with a cache (no dropout), written
  for XLA:CPU at batch sizes of a few rows: a [B, K] x [K, N] matmul there runs at ~7 GB/s of
  weights, while [N, K] x [K, B] (weights as [out, in], activations feature-major) runs at
  ~13-21 GB/s, and a decoding step mostly streams weights. The attention keeps the cache layout
  of the Flax path ([B, H, S, Dh]); only the small per-step activations are transposed.

  Args:
    config: the architecture.
    weights: from `feature_major_weights`.
    final_norm: the `ln_f` parameters.
    x: [B, D] token + position embeddings of the new token.
    layer_caches: per layer (k, v) [B, H, S, Dh], as `gpt_neo.init_cache(per_layer=True)`.
    masks: (global, local) boolean [B, 1, 1, S] from `gpt_neo.attention_masks` for this step.
    cache_index: int32 scalar, the column the new token is written at.
    dtype: compute dtype.

  Returns:
    (final hidden states [D, B] after `ln_f`, the updated per-layer caches).
  """
  heads, head_dim = config.num_heads, config.head_dim
  norm = lambda params, h: nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=dtype,
                                        reduction_axes=0, feature_axes=0).apply(
                                            {"params": params}, h)
  dense = lambda params, h: (jnp.dot(params["kernel"].astype(dtype), h)
                             + (params["bias"].astype(dtype)[:, None] if "bias" in params else 0))
  x = x.astype(dtype).T
  new_caches = []
  for layer, (cached_k, cached_v), kind in zip(weights, layer_caches, config.attention_layers):
    attn = layer["attn"]
    h = norm(layer["ln_1"], x)
    # [D, B] -> [B, H, Dh]: the Flax path's layout, so the cache is written and read as there.
    query, key, value = (dense(attn[name], h).reshape(heads, head_dim, -1).transpose(2, 0, 1)
                         for name in ("q_proj", "k_proj", "v_proj"))
    cached_k = jax.lax.dynamic_update_slice(cached_k, key[:, :, None].astype(cached_k.dtype),
                                            (0, 0, cache_index, 0))
    cached_v = jax.lax.dynamic_update_slice(cached_v, value[:, :, None].astype(cached_v.dtype),
                                            (0, 0, cache_index, 0))
    new_caches.append((cached_k, cached_v))
    mask = masks[1 if kind == "local" else 0][:, :, 0]  # [B, 1, S]
    logits = jnp.einsum("bhd,bhsd->bhs", query, cached_k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("bhs,bhsd->bhd", probs.astype(dtype), cached_v.astype(dtype))
    x = x + dense(attn["out_proj"], out.reshape(-1, heads * head_dim).T)
    h = jax.nn.gelu(dense(layer["mlp"]["c_fc"], norm(layer["ln_2"], x)), approximate=True)
    x = x + dense(layer["mlp"]["c_proj"], h)
  return norm(final_norm, x), new_caches


# A decoding step streams every weight once; above this many bytes of float32 weights (they no
# longer stay in the CPU's caches) the feature-major step is faster on XLA:CPU. Measured at batch
# 8 on a 2-core AMD EPYC: GPT-Neo 125M (500 MB) 35.2 -> 26.9 ms per step; a tiny shape (1.5 MB)
# 0.10-0.11 -> 0.12 ms, so it stays on the Flax step (bench/RESULTS.md).
FEATURE_MAJOR_MIN_BYTES = 64 * 2**20


def default_feature_major(model: gpt_neo.GPTNeo) -> bool:
  """Whether `generate` decodes with `feature_major_step` by default: on CPU, in float32,
  for a model whose weights exceed `FEATURE_MAJOR_MIN_BYTES`."""
  return (jax.default_backend() == "cpu" and jnp.dtype(model.dtype) == jnp.float32
          and 4 * model.config.num_params > FEATURE_MAJOR_MIN_BYTES)


@functools.partial(jax.jit, static_argnames=("model", "settings", "layer_loop", "feature_major"))
def generate(model: gpt_neo.GPTNeo, params, prompt_ids: Array, prompt_mask: Array, rng: Array,
             settings: SamplingSettings, layer_loop: bool | None = None,
             feature_major: bool | None = None) -> Samples:
  """Samples responses for a batch of left-padded prompts.

  Args:
    model: the policy (its `dtype` sets the compute and KV-cache dtype).
    params: its parameters.
    prompt_ids: int32 [B, P], left-padded.
    prompt_mask: int32/bool [B, P], 1 on real prompt tokens.
    rng: a PRNG key; the same key gives the same samples.
    settings: static sampling settings (a change recompiles).
    layer_loop: decode with a loop over unstacked layers (`GPTNeo(scan_layers=False)`; the block
      weights are copied once per call) instead of the scanned blocks. Same results. None: on CPU,
      where it is ~1.7x faster at 125M because XLA:CPU would copy every layer's weights out of the
      stack on every step; elsewhere keep the scan (no extra copy of the weights in memory).
      On CPU the Flax step's tied LM head is also transposed once per call ([D, V]), with or
      without the layer loop: XLA:CPU's per-step matmul against the [V, D] embedding costs ~1.5x
      more (tiny shape: 19.7 of a step's ~110 us).
    feature_major: decode with `feature_major_step` (block weights transposed once per
      call, activations [D, B], the LM head as [V, D] x [D, B]); the prompt's prefill stays on
      the Flax path. Same computation, rounding aside. None: `default_feature_major(model)`.
  Returns:
    `Samples` with [B, max_new_tokens] arrays.
  """
  batch, prompt_length = prompt_ids.shape
  steps = settings.max_new_tokens
  if layer_loop is None:
    layer_loop = jax.default_backend() == "cpu"
  if feature_major is None:
    feature_major = default_feature_major(model)
  if (layer_loop or feature_major) and model.scan_layers:
    model, params = model.clone(scan_layers=False), gpt_neo.unstack_layers(params)
  transposed_head = jax.default_backend() == "cpu" and not feature_major
  head = params["wte"]["embedding"].astype(model.dtype)  # [V, D]; the tied LM head.
  head = head.T if transposed_head else head  # [D, V] on CPU: one copy per call.
  if feature_major:
    block_weights = feature_major_weights(params)

  def next_logits(out) -> Array:
    """float32 [B, V] next-token logits from the last column's final hidden state."""
    hidden = out["hidden"][:, -1].astype(model.dtype)
    if transposed_head:
      return jnp.dot(hidden, head, preferred_element_type=jnp.float32)
    return jnp.einsum("bd,vd->bv", hidden, head, preferred_element_type=jnp.float32)

  segments = prompt_mask.astype(jnp.int32)
  cache = gpt_neo.init_cache(model.config, batch, prompt_length + steps, model.dtype,
                             per_layer=not model.scan_layers)
  out = model.apply({"params": params}, prompt_ids, segments, gpt_neo.default_positions(segments),
                    cache=cache, last_only=True, lm_head=False)
  next_position = jnp.sum(segments, axis=1).astype(jnp.int32)  # [B]
  # The position-embedding rows of every step [B, steps, D], gathered once per call: inside the
  # loop, XLA:CPU splits a gather from the whole [max_positions, D] table across threads (its
  # cost model counts the table), which costs ~10 us per step at the tiny shape, a tenth of it.
  step_positions = next_position[:, None] + jnp.arange(steps, dtype=jnp.int32)
  position_rows = jnp.take(params["wpe"]["embedding"].astype(model.dtype), step_positions, axis=0)

  def feature_major_logits(token, live, position_row, cache):
    """(updated cache, float32 [B, V] logits) of one feature-major decoding step."""
    index = cache["index"]
    x = jnp.take(params["wte"]["embedding"], token, axis=0) + position_row  # [B, D]
    key_segments = jax.lax.dynamic_update_slice(
        cache["segment_ids"], live.astype(jnp.int32)[:, None], (0, index))
    masks = gpt_neo.attention_masks(index[None], jnp.arange(key_segments.shape[1]),
                                     live.astype(jnp.int32)[:, None], key_segments,
                                     model.config.window_size)
    hidden, layer_caches = feature_major_step(
        model.config, block_weights, params["ln_f"], x, list(zip(cache["k"], cache["v"])),
        masks, index, model.dtype)
    # [V, D] x [D, B]; the barrier keeps XLA from folding the transpose into the matmul, which
    # would turn it back into the slow [B, D] x [D, V] form.
    logits = jax.lax.optimization_barrier(
        jnp.dot(head, hidden, preferred_element_type=jnp.float32)).T
    k, v = zip(*layer_caches)
    return dict(k=tuple(k), v=tuple(v), segment_ids=key_segments, index=index + 1), logits

  def body(state):
    step, cache, logits, tokens, logprobs, ended, rng = state
    rng, step_rng = jax.random.split(rng)
    token, logprob = _choose(logits, step_rng, settings)
    token = jnp.where(ended, settings.pad_token_id, token)
    tokens = tokens.at[:, step].set(token)
    logprobs = logprobs.at[:, step].set(jnp.where(ended, 0.0, logprob))
    live = ~ended
    ended = ended | (token == settings.eos_token_id)
    step_rows = jax.lax.dynamic_slice_in_dim(position_rows, step, 1, 1)  # [B, 1, D]
    if feature_major:
      cache, logits = feature_major_logits(token, live, step_rows[:, 0], cache)
    else:
      out = model.apply({"params": params}, token[:, None], live.astype(jnp.int32)[:, None],
                        cache=cache, last_only=True, lm_head=False,
                        position_embeddings=step_rows)
      cache, logits = out["cache"], next_logits(out)
    return (step + 1, cache, logits, tokens, logprobs, ended, rng)

  def cond(state):
    step, ended = state[0], state[5]
    return (step < steps) & ~jnp.all(ended)

  init = (jnp.zeros((), jnp.int32), out["cache"], next_logits(out),
          jnp.full((batch, steps), settings.pad_token_id, jnp.int32),
          jnp.zeros((batch, steps), jnp.float32), jnp.zeros((batch,), bool), rng)
  _, _, _, tokens, logprobs, ended, _ = jax.lax.while_loop(cond, body, init)
  # A row's real tokens run up to and including its first EOS.
  is_eos = tokens == settings.eos_token_id
  first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), steps)
  lengths = jnp.minimum(first_eos + 1, steps).astype(jnp.int32)
  mask = (jnp.arange(steps)[None, :] < lengths[:, None]).astype(jnp.float32)
  return Samples(tokens=tokens, logprobs=logprobs * mask, mask=mask, lengths=lengths, ended=ended)


@dataclasses.dataclass
class Responses:
  """Decoded responses to `n` prompts, in prompt order.

  texts: the responses, decoded without the EOS that ended them (`decode_response`).
  token_ids: int32 arrays of each response's real tokens, the ending EOS included.
  logprobs: float32 arrays of their logprobs (see the module docstring).
  lengths: int32 [n], the number of real tokens (EOS included).
  ended: bool [n], whether the response ended with EOS (False: it hit `max_new_tokens`).
  extras: the per-row values of `generate_responses`' `per_batch`, each [n].
  """
  texts: list[str]
  token_ids: list[np.ndarray]
  logprobs: list[np.ndarray]
  lengths: np.ndarray
  ended: np.ndarray
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def decode_response(tokenizer, tokens: np.ndarray, length: int, ended: bool) -> str:
  """The one decoding rule of a sampled response: its first `length` tokens without the EOS
  that ended it, special tokens kept (an EOS-like token the model wrote mid-response stays)."""
  return tokenizer.decode(tokens[:length - int(ended)], skip_special_tokens=False)


def generate_responses(model: gpt_neo.GPTNeo, params, tokenizer, prompts: Sequence[str], *,
                       settings: SamplingSettings, batch_size: int, max_prompt_length: int,
                       rng: jax.Array,
                       per_batch: Callable[[Array, Array, Samples], dict[str, Array]] | None = None
                       ) -> Responses:
  """Samples one response per prompt through `generate`, in fixed-shape batches (one compilation).

  Every batch has `batch_size` rows and every prompt the width min(`max_prompt_length`, longest
  prompt in tokens), left-padded (a longer prompt keeps its last tokens); the last batch is
  filled up with copies of its last prompt, whose results are dropped: no prompt is ever left
  out. Batch i samples with the i-th key of `rng, key_i = split(rng)`. With params on a mesh,
  each batch is split over its data x fsdp devices and the samples gathered, so every process
  runs the same calls and returns the same responses.

  Args:
    model, params: the policy.
    tokenizer: its tokenizer (prompts are encoded without special tokens).
    prompts: formatted prompt texts (non-empty).
    settings: sampling settings.
    batch_size: rows per call.
    max_prompt_length: the widest prompt kept, in tokens.
    rng: PRNG key.
    per_batch: optional `(prompt_ids [B, P], prompt_mask [B, P], samples) -> {name: [B]}`, run on
      each batch's device arrays (jit it: it is called once per batch), e.g. reward scores or
      the KL to a reference; its values for the real rows land in `Responses.extras`.

  Returns:
    `Responses` aligned with `prompts`.
  """
  if not prompts:
    raise ValueError("generate_responses: no prompts")
  mesh = sharding.mesh_of(params)
  longest = max(len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"])
  width = min(max_prompt_length, longest)
  texts, token_ids, logprobs, lengths, ended = [], [], [], [], []
  extras: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    ids, mask = batching.prompt_batch(tokenizer, padded, width)
    if mesh is not None:
      ids, mask = sharding.global_batch((ids, mask), mesh)
    rng, batch_rng = jax.random.split(rng)
    samples = generate(model, params, ids, mask, batch_rng, settings)
    if per_batch is not None:
      for name, values in sharding.to_host(per_batch(ids, mask, samples)).items():
        extras.setdefault(name, []).append(np.asarray(values)[:len(chunk)])
    host = sharding.to_host(samples)
    for i in range(len(chunk)):
      n, eos = int(host.lengths[i]), bool(host.ended[i])
      texts.append(decode_response(tokenizer, host.tokens[i], n, eos))
      token_ids.append(np.asarray(host.tokens[i, :n]))
      logprobs.append(np.asarray(host.logprobs[i, :n]))
      lengths.append(n)
      ended.append(eos)
  return Responses(texts, token_ids, logprobs, np.array(lengths, np.int32), np.array(ended, bool),
                   {name: np.concatenate(parts) for name, parts in extras.items()})
