"""GRPO, and GRPO + OPD: G samples per prompt, the task verifier's reward, group-relative
advantages (docs/theory.md §5).

Each prompt is sampled `group_size` times. A completion's reward is the task's: 1 if the
verifier accepts it, else 0 (`reward="exact"`), or its step credit, the fraction of steps
right before its first mistake (`reward="step_credit"`, denser on multi-step tasks). Its
advantage is `Â_i = (R_i − mean_group R) / (std_group R + ε)`
(`normalize_std=False` gives Dr. GRPO's mean-centred advantage), applied to every token.
With `opd_weight` > 0 a teacher adds the dense on-policy distillation signal per token:
`A_t = Â_i + opd_weight · Σ_{u≥t} γ^{u−t} (log q(a_u) − log p_old(a_u))`. Reused rollouts
are corrected with `correction` (plain, truncated, ppo_clip) as in `opd`. `loss_mean` =
"token" averages over every completion token of the batch (Dr. GRPO); "sequence" averages
each completion's tokens first, then the completions (the original GRPO objective, whose
1/|o| factor Dr. GRPO shows to favour short correct and long wrong completions).
Besides the policy-gradient metrics it logs `verifier_reward` (the mean reward) and
`zero_std_groups`, the fraction of groups whose samples all got the same reward.

References: Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300; Liu et al., Dr. GRPO,
arXiv:2503.20783; Agarwal et al., GKD, arXiv:2306.13649.
"""

from __future__ import annotations

import jax.numpy as jnp

from opdjax import objectives as obj
from opdjax.errors import ConfigError
from opdjax.recipes.base import Recipe, distribution_values, pair, sampled_token_values
from opdjax.recipes.opd import opd_rewards, pg_settings, policy_gradient_loss


def policy_token_values(student_logits, frozen_logits, tokens):
  """Per token without a teacher: `log p(a_t)` and the student's entropy."""
  del frozen_logits
  return dict(
      distribution_values(student_logits, None), log_p=obj.token_log_probs(student_logits, tokens)
  )


def group_advantages(*, group_size: int, normalize_std: bool, opd_weight: float, gamma: float):
  """`advantages_of(values, targets) -> [B, T]` for rows grouped `group_size` at a time."""

  def advantages_of(values, targets):
    rewards = targets.rewards.reshape(-1, group_size)
    outcome = obj.grpo_advantages(rewards, normalize_std=normalize_std).reshape(-1)
    dense = jnp.zeros(targets.mask.shape, jnp.float32)
    if opd_weight:
      dense = opd_weight * obj.reward_to_go(opd_rewards(values, targets), targets.mask, gamma=gamma)
    return obj.mix_opd_rl_advantages(dense, outcome, targets.mask, rl_weight=1.0)

  return advantages_of


REWARDS = ("exact", "step_credit")  # evaluation.REWARDS computes them


def build(config) -> Recipe:
  reward = config.get("reward", "exact")
  if reward not in REWARDS:
    raise ConfigError(f"recipe.reward must be one of {REWARDS}, got {reward!r}")
  group_size = int(config.group_size)
  if group_size < 2:
    raise ConfigError(
        f"recipe.group_size must be >= 2 for grpo (advantages are relative to "
        f"the group), got {group_size}"
    )
  opd_weight = float(config.opd_weight)
  if not opd_weight >= 0:
    raise ConfigError(f"recipe.opd_weight must be >= 0, got {opd_weight}")
  gamma = float(config.gamma)
  if not 0.0 <= gamma <= 1.0:
    raise ConfigError(f"recipe.gamma must be in [0, 1], got {gamma}")
  pg_loss = policy_gradient_loss(
      group_advantages(
          group_size=group_size,
          normalize_std=bool(config.normalize_std),
          opd_weight=opd_weight,
          gamma=gamma,
      ),
      **pg_settings(config),
  )

  def loss(values, targets):
    per_token, metrics = pg_loss(values, targets)
    rewards = targets.rewards.reshape(-1, group_size)
    metrics["verifier_reward"] = pair(targets.rewards, jnp.ones_like(targets.rewards))
    # Groups whose samples all scored the same: their advantages are 0, so they teach nothing
    # (TRL's frac_reward_zero_std).
    same = jnp.all(rewards == rewards[:, :1], axis=-1).astype(jnp.float32)
    metrics["zero_std_groups"] = pair(same, jnp.ones_like(same))
    return per_token, metrics

  return Recipe(
      name="grpo",
      source="student",
      roles=("teacher",) if opd_weight else (),
      token_values=sampled_token_values if opd_weight else policy_token_values,
      loss=loss,
      group_size=group_size,
      reward=reward,
      correction=config.correction,
      loss_mean=config.get("loss_mean", "token"),
  )
