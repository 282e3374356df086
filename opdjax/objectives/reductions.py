"""Mask-aware reductions of per-token values `[B, T]` to scalars.

Masked positions are *selected out* (`where`), not multiplied by 0, so a NaN or inf
there never leaks into the result or its gradient. An all-masked input reduces to 0.
Masks may be bool or non-negative float weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opdjax.objectives import _checks


def _weights(values, mask):
  values, mask = _checks.same_shape(values=values, mask=mask)
  mask = _checks.as_float(mask)
  live = mask > 0
  return jnp.where(live, _checks.as_float(values), 0.0) * jnp.where(live, mask, 0.0), mask


def masked_sum(values, mask) -> jax.Array:
  """`Σ_{b,t} m_{bt} x_{bt}`: the plain sum over unmasked entries (any shape)."""
  weighted, _ = _weights(values, mask)
  return jnp.sum(weighted)


def token_mean(values, mask) -> jax.Array:
  """`Σ m x / Σ m`: every unmasked token weighs the same (any shape); 0 if all masked."""
  weighted, mask = _weights(values, mask)
  total = jnp.sum(mask)
  return jnp.sum(weighted) / jnp.where(total > 0, total, 1.0)


def sequence_mean(values, mask) -> jax.Array:
  """Mean over sequences of each sequence's token mean; rows with no tokens are skipped.

  Args:
    values: `[B, T]`.
    mask: `[B, T]`.

  Returns:
    Scalar float32; 0 if every row is masked.
  """
  values = _checks.rank("values", values, 2)
  weighted, mask = _weights(values, mask)
  counts = jnp.sum(mask, axis=-1)
  has_tokens = counts > 0
  per_row = jnp.sum(weighted, axis=-1) / jnp.where(has_tokens, counts, 1.0)
  rows = jnp.sum(has_tokens)
  return jnp.sum(jnp.where(has_tokens, per_row, 0.0)) / jnp.maximum(rows, 1)
