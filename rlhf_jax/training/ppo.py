"""PPO: RLHF against the reward model with a KL penalty to the SFT reference (the phase that
runs it is `rlhf_jax.phases.ppo`).

The recipe is Ziegler et al. 2019 (OpenAI lm-human-preferences) as dissected in "The N
Implementation Details of RLHF with PPO" (Huang et al.); every choice is a config field (see
configs/ppo.py for the defaults and their sources). The math lives in `ppo_core.py`; this module
wires it to the models.

With the reward model as the only reward source, one PPO iteration is ONE compiled function
(`ppo_iteration`), run by the shared training loop, a composition of small pure functions that
tests call on their own:
  1. `rollout`: the project's sampler (KV cache, `lax.while_loop`) answers a batch of prompts and
     returns the behaviour logprobs, so they are not recomputed;
  2. `score_rollout`: the reward sources score prompt+response (the frozen reward model inside,
     host sources passed in), their weighted sum is normalised (gain and bias from the SFT
     policy's samples, `score_normalizer`), the frozen reference gives its logprobs, the value
     model its values;
  3. `compute_advantages`: per-token KL penalty plus the score on the last response token, GAE
     (whitened over tokens) or RLOO (whitened over sequences);
  4. `update`: `lax.scan` over epochs x shuffled minibatches (each with gradient accumulation), the
     clipped policy and value losses, optional approx-KL early stop (the crossing step applied,
     the rest skipped by `lax.cond` at no cost);
  5. `kl_control`: the KL coefficient's adaptive update, on the penalty's own KL estimator.
With host reward sources (`training.rewards`: verifier, gold, Python functions) the iteration is
`HostRewardStep`: compiled `rollout_phase` (1) -> responses decoded and scored on the host ->
compiled `learn_phase` (2-5), the same functions with the same keys.

Four models: the policy (trained), its value model (trained: a copy of the reward model, or a value
head on the policy trunk, `value_model`), and the frozen reference (SFT) and reward models. The
frozen ones are passed to the compiled step as arguments, so each exists once on the mesh.
"""

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.errors import UserError
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.training import adapters
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import ppo_core as core


@dataclasses.dataclass(frozen=True)
class PPOSettings:
  """The static (compile-time) settings of one PPO iteration; see configs/ppo.py."""
  sampling: decode.SamplingSettings
  samples_per_prompt: int = 1
  # "gae" (value model) | "rloo" (leave-one-out) | "grpo" (group mean/std) | "reinforce_pp"
  # (REINFORCE++, with the group mean as baseline when samples_per_prompt >= 2); only gae
  # trains and reads a value model.
  advantage_estimator: str = "gae"
  grpo_scale: str = "group"  # GRPO's advantage scale: "group" | "batch" | "none" (Dr. GRPO).
  # The policy loss's reduction over tokens (`core.sequence_loss`): "token" (PPO, DAPO),
  # "sequence_mean" (GRPO), "constant" (Dr. GRPO).
  loss_normalization: str = "token"
  # Where the KL to the reference goes: "reward" (a per-token penalty in the rewards, Ziegler et
  # al.) or "loss" (a k3 loss term, GRPO, `core.kl_loss_term`); its coefficient is the state's
  # kl_coef either way, adapted by the same controller when adaptive_kl.
  kl_penalty: str = "reward"
  num_epochs: int = 4
  num_minibatches: int = 1
  accum_steps: int = 1
  gamma: float = 1.0
  lam: float = 0.95
  clip_range: float = 0.2
  clip_range_value: float = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  kl_estimator: str = "k1"
  adaptive_kl: bool = True
  kl_target: float = 6.0
  kl_horizon: float = 10000.0
  whiten_rewards: bool = False
  normalize_scores: bool = True
  missing_eos_penalty: float = 0.0
  approx_kl_stop: float = 0.0  # 0 disables the early stop of the epoch loop.
  shared_value_head: bool = False
  # The reward sources and their weights ((name, weight), ...; `rewards.parse_sources`): "model"
  # is scored in the compiled step, every other source on the host between rollout and update.
  reward_weights: tuple = (("model", 1.0),)

  @property
  def host_sources(self) -> tuple[str, ...]:
    """The reward sources scored on the host (all but the reward model)."""
    return tuple(name for name, _ in self.reward_weights if name != "model")

  @property
  def uses_reward_model(self) -> bool:
    return any(name == "model" for name, _ in self.reward_weights)

  @property
  def uses_critic(self) -> bool:
    """Whether a value model is trained and read (GAE); RLOO needs none."""
    return self.advantage_estimator == "gae"

  @property
  def temperature(self) -> float:
    """The temperature the logprobs are computed at (1 for greedy sampling)."""
    return self.sampling.temperature or 1.0


@dataclasses.dataclass(frozen=True)
class Models:
  """The modules (static): policy, reference (the policy's architecture without a value head),
  value (None when the policy carries the value head) and reward.

  With LoRA the policy (and a value model sharing the base) is an `adapters.OnBase`: its trained
  params are adapters (and heads), its base is the reference's params, bound in the compiled step
  by `bind`."""
  policy: gpt_neo.GPTNeo | adapters.OnBase
  reference: gpt_neo.GPTNeo
  value: gpt_neo.GPTNeo | adapters.OnBase | None
  reward: gpt_neo.GPTNeo

  def bind(self, frozen: dict | None) -> "Models":
    """The models with LoRA modules bound to their base, the frozen reference (a no-op without
    LoRA)."""
    if not frozen:
      return self
    bound = lambda m: m.bind(frozen["reference"]) if isinstance(m, adapters.OnBase) else m
    return dataclasses.replace(self, policy=bound(self.policy), value=bound(self.value))


def response_outputs(model: gpt_neo.GPTNeo, params, sequences: dict, prompt_length: int,
                      response_length: int, *, lm_head: bool, temperature: float = 1.0,
                      tokens=None, entropy: bool = False) -> dict:
  """Logprobs (and, if asked, entropy) of the response tokens and/or values before each of them.

  The output at column P+j-1 predicts response token j (at column P+j), so both the LM head and
  the value head are read on the columns [P-1, P+N-1).
  """
  out = model.apply({"params": params}, sequences["input_ids"], sequences["segment_ids"],
                    sequences["positions"], lm_head=lm_head,
                    head_slice=(prompt_length - 1, response_length))
  result = {}
  if lm_head:
    logits = out["logits"] / temperature
    result["logprobs"] = core.logprobs_from_logits(logits, tokens)
    if entropy:  # More passes over [B, N, V]: only where a loss needs it.
      result["entropy"] = core.entropy_from_logits(logits)
  if "scores" in out:
    result["values"] = out["scores"]
  return result


def sequences(prompt_ids, prompt_mask, tokens, response_mask) -> dict:
  """prompt + response as one LM input: int32 [B, P+N] ids, segment ids and positions."""
  segment_ids = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  return dict(input_ids=jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32),
              segment_ids=segment_ids, positions=gpt_neo.default_positions(segment_ids))


def score_responses(reward_model: gpt_neo.GPTNeo, reward_params, prompt_ids, prompt_mask, tokens,
                    response_mask, eos_token_id: int) -> jax.Array:
  """Reward-model scores [B] of prompt+response, read at the last real token before any EOS.

  The reward model was trained on prompt+response without a trailing EOS (see batching), so the
  EOS that ends a sampled response is masked out before scoring.
  """
  without_eos = response_mask * (tokens != eos_token_id)
  seqs = sequences(prompt_ids, prompt_mask, tokens, without_eos)
  out = reward_model.apply({"params": reward_params}, seqs["input_ids"], seqs["segment_ids"],
                           seqs["positions"], lm_head=False)
  return gpt_neo.sequence_scores(out["scores"], seqs["segment_ids"])


@functools.partial(jax.jit, static_argnames=("reference_model", "temperature"))
def reference_kl(reference_model: gpt_neo.GPTNeo, reference_params, prompt_ids, prompt_mask,
                 samples: decode.Samples, temperature: float = 1.0) -> jax.Array:
  """THE KL of sampled responses to a reference model: float32 [B], per response the sum over
  its real tokens of log p_policy - log p_reference (k1, an unbiased estimate of the sequence
  KL; `core.kl_estimates`), both at the sampling temperature.

  Args:
    reference_model, reference_params: the reference (e.g. the SFT policy), same tokenizer.
    prompt_ids, prompt_mask: [B, P] the left-padded prompts the samples answer.
    samples: `decode.generate`'s output (its logprobs are the policy's).
    temperature: the sampling temperature (1 for greedy).
  """
  seqs = sequences(prompt_ids, prompt_mask, samples.tokens, samples.mask)
  ref_logprobs = response_outputs(reference_model, reference_params, seqs, prompt_ids.shape[1],
                                  samples.tokens.shape[1], lm_head=True, temperature=temperature,
                                  tokens=samples.tokens)["logprobs"]
  return core.kl_estimates(samples.logprobs, ref_logprobs, samples.mask)["k1"]


def normalize_scores(scores: jax.Array, reward_stats: dict, settings: PPOSettings) -> jax.Array:
  """Combined-reward units -> the units PPO optimises: (score - bias) / gain, mean 0 and std 1 on
  the SFT policy's samples of PPO's prompts (`score_normalizer`, Ziegler et al. 2019)."""
  if not settings.normalize_scores:
    return scores
  return (scores - reward_stats["mean"]) / jnp.maximum(reward_stats["std"], 1e-6)


def value_estimates(models: Models, settings: PPOSettings, policy_params, value_params,
                    seqs: dict, prompt_length: int, reward_stats: dict) -> jax.Array:
  """Values [B, N] before each response token: the policy's value head, or the separate value
  model read in normalised score units.

  The separate value model starts as a copy of the reward model, so its outputs are read in the
  normalised scores' units, like the returns it regresses on (Stiennon et al. 2020 initialise the
  value function from a reward model normalised this way). Raw, its first estimates would be off
  by the reward's scale and offset, and those errors would swamp the early advantages.
  """
  response_length = settings.sampling.max_new_tokens
  if settings.shared_value_head:
    return response_outputs(models.policy, policy_params, seqs, prompt_length, response_length,
                            lm_head=False)["values"]
  values = response_outputs(models.value, value_params, seqs, prompt_length, response_length,
                            lm_head=False)["values"]
  return normalize_scores(values, reward_stats, settings)


def rollout(models: Models, settings: PPOSettings, policy_params, batch: dict,
            rng: jax.Array) -> dict:
  """1. Rollout: `samples_per_prompt` (k) samples of each prompt, with behaviour logprobs
  log_softmax(logits / T) from the sampler (not recomputed).

  k samples of each prompt side by side: rows b*k .. b*k+k-1 answer prompt b. Every episode is
  scored, valued and updated on its own, as with k distinct prompts, but the k draws of one prompt
  let the update contrast answers to the same question (OpenRLHF's n_samples_per_prompt), which a
  single draw per prompt leaves to the value model's estimate.

  Returns:
    {"prompt_ids", "prompt_mask": [B*k, P], "samples": `decode.Samples` [B*k, N],
     "sequences": prompt+response LM inputs [B*k, P+N]}.
  """
  repeat = lambda x: jnp.repeat(x, settings.samples_per_prompt, axis=0)
  prompt_ids, prompt_mask = repeat(batch["prompt_ids"]), repeat(batch["prompt_mask"])
  policy = models.policy
  if isinstance(policy, adapters.OnBase):  # LoRA: the sampler runs on the merged weights.
    policy, policy_params = policy.plain, policy.merged(policy_params)
  samples = decode.generate(policy, policy_params, prompt_ids, prompt_mask, rng,
                            settings.sampling)
  return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, samples=samples,
              sequences=sequences(prompt_ids, prompt_mask, samples.tokens, samples.mask))


def combine_scores(settings: PPOSettings, parts: dict) -> jax.Array:
  """The combined reward [B]: sum over the sources of weight x score, in each source's units."""
  return sum(weight * parts[name] for name, weight in settings.reward_weights)


def score_rollout(models: Models, settings: PPOSettings, policy_params, value_params,
                  frozen: dict, rolled: dict, reward_stats: dict,
                  host_scores: dict | None = None) -> dict:
  """2. Scoring by the frozen models and the rollout-time values.

  Args:
    reward_stats: {"mean", "std"}: the normaliser of the combined reward (`score_normalizer`).
    host_scores: {source: float32 [B]} of the host sources (`settings.host_sources`), or None
      when the reward model is the only source.
  Returns:
    {"ref_logprobs": [B, N] the reference's logprobs at the sampling temperature,
     "old_values": [B, N] or None (RLOO), "parts": {source: [B]} each source's own scores,
     "raw_scores": [B] the weighted sum of the sources,
     "scores": [B] normalised, minus `missing_eos_penalty` where no EOS ended the response}.
  """
  samples, seqs = rolled["samples"], rolled["sequences"]
  prompt_length = rolled["prompt_ids"].shape[1]
  ref_logprobs = response_outputs(models.reference, frozen["reference"], seqs, prompt_length,
                                  settings.sampling.max_new_tokens, lm_head=True,
                                  temperature=settings.temperature,
                                  tokens=samples.tokens)["logprobs"]
  old_values = None
  if settings.uses_critic:
    old_values = value_estimates(models, settings, policy_params, value_params, seqs,
                                 prompt_length, reward_stats)
  parts = {name: jnp.asarray(host_scores[name], jnp.float32) for name in settings.host_sources}
  if settings.uses_reward_model:
    parts["model"] = score_responses(models.reward, frozen["reward"], rolled["prompt_ids"],
                                     rolled["prompt_mask"], samples.tokens, samples.mask,
                                     settings.sampling.eos_token_id)
  raw_scores = combine_scores(settings, parts)
  scores = normalize_scores(raw_scores, reward_stats, settings)
  if settings.missing_eos_penalty:
    scores = core.missing_eos_penalty(scores, samples.ended, settings.missing_eos_penalty)
  return dict(ref_logprobs=ref_logprobs, old_values=old_values, parts=parts,
              raw_scores=raw_scores, scores=scores)


def compute_advantages(settings: PPOSettings, samples: decode.Samples, scored: dict,
                       kl_coef) -> dict:
  """3. Per-token rewards (the score on the last token, plus the KL penalty on every token when
  `kl_penalty` is "reward"), advantages and returns.

  - gae: GAE on the value model's values, whitened over tokens;
  - rloo: each return minus the mean return of the other answers to its prompt, whitened over
    sequences;
  - grpo: each return (the score, when the KL is a loss term) against its group,
    `core.grpo_advantages` (mean and `grpo_scale`); not whitened again;
  - reinforce_pp: the reward-to-go whitened over tokens, `core.reinforce_pp_advantages`, with
    each prompt's mean score subtracted first when it has several answers.

  Returns:
    {"rewards", "non_score_reward", "raw_advantages", "advantages", and with a value model
     "returns"}: all [B, N].
  """
  mask, k = samples.mask, settings.samples_per_prompt
  scores = scored["scores"]
  if settings.advantage_estimator == "reinforce_pp" and k >= 2:
    # REINFORCE++ with a baseline (OpenRLHF reinforce_baseline): the group's mean score.
    scores = core.grpo_advantages(scores, k, scale="none")
  penalty_coef = kl_coef if settings.kl_penalty == "reward" else 0.0
  rewards, non_score_reward, _ = core.kl_penalty_rewards(
      scores, samples.logprobs, scored["ref_logprobs"], mask, penalty_coef,
      settings.kl_estimator)
  if settings.whiten_rewards:
    rewards = core.whiten(rewards, mask, shift_mean=False)
  out = dict(rewards=rewards, non_score_reward=non_score_reward)
  if settings.uses_critic:
    out["raw_advantages"], out["returns"] = core.gae(rewards, scored["old_values"], mask,
                                                     settings.gamma, settings.lam)
    out["advantages"] = core.whiten(out["raw_advantages"], mask)
  elif settings.advantage_estimator == "rloo":
    # The k answers to each prompt are each other's baseline: the prompt's difficulty (most of
    # the score's variance between episodes) cancels exactly instead of through a value model.
    out["raw_advantages"] = core.rloo_advantages(rewards, mask, k)
    # One advantage per sequence, normalised over sequences (TRL's RLOO): per-token whitening
    # would weight each by its length and can flip an above-baseline answer's sign.
    out["advantages"] = core.whiten_sequence_advantages(out["raw_advantages"], mask)
  elif settings.advantage_estimator == "grpo":
    returns = core.masked_sum(rewards, mask, axis=1)
    out["raw_advantages"] = core.to_tokens(returns - jnp.repeat(
        jnp.mean(returns.reshape(-1, k), axis=1), k), mask)
    out["advantages"] = core.to_tokens(
        core.grpo_advantages(returns, k, scale=settings.grpo_scale), mask)
  else:  # reinforce_pp
    out["raw_advantages"] = core.reward_to_go(rewards, mask, settings.gamma)
    out["advantages"] = core.reinforce_pp_advantages(rewards, mask, settings.gamma)
  return out


def ppo_loss(models: Models, settings: PPOSettings, learner: dict, minibatch: dict,
             prompt_length: int, reward_stats: dict, kl_coef=0.0) -> tuple[jax.Array, dict]:
  """The clipped policy loss (+ kl_coef x the k3 KL to the reference when `kl_penalty` is
  "loss", + vf_coef x the clipped value loss, - entropy_coef x entropy) of one minibatch of
  rollout rows, the policy and KL terms reduced by `loss_normalization`; dropout stays off
  (behaviour and learner logprobs must agree)."""
  seqs = {k: minibatch[k] for k in ("input_ids", "segment_ids", "positions")}
  policy_out = response_outputs(models.policy, learner["policy"], seqs, prompt_length,
                                settings.sampling.max_new_tokens, lm_head=True,
                                temperature=settings.temperature, tokens=minibatch["tokens"],
                                entropy=bool(settings.entropy_coef))
  m = minibatch["mask"]
  normalization = settings.loss_normalization
  pg_loss, pg_metrics = core.ppo_policy_loss(policy_out["logprobs"], minibatch["old_logprobs"],
                                             minibatch["advantages"], m, settings.clip_range,
                                             normalization=normalization,
                                             max_tokens=settings.sampling.max_new_tokens)
  loss = pg_loss
  # The micro-batch weight that makes gradient accumulation exact for the normalisation.
  metrics = {"weight": core.sequence_loss_weight(m, normalization), "policy_loss": pg_loss,
             **pg_metrics}
  if settings.kl_penalty == "loss":
    kl_loss = core.sequence_loss(
        core.kl_loss_term(policy_out["logprobs"], minibatch["ref_logprobs"], m, kl_coef,
                          settings.kl_estimator),
        m, normalization, settings.sampling.max_new_tokens)
    loss = loss + kl_loss
    metrics["kl_loss"] = kl_loss
  if settings.uses_critic:
    if settings.shared_value_head:
      values = policy_out["values"]
    else:
      values = value_estimates(models, settings, None, learner["value"], seqs, prompt_length,
                               reward_stats)
    vf_loss, vf_metrics = core.ppo_value_loss(values, minibatch["old_values"],
                                              minibatch["returns"], m, settings.clip_range_value)
    loss = loss + settings.vf_coef * vf_loss
    metrics.update(value_loss=vf_loss, **vf_metrics)
  # The exact entropy of the learner costs passes over the [B, N, V] logits (and, in the loss,
  # their backward): computed only for an entropy bonus. The `entropy` metric is the rollout's.
  if settings.entropy_coef:
    entropy = core.masked_mean(policy_out["entropy"], m)
    loss = loss - settings.entropy_coef * entropy
    metrics["entropy_exact"] = entropy
  return loss, metrics


def update(models: Models, settings: PPOSettings, tx: optax.GradientTransformation,
           learner: dict, opt_state, data: dict, permutation_rng: jax.Array,
           update_rng: jax.Array, prompt_length: int,
           reward_stats: dict, kl_coef=0.0) -> tuple[dict, Any, dict]:
  """4. `lax.scan` over epochs x shuffled minibatches, each a (possibly accumulated) gradient
  step on policy and value; optional early stop once approx-KL exceeds `approx_kl_stop`.

  The early stop is TRL's: the update whose minibatch crossed the bound is applied, then every
  later one is skipped (`core.early_stop_step`), and a skipped update does no work: `lax.cond`
  runs only the branch taken, so the stopped tail of the schedule costs nothing.

  Args:
    learner: {"policy": params, "value": params or {}}; `opt_state` covers both.
    data: rollout rows [B, ...]: `input_ids`, `segment_ids`, `positions`, `tokens`, `mask`,
      `old_logprobs`, `advantages` (and with a value model `old_values`, `returns`; with the
      KL as a loss term `ref_logprobs`).
    permutation_rng: shuffles the rows into minibatches, per epoch.
    update_rng: one key per minibatch step (unused by the loss: dropout stays off).
    kl_coef: the KL loss term's coefficient (read when `kl_penalty` is "loss").
  Returns:
    (learner, opt_state, metrics: each [epochs * minibatches], with `applied` 1.0 for a
    minibatch that changed the learner and 0.0 (every other metric 0.0 too) for a skipped one;
    `policy_grad_norm` and `value_grad_norm` are the norms each part is clipped by).
  """
  batch_size = data["mask"].shape[0]
  permutations = core.minibatch_permutations(permutation_rng, batch_size, settings.num_minibatches,
                                             settings.num_epochs)
  permutations = permutations.reshape(-1, permutations.shape[-1])  # [epochs * minibatches, mb]
  update_rngs = jax.random.split(update_rng, permutations.shape[0])
  loss_fn = lambda learner, minibatch, rng: ppo_loss(models, settings, learner, minibatch,
                                                     prompt_length, reward_stats, kl_coef)

  def work(learner, opt_state, indices, step_rng):
    minibatch = jax.tree.map(lambda x: x[indices], data)
    grads, loss, metrics = loop.accumulate_gradients(loss_fn, learner, minibatch, step_rng,
                                                     settings.accum_steps)
    updates, opt_state = tx.update(grads, opt_state, learner)
    norms = optim.subtree_norms(grads, ("policy", "value"))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
               "policy_grad_norm": norms["policy"], "value_grad_norm": norms["value"]}
    return optax.apply_updates(learner, updates), opt_state, metrics

  metric_shapes = jax.eval_shape(work, learner, opt_state, permutations[0], update_rngs[0])[2]

  def skip(learner, opt_state, indices, step_rng):
    del indices, step_rng
    return learner, opt_state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)

  def step(carry, inputs):
    learner, opt_state, stopped = carry
    indices, step_rng = inputs
    learner, opt_state, metrics = jax.lax.cond(stopped, skip, work, learner, opt_state, indices,
                                               step_rng)
    applied, stopped = core.early_stop_step(stopped, metrics["approx_kl"],
                                            settings.approx_kl_stop)
    return (learner, opt_state, stopped), {**metrics, "applied": applied.astype(jnp.float32)}

  (learner, opt_state, _), metrics = jax.lax.scan(
      step, (learner, opt_state, jnp.zeros((), bool)), (permutations, update_rngs))
  return learner, opt_state, metrics


def kl_control(settings: PPOSettings, kl_coef, samples: decode.Samples,
               ref_logprobs: jax.Array) -> tuple[jax.Array, dict]:
  """5. KL control, measured on this rollout with the penalty's own estimator (`kl_estimator`,
  summed per sequence, as Ziegler et al. with k1).

  Returns:
    (the next iteration's KL coefficient, `core.kl_estimates` of the rollout).
  """
  kl = core.kl_estimates(samples.logprobs, ref_logprobs, samples.mask)
  measured = core.controller_kl(kl, settings.kl_estimator)
  episodes = samples.mask.shape[0]
  if settings.adaptive_kl:
    return core.adaptive_kl_update(kl_coef, measured, episodes, target=settings.kl_target,
                                   horizon=settings.kl_horizon), kl
  return core.fixed_kl_update(kl_coef, measured, episodes), kl


def rollout_phase(state: loop.TrainState, batch: dict, frozen: dict | None = None, *,
                  models: Models, settings: PPOSettings) -> tuple[dict, dict]:
  """The first part of an iteration: the iteration's keys and its `rollout`.

  Returns:
    (rolled (`rollout`'s output), keys {"next", "permutation", "update"}: the state's next RNG
    and the update's keys, for `learn_phase`).
  """
  rng = jax.random.wrap_key_data(state.rng)
  rng, sample_rng, permutation_rng, update_rng = jax.random.split(rng, 4)
  rolled = rollout(models.bind(frozen), settings, state.params, batch, sample_rng)
  return rolled, {"next": rng, "permutation": permutation_rng, "update": update_rng}


def learn_phase(state: loop.TrainState, frozen: dict, rolled: dict, keys: dict,
                host_scores: dict | None = None, *, models: Models, settings: PPOSettings,
                tx: optax.GradientTransformation) -> tuple:
  """The rest of an iteration after `rollout_phase`: `score_rollout` (with the host sources'
  scores, if any), `compute_advantages`, `update`, `kl_control`. Returns (new state, metrics)."""
  models = models.bind(frozen)
  samples, seqs = rolled["samples"], rolled["sequences"]
  reward_stats = state.extra["reward_stats"]
  scored = score_rollout(models, settings, state.params, state.extra["value"], frozen, rolled,
                         reward_stats, host_scores)
  kl_coef = state.extra["kl_coef"]
  advantages = compute_advantages(settings, samples, scored, kl_coef)
  data = dict(seqs, tokens=samples.tokens, mask=samples.mask, old_logprobs=samples.logprobs,
              advantages=advantages["advantages"])
  if settings.uses_critic:
    data.update(old_values=scored["old_values"], returns=advantages["returns"])
  if settings.kl_penalty == "loss":
    data["ref_logprobs"] = scored["ref_logprobs"]
  learner, opt_state, update_metrics = update(
      models, settings, tx, {"policy": state.params, "value": state.extra["value"]},
      state.opt_state, data, keys["permutation"], keys["update"], rolled["prompt_ids"].shape[1],
      reward_stats, kl_coef)
  new_kl_coef, kl = kl_control(settings, kl_coef, samples, scored["ref_logprobs"])

  mask = samples.mask
  applied = update_metrics.pop("applied")
  update_means = {k: jnp.sum(v * applied) / jnp.maximum(jnp.sum(applied), 1.0)
                  for k, v in update_metrics.items() if k != "weight"}
  metrics = {
      **update_means,
      **{f"reward/{name}": jnp.mean(part) for name, part in scored["parts"].items()},
      "score": jnp.mean(scored["raw_scores"]),
      "score_normalized": jnp.mean(scored["scores"]),
      "kl": kl["k1_mean"], "kl_k3": kl["k3_mean"],
      "kl_coef": kl_coef,
      "non_score_reward": jnp.mean(jnp.sum(advantages["non_score_reward"], axis=1)),
      "return": jnp.mean(jnp.sum(advantages["rewards"], axis=1)),
      # Per-token entropy of the rollout policy (at the sampling temperature), estimated by the
      # mean -log pi of its sampled tokens (lm-human-preferences' and TRL's objective/entropy are
      # the same estimate summed per response).
      "entropy": core.masked_mean(-samples.logprobs, mask),
      "response_length": jnp.mean(samples.lengths.astype(jnp.float32)),
      "eos_fraction": jnp.mean(samples.ended.astype(jnp.float32)),
      "advantage_std_before_whitening": jnp.std(jnp.sum(advantages["raw_advantages"] * mask,
                                                        axis=1)),
      "minibatches_applied": jnp.sum(applied),
  }
  if settings.uses_critic:
    metrics["value_mean"] = core.masked_mean(scored["old_values"], mask)
  extra = {**state.extra, "value": learner["value"], "kl_coef": new_kl_coef}
  new_state = state.replace(step=state.step + 1, params=learner["policy"], opt_state=opt_state,
                            rng=jax.random.key_data(keys["next"]), extra=extra)
  return new_state, metrics


def ppo_iteration(state: loop.TrainState, batch: dict, frozen: dict, *, models: Models,
                  settings: PPOSettings, tx: optax.GradientTransformation) -> tuple:
  """One PPO iteration as ONE compiled function, when the reward model is the only reward
  source: `rollout_phase` then `learn_phase` (host sources: `HostRewardStep`).

  Args:
    state: `params` = the policy; `extra` = {"value": value params or {}, "kl_coef": scalar,
      "reward_stats": {"mean", "std"} the combined reward's normaliser, `score_normalizer`}.
      `opt_state` covers (policy, value) jointly, as TRL's policy-and-value wrapper.
    batch: {"prompt_ids": int32 [B, P] left-padded, "prompt_mask": [B, P], optionally
      "record_index": [B] (read by host sources only)}; each prompt is answered
      `settings.samples_per_prompt` (k) times, so an iteration has B * k episodes.
    frozen: {"reference": params, "reward": params (None without the model source)}.
  Returns:
    (new state, metrics dict of scalars).
  """
  if settings.host_sources:
    raise ValueError(f"host reward sources {settings.host_sources} need HostRewardStep")
  rolled, keys = rollout_phase(state, batch, frozen, models=models, settings=settings)
  return learn_phase(state, frozen, rolled, keys, None, models=models, settings=settings, tx=tx)


class HostRewardStep:
  """An iteration with reward sources scored on the host, as compiled parts around host work:
  compiled `rollout_phase` -> responses decoded and scored on the host (`host_rewards`) ->
  compiled `learn_phase` (the state donated). Every process decodes and scores the whole
  global batch (the sources are deterministic functions of the text), so the scores it places
  back on the mesh agree everywhere.

  Args:
    models, settings, tx: as `ppo_iteration`.
    host_rewards: `(record indices [B*k], responses [B*k]) -> {source: float32 [B*k]}`, e.g.
      `rewards.HostRewards` over the training records.
    tokenizer: decodes the responses (`decode.decode_response`, the one rule).
    state_shardings: the TrainState's shardings (`loop.state_shardings`); `mesh` the mesh.
  """

  def __init__(self, *, models: Models, settings: PPOSettings, tx: optax.GradientTransformation,
               host_rewards, tokenizer, state_shardings, mesh):
    self.settings, self.host_rewards, self.tokenizer, self.mesh = (settings, host_rewards,
                                                                     tokenizer, mesh)
    self.rollout = jax.jit(functools.partial(rollout_phase, models=models, settings=settings))
    self.learn = jax.jit(functools.partial(learn_phase, models=models, settings=settings, tx=tx),
                         out_shardings=(state_shardings, sharding.replicated(mesh)),
                         donate_argnums=0)

  def responses(self, rolled: dict) -> list[str]:
    """The decoded responses of a rollout, [B*k] (every process gets all of them)."""
    samples = sharding.to_host(rolled["samples"])
    return [decode.decode_response(self.tokenizer, samples.tokens[i], int(samples.lengths[i]),
                                   bool(samples.ended[i])) for i in range(len(samples.lengths))]

  def __call__(self, state: loop.TrainState, batch: dict, frozen: dict) -> tuple:
    rolled, keys = self.rollout(state, batch, frozen)
    record_index = np.repeat(np.asarray(sharding.to_host(batch["record_index"])),
                             self.settings.samples_per_prompt)
    scores = self.host_rewards(record_index, self.responses(rolled))
    scores = sharding.global_batch({k: np.asarray(v, np.float32) for k, v in scores.items()},
                                   self.mesh)
    return self.learn(state, frozen, rolled, keys, scores)


def prompt_batches(prompts: list[str], tokenizer, *, batch_size: int, max_prompt_length: int,
                   seed: int, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """Endless, deterministic, resumable prompt batches (this process's slice), reshuffled per epoch.

  Yields {"prompt_ids": int32 [B/n, P], "prompt_mask": float32 [B/n, P], left-padded to P,
  "record_index": int32 [B/n], each prompt's index in `prompts` (what host reward sources read
  the prompt's record by)}.
  """
  if batch_size % process_count:
    raise UserError(f"ppo batch_size {batch_size} is not divisible by {process_count} processes")
  if len(prompts) < batch_size:
    raise UserError(f"ppo: {len(prompts)} prompts are fewer than batch_size {batch_size}")
  per_host = batch_size // process_count
  per_epoch = len(prompts) // batch_size
  step = start_step
  while True:
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(prompts))
    rows = order[index * batch_size:(index + 1) * batch_size]
    mine = rows[process_index * per_host:(process_index + 1) * per_host]
    ids, mask = batching.prompt_batch(tokenizer, [prompts[i] for i in mine], max_prompt_length)
    yield {"prompt_ids": ids, "prompt_mask": mask, "record_index": mine.astype(np.int32)}
    step += 1


ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo", "reinforce_pp")


def make_optimizer(config) -> optax.GradientTransformation:
  """The phase's optimizer: its schedule counts optimizer updates (iterations x epochs x
  minibatches, `optim.num_updates`), and policy and value gradients are clipped each by its own
  norm (`optim.clip_by_subtree_norm`), so a large value gradient leaves the policy's step alone."""
  p = config.ppo
  return optim.make_optimizer(config.optim,
                              optim.num_updates(config.train.steps, p.num_epochs,
                                                p.num_minibatches),
                              clip_subtrees=("policy", "value"))


def settings_from_config(config, tokenizer, reward_weights=(("model", 1.0),)) -> PPOSettings:
  """The iteration's settings from the phase's config; `reward_weights` from
  `rewards.parse_sources(config.reward.sources)`."""
  p = config.ppo
  if int(config.train.get("accum_steps", 1)) != 1:
    raise UserError(f"--config.train.accum_steps={config.train.accum_steps}: PPO accumulates "
                    "gradients within each minibatch with --config.ppo.accum_steps (it must "
                    "divide the minibatch's episodes); leave train.accum_steps at 1")
  if p.kl_estimator not in ("k1", "k3"):
    raise UserError(f"--config.ppo.kl_estimator={p.kl_estimator}: use k1 or k3")
  if int(config.rollout.samples_per_prompt) < 1:
    raise UserError(f"--config.rollout.samples_per_prompt={config.rollout.samples_per_prompt}: "
                    "must be at least 1")
  if config.value_model not in ("reward", "policy_head", "adapters"):
    raise UserError(f"--config.value_model={config.value_model}: use reward, policy_head or "
                    "adapters")
  if config.value_model == "adapters" and not int(config.model.get("lora", {}).get("rank", 0)):
    raise UserError("--config.value_model=adapters: the value model shares the policy's frozen "
                    "base with its own LoRA adapters; set --config.model.lora.rank > 0")
  if p.advantage_estimator not in ADVANTAGE_ESTIMATORS:
    raise UserError(f"--config.ppo.advantage_estimator={p.advantage_estimator}: use one of "
                    f"{', '.join(ADVANTAGE_ESTIMATORS)}")
  if p.advantage_estimator in ("rloo", "grpo") and int(config.rollout.samples_per_prompt) < 2:
    raise UserError(f"--config.rollout.samples_per_prompt={config.rollout.samples_per_prompt}: "
                    f"advantage_estimator={p.advantage_estimator} compares the answers to one "
                    "prompt; set it to 2 or more")
  if p.grpo_scale not in core.GRPO_SCALES:
    raise UserError(f"--config.ppo.grpo_scale={p.grpo_scale}: use one of "
                    f"{', '.join(core.GRPO_SCALES)}")
  if p.loss_normalization not in core.LOSS_NORMALIZATIONS:
    raise UserError(f"--config.ppo.loss_normalization={p.loss_normalization}: use one of "
                    f"{', '.join(core.LOSS_NORMALIZATIONS)}")
  if p.kl_penalty not in ("reward", "loss"):
    raise UserError(f"--config.ppo.kl_penalty={p.kl_penalty}: use reward or loss")
  return PPOSettings(
      sampling=decode.SamplingSettings.from_config(config.rollout, tokenizer.eos_token_id,
                                                     tokenizer.pad_token_id),
      samples_per_prompt=int(config.rollout.samples_per_prompt),
      advantage_estimator=p.advantage_estimator, grpo_scale=p.grpo_scale,
      loss_normalization=p.loss_normalization, kl_penalty=p.kl_penalty, num_epochs=p.num_epochs,
      num_minibatches=p.num_minibatches, accum_steps=p.accum_steps,
      gamma=p.gamma, lam=p.lam, clip_range=p.clip_range, clip_range_value=p.clip_range_value,
      vf_coef=p.vf_coef, entropy_coef=p.entropy_coef, kl_estimator=p.kl_estimator,
      adaptive_kl=p.adaptive_kl, kl_target=p.kl_target, kl_horizon=p.kl_horizon,
      whiten_rewards=p.whiten_rewards, normalize_scores=p.normalize_scores,
      missing_eos_penalty=p.missing_eos_penalty, approx_kl_stop=p.approx_kl_stop,
      shared_value_head=config.value_model == "policy_head" and p.advantage_estimator == "gae",
      reward_weights=tuple((name, float(weight)) for name, weight in reward_weights))


def score_normalizer(models: Models, settings: PPOSettings, policy_params, reward_params,
                     tokenizer, prompts: list[str], host_rewards, *, num_samples: int,
                     batch_size: int, max_prompt_length: int, seed: int) -> dict:
  """The combined reward's gain and bias, as Ziegler et al. 2019 set them: its scores of the
  SFT policy's samples of PPO's training prompts get mean 0 and std 1.

  `num_samples` prompts (a seeded draw without repetition, cycling through all of them first
  when there are fewer) are answered once each at the rollout's sampling settings through the
  one generation path (`decode.generate_responses`) and scored by every source.

  Args:
    models, settings: the iteration's; `policy_params` the SFT policy's (`models.reference`'s
      params), `reward_params` the reward model's (None without the model source).
    prompts: the training prompts; `host_rewards` as `HostRewardStep`'s (None without host
      sources).
  Returns:
    {"mean": float, "std": float (1.0 where the scores do not vary), "num_samples": int,
     "parts": {source: mean of its own scores}}.
  """
  order = np.random.default_rng([seed, 1]).permutation(len(prompts))
  indices = np.resize(order, num_samples)
  eos = settings.sampling.eos_token_id
  per_batch = None
  if settings.uses_reward_model:
    score = jax.jit(lambda params, ids, mask, samples: {"model": score_responses(
        models.reward, params, ids, mask, samples.tokens, samples.mask, eos)})
    per_batch = lambda ids, mask, samples: score(reward_params, ids, mask, samples)
  responses = decode.generate_responses(
      models.reference, policy_params, tokenizer, [prompts[i] for i in indices],
      settings=settings.sampling, batch_size=batch_size, max_prompt_length=max_prompt_length,
      rng=jax.random.key(seed), per_batch=per_batch)
  parts = dict(responses.extras)
  if settings.host_sources:
    parts.update(host_rewards(indices, responses.texts))
  combined = np.asarray(combine_scores(settings, {k: np.asarray(v, np.float64)
                                                  for k, v in parts.items()}))
  std = float(np.std(combined))
  return {"mean": float(np.mean(combined)), "std": std if std > 1e-6 else 1.0,
          "num_samples": int(num_samples),
          "parts": {k: float(np.mean(v)) for k, v in parts.items()}}
