"""The `sft` phase: next-token loss on response tokens (`training.sft`), through the shared loop.

  python -m rlhf_jax.main --phase=sft --config=configs/sft.py --workdir=runs/default

Starts from `config.init_checkpoint` (an Orbax or HF checkpoint), by default the `import` or `init`
phase of the same workdir (run one of them first). On the built-in set, greedy exact match on the
test split's verifiable questions is measured before and after training. Writes
WORKDIR/sft/{checkpoint/, metrics.jsonl, TensorBoard events}.
"""

import math
import pathlib

import jax

from rlhf_jax import checkpoints
from rlhf_jax import sharding
from rlhf_jax.data import batching
from rlhf_jax.data import builtin
from rlhf_jax.data import records
from rlhf_jax.evaluation import metrics
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import adapters
from rlhf_jax.training import loop
from rlhf_jax.training import optim
from rlhf_jax.training import sft


def run(config, workdir: pathlib.Path) -> None:
  phase_dir = workdir / "sft"
  mesh = sharding.mesh_from_config(config.mesh)
  info = checkpoints.describe_model(checkpoints.resolve_checkpoint(
      config.init_checkpoint, workdir, ("import", "init"), key="init_checkpoint"))
  tokenizer = checkpoints.load_tokenizer(info, "initial")
  model_config = gpt_neo.with_dropout(info["config"], config.model)
  model = gpt_neo.build(model_config, config.model)

  splits = records.load_splits(config.data)
  tokenize = lambda split: batching.tokenize_sft_examples(
      tokenizer, splits[split], max_length=config.max_length,
      min_response_tokens=config.get("min_response_tokens", 1),
      skip_bad_records=config.data.skip_bad_records, source=f"{config.data.source}:{split}")
  train_examples, stats = tokenize("train")
  eval_examples, _ = tokenize("validation")
  print(f"sft: {stats['examples']} training examples ({stats['truncated_contexts']} contexts "
        f"truncated, {stats['truncated_responses']} responses truncated, skipped "
        f"{stats['skipped'] or 'none'}), {len(eval_examples)} validation")

  tx = optim.make_optimizer(config.optim, config.train.steps)
  rng = jax.random.key(config.train.seed)
  # With LoRA only the adapters train (and are checkpointed, with a pointer to the base); the base
  # is loaded once, frozen, and passed to the compiled step as an argument.
  trained = adapters.setup(model, config.model, info, mesh)
  param_shapes, param_shardings = trained.param_shapes, trained.param_shardings
  if trained.enabled:
    print(f"sft: {trained.describe()}")
    init_state = lambda: loop.create_train_state(trained.lora_model.init_trained(rng), tx, rng)
  else:
    def init_state():
      # A checkpoint with a score head (an imported reward model) loads it replicated; a policy
      # has none, so it is dropped.
      shardings = ({**param_shardings, "score": {"kernel": sharding.replicated(mesh)}}
                   if info["score_head"] else param_shardings)
      params = checkpoints.load_params(info, shardings)
      return loop.create_train_state({k: v for k, v in params.items() if k != "score"}, tx, rng)

  pad_id = tokenizer.pad_token_id
  # The loss sorts each batch shard's own positions (see `sft._loss_chunks`).
  groups = math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES)
  batch_args = dict(batch_size=config.train.batch_size, max_length=config.max_length, pad_id=pad_id,
                    process_index=jax.process_index(), process_count=jax.process_count())
  evaluator = loop.Evaluator(
      step=lambda params, batch, *base: sft.sft_eval_sums(
          trained.eval_model, trained.full(params, *base), batch, groups=groups),
      batches=lambda: batching.eval_batches(eval_examples, **batch_args),
      summarize=sft.summarize_eval)
  verifiable = [r for r in splits.get("test", []) if r.get("answer")][:config.eval_prompts]
  greedy = decode.SamplingSettings(max_new_tokens=config.exact_match_max_new_tokens,
                                   temperature=0.0, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
  prompts = [batching.record_prompt(r) for r in verifiable]

  def exact_match(params) -> dict:
    """Greedy answers to the verifiable test questions, scored by the built-in checker (with
    LoRA, by the plain model with the adapters merged in)."""
    responses = decode.generate_responses(
        model, trained.merged(params), tokenizer, prompts, settings=greedy,
        batch_size=config.eval_batch_size,
        max_prompt_length=config.max_length, rng=jax.random.key(0))
    return {"exact_match": metrics.exact_match(verifiable, responses.texts, builtin.check_answer)}

  state = loop.train(
      loop.Run(phase="sft", phase_dir=phase_dir, config=config.train, mesh=mesh,
               manifest=checkpoints.make_manifest(model_config, kind=hf.CAUSAL_LM,
                                                  score_head=False, phase="sft",
                                                  **trained.manifest),
               tokenizer_dir=info["tokenizer_dir"]),
      loop.Trainable(abstract_state=loop.abstract_train_state(param_shapes, param_shardings, tx,
                                                              rng, mesh),
                     init_state=init_state,
                     step_fn=loop.make_train_step(
                         lambda p, b, r: sft.sft_loss(trained.model, p, b, r, groups=groups), tx,
                         config.train.accum_steps, combine=trained.combine),
                     frozen=trained.frozen, memory_labels=trained.memory_labels),
      loop.Data(batches=lambda start: batching.sft_batches(
                    train_examples, seed=config.train.seed, pack=config.pack, start_step=start,
                    **batch_args),
                count_items=lambda b: float((b["segment_ids"] > 0).sum())),
      loop.Evaluation(evaluator=evaluator, milestone=exact_match if verifiable else None))
  if state is not None:
    print(f"sft: done; checkpoint in {phase_dir / 'checkpoint'}, metrics in "
          f"{phase_dir / 'metrics.jsonl'}")
