"""Trains a teacher by SFT on a synthetic task (arg: addition | modular_chain).

What it shows: the teacher every distillation experiment starts from, trained from scratch
on the task's training split; the held-out greedy accuracy is printed at the end.
Time on a 2-core CPU: about 1.5 minutes (addition, 600 steps).

    python -m opdjax.train --exp teacher                 # addition, 2 digits
    python -m opdjax.train --exp teacher:modular_chain --exp.task.difficulty=3
"""

from opdjax.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.task.name = arg or "addition"
  if c.task.name == "modular_chain":
    c.task.difficulty = 3
    c.task.prompt_length = 12
    c.task.completion_length = 8
  c.student.preset = "teacher-small"   # the model being trained here is the teacher
  c.recipe.name = "sft"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 30
  c.train.steps = 600
  c.train.batch_size = 64
  c.train.log_every = 25
  c.train.save_every = 200
  c.eval.every = 200
  c.eval.at_start = False
  return c
