"""Full-vocabulary and top-K divergence losses shared by supervised KD, GKD and OPD."""

from __future__ import annotations

from opdjax import objectives as obj
from opdjax.errors import ConfigError
from opdjax.recipes.base import METRIC_VALUES, distribution_values, metric_pairs, pair

TOPK_METRICS = ("topk_teacher_mass", "topk_student_mass", "topk_overlap")


def divergence_from_config(config):
  """The §1 divergence named by `config.divergence` with `config.divergence_kwargs`."""
  kwargs = dict(config.get("divergence_kwargs", {}) or {})
  try:
    return obj.get_divergence(config.divergence, **kwargs)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"recipe.divergence / recipe.divergence_kwargs: {e}") from None


def divergence_token_values(config):
  """Per token: the divergence to the teacher (top-K if `config.top_k`) and the metrics."""
  divergence = divergence_from_config(config)
  top_k = int(config.get("top_k", 0) or 0)
  tail_bucket = bool(config.get("tail_bucket", False))

  def token_values(student_logits, teacher_logits, tokens):
    del tokens
    values = distribution_values(student_logits, teacher_logits)
    if top_k:
      values["divergence"] = obj.topk_divergence(
          divergence, student_logits, teacher_logits, k=top_k, tail_bucket=tail_bucket
      )
      diag = obj.support_diagnostics(student_logits, teacher_logits, k=top_k)
      values.update(
          topk_teacher_mass=diag.teacher_mass,
          topk_student_mass=diag.student_mass,
          topk_overlap=diag.overlap,
      )
    else:
      values["divergence"] = divergence(student_logits, teacher_logits)
    return values

  return token_values


def divergence_loss(values, targets):
  """The per-token divergence is the loss; everything else is logged."""
  metrics = metric_pairs(values, targets.mask, names=METRIC_VALUES + TOPK_METRICS)
  metrics["divergence"] = pair(values["divergence"], targets.mask)
  return values["divergence"], metrics
