"""Training throughput with and without `train.rollout_ahead`, through `trainer.run`.

With `rollout_ahead` the next rollout is sampled from the parameters an update starts from
and dispatched before that update, so the host's share of a rollout (reading completions
back, verifying GRPO's rewards, drawing the next batch) runs while the device updates. For
each recipe and setting this prints one JSON line with the median `steps_per_s` of the
logged intervals after the first (which holds the compilation).

    python benchmarks/rollout_ahead.py --out benchmarks/results/rollout_ahead_cpu_2core.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax
from _jsonl import emit  # benchmarks/, next to this script
from flax import nnx

from opdjax import build, configs, recipes, trainer
from opdjax.models import Decoder, save_pretrained

RECIPES = {
    "grpo": dict(name="grpo", group_size=4, correction="ppo_clip"),
    "opd_sampled": dict(name="opd", estimator="sampled", correction="ppo_clip"),
}


def config_for(recipe: str, args, teacher_dir: str):
  c = configs.float32(configs.base_config())
  c.task.name = "addition"
  c.recipe.update(RECIPES[recipe])
  c.student.preset = "student-small"
  c.teacher.hf_path = teacher_dir
  c.train.steps = args.steps
  c.train.batch_size = args.batch
  c.train.log_every = args.log_every
  c.train.save_every = args.steps
  c.train.tensorboard = False
  c.eval.every = 0
  c.mesh.shape = (jax.device_count(),)
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--recipes", nargs="+", default=sorted(RECIPES), choices=sorted(RECIPES))
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch", type=int, default=16, help="prompts per update")
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    teacher_dir = str(Path(tmp) / "teacher")  # a random teacher-small: speed, not quality
    base = configs.base_config()
    base.teacher.preset = "teacher-small"
    teacher_cfg = build.model_config_of(base.teacher, build.build_tokenizer(base))
    save_pretrained(Decoder(teacher_cfg, rngs=nnx.Rngs(1)), teacher_dir)
    for recipe in args.recipes:
      for ahead in (False, True):
        config = config_for(recipe, args, teacher_dir)
        config.train.rollout_ahead = ahead
        result = trainer.run(config, Path(tmp) / f"{recipe}_{ahead}", quiet=True)
        rates = [r["steps_per_s"] for r in result.history if r["split"] == "train"][1:]
        emit(
            dict(
                benchmark="rollout_ahead",
                backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind),
                recipe=recipe,
                rollout_ahead=ahead,
                prompts=args.batch,
                rows=args.batch * recipes.build(config.recipe).group_size,
                steps=args.steps,
                median_steps_per_s=statistics.median(rates),
                steps_per_s=rates,
            ),
            args.out,
        )


if __name__ == "__main__":
  main()
