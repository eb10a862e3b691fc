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

  def fresh_state(self, seed: int = 0) -> loop.TrainState:
    """Step 0, as the ppo phase builds it: own copies of the params (the state is donated)."""
    learner = jax.tree.map(jnp.copy, {"policy": self.policy_params, "value": self.value_params})
    state = loop.create_train_state(learner, self.tx, jax.random.key(seed),
                                    extra={"kl_coef": jnp.float32(KL_COEF)})
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
  frozen = {"reference": reference_params, "reward": reward_params,
            "reward_stats": {"mean": jnp.float32(0.0), "std": jnp.float32(1.0)}}
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
  assert toy.settings.normalize_scores
  stats = lambda mean, std: {**toy.frozen, "reward_stats": {"mean": jnp.float32(mean),
                                                             "std": jnp.float32(std)}}
  _, plain = toy.step(toy.fresh_state(), toy.batch, stats(0.0, 1.0))
  _, shifted = toy.step(toy.fresh_state(), toy.batch, stats(3.0, 4.0))
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


def test_approx_kl_stop_skips_the_rest_of_the_epochs(toy):
  """Minibatch 1 meets the bound (its logprobs are the rollout's); after one Adam step the next
  minibatch's approx-KL exceeds it, so exactly one of EPOCHS x MINIBATCHES updates is applied.
  (With an entropy bonus, so that its path runs too: it changes the loss, not the stop.)"""
  stopping = toy.with_settings(approx_kl_stop=1e-6, entropy_coef=0.01)
  state = stopping.fresh_state()
  before = _host_copy({"policy": state.params, "value": state.extra["value"]})
  state, metrics = stopping.step(state, stopping.batch, stopping.frozen)
  assert float(metrics["minibatches_applied"]) == 1.0 < EPOCHS * MINIBATCHES
  # The only applied update ran on the rollout's own params: the exact entropy of its minibatch
  # agrees with the rollout estimate (mean -log pi of the sampled tokens).
  assert abs(float(metrics["entropy_exact"]) - float(metrics["entropy"])) < 0.05
  adam = next(s for s in jax.tree.leaves(state.opt_state,
                                         is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))
  assert int(adam.count) == 1  # The skipped updates left the optimizer state alone too.
  # After exactly one Adam step, mu = (1 - b1) g and nu = (1 - b2) g^2: the params must be the
  # start moved by that one step, i.e. the params at the stop.
  b1, b2, eps = 0.9, 0.999, 1e-8

  def one_step(start, mu, nu):
    mu, nu = np.float64(mu) / (1 - b1), np.float64(nu) / (1 - b2)
    return start - LR * mu / (np.sqrt(nu) + eps)

  expected = jax.tree.map(one_step, before, jax.device_get(adam.mu), jax.device_get(adam.nu))
  after = jax.device_get({"policy": state.params, "value": state.extra["value"]})
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=0, atol=1e-6), after, expected)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), after, before)
  assert max(jax.tree.leaves(moved)) > 100 * 1e-6


# ---------------------------------------------------------------------------------------------
# Resume through the phase itself


def _ppo_run_config():
  config = ppo_config.get_config()
  config.data.update(dict(num_train=16, num_eval=4))
  config.eval_prompts = 0
  config.rollout.update(dict(max_prompt_length=24, max_new_tokens=6))
  config.train.update(dict(steps=4, batch_size=4, log_every=2, save_every=2, keep_checkpoints=2))
  return config


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
  tokenizer = hf.load_tokenizer(tiny_tokenizer_dir)
  config = gpt_neo.tiny_config(vocab_size=len(tokenizer), hidden_size=32, num_heads=2,
                               window_size=8, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.eos_token_id)
  sft_params = {k: v for k, v in _init_params(config, seed=0).items() if k != "score"}
  reward_params = _init_params(config, seed=1)
  checkpoints.save_model(tmp_path / "sft", sft_params, config, kind=hf.CAUSAL_LM, phase="sft",
                     tokenizer_dir=tiny_tokenizer_dir)
  checkpoints.save_model(tmp_path / "reward", reward_params, config, kind=hf.REWARD, phase="reward",
                     tokenizer_dir=tiny_tokenizer_dir, reward_stats={"mean": 0.5, "std": 2.0})

  phases.run_phase("ppo", _ppo_run_config(), tmp_path)
  uninterrupted = _saved_step(tmp_path, 4)
  # A crash after the step-2 checkpoint: its later checkpoint never happened.
  shutil.rmtree(tmp_path / "ppo" / "checkpoint" / "4")
  capsys.readouterr()
  phases.run_phase("ppo", _ppo_run_config(), tmp_path)
  assert "resuming from step 2" in capsys.readouterr().out
  resumed = _saved_step(tmp_path, 4)

  jax.tree.map(np.testing.assert_array_equal, uninterrupted, resumed)
  # The compared state is PPO's own: a trained value model and an adapted KL coefficient.
  extra = resumed["train_state"]["extra"]
  assert abs(float(extra["kl_coef"]) - ppo_config.get_config().ppo.init_kl_coef) > 1e-5
  assert not np.array_equal(extra["value"]["score"]["kernel"], reward_params["score"]["kernel"])
  assert int(resumed["train_state"]["step"]) == 4


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
  again = decode.generate(models.policy, state.params, rolled["prompt_ids"],
                          rolled["prompt_mask"], jax.random.key(1),
                          dataclasses.replace(toy.settings.sampling, temperature=0.9))
  np.testing.assert_array_equal(samples.tokens, again.tokens)

  # 2. Scoring: the reference's logprobs at the sampling temperature; the missing-EOS penalty.
  scored = jax.jit(ppo.score_rollout, static_argnums=(0, 1))(
      models, settings, state.params, state.extra["value"], frozen, rolled)
  seqs = rolled["sequences"]
  reference = _response_outputs(models.reference, frozen["reference"], seqs,
                                rolled["prompt_ids"].shape[1], NEW_TOKENS, lm_head=True,
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
      jax.random.key(3), rolled["prompt_ids"].shape[1], frozen["reward_stats"])
  assert metrics["approx_kl"].shape == (p.num_epochs * p.num_minibatches,)
  assert float(metrics["approx_kl"][0]) < 1e-8 and float(metrics["ratio_mean"][0]) == \
      pytest.approx(1.0, abs=1e-5)

  # 5. KL control: the adaptive controller with the configured target and horizon, 8 episodes.
  new_coef, kl = ppo.kl_control(settings, jnp.float32(KL_COEF), rolled["samples"],
                                scored["ref_logprobs"])
  expected = ppo_core.adaptive_kl_update(KL_COEF, kl["k1_mean"], 8, target=p.kl_target,
                                         horizon=p.kl_horizon)
  np.testing.assert_allclose(new_coef, expected, rtol=1e-6)
  assert new_coef != pytest.approx(ppo_core.adaptive_kl_update(
      KL_COEF, kl["k1_mean"], 8, target=6.0, horizon=10000.0))
