"""Seconds to a run's first update, with the train step compiled in the background or not.

`trainer.run` compiles its train step in a thread while it builds the models and samples
the first rollout (`learner.check_memory(background=True)`). This runs a one-step
`trainer.run` (the small student, a random small teacher, 16 prompts, no evaluation and no
compilation cache) in a fresh process per run, alternating the trainer's background
compilation with compiling the step first, in line, and prints one JSON line per run: the
wall seconds of `trainer.run` and the update's first-call seconds.

    python benchmarks/first_step.py --out benchmarks/results/first_step_cpu_2core.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _jsonl import emit  # benchmarks/, next to this script


def one_run(recipe: str, background: bool) -> dict:
  """In this process: one `trainer.run` of one step."""
  import jax
  from flax import nnx
  from rollout_ahead import config_for

  from opdjax import build, configs, learner, trainer
  from opdjax.models import Decoder, save_pretrained

  check_memory = learner.check_memory
  waited = []

  def timed_check_memory(*args, **kwargs):
    plan = check_memory(*args, **(kwargs | {"background": background}))

    def train_step(*step_args):
      if not waited:  # the first call: waits for (or runs) the compiled step
        start = time.perf_counter()
        out = jax.block_until_ready(plan.train_step(*step_args))
        waited.append(time.perf_counter() - start)
        return out
      return plan.train_step(*step_args)

    return plan._replace(train_step=train_step)

  trainer.check_memory = timed_check_memory
  with tempfile.TemporaryDirectory() as tmp:
    teacher_dir = str(Path(tmp) / "teacher")
    base = configs.base_config()
    base.teacher.preset = "teacher-small"
    teacher_cfg = build.model_config_of(base.teacher, build.build_tokenizer(base))
    save_pretrained(Decoder(teacher_cfg, rngs=nnx.Rngs(1)), teacher_dir)
    args = argparse.Namespace(steps=1, batch=16, log_every=1)
    config = config_for(recipe, args, teacher_dir)
    start = time.perf_counter()
    trainer.run(config, Path(tmp) / "run", quiet=True)
    seconds = time.perf_counter() - start
  return dict(
      benchmark="first_step",
      backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind),
      recipe=recipe,
      background_compile=background,
      run_s=round(seconds, 3),
      first_update_call_s=round(waited[0], 3),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--recipes", nargs="+", default=["opd_sampled", "grpo"])
  parser.add_argument("--repeats", type=int, default=3, help="runs of each setting")
  parser.add_argument("--out", default=None)
  parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:  # a child process: one run, its record on stdout
    print(json.dumps(one_run(args.one[0], args.one[1] == "1")))
    return
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  for recipe in args.recipes:
    for _ in range(args.repeats):
      for background in (False, True):
        child = [sys.executable, __file__, "--one", recipe, str(int(background))]
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
        emit(json.loads(out.stdout.strip().splitlines()[-1]), args.out)


if __name__ == "__main__":
  main()
