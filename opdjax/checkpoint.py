"""Orbax checkpoints: the student's train state (+ data iterator) and read-only restores.

A run's workdir holds `model_config.json` (the student's `ModelConfig`), `config.json` (the
run's settings, written by the trainer) and
`checkpoints/<step>/` with three items: `params`, `opt_state` and `meta` (JSON: step, the
grain iterator state, the seed). Saves are atomic (Orbax writes to a temporary directory
and renames, or on object stores marks a finished save), so a process killed mid-save
leaves the previous checkpoint intact. With `async_save` the device-to-host copy happens
in `save` and the write in the background, overlapping the next steps; `close` waits for
it. Paths are `etils.epath` paths, so a workdir may be `gs://bucket/run`.

Resuming reads the newest checkpoint that restores; one that does not (a torn file on a
file system without atomic renames, a disk that filled up) is reported, deleted, and the
one before it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from opdjax import distributed
from opdjax.models.config import ModelConfig

CONFIG_FILE = "model_config.json"


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URI (`gs://…`, an object store) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(workdir: str | os.PathLike) -> epath.Path:
  """A workdir as an `epath.Path`: local paths made absolute, `gs://...` and other URIs kept."""
  text = os.fspath(workdir)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def abstract_like(tree):
  """`ShapeDtypeStruct`s with the shardings of `tree` (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Restored(NamedTuple):
  """One checkpoint, read back."""

  step: int  # the number of updates it holds
  params: Any  # the student's parameters
  opt_state: Any  # the optimizer's state
  meta: dict  # JSON: the data iterator's state, the seed
  extra: dict  # {name: tree}: extra state a recipe saves (the EMA teacher's weights)


class Checkpointer:
  """Saves and restores the student's `(params, opt_state, meta)` under `workdir/checkpoints`."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, async_save: bool = False):
    self.directory = resolve(workdir) / "checkpoints"
    self.async_save = async_save
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        ),
    )

  def latest_step(self) -> int | None:
    """The newest step, the same on every process (or an error saying they differ)."""
    return distributed.same_on_every_process(self.manager.latest_step(), "the latest checkpoint")

  def save(self, step: int, params, opt_state, meta: dict[str, Any], extra=None) -> None:
    """Saves; with `async_save` returns once the arrays are copied to host memory. `extra`
    is `{name: tree}` of state a recipe keeps besides the parameters (an EMA teacher)."""
    items = {name: ocp.args.StandardSave(tree) for name, tree in (extra or {}).items()}
    self.manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
            **items,
        ),
        force=True,
    )
    if not self.async_save:
      self.manager.wait_until_finished()

  def restore(self, step: int, params, opt_state, extra=None) -> Restored:
    """Restores step `step` into the structure and shardings of the given (freshly built or
    abstract) trees."""
    extra = extra or {}
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_like(params)),
            opt_state=ocp.args.StandardRestore(abstract_like(opt_state)),
            meta=ocp.args.JsonRestore(),
            **{name: ocp.args.StandardRestore(abstract_like(tree)) for name, tree in extra.items()},
        ),
    )
    return Restored(
        step=step,
        params=restored["params"],
        opt_state=restored["opt_state"],
        meta=restored["meta"],
        extra={name: restored[name] for name in extra},
    )

  def restore_latest(self, params, opt_state, extra=None) -> Restored | None:
    """The newest checkpoint that restores, or None if there is none. A newer one that fails
    to restore is reported and deleted."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    distributed.same_on_every_process(len(steps), "the number of checkpoints")
    for step in steps:
      try:
        return self.restore(step, params, opt_state, extra)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back
        older = [s for s in steps if s < step]
        if not older:
          raise RuntimeError(
              f"checkpoint {self.directory / str(step)} cannot be restored and "
              f"there is no older one: {type(e).__name__}: {e}"
          ) from e
        warnings.warn(
            f"checkpoint {self.directory / str(step)} cannot be restored "
            f"({type(e).__name__}: {str(e)[:200]}); deleting it and resuming from "
            f"step {older[0]}",
            stacklevel=2,
        )
        self.manager.delete(step)
    return None

  def close(self) -> None:
    """Waits for a pending save, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def write_model_config(workdir: str | os.PathLike, config: ModelConfig) -> None:
  """Writes `model_config.json` (on process 0 only)."""
  if not distributed.is_main():
    return
  path = resolve(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(dataclasses.asdict(config), indent=2))


def read_model_config(workdir: str | os.PathLike) -> ModelConfig:
  path = resolve(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not an opdjax run directory")
  fields = json.loads(path.read_text())
  fields["eos_token_ids"] = tuple(fields.get("eos_token_ids") or ())
  return ModelConfig(**fields)


def restore_params(workdir: str | os.PathLike, params_like, *, step: int | None = None):
  """Read-only restore of a run's parameters (a teacher or a warm start), no optimizer state.

  Args:
    workdir: an earlier run's directory.
    params_like: a params tree (or abstract tree) with the target structure and shardings.
    step: which checkpoint; the latest by default.
  """
  parts = restore_param_parts(workdir, [params_like], step=step, partial=False)
  with contextlib.closing(parts):  # closes the manager
    return next(parts)


def restore_param_parts(
    workdir: str | os.PathLike,
    parts_like: Iterable,
    *,
    step: int | None = None,
    partial: bool = True,
) -> Iterator:
  """Restores the parameters of one checkpoint a part at a time, each part when it is asked
  for, so a caller that converts each part before taking the next holds one part's arrays in
  two forms, never the whole tree's.

  Args:
    workdir: an earlier run's directory.
    parts_like: (abstract) trees with the target shardings, each a subset of the saved
      parameter tree (`partial`) or all of it.
    step: which checkpoint; the latest by default.
    partial: whether a part may leave out saved entries.
  """
  manager = ocp.CheckpointManager(resolve(workdir) / "checkpoints")
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {resolve(workdir) / 'checkpoints'}")
    for part in parts_like:
      target = abstract_like(part)
      restore = (
          ocp.args.PyTreeRestore(
              target,
              restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True,
          )
          if partial
          else ocp.args.StandardRestore(target)
      )
      yield manager.restore(step, args=ocp.args.Composite(params=restore))["params"]
  finally:
    manager.close()
