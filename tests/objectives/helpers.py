"""Shared fixtures for the objectives tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from opdjax import objectives as obj

# docs/theory.md's worked example.
P_EXAMPLE = np.array([0.2, 0.3, 0.5])
Q_EXAMPLE = np.array([0.7, 0.2, 0.1])

# Every divergence, with representative hyperparameters, as f(student_logits, teacher_logits).
DIVERGENCE_CASES = {
    "forward_kl": obj.forward_kl,
    "reverse_kl": obj.reverse_kl,
    "jsd_0.5": functools.partial(obj.generalized_jsd, beta=0.5),
    "jsd_0.1": functools.partial(obj.generalized_jsd, beta=0.1),
    "jsd_0.9_scaled": functools.partial(obj.generalized_jsd, beta=0.9, scaled=True),
    "alpha_-1": functools.partial(obj.alpha_divergence, alpha=-1.0),
    "alpha_0.3": functools.partial(obj.alpha_divergence, alpha=0.3),
    "alpha_0.5": functools.partial(obj.alpha_divergence, alpha=0.5),
    "alpha_0.8": functools.partial(obj.alpha_divergence, alpha=0.8),
    "alpha_2": functools.partial(obj.alpha_divergence, alpha=2.0),
    "skew_forward_0.1": functools.partial(obj.skew_forward_kl, alpha=0.1),
    "skew_reverse_0.1": functools.partial(obj.skew_reverse_kl, alpha=0.1),
    "skew_reverse_0.5": functools.partial(obj.skew_reverse_kl, alpha=0.5),
    "total_variation": obj.total_variation,
}


def random_logits(seed: int, shape, scale: float = 2.0, dtype=jnp.float32):
  return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def np_kl(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sum(np.where(a > 0, a * (np.log(np.where(a > 0, a, 1)) - np.log(b)), 0)))


def softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)
