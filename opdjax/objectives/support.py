"""Support restriction: divergences on a top-K subset of the vocabulary (docs/theory.md §6).

`restrict_to_topk` gathers the student's and teacher's log-probabilities on a support `S`
of K token ids per position (the teacher's or the student's top K, optionally with the
sampled token added) and returns them as logits over `K` (or `K+1`) categories. Any §1
divergence applied to those logits is the divergence between the two distributions
*renormalised on S* (a softmax over restricted logits renormalises; without
renormalisation training collapses). With `tail_bucket=True` one more category holds the
remaining mass `1 − Σ_S`, so nothing is renormalised away. Tokens outside S get no gradient.

Temperature is applied before restriction: pass `temperature` here and leave the
divergence's own temperature at 1 (a tail bucket's mass is not a logit that can be
rescaled afterwards).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from opdjax.objectives import _checks


class RestrictedLogits(NamedTuple):
  """Student and teacher logits on a per-position support (softmax = renormalised on S).

  Attributes:
    student: `[..., C]` student logits on the support (C = K, K+1 with the sampled token,
      plus 1 with a tail bucket, in which case they are normalised log-probs); `-inf`
      marks an unused slot.
    teacher: `[..., C]` teacher logits on the same categories (stop-gradiented).
    token_ids: `[..., K or K+1]` vocabulary ids of the support (without the tail bucket).
  """

  student: jax.Array
  teacher: jax.Array
  token_ids: jax.Array


def _log1mexp(x: jax.Array) -> jax.Array:
  """`log(1 − e^x)` for `x ≤ 0`, stable at both ends (Mächler 2012); `-inf` at x = 0."""
  x = jnp.minimum(x, 0.0)
  safe = jnp.where(x < 0, x, -1.0)
  value = jnp.where(safe > -0.693, jnp.log(-jnp.expm1(safe)), jnp.log1p(-jnp.exp(safe)))
  return jnp.where(x < 0, value, -jnp.inf)


def _check_topk(k, vocab: int, source: str) -> None:
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
    raise ValueError(f"k must be an integer in [1, V={vocab}], got {k!r}")
  if source not in ("teacher", "student"):
    raise ValueError(f"source must be 'teacher' or 'student', got {source!r}")


def restrict_to_topk(
    student_logits,
    teacher_logits,
    *,
    k: int,
    source: Literal["teacher", "student"] = "teacher",
    sampled_tokens=None,
    tail_bucket: bool = False,
    temperature: float = 1.0,
) -> RestrictedLogits:
  """Restricts both distributions to the top-K tokens of `source` (optionally ∪ sampled token).

  Args:
    student_logits: `[..., V]` (differentiated).
    teacher_logits: `[..., V]` (stop-gradiented).
    k: support size, `1 ≤ k ≤ V`.
    source: whose top K defines the support: "teacher" (the usual choice) or "student".
    sampled_tokens: optional `[...]` int ids; the support becomes `TopK ∪ {a_t}` (an extra
      slot, set to `-inf` in both distributions where `a_t` is already in the top K).
    tail_bucket: append the remaining mass `1 − Σ_S` as one more category.
    temperature: divides both logits before the softmax.

  Returns:
    `RestrictedLogits`; feed `.student` and `.teacher` to any divergence.

  References:
    docs/theory.md §6.
  """
  temperature = _checks.positive("temperature", temperature)
  student_logits, teacher_logits = _checks.logits_pair(student_logits, teacher_logits)
  vocab = student_logits.shape[-1]
  _check_topk(k, vocab, source)
  student_scaled = student_logits / temperature
  teacher_scaled = jax.lax.stop_gradient(teacher_logits) / temperature
  if tail_bucket:  # the tail's mass needs the full normaliser
    student_scaled = jax.nn.log_softmax(student_scaled, axis=-1)
    teacher_scaled = jax.nn.log_softmax(teacher_scaled, axis=-1)
  # Otherwise gather raw logits: the divergence's softmax renormalises on S exactly, and
  # no gradient (not even rounding residue) reaches tokens outside S.

  ranking = teacher_scaled if source == "teacher" else jax.lax.stop_gradient(student_scaled)
  _, token_ids = jax.lax.top_k(ranking, k)
  duplicate = None
  if sampled_tokens is not None:
    sampled_tokens = jnp.asarray(sampled_tokens)
    if sampled_tokens.shape != student_logits.shape[:-1]:
      raise ValueError(
          f"sampled_tokens has shape {sampled_tokens.shape}, expected the logits' leading "
          f"shape {student_logits.shape[:-1]}"
      )
    sampled_tokens = sampled_tokens.astype(token_ids.dtype)[..., None]
    duplicate = jnp.any(token_ids == sampled_tokens, axis=-1, keepdims=True)
    token_ids = jnp.concatenate([token_ids, sampled_tokens], axis=-1)

  student = jnp.take_along_axis(student_scaled, token_ids, axis=-1)
  teacher = jnp.take_along_axis(teacher_scaled, token_ids, axis=-1)
  if duplicate is not None:
    # The sampled token is already in the top K: blank the extra slot so it is not counted twice.
    blank = jnp.concatenate([jnp.zeros_like(duplicate).repeat(k, axis=-1), duplicate], axis=-1)
    student = jnp.where(blank, -jnp.inf, student)
    teacher = jnp.where(blank, -jnp.inf, teacher)
  if tail_bucket:
    student = jnp.concatenate(
        [student, _log1mexp(jax.nn.logsumexp(student, axis=-1, keepdims=True))], axis=-1
    )
    teacher = jnp.concatenate(
        [teacher, _log1mexp(jax.nn.logsumexp(teacher, axis=-1, keepdims=True))], axis=-1
    )
  return RestrictedLogits(student=student, teacher=teacher, token_ids=token_ids)


def topk_divergence(
    divergence,
    student_logits,
    teacher_logits,
    *,
    k: int,
    source: Literal["teacher", "student"] = "teacher",
    sampled_tokens=None,
    tail_bucket: bool = False,
    temperature: float = 1.0,
) -> jax.Array:
  """`divergence` between student and teacher renormalised on a top-K support.

  Args:
    divergence: any §1 divergence, hyperparameters bound (e.g. `functools.partial`).
    student_logits, teacher_logits: `[..., V]`.
    k, source, sampled_tokens, tail_bucket, temperature: see `restrict_to_topk`.

  Returns:
    `[...]` float32 divergence per position.

  References:
    docs/theory.md §6.
  """
  restricted = restrict_to_topk(
      student_logits,
      teacher_logits,
      k=k,
      source=source,
      sampled_tokens=sampled_tokens,
      tail_bucket=tail_bucket,
      temperature=temperature,
  )
  return divergence(restricted.student, restricted.teacher)


class SupportDiagnostics(NamedTuple):
  """Per-position diagnostics of a top-K support, each `[...]` float32.

  Attributes:
    teacher_mass: `Σ_{v∈S} q_v`, the teacher probability the support keeps.
    student_mass: `Σ_{v∈S} p_v`.
    overlap: `|TopK(q) ∩ TopK(p)| / K`.
  """

  teacher_mass: jax.Array
  student_mass: jax.Array
  overlap: jax.Array


def support_diagnostics(
    student_logits,
    teacher_logits,
    *,
    k: int,
    source: Literal["teacher", "student"] = "teacher",
    temperature: float = 1.0,
) -> SupportDiagnostics:
  """Masses on the `source` top-K support and the overlap of the two top-K sets."""
  temperature = _checks.positive("temperature", temperature)
  student_logits, teacher_logits = _checks.logits_pair(
      jax.lax.stop_gradient(student_logits), jax.lax.stop_gradient(teacher_logits)
  )
  vocab = student_logits.shape[-1]
  _check_topk(k, vocab, source)
  log_p = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  _, student_top = jax.lax.top_k(log_p, k)
  _, teacher_top = jax.lax.top_k(log_q, k)
  support = teacher_top if source == "teacher" else student_top
  mass = lambda log_probs: jnp.sum(jnp.exp(jnp.take_along_axis(log_probs, support, -1)), -1)
  shared = jnp.any(teacher_top[..., :, None] == student_top[..., None, :], axis=-1)
  return SupportDiagnostics(
      teacher_mass=mass(log_q),
      student_mass=mass(log_p),
      overlap=jnp.mean(shared.astype(log_p.dtype), axis=-1),
  )
