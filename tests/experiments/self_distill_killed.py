"""A tiny self-distillation run for the SIGKILL tests in tests/test_self_distill.py: 4
updates, a checkpoint every 2. `ARG` is the teacher mode: `ema` (the default; the EMA moving
fast, its weights stored in each checkpoint) or `trust_region` (the initial weights mixed in,
rebuilt on resume)."""

from opdjax import configs


def get_config(arg=None):
  c = configs.float32(configs.base_config())
  c.task.train_size, c.task.eval_size = 64, 8
  c.task.completion_length, c.task.prompt_length, c.task.difficulty = 4, 6, 1
  c.recipe.name = "self_distill"
  c.recipe.teacher_mode = arg or "ema"
  if c.recipe.teacher_mode == "ema":
    c.recipe.ema_rate = 0.5
  else:
    c.recipe.trust_region_alpha = 0.5
  c.recipe.divergence = "reverse_kl"
  c.train.steps, c.train.batch_size = 4, 8
  c.train.log_every, c.train.save_every = 1, 2
  c.train.tensorboard = False
  c.eval.every, c.eval.at_start = 0, False
  c.mesh.shape = (1,)
  return c
