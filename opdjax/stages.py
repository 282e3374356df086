"""Multi-stage experiments: run named configs in order inside one workdir.

A stage's string settings may name an earlier stage as `@name`, which becomes that
stage's workdir (for `teacher.checkpoint` or `student.init_from`). A stage whose final
checkpoint already exists is not retrained: rerunning an experiment reuses (or resumes)
what is in its workdir.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from opdjax import checkpoint, distributed, trainer


def resolve_references(config: ml_collections.ConfigDict, workdirs: dict[str, Path]):
  """Replaces `@stage` strings in `config` by that stage's workdir (in place)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      resolve_references(value, workdirs)
    elif isinstance(value, str) and value.startswith("@"):
      stage = value[1:]
      if stage not in workdirs:
        raise trainer.ConfigError(
            f"{key}={value!r} names stage {stage!r}, which does not run "
            f"before it; earlier stages: {sorted(workdirs)}"
        )
      config[key] = str(workdirs[stage])
  return config


def run_stages(
    stages: ml_collections.ConfigDict, order, workdir: str | Path, *, quiet: bool = False
):
  """Runs the stage configs named in `order` (ConfigDict keys are unordered).

  Returns:
    `{stage name: RunResult}`.
  """
  workdir = checkpoint.resolve(workdir)
  missing = [name for name in order if name not in stages]
  if missing:
    raise trainer.ConfigError(
        f"stage order names unknown stages {missing}; stages: {sorted(stages)}"
    )
  results, workdirs = {}, {}
  for name in order:
    config = stages[name]
    config = resolve_references(ml_collections.ConfigDict(config.to_dict()), workdirs)
    if not quiet and distributed.is_main():
      print(
          f"== stage {name}: {config.recipe.name} for {config.train.steps} steps "
          f"-> {workdir / name}",
          flush=True,
      )
    results[name] = trainer.run(config, workdir / name, quiet=quiet)
    workdirs[name] = workdir / name
  return results
