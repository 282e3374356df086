"""Multi-stage experiments: run named configs in order inside one workdir.

A stage's string settings may name an earlier stage as `@name`, which becomes that
stage's workdir (for `teacher.checkpoint` or `student.init_from`). A stage whose final
checkpoint already exists is not retrained: rerunning an experiment reuses (or resumes)
what is in its workdir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import ml_collections

from opdjax import checkpoint, distributed, metrics, trainer
from opdjax.errors import ConfigError


def resolve_references(config: ml_collections.ConfigDict, workdirs: dict[str, Path]):
  """Replaces `@stage` strings in `config` by that stage's workdir (in place)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      resolve_references(value, workdirs)
    elif isinstance(value, str) and value.startswith("@"):
      stage = value[1:]
      if stage not in workdirs:
        raise ConfigError(
            f"{key}={value!r} names stage {stage!r}, which does not run "
            f"before it; earlier stages: {sorted(workdirs)}"
        )
      config[key] = str(workdirs[stage])
  return config


def run_stages(
    stages: ml_collections.ConfigDict,
    order,
    workdir: str | Path,
    *,
    quiet: bool = False,
    data: Callable[[Path], None] | None = None,
):
  """Runs the stage configs named in `order` (ConfigDict keys are unordered). `data`, when
  given, writes the files the stages read into `workdir / "data"`: process 0 calls it before
  any stage runs and the other processes wait for it.

  Returns:
    `{stage name: RunResult}`.
  """
  workdir = checkpoint.resolve(workdir)
  missing = [name for name in order if name not in stages]
  if missing:
    raise ConfigError(f"stage order names unknown stages {missing}; stages: {sorted(stages)}")
  if data is not None:
    if distributed.is_main():
      data(workdir / "data")
    distributed.barrier("run_stages_data")
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


def choose(names: str, table: dict[str, dict], *, setting: str) -> dict[str, dict]:
  """The entries of `table` named in the comma-separated `names` (the config `setting`),
  in that order; an unknown name is a `ConfigError` that lists the valid ones."""
  chosen = [n for n in names.split(",") if n]
  unknown = [n for n in chosen if n not in table]
  if unknown or not chosen:
    raise ConfigError(
        f"{setting}={names!r}: unknown {unknown or 'empty list'}; valid: {sorted(table)}"
    )
  return {n: table[n] for n in chosen}


def seeded_variants(
    shared: ml_collections.ConfigDict,
    template: ml_collections.ConfigDict,
    variants: dict[str, dict],
    *,
    seeds: int,
):
  """The stages of a comparison: the `shared` stages first (in their order), then one stage
  per variant and seed, `template` with the variant's recipe settings, named
  `{variant}_seed{s}`.

  Returns:
    `(stages, order)` for `run_stages`.
  """
  stages = ml_collections.ConfigDict()
  order = list(shared)
  for name in order:
    stages[name] = shared[name]
  for variant, recipe in variants.items():
    for seed in range(seeds):
      stage = ml_collections.ConfigDict(template.to_dict())
      stage.seed = seed
      stage.recipe.update(recipe)
      stages[f"{variant}_seed{seed}"] = stage
      order.append(f"{variant}_seed{seed}")
  return stages, order


CURVE_TITLES = {
    "accuracy_greedy": "held-out greedy accuracy",
    "step_credit_greedy": "held-out greedy step credit",
    "sequence_reverse_kl": "held-out sequence reverse KL to the teacher",
}


def summarize_variant(
    results, name: str, *, seeds: int, reported, curves=("accuracy_greedy", "sequence_reverse_kl")
) -> dict:
  """One variant of `seeded_variants` over its seeds (`results` from `run_stages`): the final
  held-out values of `reported`, the largest training gradient norm (instability), the drop
  of greedy accuracy from its best evaluation to its last (collapse), and the mean held-out
  curves of `curves` (held-out metrics); each statistic a `seed_summary`."""
  runs = [results[f"{name}_seed{s}"] for s in range(seeds)]
  summary = {key: metrics.seed_summary(r.final_eval[key] for r in runs) for key in reported}
  trains = [[h for h in r.history if h["split"] == "train"] for r in runs]
  summary["max_grad_norm"] = metrics.seed_summary(max(h["grad_norm"] for h in t) for t in trains)
  accuracies = [[h["accuracy_greedy"] for h in r.history if h["split"] == "eval"] for r in runs]
  summary["accuracy_drop_from_best"] = metrics.seed_summary(max(a) - a[-1] for a in accuracies)
  summary["curves"] = {
      key: dict(zip(("x", "y"), metrics.mean_eval_curve([r.history for r in runs], key)))
      for key in curves
  }
  return summary


def curve_panels(methods: dict[str, dict]) -> list[dict]:
  """Result panels (`metrics.plot_panels`) of the mean held-out curves of
  `summarize_variant`s, `{label: summary}`: one panel per curve against updates, one line
  per label."""
  keys = next(iter(methods.values()))["curves"]
  return [
      {
          "title": CURVE_TITLES.get(key, f"held-out {key}"),
          "x": "update",
          "series": {
              label: {"x": m["curves"][key]["x"], "y": m["curves"][key]["y"]}
              for label, m in methods.items()
          },
      }
      for key in keys
  ]


def write_result(result: dict, workdir, name: str, *, title: str = "") -> None:
  """An experiment's report: prints its verdict, draws its `panels` to `workdir/NAME.png` and
  writes `workdir/NAME.json` (the files `experiments/results/` holds and
  `notebooks/03_results.ipynb` redraws)."""
  print(f"\nverdict: {result['verdict']}")
  plot = metrics.plot_panels(result["panels"], workdir / f"{name}.png", title=title or name)
  (workdir / f"{name}.json").write_text(json.dumps(result, indent=2))
  print(f"plot: {plot}\nsummary: {workdir / f'{name}.json'}")
