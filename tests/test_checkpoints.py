"""Orbax checkpoints: bit-exact save/restore, the manifest, and `load_model` on every kind of path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import checkpoints
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf

ARCH = dict(attention_layers=("global", "local"), window_size=4)


def _assert_bit_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)

  def check(x, y):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()  # Bits, not just values (NaN payloads, -0.0).

  jax.tree.map(check, a, b)


@pytest.fixture(scope="module")
def reward_import(make_hf_gpt_neo):
  """(HFModel, config, params as NumPy) of a tiny reward model."""
  source = make_hf_gpt_neo(**ARCH, classifier=True)
  config, params, _, _ = hf.load_checkpoint(str(source.path))
  return source, config, params


def test_save_restore_is_bit_exact_with_train_state(reward_import, tmp_path):
  _, config, params = reward_import
  params = jax.device_put(params)
  optimizer = optax.adamw(1e-3)
  opt_state = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params), params)[1]
  train_state = dict(step=jnp.int32(7), opt_state=opt_state,
                     rng=jax.random.key_data(jax.random.key(3)))
  manifest = checkpoints.make_manifest(config, kind=hf.REWARD, score_head=True, phase="reward",
                                       finished=False, reward_stats={"mean": 0.25, "std": 1.5})
  ckpts = checkpoints.Checkpoints(tmp_path / "ckpt")
  ckpts.save(7, params=params, manifest=manifest, train_state=train_state)
  ckpts.close()

  again = checkpoints.Checkpoints(tmp_path / "ckpt", create=False)
  assert again.latest_step() == 7
  restored = again.restore(params=checkpoints.abstract_params(config, score_head=True),
                           train_state=jax.tree.map(jnp.zeros_like, train_state))
  _assert_bit_equal(restored["params"], params)
  _assert_bit_equal(restored["train_state"], train_state)
  assert restored["manifest"] == manifest == again.manifest()
  assert gpt_neo.GPTNeoConfig.from_hf_dict(restored["manifest"]["model"]) == config
  # Export-style restore: params only.
  assert "train_state" not in again.restore(7, params=checkpoints.abstract_params(config, True))
  again.close()


def test_keeps_the_newest_steps(reward_import, tmp_path):
  _, config, params = reward_import
  ckpts = checkpoints.Checkpoints(tmp_path, keep=2)
  for step in (1, 2, 3):
    manifest = checkpoints.make_manifest(config, kind=hf.REWARD, score_head=True, phase="reward",
                                         step_marker=step)
    ckpts.save(step, params=jax.tree.map(lambda x: x + step, params), manifest=manifest)
  assert ckpts.latest_step() == 3
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
  restored = ckpts.restore(2, params=checkpoints.abstract_params(config, True))
  assert restored["manifest"]["step_marker"] == 2
  _assert_bit_equal(restored["params"], jax.tree.map(lambda x: np.asarray(x + 2), params))
  ckpts.close()


def test_missing_and_empty_checkpoint_directories(tmp_path):
  with pytest.raises(UserError, match=rf"{tmp_path / 'nope'}: no such checkpoint directory"):
    checkpoints.Checkpoints(tmp_path / "nope", create=False)
  empty = checkpoints.Checkpoints(tmp_path / "empty")
  with pytest.raises(UserError, match="no checkpoint has been saved here yet"):
    empty.manifest()
  empty.close()


def test_load_model_from_orbax_dir_phase_dir_and_hf_dir(make_hf_gpt_neo, tiny_tokenizer_dir,
                                                         tmp_path):
  source = make_hf_gpt_neo(**ARCH, tokenizer_dir=tiny_tokenizer_dir)
  config, params, kind, _ = hf.load_checkpoint(str(source.path))
  phase_dir = tmp_path / "work" / "import"
  checkpoints.save_model(phase_dir, params, config, kind=kind, phase="import",
                     tokenizer_dir=tiny_tokenizer_dir)
  loaded = {name: checkpoints.load_model(path) for name, path in (
      ("orbax", phase_dir / "checkpoint"), ("phase", phase_dir), ("hf", source.path))}
  for name, model in loaded.items():
    assert model["config"] == config, name
    assert model["kind"] == hf.CAUSAL_LM and not model["score_head"], name
    _assert_bit_equal(jax.tree.map(np.asarray, model["params"]), params)
    assert hf.load_tokenizer(model["tokenizer_dir"]).get_vocab() == \
        hf.load_tokenizer(tiny_tokenizer_dir).get_vocab(), name
  assert loaded["orbax"]["manifest"]["finished"] and loaded["orbax"]["manifest"]["phase"] == "import"
  assert loaded["hf"]["manifest"] == {}
  # The newest policy of a workdir is found by phase order.
  assert checkpoints.resolve_checkpoint("", tmp_path / "work", checkpoints.POLICY_PHASES,
                                       key="checkpoint") == str(phase_dir)
  assert checkpoints.resolve_checkpoint("given", tmp_path / "work", "sft", key="x") == "given"
  assert checkpoints.phase_finished(phase_dir) and not checkpoints.phase_finished(tmp_path)


def test_load_model_reward_from_orbax(reward_import, tmp_path):
  _, config, params = reward_import
  checkpoints.save_model(tmp_path / "reward", params, config, kind=hf.REWARD, phase="reward")
  model = checkpoints.load_model(tmp_path / "reward")
  assert model["kind"] == hf.REWARD and model["score_head"] and model["tokenizer_dir"] is None
  _assert_bit_equal(jax.tree.map(np.asarray, model["params"]), params)


def test_load_model_on_something_else(tmp_path):
  (tmp_path / "notes.txt").write_text("not a model")
  with pytest.raises(UserError, match=rf"{tmp_path}: neither an Orbax checkpoint"):
    checkpoints.load_model(tmp_path)
  with pytest.raises(UserError, match="no ppo / sft / init / import checkpoint in .*; run "
                     "--phase=ppo or --phase=sft or --phase=init or --phase=import first or set "
                     "--config.checkpoint"):
    checkpoints.resolve_checkpoint("", tmp_path, checkpoints.POLICY_PHASES, key="checkpoint")
