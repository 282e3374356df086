"""`python -m opdjax.train --exp NAME[:ARG] [--exp.key=value ...] [--workdir DIR]`.

`--list` prints every experiment with its one-line description; `--dry_run` prints the resolved
config and, for a one-run experiment, its per-device memory plan, and exits. Experiments are the
modules of `opdjax.experiments` (they ship in the wheel), or any file given as `--exp
path/to/my_exp.py[:ARG]`. Each defines `get_config(arg) -> ConfigDict` and optionally `main(config,
workdir)` (multi-stage experiments); otherwise the config is one `opdjax.trainer.run`.

SIGTERM or Ctrl-C stops a run after its current step with a checkpoint (`opdjax.stopping`);
the CLI then exits with 128 + the signal's number, and the same command resumes.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

import ml_collections

from opdjax import experiments
from opdjax.errors import ConfigError


class CLIError(ConfigError):
  """A bad command line."""


def experiment_names() -> list[str]:
  return sorted(
      m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_")
  )


def load_experiment(name: str):
  """`opdjax.experiments.NAME`, or the module in the file `NAME` if it ends in `.py`."""
  if name.endswith(".py"):
    path = Path(name)
    if not path.is_file():
      raise CLIError(f"experiment file {name!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"opdjax_user_experiment.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  elif name in experiment_names():
    module = importlib.import_module(f"opdjax.experiments.{name}")
  else:
    raise CLIError(
        f"unknown experiment {name!r}; valid: {', '.join(experiment_names())} "
        "(or a path ending in .py)"
    )
  if not callable(getattr(module, "get_config", None)):
    raise CLIError(f"experiment {name!r} defines no get_config(arg)")
  return module


def describe(module) -> str:
  return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def _parse_value(key: str, raw: str, current):
  expected = type(current).__name__
  if isinstance(current, bool):
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise CLIError(f"--exp.{key}: expected a bool (true/false), got {raw!r}")
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise CLIError(f"--exp.{key}: expected an int, got {raw!r}") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise CLIError(f"--exp.{key}: expected a float, got {raw!r}") from None
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      raise CLIError(f"--exp.{key}: expected a tuple like (2, 4), got {raw!r}") from None
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return tuple(value)
  if isinstance(current, ml_collections.ConfigDict):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, dict):
      raise CLIError(f"--exp.{key}: expected a dict like {{'beta': 0.5}}, got {raw!r}")
    return ml_collections.ConfigDict(value)
  raise CLIError(f"--exp.{key}: cannot override a value of type {expected}")


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets `config.<key>` from a command-line string, with the existing value's type."""
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:depth]) or "the top level"
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise CLIError(f"unknown override key {key!r}: no {part!r} at {where}; valid: {valid}")
    if depth < len(parts) - 1:
      node = node[part]
  node[parts[-1]] = _parse_value(key, raw, node[parts[-1]])


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m opdjax.train", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--exp", help="experiment name or path/to/file.py, optionally with :ARG")
  parser.add_argument("--workdir", default=None, help="output directory (default workdirs/NAME)")
  parser.add_argument("--list", action="store_true", help="list the experiments and exit")
  parser.add_argument(
      "--dry_run",
      action="store_true",
      help="print the resolved config and the memory plan, and exit",
  )
  parser.add_argument("--debug", action="store_true", help="show tracebacks for config errors")
  hosts = parser.add_argument_group(
      "several processes",
      "as jax.distributed.initialize takes them (also from "
      "$OPDJAX_COORDINATOR_ADDRESS, $OPDJAX_NUM_PROCESSES, $OPDJAX_PROCESS_ID); a TPU VM "
      "slice or a SLURM job with several tasks needs none of them",
  )
  hosts.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  hosts.add_argument("--num_processes", type=int, default=None)
  hosts.add_argument("--process_id", type=int, default=None)
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--exp.") or "=" not in item:
      raise CLIError(f"unrecognised argument {item!r}; overrides look like --exp.train.steps=100")
    key, raw = item[len("--exp.") :].split("=", 1)
    overrides.append((key, raw))
  return args, overrides


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache, so a rerun (a resume, the next stage, the
  next seed) loads its executables instead of compiling them again. The directory is
  `$OPDJAX_COMPILATION_CACHE`, by default `~/.cache/opdjax/xla`; set it empty to turn the
  cache off. Programs that compile in under `$OPDJAX_COMPILATION_CACHE_MIN_SECONDS`
  (default 0.1; JAX's own default of 1 s left a teacher's forward pass, ~0.7 s to compile
  on a CPU, to be compiled again in every run) are not stored."""
  directory = os.environ.get(
      "OPDJAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "opdjax" / "xla")
  )
  if not directory:
    return None
  import jax

  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update(
      "jax_persistent_cache_min_compile_time_secs",
      float(os.environ.get("OPDJAX_COMPILATION_CACHE_MIN_SECONDS", "0.1")),
  )
  return directory


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, overrides = parse_args(argv)
    if args.list:
      for name in experiment_names():
        print(f"{name:24s} {describe(load_experiment(name))}")
      return 0
    if not args.exp:
      raise CLIError(f"--exp is required; experiments: {', '.join(experiment_names())}")
    name, _, arg = args.exp.partition(":")
    module = load_experiment(name)
    name = Path(name).stem
    config = module.get_config(arg or None)
    for key, raw in overrides:
      apply_override(config, key, raw)
    from opdjax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    if args.dry_run and distributed.is_main():
      from opdjax.configs import applicable

      print(applicable(config))  # only the settings this run reads
    workdir = args.workdir or str(Path("workdirs") / (name + (f"_{arg}" if arg else "")))
    enable_compilation_cache()
    from opdjax import build, learner, trainer  # heavy imports only when training
    from opdjax.stopping import Stopped

    try:
      if args.dry_run:
        if "recipe" in config:  # one run (a staged experiment plans each stage at its start)
          run_setup = build.setup(config)
          if distributed.is_main():
            print(build.format_layout(run_setup))
          learner.check_memory(config, run_setup, quiet=not distributed.is_main())
        return 0
      if hasattr(module, "main"):
        module.main(config, workdir)
      else:
        trainer.run(config, workdir)
    except trainer.NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr)
      return 3
    except Stopped as e:  # a signal: the checkpoint is saved, the same command resumes
      print(e, file=sys.stderr)
      return e.exit_code
    except (ConfigError, FileNotFoundError) as e:  # anything else is a bug: traceback
      if args.debug:
        raise
      print(f"error: {e}", file=sys.stderr)
      return 2
  except ConfigError as e:  # CLIError included
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
