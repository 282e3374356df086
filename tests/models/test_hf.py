"""Hugging Face interop: logit parity with `transformers`, round trips, sharded loading and
clear errors for broken checkpoints. Needs the `parity` extra (PyTorch CPU); never skipped."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.torch import load_file, save_file

from opdjax import sharding
from opdjax.models import Decoder, load_pretrained, load_tokenizer, save_pretrained, tiny_config
from opdjax.models.hf import abstract_model
from tests.models.hf_fixtures import build_hf_model, hf_logits, padded_batch, save_tiny_tokenizer

KINDS = ("qwen3", "llama", "qwen2")


@pytest.fixture(scope="module", name="checkpoints")
def fixture_checkpoints(tmp_path_factory):
  out = {}
  for kind in KINDS:
    model = build_hf_model(kind)
    directory = tmp_path_factory.mktemp(kind)
    model.save_pretrained(directory)
    out[kind] = (model, directory)
  return out


def params_of(model):
  return {
      path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@pytest.mark.parametrize("kind", KINDS)
def test_logit_parity_on_padded_batch(kind, checkpoints):
  hf_model, directory = checkpoints[kind]
  model, tokenizer = load_pretrained(directory)
  assert tokenizer is None
  tokens, mask = padded_batch()
  ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  assert ours.dtype == np.float32
  diff = np.abs(ours - hf_logits(hf_model, tokens, mask))[mask].max()
  print(f"{kind}: max |logit difference| = {diff:.2e}")
  assert diff <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_transformers(kind, checkpoints, tmp_path):
  _, directory = checkpoints[kind]
  model, _ = load_pretrained(directory)
  save_pretrained(model, tmp_path / "export")
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "export", output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  assert type(reloaded).__name__.lower().startswith(kind)
  tokens, mask = padded_batch(1)
  ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  np.testing.assert_allclose(hf_logits(reloaded.eval(), tokens, mask)[mask], ours[mask], atol=1e-5)
  # load -> save -> load gives identical arrays.
  again, _ = load_pretrained(tmp_path / "export")
  before, after = params_of(model), params_of(again)
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))


def test_opdjax_initialised_model_exports_and_sharded_files(tmp_path):
  config = tiny_config("llama", vocab_size=40, tie_word_embeddings=False, eos_token_ids=(1,))
  model = Decoder(config, rngs=nnx.Rngs(3))
  save_pretrained(model, tmp_path, max_shard_bytes=40_000)  # forces several shards + index
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  tokens, mask = padded_batch(2)
  ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  np.testing.assert_allclose(hf_logits(reloaded.eval(), tokens, mask)[mask], ours[mask], atol=1e-5)
  loaded, _ = load_pretrained(tmp_path)
  for path, value in params_of(model).items():
    np.testing.assert_array_equal(value, params_of(loaded)[path])


def test_bfloat16_parameters_keep_float32_logits(checkpoints):
  _, directory = checkpoints["qwen3"]
  model32, _ = load_pretrained(directory)
  model16, _ = load_pretrained(directory, dtype=jnp.bfloat16)
  assert model16.embed.embedding.get_value().dtype == jnp.bfloat16
  tokens, mask = padded_batch()
  logits16 = model16(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert logits16.dtype == jnp.float32
  logits32 = model32(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert float(jnp.max(jnp.abs(logits16 - logits32)[jnp.asarray(mask)])) < 0.1


def test_load_into_mesh_reads_slices(checkpoints):
  _, directory = checkpoints["llama"]
  mesh = sharding.make_mesh((2, 4), ("fsdp", "tensor"))
  model, _ = load_pretrained(directory, mesh=mesh)
  q_kernel = model.layers[0].attn.q_proj.kernel.get_value()
  assert q_kernel.sharding.spec == P("fsdp", "tensor")
  assert q_kernel.addressable_shards[0].data.shape == (32, 16)
  down = model.layers[0].mlp.down_proj.kernel.get_value()
  assert down.sharding.spec == P("tensor", "fsdp")
  embedding = model.embed.embedding.get_value()  # vocabulary 40 splits over tensor=4
  assert embedding.sharding.spec == P("tensor", "fsdp")
  reference, _ = load_pretrained(directory)
  for path, value in params_of(reference).items():
    np.testing.assert_array_equal(value, params_of(model)[path], err_msg=str(path))
  tokens, mask = padded_batch()
  np.testing.assert_allclose(
      model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)),
      reference(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)),
      atol=1e-5,
  )


def test_scanned_layers_load_with_parity_shard_and_save_per_layer(
    checkpoints, tmp_path, monkeypatch
):
  """`scan_layers=True` reads the files' per-layer tensors straight into the stacked
  parameters (sharded with the layer axis whole; one device array per parameter, no
  per-layer copy to stack), keeps transformers parity at 1e-5, and saves back the
  per-layer names."""
  hf_model, directory = checkpoints["qwen3"]
  mesh = sharding.make_mesh((2, 4), ("fsdp", "tensor"))
  made = []
  make = jax.make_array_from_callback
  monkeypatch.setattr(
      jax,
      "make_array_from_callback",
      lambda shape, *a, **k: made.append(shape) or make(shape, *a, **k),
  )
  model, _ = load_pretrained(directory, mesh=mesh, scan_layers=True, remat="full")
  monkeypatch.undo()
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert sorted(made) == sorted(x.shape for x in params)
  q_kernel = model.layers.attn.q_proj.kernel.get_value()
  assert q_kernel.shape[0] == hf_model.config.num_hidden_layers
  assert q_kernel.sharding.spec == P(None, "fsdp", "tensor")
  layers, width, heads = q_kernel.shape
  assert q_kernel.addressable_shards[0].data.shape == (layers, width // 2, heads // 4)
  unsharded, _ = load_pretrained(directory, scan_layers=True)  # no mesh: device arrays too
  got_params = jax.tree.leaves(nnx.state(unsharded, nnx.Param))
  assert len(got_params) == len(params)
  for got, want in zip(got_params, params):
    assert isinstance(got, jax.Array)
    np.testing.assert_array_equal(got, want)
  tokens, mask = padded_batch()
  ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  assert np.abs(ours - hf_logits(hf_model, tokens, mask))[mask].max() <= 1e-5
  save_pretrained(model, tmp_path)
  per_layer, _ = load_pretrained(tmp_path)
  before, after = params_of(load_pretrained(directory)[0]), params_of(per_layer)
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))


def test_tokenizer_with_chat_template(checkpoints, tmp_path):
  hf_model, _ = checkpoints["qwen3"]
  hf_model.save_pretrained(tmp_path)
  save_tiny_tokenizer(tmp_path)
  model, tokenizer = load_pretrained(tmp_path)
  ids = tokenizer.apply_chat_template(
      [{"role": "w5", "content": "w7 w8"}], add_generation_prompt=False, tokenize=True
  )
  ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
  assert list(ids) == [5, 7, 8]
  export = tmp_path / "export"
  save_pretrained(model, export, tokenizer=tokenizer)
  assert load_tokenizer(export).chat_template == tokenizer.chat_template


def test_uri_directories_save_and_load_through_a_local_cache(checkpoints, tmp_path, monkeypatch):
  """gs:// through `etils.epath`'s test double (the bucket is a local folder named "gs:"):
  sharded weights and a tokenizer are written up, then loaded through the cache, which a
  second load reuses and a changed file refreshes."""
  from etils.epath import testing as epath_testing

  from opdjax.models import hf, read_config

  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("OPDJAX_HF_CACHE", str(tmp_path / "cache"))
  hf_model, directory = checkpoints["qwen3"]
  model, _ = load_pretrained(directory)
  tokenizer = save_tiny_tokenizer(tmp_path / "tok")
  copies = []

  def counting_copy(original, path, *args, **kwargs):
    copies.append(str(path))
    return original(path, *args, **kwargs)

  with epath_testing.mock_epath(copy=counting_copy):
    uri = "gs://bucket/models/tiny"
    saved = save_pretrained(model, uri, tokenizer=tokenizer, max_shard_bytes=20_000)
    assert str(saved) == uri
    bucket = tmp_path / "gs:" / "bucket" / "models" / "tiny"
    assert (bucket / "model.safetensors.index.json").exists()  # sharded, written up
    assert read_config(uri) == model.config
    copies.clear()
    loaded, loaded_tokenizer = load_pretrained(uri)
    assert loaded_tokenizer is not None and len(loaded_tokenizer) == len(tokenizer)
    for path, value in params_of(model).items():
      np.testing.assert_array_equal(params_of(loaded)[path], value, err_msg=str(path))
    assert any(c.endswith(".safetensors") for c in copies)
    cached = hf.local_directory(uri)
    assert cached.parent == tmp_path / "cache" and (cached / "config.json").exists()
    copies.clear()
    load_pretrained(uri)
    assert copies == []  # every file is already cached with its size
    (bucket / "config.json").write_text((bucket / "config.json").read_text() + "\n")
    hf.local_directory(uri)
    assert [c.rsplit("/", 1)[-1] for c in copies] == ["config.json"]
    with pytest.raises(FileNotFoundError, match="gs://bucket/missing does not exist"):
      load_pretrained("gs://bucket/missing")


# ---------------------------------------------------------------- broken checkpoints


def test_abstract_models_of_equal_arguments_are_separate_modules():
  """The structure is traced once per distinct arguments, but each call gets its own module
  and variables: loading into one (as `load_pretrained` does) leaves the next call's
  abstract leaves as they were."""
  config = tiny_config("qwen3")
  first, second = (abstract_model(config, jnp.float32) for _ in range(2))
  assert first is not second and first.embed.embedding is not second.embed.embedding
  shape = first.embed.embedding.get_value().shape
  first.embed.embedding.set_value(jnp.zeros(shape))
  assert isinstance(
      abstract_model(config, jnp.float32).embed.embedding.get_value(), jax.ShapeDtypeStruct
  )
  assert isinstance(second.embed.embedding.get_value(), jax.ShapeDtypeStruct)
  bf16 = abstract_model(config, jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert bf16.embed.embedding.get_value().dtype == jnp.bfloat16  # other arguments, another trace


def test_missing_config_or_weights(checkpoints, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_pretrained(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_pretrained(tmp_path)
  _, directory = checkpoints["qwen2"]
  (tmp_path / "config.json").write_text((directory / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights.*pytorch_model.bin"):
    load_pretrained(tmp_path)


def copy_checkpoint(directory, target, edit_config=None, edit_tensors=None):
  target.mkdir(parents=True, exist_ok=True)
  config = json.loads((directory / "config.json").read_text())
  if edit_config:
    edit_config(config)
  (target / "config.json").write_text(json.dumps(config))
  tensors = load_file(directory / "model.safetensors")
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
  return target


def test_unsupported_architecture(checkpoints, tmp_path):
  _, directory = checkpoints["qwen2"]
  bad = copy_checkpoint(directory, tmp_path / "a", lambda c: c.update(model_type="gpt2"))
  with pytest.raises(ValueError, match=r"config.json: unsupported architecture model_type='gpt2'"):
    load_pretrained(bad)
  bad = copy_checkpoint(
      directory,
      tmp_path / "b",
      lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
  )
  with pytest.raises(ValueError, match=r"rope_type='yarn' is not supported"):
    load_pretrained(bad)


def test_shape_mismatch_names_file_key_and_shapes(checkpoints, tmp_path):
  _, directory = checkpoints["qwen2"]
  bad = copy_checkpoint(directory, tmp_path, lambda c: c.update(intermediate_size=128))
  with pytest.raises(
      ValueError,
      match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' "
      r"has shape \(\d+, \d+\), but config.json implies \(\d+, \d+\)",
  ):
    load_pretrained(bad)


def test_missing_and_unexpected_keys(checkpoints, tmp_path):
  _, directory = checkpoints["llama"]
  bad = copy_checkpoint(
      directory, tmp_path / "a", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")
  )
  with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
    load_pretrained(bad)
  bad = copy_checkpoint(
      directory,
      tmp_path / "b",
      edit_tensors=lambda t: t.update({"model.extra.weight": torch.zeros(2)}),
  )
  with pytest.raises(ValueError, match=r"unexpected keys \['model.extra.weight'\]"):
    load_pretrained(bad)


def test_truncated_safetensors_does_not_load(checkpoints, tmp_path):
  _, directory = checkpoints["qwen3"]
  bad = copy_checkpoint(directory, tmp_path)
  data = (bad / "model.safetensors").read_bytes()
  (bad / "model.safetensors").write_bytes(data[:-1000])
  with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
    load_pretrained(bad)


def test_tokenizer_larger_than_vocabulary(checkpoints, tmp_path):
  _, directory = checkpoints["qwen3"]
  bad = copy_checkpoint(directory, tmp_path)
  save_tiny_tokenizer(bad, num_tokens=60)
  with pytest.raises(
      ValueError, match=r"tokenizer in .* has 60 tokens but config.json has vocab_size=40"
  ):
    load_pretrained(bad)
