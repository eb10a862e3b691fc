"""GPT-Neo in Flax: the same computation as Hugging Face's `GPTNeoForCausalLM`.

What makes GPT-Neo GPT-Neo (each checked against `transformers/models/gpt_neo/modeling_gpt_neo.py`):
- learned token (`wte`) and position (`wpe`) embeddings; the LM head is tied to `wte`;
- pre-LayerNorm blocks, attention layers alternating `global` / `local` as listed in the config; a local
  layer lets a query see the last `window_size` keys, itself included;
- attention scores are NOT scaled by 1/sqrt(head_dim); q/k/v projections have no bias, out_proj has one;
- MLP with `gelu_new` (the tanh approximation of GELU).

Choices of this port:
- Attention logits and softmax are always computed in float32, whatever the compute dtype, so bfloat16
  runs with left padding cannot overflow (a known failure of the old HF Flax port).
- `segment_ids` carry both padding and packing: 0 marks padding, tokens attend only to earlier tokens
  with the same non-zero id. `positions` are the position-embedding ids; by default they count real
  tokens, so a left-padded row gives the same logits per real token as the unpadded row.
- The blocks are one `nn.scan` over layers (parameters stacked on a leading `layers` axis): compile time
  does not grow with depth, and the per-layer global/local choice is a scanned boolean. The sampler
  on CPU uses a plain loop over unstacked layers instead (`scan_layers=False`, see its docstring).
- Parameters carry logical axis names (`vocab`, `embed`, `heads`, `mlp`, `layers`) that
  `rlhf_jax.sharding` maps onto the device mesh.
- A preallocated KV cache (`init_cache`) gives the incremental decoding path used by the sampler
  (`rlhf_jax.models.decode`, which also holds the CPU feature-major decoding step).
- An optional `score` head (Dense to 1, no bias: the layout of HF `GPTNeoForSequenceClassification`)
  gives a scalar per token: read at the last real token it is the reward model; per token it is the
  PPO value head.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPTNeoConfig:
  """Architecture hyper-parameters, named as in Hugging Face's `GPTNeoConfig`."""
  vocab_size: int = 50257
  max_position_embeddings: int = 2048
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int | None = None  # None: 4 * hidden_size.
  window_size: int = 256
  attention_layers: tuple[str, ...] = ("global", "local") * 6
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  embed_dropout: float = 0.0
  attention_dropout: float = 0.0
  resid_dropout: float = 0.0
  initializer_range: float = 0.02
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  pad_token_id: int | None = None

  def __post_init__(self):
    if len(self.attention_layers) != self.num_layers:
      raise ValueError(f"attention_layers has {len(self.attention_layers)} entries, "
                       f"num_layers is {self.num_layers}")
    if bad := set(self.attention_layers) - {"global", "local"}:
      raise ValueError(f"attention_layers may only hold 'global' and 'local', got {sorted(bad)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.activation_function != "gelu_new":
      raise ValueError(f"activation_function {self.activation_function!r} is not supported "
                       "(GPT-Neo uses 'gelu_new')")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return self.intermediate_size or 4 * self.hidden_size

  @property
  def num_params(self) -> int:
    """Parameter count of the causal LM (tied head), without a score head."""
    d, f, n = self.hidden_size, self.mlp_dim, self.num_layers
    per_layer = 4 * d * d + d + 2 * d * f + f + d + 4 * d
    return self.vocab_size * d + self.max_position_embeddings * d + n * per_layer + 2 * d

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any]) -> "GPTNeoConfig":
    """Builds the config from a Hugging Face `config.json` dict (`attention_types` expanded)."""
    layers = hf.get("attention_layers")
    if not layers:
      layers = [kind for kinds, repeat in hf["attention_types"] for _ in range(repeat) for kind in kinds]
    names = {f.name for f in dataclasses.fields(cls)} - {"attention_layers"}
    kwargs = {k: hf[k] for k in names if k in hf}
    return cls(attention_layers=tuple(layers), **kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    """The fields of a Hugging Face `GPTNeoConfig` (compressed `attention_types`, as HF writes them)."""
    hf = dataclasses.asdict(self)
    layers = hf.pop("attention_layers")
    # Run-length encode as HF does: [[["global", "local"], 6]] for 12 alternating layers.
    period = 2 if len(layers) % 2 == 0 and layers[:2] * (len(layers) // 2) == list(layers) else 1
    if period == 2:
      hf["attention_types"] = [[list(layers[:2]), len(layers) // 2]]
    else:
      hf["attention_types"] = [[[kind], 1] for kind in layers]
    hf["model_type"] = "gpt_neo"
    return hf


def init_cache(config: GPTNeoConfig, batch_size: int, max_length: int, dtype=jnp.float32,
               per_layer: bool = False) -> dict:
  """A preallocated KV cache for incremental decoding.

  Returns a dict with
    `k`, `v`: [num_layers, batch, num_heads, max_length, head_dim] in `dtype` (with `per_layer`, a
      tuple of num_layers arrays [batch, num_heads, max_length, head_dim], for `scan_layers=False`),
    `segment_ids`: int32 [batch, max_length], 0 where nothing real was written,
    `index`: int32 scalar, the next free column (shared by all rows: prompts are left-padded).
  """
  shape = (config.num_layers, batch_size, config.num_heads, max_length, config.head_dim)
  if per_layer:
    k = v = tuple(jnp.zeros(shape[1:], dtype) for _ in range(config.num_layers))
  else:
    k = v = jnp.zeros(shape, dtype)
  return dict(k=k, v=v, segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
              index=jnp.zeros((), jnp.int32))


def unstack_layers(params: dict) -> dict:
  """Scanned parameters (blocks stacked under `h`) -> those of `GPTNeo(scan_layers=False)` (`h_0`,
  `h_1`, ...). Inside a jitted function this copies the block weights once."""
  num_layers = jax.tree.leaves(params["h"])[0].shape[0]
  layers = {f"h_{i}": jax.tree.map(lambda x, i=i: x[i], params["h"]) for i in range(num_layers)}
  return {**{name: value for name, value in params.items() if name != "h"}, **layers}


def default_positions(segment_ids: Array) -> Array:
  """Position ids that count real tokens in each row: [B, T] int32, 0 on padding.

  Matches what HF's `generate` passes for left-padded batches (cumsum of the mask - 1). Packed rows
  (several segments) need per-segment positions from the batcher instead.
  """
  real = (segment_ids > 0).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0)


def attention_masks(query_index: Array, key_index: Array, query_segments: Array,
                     key_segments: Array, window_size: int) -> tuple[Array, Array]:
  """Boolean [B, 1, T, S] masks for global and local layers.

  A query sees a key when the key is not in its future, both have the same non-zero segment id and,
  for local layers, the key is among the last `window_size` columns (the query's own included).
  Indices are columns of the (cache) sequence, so packed and left-padded rows behave like HF.
  """
  causal = key_index[None, :] <= query_index[:, None]  # [T, S]
  in_window = query_index[:, None] - key_index[None, :] < window_size
  same_segment = ((query_segments[:, :, None] == key_segments[:, None, :])
                  & (key_segments[:, None, :] > 0))  # [B, T, S]
  global_mask = (causal[None] & same_segment)[:, None]
  local_mask = (causal & in_window)[None, None] & global_mask
  return global_mask, local_mask


def _dense(features: int, axes: tuple[str | None, str | None], use_bias: bool, dtype, param_dtype,
           init_std: float, name: str) -> nn.Dense:
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def _layer_norm(config: GPTNeoConfig, dtype, param_dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class SelfAttention(nn.Module):
  """Multi-head self-attention without score scaling (GPT-Neo), with an optional KV cache."""
  config: GPTNeoConfig
  dtype: Any
  param_dtype: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, layer_cache: tuple[Array, Array] | None,
               cache_index: Array | None) -> tuple[Array, tuple[Array, Array] | None]:
    """x: [B, T, D]; mask: bool [B, 1, T, S]; layer_cache: (k, v) [B, H, S, Dh] or None."""
    cfg = self.config
    batch, length, _ = x.shape
    proj = lambda name: _dense(cfg.hidden_size, ("embed", "heads"), False, self.dtype,
                               self.param_dtype, cfg.initializer_range, name)
    # [B, H, T, Dh]: batch and head axes leading, the layout the attention matmuls want, so XLA does
    # not transpose the whole KV cache on every decoding step.
    heads = lambda t: t.reshape(batch, length, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)
    query, key, value = (heads(proj(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    if layer_cache is not None:
      cached_k, cached_v = layer_cache
      key = jax.lax.dynamic_update_slice(cached_k, key.astype(cached_k.dtype), (0, 0, cache_index, 0))
      value = jax.lax.dynamic_update_slice(cached_v, value.astype(cached_v.dtype), (0, 0, cache_index, 0))
      layer_cache = (key, value)
    # float32 logits and softmax, no 1/sqrt(head_dim): GPT-Neo's computation, safe in bfloat16.
    logits = jnp.einsum("bhtd,bhsd->bhts", query, key, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(cfg.attention_dropout)(weights, deterministic=self.deterministic)
    out = jnp.einsum("bhts,bhsd->bthd", weights, value.astype(self.dtype))
    out = out.reshape(batch, length, cfg.hidden_size)
    out = _dense(cfg.hidden_size, ("heads", "embed"), True, self.dtype, self.param_dtype,
                 cfg.initializer_range, "out_proj")(out)
    return nn.Dropout(cfg.resid_dropout)(out, deterministic=self.deterministic), layer_cache


class Block(nn.Module):
  """One pre-LayerNorm transformer block; the body of the `nn.scan` over layers."""
  config: GPTNeoConfig
  dtype: Any
  param_dtype: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, layer_inputs: tuple[Array, Any], masks: tuple[Array, Array],
               cache_index: Array | None) -> tuple[Array, Any]:
    cfg = self.config
    is_local, layer_cache = layer_inputs
    mask = jnp.where(is_local, masks[1], masks[0])
    h = _layer_norm(cfg, self.dtype, self.param_dtype, "ln_1")(x)
    h, layer_cache = SelfAttention(cfg, self.dtype, self.param_dtype, self.deterministic,
                                   name="attn")(h, mask, layer_cache, cache_index)
    x = x + h
    h = _layer_norm(cfg, self.dtype, self.param_dtype, "ln_2")(x)
    h = MLP(cfg, self.dtype, self.param_dtype, self.deterministic, name="mlp")(h)
    return x + h, layer_cache


class MLP(nn.Module):
  config: GPTNeoConfig
  dtype: Any
  param_dtype: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    h = _dense(cfg.mlp_dim, ("embed", "mlp"), True, self.dtype, self.param_dtype,
               cfg.initializer_range, "c_fc")(x)
    h = jax.nn.gelu(h, approximate=True)  # `gelu_new` is the tanh approximation.
    h = _dense(cfg.hidden_size, ("mlp", "embed"), True, self.dtype, self.param_dtype,
               cfg.initializer_range, "c_proj")(h)
    return nn.Dropout(cfg.resid_dropout)(h, deterministic=self.deterministic)


class GPTNeo(nn.Module):
  """GPT-Neo with its tied LM head and an optional scalar `score` head.

  Attributes:
    config: the architecture.
    dtype: compute dtype (activations, matmuls); attention softmax is float32 regardless.
    param_dtype: dtype of the parameters (float32 master weights by default).
    remat: rematerialise each block in the backward pass (less memory, ~1/3 more compute).
    score_head: add `score`, a bias-free Dense(1): reward model / value head.
    score_init_std: std of the score head's initial weights (None: 1/sqrt(hidden_size + 1)).
    scan_layers: True (the checkpoint layout): one `nn.scan` over blocks stacked under `h`. False: a
      Python loop over blocks `h_0`, `h_1`, ... (params from `unstack_layers`, cache from
      `init_cache(per_layer=True)`), for decoding on CPU, where XLA copies a scanned layer's weights
      out of the stack before each matmul: at one token per step that copy costs more than the
      matmuls themselves.
  """
  config: GPTNeoConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  score_head: bool = False
  score_init_std: float | None = None
  scan_layers: bool = True

  @nn.compact
  def __call__(self, input_ids: Array, segment_ids: Array, positions: Array | None = None, *,
               cache: dict | None = None, deterministic: bool = True, lm_head: bool = True,
               last_only: bool = False, head_slice: tuple[int, int] | None = None,
               position_embeddings: Array | None = None) -> dict[str, Array]:
    """Runs the model.

    Args:
      input_ids: int32 [B, T].
      segment_ids: int32 [B, T]; 0 on padding, equal non-zero ids for tokens of one sequence.
      positions: int32 [B, T] position-embedding ids; default: count of real tokens so far.
      cache: from `init_cache`; the T new tokens are written at `cache["index"]` and attend to
        everything written before. The updated cache is returned under "cache".
      deterministic: False enables dropout (needs a "dropout" rng).
      lm_head: compute LM logits (skip them for a reward model or value-only pass).
      last_only: compute heads only for the last column (generation).
      head_slice: (start, length): compute heads only for these columns (e.g. the response part
        of prompt+response in PPO), saving the vocabulary projection of the rest.
      position_embeddings: [B, T, D] rows of `wpe` to use instead of looking up `positions`
        (generation gathers its steps' rows once per call; see `sampling.generate`).

    Returns:
      dict with "hidden" [B, T', D] (after ln_f), "logits" float32 [B, T', V] if `lm_head`,
      "scores" float32 [B, T'] if the model has a score head, "cache" if a cache was given;
      T' is 1 when `last_only`, `length` with `head_slice`, else T.
    """
    cfg = self.config
    if positions is None:
      positions = default_positions(segment_ids)
    embed_init = nn.initializers.normal(cfg.initializer_range)
    wte = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   embedding_init=nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
                   name="wte")
    wpe = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                   param_dtype=self.param_dtype,
                   embedding_init=nn.with_logical_partitioning(embed_init, (None, "embed")),
                   name="wpe")
    if position_embeddings is None:
      position_embeddings = wpe(positions)
    x = wte(input_ids) + position_embeddings.astype(self.dtype)
    x = nn.Dropout(cfg.embed_dropout)(x, deterministic=deterministic)

    length = input_ids.shape[1]
    if cache is None:
      query_index = key_index = jnp.arange(length)
      key_segments, cache_index, layer_caches = segment_ids, None, None
    else:
      cache_index = cache["index"]
      query_index = cache_index + jnp.arange(length)
      key_index = jnp.arange(cache["segment_ids"].shape[1])
      key_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, cache_index))
      layer_caches = (cache["k"], cache["v"])
    masks = attention_masks(query_index, key_index, segment_ids, key_segments, cfg.window_size)

    block = Block
    if self.remat:
      block = nn.remat(Block, prevent_cse=False)  # prevent_cse is unneeded inside scan.
    is_local = [kind == "local" for kind in cfg.attention_layers]
    if self.scan_layers:
      blocks = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, layer_caches = blocks(cfg, self.dtype, self.param_dtype, deterministic, name="h")(
          x, (jnp.array(is_local), layer_caches), masks, cache_index)
    else:
      new_caches = []
      for i, local in enumerate(is_local):
        layer_cache = None if layer_caches is None else (layer_caches[0][i], layer_caches[1][i])
        x, layer_cache = block(cfg, self.dtype, self.param_dtype, deterministic, name=f"h_{i}")(
            x, (jnp.array(local), layer_cache), masks, cache_index)
        new_caches.append(layer_cache)
      if layer_caches is not None:
        stacked = not isinstance(layer_caches[0], (tuple, list))  # Keep the caller's layout.
        layer_caches = tuple(jnp.stack(c) if stacked else tuple(c) for c in zip(*new_caches))
    x = _layer_norm(cfg, self.dtype, self.param_dtype, "ln_f")(x)

    if last_only:
      x = x[:, -1:]
    elif head_slice is not None:
      x = jax.lax.dynamic_slice_in_dim(x, head_slice[0], head_slice[1], axis=1)
    out = {"hidden": x}
    if lm_head:
      out["logits"] = jnp.einsum("btd,vd->btv", x, wte.embedding.astype(self.dtype),
                                 preferred_element_type=jnp.float32)
    if self.score_head:
      std = self.score_init_std or (cfg.hidden_size + 1) ** -0.5
      score = _dense(1, ("embed", None), False, self.dtype, self.param_dtype, std, "score")
      out["scores"] = score(x)[..., 0].astype(jnp.float32)
    if cache is not None:
      out["cache"] = dict(k=layer_caches[0], v=layer_caches[1], segment_ids=key_segments,
                          index=cache_index + length)
    return out


def last_token_index(mask: Array) -> Array:
  """Column of the last real token of each row: int32 [B], -1 for a row with no real token.

  Args:
    mask: [B, T] segment ids or a response mask; > 0 marks a real token. An empty row has no
      last token: callers that read a value there clamp the -1 (see `sequence_scores`), those
      that mark a position match none.
  """
  columns = jnp.arange(mask.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(mask > 0, columns, -1), axis=-1)


def sequence_scores(per_token_scores: Array, segment_ids: Array) -> Array:
  """The score read at each row's last real token: float32 [B] (HF sequence-classification rule;
  an empty row reads column 0)."""
  index = jnp.maximum(last_token_index(segment_ids), 0)
  return jnp.take_along_axis(per_token_scores, index[:, None], axis=1)[:, 0]


def init_params(model: GPTNeo, rng: Array, batch_size: int = 1, length: int = 8) -> dict:
  """Random parameters (HF's initialisation: normal(initializer_range), zero biases, unit LN).

  Jitted: an eager `init` dispatches every op separately and takes seconds even for tiny models.
  """
  ids = jnp.zeros((batch_size, length), jnp.int32)
  variables = jax.jit(model.init)(rng, ids, jnp.ones_like(ids))
  return nn.meta.unbox(variables["params"])


def logical_axes(model: GPTNeo) -> Any:
  """The tree of logical axis names (a `PartitionSpec` per parameter), without allocating."""
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda i: model.init(jax.random.key(0), i, i), ids)
  return nn.get_partition_spec(abstract)["params"]


def param_shapes(model: GPTNeo) -> Any:
  """The tree of parameter `ShapeDtypeStruct`s, without allocating."""
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda i: model.init(jax.random.key(0), i, i), ids)
  return nn.meta.unbox(abstract["params"])


def tiny_config(vocab_size: int = 1024, attention_layers: Sequence[str] = ("global", "local"),
                **overrides) -> GPTNeoConfig:
  """A small GPT-Neo for tests and the built-in default (override any field)."""
  fields = dict(vocab_size=vocab_size, max_position_embeddings=256, hidden_size=64, num_heads=4,
                num_layers=len(attention_layers), attention_layers=tuple(attention_layers),
                window_size=16, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
  fields.update(overrides)
  return GPTNeoConfig(**fields)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  """'float32' / 'bfloat16' / 'float16' -> the jnp dtype (config values are strings)."""
  if name not in _DTYPES:
    from rlhf_jax.errors import UserError
    raise UserError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
  return _DTYPES[name]


def build(config: GPTNeoConfig, model_settings=None, *, score_head: bool = False) -> GPTNeo:
  """The module for `config` with a config's `model` section (dtype, param_dtype, remat)."""
  get = lambda key, default: model_settings.get(key, default) if model_settings else default
  return GPTNeo(config, dtype=dtype_from_name(get("dtype", "float32")),
                param_dtype=dtype_from_name(get("param_dtype", "float32")),
                remat=bool(get("remat", False)), score_head=score_head)


def with_dropout(config: GPTNeoConfig, model_settings) -> GPTNeoConfig:
  """Applies a config's `model.dropout` (>= 0; < 0 or absent keeps the checkpoint's) to the
  embed/attention/resid dropout rates."""
  rate = float(model_settings.get("dropout", -1.0))
  if rate < 0:
    return config
  return dataclasses.replace(config, embed_dropout=rate, attention_dropout=rate,
                             resid_dropout=rate)
