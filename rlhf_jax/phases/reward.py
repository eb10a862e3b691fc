"""The `reward` phase: a Bradley-Terry loss on preference pairs, through the shared loop.

  python -m rlhf_jax.main --phase=reward --config=configs/reward.py --workdir=runs/default

The model is the GPT-Neo trunk with a scalar `score` head read at the last real token of
prompt+response (the layout of HF `GPTNeoForSequenceClassification`, so `--phase=export`
writes one), initialised from `config.init_checkpoint` (default: this workdir's `sft/`). A
checkpoint without a score head gets a fresh one, normal with the model's default std
1/sqrt(d_model + 1); a checkpoint with one (an imported reward model) keeps it.

Preference pairs (`config.pairs.source`):
  * "auto" (the default): the label phase's judged pairs, WORKDIR/label/pairs.jsonl, when that
    file exists, else "build" (below).
  * judged pairs (the label phase's rows; any file whose first line has a `judgement`), read by
    `labeling.load_judged_pairs`: ties and pairs with an empty side are left out and counted;
    held-out pairs are the `validation` rows (judged pairs of held-out prompts). A judged pair
    longer than `max_length` (a sample whose decoded text re-tokenises longer) is cut at its
    end under `pairs.too_long="error"` too, and one the cut leaves identical is skipped and
    counted. With
    `pairs.synthetic_share` = s > 0, built negatives (below, `pairs.strategies`, one per record
    of the data's training split) make up the share s of the training pairs (held-out pairs stay
    judged); the default 0 trains on judgements only. On the built-in data the phase reports at
    the end the trained model's agreement with the simulated teacher's noiseless gold order on
    the held-out judged pairs (`eval/gold_accuracy`), next to the labels' own
    (`eval/labeler_gold_agreement`, the ceiling): the teacher is called for this report only,
    training never sees gold.
  * a file (`.jsonl` / `.jsonl.gz`: `{"prompt", "chosen", "rejected"}` lines or Anthropic
    HH-RLHF dialogues, see `rlhf_jax.data.preferences`). Held-out pairs are `pairs.eval_file`,
    or the pairs of a seeded `pairs.eval_fraction` of the file's distinct prompts (whole
    prompts, so no prompt is both trained on and held out).
  * "build": pairs built from the instruction data of the `data` section. `chosen` is the
    reference response, `rejected` a negative (`pairs.negatives_per_record` per record), each
    made by one strategy with the shares of `pairs.strategies`:
      other_response  another record's response: fluent but not an answer to this prompt;
      corrupted       the reference with a factually wrong answer (`builtin.corrupt`; built-in
                      set only). The negatives that teach the reward model to check facts,
                      which is what PPO needs from it; the default gives them the largest share.
      truncated       the reference cut at a random word boundary (complete answers win);
      shuffled        the reference's words in a random order (coherent text wins);
      policy_sample   a sample of the initial (SFT) policy, drawn with the project's sampler
                      (`decode.generate_responses`): the negatives closest to what PPO produces.
                      On the built-in set a sample that `builtin.check_answer` finds correct
                      is not a negative: each record gets `pairs.policy_tries` draws, the
                      first wrong one is its negative, and if every draw was correct (or
                      empty) the record is *replaced*: it gets a `corrupted` negative instead
                      (skipped where there is no corrupt function). Other data has no checker,
                      so its samples are taken as worse than the reference. All of this is
                      counted and printed.
    Held-out pairs are built the same way (`pairs.eval_negatives_per_record` per record) from
    the validation split; a held-out pair whose prompt is also a training prompt is dropped
    and counted.
  A bad pair (chosen == rejected, an empty side, longer than `max_length` under
  `pairs.too_long`) raises naming its file:line (or index), or with `pairs.skip_bad_records` is
  skipped and counted; the counts are printed.

Training batches, whatever the source: `batching.training_pair_batches`, length-grouped
(`group_by_length` batches per length-sorted window, each batch padded to its longest pair rounded
up to 16 tokens; 0 pads every batch to `max_length`). Held-out pairs are padded to `max_length`.

Loss: -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2,
averaged over pairs (`loss.margin`, `loss.center_coef`: the centering of "Helping or Herding",
TRL's `center_rewards_coefficient`). Both sides are scored in one forward pass of the
concatenated [2B, T] batch; `train.accum_steps` and `model.remat` work as in every phase.
`loss.lm_coef` > 0 adds that times the next-token loss of the chosen responses under the
model's own tied LM head (`chosen_lm_loss`, logged as `lm_loss`): the SFT regulariser of GRM
(Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward Model for
LLMs"), which keeps the trunk's hidden states able to generate the preferred answers while the
score head trains, so the knowledge SFT put there is not trained away. It costs one vocabulary
projection of the chosen rows; the exported model is unchanged (the LM head is the tied
embedding).

Metrics (metrics.jsonl, TensorBoard, console): training `loss`, `accuracy`, `margin`; on the
held-out pairs every `train.eval_every` steps and at the end `eval/accuracy` (a tie counts one
half), `eval/margin`, `eval/loss`, `eval/length_baseline_accuracy` (prefer the longer response,
ties one half), `eval/length_correlation` (Pearson, reward vs response tokens over all held-out
responses) and `eval/accuracy/<strategy>`; at the end `reward/mean` and `reward/std`, the
reward on reference responses (distinct chosen responses of the training pairs, at most
`stats_samples`), saved as `manifest["reward_stats"]` for PPO's normalisation.
Writes WORKDIR/reward/{checkpoint/, metrics.jsonl, TensorBoard events}.
"""

import collections
import json
import pathlib
from typing import Sequence

import jax
import numpy as np

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import preferences
from rlhf_jax.data import records
from rlhf_jax.data import teacher
from rlhf_jax.evaluation import evaluate
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import adapters
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import progress
from rlhf_jax.training import reward


def policy_sampler(model: gpt_neo.GPTNeo, params, tokenizer, pairs_config, *,
                   max_prompt_length: int):
  """`(records, seed) -> responses`: samples of the policy for the records' prompts, through the
  one generation path, reproducible for a given seed (`pairs.seed` plus the call's seed)."""
  settings = decode.SamplingSettings(
      max_new_tokens=pairs_config.policy_max_new_tokens,
      temperature=pairs_config.policy_temperature, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)

  def sample(records: list[dict], call_seed: int) -> list[str]:
    prompts = [batching.record_prompt(r) for r in records]
    return decode.generate_responses(
        model, params, tokenizer, prompts, settings=settings,
        batch_size=min(pairs_config.policy_batch_size, len(prompts)),
        max_prompt_length=max_prompt_length,
        rng=jax.random.fold_in(jax.random.key(pairs_config.seed), call_seed)).texts

  return sample


def run(config, workdir: pathlib.Path) -> None:
  phase_dir = workdir / "reward"
  if checkpoints.phase_finished(phase_dir):
    # Checked before building the data, which may sample the policy.
    print(f"reward: {phase_dir / 'checkpoint'} holds a finished run; skipping. Delete it or use "
          "another --workdir to train again.")
    return
  mesh = sharding.mesh_from_config(config.mesh)
  info = checkpoints.describe_model(checkpoints.resolve_checkpoint(
      config.init_checkpoint, workdir, "sft", key="init_checkpoint"))
  tokenizer = checkpoints.load_tokenizer(info, "initial")
  model_config = gpt_neo.with_dropout(info["config"], config.model)
  model = gpt_neo.build(model_config, config.model, score_head=True)
  full_shardings = sharding.param_shardings(gpt_neo.logical_axes(model),
                                            gpt_neo.param_shapes(model), mesh)
  trunk_shardings = {k: v for k, v in full_shardings.items() if k != "score"}
  load_initial = lambda: dict(checkpoints.load_params(
      info, full_shardings if info["score_head"] else trunk_shardings))

  def sampler_factory():
    print(f"reward: sampling policy negatives from {info['source']}")
    policy_params = {k: v for k, v in load_initial().items() if k != "score"}
    return policy_sampler(gpt_neo.build(info["config"], config.model), policy_params, tokenizer,
                          config.pairs, max_prompt_length=config.max_length)

  pairs = preferences.load_phase_pairs(config, workdir, tokenizer, sampler_factory,
                                       phase="reward")
  train_examples, eval_examples, eval_pairs = pairs.train, pairs.held_out, pairs.held_out_pairs
  if jax.process_index() == 0:
    for line in preferences.summary_lines(pairs):
      print(f"reward: {line}")

  tx = optim.make_optimizer(config.optim, config.train.steps)
  rng = jax.random.key(config.train.seed)

  # With LoRA only the adapters (and the score head, with train_heads) train and are saved, with
  # a pointer to the base (the SFT checkpoint), which stays frozen.
  trained = adapters.setup(model, config.model, info, mesh)
  param_shapes, param_shardings = trained.param_shapes, trained.param_shardings
  frozen = () if trained.frozen is None else (trained.frozen,)
  if trained.enabled:
    print(f"reward: {trained.describe()}")

  def init_state():
    fresh_score = lambda: reward.init_score_head(model, jax.random.fold_in(rng, 1))
    if trained.enabled:
      params = dict(trained.lora_model.init_trained(rng))
      if "score" in params:  # Trained fully (train_heads): the initial model's, or a fresh one.
        params["score"] = load_initial()["score"] if info["score_head"] else fresh_score()
    else:
      params = load_initial()
      if "score" not in params:
        params["score"] = fresh_score()
    return loop.create_train_state(params, tx, rng)

  pad_id = tokenizer.pad_token_id
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  eval_args = dict(batch_size=config.eval_batch_size, max_length=config.max_length, pad_id=pad_id,
                   **hosts)
  evaluator = loop.Evaluator(
      step=lambda params, batch, *base: reward.eval_sums(
          trained.eval_model, trained.full(params, *base), batch, margin=config.loss.margin),
      batches=lambda: batching.eval_pair_batches(eval_examples, **eval_args),
      summarize=reward.summarize_eval)
  references = reward.reference_examples(train_examples, config.stats_samples, config.pairs.seed)
  reference_evaluator = loop.Evaluator(
      step=lambda params, batch, *base: reward.reference_sums(
          trained.eval_model, trained.full(params, *base), batch),
      batches=lambda: batching.eval_batches(references, **eval_args),
      summarize=reward.summarize_reference)
  compiled_reference = jax.jit(reference_evaluator.step)

  def reference_statistics(params) -> dict:
    """The reward on reference responses, measured at the start and at the end; the final one
    goes into the finished checkpoint's manifest for PPO's normalisation."""
    measured = reference_evaluator.run(compiled_reference, params, mesh, frozen)
    return {"reward_mean": measured["eval/mean"], "reward_std": measured["eval/std"]}

  def final_manifest(metrics: dict) -> dict:
    return {"reward_stats": {"mean": metrics["eval/reward_mean"],
                             "std": metrics["eval/reward_std"], "samples": len(references)}}

  margin, center_coef = float(config.loss.margin), float(config.loss.center_coef)
  lm_coef = float(config.loss.get("lm_coef", 0.0))
  state = loop.train(
      loop.Run(phase="reward", phase_dir=phase_dir, config=config.train, mesh=mesh,
               manifest=checkpoints.make_manifest(model_config, kind=hf.REWARD, score_head=True,
                                                  phase="reward", **trained.manifest),
               tokenizer_dir=info["tokenizer_dir"], progress_keys=("loss", "accuracy"),
               unit="pair", final_manifest=final_manifest),
      loop.Trainable(
          abstract_state=loop.abstract_train_state(param_shapes, param_shardings, tx, rng, mesh),
          init_state=init_state,
          step_fn=loop.make_train_step(
              lambda p, b, r: reward.reward_loss(trained.model, p, b, r, margin=margin,
                                                 center_coef=center_coef, lm_coef=lm_coef),
              tx, config.train.accum_steps, combine=trained.combine),
          frozen=trained.frozen, memory_labels=trained.memory_labels),
      loop.Data(
          batches=lambda start: batching.training_pair_batches(
              train_examples, config, pad_id=pad_id, start_step=start, **hosts),
          count_items=lambda b: float(b["pair_mask"].sum()),
          widest_batch=lambda b: batching.pad_pair_batch(b, config.max_length, pad_id)),
      loop.Evaluation(evaluator=evaluator, milestone=reference_statistics))
  if state is None:
    return
  gold = (gold_accuracy(config, phase_dir, eval_pairs, mesh)
          if pairs.judged and config.data.source == "builtin" else {})
  if jax.process_index() == 0:
    final = _last_held_out_metrics(phase_dir)
    writer = progress.MetricsWriter(phase_dir, resume_step=int(config.train.steps))
    writer.write(int(config.train.steps), {"reward/mean": final["reward_mean"],
                                           "reward/std": final["reward_std"],
                                           **{f"eval/{k}": v for k, v in gold.items()}})
    writer.close()
    _print_final_summary(final, eval_examples, len(references), phase_dir)
    if gold:
      print(f"reward: against the teacher's noiseless gold order on the "
            f"{gold['gold_pairs']} held-out judged pairs that have one, the reward model "
            f"agrees {100 * gold['gold_accuracy']:.1f}% (a tie half); the labels "
            f"{100 * gold['labeler_gold_agreement']:.1f}%: the ceiling for these labels")


def gold_accuracy(config, phase_dir: pathlib.Path, held_out: Sequence[dict], mesh) -> dict:
  """The trained reward model against the teacher's noiseless gold order on held-out judged
  pairs, next to the labels' own agreement with it (the ceiling). For the report only: training
  never sees gold.

  Returns:
    {"gold_accuracy": the model's share of gold-ordered pairs scored in the gold order (a tie
    half), "labeler_gold_agreement": the labels' share, "gold_pairs": pairs with a gold order
    (pairs whose prompt is no built-in question, or tied in gold, left out)}, or {} when none.
  """
  by_prompt = {batching.record_prompt(r): r
               for r in records.load_splits(config.data).get("validation", [])}
  matched = [(pair, by_prompt[pair["prompt"]]) for pair in held_out if pair["prompt"] in by_prompt]
  if not matched:
    return {}
  questions = [record for _, record in matched]
  gold_chosen = teacher.gold_scores(questions, [pair["chosen"] for pair, _ in matched])
  gold_rejected = teacher.gold_scores(questions, [pair["rejected"] for pair, _ in matched])
  ordered = np.abs(gold_chosen - gold_rejected) > 1e-9
  if not ordered.any():
    return {}
  scorer = evaluate.Scorer(str(phase_dir), config.model, batch_size=config.eval_batch_size,
                           max_length=config.max_length, mesh=mesh)
  prompts = [pair["prompt"] for pair, _ in matched]
  margin = (scorer(prompts, [pair["chosen"] for pair, _ in matched])
            - scorer(prompts, [pair["rejected"] for pair, _ in matched]))
  gold_sign = np.sign(gold_chosen - gold_rejected)
  model_right = np.where(margin == 0, 0.5, (np.sign(margin) == gold_sign).astype(np.float64))
  return {"gold_accuracy": float(model_right[ordered].mean()),
          "labeler_gold_agreement": float((gold_sign[ordered] > 0).mean()),
          "gold_pairs": int(ordered.sum())}


def _last_held_out_metrics(phase_dir: pathlib.Path) -> dict[str, float]:
  """The final evaluation's metrics as logged (`eval/` prefix removed)."""
  lines = (phase_dir / "metrics.jsonl").read_text().splitlines()
  final = next(json.loads(line) for line in reversed(lines) if '"eval/accuracy"' in line)
  return {k[len("eval/"):]: v for k, v in final.items() if k.startswith("eval/")}


def _print_final_summary(metrics: dict, eval_examples: Sequence[dict], reference_count: int,
                         phase_dir: pathlib.Path) -> None:
  counts = collections.Counter(batching.PAIR_STRATEGIES[e["strategy_id"]] for e in eval_examples)
  print(f"reward: held-out pairwise accuracy {metrics['accuracy']:.3f} on {len(eval_examples)} "
        f"pairs (prefer-the-longer-response baseline {metrics['length_baseline_accuracy']:.3f}; "
        f"reward-length correlation {metrics['length_correlation']:.3f}; mean margin "
        f"{metrics['margin']:.3f})")
  per_strategy = sorted(((metrics[f"accuracy/{name}"], name) for name in counts))
  print("reward: accuracy per strategy (hardest first): " + ", ".join(
      f"{name} {accuracy:.3f} ({counts[name]} pairs)" for accuracy, name in per_strategy))
  print(f"reward: reward on {reference_count} reference responses: mean "
        f"{metrics['reward_mean']:.4g}, std {metrics['reward_std']:.4g} (saved in the checkpoint "
        f"manifest for PPO); checkpoint in {phase_dir / 'checkpoint'}, metrics in "
        f"{phase_dir / 'metrics.jsonl'}")
