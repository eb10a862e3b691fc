"""The Flax GPT-Neo against Hugging Face's PyTorch GPT-Neo, the KV-cache path, bf16, dropout, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import hf_position_ids, left_padded
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf

# Tiny architectures that cover GPT-Neo's variations. Sequences below are longer than every window.
ARCHITECTURES = {
    "global_only": dict(attention_layers=("global", "global")),
    "global_local": dict(attention_layers=("global", "local"), window_size=4),
    "odd_layers": dict(attention_layers=("local", "global", "local"), window_size=3),
    "many_heads": dict(attention_layers=("global", "local"), hidden_size=64, num_heads=8,
                       window_size=5),
}
ROW_LENGTHS = (14, 9, 3, 1)  # Several left-padded rows; the longest has no padding.


def _rows(seed: int, vocab_size: int, lengths=ROW_LENGTHS) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab_size, n).tolist() for n in lengths]  # 0 is EOS/pad.


def _hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(hf_position_ids(mask)).long())
  return out.logits.numpy()


def _apply(model: gpt_neo.GPTNeo):
  """model.apply, jitted (eager Flax dispatch is far slower on CPU than one compile)."""
  return jax.jit(lambda params, *args, **kwargs: model.apply({"params": params}, *args, **kwargs),
                 static_argnames=("deterministic", "lm_head", "last_only"))


def _init(model: gpt_neo.GPTNeo, seed: int = 0) -> dict:
  """Random parameters; jitted, since eager Flax init of the scanned blocks takes seconds."""
  return jax.jit(lambda rng: gpt_neo.init_params(model, rng))(jax.random.key(seed))


def _load(hf_model, **module_kwargs) -> tuple[gpt_neo.GPTNeo, dict]:
  config, params, _, _ = hf.load_checkpoint(str(hf_model.path))
  return gpt_neo.GPTNeo(config, score_head="score" in params, **module_kwargs), params


@pytest.fixture(params=list(ARCHITECTURES), ids=list(ARCHITECTURES))
def architecture(request, make_hf_gpt_neo):
  return make_hf_gpt_neo(**ARCHITECTURES[request.param])


def test_logits_match_hf_without_padding(architecture):
  model, params = _load(architecture)
  ids = np.array(_rows(1, model.config.vocab_size, (14, 14)), np.int32)
  mask = np.ones_like(ids)
  expected = _hf_logits(architecture.model, ids, mask)
  got = np.asarray(_apply(model)(params, ids, mask)["logits"])
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_logits_match_hf_with_left_padding(architecture):
  model, params = _load(architecture)
  rows = _rows(2, model.config.vocab_size)
  ids, mask = left_padded(rows, pad_id=0)
  expected = _hf_logits(architecture.model, ids, mask)
  got = np.asarray(_apply(model)(params, ids, mask)["logits"])
  real = mask.astype(bool)
  assert np.abs(got[real] - expected[real]).max() <= 1e-4
  # Each real token of a padded row gets the logits of the same row without padding.
  for i, row in enumerate(rows):
    alone = _hf_logits(architecture.model, np.array([row], np.int32), np.ones((1, len(row)), np.int32))
    np.testing.assert_allclose(got[i, -len(row):], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sequence_score_matches_hf_classifier(make_hf_gpt_neo, padding_side):
  hf_model = make_hf_gpt_neo(attention_layers=("global", "local"), window_size=4, classifier=True)
  assert hf_model.config.pad_token_id == 0
  model, params = _load(hf_model)
  rows = _rows(3, model.config.vocab_size)  # Ids >= 1: HF finds the last token that is not pad (0).
  ids, mask = left_padded(rows, pad_id=0)
  if padding_side == "right":
    ids = np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
    mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
  with torch.no_grad():
    expected = hf_model.model(torch.from_numpy(ids).long(),
                              attention_mask=torch.from_numpy(mask).long(),
                              position_ids=torch.from_numpy(hf_position_ids(mask)).long()).logits
  out = _apply(model)(params, ids, mask, lm_head=False)
  assert "logits" not in out
  got = gpt_neo.sequence_scores(out["scores"], jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), expected.numpy()[:, 0], atol=1e-4, rtol=0)


def test_kv_cache_token_by_token_equals_full_forward(make_hf_gpt_neo):
  hf_model = make_hf_gpt_neo(**ARCHITECTURES["odd_layers"])
  model, params = _load(hf_model)
  ids, mask = left_padded(_rows(4, model.config.vocab_size, (11, 6, 2)), pad_id=0)
  full = np.asarray(_apply(model)(params, ids, mask)["logits"])
  positions = gpt_neo.default_positions(jnp.asarray(mask))
  batch, length = ids.shape

  step = jax.jit(lambda cache, i: model.apply(
      {"params": params}, jax.lax.dynamic_slice_in_dim(jnp.asarray(ids), i, 1, 1),
      jax.lax.dynamic_slice_in_dim(jnp.asarray(mask), i, 1, 1),
      jax.lax.dynamic_slice_in_dim(positions, i, 1, 1), cache=cache))
  cache = gpt_neo.init_cache(model.config, batch, length + 3)  # Spare columns stay unused.
  incremental = []
  for i in range(length):
    out = step(cache, i)
    cache = out["cache"]
    incremental.append(np.asarray(out["logits"][:, 0]))
  incremental = np.stack(incremental, axis=1)
  real = mask.astype(bool)
  assert np.abs(incremental[real] - full[real]).max() <= 1e-4
  assert int(cache["index"]) == length
  np.testing.assert_array_equal(np.asarray(cache["segment_ids"][:, :length]), mask)

  # A prefill of several tokens followed by single steps agrees as well.
  cache = gpt_neo.init_cache(model.config, batch, length)
  split = 7
  prefill = _apply(model)(params, ids[:, :split], mask[:, :split], positions[:, :split],
                        cache=cache)
  rest = _apply(model)(params, ids[:, split:], mask[:, split:], positions[:, split:],
                     cache=prefill["cache"])
  chunked = np.concatenate([np.asarray(prefill["logits"]), np.asarray(rest["logits"])], axis=1)
  assert np.abs(chunked[real] - full[real]).max() <= 1e-4


def test_layer_loop_equals_scanned_layers(make_hf_gpt_neo):
  scanned, params = _load(make_hf_gpt_neo(**ARCHITECTURES["odd_layers"]))
  looped = gpt_neo.GPTNeo(scanned.config, scan_layers=False)
  unstacked = gpt_neo.unstack_layers(params)
  # The unstacked tree is exactly what the looped model itself would initialise.
  assert jax.tree.structure(gpt_neo.param_shapes(looped)) == jax.tree.structure(unstacked)
  np.testing.assert_array_equal(unstacked["h_2"]["mlp"]["c_fc"]["kernel"],
                                params["h"]["mlp"]["c_fc"]["kernel"][2])
  ids, mask = left_padded(_rows(8, scanned.config.vocab_size, (11, 6, 2)), pad_id=0)
  full = np.asarray(_apply(scanned)(params, ids, mask)["logits"])
  np.testing.assert_allclose(np.asarray(_apply(looped)(unstacked, ids, mask)["logits"]), full,
                             atol=1e-5, rtol=0)
  # Decoding with either cache layout: per-layer arrays, or the stacked one (kept stacked).
  split = 8
  for per_layer in (True, False):
    cache = gpt_neo.init_cache(looped.config, ids.shape[0], ids.shape[1], per_layer=per_layer)
    prefill = _apply(looped)(unstacked, ids[:, :split], mask[:, :split], cache=cache)
    rest = _apply(looped)(unstacked, ids[:, split:], mask[:, split:],
                          gpt_neo.default_positions(jnp.asarray(mask))[:, split:],
                          cache=prefill["cache"])
    assert isinstance(rest["cache"]["k"], tuple) == per_layer
    chunked = np.concatenate([np.asarray(prefill["logits"]), np.asarray(rest["logits"])], axis=1)
    real = mask.astype(bool)
    assert np.abs(chunked[real] - full[real]).max() <= 1e-4


def test_last_only_returns_the_last_column(make_hf_gpt_neo):
  model, params = _load(make_hf_gpt_neo())
  ids, mask = left_padded(_rows(5, model.config.vocab_size), pad_id=0)
  full = _apply(model)(params, ids, mask)["logits"]
  last = _apply(model)(params, ids, mask, last_only=True)["logits"]
  assert last.shape == (ids.shape[0], 1, model.config.vocab_size)
  np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-6, rtol=0)


def test_given_position_embeddings_replace_the_lookup(make_hf_gpt_neo):
  """`position_embeddings` (what generation passes) gives the `positions` lookup's output,
  and a different row changes it (so the argument is used, not ignored)."""
  model, params = _load(make_hf_gpt_neo())
  ids, mask = left_padded(_rows(5, model.config.vocab_size), pad_id=0)
  positions = gpt_neo.default_positions(jnp.asarray(mask))
  rows = jnp.take(params["wpe"]["embedding"], positions, axis=0)  # [B, T, D]
  looked_up = _apply(model)(params, ids, mask)["logits"]
  given = _apply(model)(params, ids, mask, position_embeddings=rows)["logits"]
  np.testing.assert_allclose(np.asarray(given), np.asarray(looked_up), atol=1e-6, rtol=0)
  shifted = _apply(model)(params, ids, mask, position_embeddings=jnp.roll(rows, 1, axis=1))
  assert np.abs(np.asarray(shifted["logits"]) - np.asarray(looked_up)).max() > 1e-3


# bfloat16 keeps 8 bits of mantissa: relative error ~ 2^-8 per rounding, accumulated over a few
# matmuls. The stated tolerance: max |bf16 - f32| <= 0.05 * max |f32 logits|, and the bf16 argmax
# agrees with the float32 one wherever float32's top-2 margin exceeds that tolerance.
BF16_RELATIVE_TOLERANCE = 0.05


def test_bfloat16_compute_is_close_to_float32_and_finite(make_hf_gpt_neo):
  hf_model = make_hf_gpt_neo(**ARCHITECTURES["global_local"])
  model32, params = _load(hf_model)
  model16 = gpt_neo.GPTNeo(model32.config, dtype=jnp.bfloat16)
  ids, mask = left_padded(_rows(6, model32.config.vocab_size), pad_id=0)
  logits32 = np.asarray(_apply(model32)(params, ids, mask)["logits"])
  logits16 = _apply(model16)(params, ids, mask)["logits"]
  assert logits16.dtype == jnp.float32  # Upcast at the LM head; the computation ran in bf16.
  logits16 = np.asarray(logits16)
  assert np.isfinite(logits16).all()  # Padding columns included.
  real = mask.astype(bool)
  tolerance = BF16_RELATIVE_TOLERANCE * np.abs(logits32[real]).max()
  error = np.abs(logits16[real] - logits32[real]).max()
  assert 0 < error <= tolerance  # > 0: bf16 really was used.
  top2 = np.sort(logits32[real], axis=-1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
  np.testing.assert_array_equal(logits16[real].argmax(-1)[clear], logits32[real].argmax(-1)[clear])


def test_bfloat16_kv_cache_is_finite_with_left_padding(make_hf_gpt_neo):
  model32, params = _load(make_hf_gpt_neo(**ARCHITECTURES["global_local"]))
  model16 = gpt_neo.GPTNeo(model32.config, dtype=jnp.bfloat16)
  ids, mask = left_padded(_rows(7, model32.config.vocab_size), pad_id=0)
  cache = gpt_neo.init_cache(model16.config, ids.shape[0], ids.shape[1] + 1, jnp.bfloat16)
  out = _apply(model16)(params, ids, mask, cache=cache)
  assert out["cache"]["k"].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out["logits"])).all()
  assert np.isfinite(np.asarray(out["cache"]["k"], np.float32)).all()


def _with_dropout(config: gpt_neo.GPTNeoConfig, rate: float) -> gpt_neo.GPTNeoConfig:
  return dataclasses.replace(config, embed_dropout=rate, attention_dropout=rate,
                             resid_dropout=rate)


def test_dropout_only_when_not_deterministic():
  config = _with_dropout(gpt_neo.tiny_config(vocab_size=64, hidden_size=32), 0.3)
  model = gpt_neo.GPTNeo(config)
  params = _init(model)
  ids = jax.random.randint(jax.random.key(1), (2, 10), 0, 64)
  mask = jnp.ones_like(ids)
  jitted = _apply(model)
  apply = lambda deterministic, seed: np.asarray(jitted(
      params, ids, mask, deterministic=deterministic, rngs={"dropout": jax.random.key(seed)})["logits"])
  base = np.asarray(_apply(model)(params, ids, mask)["logits"])  # No rng needed.
  np.testing.assert_array_equal(apply(True, 0), base)
  np.testing.assert_array_equal(apply(True, 1), base)
  dropped0, dropped1 = apply(False, 0), apply(False, 1)
  assert np.abs(dropped0 - base).max() > 1e-3
  assert np.abs(dropped0 - dropped1).max() > 1e-3
  np.testing.assert_array_equal(apply(False, 0), dropped0)  # Same rng, same mask.


def test_remat_gives_same_loss_and_gradients():
  config = gpt_neo.tiny_config(vocab_size=64, hidden_size=32, attention_layers=("global", "local", "global"),
                               window_size=3)
  plain, remat = gpt_neo.GPTNeo(config), gpt_neo.GPTNeo(config, remat=True)
  params = _init(plain)
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
  segments = jnp.ones_like(ids).at[1, :4].set(0)

  def loss_fn(module):
    def loss(p):
      logits = module.apply({"params": p}, ids[:, :-1], segments[:, :-1])["logits"]
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
      weights = segments[:, 1:]
      return jnp.sum(nll * weights) / jnp.sum(weights)
    return jax.jit(jax.value_and_grad(loss))

  loss_plain, grads_plain = loss_fn(plain)(params)
  loss_remat, grads_remat = loss_fn(remat)(params)
  np.testing.assert_allclose(float(loss_remat), float(loss_plain), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6,
                                                       rtol=1e-5), grads_remat, grads_plain)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_plain)) > 0
  # The remat model really rematerialises: its backward pass holds a checkpoint (remat) primitive.
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(
      remat.apply({"params": p}, ids, segments)["logits"])))(params))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_config_round_trips_through_hf_dict(make_hf_gpt_neo):
  hf_config = make_hf_gpt_neo(**ARCHITECTURES["odd_layers"]).config
  config = gpt_neo.GPTNeoConfig.from_hf_dict(hf_config.to_dict())
  assert config.attention_layers == tuple(hf_config.attention_layers)
  assert config.window_size == hf_config.window_size
  assert gpt_neo.GPTNeoConfig.from_hf_dict(config.to_hf_dict()) == config
  # HF rebuilds the same layer list from our run-length encoding, alternating or not.
  for layers in (("global", "local") * 2, ("local", "global", "local")):
    ours = gpt_neo.tiny_config(attention_layers=layers)
    rebuilt = transformers.GPTNeoConfig(**ours.to_hf_dict())
    assert tuple(rebuilt.attention_layers) == layers


def test_num_params_matches_hf(make_hf_gpt_neo):
  hf_model = make_hf_gpt_neo(**ARCHITECTURES["many_heads"])
  config = gpt_neo.GPTNeoConfig.from_hf_dict(hf_model.config.to_dict())
  assert config.num_params == sum(p.numel() for p in hf_model.model.parameters())
  shapes = gpt_neo.param_shapes(gpt_neo.GPTNeo(config))
  assert config.num_params == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def test_logical_axes_cover_every_parameter():
  model = gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=64, hidden_size=32), score_head=True)
  axes = gpt_neo.logical_axes(model)
  shapes = gpt_neo.param_shapes(model)
  for spec, shape in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                         jax.tree.leaves(shapes)):
    assert len(spec) == len(shape.shape)
  assert axes["h"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "heads")


def test_last_token_index_of_masks_and_segment_ids():
  """The last real column per row, -1 for an empty row; `sequence_scores` reads column 0 there."""
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(gpt_neo.last_token_index(mask), [2, 4, 0, -1])
  segment_ids = np.array([[0, 0, 1, 1], [1, 1, 2, 0], [0, 0, 0, 0]], np.int32)  # left pad, packed
  np.testing.assert_array_equal(gpt_neo.last_token_index(segment_ids), [3, 2, -1])
  scores = np.arange(12, dtype=np.float32).reshape(3, 4)
  np.testing.assert_array_equal(gpt_neo.sequence_scores(scores, segment_ids), [3.0, 6.0, 8.0])
