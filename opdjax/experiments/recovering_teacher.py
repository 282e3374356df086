"""A teacher that has learned to recover from a mistake, against one that has not, as the
target of on-policy distillation (claim C1's diagnosis).

Question (from C1, `compare_objectives`): a teacher trained only on correct answers sees the
student's mistaken prefixes only in distillation; its targets there may be poor. On the
12-step `modular_chain`, `compare_objectives`' teacher continues the chain from a wrong
value (100% of 256 held-out cases): its targets after a mistake are consistent, but they
lead away from the right answer. A teacher that has learned to recover writes the true
chain after a wrong value instead. Does distilling toward it do better, and does it remove
the sampled estimator's early rise of the reverse KL?

What it does (modular_chain, 12 steps, 24-token answers):
  * `teacher`, `warmstart`: `compare_objectives`' stages (the same configs, so a workdir
    can share them).
  * `recovering_teacher`: the teacher fine-tuned by SFT (500 updates at 2e-3) on a mix
    (`recovery_records`): a quarter of the problems as they are, the rest with a prefix of
    the answer in the prompt whose last value is wrong (`compare_objectives.corrupt`) and
    the true chain from there as the answer. The wrong value is in the prompt, so no loss is
    taken on it: the teacher learns to skip it, not to make it.
  * Both teachers after a mistake (`teacher_after_mistakes`): continue from the wrong value,
    or return to the true chain?
  * OPD with the sampled estimator (γ = 0; `compare_objectives`' `opd_sampled_g0` at its
    rate, batch and updates) from the warm start toward each teacher, `seeds` seeds.
It reports held-out greedy accuracy and step credit (comparable across the two teachers),
the early rise of each run's reverse KL to its own teacher, and a verdict.

Results go to `recovering_teacher.{json,png}`; `experiments/results/` holds the measured
ones. Time on a 2-core CPU: full 19 min 41 s from an empty workdir (measured, one command;
teacher 7½, warm start 3, recovering teacher 4½, 2 teachers × 3 seeds × 200 updates 4½,
the diagnostics ½; the same numbers as the result below); `:tiny` ≈ 30 seconds.

    python -m opdjax.train --exp recovering_teacher
    python -m opdjax.train --exp recovering_teacher:tiny

Result (2-core CPU; `python -m opdjax.train --exp recovering_teacher`, 14 min 3 s from an
empty workdir, 7 min 1 s on the teacher and warm start of `compare_objectives`' run and its own
earlier consistent-teacher runs, which have the same configs;
experiments/results/recovering_teacher.{json,png}). 256 held-out prefixes with a wrong last value;
OPD runs mean ± std over 3 seeds after 200 updates (warm start: step credit 0.141):

    teacher      clean acc  after a mistake: continues / returns / entropy  student credit  KL rise
    consistent   1.000      1.000 / 0.000 / 0.008                            0.108 ± 0.005   +11.4 (52.0 → 63.4)
    recovering   0.938      0.664 / 0.195 / 0.993                            0.104 ± 0.000    +5.3 (20.2 → 25.5)

Verdict: no test of the claim at this budget: the fine-tuned teacher did not learn to
recover. It returns to the true chain after 20% of mistakes and still continues from the
wrong value after 66%, with far more uncertainty there (0.99 nats against 0.008), and lost
some clean accuracy (0.938). The first try (300 updates at 1e-3 on half corrupted
problems) returned after 5%. Only the first answer token after the wrong value differs from
the rule the teacher already follows, so the recovery signal is a small share of the loss;
learning it needs more updates (or a teacher trained on the mix from the start) than a
20-minute run leaves. What the runs do show: the student's step credit is about the same with
either teacher (0.108 ± 0.005 and 0.104 ± 0.000; 0.122 ± 0.002 with the first try's
teacher), and the reverse KL to the less confident teacher rises less early on (+5 against
+11; KLs to different teachers, so only their shapes compare). An earlier run of the same
configuration, before the sampled loss's backward was reorganised (the same sums in another
order), gave 0.102 ± 0.003 with both teachers and rises of +6 against +30; the teachers'
own numbers are the same to every digit.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from opdjax import checkpoint, distributed, metrics
from opdjax.data import tasks
from opdjax.experiments import compare_objectives
from opdjax.experiments.early_dip import dip
from opdjax.stages import (
    curve_panels,
    run_stages,
    seeded_variants,
    summarize_variant,
    write_result,
)

CLAIM = (
    "(Diagnosis, not a literature claim.) A teacher that has learned to recover after a"
    " mistake is a better on-policy distillation target than one trained on correct answers"
    " only."
)
TEACHERS = {"consistent": "@teacher", "recovering": "@recovering_teacher"}
REPORTED = ("accuracy_greedy", "step_credit_greedy", "sequence_reverse_kl")
FILES = ("recovery_train.jsonl", "held_out.jsonl")


def get_config(arg=None):
  from opdjax.configs import is_tiny

  tiny = is_tiny(arg, experiment="recovering_teacher")
  c1 = compare_objectives.get_config("tiny" if tiny else None)
  c = c1.copy_and_resolve_references()
  del c["methods"]
  method = c.method_template
  method.recipe.update(compare_objectives.METHODS["opd_sampled_g0"])
  recover = c.stages.teacher.copy_and_resolve_references()
  recover.student.init_from = "@teacher"  # fine-tuned from the consistent teacher
  # (A first try, 300 updates at 1e-3 on half corrupted problems, returned to the true chain
  # after 5% of mistakes: only the first answer token after the wrong value differs from
  # the rule the teacher knows, so the signal is thin.)
  recover.optimizer.update(learning_rate=2e-3, schedule="constant", warmup_steps=10)
  recover.train.steps = recover.train.save_every = 2 if tiny else 500
  recover.eval.every = recover.train.steps  # clean held-out accuracy, at the end
  task = recover.task
  task.prompt_length += task.completion_length  # the prompt carries an answer's prefix
  task.train_jsonl, task.eval_jsonl = (f"data/{f}" for f in FILES)  # under the workdir
  c.stages.recovering_teacher = recover
  c.recovery_problems = 64 if tiny else 4096  # training problems written for it
  return c


def recovery_records(problems, rng: np.random.Generator) -> list[dict]:
  """A quarter of the problems as they are; the rest with a prefix of the answer appended
  to the prompt whose last value is wrong, answered with the true chain from there on."""
  records = []
  for i, problem in enumerate(problems):
    if i % 4 == 0:
      records.append({"prompt": problem.prompt, "answer": problem.answer})
      continue
    values = problem.answer.split(",")
    step = int(rng.integers(1, len(values)))
    prefix, _, _ = compare_objectives.corrupt(problem, step, rng)
    # the prefix holds values 0..step-1, the last one wrong; the answer goes on from `step`
    records.append({"prompt": problem.prompt + prefix, "answer": ",".join(values[step:])})
  return records


def write_data(config, directory) -> None:
  task = config.stages.recovering_teacher.task
  directory.mkdir(parents=True, exist_ok=True)
  split = lambda size, held_out: tasks.split(
      task.name, difficulty=task.difficulty, size=size, held_out=held_out, seed=task.seed
  )
  train = recovery_records(split(int(config.recovery_problems), False), np.random.default_rng(0))
  held_out = [{"prompt": p.prompt, "answer": p.answer} for p in split(task.eval_size, True)]
  for name, rows in zip(FILES, (train, held_out)):
    (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stages(config, workdir):
  shared = {name: config.stages[name] for name in ("teacher", "warmstart", "recovering_teacher")}
  task = shared["recovering_teacher"].task
  task.train_jsonl, task.eval_jsonl = (
      str(workdir / p) for p in (task.train_jsonl, task.eval_jsonl)
  )
  stages, order = seeded_variants(
      shared, config.method_template, {name: {} for name in TEACHERS}, seeds=config.seeds
  )
  for name, where in TEACHERS.items():  # the variants differ in their teacher only
    for seed in range(config.seeds):
      stages[f"{name}_seed{seed}"].teacher.checkpoint = where
  return stages, order


def main(config, workdir):
  workdir = checkpoint.resolve(workdir)
  stages, order = _stages(config, workdir)
  results = run_stages(stages, order, workdir, data=functools.partial(write_data, config))
  if not distributed.is_main():  # process 0 reports for everyone
    return results
  after = {
      name: compare_objectives.teacher_after_mistakes(config, workdir, teacher=stage)
      for name, stage in (("consistent", "teacher"), ("recovering", "recovering_teacher"))
  }
  methods = {
      name: summarize_variant(results, name, seeds=config.seeds, reported=REPORTED, curves=REPORTED)
      for name in TEACHERS
  }
  for m in methods.values():
    m["kl_rise"] = dip(m["curves"]["sequence_reverse_kl"], rise=True)
  rows = [
      {
          "teacher": name,
          "continues / returns after a mistake": (
              f"{after[name]['after_mistake_continues_chain']:.3f} / "
              f"{after[name]['after_mistake_returns_to_true_chain']:.3f}"
          ),
          **{k: metrics.mean_std_text(methods[name][k]) for k in REPORTED},
          "KL rise": f"{methods[name]['kl_rise']:.3f}",
      }
      for name in TEACHERS
  ]
  print()
  print(metrics.format_table(rows, list(rows[0])))
  teacher_accuracy = {
      name: results[stage].final_eval.get("accuracy_greedy", float("nan"))
      for name, stage in (("consistent", "teacher"), ("recovering", "recovering_teacher"))
  }
  result = {
      "claim": CLAIM,
      "verdict": verdict(methods, after),
      "seeds": int(config.seeds),
      "teacher_accuracy": teacher_accuracy,
      "teacher_after_mistakes": after,
      "methods": methods,
      "panels": curve_panels(methods),
  }
  write_result(result, workdir, "recovering_teacher")
  return results


def verdict(methods: dict, after: dict) -> str:
  """Whether distilling toward the recovering teacher ends higher in step credit and
  accuracy than toward the consistent one by more than a std (means over seeds)."""
  c, r = methods["consistent"], methods["recovering"]
  learned = after["recovering"]["after_mistake_returns_to_true_chain"]
  if learned < 0.5:
    return (
        f"The recovering teacher returns to the true chain after only {learned:.0%} of mistakes,"
        " so it did not learn to recover: no test of the claim."
    )
  gaps = {
      key: (r[key]["mean"] - c[key]["mean"], max(r[key]["std"], c[key]["std"]))
      for key in ("step_credit_greedy", "accuracy_greedy")
  }
  better = all(gap > spread for gap, spread in gaps.values())
  worse = all(gap < -spread for gap, spread in gaps.values())
  text = ", ".join(f"{k} {g:+.3f} (std {s:.3f})" for k, (g, s) in gaps.items())
  return (
      f"The recovering teacher returns to the true chain after {learned:.0%} of mistakes. "
      f"Distilled toward it, the student ends at {text} against the consistent teacher: "
      + (
          "supported."
          if better
          else "the opposite holds."
          if worse
          else "not supported at this budget (within the seeds' spread)."
      )
      + f" Early reverse-KL rise to its own teacher: consistent {c['kl_rise']:+.2f},"
      f" recovering {r['kl_rise']:+.2f}."
  )
