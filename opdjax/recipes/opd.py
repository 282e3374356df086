"""On-policy distillation: the student's own samples, scored by the teacher (docs/theory.md §1–§5).

`estimator`:
  * "full":    any §1 divergence on the full vocabulary at every visited prefix;
  * "topk":    the same renormalised on the teacher's top `top_k` tokens (§6);
  * "sampled": the sampled-token policy gradient with per-token reward
               `ρ_t = log q(a_t) − log p_old(a_t)`, reward-to-go with discount `gamma`, and
               an importance correction (`correction`: none, plain, truncated, ppo_clip)
               against the sampler's distribution when rollouts are reused.
"""

from __future__ import annotations

import jax

from opdjax import objectives as obj
from opdjax.errors import ConfigError
from opdjax.recipes.base import Recipe, metric_pairs, pair, sampled_token_values
from opdjax.recipes.divergence_losses import divergence_loss, divergence_token_values

ESTIMATORS = ("full", "topk", "sampled")
CORRECTIONS = ("none", "plain", "truncated", "ppo_clip")


def policy_gradient_loss(advantages_of, *, correction: str, clip_epsilon: float, truncation: float):
  """The policy-gradient surrogate `−sg(A_t) log p(a_t)` for `advantages_of(values, targets)
  -> [B, T]`, reweighted by `p/μ` against the sampler's `behaviour_logprobs` when
  `correction` is not "none" (reused or truncated rollouts). Returns a `Recipe.loss`."""
  if correction not in CORRECTIONS:
    raise ConfigError(f"recipe.correction must be one of {CORRECTIONS}, got {correction!r}")

  def loss(values, targets):
    mask = targets.mask
    log_p = values["log_p"]
    advantages = advantages_of(values, targets)
    if correction == "none":
      per_token = obj.policy_gradient_loss(log_p, advantages)
    else:
      per_token = obj.importance_weighted_pg_loss(
          log_p,
          targets.behaviour_logprobs,
          advantages,
          correction=correction,
          clip_epsilon=clip_epsilon,
          truncation=truncation,
      )
    ratio = obj.importance_ratio(jax.lax.stop_gradient(log_p), targets.behaviour_logprobs)
    metrics = metric_pairs(values, mask)
    if "log_q" in values:
      metrics["sampled_log_ratio"] = pair(values["log_p"] - values["log_q"], mask)
    metrics["advantage"] = pair(advantages, mask)
    metrics["positive_advantage_fraction"] = pair((advantages > 0).astype("float32"), mask)
    metrics["importance_ratio"] = pair(ratio, mask)
    return per_token, metrics

  return loss


def reward_to_go(rewards_of, *, gamma: float):
  """`advantages_of` for per-token rewards: their reward-to-go with discount `gamma`."""
  if not 0.0 <= gamma <= 1.0:
    raise ConfigError(f"recipe.gamma must be in [0, 1], got {gamma}")
  return lambda values, targets: obj.reward_to_go(
      rewards_of(values, targets), targets.mask, gamma=gamma
  )


def opd_rewards(values, targets):
  """`ρ_t = log q(a_t) − log p_old(a_t)`, with the sampler's log-probs as `p_old`."""
  return obj.opd_rewards(targets.model_logprobs, values["log_q"])


def pg_settings(config) -> dict:
  return dict(
      correction=config.correction,
      clip_epsilon=float(config.clip_epsilon),
      truncation=float(config.truncation),
  )


def build(config) -> Recipe:
  estimator = config.estimator
  if estimator not in ESTIMATORS:
    raise ConfigError(f"recipe.estimator must be one of {ESTIMATORS}, got {estimator!r}")
  loss_value = correction = None
  if estimator == "sampled":
    correction = config.correction
    token_values = sampled_token_values
    loss = policy_gradient_loss(
        reward_to_go(opd_rewards, gamma=float(config.gamma)), **pg_settings(config)
    )
  else:
    loss_value = "divergence"
    if estimator == "topk" and int(config.top_k) < 1:
      raise ConfigError(f"recipe.estimator='topk' needs recipe.top_k >= 1, got {config.top_k}")
    if estimator == "full" and int(config.get("top_k", 0) or 0):
      raise ConfigError("recipe.top_k is set but recipe.estimator='full'; use estimator='topk'")
    token_values, loss = divergence_token_values(config), divergence_loss
  return Recipe(
      name="opd",
      source="student",
      roles=("teacher",),
      token_values=token_values,
      loss=loss,
      loss_value=loss_value,
      correction=correction,
  )
