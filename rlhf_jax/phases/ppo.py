"""The `ppo` phase: RLHF of the SFT policy against its reward sources (`training.ppo`), through
the shared loop.

  python -m rlhf_jax.main --phase=ppo --config=configs/ppo.py --workdir=runs/default
  ... --config.reward.sources=gold            # RLHF-gold: the simulated teacher's score
  ... --config.reward.sources=model=1,verifier=2

Reads WORKDIR/sft and, when the reward model scores or seeds the value model, WORKDIR/reward (or
`sft_checkpoint`, `reward_checkpoint`). The policy starts from the SFT policy, or from
`policy_checkpoint` when set (the iterated pipeline's `ppo_init=last`); the KL penalty is always
to the SFT policy. With the reward model as the only source an iteration is
one compiled program; other sources (`training.rewards`) are scored on the host between the
compiled rollout and the compiled update (`ppo.HostRewardStep`). On a fresh start the combined
reward's normaliser comes from SFT samples of the training prompts (`ppo.score_normalizer`, kept
in the train state, so a resumed run reuses it). Every `train.eval_every` iterations, before and
after training, the policy is measured on `eval_prompts` held-out prompts
(`evaluation.evaluate.held_out_policy_eval`): eval/score (reward model), eval/kl (to SFT),
eval/gold_mean (teacher) and eval/exact_match on the built-in data. Writes
WORKDIR/NAME/{checkpoint/, metrics.jsonl, TensorBoard events}, NAME = `name` (default ppo).
"""

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import phases
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import records
from rlhf_jax.errors import UserError
from rlhf_jax.evaluation import evaluate
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.models import lora
from rlhf_jax.training import adapters
from rlhf_jax.training import loop
from rlhf_jax.training import ppo
from rlhf_jax.training import rewards


def _reward_checkpoint(config, workdir: pathlib.Path, needed: bool, checkpoint) -> dict | None:
  """The reward model's checkpoint: required when it scores or seeds the value model; otherwise
  loaded when one is given or in WORKDIR/reward (for the held-out `eval/score`), else None."""
  if needed or config.reward_checkpoint:
    return checkpoint(config.reward_checkpoint, "reward")
  if checkpoints.find_checkpoint_dir(workdir / "reward") is None:
    return None
  return checkpoint("", "reward")


def _start_checkpoint(config, sft: dict) -> dict:
  """The checkpoint PPO's policy starts from: `sft` unless `policy_checkpoint` names another
  policy of the same architecture (its score head, if any, is dropped)."""
  given = config.get("policy_checkpoint", "")
  if not given:
    return sft
  start = checkpoints.describe_model(given)
  shapes = lambda info: jax.tree.map(lambda x: x.shape,
                                     gpt_neo.param_shapes(gpt_neo.build(info["config"])))
  if shapes(start) != shapes(sft):
    raise UserError(f"--config.policy_checkpoint={given}: its architecture differs from the SFT "
                    f"policy's ({sft['source']}), the KL reference; PPO needs the same model")
  print(f"ppo: the policy starts from {given} (KL reference: {sft['source']})")
  return start


def run(config, workdir: pathlib.Path, phase: str = "ppo") -> None:
  """Runs the RL phase; `phase` names it in messages and the manifest (the grpo phase runs this
  with configs/grpo.py) and is its default WORKDIR subdirectory."""
  phase_dir = phases.output_dir(config, workdir, phase)
  mesh = sharding.mesh_from_config(config.mesh)
  checkpoint = lambda given, phase: checkpoints.describe_model(checkpoints.resolve_checkpoint(
      given, workdir, phase, key=f"{phase}_checkpoint"))
  reward_weights = rewards.parse_sources(config.reward.sources)
  sft = checkpoint(config.sft_checkpoint, "sft")
  tokenizer = checkpoints.load_tokenizer(sft, "SFT")
  settings = ppo.settings_from_config(config, tokenizer, reward_weights)
  shared = settings.shared_value_head
  # A separate value model: GAE with value_model=reward (RLOO and a policy value head need none).
  separate_value = settings.uses_critic and not shared
  lora_settings = lora.settings_from_config(config.model)
  # value_model=adapters (LoRA): the value model is the policy's frozen base with its own adapters
  # and a fresh head, so it needs no reward model.
  value_on_base = separate_value and config.value_model == "adapters"
  reward = _reward_checkpoint(
      config, workdir, settings.uses_reward_model or (separate_value and not value_on_base),
      checkpoint)
  if reward is not None:
    if not reward["score_head"]:
      raise UserError(f"{reward['source']}: not a reward model (no score head)")
    if reward["config"].vocab_size != sft["config"].vocab_size:
      raise UserError(f"{reward['source']}: the reward model's vocabulary "
                      f"({reward['config'].vocab_size}) differs from the policy's "
                      f"({sft['config'].vocab_size}); they must share a tokenizer")

  policy = gpt_neo.build(sft["config"], config.model, score_head=shared)
  reward_model = (gpt_neo.build(reward["config"], config.model, score_head=True)
                  if reward is not None else None)
  shard = lambda model: sharding.param_shardings(gpt_neo.logical_axes(model),
                                                 gpt_neo.param_shapes(model), mesh)
  reference_model = gpt_neo.build(sft["config"], config.model)
  plain_models = ppo.Models(policy=policy, reference=reference_model,
                            value=reward_model if separate_value else None, reward=reward_model)
  policy_shapes, policy_shardings = gpt_neo.param_shapes(policy), shard(policy)
  copies_reward = separate_value and not value_on_base
  value_shapes = gpt_neo.param_shapes(reward_model) if copies_reward else {}
  value_shardings = shard(reward_model) if copies_reward else None
  if lora_settings.enabled:
    # LoRA: the policy trains adapters on the SFT policy, which stays frozen and is the KL
    # reference too (adapters off): one copy of the base on the mesh.
    if config.get("policy_checkpoint", ""):
      raise UserError("--config.policy_checkpoint with LoRA: the adapters' base is the SFT "
                      "policy (the reference); continue from a merged policy as sft_checkpoint")
    policy_lora = lora.plan(policy, lora_settings, mesh)
    policy_shapes, policy_shardings = policy_lora.trained_shapes, policy_lora.trained_shardings
    value = plain_models.value
    if value_on_base:
      value_lora = lora.plan(gpt_neo.build(sft["config"], config.model, score_head=True),
                             lora_settings, mesh)
      value = adapters.OnBase(value_lora, value_lora.eval_model)
      value_shapes, value_shardings = value_lora.trained_shapes, value_lora.trained_shardings
    models = dataclasses.replace(plain_models, policy=adapters.OnBase(policy_lora, policy),
                                 value=value)
    print(f"{phase}: LoRA rank {lora_settings.rank} on {', '.join(lora_settings.targets)}: "
          f"{lora.count(policy_shapes):,} trained policy parameters, "
          f"{lora.count(policy_lora.frozen_shapes):,} frozen (the reference); value model: "
          f"{config.value_model if separate_value else 'none' if not shared else 'policy head'}")
  else:
    models = plain_models
  reward_shardings = shard(reward_model) if reward is not None else None
  sft_shardings = shard(gpt_neo.build(sft["config"], score_head=sft["score_head"]))
  # The policy's starting point: the SFT policy, or `policy_checkpoint` (the iterated pipeline's
  # previous round's PPO policy); the KL reference stays the SFT policy either way.
  start = _start_checkpoint(config, sft)
  start_shardings = (sft_shardings if start is sft else
                     shard(gpt_neo.build(start["config"], score_head=start["score_head"])))

  splits = records.load_splits(config.data)
  train_records = splits["train"]
  train_prompts = [batching.record_prompt(r) for r in train_records]
  eval_records = splits["validation"][:config.eval_prompts]
  eval_prompts = [batching.record_prompt(r) for r in eval_records]
  verifiable = eval_records if all(r.get("answer") for r in eval_records) else []
  host_rewards = (rewards.HostRewards(settings.host_sources, train_records, train_prompts)
                  if settings.host_sources else None)

  tx = ppo.make_optimizer(config)
  if "reward_stats" in (reward or {}).get("manifest", {}):
    stats = reward["manifest"]["reward_stats"]
    print(f"ppo: the reward phase's statistics on reference responses: mean {stats['mean']:.4g}, "
          f"std {stats['std']:.4g} (information only; PPO normalises with the SFT policy's "
          "samples)")

  def load_policy(info=start, info_shardings=start_shardings):
    if lora_settings.enabled:  # Fresh adapters (B = 0: the policy starts as the reference).
      return models.policy.lora_model.init_trained(jax.random.key(config.train.seed))
    params = checkpoints.load_params(info, info_shardings)
    params = {k: v for k, v in params.items() if k != "score"}
    if shared:  # A fresh value head on the policy trunk.
      head = gpt_neo.init_params(policy, jax.random.key(config.train.seed))["score"]
      params["score"] = sharding.global_from_host(np.asarray(head), policy_shardings["score"])
    return params

  if lora_settings.enabled:
    reference = checkpoints.load_lora_base(sft, models.policy.lora_model)
  else:
    reference = load_policy(sft, sft_shardings)
    reference = {k: v for k, v in reference.items() if k != "score"}
  reward_params = (checkpoints.load_params(reward, reward_shardings) if reward is not None
                   else None)
  frozen = {"reference": reference,
            "reward": reward_params if settings.uses_reward_model else None}

  rng = jax.random.key(config.train.seed)

  def make_state(policy_params, value_params, reward_stats):
    state = loop.create_train_state({"policy": policy_params, "value": value_params}, tx, rng,
                                    extra={"kl_coef": jnp.float32(config.ppo.init_kl_coef),
                                           "reward_stats": reward_stats})
    learner = state.params
    return state.replace(params=learner["policy"],
                         extra={**state.extra, "value": learner["value"]})

  stats_shapes = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in ("mean", "std")}
  abstract = jax.eval_shape(make_state, policy_shapes, value_shapes, stats_shapes)
  param_shardings = policy_shardings
  # The value model and its Adam moments are laid out like the reward model it starts from (or
  # like its adapters, on the shared base).
  shardings = loop.state_shardings(abstract, param_shardings, mesh,
                                   extra_shardings={"value": value_shardings}
                                   if separate_value else None)
  abstract = loop.with_shardings(abstract, shardings)

  def normalizer() -> dict:
    """Computed once, on a fresh start; a resumed run reads it from its checkpoint's state."""
    if not settings.normalize_scores:
      return {"mean": 0.0, "std": 1.0}
    start = time.time()
    stats = ppo.score_normalizer(
        models, settings, reference, reward_params if settings.uses_reward_model else None,
        tokenizer, train_prompts, host_rewards, num_samples=int(config.ppo.normalize_samples),
        batch_size=config.eval_batch_size, max_prompt_length=config.rollout.max_prompt_length,
        seed=config.train.seed)
    parts = ", ".join(f"{k} {v:.4g}" for k, v in stats["parts"].items())
    print(f"ppo: reward normalisation from {stats['num_samples']} SFT samples of the training "
          f"prompts ({config.reward.sources}): bias {stats['mean']:.4g}, gain {stats['std']:.4g} "
          f"(source means: {parts}; {time.time() - start:.0f} s)", flush=True)
    return stats

  def init_state():
    if value_on_base:
      value = models.value.lora_model.init_trained(jax.random.key(config.train.seed + 1))
    else:
      value = jax.tree.map(jnp.copy, reward_params) if separate_value else {}
    stats = normalizer()
    return make_state(load_policy(), value, {k: jnp.float32(stats[k]) for k in ("mean", "std")})

  if settings.host_sources:
    step_fn = ppo.HostRewardStep(models=models, settings=settings, tx=tx,
                                 host_rewards=host_rewards, tokenizer=tokenizer,
                                 state_shardings=shardings, mesh=mesh)
  else:
    step_fn = lambda state, batch, frozen: ppo.ppo_iteration(state, batch, frozen, models=models,
                                                             settings=settings, tx=tx)

  held_out = evaluate.held_out_policy_eval(
      plain_models, tokenizer, eval_prompts, verifiable, reference=reference,
      reward_params=reward_params, settings=settings, batch_size=config.eval_batch_size,
      max_prompt_length=config.rollout.max_prompt_length,
      seed=config.train.seed) if eval_prompts else None
  if held_out is not None and lora_settings.enabled:  # Measured on the merged policy.
    merge = jax.jit(lambda base, trained: models.policy.bind(base).merged(trained))
    held_out_plain, held_out = held_out, lambda trained: held_out_plain(merge(reference, trained))
  lora_manifest = ({"lora": {**lora_settings.to_dict(), "base": checkpoints.base_pointer(sft)}}
                   if lora_settings.enabled else {})
  manifest = checkpoints.make_manifest(sft["config"], kind=hf.CAUSAL_LM, score_head=shared,
                                       phase=phase, **lora_manifest)
  state = loop.train(
      loop.Run(phase=phase, phase_dir=phase_dir, config=config.train, mesh=mesh,
               manifest=manifest, tokenizer_dir=sft["tokenizer_dir"], unit="episode",
               progress_keys=("score", "kl", "kl_coef", "response_length", "eos_fraction")),
      loop.Trainable(abstract_state=abstract, init_state=init_state, step_fn=step_fn,
                     frozen=frozen, step_compiled=bool(settings.host_sources),
                     memory_labels={"params": "policy adapters", "extra": "value model",
                                    "frozen": "frozen base (= reference) + reward model"}
                     if lora_settings.enabled else None),
      loop.Data(batches=lambda start: ppo.prompt_batches(
                    train_prompts, tokenizer, batch_size=config.train.batch_size,
                    max_prompt_length=config.rollout.max_prompt_length, seed=config.train.seed,
                    start_step=start, process_index=jax.process_index(),
                    process_count=jax.process_count()),
                count_items=lambda b: float(len(b["prompt_ids"]) * settings.samples_per_prompt)),
      loop.Evaluation(milestone=held_out, milestone_every=int(config.train.eval_every)))
  if state is not None:
    print(f"{phase}: done; policy checkpoint in {phase_dir / 'checkpoint'}, metrics in "
          f"{phase_dir / 'metrics.jsonl'}")
