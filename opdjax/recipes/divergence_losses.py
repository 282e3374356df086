"""Full-vocabulary and top-K divergence losses shared by supervised KD, GKD and OPD."""

from __future__ import annotations

from opdjax import objectives as obj
from opdjax.recipes.base import distribution_metrics, pair


def divergence_from_config(config):
  """The §1 divergence named by `config.divergence` with `config.divergence_kwargs`."""
  kwargs = dict(config.get("divergence_kwargs", {}) or {})
  return obj.get_divergence(config.divergence, **kwargs)


def divergence_loss(config):
  """Per-token divergence to the teacher on completion tokens (top-K if `config.top_k`)."""
  divergence = divergence_from_config(config)
  top_k = int(config.get("top_k", 0) or 0)
  tail_bucket = bool(config.get("tail_bucket", False))

  def loss(student_logits, teacher_logits, targets):
    if top_k:
      values = obj.topk_divergence(divergence, student_logits, teacher_logits, k=top_k,
                                   tail_bucket=tail_bucket)
    else:
      values = divergence(student_logits, teacher_logits)
    metrics = distribution_metrics(student_logits, teacher_logits, targets.mask)
    metrics["divergence"] = pair(values, targets.mask)
    if top_k:
      diag = obj.support_diagnostics(student_logits, teacher_logits, k=top_k)
      metrics["topk_teacher_mass"] = pair(diag.teacher_mass, targets.mask)
      metrics["topk_student_mass"] = pair(diag.student_mass, targets.mask)
      metrics["topk_overlap"] = pair(diag.overlap, targets.mask)
    return obj.token_mean(values, targets.mask), metrics

  return loss
