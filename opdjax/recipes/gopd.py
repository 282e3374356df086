"""G-OPD / ExOPD: on-policy distillation toward `π_T^λ · π_ref^(1−λ)` (docs/theory.md §4).

The student samples; the teacher q and a frozen reference r score its tokens.
`estimator`:
  * "sampled": the policy gradient with the dense reward
               `ρ_t = λ (log q(a_t) − log r(a_t)) − (log p_old(a_t) − log r(a_t))`,
               reward-to-go `gamma` and the importance `correction` of `opd`;
  * "full":    any §1 divergence to the tilted target `log_softmax(λ log q + (1−λ) log r)`
               on the full vocabulary.
`reward_scale` λ = 1 is `opd` exactly, whatever the reference; 0 < λ < 1 interpolates
from the reference to the teacher; λ > 1 extrapolates past the teacher (ExOPD, 1.25 in the
paper; 1.5 is reported unstable). The reference is the student's initial weights unless
the `reference` config section names a checkpoint or HF directory, such as the teacher's
base model before RL (the paper's "reward correction").

References: *Learning beyond Teacher: Generalized On-Policy Distillation with Reward
Extrapolation*, arXiv:2602.12125.
"""

from __future__ import annotations

import functools

from opdjax import objectives as obj
from opdjax.errors import ConfigError
from opdjax.recipes.base import Recipe, distribution_values
from opdjax.recipes.divergence_losses import divergence_from_config, divergence_loss
from opdjax.recipes.opd import pg_settings, policy_gradient_loss, reward_to_go

ESTIMATORS = ("sampled", "full")


def gopd_token_values(student_logits, frozen_logits, tokens):
  """Per token: `log p`, `log q`, `log r` of the sampled token and the metrics."""
  return dict(
      distribution_values(student_logits, frozen_logits["teacher"]),
      log_p=obj.token_log_probs(student_logits, tokens),
      log_q=obj.token_log_probs(frozen_logits["teacher"], tokens),
      log_r=obj.token_log_probs(frozen_logits["reference"], tokens),
  )


def gopd_rewards(values, targets, *, reward_scale: float):
  return obj.gopd_rewards(
      targets.model_logprobs, values["log_q"], values["log_r"], reward_scale=reward_scale
  )


def tilted_token_values(divergence, reward_scale: float):
  def token_values(student_logits, frozen_logits, tokens):
    del tokens
    target = obj.tilted_teacher_logits(
        frozen_logits["teacher"], frozen_logits["reference"], reward_scale=reward_scale
    )
    values = distribution_values(student_logits, frozen_logits["teacher"])
    values["divergence"] = divergence(student_logits, target)
    return values

  return token_values


def build(config) -> Recipe:
  estimator = config.estimator
  if estimator not in ESTIMATORS:
    raise ConfigError(f"recipe.estimator must be one of {ESTIMATORS} for gopd, got {estimator!r}")
  reward_scale = float(config.reward_scale)
  if not reward_scale >= 0:
    raise ConfigError(f"recipe.reward_scale (λ) must be >= 0, got {reward_scale}")
  loss_value = correction = None
  if estimator == "sampled":
    correction = config.correction
    token_values = gopd_token_values
    rewards = functools.partial(gopd_rewards, reward_scale=reward_scale)
    loss = policy_gradient_loss(
        reward_to_go(rewards, gamma=float(config.gamma)), **pg_settings(config)
    )
  else:
    token_values = tilted_token_values(divergence_from_config(config), reward_scale)
    loss, loss_value = divergence_loss, "divergence"
  return Recipe(
      name="gopd",
      source="student",
      roles=("teacher", "reference"),
      token_values=token_values,
      loss=loss,
      loss_value=loss_value,
      correction=correction,
  )
