"""A tiny self-distillation run with an EMA teacher, for the SIGKILL test in
tests/test_self_distill.py: 4 updates, a checkpoint every 2, the EMA moving fast."""

from opdjax import configs


def get_config(arg=None):
  del arg
  c = configs.float32(configs.base_config())
  c.task.train_size, c.task.eval_size = 64, 8
  c.task.completion_length, c.task.prompt_length, c.task.difficulty = 4, 6, 1
  c.recipe.name = "self_distill"
  c.recipe.teacher_mode = "ema"
  c.recipe.ema_rate = 0.5
  c.recipe.divergence = "reverse_kl"
  c.train.steps, c.train.batch_size = 4, 8
  c.train.log_every, c.train.save_every = 1, 2
  c.train.tensorboard = False
  c.eval.every, c.eval.at_start = 0, False
  c.mesh.shape = (1,)
  return c
