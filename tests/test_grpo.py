"""The grpo phase: the RL phase (rlhf_jax/phases/ppo.py) with GRPO's defaults (configs/grpo.py).

The GRPO mathematics (group advantages, the k3 loss term, the loss normalisations) is tested
against NumPy in test_ppo_core.py; this file tests what the wiring adds:
- the iteration's GRPO advantages (from the verifier's scores of a rollout) against a NumPy
  reference, the KL kept out of the rewards, the KL loss term with its coefficient;
- config errors naming their key;
- the phase itself on tiny checkpoints: it resumes after an interruption bit-exactly, and with
  the built-in verifier as its reward it learns to answer (the verifier reward rises).
"""

import dataclasses
import json
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import checkpoints
from rlhf_jax import phases
from rlhf_jax.configs import grpo as grpo_config
from rlhf_jax.errors import UserError
from rlhf_jax.models import decode
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf
from rlhf_jax.training import ppo
from rlhf_jax.training import ppo_core

EOS = 7
N = 6  # Response tokens.
TOKENIZER = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=EOS)


def _settings(**changes) -> ppo.PPOSettings:
  config = grpo_config.get_config()
  config.rollout.max_new_tokens = N
  settings = ppo.settings_from_config(config, TOKENIZER, (("verifier", 1.0),))
  return dataclasses.replace(settings, **changes)


def _samples(lengths) -> decode.Samples:
  """Responses of the given lengths (real tokens a prefix of each row), random logprobs."""
  lengths = np.asarray(lengths)
  mask = (np.arange(N)[None, :] < lengths[:, None]).astype(np.float32)
  logprobs = np.random.default_rng(0).normal(-1.0, 0.3, mask.shape).astype(np.float32) * mask
  return decode.Samples(tokens=jnp.zeros(mask.shape, jnp.int32), logprobs=jnp.asarray(logprobs),
                        mask=jnp.asarray(mask), lengths=jnp.asarray(lengths),
                        ended=jnp.ones(len(lengths), bool))


def _numpy_grpo(scores, k, scale, eps=1e-4):
  """DeepSeekMath's outcome-supervision advantage: (r - group mean) / (std + eps), unbiased std
  (TRL); "batch": the std of all scores; "none": centred only (Dr. GRPO)."""
  scores = np.asarray(scores, np.float64)
  groups = scores.reshape(-1, k)
  centred = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)
  if scale == "none":
    return centred
  std = np.repeat(groups.std(axis=1, ddof=1), k) if scale == "group" else scores.std(ddof=1)
  return centred / (std + eps)


def test_the_config_is_grpo_with_its_documented_defaults():
  config = grpo_config.get_config()
  assert config.name == "grpo" and config.reward.sources == "verifier"
  settings = ppo.settings_from_config(config, TOKENIZER, (("verifier", 1.0),))
  assert settings.advantage_estimator == "grpo" and not settings.uses_critic
  assert settings.grpo_scale == "group" and settings.loss_normalization == "sequence_mean"
  assert settings.kl_penalty == "loss" and settings.kl_estimator == "k3"
  assert settings.samples_per_prompt >= 2
  assert config.ppo.init_kl_coef == 0.04 and settings.adaptive_kl and settings.kl_target == 1.0
  assert settings.clip_range == 0.2 and not settings.normalize_scores
  # Dolly has no checkable answers: its variant optimises the reward model.
  assert grpo_config.get_config("gpt_neo_125m").reward.sources == "model"


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_of_an_iteration_match_numpy(scale):
  """Two prompts x 4 answers of different lengths scored by the verifier (0/1, one group all
  right: zero advantage there): one advantage per answer on each of its real tokens, the
  NumPy reference's, with the KL (a loss term under GRPO) nowhere in the rewards."""
  settings = _settings(grpo_scale=scale, samples_per_prompt=4)
  samples = _samples([6, 1, 3, 6, 2, 4, 5, 6])
  scores = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)
  scored = {"scores": jnp.asarray(scores),
            "ref_logprobs": samples.logprobs - 0.5}  # KL 0.5 a token: must not reach rewards.
  out = ppo.compute_advantages(settings, samples, scored, jnp.float32(0.3))
  mask = np.asarray(samples.mask)
  expected = _numpy_grpo(scores, 4, scale)[:, None] * mask
  np.testing.assert_allclose(out["advantages"], expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(out["advantages"])[4:] == 0)  # All answers right: nothing to learn.
  last = (np.arange(N)[None, :] == (mask.sum(1) - 1)[:, None])
  np.testing.assert_allclose(out["rewards"], scores[:, None] * last, atol=1e-6)
  assert not np.asarray(out["non_score_reward"]).any()
  # The sign of each answer's advantage is its score against its group's, whatever its length.
  signs = np.sign(np.asarray(out["advantages"])[:4, 0])
  np.testing.assert_array_equal(signs, [1, -1, -1, 1])


def test_the_kl_penalty_as_a_reward_reaches_grpo_through_the_returns():
  """kl_penalty=reward: the group normalisation sees score + the summed KL penalty (the return),
  so a longer answer with the same score gets less."""
  settings = _settings(kl_penalty="reward", kl_estimator="k1", samples_per_prompt=2)
  samples = _samples([6, 2])
  scored = {"scores": jnp.asarray([1.0, 1.0]), "ref_logprobs": samples.logprobs - 0.5}
  out = ppo.compute_advantages(settings, samples, scored, jnp.float32(0.1))
  returns = np.array([1.0 - 0.1 * 0.5 * 6, 1.0 - 0.1 * 0.5 * 2])
  np.testing.assert_allclose(np.asarray(out["advantages"])[:, 0], _numpy_grpo(returns, 2, "group"),
                             rtol=1e-4)
  assert np.asarray(out["advantages"])[0, 0] < 0 < np.asarray(out["advantages"])[1, 0]


@pytest.mark.parametrize("normalization", ["sequence_mean", "token", "constant"])
def test_the_loss_adds_the_k3_kl_term_with_the_states_coefficient(normalization):
  """ppo_loss with kl_penalty=loss: policy loss + coef x k3(policy, reference), both reduced with
  the configured normalisation (checked at ratio 1, where the clipped loss is -A)."""
  config = gpt_neo.tiny_config(vocab_size=16, hidden_size=16, num_heads=2, window_size=4)
  model = gpt_neo.GPTNeo(config)
  params = jax.jit(lambda key: gpt_neo.init_params(model, key))(jax.random.key(0))
  settings = _settings(loss_normalization=normalization)
  models = ppo.Models(policy=model, reference=model, value=None, reward=None)
  rng = np.random.default_rng(1)
  prompt = rng.integers(0, 16, (4, 3)).astype(np.int32)
  tokens = rng.integers(0, 16, (4, N)).astype(np.int32)
  samples = _samples([6, 2, 4, 1])
  seqs = ppo.sequences(prompt, np.ones((4, 3), np.float32), tokens, samples.mask)
  logprobs = ppo.response_outputs(model, params, seqs, 3, N, lm_head=True,
                                  temperature=settings.temperature, tokens=tokens)["logprobs"]
  reference = logprobs + jnp.asarray(rng.normal(0, 0.3, (4, N)), jnp.float32)
  advantages = jnp.asarray(rng.normal(0, 1, (4, 1)), jnp.float32) * samples.mask
  minibatch = dict(seqs, tokens=tokens, mask=samples.mask, old_logprobs=logprobs,
                   advantages=advantages, ref_logprobs=reference)
  loss, metrics = ppo.ppo_loss(models, settings, {"policy": params, "value": {}}, minibatch, 3,
                               {"mean": 0.0, "std": 1.0}, kl_coef=0.25)
  m = np.asarray(samples.mask)
  log_ratio = np.asarray(reference - logprobs)
  k3 = (np.exp(log_ratio) - 1 - log_ratio) * m
  per_token = -np.asarray(advantages) + 0.25 * k3
  if normalization == "sequence_mean":
    expected = np.mean((per_token * m).sum(1) / m.sum(1))
    weight = 4
  elif normalization == "token":
    expected, weight = (per_token * m).sum() / m.sum(), m.sum()
  else:
    expected, weight = (per_token * m).sum() / (4 * N), 4
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-6)
  assert float(metrics["kl_loss"]) > 0 and float(metrics["weight"]) == weight


def test_config_errors_name_their_key():
  config = grpo_config.get_config()
  config.rollout.samples_per_prompt = 1
  with pytest.raises(UserError, match=r"--config\.rollout\.samples_per_prompt=1: "
                                      r"advantage_estimator=grpo"):
    ppo.settings_from_config(config, TOKENIZER)
  for key, value in (("grpo_scale", "std"), ("loss_normalization", "dapo"),
                     ("kl_penalty", "both"), ("advantage_estimator", "vtrace")):
    config = grpo_config.get_config()
    config.ppo[key] = value
    with pytest.raises(UserError, match=rf"--config\.ppo\.{key}={value}: use"):
      ppo.settings_from_config(config, TOKENIZER)


# ---------------------------------------------------------------------------------------------
# The phase on tiny checkpoints


LUCKY_RECORDS = [{"instruction": f"Say the lucky number, please ({i}).", "context": "",
                  "response": "7", "category": "lucky", "answer": "7"} for i in range(24)]


def _records_file(tmp_path: pathlib.Path) -> pathlib.Path:
  """Records whose answer is always 7: the verifier accepts a response stating 7 and no other
  number, which a random tiny policy does by chance a few times in a hundred answers."""
  path = tmp_path / "lucky.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in LUCKY_RECORDS))
  return path


def _tiny_sft(workdir: pathlib.Path, tokenizer_dir) -> dict:
  tokenizer = hf.load_tokenizer(tokenizer_dir)
  config = gpt_neo.tiny_config(vocab_size=len(tokenizer), hidden_size=32, num_heads=2,
                               window_size=8, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.eos_token_id)
  model = gpt_neo.GPTNeo(config)
  params = jax.jit(lambda key: gpt_neo.init_params(model, key))(jax.random.key(0))
  checkpoints.save_model(workdir / "sft", params, config, kind=hf.CAUSAL_LM, phase="sft",
                         tokenizer_dir=tokenizer_dir)
  return params


def _run_config(records: pathlib.Path, **train):
  config = grpo_config.get_config()
  config.data.update(dict(source=str(records), validation_fraction=0.25, test_fraction=0.0))
  config.eval_prompts = 0
  config.rollout.update(dict(max_prompt_length=24, max_new_tokens=N, samples_per_prompt=4))
  config.train.update(dict(steps=4, batch_size=4, log_every=1, save_every=2, keep_checkpoints=2,
                           eval_every=0))
  config.train.update(train)
  return config


def _saved_step(workdir: pathlib.Path, step: int) -> dict:
  manager = ocp.CheckpointManager(workdir / "grpo" / "checkpoint",
                                  item_names=("params", "train_state", "manifest"))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), train_state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return jax.tree.map(lambda x: np.array(x, copy=True),
                      {k: restored[k] for k in ("params", "train_state")})


def _metrics_rows(phase_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_an_interrupted_and_resumed_grpo_run_equals_an_uninterrupted_one(tmp_path,
                                                                        tiny_tokenizer_dir,
                                                                        capsys):
  """The whole state comes back: params, Adam moments, the RNG (the next rollout's samples),
  the data position (the step: the next prompts) and the adaptive KL coefficient. The reference
  log-probabilities are recomputed from the frozen SFT policy for each rollout (not cached), so
  they come back with the samples."""
  records = _records_file(tmp_path)
  sft_params = _tiny_sft(tmp_path, tiny_tokenizer_dir)
  phases.run_phase("grpo", _run_config(records), tmp_path)
  uninterrupted = _saved_step(tmp_path, 4)
  first_rows = _metrics_rows(tmp_path / "grpo")
  shutil.rmtree(tmp_path / "grpo" / "checkpoint" / "4")  # A crash after the step-2 checkpoint.
  capsys.readouterr()
  phases.run_phase("grpo", _run_config(records), tmp_path)
  out = capsys.readouterr().out
  assert "grpo: resuming from step 2" in out
  resumed = _saved_step(tmp_path, 4)
  jax.tree.map(np.testing.assert_array_equal, uninterrupted, resumed)
  # The logged iterations 3 and 4 of the resumed run are the uninterrupted run's (but speed).
  learning = lambda row: {k: v for k, v in row.items() if "per_second" not in k}
  rows = {row["step"]: row for row in _metrics_rows(tmp_path / "grpo") if "loss" in row}
  for row in first_rows:
    if "loss" in row and row["step"] > 2:
      assert learning(rows[row["step"]]) == learning(row)
  state = resumed["train_state"]
  assert int(state["step"]) == 4 and state["extra"]["value"] == {}  # No value model.
  # The KL controller's state: beta, adapted on the k3 KL from 0.04, restored with the rest.
  assert float(state["extra"]["kl_coef"]) != pytest.approx(0.04, abs=1e-6)
  assert not np.array_equal(resumed["params"]["wte"]["embedding"], sft_params["wte"]["embedding"])
  assert checkpoints.phase_finished(tmp_path / "grpo")
  assert checkpoints.describe_model(str(tmp_path / "grpo"))["manifest"]["phase"] == "grpo"
  assert {"reward/verifier", "kl_loss", "policy_loss"} <= set(rows[4])
  assert "value_loss" not in rows[4]


# Not marked slow: the default run's test of the grpo phase run for real (the resume test above,
# two runs of the phase, is).
def test_grpo_on_the_verifier_reward_learns_to_answer(tmp_path, tiny_tokenizer_dir):
  """From a random tiny policy that states 7 alone in ~2% of its answers, GRPO with the built-in
  verifier as its reward (8 answers per prompt) makes it the usual answer."""
  records = _records_file(tmp_path)
  _tiny_sft(tmp_path, tiny_tokenizer_dir)
  config = _run_config(records, steps=30, batch_size=4, save_every=0, log_every=1)
  config.rollout.samples_per_prompt = 8
  config.optim.lr = 3e-3
  phases.run_phase("grpo", config, tmp_path)
  rows = [row for row in _metrics_rows(tmp_path / "grpo") if "loss" in row]
  reward = np.array([row["reward/verifier"] for row in rows])
  assert reward[:3].mean() < 0.15
  assert reward[-5:].mean() > reward[:3].mean() + 0.4, reward
  assert all(np.isfinite(row["loss"]) for row in rows)


_EIGHT_DEVICE_RUN = """
import pathlib, sys
sys.path.insert(0, {tests!r})
import jax
import test_grpo
from rlhf_jax import phases
assert jax.device_count() == 8, jax.devices()
workdir = pathlib.Path({workdir!r})
phases.run_phase("grpo", test_grpo._run_config(workdir / "lucky.jsonl", steps=2, save_every=0,
                                                batch_size={batch_size}), workdir)
"""


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [8, 4])
def test_a_host_reward_on_eight_devices_trains_like_one_device(tmp_path, tiny_tokenizer_dir,
                                                               batch_size):
  """The verifier (a host reward source: `ppo.HostRewardStep`, a compiled rollout, decoding and
  scoring on the host, a compiled update) on a mesh of 8 fake devices: the responses gathered
  from the shards are scored and put back in the right rows, so two iterations give the one-device
  run's rewards, losses and parameters (to float32 summation order). 8 prompts an iteration are
  split over the devices; 4 do not divide by 8 and are replicated (`sharding.rows_sharding`)."""
  import subprocess
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from launch import local
  one, eight = tmp_path / "one", tmp_path / "eight"
  for workdir in (one, eight):
    workdir.mkdir()
    _records_file(workdir)
    _tiny_sft(workdir, tiny_tokenizer_dir)
  phases.run_phase("grpo", _run_config(one / "lucky.jsonl", steps=2, save_every=0,
                                       batch_size=batch_size), one)
  script = _EIGHT_DEVICE_RUN.format(tests=str(pathlib.Path(__file__).parent), workdir=str(eight),
                                    batch_size=batch_size)
  result = subprocess.run([sys.executable, "-c", script], env=local.fake_devices_env(8),
                          cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = {name: [r for r in _metrics_rows(w / "grpo") if "loss" in r]
          for name, w in (("one", one), ("eight", eight))}
  assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["eight"]] == [1, 2]
  for single, sharded in zip(rows["one"], rows["eight"]):
    # The verifier's mean reward counts exact 0/1 verdicts: the same responses, the same rows.
    assert sharded["reward/verifier"] == single["reward/verifier"]
    for key in ("loss", "policy_loss", "kl_loss", "response_length"):
      np.testing.assert_allclose(sharded[key], single[key], rtol=1e-4, atol=1e-6, err_msg=key)
  load = lambda w: checkpoints.load_model(str(w / "grpo"))["params"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               load(one), load(eight))
