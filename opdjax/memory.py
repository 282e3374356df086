"""The per-device memory plan of a run: what each part of a step holds on one device.

Terms are computed from shapes, dtypes and shardings alone (nothing is allocated), plus the
compiled train step's temporaries from XLA (`compile().memory_analysis()`). A run checks
the terms from shapes before it allocates anything, and the whole plan (printed) once its
train step has compiled, in the background, before the first update; `--dry_run` prints
it at once. It stops when the total exceeds `train.memory_limit_gb` (or, when that is 0,
the limit the device itself reports; CPUs report none).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from opdjax.errors import ConfigError

GB = 1e9


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of arrays or sharded `ShapeDtypeStruct`s (the
  largest shard, so uneven layouts count their fullest device)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def device_limit_bytes() -> int | None:
  """The memory limit the first device reports (GPU/TPU), or None (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory statistics
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def format_plan(terms: dict[str, int], limit: int | None) -> str:
  width = max(len(name) for name in terms) + 2
  lines = ["memory plan (per device):"]
  lines += [f"  {name:<{width}}{size / GB:10.3f} GB" for name, size in terms.items()]
  total = sum(terms.values())
  lines.append(
      f"  {'total':<{width}}{total / GB:10.3f} GB"
      + (f"  (limit {limit / GB:.3f} GB)" if limit else "  (no device limit known)")
  )
  return "\n".join(lines)


def check(terms: dict[str, int], limit: int | None) -> None:
  """Raises a one-line `ConfigError` naming the biggest term if the plan exceeds `limit`."""
  total = sum(terms.values())
  if limit and total > limit:
    name = max(terms, key=terms.get)
    raise ConfigError(
        f"the run needs {total / GB:.2f} GB per device, above the {limit / GB:.2f} GB limit "
        f"(train.memory_limit_gb, 0 = the device's own); the biggest term is {name} "
        f"({terms[name] / GB:.2f} GB): shard it over more devices (mesh), lower "
        "train.batch_size or raise train.microbatches, or use bfloat16 / remat"
    )
