"""GRPO's reward on a multi-step task: the verifier's exact match against per-step partial
credit (a design question the recipes issue left open, not a claim of the seeds).

Claim (process supervision: Uesato et al., arXiv:2211.14275; Lightman et al., "Let's Verify
Step by Step", arXiv:2305.20050; docs/theory.md §5): on a task solved in many steps, an
outcome reward is sparse: from a weak policy almost every group of samples is all wrong, its
advantages are zero, and GRPO learns nothing from it. Rewarding the steps done right (here
`step_credit`, the fraction of steps right before the first mistake) gives every group a
signal, and so trains better.

What it does (modular_chain, 12 steps, 24-token answers): the SFT warm start of
`compare_objectives` (the same config, so a workdir can share it; GRPO reads no teacher, so
there is no teacher stage), then `grpo` from it with `recipe.reward` = exact and
step_credit (`group_size` samples per prompt, `seeds` seeds, equal updates). It reports the
held-out greedy accuracy and step credit, the mean training reward, and `zero_std_groups`,
the fraction of groups whose samples all got the same reward (they teach nothing).

Results go to `grpo_rewards.{json,png}`; `experiments/results/` holds the measured ones.
Time on a 2-core CPU: full 6 min 42 s from an empty workdir in the committed run (9 min 11 s
in an earlier one; warm start about two fifths of it, 2 rewards × 3 seeds × 200 updates the
rest); `:tiny` ≈ 20 seconds.

    python -m opdjax.train --exp grpo_rewards
    python -m opdjax.train --exp grpo_rewards:tiny

Result (2-core CPU, `/usr/bin/time python -m opdjax.train --exp grpo_rewards`;
experiments/results/grpo_rewards.{json,png}). Warm start: held-out greedy accuracy 0.008,
step credit 0.126; 16 prompts × 4 samples per update, 200 updates at 1e-4, 3 seeds; groups
without signal and the training reward are means over training, held-out values at the
end (mean ± std), the gradient norm the largest before clipping:

    reward       groups without signal  training reward  step credit      greedy accuracy  max grad norm
    exact        0.997                  0.001            0.095 ± 0.005    0.000 ± 0.000    0.095
    step_credit  0.179                  0.100            0.101 ± 0.009    0.005 ± 0.004    1.51

Verdict: the premise holds and the claim is not supported at this scale. With exact match
99.7% of the groups are all wrong and teach nothing; with step credit 18% are uniform. But
neither run keeps the warm start's held-out step credit: both fall within 25 updates
(0.126 → 0.107–0.109) and end within one std of each other, and step credit's own
training reward stays flat (0.088 at the first logged step, 0.100 at the last, inside its
step-to-step noise). The exact-match run falls although only about one update in twenty
has a group with a signal: Adam normalises the gradient, so those few groups still move
the weights at the full rate (the step-size dip `early_dip` diagnosed). A denser reward is
not enough here; a lower rate or more updates may be, and were not tried.
"""

from __future__ import annotations

from opdjax import checkpoint, distributed, metrics
from opdjax.configs import distillation_comparison, is_tiny
from opdjax.stages import curve_panels, run_stages, seeded_variants, summarize_variant, write_result

CLAIM = (
    "On a multi-step task, GRPO with a per-step partial-credit reward trains better than with"
    " the verifier's exact match, whose groups are almost all uniformly wrong."
)
REWARDS = ("exact", "step_credit")
REPORTED = ("accuracy_greedy", "step_credit_greedy")
TRAINING = ("verifier_reward", "zero_std_groups")


def get_config(arg=None):
  tiny = is_tiny(arg, experiment="grpo_rewards")
  c = distillation_comparison(
      dict(name="grpo", group_size=4, correction="none"),
      "modular_chain",
      steps=200,
      eval_every=25,
      tiny=tiny,
  )
  # No OPD term: GRPO reads no teacher, so there is no teacher stage.
  c.method_template.teacher.checkpoint = ""
  del c.stages["teacher"]
  # Prompts; × group_size = 64 sampled rows per update (tiny: 16).
  c.method_template.train.batch_size = 4 if tiny else 16
  c.method_template.train.log_every = 1 if tiny else 5
  return c


def _stages(config):
  variants = {reward: dict(reward=reward) for reward in REWARDS}
  shared = {"warmstart": config.stages.warmstart}
  return seeded_variants(shared, config.method_template, variants, seeds=config.seeds)


def training_curve(results, name: str, key: str, *, seeds: int) -> dict:
  """`{"x", "y"}`: the training metric `key` at each logged step, averaged over the seeds."""
  runs = [
      [r for r in results[f"{name}_seed{s}"].history if r["split"] == "train"] for s in range(seeds)
  ]
  steps = [r["step"] for r in runs[0]]
  return {"x": steps, "y": [sum(run[i][key] for run in runs) / seeds for i in range(len(steps))]}


def verdict(methods: dict[str, dict]) -> str:
  final = lambda m, key: metrics.mean_std_text(methods[m][key])
  credit = lambda m: methods[m]["step_credit_greedy"]
  gap = credit("step_credit")["mean"] - credit("exact")["mean"]
  spread = max(credit("step_credit")["std"], credit("exact")["std"])
  start = methods["exact"]["curves"]["step_credit_greedy"]["y"][0]
  better = gap > spread and credit("step_credit")["mean"] > start
  mean = lambda ys: sum(ys) / len(ys)
  uniform = {m: mean(methods[m]["training"]["zero_std_groups"]["y"]) for m in REWARDS}
  denser = uniform["step_credit"] < uniform["exact"] - 0.1
  return (
      f"Groups with no signal (all samples rewarded alike), mean over training: exact "
      f"{uniform['exact']:.2f}, step credit {uniform['step_credit']:.2f}. Final held-out "
      f"greedy step credit: exact {final('exact', 'step_credit_greedy')}, step credit "
      f"{final('step_credit', 'step_credit_greedy')} (warm start {start:.3f}); greedy accuracy: "
      f"exact {final('exact', 'accuracy_greedy')}, step credit "
      f"{final('step_credit', 'accuracy_greedy')}. Partial credit "
      + ("gives more groups a signal" if denser else "does not give more groups a signal")
      + f", and the claim {'holds' if better else 'is not supported'} at this scale"
      + (
          " (the held-out step credit is not better by more than one std, or not above the"
          " warm start)."
          if not better
          else "."
      )
  )


def main(config, workdir):
  workdir = checkpoint.resolve(workdir)
  results = run_stages(*_stages(config), workdir)
  if not distributed.is_main():  # process 0 reports for everyone
    return results
  seeds = int(config.seeds)
  methods = {}
  for reward in REWARDS:
    methods[reward] = summarize_variant(
        results, reward, seeds=seeds, reported=REPORTED, curves=REPORTED
    )
    methods[reward]["training"] = {
        key: training_curve(results, reward, key, seeds=seeds) for key in TRAINING
    }
  rows = [
      {"reward": name, **{k: metrics.mean_std_text(m[k]) for k in REPORTED}}
      for name, m in methods.items()
  ]
  print()
  print(metrics.format_table(rows, ["reward", *REPORTED]))
  panels = curve_panels(methods) + [
      {
          "title": title,
          "x": "update",
          "series": {name: m["training"][key] for name, m in methods.items()},
      }
      for key, title in (
          ("verifier_reward", "training reward (each run's own)"),
          ("zero_std_groups", "groups whose samples all scored alike"),
      )
  ]
  result = {
      "claim": CLAIM,
      "verdict": verdict(methods),
      "group_size": int(config.method_template.recipe.group_size),
      "seeds": seeds,
      "methods": methods,
      "panels": panels,
  }
  write_result(result, workdir, "grpo_rewards")
  return results
