"""The `dpo` phase: Direct Preference Optimisation of the SFT policy on preference pairs, through
the shared loop.

  python -m rlhf_jax.main --phase=dpo --config=configs/dpo.py --workdir=runs/default

The policy starts from `config.init_checkpoint` (default: this workdir's `sft/`); the reference
is `config.reference_checkpoint` (default: the same checkpoint). The pairs are the ones the
reward phase reads (`preferences.load_phase_pairs`, the same `pairs` section): by default the
label phase's judged pairs, WORKDIR/label/pairs.jsonl, when it exists (ties left out), else a
pairs file or HH-RLHF dialogues (`pairs.source=FILE`) or pairs built from the data
(`pairs.source=build`). With `append_eos` (the default, as TRL) each response ends with EOS, so
the policy learns where answers stop.

Reference log-probabilities are computed once, before training, for every training and
held-out pair (`dpo.reference_logps`, with the reference's parameters, which are then dropped:
no reference model is held while training) and stored in WORKDIR/dpo/reference_logps.npz with
a fingerprint of the pairs' tokens and the reference checkpoint. A resumed run reads them back
instead of computing them again, so it trains on the very numbers the interrupted run used; a
file whose fingerprint does not match a partial run's pairs is an error. Each batch carries its
pairs' values (`dpo.with_reference`).

Loss (`config.loss`): `loss_type` "sigmoid" (DPO, Rafailov et al. 2023) or "ipo" (Azar et al.
2023), `beta`, `label_smoothing` (conservative DPO); see `rlhf_jax.training.dpo`. Batches are
the reward phase's length-grouped pair batches (`batching.training_pair_batches`);
`train.accum_steps` and `model.remat` work as in every phase.

Metrics (metrics.jsonl, TensorBoard, console), named as TRL's DPOTrainer logs them: `loss`,
`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
`logps/rejected`, `grad_norm`; the same with an `eval/` prefix on the held-out pairs at the
start, every `train.eval_every` steps and at the end.

Writes WORKDIR/dpo/{checkpoint/ (a causal LM: `--phase=export` makes a GPTNeoForCausalLM
directory of it; the eval phase reports it as DPO), reference_logps.npz, metrics.jsonl,
TensorBoard events}.
"""

import hashlib
import os
import pathlib

import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import phases
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import preferences
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import adapters
from rlhf_jax.training import dpo
from rlhf_jax.training import loop
from rlhf_jax.training import optim

REFERENCE_FILE = "reference_logps.npz"


def _no_policy_samples():
  raise UserError("dpo: pairs.strategies.policy_sample > 0 needs the policy's samples as built "
                  "negatives, which the dpo phase does not draw; set "
                  "--config.pairs.strategies.policy_sample=0 or use the label phase's pairs")


def reference_fingerprint(reference: str, pairs: preferences.PhasePairs) -> str:
  """What the stored reference log-probabilities belong to: the reference checkpoint (its
  resolved path and step) and every training and held-out pair's tokens, in order."""
  info = checkpoints.describe_model(reference)
  digest = hashlib.sha256(f"{info['path']}:{info['manifest'].get('step')}".encode())
  for examples in (pairs.train, pairs.held_out):
    digest.update(str(len(examples)).encode())
    for example in examples:
      for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = np.asarray(example[key], np.int32)
        digest.update(np.int64(len(ids)).tobytes() + ids.tobytes())
  return digest.hexdigest()


def load_or_compute_reference(config, phase_dir: pathlib.Path, reference: str,
                              pairs: preferences.PhasePairs, *, pad_id: int,
                              mesh) -> dict[str, np.ndarray]:
  """The reference log-probabilities of the training and held-out pairs, {"train": [N, 2],
  "held_out": [M, 2]}: read from WORKDIR/dpo/reference_logps.npz when it belongs to these pairs
  and this reference, else computed once with the reference model (loaded here and dropped on
  return) and written there.

  Raises:
    UserError: the file belongs to other pairs or another reference while a partial run waits
      to resume (it would resume on other numbers).
  """
  path = phase_dir / REFERENCE_FILE
  fingerprint = reference_fingerprint(reference, pairs)
  if path.is_file():
    with np.load(path) as stored:
      if str(stored["fingerprint"]) == fingerprint:
        print(f"dpo: reference log-probabilities of {len(pairs.train)} training and "
              f"{len(pairs.held_out)} held-out pairs read from {path}")
        return {"train": stored["train"], "held_out": stored["held_out"]}
    if checkpoints.find_checkpoint_dir(phase_dir) is not None:
      raise UserError(f"{path}: the stored reference log-probabilities belong to other pairs or "
                      f"another reference checkpoint than {reference}, so the partial run in "
                      f"{phase_dir / 'checkpoint'} cannot resume on them; keep its pairs and "
                      f"reference, or delete {phase_dir} to start again")
  info = checkpoints.describe_model(reference)
  model = gpt_neo.build(info["config"], config.model)
  shapes = gpt_neo.param_shapes(model)
  shardings = sharding.param_shardings(gpt_neo.logical_axes(model), shapes, mesh)
  if info["score_head"]:
    shardings = {**shardings, "score": {"kernel": sharding.replicated(mesh)}}
  params = {k: v for k, v in checkpoints.load_params(info, shardings).items() if k != "score"}
  logits_fn = dpo.model_logits_fn(model)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  computed = {
      name: dpo.reference_logps(
          logits_fn, params, batching.eval_pair_batches(
              examples, batch_size=config.reference_batch_size, max_length=config.max_length,
              pad_id=pad_id, by_length=True, **hosts), len(examples), mesh)
      for name, examples in (("train", pairs.train), ("held_out", pairs.held_out))}
  del params
  if not all(np.isfinite(v).all() for v in computed.values()):
    raise UserError(f"dpo: the reference {reference} gives non-finite log-probabilities")
  if jax.process_index() == 0:
    phase_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, fingerprint=np.asarray(fingerprint), **computed)
    os.replace(partial, path)
  print(f"dpo: reference log-probabilities of {len(pairs.train)} training and "
        f"{len(pairs.held_out)} held-out pairs computed with {reference}, stored in {path}")
  return computed


def run(config, workdir: pathlib.Path) -> None:
  phase_dir = phases.output_dir(config, workdir, "dpo")
  if checkpoints.phase_finished(phase_dir):
    print(f"dpo: {phase_dir / 'checkpoint'} holds a finished run; skipping. Delete it or use "
          "another --workdir to train again.")
    return
  mesh = sharding.mesh_from_config(config.mesh)
  init = checkpoints.resolve_checkpoint(config.init_checkpoint, workdir, "sft",
                                        key="init_checkpoint")
  reference = config.reference_checkpoint or init
  info = checkpoints.describe_model(init)
  tokenizer = checkpoints.load_tokenizer(info, "initial")
  model_config = gpt_neo.with_dropout(info["config"], config.model)
  model = gpt_neo.build(model_config, config.model)
  # With LoRA (--config.model.lora.rank) only adapters train on the frozen initial policy, which
  # is also the default reference (the base with the adapters off).
  trained = adapters.setup(model, config.model, info, mesh)
  param_shapes, param_shardings = trained.param_shapes, trained.param_shardings
  if trained.enabled:
    print(f"dpo: {trained.describe()}")

  pairs = preferences.load_phase_pairs(config, workdir, tokenizer, _no_policy_samples,
                                       phase="dpo", append_eos=config.append_eos)
  if jax.process_index() == 0:
    for line in preferences.summary_lines(pairs):
      print(f"dpo: {line}")
  pad_id = tokenizer.pad_token_id
  ref = load_or_compute_reference(config, phase_dir, reference, pairs, pad_id=pad_id, mesh=mesh)

  tx = optim.make_optimizer(config.optim, config.train.steps)
  rng = jax.random.key(config.train.seed)

  def init_state():
    if trained.enabled:
      return loop.create_train_state(trained.lora_model.init_trained(rng), tx, rng)
    shardings = ({**param_shardings, "score": {"kernel": sharding.replicated(mesh)}}
                 if info["score_head"] else param_shardings)
    params = checkpoints.load_params(info, shardings)
    return loop.create_train_state({k: v for k, v in params.items() if k != "score"}, tx, rng)

  loss_settings = dict(beta=float(config.loss.beta), loss_type=config.loss.loss_type,
                       label_smoothing=float(config.loss.label_smoothing))
  logits_fn = dpo.model_logits_fn(trained.model)
  eval_sums = dpo.make_eval_sums(dpo.model_logits_fn(trained.eval_model), **loss_settings)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  evaluator = loop.Evaluator(
      step=lambda params, batch, *base: eval_sums(trained.full(params, *base), batch),
      batches=lambda: (dpo.with_reference(b, ref["held_out"]) for b in batching.eval_pair_batches(
          pairs.held_out, batch_size=config.eval_batch_size, max_length=config.max_length,
          pad_id=pad_id, by_length=True, **hosts)),
      summarize=dpo.summarize_eval)

  def train_batches(start: int):
    batches = batching.training_pair_batches(pairs.train, config, pad_id=pad_id,
                                             start_step=start, **hosts)
    return (dpo.with_reference(b, ref["train"]) for b in batches)

  state = loop.train(
      loop.Run(phase="dpo", phase_dir=phase_dir, config=config.train, mesh=mesh,
               manifest=checkpoints.make_manifest(model_config, kind=hf.CAUSAL_LM,
                                                  score_head=False, phase="dpo",
                                                  **trained.manifest),
               tokenizer_dir=info["tokenizer_dir"],
               progress_keys=("loss", "rewards/accuracies", "rewards/margins"), unit="pair"),
      loop.Trainable(
          abstract_state=loop.abstract_train_state(param_shapes, param_shardings, tx, rng, mesh),
          init_state=init_state,
          step_fn=loop.make_train_step(dpo.make_loss_fn(logits_fn, **loss_settings), tx,
                                       config.train.accum_steps, combine=trained.combine),
          frozen=trained.frozen, memory_labels=trained.memory_labels),
      loop.Data(batches=train_batches, count_items=lambda b: float(b["pair_mask"].sum()),
                widest_batch=lambda b: batching.pad_pair_batch(b, config.max_length, pad_id)),
      loop.Evaluation(evaluator=evaluator))
  if state is not None and jax.process_index() == 0:
    print(f"dpo: done; checkpoint in {phase_dir / 'checkpoint'} (a causal LM: export it with "
          f"--phase=export --config.checkpoint={phase_dir}), metrics in "
          f"{phase_dir / 'metrics.jsonl'}")
