"""§1 divergences: worked example, analytic and finite-difference gradients, limits,
invariants, numerics, bad input, jit/vmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from opdjax import objectives as obj
from tests.objectives.helpers import (
    DIVERGENCE_CASES,
    P_EXAMPLE,
    Q_EXAMPLE,
    np_kl,
    random_logits,
    softmax64,
)

SHAPES = [(3,), (4, 7), (2, 3, 11)]


# ---------------------------------------------------------------- worked example (docs/theory.md)


def test_worked_example_values():
  z, y = jnp.log(P_EXAMPLE), jnp.log(Q_EXAMPLE)
  np.testing.assert_allclose(obj.reverse_kl(z, y), 0.675806, atol=1e-6)
  np.testing.assert_allclose(obj.forward_kl(z, y), 0.634897, atol=1e-6)


def test_worked_example_logit_gradients():
  z, y = jnp.log(P_EXAMPLE), jnp.log(Q_EXAMPLE)
  np.testing.assert_allclose(
      jax.grad(obj.reverse_kl)(z, y), [-0.385714, -0.081102, 0.466816], atol=1e-6
  )
  np.testing.assert_allclose(jax.grad(obj.forward_kl)(z, y), [-0.5, 0.1, 0.4], atol=1e-6)


# ---------------------------------------------------------------- analytic gradients


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_kl_gradient_is_p_minus_q(shape):
  z, y = random_logits(0, shape), random_logits(1, shape)
  grad = jax.grad(lambda z: jnp.sum(obj.forward_kl(z, y)))(z)
  np.testing.assert_allclose(grad, jax.nn.softmax(z) - jax.nn.softmax(y), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_kl_gradient_is_p_times_centred_log_ratio(shape):
  z, y = random_logits(2, shape), random_logits(3, shape)
  p, log_p, log_q = jax.nn.softmax(z), jax.nn.log_softmax(z), jax.nn.log_softmax(y)
  kl = jnp.sum(p * (log_p - log_q), axis=-1, keepdims=True)
  grad = jax.grad(lambda z: jnp.sum(obj.reverse_kl(z, y)))(z)
  np.testing.assert_allclose(grad, p * (log_p - log_q - kl), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_logits_and_gradient(temperature):
  z, y = random_logits(4, (3, 5)), random_logits(5, (3, 5))
  np.testing.assert_allclose(
      obj.reverse_kl(z, y, temperature=temperature),
      obj.reverse_kl(z / temperature, y / temperature),
      rtol=1e-6,
  )
  grad = jax.grad(lambda z: jnp.sum(obj.forward_kl(z, y, temperature=temperature)))(z)
  expected = (jax.nn.softmax(z / temperature) - jax.nn.softmax(y / temperature)) / temperature
  np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCE_CASES))
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_finite_difference_gradients(name, shape):
  fn = DIVERGENCE_CASES[name]
  with jax.enable_x64(True):
    z = random_logits(6, shape, dtype=jnp.float64)
    y = random_logits(7, shape, dtype=jnp.float64)
    check_grads(lambda z: fn(z, y), (z,), order=2, modes=("rev",), eps=1e-5, atol=1e-5, rtol=1e-5)


def test_jsd_gradient_matches_closed_form():
  # ∂/∂z JSD(β) = (1−β) · [p ⊙ (log(p/M) − KL(p‖M))]: the M-dependence cancels because
  # Σ_v (β q_v + (1−β) p_v)/M_v · ∂M_v = Σ ∂M_v = 0.
  beta = 0.3
  z, y = random_logits(8, (4, 6)), random_logits(9, (4, 6))
  p, q = jax.nn.softmax(z), jax.nn.softmax(y)
  log_m = jnp.log(beta * q + (1 - beta) * p)
  inner = jnp.log(p) - log_m
  expected = (1 - beta) * p * (inner - jnp.sum(p * inner, -1, keepdims=True))
  grad = jax.grad(lambda z: jnp.sum(obj.generalized_jsd(z, y, beta=beta)))(z)
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_jsd_derivative_rule_equals_the_chain_rule_in_both_arguments():
  # The JSD's derivative is a closed-form rule; the teacher's half of it is unreachable
  # through `generalized_jsd` (stop-gradient), so both halves are checked on the rule.
  from opdjax.objectives.divergences import _jsd

  beta = 0.3

  def chain_rule(z_p, z_q):
    log_p, log_q = jax.nn.log_softmax(z_p), jax.nn.log_softmax(z_q)
    log_m = jnp.logaddexp(jnp.log(beta) + log_q, jnp.log1p(-beta) + log_p)
    kl = lambda log_a: jnp.sum(jnp.exp(log_a) * (log_a - log_m), -1)
    return beta * kl(log_q) + (1 - beta) * kl(log_p)

  z, y = random_logits(30, (4, 6)), random_logits(31, (4, 6))
  dz, dy = random_logits(32, (4, 6)), random_logits(33, (4, 6))
  value, tangent = jax.jvp(lambda z, y: _jsd(z, y, beta), (z, y), (dz, dy))
  expected_value, expected_tangent = jax.jvp(chain_rule, (z, y), (dz, dy))
  np.testing.assert_allclose(value, expected_value, rtol=1e-6)
  np.testing.assert_allclose(tangent, expected_tangent, atol=1e-6)
  grads = jax.grad(lambda z, y: jnp.sum(_jsd(z, y, beta)), argnums=(0, 1))(z, y)
  expected_grads = jax.grad(lambda z, y: jnp.sum(chain_rule(z, y)), argnums=(0, 1))(z, y)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_teacher_receives_no_gradient():
  z, y = random_logits(10, (3, 5)), random_logits(11, (3, 5))
  for name, fn in DIVERGENCE_CASES.items():
    grad = jax.grad(lambda y, fn=fn: jnp.sum(fn(z, y)))(y)
    np.testing.assert_array_equal(grad, 0.0, err_msg=name)


# ---------------------------------------------------------------- exact values by formula


def test_values_against_numpy_formulas():
  z, y = random_logits(12, (6,)), random_logits(13, (6,))
  p, q = softmax64(z), softmax64(y)
  m = lambda w, a, b: w * a + (1 - w) * b
  expected = {
      "forward_kl": np_kl(q, p),
      "reverse_kl": np_kl(p, q),
      "jsd_0.5": 0.5 * np_kl(q, m(0.5, q, p)) + 0.5 * np_kl(p, m(0.5, q, p)),
      "jsd_0.1": 0.1 * np_kl(q, m(0.1, q, p)) + 0.9 * np_kl(p, m(0.1, q, p)),
      "jsd_0.9_scaled": (0.9 * np_kl(q, m(0.9, q, p)) + 0.1 * np_kl(p, m(0.9, q, p))) / 0.09,
      "alpha_-1": (np.sum(p**-1 * q**2) - 1) / 2,
      "alpha_0.3": (np.sum(p**0.3 * q**0.7) - 1) / (0.3 * -0.7),
      "alpha_0.5": 4 * (1 - np.sum(np.sqrt(p * q))),
      "alpha_0.8": (np.sum(p**0.8 * q**0.2) - 1) / (0.8 * -0.2),
      "alpha_2": (np.sum(p**2 / q) - 1) / 2,
      "skew_forward_0.1": np_kl(q, m(0.1, q, p)),
      "skew_reverse_0.1": np_kl(p, m(0.1, p, q)),
      "skew_reverse_0.5": np_kl(p, m(0.5, p, q)),
      "total_variation": 0.5 * np.abs(p - q).sum(),
  }
  assert set(expected) == set(DIVERGENCE_CASES)
  for name, fn in DIVERGENCE_CASES.items():
    np.testing.assert_allclose(fn(z, y), expected[name], rtol=2e-5, err_msg=name)


# ---------------------------------------------------------------- invariants and limits


@pytest.mark.parametrize("name", sorted(DIVERGENCE_CASES))
def test_zero_on_identical_and_nonnegative(name):
  fn = DIVERGENCE_CASES[name]
  z = random_logits(14, (8, 9))
  np.testing.assert_allclose(fn(z, z), 0.0, atol=1e-6)
  values = fn(z, random_logits(15, (8, 9)))
  assert np.all(values > 0), name


def test_direction_is_not_symmetric():
  z, y = jnp.log(P_EXAMPLE), jnp.log(Q_EXAMPLE)
  np.testing.assert_allclose(obj.forward_kl(z, y), obj.reverse_kl(y, z), rtol=1e-6)
  assert abs(float(obj.forward_kl(z, y) - obj.reverse_kl(z, y))) > 0.04


def test_jsd_endpoints_are_exactly_the_kls():
  z, y = random_logits(16, (4, 5)), random_logits(17, (4, 5))
  for scaled in (False, True):
    chex.assert_trees_all_equal(
        obj.generalized_jsd(z, y, beta=0.0, scaled=scaled), obj.forward_kl(z, y)
    )
    chex.assert_trees_all_equal(
        obj.generalized_jsd(z, y, beta=1.0, scaled=scaled), obj.reverse_kl(z, y)
    )


def test_jsd_interior_limits():
  z, y = random_logits(18, (4, 5)), random_logits(19, (4, 5))
  forward, reverse = obj.forward_kl(z, y), obj.reverse_kl(z, y)
  eps = 1e-4  # the relative error is O(β) analytically, plus float32 rounding
  # Plain JSD shrinks to 0 at both ends, like β·KL(q‖p) and (1−β)·KL(p‖q).
  np.testing.assert_allclose(obj.generalized_jsd(z, y, beta=eps) / eps, forward, rtol=2e-3)
  np.testing.assert_allclose(obj.generalized_jsd(z, y, beta=1 - eps) / eps, reverse, rtol=2e-3)
  # Scaled JSD is continuous at both ends.
  np.testing.assert_allclose(obj.generalized_jsd(z, y, beta=eps, scaled=True), forward, rtol=2e-3)
  np.testing.assert_allclose(
      obj.generalized_jsd(z, y, beta=1 - eps, scaled=True), reverse, rtol=2e-3
  )
  # β = ½ is the symmetric Jensen–Shannon divergence.
  np.testing.assert_allclose(
      obj.generalized_jsd(z, y, beta=0.5), obj.generalized_jsd(y, z, beta=0.5), rtol=1e-5
  )


def test_alpha_divergence_limits():
  z, y = random_logits(20, (4, 5)), random_logits(21, (4, 5))
  forward, reverse = obj.forward_kl(z, y), obj.reverse_kl(z, y)
  chex.assert_trees_all_equal(obj.alpha_divergence(z, y, alpha=0.0), forward)
  chex.assert_trees_all_equal(obj.alpha_divergence(z, y, alpha=1.0), reverse)
  for eps in (1e-3, 1e-5):
    np.testing.assert_allclose(obj.alpha_divergence(z, y, alpha=eps), forward, rtol=5e-3)
    np.testing.assert_allclose(obj.alpha_divergence(z, y, alpha=1 - eps), reverse, rtol=5e-3)
  p, q = jax.nn.softmax(z), jax.nn.softmax(y)
  np.testing.assert_allclose(
      obj.alpha_divergence(z, y, alpha=0.5), 4 * (1 - jnp.sum(jnp.sqrt(p * q), -1)), rtol=1e-5
  )


def test_skew_kl_limits():
  z, y = random_logits(22, (4, 5)), random_logits(23, (4, 5))
  chex.assert_trees_all_equal(obj.skew_forward_kl(z, y, alpha=0.0), obj.forward_kl(z, y))
  chex.assert_trees_all_equal(obj.skew_reverse_kl(z, y, alpha=0.0), obj.reverse_kl(z, y))
  np.testing.assert_array_equal(obj.skew_forward_kl(z, y, alpha=1.0), 0.0)
  np.testing.assert_array_equal(obj.skew_reverse_kl(z, y, alpha=1.0), 0.0)
  # Skewing bounds the divergence: KL(q ‖ αq + (1−α)p) ≤ log(1/α).
  assert np.all(obj.skew_forward_kl(z, 10 * y, alpha=0.1) <= np.log(10) + 1e-6)


def test_total_variation_bounds():
  z = random_logits(24, (6, 5))
  np.testing.assert_allclose(
      obj.total_variation(jnp.array([0.0, -jnp.inf]), jnp.array([-jnp.inf, 0.0])), 1.0
  )
  assert np.all(obj.total_variation(z, -z) <= 1.0)


def test_get_divergence_binds_hyperparameters():
  z, y = random_logits(25, (5,)), random_logits(26, (5,))
  fn = obj.get_divergence("generalized_jsd", beta=0.3)
  np.testing.assert_allclose(fn(z, y), obj.generalized_jsd(z, y, beta=0.3))
  with pytest.raises(ValueError, match="unknown divergence 'kl'.*reverse_kl"):
    obj.get_divergence("kl")
  with pytest.raises(
      ValueError,
      match=r"generalized_jsd has no hyperparameters \['bta'\]; "
      r"valid: \['beta', 'scaled', 'temperature'\]",
  ):
    obj.get_divergence("generalized_jsd", bta=0.3)  # a typo fails when the config is read
  with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\], got 1.5"):
    obj.get_divergence("generalized_jsd", beta=1.5)  # so does a value out of range
  with pytest.raises(ValueError, match="temperature must be > 0, got -1.0"):
    obj.get_divergence("reverse_kl", temperature=-1.0)


# ---------------------------------------------------------------- numerics

MASKED_STUDENT = jnp.array([[0.5, -1.0, -jnp.inf, 2.0], [1.0, -jnp.inf, -jnp.inf, 0.0]])
MASKED_TEACHER = jnp.array([[1.0, 0.0, -jnp.inf, -jnp.inf], [0.0, -jnp.inf, -jnp.inf, 3.0]])


@pytest.mark.parametrize("name", sorted(DIVERGENCE_CASES))
def test_masked_vocabulary_finite_values_and_gradients(name):
  fn = DIVERGENCE_CASES[name]
  # Same mask on both sides: every divergence is finite.
  student = MASKED_STUDENT
  teacher = jnp.where(jnp.isneginf(student), -jnp.inf, jnp.array([[1.0, 0.0, 0.0, -2.0]]))
  value, grad = jax.value_and_grad(lambda z: jnp.sum(fn(z, teacher)))(student)
  assert np.isfinite(value), name
  assert np.all(np.isfinite(grad)), name
  np.testing.assert_array_equal(grad[jnp.isneginf(student)], 0.0)
  unmasked = fn(student[:, [0, 3]], teacher[:, [0, 3]])  # row 1 only has tokens 0 and 3
  np.testing.assert_allclose(fn(student, teacher)[1], unmasked[1], rtol=1e-6)


def test_masked_vocabulary_where_only_one_side_is_finite():
  # Teacher rules out token 3 that the student likes: forward KL stays finite (q = 0 there)
  # and reverse KL is infinite; the bounded divergences stay finite with finite gradients.
  z, y = MASKED_STUDENT[:1, :2].at[0, 1].set(0.3), jnp.array([[1.0, -jnp.inf]])
  z = jnp.concatenate([z, jnp.array([[0.0]])], -1)  # student has mass on all 3
  y = jnp.concatenate([y, jnp.array([[-jnp.inf]])], -1)  # teacher only on token 0
  for name in (
      "forward_kl",
      "jsd_0.5",
      "jsd_0.1",
      "alpha_0.3",
      "alpha_0.5",
      "alpha_0.8",
      "skew_forward_0.1",
      "skew_reverse_0.1",
      "total_variation",
  ):
    fn = DIVERGENCE_CASES[name]
    value, grad = jax.value_and_grad(lambda z, fn=fn: jnp.sum(fn(z, y)))(z)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), name
  assert np.isposinf(obj.reverse_kl(z, y))
  assert np.isposinf(obj.alpha_divergence(z, y, alpha=2.0))


def test_log_mixture_equals_log_space_and_floors_what_underflows():
  log_a = jnp.array([-0.1, -5.0, -80.0, -200.0, -jnp.inf])
  log_b = jnp.array([-3.0, -0.2, -85.0, -jnp.inf, -jnp.inf])
  mixed, grads = jax.value_and_grad(
      lambda a, b: jnp.sum(obj.divergences.log_mixture(a, b, 0.3)), argnums=(0, 1)
  )(log_a, log_b)
  got = obj.divergences.log_mixture(log_a, log_b, 0.3)
  a64, b64 = np.asarray(log_a, np.float64), np.asarray(log_b, np.float64)
  expected = np.logaddexp(np.log(0.3) + a64[:3], np.log(0.7) + b64[:3])
  np.testing.assert_allclose(got[:3], expected, rtol=1e-6)
  # exp(-200) is 0 in float32: the mixture is floored at the smallest normal float32.
  np.testing.assert_array_equal(got[3:], np.log(np.finfo(np.float32).tiny).astype(np.float32))
  assert np.isfinite(mixed) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("name", sorted(DIVERGENCE_CASES))
def test_bfloat16_inputs_compute_in_float32(name):
  fn = DIVERGENCE_CASES[name]
  z, y = random_logits(27, (3, 8)), random_logits(28, (3, 8))
  value = fn(z.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
  assert value.dtype == jnp.float32
  reference = fn(
      z.astype(jnp.bfloat16).astype(jnp.float32), y.astype(jnp.bfloat16).astype(jnp.float32)
  )
  np.testing.assert_allclose(value, reference, rtol=1e-6)
  grad = jax.grad(lambda z: jnp.sum(fn(z, y.astype(jnp.bfloat16))))(z.astype(jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(grad.astype(jnp.float32)))


@pytest.mark.parametrize("name", sorted(DIVERGENCE_CASES))
def test_huge_logits_are_stable(name):
  fn = DIVERGENCE_CASES[name]
  z = 1e4 * random_logits(29, (4, 6), scale=1.0)
  y = 1e4 * random_logits(30, (4, 6), scale=1.0)
  value, grad = jax.value_and_grad(lambda z, fn=fn: jnp.sum(fn(z, y)))(z)
  # Near-one-hot distributions: divergences stay finite wherever both keep some mass
  # (exp(-1e4) underflows to exactly 0, which makes KLs with disjoint argmaxes infinite).
  if name in (
      "jsd_0.5",
      "jsd_0.1",
      "jsd_0.9_scaled",
      "skew_forward_0.1",
      "skew_reverse_0.1",
      "skew_reverse_0.5",
      "total_variation",
      "alpha_0.3",
      "alpha_0.5",
      "alpha_0.8",
  ):
    assert np.isfinite(value), name
    assert np.all(np.isfinite(grad)), name
  np.testing.assert_allclose(fn(z, z), 0.0, atol=1e-6)
  assert np.all(np.isfinite(jax.grad(lambda z: jnp.sum(fn(z, z + 1e-3 * y)))(z))), name


# ---------------------------------------------------------------- bad input


def test_bad_input_messages():
  z = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match=r"vocabulary sizes differ.*V=5.*V=4"):
    obj.reverse_kl(z, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"same shape"):
    obj.forward_kl(z, jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="vocabulary axis"):
    obj.reverse_kl(jnp.float32(1.0), jnp.float32(1.0))
  with pytest.raises(ValueError, match="floating point"):
    obj.reverse_kl(jnp.zeros((2, 5), jnp.int32), z)
  with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\], got 1.5"):
    obj.generalized_jsd(z, z, beta=1.5)
  with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\], got -0.1"):
    obj.skew_reverse_kl(z, z, alpha=-0.1)
  with pytest.raises(ValueError, match="alpha must be finite"):
    obj.alpha_divergence(z, z, alpha=float("inf"))
  with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
    obj.forward_kl(z, z, temperature=0.0)
  with pytest.raises(TypeError, match="beta must be a static Python number"):
    jax.jit(lambda b: obj.generalized_jsd(z, z, beta=b))(0.5)
  with pytest.raises(TypeError):
    obj.generalized_jsd(z, z, 0.5)  # hyperparameters are keyword-only


# ---------------------------------------------------------------- jit and vmap


@pytest.mark.parametrize("name", sorted(DIVERGENCE_CASES))
def test_jit_and_vmap(name):
  fn = DIVERGENCE_CASES[name]
  z, y = random_logits(31, (3, 4, 6)), random_logits(32, (3, 4, 6))
  eager = fn(z, y)
  chex.assert_shape(eager, (3, 4))
  np.testing.assert_allclose(jax.jit(fn)(z, y), eager, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.vmap(fn)(z, y), eager, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.vmap(jax.vmap(fn))(z, y), eager, rtol=1e-6, atol=1e-7)
  jit_grad = jax.jit(jax.grad(lambda z: jnp.sum(fn(z, y))))(z)
  np.testing.assert_allclose(
      jit_grad, jax.grad(lambda z: jnp.sum(fn(z, y)))(z), rtol=1e-5, atol=1e-7
  )
