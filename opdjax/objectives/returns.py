"""Rewards, returns and advantages for sampled-token training (docs/theory.md §3–§5).

Everything here is a *signal*, not a loss: outputs are stop-gradiented, higher is better,
and they are turned into a loss by `policy_gradient_loss` or
`importance_weighted_pg_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opdjax.objectives import _checks

sg = jax.lax.stop_gradient


def _sequence_pair(name: str, values, mask):
  values = _checks.rank(name, values, 2)
  mask = _checks.rank("mask", mask, 2)
  if values.shape != mask.shape:
    raise ValueError(f"{name} {values.shape} and mask {mask.shape} must have the same [B, T] shape")
  return _checks.as_float(values), mask


def reward_to_go(rewards, mask, *, gamma: float) -> jax.Array:
  """Masked discounted reward-to-go `G_t = Σ_{u=t}^{T−1} γ^{u−t} m_u ρ_u` per sequence.

  Computed by a reverse `lax.scan` over time: `G_t = m_t ρ_t + γ G_{t+1}`. Masked
  positions carry no reward but still count as a time step, so they do not break the
  chain inside a sequence; rows never exchange anything. γ = 0 is the per-token
  ("immediate") estimator, γ = 1 the unbiased sequence-level one.

  Args:
    rewards: `[B, T]` per-token rewards ρ.
    mask: `[B, T]` loss mask (bool or 0/1).
    gamma: discount in [0, 1].

  Returns:
    `[B, T]` float32 returns, stop-gradiented, 0 at masked positions.

  References:
    docs/theory.md §3.

  Examples:
    >>> import jax.numpy as jnp
    >>> rewards, mask = jnp.array([[1.0, 2.0, 4.0]]), jnp.array([[True, True, True]])
    >>> print(reward_to_go(rewards, mask, gamma=0.5))
    [[3. 4. 4.]]
  """
  gamma = _checks.in_range("gamma", gamma, 0.0, 1.0)
  rewards, mask = _sequence_pair("rewards", rewards, mask)
  live = mask > 0
  rewards = sg(jnp.where(live, rewards, 0.0))

  def step(future, reward_t):
    current = reward_t + gamma * future
    return current, current

  _, returns = jax.lax.scan(
      step, jnp.zeros(rewards.shape[:1], rewards.dtype), rewards.T, reverse=True
  )
  return jnp.where(live, returns.T, 0.0)


def opd_rewards(student_log_probs, teacher_log_probs) -> jax.Array:
  """Plain OPD per-token reward `ρ_t = log q(a_t) − log p(a_t) = −c_t` (stop-gradiented).

  References:
    Agarwal et al., GKD, arXiv:2306.13649; docs/theory.md §2.
  """
  student_log_probs, teacher_log_probs = _checks.same_shape(
      student_log_probs=student_log_probs, teacher_log_probs=teacher_log_probs
  )
  return sg(_checks.as_float(teacher_log_probs) - _checks.as_float(student_log_probs))


def gopd_rewards(
    student_log_probs, teacher_log_probs, reference_log_probs, *, reward_scale: float = 1.0
) -> jax.Array:
  """G-OPD / ExOPD per-token reward (Generalized OPD with reward extrapolation, 2026).

  `ρ_t = λ (log q(a_t) − log r(a_t)) − (log p(a_t) − log r(a_t))`, whose optimum is
  `π ∝ π_T^λ π_ref^(1−λ)`. λ = 1 is plain OPD whatever the reference; 0 < λ < 1
  interpolates reference → teacher; λ > 1 extrapolates past the teacher (ExOPD, 1.25).

  Args:
    student_log_probs, teacher_log_probs, reference_log_probs: `[...]` log-probs of the
      sampled tokens under p, q and the reference r.
    reward_scale: λ ≥ 0.

  Returns:
    `[...]` float32 rewards, stop-gradiented.

  References:
    *Learning beyond Teacher: Generalized On-Policy Distillation with Reward
    Extrapolation*, arXiv:2602.12125; docs/theory.md §4.
  """
  lam = _checks.static_float("reward_scale", reward_scale)
  if lam < 0:
    raise ValueError(f"reward_scale (λ) must be >= 0, got {lam}")
  p, q, r = (
      _checks.as_float(x)
      for x in _checks.same_shape(
          student_log_probs=student_log_probs,
          teacher_log_probs=teacher_log_probs,
          reference_log_probs=reference_log_probs,
      )
  )
  if lam == 1.0:  # exactly OPD, even where the reference assigns zero probability
    return sg(q - p)
  return sg(lam * (q - r) - (p - r))


def grpo_advantages(rewards, *, normalize_std: bool = True, epsilon: float = 1e-6) -> jax.Array:
  """GRPO group-relative outcome advantages `Â_i = (R_i − mean_j R_j) / (std_j R_j + ε)`.

  Args:
    rewards: `[..., G]` scalar rewards of G samples of the same prompt (last axis).
    normalize_std: divide by the group's (population) standard deviation; False gives
      Dr. GRPO's mean-centred advantages.
    epsilon: added to the std; > 0.

  Returns:
    `[..., G]` float32 advantages (stop-gradiented). A group with equal rewards gets 0.

  References:
    Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300; Liu et al., Dr. GRPO,
    arXiv:2503.20783; docs/theory.md §5.
  """
  epsilon = _checks.positive("epsilon", epsilon)
  rewards = _checks.as_float(jnp.asarray(rewards))
  if rewards.ndim < 1 or rewards.shape[-1] < 1:
    raise ValueError(f"rewards must be [..., G] with G >= 1, got shape {rewards.shape}")
  centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
  if normalize_std:
    centred = centred / (jnp.std(rewards, axis=-1, keepdims=True) + epsilon)
  return sg(centred)


def mix_opd_rl_advantages(
    opd_advantages, sequence_advantages, mask, *, rl_weight: float
) -> jax.Array:
  """OPD + RL: `A_t = A_t^OPD + w_rl · Â_i`, the outcome advantage broadcast over tokens.

  Args:
    opd_advantages: `[B, T]` per-token OPD advantages (e.g. `reward_to_go(opd_rewards)`).
    sequence_advantages: `[B]` per-sample outcome advantages (e.g. `grpo_advantages`,
      flattened).
    mask: `[B, T]` loss mask; masked positions get 0.
    rl_weight: `w_rl ≥ 0`.

  Returns:
    `[B, T]` float32 advantages, stop-gradiented.

  References:
    docs/theory.md §5.
  """
  rl_weight = _checks.static_float("rl_weight", rl_weight)
  if rl_weight < 0:
    raise ValueError(f"rl_weight must be >= 0, got {rl_weight}")
  opd_advantages, mask = _sequence_pair("opd_advantages", opd_advantages, mask)
  sequence_advantages = _checks.rank("sequence_advantages", sequence_advantages, 1)
  if sequence_advantages.shape[0] != opd_advantages.shape[0]:
    raise ValueError(
        f"sequence_advantages has {sequence_advantages.shape[0]} rows, opd_advantages has "
        f"{opd_advantages.shape[0]}"
    )
  mixed = opd_advantages + rl_weight * _checks.as_float(sequence_advantages)[:, None]
  return sg(jnp.where(mask > 0, mixed, 0.0))
