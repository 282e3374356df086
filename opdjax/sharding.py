"""Meshes and partition rules: which parameter lives where.

Rules are data: an ordered list of `(regex on the parameter path, PartitionSpec)`; the first match
wins. A path is the parameter's NNX path joined with '/', e.g. `layers/3/attn/q_proj/kernel`; with
scanned layers (`layers/attn/q_proj/kernel`, a leading layer axis) the rule's spec applies to the
dimensions after the layer axis. Mesh axis names a rule uses but the mesh lacks, and dimensions a
mesh axis does not divide, are replicated, so one rule set serves one CPU, simulated devices, a GPU
and a TPU pod slice.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# FSDP over the "fsdp" axis, tensor parallelism over "tensor" (Megatron layout: column-
# parallel q/k/v/gate/up, row-parallel o/down, vocabulary-parallel embeddings and head).
# Plain data, so that it is config (`config.sharding.rules`) and CLI-overridable.
RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed/embedding$", ("tensor", "fsdp")),
    (r"lm_head/kernel$", ("fsdp", "tensor")),
    (r"attn/(q|k|v)_proj/kernel$", ("fsdp", "tensor")),
    (r"attn/(q|k|v)_proj/bias$", ("tensor",)),
    (r"attn/o_proj/kernel$", ("tensor", "fsdp")),
    (r"mlp/(gate|up)_proj/kernel$", ("fsdp", "tensor")),
    (r"mlp/(gate|up)_proj/bias$", ("tensor",)),
    (r"mlp/down_proj/kernel$", ("tensor", "fsdp")),
    (r".*", ()),
)
MESH_AXES = ("data", "fsdp", "tensor")
# The student's layout while it samples (`sampling.layout`): "train" keeps the training
# layout; "tensor" drops FSDP (weights whole on each fsdp shard, still split over
# "tensor"), so a decode step does not all-gather every weight for every token;
# "replicated" keeps a whole copy on each device.
SAMPLING_LAYOUTS = ("train", "tensor", "replicated")


def partition_rules(rules) -> tuple[tuple[str, P], ...]:
  """Config rules `[(regex, (axis | None | (axes...), ...)), ...]` as `(regex, PartitionSpec)`;
  a bad regex or an unknown axis name is an error that names it."""
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"a partition rule is (regex, spec), got {item!r}")
    pattern, spec = item
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"partition rule {pattern!r} is not a valid regex: {e}") from None
    spec = (spec,) if isinstance(spec, str) or spec is None else tuple(spec)
    for axis in spec:
      names = (axis,) if isinstance(axis, str) else tuple(axis or ())
      unknown = [a for a in names if a not in MESH_AXES]
      if unknown:
        raise ValueError(
            f"partition rule {pattern!r}: unknown mesh axes {unknown}; valid: " f"{MESH_AXES}"
        )
    out.append((pattern, P(*spec)))
  return tuple(out)


def sampling_rules(rules, layout: str) -> tuple[tuple[str, P], ...]:
  """The partition rules of a `sampling.layout`, derived from the training `rules`."""
  if layout not in SAMPLING_LAYOUTS:
    raise ValueError(f"sampling.layout must be one of {SAMPLING_LAYOUTS}, got {layout!r}")
  if layout == "train":
    return tuple(rules)
  if layout == "replicated":
    return ((r".*", P()),)
  drop = lambda axis: (
      None
      if axis == "fsdp"
      else tuple(a for a in axis if a != "fsdp") or None
      if isinstance(axis, tuple)
      else axis
  )
  return tuple((pattern, P(*(drop(a) for a in spec))) for pattern, spec in rules)


DEFAULT_RULES = partition_rules(RULES)


def make_mesh(
    shape: Sequence[int] = (-1,), axis_names: Sequence[str] = ("data",), devices=None
) -> Mesh:
  """A device mesh; one `-1` in `shape` takes the remaining devices.

  Without a `-1`, the mesh uses the first `prod(shape)` devices (so `(1,)` is one device).
  """
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if -1 not in shape and 0 < int(np.prod(shape)) <= len(devices):
    devices = devices[: int(np.prod(shape))]
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} and axis names {list(axis_names)} differ in length")
  known = int(np.prod([s for s in shape if s != -1]))
  if shape.count(-1) > 1 or len(devices) % known:
    raise ValueError(f"mesh shape {shape} does not fit {len(devices)} devices")
  shape = [len(devices) // known if s == -1 else s for s in shape]
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
  # Auto axes: XLA propagates shardings from the annotated parameters and batches.
  return jax.make_mesh(
      tuple(shape), tuple(axis_names), devices=devices, axis_types=(AxisType.Auto,) * len(shape)
  )


def path_string(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def spec_for(
    path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES
) -> P:
  """The PartitionSpec of the first rule matching `path`, fitted to `shape` and `mesh`."""
  spec = next((spec for pattern, spec in rules if re.search(pattern, path)), None)
  if spec is None:
    return P()
  if re.match(r"layers/(?!\d)", path):  # stacked (scanned) layers: the layer axis is whole
    spec = P(None, *spec)
  fitted = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    fitted.append(None if not axes or dim % size else (axes[0] if len(axes) == 1 else axes))
  return P(*fitted)


def sharding_for(
    path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES
) -> NamedSharding:
  return NamedSharding(mesh, spec_for(path, shape, mesh, rules))


def state_shardings(state, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES):
  """The `NamedSharding` of every leaf of an NNX state (concrete or abstract), by `rules`."""
  from flax import nnx

  return nnx.from_flat_state(
      [
          (path, v.replace(sharding_for(path_string(path), v.get_value().shape, mesh, rules)))
          for path, v in nnx.to_flat_state(state)
      ]
  )


def place_state(state, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES):
  """Puts an NNX state on `mesh` by the partition `rules`."""
  return jax.device_put(state, state_shardings(state, mesh, rules))


def abstract_state(state, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES):
  """`ShapeDtypeStruct`s of an (abstract) NNX state with their shardings on `mesh`: a
  restore target that allocates nothing."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state,
      state_shardings(state, mesh, rules),
  )


DATA_AXES = ("data", "fsdp")  # the mesh axes that split batch rows


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dimension split over every data-parallel axis the mesh has (`DATA_AXES`)."""
  axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes if axes else None))


def row_splits(mesh: Mesh) -> int:
  """Into how many blocks `batch_sharding(mesh)` splits the rows."""
  return int(np.prod([mesh.shape[a] for a in DATA_AXES if a in mesh.shape]))


def optimizer_shardings(tx, params, mesh: Mesh):
  """The shardings of `tx.init(params)`: each parameter-shaped leaf (Adam's mu and nu) takes
  its parameter's sharding, anything else (step counts) is replicated. (`jax.jit(tx.init)`
  alone would put the whole state on one device: zeros do not inherit a sharding.)"""
  import optax

  replicated = NamedSharding(mesh, P())
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  return optax.tree_map_params(
      tx,
      lambda _, s: s,
      jax.eval_shape(tx.init, params),
      param_shardings,
      transform_non_params=lambda _: replicated,
  )


def init_optimizer(tx, params, mesh: Mesh):
  """`tx.init(params)` laid out by `optimizer_shardings`."""
  return jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params)
