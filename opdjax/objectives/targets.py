"""Full-vocabulary targets built from several models (docs/theory.md §4, §8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opdjax.objectives import _checks


def tilted_teacher_logits(
    teacher_logits, reference_logits, *, reward_scale: float, temperature: float = 1.0
) -> jax.Array:
  """G-OPD's optimum as a distribution: `log q̃ = log_softmax(λ log q + (1−λ) log r)`.

  Any §1 divergence between the student and this target is the full-vocabulary analogue
  of `gopd_rewards`. λ = 1 returns exactly the teacher's log-probs (any reference), λ = 0
  the reference's. For other λ a token that either model rules out (`-inf`) stays ruled
  out, so `λ > 1` never turns `(1−λ)·(−inf)` into `+inf`.

  Args:
    teacher_logits: `[..., V]` (stop-gradiented).
    reference_logits: `[..., V]` (stop-gradiented).
    reward_scale: λ ≥ 0.
    temperature: divides both logits before the softmax.

  Returns:
    `[..., V]` float32 normalised log-probabilities, usable as `teacher_logits`.

  References:
    arXiv:2602.12125 (G-OPD); docs/theory.md §4.
  """
  lam = _checks.static_float("reward_scale", reward_scale)
  if lam < 0:
    raise ValueError(f"reward_scale (λ) must be >= 0, got {lam}")
  temperature = _checks.positive("temperature", temperature)
  teacher_logits, reference_logits = _checks.logits_pair(
      teacher_logits, reference_logits, teacher_name="reference_logits"
  )
  log_q = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  log_r = jax.nn.log_softmax(jax.lax.stop_gradient(reference_logits) / temperature, axis=-1)
  if lam == 1.0:
    return log_q
  if lam == 0.0:
    return log_r
  both = jnp.isfinite(log_q) & jnp.isfinite(log_r)
  tilted = lam * jnp.where(both, log_q, 0.0) + (1.0 - lam) * jnp.where(both, log_r, 0.0)
  return jax.nn.log_softmax(jnp.where(both, tilted, -jnp.inf), axis=-1)
