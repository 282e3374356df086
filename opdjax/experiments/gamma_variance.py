"""The reward-to-go discount γ of the sampled-token OPD estimator: gradient variance and
training (claim C4).

Claim (the OPD literature, e.g. Thinking Machines' "On-Policy Distillation" note and
Qwen3's report, which train with γ = 0; docs/theory.md §3): a larger γ in the reward-to-go
`A_t = Σ_{u≥t} γ^{u−t} (log q(a_u) − log p(a_u))` gives a gradient of higher variance, and
γ = 0 (each token's own log-ratio) trains best.

What it does, from the SFT-warm-started student and the SFT teacher of `compare_objectives`
(2-digit addition):
1. At the warm-start parameters, it samples `rollouts` independent rollouts of the same
   `rollout_prompts` held-out prompts and, on each, takes the gradient of the sampled-token
   loss for every γ in `gammas` (and of the full-vocabulary per-token reverse KL, whose
   expectation the γ = 0 estimator shares). Per γ it reports the gradient's variance over
   rollouts (trace of the covariance), the squared norm of its mean, their ratio (the
   signal-to-noise ratio of one batch's gradient), and the cosine between the mean gradient
   and the full-vocabulary one: γ > 0 targets the sequence-level KL, so that cosine
   measures how far the target moves, not noise.
2. It trains the student with each γ (`seeds` seeds, sampled estimator, no correction,
   equal updates) and reports held-out greedy accuracy and sequence-level reverse KL.

Results go to `gamma_variance.{json,png}` in the workdir; `experiments/results/` holds
the measured ones.
Time on a 2-core CPU: full ≈ 6½ minutes (teacher and warm start ≈ 2, variance < 1,
4 γ × 3 seeds × 150 updates ≈ 4); `:tiny` (the test-suite variant) ≈ 30 seconds.

    python -m opdjax.train --exp gamma_variance
    python -m opdjax.train --exp gamma_variance:tiny
    python -m opdjax.train --exp gamma_variance:modular_chain,variance   # step 1 alone, 24-token answers

Result (2-core CPU, 6½ minutes, `python -m opdjax.train --exp gamma_variance`;
experiments/results/gamma_variance.{json,png}). Variance over 64 rollouts of 64 held-out
prompts at the warm-start parameters; training: 150 updates, 3 seeds, mean ± std:

    γ    grad variance  ‖mean grad‖²  cos to full  greedy accuracy  seq. reverse KL  early KL rise
    0         1335          1474        0.998      0.513 ± 0.037    1.974 ± 0.081      +0.28
    0.5       1381          1486        0.997      0.477 ± 0.044    2.039 ± 0.181      +0.78
    0.9       1470          1497        0.996      0.487 ± 0.042    2.169 ± 0.458      +0.70
    1         1499          1500        0.995      0.500 ± 0.028    1.917 ± 0.035      +0.92
    full-vocabulary reverse KL: variance 53.2 (25× below the sampled estimator at γ = 0)

Verdict: the variance half of the claim holds, weakly: it rises monotonically with γ, but
only by 12% from γ = 0 to 1, because addition's answers are ~3.5 tokens long and leave
little future to sum. The training half is not distinguishable at this scale: every γ's
final accuracy and KL is within one std of another's. What does separate the γ values is
the early dip: the held-out KL first rises for every γ (the dip the previous
compare_objectives run saw), by +0.28 at γ = 0 and +0.70 to +0.92 for γ ≥ 0.5. The
sampled estimator's gradient is 25× noisier than the full-vocabulary one on the same
rollouts. The long-horizon task (answers of 24 tokens) is where γ should matter more; this
experiment's training half does not run it (its teacher and warm start alone take ~13
minutes).

On the long-horizon task, the variance half alone (2-core CPU, 15 minutes, most of it the
chain's teacher and warm start; `python -m opdjax.train --exp
gamma_variance:modular_chain,variance`; experiments/results/
gamma_variance_modular_chain_variance.{json,png}). 64 rollouts of 64 held-out prompts, 24
answer tokens, at the warm start (teacher 1.000 held-out greedy accuracy):

    γ    grad variance  ‖mean grad‖²   SNR     cos to full
    0        34.5           2.00       0.058      0.881
    0.5      50.7           2.66       0.052      0.848
    0.9     281.9           7.38       0.026      0.624
    1       809.8          15.7        0.019      0.450
    full-vocabulary reverse KL: variance 3.70 (9× below the sampled estimator at γ = 0)

Verdict there: the variance claim holds clearly once answers are long: 23× from γ = 0 to
γ = 1 (against 12% on addition), and the signal-to-noise ratio of one batch's gradient
falls 3×. The mean gradient also turns away from the per-token one (cosine 0.88 → 0.45),
since γ > 0 targets the sequence-level KL. Whether γ = 0 also trains best on the chain is
not measured (the training half would take past 20 minutes here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from opdjax import checkpoint, distributed, metrics, recipes, trainer
from opdjax import objectives as obj
from opdjax.configs import distillation_comparison, size_and_options
from opdjax.errors import ConfigError
from opdjax.evaluation import forward_hidden
from opdjax.sampling import SamplingParams, generate
from opdjax.stages import resolve_references, run_stages, seeded_variants, write_result

CLAIM = (
    "A larger reward-to-go discount γ in the sampled-token OPD estimator gives a gradient of"
    " higher variance, and γ = 0 trains best."
)
REPORTED = ("accuracy_greedy", "sequence_reverse_kl", "token_reverse_kl")


OPTIONS = ("modular_chain", "variance")


def get_config(arg=None):
  """`arg`: `tiny` or `full` (none = full), optionally with `,modular_chain` (the
  long-horizon task instead of addition) and `,variance` (the gradient statistics alone,
  no training runs)."""
  tiny, options = size_and_options(arg, experiment="gamma_variance", options=OPTIONS)
  task = "modular_chain" if "modular_chain" in options else "addition"
  c = distillation_comparison(
      dict(name="opd", estimator="sampled", correction="none"),
      task,
      steps=150,
      eval_every=50,
      tiny=tiny,
  )
  c.variance_only = "variance" in options
  c.gammas = "0.5" if tiny else "0,0.5,0.9,1"  # (tiny: one γ, for suite time)
  c.rollouts = 2 if tiny else 64  # independent rollouts at the fixed warm-start parameters
  c.rollout_prompts = 8 if tiny else 64
  return c


def gammas_of(config) -> list[float]:
  gammas = [float(g) for g in str(config.gammas).split(",")]
  bad = [g for g in gammas if not 0.0 <= g <= 1.0]
  if bad:
    raise ConfigError(f"gammas must be in [0, 1], got {bad} in {config.gammas!r}")
  return gammas


def _variant(gamma: float) -> str:
  return f"opd_gamma{gamma:g}".replace(".", "p")  # stage names take no dots


def _stage_name(gamma: float, seed: int) -> str:
  return f"{_variant(gamma)}_seed{seed}"


def _method_stages(config):
  shared = {"teacher": config.stages.teacher, "warmstart": config.stages.warmstart}
  variants = {_variant(g): {"gamma": g} for g in gammas_of(config)}
  return seeded_variants(shared, config.method_template, variants, seeds=config.seeds)


def _flat(tree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def _gradient_fn(recipe, graphdef):
  """`(params, seq, teacher_head) -> flat gradient` of `recipe`'s batch loss."""

  @jax.jit
  def gradient(params, seq, teacher_head):
    tokens, mask = recipes.inputs_of(seq)
    targets = recipes.targets_of(seq)

    def loss(params):
      model = nnx.merge(graphdef, params)
      student = obj.Head(model.hidden_states(tokens, attention_mask=mask), model.head_kernel())
      num_tokens = jnp.maximum(jnp.sum(targets.mask), 1).astype(jnp.float32)
      return recipes.base.batch_loss(recipe, student, teacher_head, targets, num_tokens=num_tokens)

    return _flat(jax.grad(lambda p: loss(p)[0])(params))

  return gradient


def gradient_statistics(config, workdir) -> dict[str, dict[str, float]]:
  """Per estimator (`gamma=γ` and `full`): the variance over rollouts of one batch's
  gradient at the warm-start parameters, the squared norm of the mean gradient, and the
  mean gradient's cosine to the full-vocabulary per-token reverse-KL gradient."""
  stage = ml_collections.ConfigDict(config.method_template.to_dict())
  stage = resolve_references(stage, {n: workdir / n for n in ("teacher", "warmstart")})
  tokenizer = trainer.build_tokenizer(stage)
  _, held_out = trainer.build_data(stage, tokenizer)
  mesh = trainer.build_mesh(stage)

  load = lambda section: trainer.build_model(
      section, trainer.model_config_of(section, tokenizer), seed=0, mesh=mesh
  )
  student, teacher = load(stage.student), load(stage.teacher)  # warm start; teacher stage
  graphdef, params = nnx.split(student)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  kernel = trainer.head_kernel(teacher_graphdef, teacher_state)
  rows = slice(0, min(int(config.rollout_prompts), len(held_out)))
  prompt_tokens, prompt_mask = held_out.prompt_tokens[rows], held_out.prompt_mask[rows]

  estimators = {f"gamma={g:g}": dict(estimator="sampled", gamma=g) for g in gammas_of(config)}
  estimators["full"] = dict(estimator="full", divergence="reverse_kl")
  gradients = {}
  for name, settings in estimators.items():
    recipe_config = ml_collections.ConfigDict(stage.recipe.to_dict())
    recipe_config.update(settings)
    gradients[name] = _gradient_fn(recipes.build(recipe_config), graphdef)

  sums = {name: 0.0 for name in estimators}
  square_sums = {name: 0.0 for name in estimators}
  key = jax.random.key(int(config.method_template.seed))
  for r in range(int(config.rollouts)):
    gen = generate(
        student,
        prompt_tokens,
        prompt_mask,
        key=jax.random.fold_in(key, r),
        max_new_tokens=stage.task.completion_length,
        sampling=SamplingParams(),
    )
    seq = recipes.join(
        prompt_tokens, prompt_mask, gen.tokens, gen.mask, gen.sample_logprobs, gen.model_logprobs
    )
    tokens, mask = recipes.inputs_of(seq)
    teacher_head = obj.Head(forward_hidden(teacher_graphdef, teacher_state, tokens, mask), kernel)
    for name, gradient in gradients.items():
      g = np.asarray(gradient(params, seq, teacher_head), np.float64)
      sums[name] = sums[name] + g
      square_sums[name] = square_sums[name] + float(g @ g)
  reference = sums["full"] / int(config.rollouts)
  return {
      name: moment_statistics(sums[name], square_sums[name], int(config.rollouts), reference)
      for name in estimators
  }


def moment_statistics(total, square_total: float, n: int, reference) -> dict[str, float]:
  """Statistics of `n` gradient vectors from their sum `total = Σ g` and `Σ ‖g‖²`.

  `gradient_variance` is the unbiased trace of their covariance, `(Σ‖g‖² − n‖ḡ‖²)/(n − 1)`;
  `signal_to_noise` is `‖ḡ‖²` over it; `cosine_to_full_reverse_kl` the cosine between `ḡ`
  and `reference`."""
  mean = np.asarray(total, np.float64) / n
  variance = (float(square_total) - n * float(mean @ mean)) / max(n - 1, 1)
  norms = np.linalg.norm(mean) * np.linalg.norm(reference)
  return dict(
      gradient_variance=float(variance),
      mean_gradient_sq_norm=float(mean @ mean),
      signal_to_noise=float(mean @ mean) / max(float(variance), 1e-30),
      cosine_to_full_reverse_kl=float(mean @ reference / max(norms, 1e-30)),
  )


def statistics_row(stats, gamma: float) -> dict:
  """The table row of one γ's gradient statistics."""
  g = stats[f"gamma={gamma:g}"]
  return {
      "γ": f"{gamma:g}",
      "grad variance": g["gradient_variance"],
      "‖mean grad‖²": g["mean_gradient_sq_norm"],
      "SNR": g["signal_to_noise"],
      "cos to full": g["cosine_to_full_reverse_kl"],
  }


def variance_panel(stats, gammas, title: str) -> dict:
  """The figure panel of the variance and the squared mean gradient against γ."""
  column = lambda key: [stats[f"gamma={g:g}"][key] for g in gammas]
  return {
      "title": title,
      "x": "γ",
      "log_y": True,
      "series": {
          "sampled": {"x": gammas, "y": column("gradient_variance")},
          "‖mean‖² (signal)": {"x": gammas, "y": column("mean_gradient_sq_norm")},
      },
  }


def variance_trend(stats, gammas) -> str:
  """Whether the variance rises with γ, and by how much from the first γ to the last."""
  variances = [stats[f"gamma={g:g}"]["gradient_variance"] for g in gammas]
  rising = all(b >= a for a, b in zip(variances, variances[1:]))
  return (
      f"{'rises monotonically' if rising else 'does not rise monotonically'} with γ "
      f"(γ={gammas[-1]:g}: {variances[-1] / max(variances[0], 1e-30):.2f}× that of "
      f"γ={gammas[0]:g})"
  )


def verdict(result) -> str:
  """A factual verdict from a result's numbers: whether the variance rises with γ, which γ
  ends best on accuracy and KL and whether that lead exceeds one std over seeds, and how far
  the held-out KL rises in the first updates (the early dip) for each γ."""
  gammas = sorted(float(k.split("=")[1]) for k in result["methods"])
  final = lambda g, key: result["methods"][f"gamma={g:g}"][key]
  parts = [f"Variance {variance_trend(result['gradient_statistics'], gammas)}."]
  for key, better in (("accuracy_greedy", max), ("sequence_reverse_kl", min)):
    best = better(gammas, key=lambda g: final(g, key)["mean"])
    lead = min(
        (abs(final(best, key)["mean"] - final(g, key)["mean"]) for g in gammas if g != best),
        default=0.0,
    )
    spread = max(final(g, key)["std"] for g in gammas)
    parts.append(
        f"Final {key}: best at γ={best:g} ({final(best, key)['mean']:.3f} ± "
        f"{final(best, key)['std']:.3f}), "
        + ("a lead beyond one std." if lead > spread else "within one std of another γ.")
    )
  curves = result["panels"][2]["series"]
  rises = {g: max(curves[f"γ={g:g}"]["y"]) - curves[f"γ={g:g}"]["y"][0] for g in gammas}
  parts.append(
      "Early rise of held-out sequence reverse KL (max − start): "
      + ", ".join(f"γ={g:g} {r:+.2f}" for g, r in rises.items())
      + "."
  )
  return " ".join(parts)


def variance_report(config, workdir):
  """`gamma_variance:…,variance`: the teacher and warm-start stages, then the gradient
  statistics alone, reported as `gamma_variance_<task>_variance.{json,png}`."""
  results = run_stages(config.stages, ("teacher", "warmstart"), workdir)
  if not distributed.is_main():
    return results
  stats = gradient_statistics(config, workdir)
  gammas = gammas_of(config)
  rows = [statistics_row(stats, g) for g in gammas]
  print()
  print(metrics.format_table(rows, list(rows[0])))
  task = config.method_template.task.name
  result = {
      "claim": CLAIM,
      "task": task,
      "completion_length": int(config.method_template.task.completion_length),
      "rollouts": int(config.rollouts),
      "rollout_prompts": int(config.rollout_prompts),
      "gradient_statistics": stats,
      "verdict": (
          f"On {task}, the variance {variance_trend(stats, gammas)}; the full-vocabulary"
          f" reverse KL's is {stats['full']['gradient_variance']:.3g}."
      ),
      "panels": [variance_panel(stats, gammas, f"gradient variance over rollouts ({task})")],
  }
  write_result(result, workdir, f"gamma_variance_{task}_variance")
  return results


def main(config, workdir):
  workdir = checkpoint.resolve(workdir)
  if config.variance_only:
    return variance_report(config, workdir)
  gammas = gammas_of(config)
  results = run_stages(*_method_stages(config), workdir)
  if not distributed.is_main():  # process 0 reports for everyone
    return results
  stats = gradient_statistics(config, workdir)
  finals, curves = {}, {}
  for gamma in gammas:
    runs = [results[_stage_name(gamma, s)] for s in range(config.seeds)]
    finals[gamma] = {key: metrics.seed_summary(r.final_eval[key] for r in runs) for key in REPORTED}
    curves[gamma] = metrics.mean_eval_curve([r.history for r in runs], "sequence_reverse_kl")

  rows = [
      {**statistics_row(stats, g), **{k: metrics.mean_std_text(finals[g][k]) for k in REPORTED}}
      for g in gammas
  ]
  columns = ["γ", "grad variance", "‖mean grad‖²", "SNR", "cos to full", *REPORTED]
  print()
  print(metrics.format_table(rows, columns))
  print(
      f"(full-vocabulary reverse KL: variance {stats['full']['gradient_variance']:.3g}, "
      f"SNR {stats['full']['signal_to_noise']:.3g})"
  )
  result = {
      "claim": CLAIM,
      "rollouts": int(config.rollouts),
      "rollout_prompts": int(config.rollout_prompts),
      "seeds": int(config.seeds),
      "gradient_statistics": stats,
      "methods": {f"gamma={g:g}": finals[g] for g in gammas},
      "panels": [
          variance_panel(stats, gammas, "gradient variance over rollouts"),
          {
              "title": "final held-out greedy accuracy",
              "x": "γ",
              "series": {
                  "mean ± std": {
                      "x": gammas,
                      "y": [finals[g]["accuracy_greedy"]["mean"] for g in gammas],
                      "std": [finals[g]["accuracy_greedy"]["std"] for g in gammas],
                  }
              },
          },
          {
              "title": "held-out sequence reverse KL",
              "x": "update",
              "series": {f"γ={g:g}": dict(zip(("x", "y"), curves[g])) for g in gammas},
          },
      ],
  }
  result["verdict"] = verdict(result)
  write_result(result, workdir, "gamma_variance")
  return results
