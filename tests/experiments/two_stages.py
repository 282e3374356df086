"""Two tiny stages for the multi-process tests: SFT of a teacher, then OPD of a fresh
student with the sampler (sampled estimator, so every step samples), its rows routed
between two teachers: the SFT stage (`a`) and the same with its weights stored in bfloat16
(`b`, computing in float32), each example naming its own in the JSONL prompts that `main`
writes."""

import json

import ml_collections

from opdjax import checkpoint, configs, distributed
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
  for name, stored in (("a", "float32"), ("b", "bfloat16")):  # b: weights rounded, f32 compute
    opd.teachers[name] = configs.teacher_section(
        checkpoint="@sft", dtype="float32", param_dtype=stored
    )
  opd.task.train_jsonl, opd.task.eval_jsonl = "train.jsonl", "held_out.jsonl"  # in the workdir
  opd.seed = 1
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict({"sft": sft, "opd": opd})
  c.stage_order = ("sft", "opd")
  return c


def write_prompts(workdir):
  """Sums of one-digit numbers, the teachers alternating in a pattern that differs from
  the rows' order in any batch (train: 64 prompts, held out: 8)."""
  sums = [(a, b) for a in range(10) for b in range(10)]
  for name, rows in (("train.jsonl", sums[:64]), ("held_out.jsonl", sums[64:72])):
    lines = [
        json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b), "teacher": "ab"[(a * b) % 2]})
        for a, b in rows
    ]
    (workdir / name).write_text("\n".join(lines) + "\n")


def main(config, workdir):
  workdir = checkpoint.resolve(workdir)
  task = config.stages.opd.task
  task.train_jsonl, task.eval_jsonl = (
      str(workdir / p) for p in (task.train_jsonl, task.eval_jsonl)
  )
  if distributed.is_main():
    workdir.mkdir(parents=True, exist_ok=True)
    write_prompts(workdir)
  distributed.barrier("two_stages_prompts")
  return run_stages(config.stages, config.stage_order, workdir, quiet=True)
