"""The early dip of on-policy distillation: which optimizer setting causes it? (C1 diagnosis)

Observation (this repository's runs: `compare_objectives`, `gamma_variance`, `exopd_lambda`,
`grpo_plus_opd`, `self_distill_teachers`): from an SFT warm start, the held-out reverse KL to
the teacher first rises and the accuracy first falls, for 25-50 updates, before either
improves. `exopd_reward_correction`, with a much better teacher (0.961 against 0.688), shows
no dip. Candidate causes: the learning rate, Adam's fresh second-moment estimate (its first
steps are sign-like, large in every coordinate), too short a warm-up, too few trained tokens
per batch.

What it does (2-digit addition, the quickstart's method: full-vocabulary reverse KL at the
student's samples, from the warm start toward the 1000-step teacher of `compare_objectives`),
`seeds` seeds × `updates` updates, evaluated every 10, one knob changed per variant from the
`adam` baseline (lr 1e-4, 10 warm-up steps, 64 rows):
  * `adam_lr3e-5`: a third of the rate;
  * `adam_warmup50`: 50 warm-up steps;
  * `sgd`: plain clipped gradient descent at lr 0.05 (no adaptive scaling, no momentum);
  * `adam_batch16`: a quarter of the rows per update.
It reports, per variant, the dip (the largest held-out accuracy drop below the start at any
evaluation, and the largest sequence reverse KL rise above it) and the final values.

Results go to `early_dip.{json,png}`; `experiments/results/` holds the measured ones. Time on
a 2-core CPU: full ≈ 6½ minutes (teacher and warm start ≈ 2½, 5 variants × 3 seeds × 100
updates ≈ 4); `:tiny` ≈ 30 seconds.

    python -m opdjax.train --exp early_dip
    python -m opdjax.train --exp early_dip:tiny

Result (2-core CPU; the variants 3 min 59 s, `python -m opdjax.train --exp early_dip`, on the
teacher and warm start of `exopd_lambda`'s run, which have the same configs;
experiments/results/early_dip.{json,png}). Warm start 0.531 held-out greedy accuracy, teacher
0.688; mean curves over 3 seeds:

    variant        accuracy dip  KL rise  final accuracy   final seq. reverse KL
    adam               0.135     +0.086   0.565 ± 0.042    1.816 ± 0.173
    adam_lr3e-5        0.021      0       0.536 ± 0.042    1.843 ± 0.047
    adam_warmup50      0.122      0       0.568 ± 0.035    1.673 ± 0.100
    sgd (lr 0.05)      0.427     +2.856   0.456 ± 0.015    2.047 ± 0.038
    adam_batch16       0.146     +0.136   0.544 ± 0.007    1.828 ± 0.061

Verdict: the dip is the step size. At a third of the rate it is gone (0.021), at the cost of a
lower accuracy after 100 updates (0.536 against 0.565); with 50 warm-up steps it does not go
away but moves to updates 50-60, where the rate reaches 1e-4 (0.409 at update 60); a quarter
of the batch leaves it as it is (0.146), so it is not the gradient noise of few tokens. The
baseline's dip is at its first evaluation (update 10), before Adam's second-moment estimate has
settled, and plain SGD at 0.05 dips far more (its rate is not on Adam's scale, so it does not
separate "Adam" from "too large a step"). In `exopd_reward_correction`, with a 0.961 teacher,
the same rate showed no dip: a stronger teacher's targets are closer to the warm start's
correct answers.
"""

from __future__ import annotations

from opdjax import checkpoint, distributed, metrics
from opdjax.configs import distillation_comparison, is_tiny
from opdjax.stages import (
    choose,
    curve_panels,
    run_stages,
    seeded_variants,
    summarize_variant,
    write_result,
)

CLAIM = (
    "(Diagnosis, not a literature claim.) The early rise of the held-out reverse KL in on-policy"
    " distillation comes from the optimizer setting (rate, Adam, warm-up or batch size)."
)
VARIANTS = {
    "adam": {},
    "adam_lr3e-5": {"optimizer": {"learning_rate": 3e-5}},
    "adam_warmup50": {"optimizer": {"warmup_steps": 50}},
    "sgd": {"optimizer": {"name": "sgd", "learning_rate": 0.05}},
    "adam_batch16": {"train": {"batch_size": 16}},
}
REPORTED = ("accuracy_greedy", "sequence_reverse_kl")


def get_config(arg=None):
  tiny = is_tiny(arg, experiment="early_dip")
  c = distillation_comparison(
      dict(name="opd", estimator="full", divergence="reverse_kl"),
      steps=100,
      eval_every=10,
      tiny=tiny,
  )
  c.variants = "adam,sgd" if tiny else ",".join(VARIANTS)
  return c


def _stages(config):
  chosen = choose(config.variants, VARIANTS, setting="variants")
  shared = {"teacher": config.stages.teacher, "warmstart": config.stages.warmstart}
  stages, order = seeded_variants(
      shared, config.method_template, {n: {} for n in chosen}, seeds=config.seeds
  )
  for name in chosen:  # each variant changes optimizer or train settings, not the recipe
    for seed in range(config.seeds):
      for section, values in VARIANTS[name].items():
        stages[f"{name}_seed{seed}"][section].update(values)
  return stages, order


def dip(curve: dict, *, rise: bool) -> float:
  """The largest move away from the start at any evaluation: above it for a KL (`rise`),
  below it for an accuracy; 0 when there is none. (A warm-up moves the dip to where the
  rate peaks, so it is not looked for in the first updates only.)"""
  start = curve["y"][0]
  return max(0.0, max((y - start) if rise else (start - y) for y in curve["y"]))


def main(config, workdir):
  workdir = checkpoint.resolve(workdir)
  stages, order = _stages(config)
  results = run_stages(stages, order, workdir)
  if not distributed.is_main():  # process 0 reports for everyone
    return results
  names = [n for n in config.variants.split(",") if n]
  methods = {n: summarize_variant(results, n, seeds=config.seeds, reported=REPORTED) for n in names}
  for m in methods.values():
    m["accuracy_dip"] = dip(m["curves"]["accuracy_greedy"], rise=False)
    m["kl_rise"] = dip(m["curves"]["sequence_reverse_kl"], rise=True)
  rows = [
      {
          "variant": n,
          "accuracy dip": f"{m['accuracy_dip']:.3f}",
          "KL rise": f"{m['kl_rise']:.3f}",
          **{k: metrics.mean_std_text(m[k]) for k in REPORTED},
      }
      for n, m in methods.items()
  ]
  print()
  print(metrics.format_table(rows, ["variant", "accuracy dip", "KL rise", *REPORTED]))
  base = methods.get("adam") or next(iter(methods.values()))
  removed = [n for n, m in methods.items() if m["accuracy_dip"] < 0.5 * base["accuracy_dip"]]
  verdict = (
      "Dip (mean curves over seeds; largest accuracy drop below the start, KL rise above it): "
      + ", ".join(f"{n} {m['accuracy_dip']:.3f} / {m['kl_rise']:+.3f}" for n, m in methods.items())
      + ". "
      + (
          f"Less than half the baseline's accuracy dip: {', '.join(removed)}."
          if removed
          else "No variant halves the baseline's accuracy dip."
      )
  )
  result = {
      "claim": CLAIM,
      "verdict": verdict,
      "seeds": int(config.seeds),
      "variants": {n: VARIANTS[n] for n in names},
      "methods": methods,
      "panels": curve_panels(methods),
  }
  write_result(result, workdir, "early_dip")
  return results
