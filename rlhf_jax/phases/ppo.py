"""The `ppo` phase: RLHF of the SFT policy against the reward model (`training.ppo`), through the
shared loop.

  python -m rlhf_jax.main --phase=ppo --config=configs/ppo.py --workdir=runs/default

Reads WORKDIR/sft and WORKDIR/reward (or `sft_checkpoint`, `reward_checkpoint`); measures the
policy on `eval_prompts` held-out prompts before and after training
(`evaluation.evaluate.held_out_policy_eval`). Writes WORKDIR/ppo/{checkpoint/, metrics.jsonl,
TensorBoard events}.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import records
from rlhf_jax.errors import UserError
from rlhf_jax.evaluation import evaluate
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import ppo


def run(config, workdir: pathlib.Path) -> None:
  phase_dir = workdir / "ppo"
  mesh = sharding.mesh_from_config(config.mesh)
  checkpoint = lambda given, phase: checkpoints.describe_model(checkpoints.resolve_checkpoint(
      given, workdir, phase, key=f"{phase}_checkpoint"))
  sft = checkpoint(config.sft_checkpoint, "sft")
  reward = checkpoint(config.reward_checkpoint, "reward")
  if not reward["score_head"]:
    raise UserError(f"{reward['source']}: not a reward model (no score head)")
  if reward["config"].vocab_size != sft["config"].vocab_size:
    raise UserError(f"{reward['source']}: the reward model's vocabulary ({reward['config'].vocab_size}) "
                    f"differs from the policy's ({sft['config'].vocab_size}); they must share a tokenizer")
  tokenizer = checkpoints.load_tokenizer(sft, "SFT")
  settings = ppo.settings_from_config(config, tokenizer)
  shared = settings.shared_value_head
  # A separate value model: GAE with value_model=reward (RLOO and a policy value head need none).
  separate_value = settings.uses_critic and not shared

  policy = gpt_neo.build(sft["config"], config.model, score_head=shared)
  reward_model = gpt_neo.build(reward["config"], config.model, score_head=True)
  models = ppo.Models(policy=policy, reference=gpt_neo.build(sft["config"], config.model),
                      value=reward_model if separate_value else None, reward=reward_model)
  shard = lambda model: sharding.param_shardings(gpt_neo.logical_axes(model),
                                                 gpt_neo.param_shapes(model), mesh)
  policy_shardings, reward_shardings = shard(policy), shard(reward_model)
  sft_shardings = shard(gpt_neo.build(sft["config"], score_head=sft["score_head"]))

  splits = records.load_splits(config.data)
  train_prompts = [batching.record_prompt(r) for r in splits["train"]]
  eval_records = splits["validation"][:config.eval_prompts]
  eval_prompts = [batching.record_prompt(r) for r in eval_records]
  verifiable = eval_records if all(r.get("answer") for r in eval_records) else []

  tx = optim.make_optimizer(config.optim, config.train.steps)
  reward_stats = reward["manifest"].get("reward_stats", {"mean": 0.0, "std": 1.0})
  if settings.normalize_scores and "reward_stats" not in reward["manifest"]:
    print("ppo: the reward checkpoint has no reward_stats; scores are not normalised")

  def load_policy():
    params = checkpoints.load_params(sft, sft_shardings)
    params = {k: v for k, v in params.items() if k != "score"}
    if shared:  # A fresh value head on the policy trunk.
      head = gpt_neo.init_params(policy, jax.random.key(config.train.seed))["score"]
      params["score"] = sharding.global_from_host(np.asarray(head), policy_shardings["score"])
    return params

  reference = load_policy()
  reference = {k: v for k, v in reference.items() if k != "score"}
  reward_params = checkpoints.load_params(reward, reward_shardings)
  frozen = {"reference": reference, "reward": reward_params,
            "reward_stats": {k: sharding.global_from_host(np.float32(reward_stats[k]),
                                                          sharding.replicated(mesh))
                             for k in ("mean", "std")}}

  rng = jax.random.key(config.train.seed)

  def make_state(policy_params, value_params):
    state = loop.create_train_state({"policy": policy_params, "value": value_params}, tx, rng,
                                    extra={"kl_coef": jnp.float32(config.ppo.init_kl_coef)})
    learner = state.params
    return state.replace(params=learner["policy"],
                         extra={**state.extra, "value": learner["value"]})

  value_shapes = gpt_neo.param_shapes(reward_model) if separate_value else {}
  abstract = jax.eval_shape(make_state, gpt_neo.param_shapes(policy), value_shapes)
  param_shardings = policy_shardings
  # The value model and its Adam moments are laid out like the reward model it starts from.
  shardings = loop.state_shardings(abstract, param_shardings, mesh,
                                   extra_shardings={"value": reward_shardings}
                                   if separate_value else None)
  abstract = loop.with_shardings(abstract, shardings)

  def init_state():
    value = jax.tree.map(jnp.copy, reward_params) if separate_value else {}
    return make_state(load_policy(), value)

  def step_fn(state, batch, frozen):
    return ppo.ppo_iteration(state, batch, frozen, models=models, settings=settings, tx=tx)

  held_out = evaluate.held_out_policy_eval(
      models, tokenizer, eval_prompts, verifiable, reference=reference,
      reward_params=reward_params, settings=settings, batch_size=config.eval_batch_size,
      max_prompt_length=config.rollout.max_prompt_length,
      seed=config.train.seed) if eval_prompts else None
  manifest = checkpoints.make_manifest(sft["config"], kind=hf.CAUSAL_LM, score_head=shared,
                                       phase="ppo")
  state = loop.train(
      loop.Run(phase="ppo", phase_dir=phase_dir, config=config.train, mesh=mesh,
               manifest=manifest, tokenizer_dir=sft["tokenizer_dir"], unit="episode",
               progress_keys=("score", "kl", "kl_coef", "response_length", "eos_fraction")),
      loop.Trainable(abstract_state=abstract, init_state=init_state, step_fn=step_fn,
                     frozen=frozen),
      loop.Data(batches=lambda start: ppo.prompt_batches(
                    train_prompts, tokenizer, batch_size=config.train.batch_size,
                    max_prompt_length=config.rollout.max_prompt_length, seed=config.train.seed,
                    start_step=start, process_index=jax.process_index(),
                    process_count=jax.process_count()),
                count_items=lambda b: float(len(b["prompt_ids"]) * settings.samples_per_prompt)),
      loop.Evaluation(milestone=held_out))
  if state is not None:
    print(f"ppo: done; policy checkpoint in {phase_dir / 'checkpoint'}, metrics in "
          f"{phase_dir / 'metrics.jsonl'}")
