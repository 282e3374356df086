"""ExOPD's reward scale λ: interpolation, extrapolation past the teacher, instability (claim C5).

Claim (G-OPD / ExOPD, arXiv:2602.12125; docs/theory.md §4): distilling toward
`π_T^λ · π_ref^(1−λ)` with λ > 1 (1.25 in the paper) beats plain OPD (λ = 1) and can pass
the teacher when the teacher was trained from a base by RL or SFT; λ < 1 interpolates between
the reference and the teacher; λ = 1.5 turns unstable.

What it does (2-digit addition): the SFT teacher and the SFT-warm-started student of
`compare_objectives`, then the `gopd` recipe from the warm start for each λ in `lambdas`
(`seeds` seeds, equal updates). The reference is the student's initial weights (the warm
start), so λ = 1 is `opd` exactly and λ = 0 would keep the warm start. The estimator is the
full-vocabulary one (reverse KL to the renormalised tilted target `log_softmax(λ log q +
(1−λ) log r)`): its gradient is far less noisy than the sampled-token one at this batch size
(`gamma_variance`), so the effect of λ is not hidden by noise. `--exp.estimator=sampled` runs
the paper's dense-reward policy gradient instead.

It reports, per λ, the held-out greedy accuracy (against the teacher's), the sequence-level
reverse KL to the teacher (to the teacher, not to the tilted target: λ ≠ 1 is meant to move
away from it), the largest gradient norm seen in training (instability) and the accuracy
drop from its best evaluation to its last (collapse).

Results go to `exopd_lambda.{json,png}` in the workdir; `experiments/results/` holds the
measured ones. Time on a 2-core CPU: full ≈ 7 minutes (teacher and warm start ≈ 2½, 4 λ ×
3 seeds × 150 updates ≈ 4); `:tiny` (the test-suite variant) ≈ 20 seconds.

    python -m opdjax.train --exp exopd_lambda
    python -m opdjax.train --exp exopd_lambda:tiny

Result (2-core CPU, 6 min 41 s, `python -m opdjax.train --exp exopd_lambda`;
experiments/results/exopd_lambda.{json,png}). Teacher 0.688 held-out greedy accuracy, warm
start 0.531; 150 updates, 3 seeds, mean ± std:

    λ     greedy accuracy  seq. reverse KL  max grad norm  drop from best
    0.5   0.581 ± 0.013    1.731 ± 0.191         16            0.029
    1     0.589 ± 0.007    1.690 ± 0.046         32            0.000
    1.25  0.560 ± 0.013    1.775 ± 0.073         36            0.013
    1.5   0.510 ± 0.013    1.794 ± 0.014         40            0.021

Verdict: the extrapolation half is refuted at this scale. λ = 1.25 ends below OPD by more
than one std (−0.029) and λ = 1.5 lower still (−0.078, below the warm start); no λ comes
near the teacher. λ = 0.5 ends between the reference and OPD, as interpolation should. The
gradient norm grows with λ (16 → 40, all clipped to 1) and the early accuracy dip is deepest
for λ ≥ 1.25, the weak sense in which 1.5 is less stable; no run diverged. This teacher was
trained from scratch by SFT and the reference is the student's warm start; the paper's gains
are for a teacher trained from a base model, which `exopd_reward_correction` tests.
"""

from __future__ import annotations

from opdjax import checkpoint, distributed, metrics
from opdjax.configs import distillation_comparison, is_tiny
from opdjax.errors import ConfigError
from opdjax.stages import curve_panels, run_stages, seeded_variants, summarize_variant, write_result

CLAIM = (
    "ExOPD with λ > 1 (1.25) beats OPD (λ = 1) and can pass the teacher; λ < 1 interpolates"
    " between the reference and the teacher; λ = 1.5 turns unstable."
)
REPORTED = ("accuracy_greedy", "sequence_reverse_kl", "token_reverse_kl")
ESTIMATORS = ("full", "sampled")


def get_config(arg=None):
  tiny = is_tiny(arg, experiment="exopd_lambda")
  c = distillation_comparison(
      dict(name="gopd", divergence="reverse_kl"), steps=150, eval_every=25, tiny=tiny
  )
  c.lambdas = "1.25" if tiny else "0.5,1,1.25,1.5"  # (tiny: one λ, for suite time)
  c.estimator = "full"
  return c


def numbers(text: str, *, setting: str) -> list[float]:
  """The comma-separated non-negative numbers of the config `setting` (λ values)."""
  try:
    values = [float(v) for v in str(text).split(",") if v]
  except ValueError:
    raise ConfigError(f"{setting}={text!r}: not a comma-separated list of numbers") from None
  bad = [v for v in values if not v >= 0]
  if bad or not values:
    raise ConfigError(f"{setting}={text!r}: needs one or more values >= 0, got {bad or 'none'}")
  return values


def variant(lam: float) -> str:
  return f"lambda{lam:g}".replace(".", "p")  # stage names take no dots


def _stages(config):
  if config.estimator not in ESTIMATORS:
    raise ConfigError(f"estimator must be one of {ESTIMATORS}, got {config.estimator!r}")
  variants = {
      variant(lam): dict(reward_scale=lam, estimator=config.estimator)
      for lam in numbers(config.lambdas, setting="lambdas")
  }
  shared = {"teacher": config.stages.teacher, "warmstart": config.stages.warmstart}
  return seeded_variants(shared, config.method_template, variants, seeds=config.seeds)


def verdict(methods: dict[str, dict], teacher_accuracy: float, lambdas: list[float]) -> str:
  """A factual verdict: λ > 1 against λ = 1 (beyond one std or not), against the teacher,
  λ < 1 between, and the instability of the largest λ."""
  acc = lambda lam: methods[f"λ={lam:g}"]["accuracy_greedy"]
  parts = []
  if 1.0 in lambdas:
    for lam in (lam for lam in lambdas if lam > 1):
      gap = acc(lam)["mean"] - acc(1.0)["mean"]
      spread = max(acc(lam)["std"], acc(1.0)["std"])
      parts.append(
          f"λ={lam:g} vs OPD (λ=1): accuracy {acc(lam)['mean']:.3f} vs {acc(1.0)['mean']:.3f} "
          f"({gap:+.3f}, {'beyond' if abs(gap) > spread else 'within'} one std)."
      )
    for lam in (lam for lam in lambdas if lam < 1):
      parts.append(
          f"λ={lam:g} ends at {acc(lam)['mean']:.3f}, "
          + ("below" if acc(lam)["mean"] < acc(1.0)["mean"] else "not below")
          + " OPD."
      )
  best = max(lambdas, key=lambda lam: acc(lam)["mean"])
  passes = acc(best)["mean"] > teacher_accuracy
  parts.append(
      f"Best λ={best:g} ({metrics.mean_std_text(acc(best))}); the teacher's "
      f"accuracy is {teacher_accuracy:.3f}: {'passed' if passes else 'not passed'}."
  )
  top = max(lambdas)
  parts.append(
      f"Largest λ={top:g}: max gradient norm {methods[f'λ={top:g}']['max_grad_norm']['mean']:.3g} "
      f"(λ=min {methods[f'λ={min(lambdas):g}']['max_grad_norm']['mean']:.3g}), accuracy drop from "
      f"its best evaluation {methods[f'λ={top:g}']['accuracy_drop_from_best']['mean']:.3f}."
  )
  return " ".join(parts)


def panels(methods: dict[str, dict], teacher_accuracy: float) -> list[dict]:
  """Held-out accuracy and sequence reverse KL against updates (mean over seeds) per λ, and
  the final accuracy against λ with the teacher's as a flat line."""
  lambdas = [float(k.split("=")[1]) for k in methods]
  return [
      *curve_panels(methods),
      {
          "title": "final greedy accuracy (mean ± std)",
          "x": "λ",
          "series": {
              "student": {
                  "x": lambdas,
                  "y": [m["accuracy_greedy"]["mean"] for m in methods.values()],
                  "std": [m["accuracy_greedy"]["std"] for m in methods.values()],
              },
              "teacher": {"x": lambdas, "y": [teacher_accuracy] * len(lambdas)},
          },
      },
  ]


def main(config, workdir):
  workdir = checkpoint.resolve(workdir)
  stages, order = _stages(config)
  results = run_stages(stages, order, workdir)
  if not distributed.is_main():  # process 0 reports for everyone
    return results
  lambdas = numbers(config.lambdas, setting="lambdas")
  methods = {
      f"λ={lam:g}": summarize_variant(results, variant(lam), seeds=config.seeds, reported=REPORTED)
      for lam in lambdas
  }
  teacher_accuracy = results["teacher"].final_eval.get("accuracy_greedy", float("nan"))
  rows = [
      {
          "λ": name,
          **{k: metrics.mean_std_text(m[k]) for k in REPORTED},
          "max grad norm": f"{m['max_grad_norm']['mean']:.3g}",
          "drop from best": f"{m['accuracy_drop_from_best']['mean']:.3f}",
      }
      for name, m in methods.items()
  ]
  print()
  print(metrics.format_table(rows, ["λ", *REPORTED, "max grad norm", "drop from best"]))
  print(f"\nteacher held-out greedy accuracy: {teacher_accuracy:.3f}")
  result = {
      "claim": CLAIM,
      "verdict": verdict(methods, teacher_accuracy, lambdas),
      "estimator": config.estimator,
      "seeds": int(config.seeds),
      "teacher_accuracy_greedy": teacher_accuracy,
      "methods": methods,
      "panels": panels(methods, teacher_accuracy),
  }
  write_result(result, workdir, "exopd_lambda")
  return results
