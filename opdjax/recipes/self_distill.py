"""On-policy self-distillation (OPSD / SDFT / SDPO; docs/theory.md §8).

The teacher is the student's own weights seeing privileged context `c` (by default the
reference answer): `q(·|s_t) = π_θ'(·| x ⊕ c, y_<t)`, scored on the student's completion `y`,
which was sampled from `π_θ(·|x)` without `c`. `recipe.privileged` is the template that
builds the teacher's prompt from `{prompt}` and `{answer}`. The teacher's weights `θ'`
(`recipe.teacher_mode`):

  * "frozen":       the student's initial weights;
  * "current":      `sg(θ)`, the weights that sampled the rollout;
  * "ema":          `θ' ← θ' + r·(θ − θ')` after every update (`recipe.ema_rate` = r; r = 0 is
                    frozen, r = 1 current; SDPO uses 0.05), kept in the checkpoint;
  * "trust_region": logits `(1−α)·log q_frozen + α·log q_current`, renormalised
                    (`recipe.trust_region_alpha` = α), from two forward passes.

The loss is a full-vocabulary divergence to the teacher (JSD(β = 0.5) or reverse KL are
the usual choices). Besides the loss, the trainer logs `teacher_drift_kl`: the token KL
between the teacher-mode weights' and the current weights' outputs on the privileged
sequence (0 for "current").

References:
  Zhao et al., On-Policy Self-Distillation (2025); Shenfeld et al., Self-Distillation
  Fine-Tuning (SDFT, 2025); Hübotter et al., Self-Distilled Policy Optimization (SDPO, 2025).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opdjax.errors import ConfigError
from opdjax.recipes.base import Recipe, SelfTeacher, distribution_values
from opdjax.recipes.divergence_losses import (
    divergence_from_config,
    divergence_loss,
    divergence_token_values,
)

TEACHER_MODES = ("frozen", "current", "ema", "trust_region")
# Which weights the trainer forms for each frozen role, by mode ("initial": a copy of the
# student's initial weights; "current": the parameters that sampled the rollout).
ROLE_WEIGHTS = {
    "frozen": (("teacher", "initial"),),
    "current": (("teacher", "current"),),
    "ema": (("teacher", "ema"),),
    "trust_region": (("teacher", "current"), ("reference", "initial")),
}


def trust_region_logits(
    frozen_logits: jax.Array, current_logits: jax.Array, *, alpha: float
) -> jax.Array:
  """`log_softmax((1−α)·log q_frozen + α·log q_current)` in float32 (a geometric mix of
  the two teachers, renormalised).

  >>> import numpy as np
  >>> mixed = trust_region_logits(jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.9, 0.1])),
  ...                             alpha=0.0)
  >>> np.round(np.exp(mixed), 3).tolist()
  [0.5, 0.5]
  """
  mix = (1.0 - alpha) * jax.nn.log_softmax(
      frozen_logits.astype(jnp.float32), axis=-1
  ) + alpha * jax.nn.log_softmax(current_logits.astype(jnp.float32), axis=-1)
  return jax.nn.log_softmax(mix, axis=-1)


def ema_update(ema, params, *, rate: float):
  """`θ' + rate·(θ − θ')` leaf by leaf (in the EMA's dtype)."""
  return jax.tree.map(
      lambda e, p: (e + rate * (p.astype(e.dtype) - e)).astype(e.dtype), ema, params
  )


def build(config) -> Recipe:
  mode = config.teacher_mode
  if mode not in TEACHER_MODES:
    raise ConfigError(f"recipe.teacher_mode must be one of {TEACHER_MODES}, got {mode!r}")
  template = config.privileged
  if "{prompt}" not in template:
    raise ConfigError(
        f"recipe.privileged must contain {{prompt}} (and usually {{answer}}), " f"got {template!r}"
    )
  try:  # any other field, or a lone brace, would fail when the first batch is read
    template.format(prompt="", answer="")
  except (KeyError, IndexError, ValueError) as e:
    raise ConfigError(
        f"recipe.privileged may use only {{prompt}} and {{answer}} (a literal brace is "
        f"doubled), got {template!r}: {type(e).__name__} {e}"
    ) from None
  rate = float(config.ema_rate) if mode == "ema" else 0.0  # each mode reads its own setting
  if mode == "ema" and not 0.0 < rate <= 1.0:
    raise ConfigError(f"recipe.ema_rate must be in (0, 1], got {rate}")
  alpha = float(config.trust_region_alpha) if mode == "trust_region" else 0.0
  if mode == "trust_region" and not 0.0 <= alpha <= 1.0:
    raise ConfigError(f"recipe.trust_region_alpha must be in [0, 1], got {alpha}")
  if mode != "trust_region":
    token_values = divergence_token_values(config)
    roles = ("teacher",)
  else:
    divergence = divergence_from_config(config)
    roles = ("teacher", "reference")

    def token_values(student_logits, frozen_logits, tokens):
      del tokens
      teacher = trust_region_logits(
          frozen_logits["reference"], frozen_logits["teacher"], alpha=alpha
      )
      return dict(
          distribution_values(student_logits, teacher),
          divergence=divergence(student_logits, teacher),
      )

  return Recipe(
      name="self_distill",
      source="student",
      roles=roles,
      token_values=token_values,
      loss=divergence_loss,
      loss_value="divergence",
      self_teacher=SelfTeacher(ROLE_WEIGHTS[mode], template, rate),
  )
