"""§6 top-K supports and the mask-aware reductions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from opdjax import objectives as obj
from tests.objectives.helpers import DIVERGENCE_CASES, random_logits, softmax64

# ---------------------------------------------------------------- top-K support


def test_full_support_equals_full_divergence():
  z, y = random_logits(0, (3, 8)), random_logits(1, (3, 8))
  for name, fn in DIVERGENCE_CASES.items():
    for source in ("teacher", "student"):
      np.testing.assert_allclose(
          obj.topk_divergence(fn, z, y, k=8, source=source),
          fn(z, y),
          rtol=1e-5,
          atol=1e-6,
          err_msg=name,
      )


def test_renormalised_on_teacher_topk():
  z, y = random_logits(2, (9,)), random_logits(3, (9,))
  restricted = obj.restrict_to_topk(z, y, k=3)
  support = np.argsort(-np.asarray(y))[:3]
  np.testing.assert_array_equal(np.sort(restricted.token_ids), np.sort(support))
  p, q = softmax64(z), softmax64(y)
  ids = np.asarray(restricted.token_ids)
  np.testing.assert_allclose(jax.nn.softmax(restricted.student), p[ids] / p[ids].sum(), rtol=1e-5)
  np.testing.assert_allclose(jax.nn.softmax(restricted.teacher), q[ids] / q[ids].sum(), rtol=1e-5)
  p_s, q_s = p[ids] / p[ids].sum(), q[ids] / q[ids].sum()
  np.testing.assert_allclose(
      obj.topk_divergence(obj.reverse_kl, z, y, k=3), np.sum(p_s * np.log(p_s / q_s)), rtol=1e-5
  )


def test_student_topk_support():
  z, y = random_logits(4, (2, 9)), random_logits(5, (2, 9))
  restricted = obj.restrict_to_topk(z, y, k=4, source="student")
  np.testing.assert_array_equal(
      np.sort(restricted.token_ids, -1), np.sort(np.argsort(-np.asarray(z), -1)[:, :4], -1)
  )


def test_no_gradient_outside_the_support():
  z, y = random_logits(6, (9,)), random_logits(7, (9,))
  grad = jax.grad(lambda z: obj.topk_divergence(obj.reverse_kl, z, y, k=3))(z)
  outside = np.setdiff1d(np.arange(9), np.argsort(-np.asarray(y))[:3])
  np.testing.assert_array_equal(grad[outside], 0.0)
  assert np.all(grad[np.argsort(-np.asarray(y))[:3]] != 0)


def test_tail_bucket_is_a_coarse_graining():
  z, y = random_logits(8, (5, 12)), random_logits(9, (5, 12))
  restricted = obj.restrict_to_topk(z, y, k=4, tail_bucket=True)
  assert restricted.student.shape == (5, 5)
  np.testing.assert_allclose(jnp.sum(jnp.exp(restricted.student), -1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(jnp.exp(restricted.teacher), -1), 1.0, rtol=1e-5)
  # Merging categories never increases an f-divergence (data processing inequality).
  for name, fn in DIVERGENCE_CASES.items():
    coarse = obj.topk_divergence(fn, z, y, k=4, tail_bucket=True)
    assert np.all(coarse <= fn(z, y) + 1e-5), name
  # With k = V the tail is empty and the result is the full divergence.
  np.testing.assert_allclose(
      obj.topk_divergence(obj.reverse_kl, z, y, k=12, tail_bucket=True),
      obj.reverse_kl(z, y),
      rtol=1e-5,
  )


def test_union_with_sampled_token():
  z, y = random_logits(10, (2, 9)), random_logits(11, (2, 9))
  top = np.argsort(-np.asarray(y), -1)[:, :3]
  inside = jnp.array([top[0, 1], top[1, 0]])
  outside = jnp.array(
      [np.setdiff1d(np.arange(9), top[0])[0], np.setdiff1d(np.arange(9), top[1])[2]]
  )
  # A sampled token already in the top K adds nothing.
  np.testing.assert_allclose(
      obj.topk_divergence(obj.reverse_kl, z, y, k=3, sampled_tokens=inside),
      obj.topk_divergence(obj.reverse_kl, z, y, k=3),
      rtol=1e-6,
  )
  # One outside the top K joins the support.
  union = obj.restrict_to_topk(z, y, k=3, sampled_tokens=outside)
  assert union.student.shape == (2, 4)
  p = softmax64(z)
  for row in range(2):
    ids = np.append(top[row], int(outside[row]))
    np.testing.assert_allclose(
        jax.nn.softmax(union.student[row]), p[row, ids] / p[row, ids].sum(), rtol=1e-5
    )
  grad = jax.grad(
      lambda z: jnp.sum(obj.topk_divergence(obj.reverse_kl, z, y, k=3, sampled_tokens=outside))
  )(z)
  assert grad[0, int(outside[0])] != 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(source="student"),
        dict(tail_bucket=True),
        dict(sampled_tokens=jnp.array([0, 5])),
        dict(sampled_tokens=jnp.array([1, 2]), tail_bucket=True, temperature=1.5),
    ],
)
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd_0.5", "alpha_0.3"])
def test_topk_finite_difference_gradients(kwargs, name):
  fn = DIVERGENCE_CASES[name]
  with jax.enable_x64(True):
    z, y = random_logits(12, (2, 7), dtype=jnp.float64), random_logits(
        13, (2, 7), dtype=jnp.float64
    )
    check_grads(
        lambda z: obj.topk_divergence(fn, z, y, k=3, **kwargs),
        (z,),
        order=1,
        modes=("rev",),
        eps=1e-5,
        atol=1e-5,
        rtol=1e-5,
    )


def test_topk_with_masked_vocabulary_is_finite():
  # The teacher has only 2 live tokens but K = 3: the third slot is -inf on the teacher side.
  z = jnp.array([0.0, 1.0, -jnp.inf, 0.5, -1.0])
  y = jnp.array([2.0, 1.0, -jnp.inf, -jnp.inf, -jnp.inf])
  for fn in (obj.forward_kl, functools.partial(obj.generalized_jsd, beta=0.5), obj.total_variation):
    for tail in (False, True):
      value, grad = jax.value_and_grad(
          lambda z, fn=fn, tail=tail: obj.topk_divergence(fn, z, y, k=3, tail_bucket=tail)
      )(z)
      assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_support_diagnostics():
  z, y = random_logits(14, (3, 10)), random_logits(15, (3, 10))
  diag = obj.support_diagnostics(z, y, k=4)
  p, q = softmax64(z), softmax64(y)
  top_q = np.argsort(-np.asarray(y), -1)[:, :4]
  top_p = np.argsort(-np.asarray(z), -1)[:, :4]
  np.testing.assert_allclose(diag.teacher_mass, np.take_along_axis(q, top_q, -1).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(diag.student_mass, np.take_along_axis(p, top_q, -1).sum(-1), rtol=1e-5)
  overlap = [len(set(a) & set(b)) / 4 for a, b in zip(top_q, top_p)]
  np.testing.assert_allclose(diag.overlap, overlap)
  same = obj.support_diagnostics(z, z, k=4)
  np.testing.assert_allclose(same.overlap, 1.0)
  np.testing.assert_allclose(obj.support_diagnostics(z, y, k=10).teacher_mass, 1.0, rtol=1e-5)


def test_topk_bad_input():
  z = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, V=5\], got 6"):
    obj.restrict_to_topk(z, z, k=6)
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, V=5\], got 0"):
    obj.support_diagnostics(z, z, k=0)
  with pytest.raises(ValueError, match="source must be 'teacher' or 'student', got 'both'"):
    obj.restrict_to_topk(z, z, k=2, source="both")
  with pytest.raises(ValueError, match=r"sampled_tokens has shape \(3,\)"):
    obj.restrict_to_topk(z, z, k=2, sampled_tokens=jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="vocabulary sizes differ"):
    obj.restrict_to_topk(z, jnp.zeros((2, 6)), k=2)


def test_topk_jit_and_vmap():
  z, y = random_logits(16, (4, 3, 9)), random_logits(17, (4, 3, 9))
  tokens = jnp.zeros((4, 3), jnp.int32)
  fn = functools.partial(obj.topk_divergence, obj.reverse_kl, k=3, tail_bucket=True)
  eager = fn(z, y, sampled_tokens=tokens)
  np.testing.assert_allclose(jax.jit(fn)(z, y, sampled_tokens=tokens), eager, rtol=1e-6)
  np.testing.assert_allclose(
      jax.vmap(lambda a, b, t: fn(a, b, sampled_tokens=t))(z, y, tokens), eager, rtol=1e-6
  )
  diag = jax.jit(functools.partial(obj.support_diagnostics, k=3))(z, y)
  np.testing.assert_allclose(
      jax.vmap(functools.partial(obj.support_diagnostics, k=3))(z, y).overlap, diag.overlap
  )


# ---------------------------------------------------------------- reductions

VALUES = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
MASK = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


def test_reduction_values():
  np.testing.assert_allclose(obj.masked_sum(VALUES, MASK), 40.0)
  np.testing.assert_allclose(obj.token_mean(VALUES, MASK), 40.0 / 6)
  np.testing.assert_allclose(obj.sequence_mean(VALUES, MASK), (2.5 + 15.0) / 2)  # empty row skipped
  weights = MASK * jnp.array([[1.0], [0.5], [1.0]])
  np.testing.assert_allclose(obj.token_mean(VALUES, weights), (10 + 15) / 5)


def test_reductions_all_masked_and_poisoned():
  empty = jnp.zeros_like(MASK)
  poisoned = VALUES.at[1, 3].set(jnp.nan).at[2, 0].set(jnp.inf)
  for reduce in (obj.masked_sum, obj.token_mean, obj.sequence_mean):
    assert float(reduce(VALUES, empty)) == 0.0
    grad = jax.grad(lambda v, reduce=reduce: reduce(v, empty))(VALUES)
    np.testing.assert_array_equal(grad, 0.0)
    value, grad = jax.value_and_grad(lambda v, reduce=reduce: reduce(v, MASK))(poisoned)
    np.testing.assert_allclose(value, reduce(VALUES, MASK))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(jax.jit(reduce)(VALUES, MASK), reduce(VALUES, MASK))
    np.testing.assert_allclose(
        jax.vmap(reduce)(VALUES[:, None], MASK[:, None]),
        [reduce(VALUES[i : i + 1], MASK[i : i + 1]) for i in range(3)],
    )


def test_reductions_bad_input():
  with pytest.raises(ValueError, match=r"mask has shape \(3, 3\) but values has shape \(3, 4\)"):
    obj.token_mean(VALUES, MASK[:, :3])
  with pytest.raises(ValueError, match="values must have rank 2"):
    obj.sequence_mean(VALUES[0], MASK[0])
