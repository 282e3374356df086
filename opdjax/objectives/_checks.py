"""Input validation shared by the objectives (private).

Checks run on static shapes and Python-number hyperparameters, so they cost nothing
under `jax.jit`: they fire at trace time with a message naming the bad value.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp


def static_float(name: str, value) -> float:
  """Returns `value` as a Python float; hyperparameters must be static numbers."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} must be a static Python number, got a traced value; pass it through "
        "functools.partial or jax.jit(static_argnames=...) instead of as a traced array."
    )
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    try:
      value = float(value)
    except (TypeError, ValueError):
      raise TypeError(f"{name} must be a real number, got {value!r}") from None
  value = float(value)
  if math.isnan(value):
    raise ValueError(f"{name} must not be NaN")
  return value


def in_range(name: str, value, low: float, high: float) -> float:
  """`value` as a float, or ValueError if it is outside the closed interval [low, high]."""
  value = static_float(name, value)
  if not low <= value <= high:
    raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
  return value


def positive(name: str, value) -> float:
  value = static_float(name, value)
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")
  return value


def logits_pair(student_logits, teacher_logits, teacher_name: str = "teacher_logits"):
  """Validates two `[..., V]` logit arrays of the same shape; returns them as float32."""
  student_logits = jnp.asarray(student_logits)
  teacher_logits = jnp.asarray(teacher_logits)
  for name, x in (("student_logits", student_logits), (teacher_name, teacher_logits)):
    if x.ndim < 1:
      raise ValueError(f"{name} must have a vocabulary axis [..., V], got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
  if student_logits.shape[-1] != teacher_logits.shape[-1]:
    raise ValueError(
        f"vocabulary sizes differ: student_logits has V={student_logits.shape[-1]}, "
        f"{teacher_name} has V={teacher_logits.shape[-1]} (shapes {student_logits.shape} "
        f"and {teacher_logits.shape})"
    )
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"student_logits {student_logits.shape} and {teacher_name} "
        f"{teacher_logits.shape} must have the same shape"
    )
  return as_float(student_logits), as_float(teacher_logits)


def as_float(x) -> jax.Array:
  """`x` in its float compute dtype: at least float32 (bf16/f16 are promoted, f64 kept)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def same_shape(**arrays):
  """Validates that all named arrays share one shape; returns them as jnp arrays."""
  items = [(name, jnp.asarray(x)) for name, x in arrays.items()]
  first_name, first = items[0]
  for name, x in items[1:]:
    if x.shape != first.shape:
      raise ValueError(
          f"{name} has shape {x.shape} but {first_name} has shape {first.shape}; " "they must match"
      )
  return [x for _, x in items]


def rank(name: str, x, expected: int):
  x = jnp.asarray(x)
  if x.ndim != expected:
    raise ValueError(f"{name} must have rank {expected}, got shape {x.shape}")
  return x
