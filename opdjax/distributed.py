"""Several processes (TPU pod hosts, GPU nodes): start-up, who writes, host <-> global arrays.

A multi-host run is one program on every process. Each process holds some devices of one
global mesh; a global array lives in pieces on all of them. The rules this module keeps:

* `initialize` joins the processes (`jax.distributed.initialize`) before anything touches
  a device. On one process it does nothing.
* Only `is_main()` writes files meant once per run (metrics, TensorBoard, plots, configs,
  the progress bar). Orbax coordinates checkpoint writes itself.
* The host never reads a global array whole with `np.asarray`: it reads its own rows
  (`local_rows`), or everyone's (`to_host`, a `process_allgather`).
* Each process feeds only its rows (`global_batch`); JAX assembles the global array.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from opdjax.errors import ConfigError

ENV = {
    "coordinator_address": "OPDJAX_COORDINATOR_ADDRESS",
    "num_processes": "OPDJAX_NUM_PROCESSES",
    "process_id": "OPDJAX_PROCESS_ID",
}


def _cluster_detected() -> bool:
  """A launcher JAX can read its process layout from: a multi-host TPU VM slice, or a SLURM
  job step with several tasks."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Joins the processes of a multi-host run; returns whether it did.

  The three values are those of `jax.distributed.initialize`, from the arguments or else
  from `$OPDJAX_COORDINATOR_ADDRESS`, `$OPDJAX_NUM_PROCESSES`, `$OPDJAX_PROCESS_ID`. With
  none of them, a TPU VM slice or a SLURM job with several tasks initialises from its own
  environment, and anything else (one process) is left alone. On CPU the processes talk
  over gloo, which is how the tests run two processes on one machine.
  """
  given = dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  for name, variable in ENV.items():
    if given[name] is None and os.environ.get(variable):
      given[name] = os.environ[variable]
  if all(v is None for v in given.values()):
    if not _cluster_detected():
      return False
    jax.distributed.initialize()
    return True
  missing = [name for name, v in given.items() if v is None]
  if missing:
    raise ConfigError(
        f"a multi-process run needs --coordinator_address, --num_processes and "
        f"--process_id (or ${ENV['coordinator_address']} ...); missing: "
        f"{', '.join('--' + m for m in missing)}"
    )
  try:
    count, index = int(given["num_processes"]), int(given["process_id"])
  except ValueError:
    raise ConfigError(
        f"--num_processes and --process_id must be integers, got "
        f"{given['num_processes']!r} and {given['process_id']!r}"
    ) from None
  if count < 1 or not 0 <= index < count:
    raise ConfigError(f"--process_id={index} must be in [0, --num_processes={count})")
  if ":" not in str(given["coordinator_address"]):
    raise ConfigError(
        f"--coordinator_address must be HOST:PORT, got " f"{given['coordinator_address']!r}"
    )
  if count == 1:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(given["coordinator_address"], num_processes=count, process_id=index)
  return True


def is_main() -> bool:
  """Whether this process writes the run's once-only files."""
  return jax.process_index() == 0


def global_batch(local, sharding: NamedSharding):
  """The global array whose rows are every process's `local` rows, in process order (a tree of
  host arrays in, a tree of global arrays out). On one process: `device_put`."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
  )


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that `global_batch` took from this process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else None
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, spec))


def to_host(tree):
  """Every row of each global array, on every process (an all-gather: small arrays only)."""

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


def all_rows(local: np.ndarray) -> np.ndarray:
  """Every process's `local` host rows (equal counts), concatenated in process order."""
  if jax.process_count() == 1:
    return np.asarray(local)
  stacked = np.asarray(multihost_utils.process_allgather(np.asarray(local)))
  return stacked.reshape((-1,) + stacked.shape[2:])


def same_on_every_process(value: int | None, what: str) -> int | None:
  """`value` (an int or None) as process 0 has it; a differing one elsewhere is an error."""
  if jax.process_count() == 1:
    return value
  mine = np.int64(-1 if value is None else value)
  first = int(multihost_utils.broadcast_one_to_all(mine))
  if first != int(mine):
    raise RuntimeError(
        f"{what} differs between processes: process 0 has {first}, process "
        f"{jax.process_index()} has {int(mine)} (is the workdir shared?)"
    )
  return None if first == -1 else first


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
