"""The compiled sampler: HF greedy parity, one compiled loop, filtering, EOS handling, logprobs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import hf_position_ids, left_padded
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf

NEW_TOKENS = 32
PROMPT_LENGTHS = (9, 5, 1, 13)


@pytest.fixture(scope="module")
def policy(make_hf_gpt_neo):
  """(HFModel, Flax module, params, prompt_ids, prompt_mask) for a tiny global/local GPT-Neo."""
  hf_model = make_hf_gpt_neo(attention_layers=("global", "local", "global"), window_size=6)
  config, params, _, _ = hf.load_checkpoint(str(hf_model.path))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
  ids, mask = left_padded(prompts, pad_id=0)
  return hf_model, gpt_neo.GPTNeo(config), params, ids, mask


def _settings(**overrides) -> decode.SamplingSettings:
  fields = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=0, pad_token_id=0)
  return decode.SamplingSettings(**{**fields, **overrides})


def _generate(policy, settings, seed=0) -> decode.Samples:
  _, model, params, ids, mask = policy
  return jax.device_get(decode.generate(model, params, ids, mask, jax.random.key(seed), settings))


def _hf_greedy(hf_model, ids: np.ndarray, mask: np.ndarray, eos_token_id: int) -> np.ndarray:
  """HF's greedy continuation [B, NEW_TOKENS], padded with `eos_token_id` after each row's EOS."""
  with torch.no_grad():
    out = hf_model.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                            do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos_token_id,
                            pad_token_id=eos_token_id)
  new = out[:, ids.shape[1]:].numpy()
  return np.pad(new, ((0, 0), (0, NEW_TOKENS - new.shape[1])), constant_values=eos_token_id)


def test_greedy_matches_hf_generate(policy):
  hf_model, _, _, ids, mask = policy
  greedy = _generate(policy, _settings())
  assert (greedy.tokens != 0).all()  # This model never picks EOS (0) greedily: all 32 are real.
  assert greedy.lengths.tolist() == [NEW_TOKENS] * len(PROMPT_LENGTHS) and not greedy.ended.any()
  assert np.unique(greedy.tokens).size > 5  # Not a degenerate repetition.
  np.testing.assert_array_equal(greedy.tokens, _hf_greedy(hf_model.model, ids, mask, eos_token_id=0))


def test_greedy_logprobs_are_log_softmax_of_full_forward(policy):
  _, model, params, ids, mask = policy
  samples = _generate(policy, _settings())
  logits = _full_forward_logits(model, params, ids, mask, samples)
  expected = np.take_along_axis(jax.nn.log_softmax(logits), samples.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(samples.logprobs, expected, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(samples.tokens, logits.argmax(-1))  # Greedy = argmax.


def _full_forward_logits(model, params, prompt_ids, prompt_mask, samples) -> np.ndarray:
  """Logits predicting each response token, from one pass over prompt + response: [B, N, V]."""
  ids = np.concatenate([prompt_ids, samples.tokens], axis=1)
  segments = np.concatenate([prompt_mask, samples.mask.astype(np.int32)], axis=1)
  logits = model.apply({"params": params}, ids, segments)["logits"]
  return np.asarray(logits[:, prompt_ids.shape[1] - 1:-1])


def test_sampled_logprobs_match_full_forward_with_temperature(policy):
  _, model, params, ids, mask = policy
  settings = _settings(temperature=0.7, top_k=50, top_p=0.95)
  samples = _generate(policy, settings, seed=3)
  logits = _full_forward_logits(model, params, ids, mask, samples)
  # Logprobs are of the tempered distribution before top-k/top-p filtering (what PPO recomputes).
  expected = np.take_along_axis(jax.nn.log_softmax(logits / 0.7), samples.tokens[..., None], -1)[..., 0]
  real = samples.mask > 0
  assert np.abs(samples.logprobs[real] - expected[real]).max() <= 1e-4
  assert (samples.logprobs[~real] == 0).all()
  # Every sampled token survived the filters applied to the same logits.
  filtered = np.asarray(jax.vmap(functools.partial(decode.process_logits, settings=settings))(
      jnp.asarray(logits)))
  assert np.isfinite(np.take_along_axis(filtered, samples.tokens[..., None], -1)[real]).all()


def test_same_key_same_samples_other_key_other_samples(policy):
  settings = _settings(temperature=1.0)
  first, again, other = (_generate(policy, settings, seed) for seed in (7, 7, 8))
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert (first.tokens != other.tokens).mean() > 0.5


def test_near_zero_temperature_and_top_k_1_are_greedy(policy):
  greedy = _generate(policy, _settings()).tokens
  cold = _generate(policy, _settings(temperature=1e-4), seed=1).tokens
  top1 = _generate(policy, _settings(temperature=1.5, top_k=1), seed=2).tokens
  np.testing.assert_array_equal(cold, greedy)
  np.testing.assert_array_equal(top1, greedy)


@pytest.mark.parametrize("which_rows", ["some", "all"])
def test_eos_stops_a_row_and_the_rest_is_padding(policy, which_rows):
  hf_model, _, _, ids, mask = policy
  free = _generate(policy, _settings())  # Never stops: EOS 0 never comes up (see above).
  # Make EOS a token that row 1 produces within 4 steps and that some / all rows produce at all
  # ("all": every row stops, so the loop ends before max_new_tokens).
  in_every_row = lambda t: all(t in row for row in free.tokens)
  eos = next(int(t) for t in free.tokens[1, :4] if in_every_row(t) == (which_rows == "all"))
  stopped = _generate(policy, _settings(eos_token_id=eos, pad_token_id=0))
  for row in range(len(PROMPT_LENGTHS)):
    hits = np.flatnonzero(free.tokens[row] == eos)
    length = int(hits[0]) + 1 if hits.size else NEW_TOKENS
    assert stopped.lengths[row] == length
    assert bool(stopped.ended[row]) == bool(hits.size)
    np.testing.assert_array_equal(stopped.tokens[row, :length], free.tokens[row, :length])
    assert (stopped.tokens[row, length:] == 0).all()
    np.testing.assert_array_equal(stopped.mask[row], np.arange(NEW_TOKENS) < length)
    np.testing.assert_allclose(stopped.logprobs[row, :length], free.logprobs[row, :length], atol=1e-5)
    assert (stopped.logprobs[row, length:] == 0).all()
  assert stopped.ended[1] and stopped.lengths[1] <= 4
  assert stopped.ended.all() == (which_rows == "all")
  # HF stops the same rows at the same steps (and pads with pad_token_id).
  with torch.no_grad():
    out = hf_model.model.generate(
        torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(), do_sample=False,
        max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
  new = out[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(stopped.tokens[:, :new.shape[1]], new)
  assert (stopped.tokens[:, new.shape[1]:] == 0).all()


def test_generation_is_one_compiled_loop(policy):
  _, model, params, ids, mask = policy
  settings = _settings(temperature=1.0)

  def primitives(jaxpr) -> list[str]:
    names = []
    for eqn in jaxpr.eqns:
      names.append(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            names += primitives(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            names += primitives(sub)
    return names

  def trace(steps: int) -> list[str]:
    fn = lambda p, i, m, r: decode.generate(model, p, i, m, r,
                                              dataclasses.replace(settings, max_new_tokens=steps))
    return primitives(jax.make_jaxpr(fn)(params, ids, mask, jax.random.key(0)).jaxpr)

  short, long = trace(4), trace(64)
  assert short.count("while") == 1
  # The loop is not unrolled: the program does not grow with the number of new tokens.
  assert len(short) == len(long)

  decode.generate(model, params, ids, mask, jax.random.key(0), settings)  # Compiled (or cached).
  cache_size = decode.generate._cache_size()
  decode.generate(model, params, ids + 1, mask, jax.random.key(1), settings)
  assert decode.generate._cache_size() == cache_size  # New values, same shapes: no retrace.
  decode.generate(model, params, ids[:, 1:], mask[:, 1:], jax.random.key(1), settings)
  assert decode.generate._cache_size() == cache_size + 1  # The counter does count traces.


def test_layer_loop_and_scanned_decoding_agree(policy):
  _, model, params, ids, mask = policy
  settings = _settings(temperature=1.0)
  looped = _generate(policy, settings, seed=4)  # The default on CPU: a loop over the layers.
  scanned = jax.device_get(decode.generate(model, params, ids, mask, jax.random.key(4), settings,
                                             layer_loop=False))
  np.testing.assert_array_equal(looped.tokens, scanned.tokens)
  np.testing.assert_allclose(looped.logprobs, scanned.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_feature_major_decoding_agrees_with_the_flax_step(policy, temperature):
  # The default on CPU for models over 64 MB; forced here on the tiny model.
  hf_model, model, params, ids, mask = policy
  assert not decode.default_feature_major(model)
  run = lambda settings, fm: jax.device_get(decode.generate(
      model, params, ids, mask, jax.random.key(7), settings, feature_major=fm))
  free = run(_settings(temperature=temperature), False)  # EOS 0 never comes up (see above).
  if temperature == 0.0:
    np.testing.assert_array_equal(run(_settings(), True).tokens,
                                  _hf_greedy(hf_model.model, ids, mask, eos_token_id=0))
  # EOS: the token row 1 produces at step 3, so rows end early and must stay ended.
  settings = _settings(temperature=temperature, eos_token_id=int(free.tokens[1, 3]))
  flax_step, feature_major = run(settings, False), run(settings, True)
  assert flax_step.ended[1] and flax_step.lengths[1] <= 4
  np.testing.assert_array_equal(feature_major.tokens, flax_step.tokens)
  np.testing.assert_array_equal(feature_major.lengths, flax_step.lengths)
  np.testing.assert_array_equal(feature_major.ended, flax_step.ended)
  np.testing.assert_allclose(feature_major.logprobs, flax_step.logprobs, atol=1e-5, rtol=0)


def test_process_logits_top_k_keeps_exactly_the_k_largest():
  logits = jnp.array([[0.1, 2.0, -1.0, 1.5, 0.7], [3.0, -2.0, 0.0, 1.0, 2.5]])
  out = decode.process_logits(logits, _settings(temperature=1.0, top_k=2))
  expected_kept = np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(np.isfinite(out), expected_kept)
  np.testing.assert_array_equal(np.asarray(out)[expected_kept], np.asarray(logits)[expected_kept])


def test_process_logits_top_p_keeps_the_smallest_prefix_reaching_p():
  probs = np.array([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.4, 0.1]])
  logits = jnp.log(jnp.asarray(probs))
  settings = _settings(temperature=1.0)
  keep = lambda p: np.isfinite(decode.process_logits(logits, dataclasses.replace(settings, top_p=p)))
  # Row 0 sorted: 0.5, 0.3, 0.15, 0.05; the mass before each token: 0, 0.5, 0.8, 0.95.
  # Row 1 sorted: 0.4, 0.25, 0.25, 0.1; the mass before: 0, 0.4, 0.65, 0.9. A tie is kept whole.
  np.testing.assert_array_equal(keep(0.45), [[0, 1, 0, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(keep(0.7), [[0, 1, 0, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(keep(0.85), [[0, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(keep(0.99), [[1, 1, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(keep(0.3), [[0, 1, 0, 0], [0, 0, 1, 0]])


def test_process_logits_matches_hf_warpers():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 97)).astype(np.float32) * 3
  for temperature, top_k, top_p in ((0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.6)):
    ours = np.asarray(decode.process_logits(
        jnp.asarray(logits), _settings(temperature=temperature, top_k=top_k, top_p=top_p)))
    warped = torch.from_numpy(logits)
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k:
      warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
      warpers.append(transformers.TopPLogitsWarper(top_p))
    for warper in warpers:
      warped = warper(None, warped)
    theirs = warped.numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


def test_sample_categorical_draws_the_softmax_distribution():
  probs = np.array([0.5, 0.0, 0.2, 0.25, 0.05], np.float32)
  logits = jnp.log(jnp.asarray(probs))  # log 0 = -inf: a filtered token.
  rows = 40000
  draws = np.asarray(jax.jit(decode.sample_categorical)(
      jax.random.key(3), jnp.broadcast_to(logits, (rows, len(probs)))))
  counts = np.bincount(draws, minlength=len(probs))
  assert counts[1] == 0  # Never a token of probability 0.
  # Each frequency within 5 standard errors of its probability.
  np.testing.assert_allclose(counts / rows, probs, atol=5 * np.sqrt(0.25 / rows))
  # The same key gives the same draws.
  again = np.asarray(decode.sample_categorical(jax.random.key(3),
                                                 jnp.broadcast_to(logits, (rows, len(probs)))))
  np.testing.assert_array_equal(draws, again)


def test_first_max_index_is_argmax_with_ties_and_infinities():
  rng = np.random.default_rng(0)
  logits = rng.integers(-3, 3, size=(64, 37)).astype(np.float32)  # Many ties.
  logits[0] = -np.inf
  logits[1, [4, 9]] = np.inf
  np.testing.assert_array_equal(jax.jit(decode.first_max_index)(logits),
                                np.argmax(logits, axis=-1))


@pytest.mark.parametrize("vocab", [2, 37, 1024, 50257])
def test_sample_categorical_over_blocks_draws_the_distribution(vocab):
  """The two-level inverse CDF at vocabulary sizes that are and are not whole blocks: frequencies
  of a few heavy tokens match their probabilities, the rest of the mass falls on the many light
  ones, and tokens of probability 0 (including every one in a zero block) are never drawn."""
  rng = np.random.default_rng(vocab)
  logits = np.full(vocab, -np.inf, np.float32)
  alive = rng.choice(vocab, size=min(vocab, 200), replace=False)
  logits[alive] = rng.normal(size=len(alive)).astype(np.float32)
  heavy = alive[:2]
  logits[heavy] = [4.0, 3.0]
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  rows = 20000
  draws = np.asarray(jax.jit(decode.sample_categorical)(
      jax.random.key(vocab), jnp.broadcast_to(jnp.asarray(logits), (rows, vocab))))
  assert draws.min() >= 0 and draws.max() < vocab
  assert np.isin(draws, alive).all()  # Never a token of probability 0.
  frequencies = np.bincount(draws, minlength=vocab) / rows
  np.testing.assert_allclose(frequencies[heavy], probs[heavy], atol=5 * np.sqrt(0.25 / rows))
  # Where the light mass goes, by halves of the vocabulary.
  light = np.setdiff1d(np.arange(vocab), heavy)
  for part in np.array_split(light, 2):
    assert abs(frequencies[part].sum() - probs[part].sum()) < 5 * np.sqrt(0.25 / rows)
