"""Sampled-token ("PG-style") estimators and off-policy corrections (docs/theory.md §2, §5).

Inputs are per-token log-probabilities `[...]` of the *sampled* tokens `a_t` (see
`token_log_probs`): `log p(a_t)` from the student (differentiated), `log q(a_t)` from the
teacher and `log μ(a_t)` from the behaviour policy that sampled them (both stop-gradiented
inside). Outputs are per-token values `[...]`; reduce them with `opdjax.objectives`'
mask-aware reductions.

Sign convention: reward/advantage = higher is better; losses are minimised.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from opdjax.objectives import _checks

sg = jax.lax.stop_gradient


def token_log_probs(logits, tokens, *, temperature: float = 1.0) -> jax.Array:
  """`log softmax(logits / temperature)[tokens]`: log-probabilities of given tokens.

  Args:
    logits: `[..., V]` (any float dtype; float32 inside).
    tokens: `[...]` integer ids in `[0, V)`.
    temperature: divides the logits before the softmax.

  Returns:
    `[...]` float32 log-probabilities (differentiable w.r.t. `logits`).

  References:
    docs/theory.md §2.

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.2, 0.3, 0.5]]))
    >>> print(jnp.round(token_log_probs(logits, jnp.array([2])), 4))
    [-0.6931]
  """
  temperature = _checks.positive("temperature", temperature)
  logits = jnp.asarray(logits)
  tokens = jnp.asarray(tokens)
  if logits.ndim < 1 or logits.shape[:-1] != tokens.shape:
    raise ValueError(
        f"logits {logits.shape} must be tokens.shape + (V,), tokens has shape {tokens.shape}"
    )
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
  log_probs = jax.nn.log_softmax(_checks.as_float(logits) / temperature, axis=-1)
  return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def log_ratio(student_log_probs, teacher_log_probs) -> jax.Array:
  """Per-token cost `c_t = log p(a_t) − log q(a_t)`; `E_{a~p}[c] = KL(p‖q)`.

  Differentiable through the student term only. The OPD reward is `ρ_t = −c_t`.
  """
  student_log_probs, teacher_log_probs = _checks.same_shape(
      student_log_probs=student_log_probs, teacher_log_probs=teacher_log_probs
  )
  return _checks.as_float(student_log_probs) - _checks.as_float(sg(teacher_log_probs))


def kl_estimate_k1(student_log_probs, teacher_log_probs) -> jax.Array:
  """Schulman's `k1 = c` (unbiased value of `KL(p‖q)`; zero expected gradient as a loss).

  References:
    J. Schulman, *Approximating KL Divergence* (2020), joschu.net/blog/kl-approx.html.
  """
  return log_ratio(student_log_probs, teacher_log_probs)


def kl_estimate_k2(student_log_probs, teacher_log_probs) -> jax.Array:
  """Schulman's `k2 = ½ c²` (biased value; as a loss its expected gradient is `reverse_kl`'s).

  References:
    J. Schulman, *Approximating KL Divergence* (2020), joschu.net/blog/kl-approx.html.
  """
  return 0.5 * jnp.square(log_ratio(student_log_probs, teacher_log_probs))


def kl_estimate_k3(student_log_probs, teacher_log_probs) -> jax.Array:
  """Schulman's `k3 = (e^{−c} − 1) + c` (unbiased value of `KL(p‖q)`, non-negative).

  As a loss back-propagated directly its expected gradient is `forward_kl`'s, not
  `reverse_kl`'s.

  References:
    J. Schulman, *Approximating KL Divergence* (2020), joschu.net/blog/kl-approx.html.
  """
  c = log_ratio(student_log_probs, teacher_log_probs)
  return jnp.expm1(-c) + c


def policy_gradient_loss(log_probs, advantages) -> jax.Array:
  """REINFORCE surrogate `L_t = −sg(A_t) · log p(a_t)`; gradient `−A_t ∇log p(a_t)`.

  Args:
    log_probs: `[...]` student log-probs of the sampled tokens.
    advantages: `[...]` advantages (higher is better; stop-gradiented).

  References:
    Williams (1992), REINFORCE; Gu et al., MiniLLM, arXiv:2306.08543; docs/theory.md §2.
  """
  log_probs, advantages = _checks.same_shape(log_probs=log_probs, advantages=advantages)
  return -_checks.as_float(sg(advantages)) * _checks.as_float(log_probs)


def sampled_reverse_kl_loss(student_log_probs, teacher_log_probs) -> jax.Array:
  """OPD's sampled-token surrogate `L_t = sg(c_t) · log p(a_t)` (per-token advantage `−c_t`).

  Logit gradient `c_t (δ_{a_t j} − p_j)`; its expectation over `a_t ~ p` is the
  `reverse_kl` gradient at that prefix. For reward-to-go, feed
  `reward_to_go(opd_rewards(...))` to `policy_gradient_loss` instead.

  References:
    Gu et al., MiniLLM, arXiv:2306.08543; docs/theory.md §2.
  """
  c = sg(log_ratio(student_log_probs, teacher_log_probs))
  return policy_gradient_loss(student_log_probs, -c)


def importance_ratio(log_probs, behaviour_log_probs) -> jax.Array:
  """`w_t = exp(log p(a_t) − log μ(a_t))`, differentiable through the learner term."""
  log_probs, behaviour_log_probs = _checks.same_shape(
      log_probs=log_probs, behaviour_log_probs=behaviour_log_probs
  )
  return jnp.exp(_checks.as_float(log_probs) - _checks.as_float(sg(behaviour_log_probs)))


def importance_weighted_pg_loss(
    log_probs,
    behaviour_log_probs,
    advantages,
    *,
    correction: Literal["plain", "truncated", "ppo_clip"] = "ppo_clip",
    truncation: float = 2.0,
    clip_epsilon: float = 0.2,
    clip_epsilon_high: float | None = None,
) -> jax.Array:
  """Policy-gradient loss for tokens sampled by a behaviour policy μ ≠ p (docs/theory.md §5).

  With `w = exp(log p − sg(log μ))` and `A = sg(advantages)`:
    * "plain":     `L = −A·w`; gradient `−A·w·∇log p` (unbiased, unbounded variance).
    * "truncated": `L = −A·sg(min(w, C))·log p`; gradient `−A·min(w, C)·∇log p`
      (truncated importance sampling, C = `truncation`).
    * "ppo_clip":  `L = −min(w·A, clip(w, 1−ε_low, 1+ε_high)·A)` (PPO; ε_high defaults to
      ε_low = `clip_epsilon`, a larger one is DAPO's "clip-higher").

  Args:
    log_probs: `[...]` learner log-probs of the sampled tokens (differentiated).
    behaviour_log_probs: `[...]` log-probs under the sampling policy (stop-gradiented).
    advantages: `[...]` advantages, higher is better.
    correction: which variant.
    truncation: `C ≥ 1` for "truncated".
    clip_epsilon: `ε_low ∈ (0, 1)` for "ppo_clip".
    clip_epsilon_high: `ε_high > 0`; None means `clip_epsilon`.

  Returns:
    `[...]` float32 per-token loss.

  References:
    Schulman et al., PPO, arXiv:1707.06347; docs/theory.md §5.
  """
  log_probs, behaviour_log_probs, advantages = _checks.same_shape(
      log_probs=log_probs, behaviour_log_probs=behaviour_log_probs, advantages=advantages
  )
  advantages = _checks.as_float(sg(advantages))
  ratio = importance_ratio(log_probs, behaviour_log_probs)
  if correction == "plain":
    return -advantages * ratio
  if correction == "truncated":
    truncation = _checks.static_float("truncation", truncation)
    if truncation < 1.0:
      raise ValueError(f"truncation must be >= 1, got {truncation}")
    return -advantages * sg(jnp.minimum(ratio, truncation)) * _checks.as_float(log_probs)
  if correction == "ppo_clip":
    low = _checks.static_float("clip_epsilon", clip_epsilon)
    if not 0.0 < low < 1.0:
      raise ValueError(f"clip_epsilon must be in (0, 1), got {low}")
    high = (
        low
        if clip_epsilon_high is None
        else _checks.positive("clip_epsilon_high", clip_epsilon_high)
    )
    clipped = jnp.clip(ratio, 1.0 - low, 1.0 + high)
    return -jnp.minimum(ratio * advantages, clipped * advantages)
  raise ValueError(
      f"correction must be one of 'plain', 'truncated', 'ppo_clip', got {correction!r}"
  )
