"""Hugging Face interop: load a checkpoint directory into a `Decoder`, save one back.

Names and layouts are mapped by one explicit table (`NAME_TABLE`): a Hugging Face tensor
name template, the opdjax parameter path template, and whether the matrix is transposed
(PyTorch `Linear.weight` is `[out, in]`, Flax `kernel` is `[in, out]`). Every tensor is
checked against the architecture's expected names and shapes before anything is built.

With a `mesh`, every device reads only its own slice of each tensor from the
memory-mapped safetensors file (`jax.make_array_from_callback`), so no process ever holds
a full host copy of a large model.

A directory may be a URI that `etils.epath` opens (`gs://bucket/Qwen3-8B`). Loading copies
its files to a local cache first (`local_directory`: safetensors are memory-mapped, which
needs a local file), and saving writes locally, then copies the files up.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from opdjax import checkpoint
from opdjax import sharding as sharding_lib
from opdjax.distributed import to_host
from opdjax.errors import ConfigError
from opdjax.models.config import ModelConfig
from opdjax.models.decoder import Decoder, unstack_layers

# (Hugging Face name, opdjax path, transposed). {i} is a layer index, {p} a projection name.
NAME_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed/embedding", False),
    ("model.norm.weight", "final_norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
    ("model.layers.{i}.input_layernorm.weight", "layers/{i}/input_norm/scale", False),
    (
        "model.layers.{i}.post_attention_layernorm.weight",
        "layers/{i}/post_attention_norm/scale",
        False,
    ),
    ("model.layers.{i}.self_attn.{p}_proj.weight", "layers/{i}/attn/{p}_proj/kernel", True),
    ("model.layers.{i}.self_attn.{p}_proj.bias", "layers/{i}/attn/{p}_proj/bias", False),
    ("model.layers.{i}.self_attn.{p}_norm.weight", "layers/{i}/attn/{p}_norm/scale", False),
    ("model.layers.{i}.mlp.{p}_proj.weight", "layers/{i}/mlp/{p}_proj/kernel", True),
    ("model.layers.{i}.mlp.{p}_proj.bias", "layers/{i}/mlp/{p}_proj/bias", False),
)
# Buffers some checkpoints carry that are derived, not learned.
IGNORED_HF_NAMES = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _template_regex(template: str) -> re.Pattern:
  pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z]+)")
  return re.compile(f"^{pattern}$")


_OPDJAX_TO_HF = [(_template_regex(path), name, t) for name, path, t in NAME_TABLE]


def hf_name(path: str) -> tuple[str, bool]:
  """The Hugging Face tensor name of an opdjax parameter path, and whether it is transposed."""
  for regex, name, transposed in _OPDJAX_TO_HF:
    match = regex.match(path)
    if match:
      return name.format(**match.groupdict()), transposed
  raise KeyError(f"no Hugging Face name for opdjax parameter {path!r}; extend NAME_TABLE")


# ---------------------------------------------------------------- loading


def _weight_files(directory: Path) -> list[Path]:
  index = directory / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted({directory / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
      raise FileNotFoundError(f"{index} lists weight files that do not exist: {missing}")
    return files
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.pt")
    )
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise FileNotFoundError(f"no *.safetensors weights in {directory}{hint}")
  return files


def local_directory(path: str | os.PathLike, *, weights: bool = True) -> Path:
  """A local directory holding the files of the checkpoint directory `path`.

  A local `path` is returned as it is. For a URI, its top-level files are copied (through
  `etils.epath`) to `$OPDJAX_HF_CACHE/<hash of the URI>` (default `~/.cache/opdjax/hf`);
  a file already there with the same size is not copied again. With `weights=False`, the
  `*.safetensors` files are left out (a tokenizer needs only its own files). In a multi-host
  run each process copies to its own disk.
  """
  if not checkpoint.is_remote(path):
    return Path(path)
  source = epath.Path(path)
  if not source.is_dir():
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  cache = Path(os.environ.get("OPDJAX_HF_CACHE", Path.home() / ".cache" / "opdjax" / "hf"))
  target = cache / hashlib.sha256(str(path).encode()).hexdigest()[:16]
  target.mkdir(parents=True, exist_ok=True)
  (target / "SOURCE").write_text(str(path) + "\n")
  for file in sorted(source.iterdir()):
    if file.is_dir() or (not weights and file.name.endswith(".safetensors")):
      continue
    local = target / file.name
    if local.exists() and local.stat().st_size == file.stat().length:
      continue
    partial = target / (file.name + ".partial")  # a killed copy never looks complete
    file.copy(epath.Path(partial), overwrite=True)
    partial.replace(local)
  return target


def read_config(path: str | os.PathLike) -> ModelConfig:
  """`ModelConfig` of a Hugging Face checkpoint directory (local or a URI)."""
  config_file = epath.Path(path) / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"no config.json in {path}")
  try:
    hf = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{config_file} is not valid JSON: {e}") from None
  return ModelConfig.from_hf(hf, source=str(config_file))


def abstract_model(
    config: ModelConfig,
    dtype,
    *,
    param_dtype=None,
    attention: str = "auto",
    scan_layers: bool = False,
    remat: str = "auto",
    mesh: Mesh | None = None,
) -> Decoder:
  """The model's structure with `ShapeDtypeStruct` leaves (allocates no parameters). Each
  call returns a new module; the trace that builds it runs once per distinct arguments (a
  run asks for each model's structure several times, and tracing a `Decoder` costs ~0.15 s)."""
  return nnx.merge(
      *_abstract_split(config, dtype, param_dtype, attention, scan_layers, remat, mesh),
      copy=True,
  )


@functools.lru_cache(maxsize=32)
def _abstract_split(config, dtype, param_dtype, attention, scan_layers, remat, mesh):
  return nnx.split(
      nnx.eval_shape(
          lambda: Decoder(
              config,
              dtype=dtype,
              param_dtype=param_dtype,
              rngs=nnx.Rngs(0),
              attention=attention,
              scan_layers=scan_layers,
              remat=remat,
              mesh=mesh,
          )
      )
  )


def parameter_count(config: ModelConfig) -> int:
  """How many parameters a `Decoder` of `config` has (from shapes; nothing allocated)."""
  state = nnx.state(abstract_model(config, jnp.float32), nnx.Param)
  return int(sum(x.size for x in jax.tree.leaves(state)))


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: Sequence = sharding_lib.DEFAULT_RULES,
    with_tokenizer: bool = True,
    attention: str = "auto",
    scan_layers: bool = False,
    remat: str = "auto",
):
  """Loads a Hugging Face directory (`config.json` + `*.safetensors`, sharded or not).

  Args:
    path: directory holding `config.json`, `model.safetensors` or
      `model.safetensors.index.json` + shards, and optionally tokenizer files; local, or a
      URI (copied to a local cache first, see `local_directory`).
    dtype: compute (activation) dtype, e.g. `jnp.float32` or `jnp.bfloat16`.
    param_dtype: parameter dtype (default `dtype`); tensors are cast to it on load.
    mesh: if given, parameters are placed with `opdjax.sharding` `rules` on it and each
      device reads only its slice.
    rules: partition rules for `mesh`.
    with_tokenizer: also load the tokenizer (`transformers.AutoTokenizer`) if present.
    attention: the attention kernel (`opdjax.models.attention.attend`; "splash" runs on `mesh`).
    scan_layers, remat: the layer layout and rematerialisation (`Decoder`); the files'
      per-layer tensors are stacked when `scan_layers`.

  Returns:
    `(model, tokenizer)`; tokenizer is None when the directory has no tokenizer files.
  """
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  directory = local_directory(path)
  config = read_config(directory)
  param_dtype = param_dtype or dtype
  graphdef, target = nnx.split(
      abstract_model(
          config,
          dtype,
          param_dtype=param_dtype,
          attention=attention,
          scan_layers=scan_layers,
          remat=remat,
          mesh=mesh,
      )
  )
  # The files hold per-layer tensors (`layers/{i}/...`); a scanned model reads each layer's
  # tensor straight into its slot of the stacked parameter.
  per_layer = jax.eval_shape(unstack_layers, target) if scan_layers else target
  expected = {}  # hf name -> (opdjax per-layer path tuple, shape, transposed)
  for path_tuple, variable in nnx.to_flat_state(per_layer):
    name, transposed = hf_name(sharding_lib.path_string(path_tuple))
    expected[name] = (path_tuple, variable.get_value().shape, transposed)

  handles = {}
  key_file = {}
  try:
    for file in _weight_files(directory):
      try:
        handle = safe_open(str(file), framework="flax")
      except SafetensorError as e:
        raise ConfigError(
            f"{file} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
      handles[file] = handle
      for key in handle.keys():
        key_file[key] = file
    unexpected = sorted(
        k
        for k in key_file
        if k not in expected
        and not IGNORED_HF_NAMES.search(k)
        and not (k == "lm_head.weight" and config.tie_word_embeddings)
    )
    missing = sorted(k for k in expected if k not in key_file)
    if missing or unexpected:
      raise ConfigError(
          f"checkpoint {directory} does not match its config.json ({config.model_type}, "
          f"{config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}): "
          f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected keys "
          f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
      )

    tensors = {}  # per-layer path tuple -> (safetensors slice, transposed)
    for name, (path_tuple, shape, transposed) in expected.items():
      file = key_file[name]
      tensor = handles[file].get_slice(name)
      stored = tuple(tensor.get_shape())
      want = tuple(reversed(shape)) if transposed else tuple(shape)
      if stored != want:
        raise ConfigError(
            f"{file}: tensor {name!r} has shape {stored}, but config.json implies " f"{want}"
        )
      tensors[path_tuple] = (tensor, transposed)

    leaves = []
    for path_tuple, variable in nnx.to_flat_state(target):
      shape = variable.get_value().shape
      stacked = scan_layers and path_tuple[0] == "layers"
      parts = (
          [tensors[("layers", i) + path_tuple[1:]] for i in range(config.num_layers)]
          if stacked
          else [tensors[path_tuple]]
      )
      where = (
          None
          if mesh is None
          else sharding_lib.sharding_for(sharding_lib.path_string(path_tuple), shape, mesh, rules)
      )
      leaves.append(
          (path_tuple, variable.replace(_read(parts, shape, param_dtype, where, stacked=stacked)))
      )
  finally:
    handles.clear()

  model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
  tokenizer = load_tokenizer(directory, config) if with_tokenizer else None
  return model, tokenizer


def _read(parts, shape, dtype, sharding, *, stacked: bool):
  """A parameter of `shape` from its `(safetensors slice, transposed)` parts: the one part,
  or with `stacked` one per layer along a leading axis. With a `sharding`, each device
  reads only its own slice of each file (and of each layer), never the whole tensor."""

  def read_one(part, index):
    tensor, transposed = part
    index = tuple(reversed(index)) if transposed else index
    array = tensor[index]
    return (array.T if transposed else array).astype(dtype)

  def read(index):
    if not stacked:
      return read_one(parts[0], index)
    return np.stack([read_one(parts[i], index[1:]) for i in range(len(parts))[index[0]]])

  if sharding is None:
    return jnp.asarray(read(tuple(slice(None) for _ in shape)))
  return jax.make_array_from_callback(tuple(shape), sharding, read)


def load_tokenizer(path: str | os.PathLike, config: ModelConfig | None = None):
  """`transformers.AutoTokenizer` of a directory (None if it has no tokenizer files).

  Raises ValueError if the tokenizer has more tokens than the model's vocabulary.
  """
  if not any((epath.Path(path) / f).exists() for f in TOKENIZER_FILES):
    return None
  directory = local_directory(path, weights=False)
  from transformers import AutoTokenizer  # heavy import, only when needed

  tokenizer = AutoTokenizer.from_pretrained(str(directory))
  if config is not None and len(tokenizer) > config.vocab_size:
    raise ConfigError(
        f"tokenizer in {directory} has {len(tokenizer)} tokens but config.json has "
        f"vocab_size={config.vocab_size}: the tokenizer does not belong to this model"
    )
  return tokenizer


# ---------------------------------------------------------------- saving


def save_pretrained(
    model: Decoder, path: str | os.PathLike, *, tokenizer=None, max_shard_bytes: int = 5 * 2**30
) -> Path:
  """Writes `model` as a Hugging Face directory that `transformers` loads directly.

  Produces `config.json` and `model.safetensors` (or `model-0000k-of-0000n.safetensors`
  plus `model.safetensors.index.json` above `max_shard_bytes`), and the tokenizer if
  given. In a multi-host run every process must call this; only process 0 writes. A URI
  `path` (`gs://…`) is written locally first, then copied up file by file.

  Returns:
    The directory (an `etils.epath.Path` for a URI).
  """
  if checkpoint.is_remote(path):
    with tempfile.TemporaryDirectory() as staging:
      save_pretrained(model, staging, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
      remote = epath.Path(path)
      if jax.process_index() == 0:
        remote.mkdir(parents=True, exist_ok=True)
        for stale in list(remote.glob("model*.safetensors")) + list(
            remote.glob("model.safetensors.index.json")
        ):
          stale.unlink()
        for file in sorted(Path(staging).iterdir()):
          epath.Path(file).copy(remote / file.name, overwrite=True)
      return remote
  directory = Path(path)
  tensors: dict[str, Any] = {}
  dtype = None
  params = nnx.state(model, nnx.Param)
  if model.scan_layers:
    params = unstack_layers(params)
  for path_tuple, variable in nnx.to_flat_state(params):
    name, transposed = hf_name(sharding_lib.path_string(path_tuple))
    array = to_host(variable.get_value())  # host numpy, gathered across hosts if needed
    dtype = array.dtype
    tensors[name] = np.ascontiguousarray(array.T if transposed else array)
  if jax.process_index() != 0:
    return directory
  directory.mkdir(parents=True, exist_ok=True)

  shards: list[dict[str, Any]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].size * tensors[name].dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  for stale in list(directory.glob("model*.safetensors")) + list(
      directory.glob("model.safetensors.index.json")
  ):
    stale.unlink()
  if len(shards) == 1:
    save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
      filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(directory / filename), metadata={"format": "pt"})
      weight_map.update({name: filename for name in shard})
    total = sum(t.size * t.dtype.itemsize for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, indent=2)
    )
  hf_config = model.config.to_hf(dtype=jnp.dtype(dtype).name)
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))
  return directory
