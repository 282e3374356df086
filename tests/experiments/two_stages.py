"""Two tiny stages for the multi-process tests: SFT of a teacher, then OPD of a fresh
student from it with the sampler (sampled estimator, so every step samples)."""

import ml_collections

from opdjax import configs
from opdjax.stages import run_stages


def tiny(recipe: str) -> ml_collections.ConfigDict:
  c = configs.float32(configs.base_config())
  c.task.train_size, c.task.eval_size = 64, 8
  c.task.completion_length, c.task.prompt_length, c.task.difficulty = 4, 6, 1
  c.student.preset = "student-tiny"
  c.recipe.name = recipe
  c.train.steps, c.train.batch_size = 4, 8
  c.train.log_every = c.train.save_every = 2
  c.train.tensorboard = True
  c.eval.every, c.eval.at_start = 4, False
  return c


def get_config(arg=None):
  del arg
  sft = tiny("sft")
  sft.eval.every = 0  # the OPD stage evaluates
  opd = tiny("opd")
  opd.recipe.estimator = "sampled"
  opd.teacher.checkpoint = "@sft"
  opd.seed = 1
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict({"sft": sft, "opd": opd})
  c.stage_order = ("sft", "opd")
  return c


def main(config, workdir):
  return run_stages(config.stages, config.stage_order, workdir, quiet=True)
