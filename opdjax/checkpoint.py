"""Orbax checkpoints: the student's train state (+ data iterator) and read-only restores.

A run's workdir holds `model_config.json` (the student's `ModelConfig`) and
`checkpoints/<step>/` with three items: `params`, `opt_state` and `meta` (JSON: step, the
grain iterator state, the seed). Saves are synchronous and atomic (Orbax writes to a
temporary directory and renames), so a process killed mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from opdjax.models.config import ModelConfig

CONFIG_FILE = "model_config.json"


def abstract_like(tree):
  """`ShapeDtypeStruct`s with the shardings of `tree` (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """Saves and restores the student's `(params, opt_state, meta)` under `workdir/checkpoints`."""

  def __init__(self, workdir: str | Path, *, keep: int = 2):
    self.directory = Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, params, opt_state):
    """Restores into the structure and shardings of the given (freshly built) trees."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_like(params)),
        opt_state=ocp.args.StandardRestore(abstract_like(opt_state)),
        meta=ocp.args.JsonRestore()))
    return restored["params"], restored["opt_state"], restored["meta"]

  def close(self) -> None:
    self.manager.close()


def write_model_config(workdir: str | Path, config: ModelConfig) -> None:
  path = Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(dataclasses.asdict(config), indent=2))


def read_model_config(workdir: str | Path) -> ModelConfig:
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not an opdjax run directory")
  fields = json.loads(path.read_text())
  fields["eos_token_ids"] = tuple(fields.get("eos_token_ids") or ())
  return ModelConfig(**fields)


def restore_params(workdir: str | Path, params_like, *, step: int | None = None):
  """Read-only restore of a run's parameters (a teacher or a warm start), no optimizer state.

  Args:
    workdir: an earlier run's directory.
    params_like: a params tree (or abstract tree) with the target structure and shardings.
    step: which checkpoint; the latest by default.
  """
  manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints")
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_like(params_like))))
  manager.close()
  return restored["params"]
