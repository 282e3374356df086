"""§2 and §5 sampled-token estimators: worked example, exact expectations by enumerating
the vocabulary, importance-sampling variants, bad input, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax import objectives as obj
from tests.objectives.helpers import P_EXAMPLE, Q_EXAMPLE, random_logits


def sampled_token_grad(loss_fn, z, y, token):
  """∂/∂z of loss_fn(log p(a), log q(a)) for one sampled token a (a held fixed)."""

  def loss(z):
    return loss_fn(obj.token_log_probs(z, token), obj.token_log_probs(y, token))

  return jax.grad(loss)(z)


def expected_grad(loss_fn, z, y):
  """Σ_a p_a ∇_z loss(a): the exact expectation over a ~ p with the sampling held fixed."""
  p = jax.nn.softmax(z)
  grads = jnp.stack([sampled_token_grad(loss_fn, z, y, jnp.int32(a)) for a in range(z.shape[-1])])
  return jnp.einsum("a,av->v", p, grads)


# ---------------------------------------------------------------- worked example


def test_worked_example_sampled_token_gradients():
  z, y = jnp.log(P_EXAMPLE), jnp.log(Q_EXAMPLE)
  grad_a3 = sampled_token_grad(obj.sampled_reverse_kl_loss, z, y, jnp.int32(2))
  np.testing.assert_allclose(grad_a3, [-0.321888, -0.482831, 0.804719], atol=1e-6)
  grad_a1 = sampled_token_grad(obj.sampled_reverse_kl_loss, z, y, jnp.int32(0))
  np.testing.assert_allclose(grad_a1, [-1.002210, 0.375829, 0.626381], atol=1e-6)
  c = obj.log_ratio(obj.token_log_probs(z, jnp.int32(2)), obj.token_log_probs(y, jnp.int32(2)))
  np.testing.assert_allclose(c, 1.609438, atol=1e-6)


# ---------------------------------------------------------------- exact expectations


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_surrogate_gradient_is_reverse_kl_gradient(seed):
  z, y = random_logits(seed, (7,)), random_logits(seed + 10, (7,))
  np.testing.assert_allclose(
      expected_grad(obj.sampled_reverse_kl_loss, z, y), jax.grad(obj.reverse_kl)(z, y), atol=1e-6
  )


def test_worked_example_expectation():
  z, y = jnp.log(P_EXAMPLE), jnp.log(Q_EXAMPLE)
  np.testing.assert_allclose(
      expected_grad(obj.sampled_reverse_kl_loss, z, y), [-0.385714, -0.081102, 0.466816], atol=1e-6
  )


def test_action_independent_advantage_has_zero_expected_gradient():
  z, y = random_logits(3, (6,)), random_logits(4, (6,))
  baseline = obj.reverse_kl(z, y)  # the full-vocabulary KL at this prefix: a baseline only
  loss = lambda lp, lq: obj.policy_gradient_loss(lp, jnp.broadcast_to(baseline, lp.shape))
  np.testing.assert_allclose(expected_grad(loss, z, y), 0.0, atol=1e-6)


@pytest.mark.parametrize("seed", [5, 6])
def test_k_estimators_expected_direct_gradients(seed):
  z, y = random_logits(seed, (5,)), random_logits(seed + 10, (5,))
  np.testing.assert_allclose(expected_grad(obj.kl_estimate_k1, z, y), 0.0, atol=1e-6)
  np.testing.assert_allclose(
      expected_grad(obj.kl_estimate_k2, z, y), jax.grad(obj.reverse_kl)(z, y), atol=1e-5
  )
  np.testing.assert_allclose(
      expected_grad(obj.kl_estimate_k3, z, y), jax.grad(obj.forward_kl)(z, y), atol=1e-5
  )


def test_k1_and_k3_values_are_unbiased_for_reverse_kl():
  z, y = random_logits(7, (6,)), random_logits(8, (6,))
  p = jax.nn.softmax(z)
  tokens = jnp.arange(6)
  lp, lq = obj.token_log_probs(jnp.tile(z, (6, 1)), tokens), obj.token_log_probs(
      jnp.tile(y, (6, 1)), tokens
  )
  for estimator in (obj.kl_estimate_k1, obj.kl_estimate_k3):
    np.testing.assert_allclose(jnp.sum(p * estimator(lp, lq)), obj.reverse_kl(z, y), rtol=1e-5)
  assert np.all(obj.kl_estimate_k3(lp, lq) >= 0)


# ---------------------------------------------------------------- importance sampling


def expected_is_grad(z, mu_logits, advantages, **kwargs):
  """Σ_a μ_a ∇ importance_weighted_pg_loss(a): exact expectation under the behaviour policy."""
  mu = jax.nn.softmax(mu_logits)
  grads = []
  for a in range(z.shape[-1]):
    a = jnp.int32(a)
    loss = lambda z, a=a: obj.importance_weighted_pg_loss(
        obj.token_log_probs(z, a), obj.token_log_probs(mu_logits, a), advantages[a], **kwargs
    )
    grads.append(jax.grad(loss)(z))
  return jnp.einsum("a,av->v", mu, jnp.stack(grads))


def on_policy_pg_grad(z, advantages):
  p = jax.nn.softmax(z)
  grads = jnp.stack(
      [
          jax.grad(
              lambda z, a=a: obj.policy_gradient_loss(
                  obj.token_log_probs(z, jnp.int32(a)), advantages[a]
              )
          )(z)
          for a in range(z.shape[-1])
      ]
  )
  return jnp.einsum("a,av->v", p, grads)


def test_plain_importance_sampling_is_unbiased():
  z, mu_logits = random_logits(9, (5,), scale=0.5), random_logits(10, (5,), scale=0.5)
  advantages = random_logits(11, (5,))
  np.testing.assert_allclose(
      expected_is_grad(z, mu_logits, advantages, correction="plain"),
      on_policy_pg_grad(z, advantages),
      atol=1e-6,
  )


def test_truncated_importance_sampling_caps_the_weight():
  z, mu_logits = random_logits(12, (5,), scale=1.5), random_logits(13, (5,), scale=1.5)
  advantages = random_logits(14, (5,))
  # A cap above every ratio changes nothing.
  big = float(jnp.max(jax.nn.softmax(z) / jax.nn.softmax(mu_logits))) + 1
  np.testing.assert_allclose(
      expected_is_grad(z, mu_logits, advantages, correction="truncated", truncation=big),
      expected_is_grad(z, mu_logits, advantages, correction="plain"),
      atol=1e-6,
  )
  # Per token the gradient is −A·min(w, C)·∇log p.
  lp, lmu = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.1]))  # w = 5
  grad = jax.grad(
      lambda lp: obj.importance_weighted_pg_loss(
          lp, lmu, jnp.array([2.0]), correction="truncated", truncation=2.0
      )[0]
  )(lp)
  np.testing.assert_allclose(grad, [-2.0 * 2.0], rtol=1e-6)


@pytest.mark.parametrize(
    "log_w,advantage,clipped",
    [
        (0.1, 1.0, True),  # w > 1+ε, A > 0: clipped, no gradient
        (-0.3, -1.0, True),  # w < 1−ε, A < 0: clipped, no gradient
        (0.1, -1.0, False),  # w > 1+ε, A < 0: pessimistic branch keeps the gradient
        (-0.3, 1.0, False),  # w < 1−ε, A > 0: keeps the gradient
        (0.05, 1.0, False),  # inside the trust region
    ],
)
def test_ppo_clip_branches(log_w, advantage, clipped):
  lmu = jnp.array([-1.0])
  lp = lmu + log_w
  loss = lambda lp: obj.importance_weighted_pg_loss(
      lp, lmu, jnp.array([advantage]), correction="ppo_clip", clip_epsilon=0.08
  )[0]
  value, grad = jax.value_and_grad(loss)(lp)
  w = np.exp(log_w)
  np.testing.assert_allclose(
      value, -min(w * advantage, np.clip(w, 0.92, 1.08) * advantage), rtol=1e-6
  )
  np.testing.assert_allclose(grad, [0.0] if clipped else [-advantage * w], rtol=1e-6)


def test_ppo_clip_higher_and_on_policy_equivalence():
  lmu = jnp.array([-1.0, -2.0])
  lp = lmu + jnp.array([0.15, 0.0])
  a = jnp.array([1.0, 1.0])
  # ε_high = 0.2 leaves w = e^0.15 ≈ 1.16 unclipped although ε_low = 0.1 would clip it.
  grad = jax.grad(
      lambda lp: jnp.sum(
          obj.importance_weighted_pg_loss(lp, lmu, a, clip_epsilon=0.1, clip_epsilon_high=0.2)
      )
  )(lp)
  np.testing.assert_allclose(grad, [-np.exp(0.15), -1.0], rtol=1e-6)
  # On-policy (μ = p) every variant has the REINFORCE gradient.
  for correction in ("plain", "truncated", "ppo_clip"):
    g = jax.grad(
        lambda lp, correction=correction: jnp.sum(
            obj.importance_weighted_pg_loss(lp, jax.lax.stop_gradient(lp), a, correction=correction)
        )
    )(lmu)
    np.testing.assert_allclose(
        g, jax.grad(lambda lp: jnp.sum(obj.policy_gradient_loss(lp, a)))(lmu)
    )


def test_importance_ratio():
  lp, lmu = jnp.log(jnp.array([0.2, 0.5])), jnp.log(jnp.array([0.4, 0.5]))
  np.testing.assert_allclose(obj.importance_ratio(lp, lmu), [0.5, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(jax.grad(lambda m: jnp.sum(obj.importance_ratio(lp, m)))(lmu), 0)


# ---------------------------------------------------------------- token log-probs, numerics, input


def test_token_log_probs_matches_log_softmax_gather():
  z = random_logits(15, (2, 3, 9))
  tokens = jax.random.randint(jax.random.key(0), (2, 3), 0, 9)
  expected = np.take_along_axis(
      np.asarray(jax.nn.log_softmax(z / 0.7)), np.asarray(tokens)[..., None], -1
  )[..., 0]
  np.testing.assert_allclose(obj.token_log_probs(z, tokens, temperature=0.7), expected, rtol=1e-6)
  assert obj.token_log_probs(z.astype(jnp.bfloat16), tokens).dtype == jnp.float32


def test_masked_vocabulary_sampled_token_is_finite():
  z = jnp.array([0.0, -jnp.inf, 1.0])
  y = jnp.array([1.0, 0.0, -jnp.inf])
  a = jnp.int32(0)  # sampled tokens always have p > 0; here q > 0 too
  grad = jax.grad(
      lambda z: obj.sampled_reverse_kl_loss(obj.token_log_probs(z, a), obj.token_log_probs(y, a))
  )(z)
  assert np.all(np.isfinite(grad)) and grad[1] == 0


def test_estimators_bad_input():
  with pytest.raises(ValueError, match=r"logits \(2, 5\) must be tokens.shape \+ \(V,\)"):
    obj.token_log_probs(jnp.zeros((2, 5)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="integer ids"):
    obj.token_log_probs(jnp.zeros((2, 5)), jnp.zeros((2,)))
  with pytest.raises(
      ValueError, match=r"teacher_log_probs has shape \(3,\) but student_log_probs has shape \(2,\)"
  ):
    obj.kl_estimate_k3(jnp.zeros(2), jnp.zeros(3))
  with pytest.raises(ValueError, match="correction must be one of"):
    obj.importance_weighted_pg_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), correction="vtrace")
  with pytest.raises(ValueError, match=r"clip_epsilon must be in \(0, 1\), got 1.5"):
    obj.importance_weighted_pg_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), clip_epsilon=1.5)
  with pytest.raises(ValueError, match="truncation must be >= 1, got 0.5"):
    obj.importance_weighted_pg_loss(
        jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), correction="truncated", truncation=0.5
    )


ESTIMATORS = {
    "k1": obj.kl_estimate_k1,
    "k2": obj.kl_estimate_k2,
    "k3": obj.kl_estimate_k3,
    "surrogate": obj.sampled_reverse_kl_loss,
    "log_ratio": obj.log_ratio,
    "pg": obj.policy_gradient_loss,
    "ppo": lambda a, b: obj.importance_weighted_pg_loss(a, b, a - b),
    "tis": lambda a, b: obj.importance_weighted_pg_loss(a, b, a - b, correction="truncated"),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_jit_and_vmap(name):
  fn = ESTIMATORS[name]
  a, b = -jnp.abs(random_logits(16, (4, 6))), -jnp.abs(random_logits(17, (4, 6)))
  eager = fn(a, b)
  np.testing.assert_allclose(jax.jit(fn)(a, b), eager, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(fn)(a, b), eager, rtol=1e-6)
  z = random_logits(18, (4, 6, 5))
  tokens = jnp.zeros((4, 6), jnp.int32)
  np.testing.assert_allclose(
      jax.vmap(obj.token_log_probs)(z, tokens), obj.token_log_probs(z, tokens), rtol=1e-6
  )
