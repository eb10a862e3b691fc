"""HF <-> Flax conversion: round trips through `transformers`, sharded/.bin checkpoints, bad input."""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers

from conftest import left_padded, load_cleanly
from rlhf_jax.data import batching
from rlhf_jax.errors import UserError
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import hf

ARCH = dict(attention_layers=("global", "local", "global"), window_size=4)


def _tokens(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  return left_padded([rng.integers(1, vocab_size, n).tolist() for n in (10, 6, 2)], pad_id=0)


def _hf_outputs(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                 position_ids=torch.from_numpy(positions).long()).logits.float().numpy()


def _assert_same_state(loaded, original, dtype=torch.float32):
  ours, theirs = loaded.state_dict(), original.state_dict()
  assert ours.keys() == theirs.keys()
  for name, value in theirs.items():
    assert ours[name].dtype == dtype, name
    assert torch.equal(ours[name], value.to(dtype)), name


def test_causal_lm_round_trip_is_bit_identical(make_hf_gpt_neo, tmp_path):
  source = make_hf_gpt_neo(**ARCH)
  config, params, kind, _ = hf.load_checkpoint(str(source.path))
  assert kind == hf.CAUSAL_LM and "score" not in params
  hf.save_checkpoint(params, config, tmp_path / "out")
  loaded = load_cleanly(transformers.AutoModelForCausalLM, tmp_path / "out")
  assert isinstance(loaded, transformers.GPTNeoForCausalLM)
  _assert_same_state(loaded, source.model)
  assert loaded.config.attention_layers == source.config.attention_layers
  ids, mask = _tokens(config.vocab_size)
  np.testing.assert_array_equal(_hf_outputs(loaded, ids, mask), _hf_outputs(source.model, ids, mask))
  # And the Flax model on the same weights agrees with the exported model.
  ours = jax.jit(gpt_neo.GPTNeo(config).apply)({"params": params}, ids, mask)["logits"]
  real = mask.astype(bool)
  assert np.abs(np.asarray(ours)[real] - _hf_outputs(loaded, ids, mask)[real]).max() <= 1e-4


def test_reward_model_round_trip(make_hf_gpt_neo, tmp_path):
  source = make_hf_gpt_neo(**ARCH, classifier=True)
  config, params, kind, _ = hf.load_checkpoint(str(source.path))
  assert kind == hf.REWARD and params["score"]["kernel"].shape == (config.hidden_size, 1)
  hf.save_checkpoint(params, config, tmp_path / "rm", kind=hf.REWARD)
  loaded = load_cleanly(transformers.AutoModelForSequenceClassification, tmp_path / "rm")
  assert isinstance(loaded, transformers.GPTNeoForSequenceClassification)
  assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == config.eos_token_id
  _assert_same_state(loaded, source.model)
  ids, mask = _tokens(config.vocab_size)
  expected = _hf_outputs(source.model, ids, mask)[:, 0]
  np.testing.assert_allclose(_hf_outputs(loaded, ids, mask)[:, 0], expected, atol=1e-4, rtol=0)
  apply = jax.jit(gpt_neo.GPTNeo(config, score_head=True).apply, static_argnames="lm_head")
  out = apply({"params": params}, ids, mask, lm_head=False)
  np.testing.assert_allclose(np.asarray(gpt_neo.sequence_scores(out["scores"], mask)), expected,
                             atol=1e-4, rtol=0)
  # Exported as a causal LM, the score head is dropped and the LM loads cleanly.
  hf.save_checkpoint(params, config, tmp_path / "lm", kind=hf.CAUSAL_LM)
  load_cleanly(transformers.GPTNeoForCausalLM, tmp_path / "lm")


def test_bfloat16_export_loads_with_rounded_weights(make_hf_gpt_neo, tmp_path):
  source = make_hf_gpt_neo(**ARCH)
  config, params, _, _ = hf.load_checkpoint(str(source.path))
  hf.save_checkpoint(params, config, tmp_path / "bf16", dtype="bfloat16")
  with safetensors.safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  loaded = load_cleanly(transformers.GPTNeoForCausalLM, tmp_path / "bf16", dtype=torch.bfloat16)
  _assert_same_state(loaded, source.model, dtype=torch.bfloat16)  # Round-to-nearest, like torch.
  ids, mask = _tokens(config.vocab_size)
  logits16, logits32 = _hf_outputs(loaded, ids, mask), _hf_outputs(source.model, ids, mask)
  real = mask.astype(bool)
  assert np.isfinite(logits16).all()
  assert np.abs(logits16[real] - logits32[real]).max() <= 0.05 * np.abs(logits32[real]).max()
  # Re-importing the bf16 export gives float32 params equal to the rounded weights.
  _, params16, _, _ = hf.load_checkpoint(str(tmp_path / "bf16"))
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                          np.asarray(b, np.float32)),
               params16, rounded)


def _assert_same_params(a: dict, b: dict) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sharded_safetensors_import(make_hf_gpt_neo, tmp_path):
  source = make_hf_gpt_neo(**ARCH)
  source.model.save_pretrained(tmp_path, max_shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  assert not (tmp_path / "model.safetensors").exists()
  _, sharded, _, _ = hf.load_checkpoint(str(tmp_path))
  _, single, _, _ = hf.load_checkpoint(str(source.path))
  _assert_same_params(sharded, single)


def test_sharded_reward_model_import(make_hf_gpt_neo, tmp_path):
  source = make_hf_gpt_neo(**ARCH, classifier=True)
  source.model.save_pretrained(tmp_path, max_shard_size="40KB")
  config, params, kind, _ = hf.load_checkpoint(str(tmp_path))
  assert kind == hf.REWARD and hf.has_score_head(tmp_path)
  _assert_same_params(params, hf.load_checkpoint(str(source.path))[1])


def test_pytorch_bin_import(make_hf_gpt_neo, tmp_path):
  source = make_hf_gpt_neo(**ARCH)
  source.config.save_pretrained(tmp_path)
  # transformers 5 no longer writes .bin files; older checkpoints on the hub are exactly this.
  torch.save(source.model.state_dict(), tmp_path / "pytorch_model.bin")
  _, params, _, _ = hf.load_checkpoint(str(tmp_path))
  _assert_same_params(params, hf.load_checkpoint(str(source.path))[1])


def test_old_pytorch_bin_with_mask_buffers_and_tied_head(make_hf_gpt_neo, tmp_path):
  source = make_hf_gpt_neo(**ARCH)
  source.config.save_pretrained(tmp_path)
  state = dict(source.model.state_dict())
  assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
  # Older transformers saved the causal-mask buffers; they carry nothing and are skipped.
  for i in range(source.config.num_layers):
    state[f"transformer.h.{i}.attn.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
  torch.save(state, tmp_path / "pytorch_model.bin")
  _, params, _, _ = hf.load_checkpoint(str(tmp_path))
  _assert_same_params(params, hf.load_checkpoint(str(source.path))[1])


def test_flax_to_hf_inverts_hf_to_flax(make_hf_gpt_neo):
  source = make_hf_gpt_neo(**ARCH, classifier=True)
  tensors = hf.read_weights(source.path)
  config = hf.read_config(source.path)
  back = hf.flax_to_hf(hf.hf_to_flax(tensors, config), config)
  assert back.keys() == tensors.keys()
  for name in tensors:
    np.testing.assert_array_equal(back[name], tensors[name])
  # A bare GPTNeoModel state dict (no `transformer.` prefix) maps to the same tree.
  bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  _assert_same_params(hf.hf_to_flax(bare, config), hf.hf_to_flax(tensors, config))


# ---- Bad input: each mistake raises UserError naming the file/id and what is wrong. ----


def _copy(source: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  dest.mkdir()
  for f in source.iterdir():
    (dest / f.name).write_bytes(f.read_bytes())
  return dest


def test_directory_without_config_json(make_hf_gpt_neo, tmp_path):
  broken = _copy(make_hf_gpt_neo(**ARCH).path, tmp_path / "noconfig")
  (broken / "config.json").unlink()
  with pytest.raises(UserError, match=rf"{broken}.*no config\.json"):
    hf.load_checkpoint(str(broken))


def test_config_of_another_model_type(tmp_path):
  transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
  with pytest.raises(UserError, match=rf"{tmp_path / 'config.json'}.*model_type is 'gpt2'"):
    hf.load_checkpoint(str(tmp_path))


def test_invalid_config_json(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "gpt_neo", ')
  with pytest.raises(UserError, match=rf"{tmp_path / 'config.json'}.*not valid JSON"):
    hf.read_config(tmp_path)


def test_truncated_safetensors(make_hf_gpt_neo, tmp_path):
  broken = _copy(make_hf_gpt_neo(**ARCH).path, tmp_path / "truncated")
  weights = broken / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  with pytest.raises(UserError, match=rf"{weights}.*cannot read safetensors"):
    hf.load_checkpoint(str(broken))


def test_missing_tensor(make_hf_gpt_neo, tmp_path):
  broken = _copy(make_hf_gpt_neo(**ARCH).path, tmp_path / "missing")
  weights = broken / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(weights))
  del tensors["transformer.h.1.mlp.c_fc.bias"]
  safetensors.numpy.save_file(tensors, str(weights), metadata={"format": "pt"})
  with pytest.raises(UserError, match=rf"{broken}.*'transformer\.h\.1\.mlp\.c_fc\.bias' is missing"):
    hf.load_checkpoint(str(broken))


def test_tensors_the_config_does_not_account_for(make_hf_gpt_neo, tmp_path):
  broken = _copy(make_hf_gpt_neo(**ARCH).path, tmp_path / "extra")
  config = json.loads((broken / "config.json").read_text())
  config.update(num_layers=2, attention_layers=["global", "local"])  # The weights have 3 layers.
  (broken / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=rf"{broken}: 13 tensor\(s\) that config\.json does not "
                     r"account for, e\.g\. transformer\.h\.2\."):
    hf.load_checkpoint(str(broken))


def test_untied_lm_head_is_refused(make_hf_gpt_neo, tmp_path):
  broken = _copy(make_hf_gpt_neo(**ARCH).path, tmp_path / "untied")
  weights = broken / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(weights))
  tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
  safetensors.numpy.save_file(tensors, str(weights), metadata={"format": "pt"})
  with pytest.raises(UserError, match=rf"{broken}: lm_head\.weight differs from transformer\.wte"):
    hf.load_checkpoint(str(broken))


def test_tensor_shape_disagreeing_with_config(make_hf_gpt_neo, tmp_path):
  broken = _copy(make_hf_gpt_neo(**ARCH).path, tmp_path / "shape")
  config = json.loads((broken / "config.json").read_text())
  config["intermediate_size"] = 64  # The weights have 4 * 32 = 128.
  (broken / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=rf"{broken}.*c_fc.*shape.*config\.json implies"):
    hf.load_checkpoint(str(broken))


def test_shard_index_naming_a_missing_shard(make_hf_gpt_neo, tmp_path):
  make_hf_gpt_neo(**ARCH).model.save_pretrained(tmp_path, max_shard_size="40KB")
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(UserError, match=rf"index\.json.*{shard.name}.*does not exist"):
    hf.load_checkpoint(str(tmp_path))


def test_hub_id_when_offline(monkeypatch, tmp_path):
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
  with pytest.raises(UserError, match=r"^rlhf-jax-tests/no-such-model: cannot download"):
    hf.load_checkpoint("rlhf-jax-tests/no-such-model")
  with pytest.raises(UserError, match=r"no/such/dir: no such checkpoint directory"):
    hf.load_checkpoint("no/such/dir")


def test_directory_without_weights(make_hf_gpt_neo, tmp_path):
  make_hf_gpt_neo(**ARCH).config.save_pretrained(tmp_path)
  with pytest.raises(UserError, match=rf"{tmp_path}: no weights found"):
    hf.load_checkpoint(str(tmp_path))


# ---- Tokenizers ----


def test_tokenizer_pad_defaults_to_eos_and_survives_export(tiny_tokenizer_dir, make_hf_gpt_neo,
                                                            tmp_path):
  tokenizer = hf.load_tokenizer(tiny_tokenizer_dir)
  assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
  text = "Hello world!\n### Response:\n"
  assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
  source = make_hf_gpt_neo(**ARCH)
  config, params, _, _ = hf.load_checkpoint(str(source.path))
  hf.save_checkpoint(params, config, tmp_path, tokenizer_dir=tiny_tokenizer_dir,
                     extra_files={"NOTE.md": "hi"})
  assert hf.has_tokenizer(tmp_path) and (tmp_path / "NOTE.md").read_text() == "hi"
  again = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_exported_chat_template_renders_the_training_prompt(tiny_tokenizer_dir, make_hf_gpt_neo,
                                                           tmp_path):
  source = make_hf_gpt_neo(**ARCH)
  config, params, _, _ = hf.load_checkpoint(str(source.path))
  hf.save_checkpoint(params, config, tmp_path, tokenizer_dir=tiny_tokenizer_dir,
                     chat_template=batching.CHAT_TEMPLATE)
  assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text()) or (
      tmp_path / "chat_template.jinja").is_file()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  cases = [  # (instruction, context): none, given, blank (= none), and whitespace to strip.
      ("What is 7 plus 5?", None),
      ("Summarise the text.", "Paris is the capital of France.\nIt lies on the Seine."),
      ("Name a colour.", "  \n "),
      ("  Who wrote it?\n", "\n  The book was written in 1851.  "),
  ]
  for instruction, context in cases:
    message = {"role": "user", "content": instruction}
    if context is not None:
      message["context"] = context
    expected = batching.format_prompt(instruction, context or "")
    prompt = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    assert prompt == expected, (instruction, context)
    # And the ids the model was trained on (prompts are tokenised without special tokens).
    ids = tokenizer.apply_chat_template([message], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert list(ids) == tokenizer(expected, add_special_tokens=False)["input_ids"]
  assert "### Context:" in batching.format_prompt(*cases[1])  # The with-context form is tested.
  # With the assistant's answer: the training sequence, prompt + response + EOS.
  answer = [{"role": "user", "content": "What is 7 plus 5?"}, {"role": "assistant", "content": "12"}]
  assert tokenizer.apply_chat_template(answer, tokenize=False) == (
      batching.format_prompt("What is 7 plus 5?") + "12" + tokenizer.eos_token)
  # Conversations the model was not trained on are refused, not rendered some other way.
  for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                   answer + [{"role": "user", "content": "And 8 plus 5?"}]):
    with pytest.raises(Exception, match="one user message"):
      tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_load_tokenizer_from_a_directory_without_one(tmp_path):
  with pytest.raises(UserError, match=rf"{tmp_path}: cannot load a tokenizer"):
    hf.load_tokenizer(tmp_path)


def test_gpt2_tokenizer_from_shared_data(shared_data):
  tokenizer = hf.load_tokenizer(shared_data / "gpt2_tokenizer")
  assert tokenizer("Hello world")["input_ids"] == [15496, 995]
  assert tokenizer.eos_token_id == tokenizer.pad_token_id == 50256
