"""The PPO phase (rlhf_jax/training/ppo.py) wired to real models, in miniature.

The pure mathematics (GAE, losses, KL estimators, whitening, controllers) is tested against NumPy in
test_ppo_core.py; this file tests what only the wiring can get wrong:
- the data path: which token the reward model reads, which logit/value column belongs to which
  response token, where the score lands, for left-padded prompts and early-EOS responses
  (references: Hugging Face's PyTorch GPT-Neo on each unpadded row);
- the sampler's behaviour logprobs against the learner's full forward pass;
- reproducibility of sampling and of a whole PPO iteration;
- learning: a toy reward rises under PPO while the KL penalty keeps the policy away from collapse;
  also with the value head on the policy trunk;
- the approx-KL early stop, resume through the ppo phase, frozen models untouched and not donated, and
  the documented config defaults reaching the iteration.

Models are tiny GPT-Neos; every compiled PPO iteration is built once per module and shared.
"""

import dataclasses
import functools
import json
import pathlib
import shutil
import types
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch

from conftest import left_padded
from conftest import save_tiny_sft_and_reward
from conftest import tiny_ppo_config
from rlhf_jax import checkpoints
from rlhf_jax import phases
from rlhf_jax.configs import ppo as ppo_config
from rlhf_jax.errors import UserError
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import ppo
from rlhf_jax.training import ppo_core
from rlhf_jax.training import rewards

# Parity models (HF-randomised, see conftest.randomize_): token 42 is one this random policy emits
# often, so with it as EOS some sampled rows end early and others run to the length limit.
PARITY_VOCAB = 48
PARITY_EOS = 42
PARITY_PROMPT_LENGTHS = (9, 5, 1, 13, 2, 7, 11, 4)
PARITY_NEW_TOKENS = 16

# PPO-iteration models (Flax's initialisation: a near-uniform policy over the vocabulary).
VOCAB = 48
EOS = VOCAB - 1  # gpt_neo.tiny_config's EOS.
TARGET = 5  # The token the toy reward counts.
NEW_TOKENS = 12
PROMPT_LENGTHS = (7, 3, 1, 5, 7, 2, 4, 6)
EPOCHS, MINIBATCHES = 4, 2
KL_COEF = 0.25  # Fixed (adaptive_kl off). At 0.25 the KL-regularised optimum emits TARGET about
# 2/3 of the time here: well short of the reward's maximiser, which answers only TARGET.
LR = 1e-3


# ---------------------------------------------------------------------------------------------
# Models


class TokenCounter(nn.Module):
  """A toy reward model with the interface of `gpt_neo.GPTNeo(score_head=True)`.

  The per-column score is `per_occurrence` times the number of `token`s among the real tokens up
  to that column, so read at a row's last real token (as `ppo.score_responses` does) it is +1 per
  occurrence in prompt + response. Padding (segment 0) and the masked-out EOS never count.
  """
  token: int

  @nn.compact
  def __call__(self, input_ids, segment_ids, positions=None, *, lm_head=False, **unused):
    """input_ids, segment_ids: int32 [B, T] -> {"scores": float32 [B, T]}."""
    del positions, lm_head, unused  # Same call signature as GPTNeo; only ids and segments matter.
    per_occurrence = self.param("per_occurrence", nn.initializers.ones, ())
    hits = (input_ids == self.token) & (segment_ids > 0)
    return {"scores": per_occurrence * jnp.cumsum(hits, axis=1).astype(jnp.float32)}


@pytest.fixture(scope="module")
def parity(make_hf_gpt_neo):
  """HF policy and reward models (PyTorch) and the same weights as Flax params."""
  kwargs = dict(vocab_size=PARITY_VOCAB, eos_token_id=PARITY_EOS, window_size=4)
  hf_policy = make_hf_gpt_neo(seed=0, **kwargs)
  hf_reward = make_hf_gpt_neo(seed=1, classifier=True, **kwargs)
  config, policy_params, _, _ = hf.load_checkpoint(str(hf_policy.path))
  _, reward_params, _, _ = hf.load_checkpoint(str(hf_reward.path))
  return types.SimpleNamespace(
      hf_policy=hf_policy.model, hf_reward=hf_reward.model, config=config,
      policy=gpt_neo.GPTNeo(config), policy_params=policy_params,
      reward=gpt_neo.GPTNeo(config, score_head=True), reward_params=reward_params)


def _random_prompts(lengths, vocab, avoid, seed) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded random prompts (int32 ids, float32 mask) without the tokens in `avoid`."""
  rng = np.random.default_rng(seed)
  allowed = [t for t in range(vocab) if t not in avoid]
  ids, mask = left_padded([rng.choice(allowed, n).tolist() for n in lengths], pad_id=max(avoid))
  return ids, mask.astype(np.float32)


# The data-path pieces of ppo.py, compiled once per shape (eager Flax is slow on CPU).
_response_outputs = jax.jit(ppo.response_outputs, static_argnames=(
    "model", "prompt_length", "response_length", "lm_head", "entropy"))
_score_responses = jax.jit(ppo.score_responses, static_argnames=("reward_model", "eos_token_id"))


def _host_copy(tree):
  """NumPy copies of a tree's arrays (device_get may return views of buffers a donation reuses)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _hf_lm_logprobs(hf_model, tokens: list[int], temperature: float) -> np.ndarray:
  """log_softmax(logits / T) of an unpadded sequence: float64 [T, V], row t predicts t + 1."""
  with torch.no_grad():
    logits = hf_model(torch.tensor([tokens])).logits[0].double()
  return torch.log_softmax(logits / temperature, dim=-1).numpy()


def _hf_token_scores(hf_classifier, tokens: list[int]) -> np.ndarray:
  """The score head on every column of an unpadded sequence: float64 [T]."""
  with torch.no_grad():
    hidden = hf_classifier.transformer(torch.tensor([tokens])).last_hidden_state
    return hf_classifier.score(hidden)[0, :, 0].double().numpy()


# ---------------------------------------------------------------------------------------------
# The data path: reward reading, column alignment, score placement


def test_data_path_reads_the_last_real_token_and_aligns_columns(parity):
  """Hand-made responses: early EOS, no EOS, EOS first; padding after EOS is the EOS id itself
  (as with GPT-2's tokenizer), so only the mask tells padding from a real EOS."""
  temperature = 0.7
  ids, mask = _random_prompts((5, 2, 7, 1), PARITY_VOCAB, avoid={PARITY_EOS}, seed=1)
  prompt_length, n = ids.shape[1], 6
  e = PARITY_EOS
  tokens = np.array([[3, 9, e, e, e, e],    # Two tokens, then EOS.
                     [4, 4, 8, 1, 2, 7],    # Length limit, no EOS.
                     [e, e, e, e, e, e],    # EOS straight away: nothing to score but the prompt.
                     [5, 6, 7, 8, e, e]],   # Four tokens, then EOS.
                    np.int32)
  lengths = np.array([3, 6, 1, 5])
  response_mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)

  scores = _score_responses(parity.reward, parity.reward_params, ids, mask, tokens,
                            response_mask, PARITY_EOS)
  sequences = ppo.sequences(ids, mask, tokens, response_mask)
  policy_out = _response_outputs(parity.policy, parity.policy_params, sequences, prompt_length,
                                 n, lm_head=True, temperature=temperature, tokens=tokens)
  value_out = _response_outputs(parity.reward, parity.reward_params, sequences, prompt_length,
                                n, lm_head=False)

  for b in range(len(tokens)):
    prompt = ids[b][mask[b] > 0].tolist()
    response = tokens[b, :lengths[b]].tolist()
    without_eos = [t for t in response if t != PARITY_EOS]
    # The reward model scores prompt + response without the EOS, at its last real token.
    expected_score = _hf_token_scores(parity.hf_reward, prompt + without_eos)[-1]
    np.testing.assert_allclose(scores[b], expected_score, rtol=1e-4, atol=1e-4)
    # Column P + j - 1 predicts response token j; the value before token j sits there too.
    logprobs = _hf_lm_logprobs(parity.hf_policy, prompt + response, temperature)
    values = _hf_token_scores(parity.hf_reward, prompt + response)
    for j, token in enumerate(response):
      column = len(prompt) + j - 1
      np.testing.assert_allclose(policy_out["logprobs"][b, j], logprobs[column, token], atol=1e-4)
      np.testing.assert_allclose(value_out["values"][b, j], values[column], rtol=1e-4, atol=1e-4)

  # The score lands on the last real response token: the EOS of rows that ended, the last column
  # of a row cut by the length limit; the rest of the reward is the per-token KL penalty.
  ref_logprobs = np.asarray(policy_out["logprobs"]) - 0.1  # Any reference: KL = 0.1 per token.
  rewards, _, _ = ppo_core.kl_penalty_rewards(scores, policy_out["logprobs"], ref_logprobs,
                                              response_mask, kl_coef=0.5)
  expected = np.where(response_mask > 0, -0.5 * 0.1, 0.0)
  for b in range(len(tokens)):
    expected[b, lengths[b] - 1] += float(scores[b])
  np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Rollouts: behaviour logprobs and reproducibility


def _parity_settings(temperature: float) -> decode.SamplingSettings:
  return decode.SamplingSettings(max_new_tokens=PARITY_NEW_TOKENS, temperature=temperature,
                                   eos_token_id=PARITY_EOS, pad_token_id=PARITY_EOS)


def _parity_rollout(parity, temperature: float, seed: int):
  ids, mask = _random_prompts(PARITY_PROMPT_LENGTHS, PARITY_VOCAB, avoid={PARITY_EOS}, seed=0)
  samples = decode.generate(parity.policy, parity.policy_params, ids, mask,
                              jax.random.key(seed), _parity_settings(temperature))
  return ids, mask, jax.device_get(samples)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_rollout_logprobs_match_the_learners_full_forward_pass(parity, temperature):
  ids, mask, samples = _parity_rollout(parity, temperature, seed=0)
  # The rollout must cover what the check is about: rows that ended early and rows that did not.
  assert 0 < samples.ended.sum() < len(ids)
  assert samples.lengths[samples.ended].min() < PARITY_NEW_TOKENS
  sequences = ppo.sequences(ids, mask, samples.tokens, samples.mask)
  recomputed = _response_outputs(parity.policy, parity.policy_params, sequences, ids.shape[1],
                                 PARITY_NEW_TOKENS, lm_head=True, temperature=temperature,
                                 tokens=samples.tokens)["logprobs"]
  real = samples.mask > 0
  np.testing.assert_allclose(np.asarray(recomputed)[real], samples.logprobs[real], atol=1e-4)
  assert (samples.logprobs[~real] == 0).all()


def test_sampling_is_reproducible_from_its_key(parity):
  _, _, first = _parity_rollout(parity, 1.0, seed=0)
  _, _, again = _parity_rollout(parity, 1.0, seed=0)
  _, _, other = _parity_rollout(parity, 1.0, seed=1)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert (first.tokens != other.tokens).mean() > 0.5


# ---------------------------------------------------------------------------------------------
# Whole PPO iterations on a toy problem


@dataclasses.dataclass(frozen=True)
class Toy:
  """One PPO setup: modules, settings, optimizer, the compiled iteration and its inputs."""
  models: ppo.Models
  settings: ppo.PPOSettings
  tx: optax.GradientTransformation
  step: Callable  # (state, batch, frozen) -> (state, metrics), the state donated as in the loop.
  policy_params: dict
  value_params: dict
  batch: dict
  frozen: dict

  def fresh_state(self, seed: int = 0, stats: tuple[float, float] = (0.0, 1.0)) -> loop.TrainState:
    """Step 0, as the ppo phase builds it: own copies of the params (the state is donated), the
    reward normaliser's (bias, gain) = `stats`."""
    learner = jax.tree.map(jnp.copy, {"policy": self.policy_params, "value": self.value_params})
    reward_stats = {"mean": jnp.float32(stats[0]), "std": jnp.float32(stats[1])}
    state = loop.create_train_state(learner, self.tx, jax.random.key(seed),
                                    extra={"kl_coef": jnp.float32(KL_COEF),
                                           "reward_stats": reward_stats})
    return state.replace(params=state.params["policy"],
                         extra={**state.extra, "value": state.params["value"]})

  def with_settings(self, **changes) -> "Toy":
    """The same problem with other settings (a separate compiled iteration)."""
    settings = dataclasses.replace(self.settings, **changes)
    return dataclasses.replace(self, settings=settings,
                               step=_compile(self.models, settings, self.tx))


def _compile(models: ppo.Models, settings: ppo.PPOSettings, tx) -> Callable:
  iteration = functools.partial(ppo.ppo_iteration, models=models, settings=settings, tx=tx)
  # XLA's backend optimisation off halves the compile time of a whole iteration on CPU; these toy
  # iterations are short, so the slower code costs less than the compile saves.
  return jax.jit(iteration, donate_argnums=0,
                 compiler_options={"xla_backend_optimization_level": 0})


def _init_params(config: gpt_neo.GPTNeoConfig, seed: int) -> dict:
  """Flax-initialised params of `config` with a score head (compiled: faster than eager init)."""
  model = gpt_neo.GPTNeo(config, score_head=True)
  return jax.jit(lambda key: gpt_neo.init_params(model, key))(jax.random.key(seed))


def _toy(shared_value_head: bool) -> Toy:
  config = gpt_neo.tiny_config(vocab_size=VOCAB, hidden_size=32, num_heads=2, window_size=4)
  reference = gpt_neo.GPTNeo(config)
  with_head = gpt_neo.GPTNeo(config, score_head=True)
  head = _init_params(config, seed=1)
  reference_params = {k: v for k, v in head.items() if k != "score"}
  reward = TokenCounter(TARGET)
  reward_params = {"per_occurrence": jnp.float32(1.0)}
  if shared_value_head:  # A fresh value head on the policy trunk, as the ppo phase makes it.
    models = ppo.Models(policy=with_head, reference=reference, value=None, reward=reward)
    policy_params, value_params = head, {}
  else:  # A separate value model.
    models = ppo.Models(policy=reference, reference=reference, value=with_head, reward=reward)
    policy_params, value_params = reference_params, head
  settings = ppo.PPOSettings(
      sampling=decode.SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.7,
                                         eos_token_id=EOS, pad_token_id=EOS),
      num_epochs=EPOCHS, num_minibatches=MINIBATCHES, adaptive_kl=False,
      shared_value_head=shared_value_head)
  tx = optax.adam(LR)
  ids, mask = _random_prompts(PROMPT_LENGTHS, VOCAB, avoid={TARGET, EOS}, seed=0)
  frozen = {"reference": reference_params, "reward": reward_params}
  return Toy(models=models, settings=settings, tx=tx, step=_compile(models, settings, tx),
             policy_params=policy_params, value_params=value_params,
             batch={"prompt_ids": ids, "prompt_mask": mask}, frozen=frozen)


@pytest.fixture(scope="module")
def toy() -> Toy:
  return _toy(shared_value_head=False)


def _train(toy: Toy, state: loop.TrainState, iterations: int):
  """Runs `iterations` PPO iterations on the toy batch: (state, {metric: float64 [iterations]})."""
  history = []
  for _ in range(iterations):
    state, metrics = toy.step(state, toy.batch, toy.frozen)
    history.append(jax.device_get(metrics))
  return state, {k: np.array([float(m[k]) for m in history]) for k in history[0]}


def _reference_on_target_answers(toy: Toy) -> tuple[float, float]:
  """The reference on responses made only of TARGET (the reward's maximiser), at the rollout
  temperature: (KL of that policy to the reference = batch mean of the summed -log p_ref(TARGET),
  the reference's mean per-token entropy along those responses)."""
  ids, mask = toy.batch["prompt_ids"], toy.batch["prompt_mask"]
  tokens = np.full((len(ids), NEW_TOKENS), TARGET, np.int32)
  sequences = ppo.sequences(ids, mask, tokens, np.ones(tokens.shape, np.float32))
  out = _response_outputs(toy.models.reference, toy.frozen["reference"], sequences, ids.shape[1],
                          NEW_TOKENS, lm_head=True, temperature=toy.settings.temperature,
                          tokens=tokens, entropy=True)
  return (float(np.mean(-np.sum(np.asarray(out["logprobs"]), axis=1))),
          float(np.mean(out["entropy"])))


def test_toy_reward_rises_and_kl_grows_but_stays_bounded(toy):
  _, history = _train(toy, toy.fresh_state(), 60)
  score, kl = history["score"], history["kl"]
  assert (history["minibatches_applied"] == EPOCHS * MINIBATCHES).all()
  # Iteration 1 samples from the reference itself: KL 0 up to float noise.
  assert abs(kl[0]) < 1e-3
  # The near-uniform start emits TARGET about NEW_TOKENS / VOCAB times per response.
  start = score[:3].mean()
  assert start < 1.0
  end, end_kl = score[-10:].mean(), kl[-10:].mean()
  assert end > start + 3.0
  assert end_kl > 3.0
  # Bounded: the KL penalty holds the policy well away from the reward's maximiser (all TARGET,
  # which PPO reaches with kl_coef 0 in these 60 iterations), and the KL-penalised return, the
  # objective PPO maximises, is better than at the start.
  collapse_kl, reference_entropy = _reference_on_target_answers(toy)
  assert end < NEW_TOKENS - 1.5
  assert end_kl < 0.75 * collapse_kl
  assert history["return"][-10:].mean() > history["return"][:3].mean() + 1.0
  assert np.isfinite(history["loss"]).all()
  # The entropy metric (mean -log pi of the sampled tokens) starts at the reference's entropy
  # (a near-uniform model: about the same in every context) and falls as TARGET takes over.
  assert abs(history["entropy"][0] - reference_entropy) < 0.05
  assert history["entropy"][-10:].mean() < history["entropy"][0] - 0.5


def test_an_iteration_is_deterministic(toy):
  first, first_metrics = toy.step(toy.fresh_state(), toy.batch, toy.frozen)
  again, again_metrics = toy.step(toy.fresh_state(), toy.batch, toy.frozen)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get((first, first_metrics)),
               jax.device_get((again, again_metrics)))
  # And the iteration did change the learner (so the comparison above is not vacuous).
  assert not np.array_equal(first.params["wte"]["embedding"],
                            toy.policy_params["wte"]["embedding"])


def test_value_model_is_read_in_the_normalised_score_units(toy):
  # The value model starts as the reward model: with normalisation stats (mean 3, std 4) its
  # estimates must be normalised like the scores, value' = (value - 3) / 4, on the same rollout.
  # (The normaliser is part of the train state: computed once per run, saved and restored.)
  assert toy.settings.normalize_scores
  _, plain = toy.step(toy.fresh_state(stats=(0.0, 1.0)), toy.batch, toy.frozen)
  _, shifted = toy.step(toy.fresh_state(stats=(3.0, 4.0)), toy.batch, toy.frozen)
  assert float(shifted["score"]) == float(plain["score"])  # Same rollout, raw scores.
  assert float(shifted["value_mean"]) == pytest.approx((float(plain["value_mean"]) - 3) / 4,
                                                       rel=1e-5, abs=1e-6)
  assert float(shifted["score_normalized"]) == pytest.approx((float(plain["score"]) - 3) / 4,
                                                             rel=1e-5)


def test_frozen_models_are_neither_modified_nor_donated(toy):
  before = _host_copy(toy.frozen)
  state = toy.fresh_state()
  donated = jax.tree.leaves(state)
  for _ in range(2):
    state, _ = toy.step(state, toy.batch, toy.frozen)
  assert any(leaf.is_deleted() for leaf in donated)  # Donation is on: the check below can fail.
  frozen_leaves = jax.tree.leaves(toy.frozen)
  assert not any(leaf.is_deleted() for leaf in frozen_leaves if isinstance(leaf, jax.Array))
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(toy.frozen))


def test_value_head_on_the_policy_trunk_trains():
  toy = _toy(shared_value_head=True)
  state, history = _train(toy, toy.fresh_state(), 30)
  assert state.extra["value"] == {}
  assert np.isfinite(history["loss"]).all() and np.isfinite(history["value_loss"]).all()
  # Both the head and the trunk under it moved, and the policy learned the toy reward.
  head = state.params["score"]["kernel"]
  assert np.abs(head - toy.policy_params["score"]["kernel"]).max() > 1e-3
  assert np.abs(state.params["ln_f"]["scale"] - toy.policy_params["ln_f"]["scale"]).max() > 1e-3
  assert history["score"][-5:].mean() > history["score"][:3].mean() + 1.0
  # The value head learns: its error drops fast from the random head's, and its predictions
  # rise with the returns as the policy earns more.
  assert history["value_error"][1:4].mean() < 0.5 * history["value_error"][0]
  assert history["value_mean"][-5:].mean() > history["value_mean"][:3].mean() + 0.5


def test_rloo_learns_the_toy_reward_without_a_value_model(toy):
  """advantage_estimator=rloo: 4 answers per prompt are each other's baseline; no value model is
  read or trained, and the policy still learns the toy reward."""
  rloo = dataclasses.replace(toy, value_params={}, models=dataclasses.replace(toy.models,
                                                                              value=None))
  rloo = rloo.with_settings(advantage_estimator="rloo", samples_per_prompt=4)
  state, history = _train(rloo, rloo.fresh_state(), 30)
  assert state.extra["value"] == {}
  assert "value_loss" not in history and "value_mean" not in history
  assert np.isfinite(history["loss"]).all()
  assert history["score"][-5:].mean() > history["score"][:3].mean() + 2.0


def test_rloo_config_needs_several_answers_per_prompt():
  config = ppo_config.get_config()
  tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=EOS)
  config.ppo.advantage_estimator = "rloo"
  with pytest.raises(UserError, match="samples_per_prompt"):
    ppo.settings_from_config(config, tokenizer)
  config.rollout.samples_per_prompt = 4
  settings = ppo.settings_from_config(config, tokenizer)
  assert not settings.uses_critic and not settings.shared_value_head
  config.ppo.advantage_estimator = "vtrace"
  with pytest.raises(UserError, match="advantage_estimator=vtrace"):
    ppo.settings_from_config(config, tokenizer)


def test_train_accum_steps_is_rejected_with_the_ppo_key_named():
  config = ppo_config.get_config()
  tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=EOS)
  config.train.accum_steps = 2
  with pytest.raises(UserError, match=r"train\.accum_steps=2.*ppo\.accum_steps"):
    ppo.settings_from_config(config, tokenizer)
  config.train.accum_steps = 1
  config.ppo.accum_steps = 2
  assert ppo.settings_from_config(config, tokenizer).accum_steps == 2


def test_the_learning_rate_schedule_ends_at_the_last_optimizer_update():
  """The phase's optimizer (`ppo.make_optimizer`) counts updates, iterations x epochs x
  minibatches: a linear decay to 0 still steps at the last update and is 0 right after it (sized
  in iterations, as before the #22 audit, it reached 0 after 1/8 of the run)."""
  config = ppo_config.get_config()
  config.train.steps = 5
  config.optim.update(dict(schedule="linear", end_lr_fraction=0.0, warmup_steps=3, clip_norm=0.0,
                           weight_decay=0.0))
  updates = 5 * config.ppo.num_epochs * config.ppo.num_minibatches
  tx = ppo.make_optimizer(config)
  params = {"policy": {"w": jnp.zeros(())}, "value": {}}
  grads = {"policy": {"w": jnp.ones(())}, "value": {}}
  state, steps = tx.init(params), []
  for _ in range(updates + 1):
    step, state = tx.update(grads, state, params)
    steps.append(abs(float(step["policy"]["w"])))
  assert steps[0] == 0.0 and steps[3] > 0  # Warmup from 0, in updates.
  assert steps[updates - 1] > 0 and steps[updates] == 0.0


def test_approx_kl_stop_applies_the_crossing_step_then_skips_the_rest(toy):
  """Minibatch 1 meets the bound (its logprobs are the rollout's) and is applied; after that Adam
  step minibatch 2's approx-KL exceeds it: that step is applied too (TRL's rule, changed with the
  #22 audit: the crossing step used to be dropped), and every later one changes nothing.
  (With an entropy bonus, so that its path runs too: it changes the loss, not the stop.)"""
  stopping = toy.with_settings(approx_kl_stop=1e-6, entropy_coef=0.01)
  state = stopping.fresh_state()
  state, metrics = stopping.step(state, stopping.batch, stopping.frozen)
  assert float(metrics["minibatches_applied"]) == 2.0 < EPOCHS * MINIBATCHES
  adam = next(s for s in jax.tree.leaves(state.opt_state,
                                         is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))
  assert int(adam.count) == 2  # The skipped updates left the optimizer state alone too.

  # The update schedule itself: applied [1, 1, 0, ...]; the second update's approx-KL crossed
  # the bound; the skipped ones did no work (their metrics are the cond's zeros).
  fresh = stopping.fresh_state()
  rolled, keys = jax.jit(functools.partial(ppo.rollout_phase, models=stopping.models,
                                           settings=stopping.settings))(fresh, stopping.batch)
  scored = ppo.score_rollout(stopping.models, stopping.settings, fresh.params,
                             fresh.extra["value"], stopping.frozen, rolled,
                             fresh.extra["reward_stats"])
  advantages = ppo.compute_advantages(stopping.settings, rolled["samples"], scored,
                                      jnp.float32(KL_COEF))
  samples = rolled["samples"]
  data = dict(rolled["sequences"], tokens=samples.tokens, mask=samples.mask,
              old_logprobs=samples.logprobs, advantages=advantages["advantages"],
              old_values=scored["old_values"], returns=advantages["returns"])
  learner = {"policy": fresh.params, "value": fresh.extra["value"]}
  new_learner, _, per_update = jax.jit(ppo.update, static_argnums=(0, 1, 2, 8))(
      stopping.models, stopping.settings, stopping.tx, learner, fresh.opt_state, data,
      keys["permutation"], keys["update"], rolled["prompt_ids"].shape[1],
      fresh.extra["reward_stats"])
  applied = np.asarray(per_update["applied"])
  np.testing.assert_array_equal(applied, [1, 1] + [0] * (EPOCHS * MINIBATCHES - 2))
  approx_kl = np.asarray(per_update["approx_kl"])
  assert approx_kl[0] <= 1e-6 < approx_kl[1]
  assert not np.asarray(per_update["loss"])[2:].any()
  np.testing.assert_array_equal(applied, ppo_core.early_stop_applied(approx_kl, 1e-6))
  # The phase's iteration ran this update: the same learner (up to the compilers' rounding).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               jax.device_get(new_learner),
               jax.device_get({"policy": state.params, "value": state.extra["value"]}))
  # The exact entropy of the applied updates agrees with the rollout estimate (mean -log pi of
  # the sampled tokens): they ran on (nearly) the rollout's own params.
  assert abs(float(metrics["entropy_exact"]) - float(metrics["entropy"])) < 0.05


def test_policy_and_value_gradient_norms_are_logged_apart(toy):
  _, metrics = toy.step(toy.fresh_state(), toy.batch, toy.frozen)
  policy, value = float(metrics["policy_grad_norm"]), float(metrics["value_grad_norm"])
  assert policy > 0 and value > 0
  # Per update grad_norm^2 = policy^2 + value^2; the logged values are means over the updates.
  assert float(metrics["grad_norm"]) <= policy + value + 1e-4
  assert float(metrics["grad_norm"]) >= max(policy, value) - 1e-4


def test_rloo_advantages_are_normalised_per_sequence(toy):
  """advantage_estimator=rloo: the leave-one-out advantages are whitened over sequences (TRL's
  RLOO), not per token, where a long answer's weight could flip another's sign (#22 audit)."""
  settings = dataclasses.replace(toy.settings, advantage_estimator="rloo", samples_per_prompt=3)
  # The audit's example: one prompt, answers 10/1/1 tokens long, returns 1.0/0.6/0.0.
  mask = np.zeros((3, NEW_TOKENS), np.float32)
  mask[0, :10], mask[1, :1], mask[2, :1] = 1, 1, 1
  samples = decode.Samples(tokens=jnp.zeros((3, NEW_TOKENS), jnp.int32),
                           logprobs=jnp.zeros((3, NEW_TOKENS)), mask=jnp.asarray(mask),
                           lengths=jnp.asarray([10, 1, 1]), ended=jnp.ones(3, bool))
  scored = {"scores": jnp.asarray([1.0, 0.6, 0.0]), "ref_logprobs": jnp.zeros((3, NEW_TOKENS))}
  out = ppo.compute_advantages(settings, samples, scored, jnp.float32(0.0))
  first = np.asarray(out["advantages"])[:, 0]
  raw = np.array([0.7, 0.1, -0.8])
  np.testing.assert_allclose(first, (raw - raw.mean()) / raw.std(ddof=1), rtol=1e-4)
  assert (np.sign(first) == np.sign(raw)).all()


# ---------------------------------------------------------------------------------------------
# Resume through the phase itself


def _saved_step(workdir: pathlib.Path, step: int) -> dict:
  """Params and train state of a saved step, as saved (no target tree needed)."""
  manager = ocp.CheckpointManager(workdir / "ppo" / "checkpoint",
                                  item_names=("params", "train_state", "manifest"))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), train_state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return _host_copy({k: restored[k] for k in ("params", "train_state")})


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_tokenizer_dir,
                                                                 capsys):
  _, _, reward_params = save_tiny_sft_and_reward(tmp_path, tiny_tokenizer_dir)

  phases.run_phase("ppo", tiny_ppo_config(), tmp_path)
  uninterrupted = _saved_step(tmp_path, 4)
  # A crash after the step-2 checkpoint: its later checkpoint never happened.
  shutil.rmtree(tmp_path / "ppo" / "checkpoint" / "4")
  capsys.readouterr()
  phases.run_phase("ppo", tiny_ppo_config(), tmp_path)
  assert "resuming from step 2" in capsys.readouterr().out
  resumed = _saved_step(tmp_path, 4)

  jax.tree.map(np.testing.assert_array_equal, uninterrupted, resumed)
  # The compared state is PPO's own: a trained value model and an adapted KL coefficient.
  extra = resumed["train_state"]["extra"]
  assert abs(float(extra["kl_coef"]) - ppo_config.get_config().ppo.init_kl_coef) > 1e-5
  assert not np.array_equal(extra["value"]["score"]["kernel"], reward_params["score"]["kernel"])
  assert int(resumed["train_state"]["step"]) == 4
  # The reward normaliser was computed once (fresh start) and restored, not recomputed.
  stats = extra["reward_stats"]
  assert float(stats["std"]) > 0 and (float(stats["mean"]), float(stats["std"])) != (0.5, 2.0)
  # Updates were counted in optimizer steps: 4 iterations x 4 epochs x 2 minibatches.
  counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
      resumed["train_state"]["opt_state"]) if "count" in jax.tree_util.keystr(path)]
  assert counts and all(int(c) == 4 * 4 * 2 for c in counts)


def _metrics_rows(phase_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["gold", "verifier"])
def test_a_run_on_a_host_reward_source_completes_and_logs_each_source(tmp_path, source,
                                                                      tiny_tokenizer_dir, capsys):
  """reward.sources=gold / verifier: compiled rollout -> host scoring -> compiled update through
  the phase, written under the config's name; each source's mean is logged (reward/SOURCE), and
  the held-out evaluation gives eval/score, eval/kl, eval/gold_mean and eval/exact_match at
  steps 0, 2 and 4 (train.eval_every=2)."""
  save_tiny_sft_and_reward(tmp_path, tiny_tokenizer_dir)
  config = tiny_ppo_config()
  config.name = f"ppo_{source}"
  config.reward.sources = source
  config.eval_prompts = 4
  config.train.eval_every = 2
  phases.run_phase("ppo", config, tmp_path)
  out = capsys.readouterr().out
  assert f"reward normalisation from 16 SFT samples of the training prompts ({source})" in out
  rows = _metrics_rows(tmp_path / f"ppo_{source}")
  train_rows = [row for row in rows if "loss" in row]
  assert [row["step"] for row in train_rows] == [2, 4]
  for row in train_rows:
    assert f"reward/{source}" in row and "reward/model" not in row
    # One source of weight 1: the combined score is the source's own mean.
    assert row["score"] == pytest.approx(row[f"reward/{source}"], abs=1e-5)
    assert np.isfinite(row["policy_grad_norm"]) and np.isfinite(row["value_grad_norm"])
  if source == "verifier":
    assert all(0.0 <= row["reward/verifier"] <= 1.0 for row in train_rows)
  evals = [row for row in rows if "eval/kl" in row]
  assert [row["step"] for row in evals] == [0, 2, 4]
  for row in evals:
    assert {"eval/score", "eval/kl", "eval/gold_mean", "eval/exact_match"} <= set(row), row
    assert np.isfinite(row["eval/gold_mean"]) and np.isfinite(row["eval/score"])
  assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4)  # Step 0 is the SFT policy.
  assert checkpoints.phase_finished(tmp_path / f"ppo_{source}")


@pytest.mark.slow
def test_the_full_pipelines_ppo_gold_runs_beside_ppo(tmp_path, tiny_tokenizer_dir, capsys):
  """configs/pipeline.py:full's ppo and ppo_gold entries, run by the pipeline on tiny
  checkpoints: two PPO runs in one workdir, WORKDIR/ppo on the reward model and WORKDIR/ppo_gold
  on the teacher's gold score, each finished, with its own source's mean logged and the held-out
  rows the eval phase reads (eval/score, eval/kl, eval/gold_mean)."""
  from rlhf_jax.configs import pipeline as pipeline_config
  save_tiny_sft_and_reward(tmp_path, tiny_tokenizer_dir)
  config = pipeline_config.get_config("full")
  config.phases = "ppo,ppo_gold"
  config.data.update(dict(num_train=16, num_eval=4))
  for name in ("ppo", "ppo_gold"):
    config[name].rollout.update(dict(max_prompt_length=24, max_new_tokens=6))
    config[name].train.update(dict(steps=2, batch_size=4, log_every=1, eval_every=1))
    config[name].ppo.normalize_samples = 8
    config[name].update(dict(eval_prompts=4, eval_batch_size=4))
  phases.run_phase("pipeline", config, tmp_path)
  for name, source in (("ppo", "model"), ("ppo_gold", "gold")):
    assert checkpoints.phase_finished(tmp_path / name), name
    rows = _metrics_rows(tmp_path / name)
    assert all(set(row) & {"reward/model", "reward/gold"} == {f"reward/{source}"}
               for row in rows if "loss" in row), name
    evals = [row for row in rows if "eval/kl" in row]
    assert [row["step"] for row in evals] == [0, 1, 2], name
    assert all({"eval/score", "eval/gold_mean"} <= set(row) for row in evals), name
  assert "(gold): bias" in capsys.readouterr().out


def test_normalised_scores_of_sft_samples_have_mean_0_and_std_1(tmp_path, tiny_tokenizer_dir):
  """`ppo.score_normalizer` (Ziegler et al.'s gain and bias) on 256 SFT samples of the training
  prompts; other SFT samples (another seed) normalised with it have mean ~0 and std ~1."""
  from rlhf_jax.data import batching, records
  model_config, sft_params, reward_params = save_tiny_sft_and_reward(tmp_path, tiny_tokenizer_dir)
  tokenizer = hf.load_tokenizer(tiny_tokenizer_dir)
  config = tiny_ppo_config()
  config.reward.sources = "model=2,gold=0.5"
  weights = rewards.parse_sources(config.reward.sources)
  settings = ppo.settings_from_config(config, tokenizer, weights)
  train = records.load_splits(config.data)["train"]
  prompts = [batching.record_prompt(r) for r in train]
  policy = gpt_neo.GPTNeo(model_config)
  reward = gpt_neo.GPTNeo(model_config, score_head=True)
  models = ppo.Models(policy=policy, reference=policy, value=reward, reward=reward)
  host = rewards.HostRewards(settings.host_sources, train, prompts)
  normalize = lambda seed: ppo.score_normalizer(
      models, settings, sft_params, reward_params, tokenizer, prompts, host, num_samples=256,
      batch_size=64, max_prompt_length=24, seed=seed)
  stats = normalize(0)
  assert stats["num_samples"] == 256 and set(stats["parts"]) == {"model", "gold"}
  assert stats["mean"] == pytest.approx(2 * stats["parts"]["model"] + 0.5 * stats["parts"]["gold"],
                                        rel=1e-4, abs=1e-4)
  other = normalize(1)  # The raw mean and std of other samples, normalised with seed 0's.
  assert (other["mean"] - stats["mean"]) / stats["std"] == pytest.approx(0.0, abs=0.2)
  assert other["std"] / stats["std"] == pytest.approx(1.0, abs=0.15)


# ---------------------------------------------------------------------------------------------
# Config defaults


CANONICAL = dict(advantage_estimator="gae", gamma=1.0, lam=0.95, clip_range=0.2, clip_range_value=0.2, vf_coef=0.1,
                 num_epochs=4, kl_estimator="k1", entropy_coef=0.0, whiten_rewards=False,
                 normalize_scores=True, adaptive_kl=True, approx_kl_stop=0.0)
DOCUMENTED_MINIBATCHES = {"builtin": 2, "gpt_neo_125m": 4}


@pytest.mark.parametrize("variant", ["builtin", "gpt_neo_125m"])
def test_config_defaults_are_the_documented_recipe(variant):
  """The values configs/ppo.py documents (lm-human-preferences / TRL), and that they reach
  `PPOSettings` unchanged."""
  config = ppo_config.get_config(variant)
  for name, value in CANONICAL.items():
    assert config.ppo[name] == value, name
  assert config.ppo.num_minibatches == DOCUMENTED_MINIBATCHES[variant]
  assert (config.rollout.temperature, config.rollout.top_k, config.rollout.top_p) == (0.7, 0, 1.0)
  assert config.optim.eps == 1e-5 and config.value_model == "reward"
  tokenizer = types.SimpleNamespace(eos_token_id=7, pad_token_id=7)
  settings = ppo.settings_from_config(config, tokenizer)
  for field in dataclasses.fields(ppo.PPOSettings):
    if field.name in config.ppo:
      assert getattr(settings, field.name) == config.ppo[field.name], field.name
  assert settings.temperature == config.rollout.temperature
  assert settings.sampling.max_new_tokens == config.rollout.max_new_tokens
  assert not settings.shared_value_head


def test_the_iteration_uses_the_configured_values(toy):
  """Runs the pieces of one iteration with settings made from a config (every value changed from
  its default, so a constant left in ppo.py would show) and checks each against the PPO maths
  called with the config's values."""
  config = ppo_config.get_config()
  config.ppo.update(dict(gamma=0.97, lam=0.9, clip_range=0.3, clip_range_value=0.4,
                         kl_estimator="k3", kl_target=2.5, kl_horizon=500.0, num_epochs=3,
                         num_minibatches=4, missing_eos_penalty=0.5))
  config.rollout.temperature = 0.9
  config.rollout.samples_per_prompt = 2
  config.rollout.max_new_tokens = NEW_TOKENS  # The toy's (the default's 24 would not match).
  settings = ppo.settings_from_config(config, types.SimpleNamespace(eos_token_id=EOS,
                                                                    pad_token_id=EOS))
  p = config.ppo
  models, frozen, state = toy.models, toy.frozen, toy.fresh_state()
  batch = {k: v[:4] for k, v in toy.batch.items()}

  # 1. Rollout: 4 prompts x samples_per_prompt 2 = 8 episodes, each prompt's two side by side,
  # sampled at the configured temperature.
  rolled = jax.jit(ppo.rollout, static_argnums=(0, 1))(models, settings, state.params, batch,
                                                       jax.random.key(1))
  samples = jax.device_get(rolled["samples"])
  np.testing.assert_array_equal(rolled["prompt_ids"], np.repeat(batch["prompt_ids"], 2, axis=0))
  assert settings.sampling.temperature == 0.9
  again = decode.generate(models.policy, state.params, rolled["prompt_ids"],
                          rolled["prompt_mask"], jax.random.key(1), settings.sampling)
  np.testing.assert_array_equal(samples.tokens, again.tokens)

  # 2. Scoring: the reference's logprobs at the sampling temperature; the missing-EOS penalty.
  scored = jax.jit(ppo.score_rollout, static_argnums=(0, 1))(
      models, settings, state.params, state.extra["value"], frozen, rolled,
      state.extra["reward_stats"])
  seqs = rolled["sequences"]
  reference = _response_outputs(models.reference, frozen["reference"], seqs,
                                rolled["prompt_ids"].shape[1],
                                settings.sampling.max_new_tokens, lm_head=True,
                                temperature=0.9, tokens=rolled["samples"].tokens)["logprobs"]
  np.testing.assert_allclose(scored["ref_logprobs"], reference, atol=1e-5)
  raw = np.asarray(scored["raw_scores"])
  np.testing.assert_allclose(scored["scores"],
                             np.where(samples.ended, raw, raw - p.missing_eos_penalty), atol=1e-6)

  # 3. Advantages: the k3 KL penalty, GAE with the configured gamma and lambda.
  out = ppo.compute_advantages(settings, rolled["samples"], scored, jnp.float32(KL_COEF))
  rewards, _, _ = ppo_core.kl_penalty_rewards(scored["scores"], samples.logprobs,
                                              scored["ref_logprobs"], samples.mask, KL_COEF,
                                              kl_estimator="k3")
  advantages, returns = ppo_core.gae(rewards, scored["old_values"], samples.mask, gamma=p.gamma,
                                     lam=p.lam)
  np.testing.assert_allclose(out["rewards"], rewards, atol=1e-6)
  np.testing.assert_allclose(out["returns"], returns, atol=1e-5)
  np.testing.assert_allclose(out["advantages"], ppo_core.whiten(advantages, samples.mask),
                             atol=1e-5)

  # 4. Update: num_epochs x num_minibatches steps; the learner's logprobs are at the sampling
  # temperature, so before its first step the learner equals the behaviour policy (ratio 1).
  data = dict(seqs, tokens=samples.tokens, mask=samples.mask, old_logprobs=samples.logprobs,
              advantages=out["advantages"], old_values=scored["old_values"],
              returns=out["returns"])
  learner = {"policy": state.params, "value": state.extra["value"]}
  _, _, metrics = jax.jit(ppo.update, static_argnums=(0, 1, 2, 8))(
      models, settings, toy.tx, learner, state.opt_state, data, jax.random.key(2),
      jax.random.key(3), rolled["prompt_ids"].shape[1], state.extra["reward_stats"])
  assert metrics["approx_kl"].shape == (p.num_epochs * p.num_minibatches,)
  assert float(metrics["approx_kl"][0]) < 1e-8 and float(metrics["ratio_mean"][0]) == \
      pytest.approx(1.0, abs=1e-5)

  # 5. KL control: the adaptive controller with the configured target and horizon, 8 episodes,
  # reading the penalty's own estimator (k3 here; it read k1 before the #22 audit).
  new_coef, kl = ppo.kl_control(settings, jnp.float32(KL_COEF), rolled["samples"],
                                scored["ref_logprobs"])
  expected = ppo_core.adaptive_kl_update(KL_COEF, kl["k3_mean"], 8, target=p.kl_target,
                                         horizon=p.kl_horizon)
  np.testing.assert_allclose(new_coef, expected, rtol=1e-6)
  assert float(kl["k3_mean"]) != pytest.approx(float(kl["k1_mean"]), rel=1e-3)
  assert new_coef != pytest.approx(ppo_core.adaptive_kl_update(
      KL_COEF, kl["k3_mean"], 8, target=6.0, horizon=10000.0))
