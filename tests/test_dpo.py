"""Tests of DPO's pure pieces (rlhf_jax/training/dpo.py): the DPO and IPO losses against
hand-computed values and against TRL's DPOTrainer on the same batch, sequence log-probabilities
against NumPy, and a loss that falls on a tiny GPT-Neo."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.training import dpo

# Two pairs, by hand (beta = 0.5):
#   pair 0: policy chosen/rejected -10/-12, reference -11/-11: log-ratios +1/-1, delta 2
#   pair 1: policy chosen/rejected -5/-4, reference -5/-5: log-ratios 0/+1, delta -1
POLICY_CHOSEN, POLICY_REJECTED = np.array([-10.0, -5.0]), np.array([-12.0, -4.0])
REF_CHOSEN, REF_REJECTED = np.array([-11.0, -5.0]), np.array([-11.0, -5.0])
BETA = 0.5


def _inputs():
  return [jnp.asarray(x, jnp.float32) for x in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN,
                                                 REF_REJECTED)]


def test_sigmoid_loss_and_metrics_hand_computed():
  loss, metrics = dpo.dpo_loss(*_inputs(), beta=BETA)
  # -log sigmoid(beta * delta) = log(1 + exp(-beta * delta)): beta * delta = 1 and -0.5.
  expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(loss) == pytest.approx(0.6436695, rel=1e-6)
  # Rewards beta * log-ratio: chosen 0.5 and 0, rejected -0.5 and 0.5.
  expected_metrics = {"rewards/chosen": 0.25, "rewards/rejected": 0.0,
                      "rewards/accuracies": 0.5, "rewards/margins": 0.25,
                      "logps/chosen": -7.5, "logps/rejected": -8.0}
  assert set(metrics) == set(expected_metrics)
  for name, value in expected_metrics.items():
    assert float(metrics[name]) == pytest.approx(value, abs=1e-6), name


def test_label_smoothing_is_conservative_dpo():
  eps = 0.1
  loss, _ = dpo.dpo_loss(*_inputs(), beta=BETA, label_smoothing=eps)
  per_pair = [-(1 - eps) * math.log(scipy.special.expit(z)) - eps * math.log(scipy.special.expit(-z))
              for z in (1.0, -0.5)]
  assert float(loss) == pytest.approx(np.mean(per_pair), rel=1e-6)
  assert float(loss) == pytest.approx((0.9 * 0.3132617 + 0.1 * 1.3132617
                                       + 0.9 * 0.9740770 + 0.1 * 0.4740770) / 2, rel=1e-6)


def test_ipo_loss_hand_computed():
  # Per-token log-ratio margins: pair 0 (lengths 2, 4): 1/2 - (-1)/4 = 0.75; pair 1 (1, 2):
  # 0/1 - 1/2 = -0.5. Target 1 / (2 beta) = 1: (0.75 - 1)^2 = 0.0625, (-0.5 - 1)^2 = 2.25.
  loss, metrics = dpo.dpo_loss(*_inputs(), beta=BETA, loss_type="ipo",
                               chosen_lengths=jnp.array([2, 1]), rejected_lengths=jnp.array([4, 2]))
  assert float(loss) == pytest.approx((0.0625 + 2.25) / 2, rel=1e-6)
  assert float(metrics["rewards/margins"]) == pytest.approx(0.25, abs=1e-6)


def test_sigmoid_gradient_hand_computed_and_reference_is_constant():
  eps = 0.2

  def loss(*logps):
    return dpo.dpo_loss(*logps, beta=BETA, label_smoothing=eps)[0]

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*_inputs())
  z = BETA * np.array([2.0, -1.0])
  # d/d delta of -(1-eps) log s(beta delta) - eps log s(-beta delta), averaged over 2 pairs.
  d_delta = (-(1 - eps) * BETA * scipy.special.expit(-z) + eps * BETA * scipy.special.expit(z)) / 2
  np.testing.assert_allclose(grads[0], d_delta, rtol=1e-6)
  np.testing.assert_allclose(grads[1], -d_delta, rtol=1e-6)
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)


def test_padding_pairs_are_ignored():
  chosen, rejected, ref_chosen, ref_rejected = _inputs()
  pad = lambda x: jnp.concatenate([x, jnp.array([jnp.nan], jnp.float32)])
  mask = jnp.array([1.0, 1.0, 0.0])
  for loss_type in ("sigmoid", "ipo"):
    kwargs = dict(beta=BETA, loss_type=loss_type, chosen_lengths=jnp.array([2, 1, 0]),
                  rejected_lengths=jnp.array([4, 2, 0]))
    loss, metrics = dpo.dpo_loss(pad(chosen), pad(rejected), pad(ref_chosen), pad(ref_rejected),
                                 pair_mask=mask, **kwargs)
    clean_loss, clean_metrics = dpo.dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=BETA, loss_type=loss_type,
        chosen_lengths=jnp.array([2, 1]), rejected_lengths=jnp.array([4, 2]))
    assert float(loss) == pytest.approx(float(clean_loss), rel=1e-6)
    for name in clean_metrics:
      assert float(metrics[name]) == pytest.approx(float(clean_metrics[name]), abs=1e-6)
    grad = jax.grad(lambda c: dpo.dpo_loss(c, pad(rejected), pad(ref_chosen), pad(ref_rejected),
                                           pair_mask=mask, **kwargs)[0])(pad(chosen))
    assert np.all(np.isfinite(grad)) and float(grad[2]) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="hinge"), "'hinge'"),
    (dict(beta=0.0), "beta=0.0"),
    (dict(label_smoothing=0.5), "label_smoothing=0.5"),
    (dict(loss_type="ipo", label_smoothing=0.1), "sigmoid' only"),
    (dict(loss_type="ipo"), "chosen_lengths"),
])
def test_bad_settings_are_user_errors(kwargs, message):
  kwargs = {"beta": BETA, **kwargs}
  with pytest.raises(UserError, match=message):
    dpo.dpo_loss(*_inputs(), **kwargs)
  if "chosen_lengths" not in message:  # the loss_fn builder checks its settings up front
    with pytest.raises(UserError, match=message):
      dpo.make_loss_fn(lambda *args: None, **kwargs)


# ---------------------------------------------------------------------------------------------
# Sequence log-probabilities of pair batches


def _pair_batch(rows, prompt_lengths, length):
  """A [B, 2, T] right-padded pair batch from token rows [[chosen, rejected], ...]."""
  pairs = len(rows)
  batch = {"input_ids": np.zeros((pairs, 2, length), np.int32),
           "segment_ids": np.zeros((pairs, 2, length), np.int32),
           "positions": np.zeros((pairs, 2, length), np.int32),
           "response_length": np.zeros((pairs, 2), np.int32),
           "pair_mask": np.ones((pairs,), np.float32)}
  for b, (pair, prompt_length) in enumerate(zip(rows, prompt_lengths)):
    for side, tokens in enumerate(pair):
      batch["input_ids"][b, side, :len(tokens)] = tokens
      batch["segment_ids"][b, side, :len(tokens)] = 1
      batch["positions"][b, side, :len(tokens)] = np.arange(len(tokens))
      batch["response_length"][b, side] = len(tokens) - prompt_length
  return batch


def _numpy_response_logps(logits, tokens, prompt_length):
  """sum_t log softmax(logits[t - 1])[tokens[t]] over the response tokens, in float64."""
  log_p = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=-1)
  return sum(log_p[t - 1, tokens[t]] for t in range(prompt_length, len(tokens)))


def test_response_mask_and_sequence_logps_match_numpy():
  rng = np.random.default_rng(0)
  vocab, length = 11, 7
  rows = [[[1, 2, 3, 4], [1, 2, 5]], [[6, 7, 8, 9, 10, 3, 2], [6, 7, 8, 1]]]
  prompt_lengths = [2, 3]
  batch = _pair_batch(rows, prompt_lengths, length)
  mask = dpo.response_mask(batch["segment_ids"].reshape(4, length),
                           batch["response_length"].reshape(4))
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0],
                                       [0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]])
  logits = (3.0 * rng.normal(size=(4, length, vocab))).astype(np.float32)
  logps = dpo.pair_logps(lambda params, *_: params, logits, batch)
  expected = [[_numpy_response_logps(logits[2 * b + side], rows[b][side], prompt_lengths[b])
               for side in range(2)] for b in range(2)]
  np.testing.assert_allclose(logps, expected, rtol=1e-5)


def _tiny_model(vocab=32):
  return gpt_neo.GPTNeo(gpt_neo.tiny_config(vocab_size=vocab, hidden_size=16, num_heads=2,
                                            max_position_embeddings=16))


def test_pair_logps_of_a_gpt_neo_match_its_log_softmax():
  model = _tiny_model()
  params = gpt_neo.init_params(model, jax.random.key(0))
  rows = [[[3, 4, 5, 6], [3, 4, 9]], [[7, 8, 1, 2, 3], [7, 8, 10, 11, 12, 13]]]
  batch = _pair_batch(rows, [2, 2], 8)
  logits_fn = dpo.model_logits_fn(model)
  logps = jax.jit(functools.partial(dpo.pair_logps, logits_fn))(params, batch)
  for b in range(2):
    for side in range(2):
      tokens = np.asarray(rows[b][side])[None]
      logits = logits_fn(params, tokens, np.ones_like(tokens), np.arange(tokens.shape[1])[None],
                         None)[0]
      assert float(logps[b, side]) == pytest.approx(
          _numpy_response_logps(logits, rows[b][side], 2), rel=1e-5)


def test_dpo_loss_falls_and_pairs_get_ranked_on_a_tiny_gpt_neo():
  """Reference log-probabilities computed once; 30 Adam steps rank every training pair."""
  model = _tiny_model()
  params = gpt_neo.init_params(model, jax.random.key(1))
  rng = np.random.default_rng(2)
  rows = [[list(rng.integers(0, 32, size=3)) + list(rng.integers(0, 32, size=n))
           for n in (3, 4)] for _ in range(4)]
  for pair in rows:
    pair[1][:3] = pair[0][:3]  # the two responses share their 3-token prompt
  batch = _pair_batch(rows, [3] * 4, 8)
  logits_fn = dpo.model_logits_fn(model)
  batch["ref_logps"] = jax.jit(functools.partial(dpo.pair_logps, logits_fn))(params, batch)
  loss_fn = dpo.make_loss_fn(logits_fn, beta=0.1)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  opt_state = tx.init(params)
  params, opt_state, first_loss, first = step(params, opt_state)
  assert float(first_loss) == pytest.approx(math.log(2), rel=1e-5)  # policy == reference
  assert float(first["weight"]) == 4.0
  for _ in range(30):
    params, opt_state, loss, metrics = step(params, opt_state)
  assert float(loss) < 0.5 * math.log(2)
  assert float(metrics["rewards/accuracies"]) == 1.0 and float(metrics["rewards/margins"]) > 0


# ---------------------------------------------------------------------------------------------
# Against TRL's DPOTrainer (PyTorch) on the same batch


@pytest.fixture(scope="module")
def trl_models(make_hf_gpt_neo, tiny_tokenizer_dir):
  """Fresh copies of two different tiny random GPT-Neos (policy, reference) and the tokenizer."""
  pytest.importorskip("trl", reason="trl is not installed (pip install 'trl==1.16.*'; a test "
                      "reference only, never a package dependency)")
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
  load = lambda seed: transformers.GPTNeoForCausalLM.from_pretrained(
      make_hf_gpt_neo(vocab_size=320, hidden_size=32, seed=seed).path)
  return load(0), load(1), tokenizer


PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": " Paris is the capital.",
     "rejected": " The quick brown fox."},
    {"prompt": "The cat sleeps", "chosen": " in the sun.", "rejected": " while the dog jumps over"},
    {"prompt": "Hello world!", "chosen": " Numbers like 12", "rejected": " (a) [b]"},
    {"prompt": "A language model", "chosen": " predicts the next token.",
     "rejected": " trains a reward model on preference pairs."},
]


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_loss_and_metrics_match_trl_dpo_trainer(trl_models, tmp_path, loss_type, beta):
  """TRL 1.16's DPOTrainer.compute_loss on its own collated batch (policy and reference
  forwards inside it) against make_loss_fn on the same tokens and the same models' logits."""
  import datasets
  import torch
  import trl
  policy, reference, tokenizer = trl_models
  args = trl.DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], report_to=[],
                       use_cpu=True, bf16=False, per_device_train_batch_size=len(PAIRS))
  trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                           train_dataset=datasets.Dataset.from_list(PAIRS),
                           processing_class=tokenizer)
  torch_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
  trainer.model.train()  # metrics go to the "train" log; every dropout rate is 0
  trainer._metrics["train"].clear()
  trl_loss = float(trainer.compute_loss(trainer.model, torch_batch).detach())
  trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

  # TRL's rows are [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1]; ours [B, 2, T].
  pairs = len(PAIRS)
  to_pairs = lambda x: np.stack([x[:pairs], x[pairs:]], axis=1)
  ids = torch_batch["input_ids"].numpy()
  attention = torch_batch["attention_mask"].numpy()
  batch = {"input_ids": to_pairs(ids).astype(np.int32),
           "segment_ids": to_pairs(attention).astype(np.int32),
           "positions": to_pairs(np.maximum(np.cumsum(attention, axis=1) - 1, 0)).astype(np.int32),
           "response_length": to_pairs(torch_batch["completion_mask"].numpy().sum(axis=1)),
           "pair_mask": np.ones(pairs, np.float32)}
  assert batch["input_ids"][:, :, 0].min() >= 0 and np.all(batch["response_length"] > 1)

  def logits_of(model):
    with torch.no_grad():
      logits = model(input_ids=torch_batch["input_ids"],
                     attention_mask=torch_batch["attention_mask"]).logits.numpy()
    return to_pairs(logits).reshape(2 * pairs, *logits.shape[1:])  # rows 2b, 2b + 1

  logits_fn = lambda logits, *_: logits  # the "parameters" are the model's logits
  batch["ref_logps"] = dpo.pair_logps(logits_fn, logits_of(trainer.ref_model), batch)
  loss_fn = dpo.make_loss_fn(logits_fn, beta=beta, loss_type=loss_type)
  loss, metrics = loss_fn(logits_of(trainer.model), batch, None)

  assert float(loss) == pytest.approx(trl_loss, rel=1e-5)
  names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]
  for name in names:
    assert float(metrics[name]) == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
  # The batch is informative: the policies differ, and pairs disagree on which side wins.
  assert abs(trl_metrics["rewards/margins"]) > 1e-3
  assert 0.0 < trl_metrics["rewards/accuracies"] < 1.0 or loss_type == "ipo"
