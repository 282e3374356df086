"""§3–§5 returns and advantages: reward-to-go against a direct loop, sequence-level
expectations on an enumerable tabular policy, G-OPD, GRPO, OPD+RL mixing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax import objectives as obj
from tests.objectives.helpers import random_logits

# ---------------------------------------------------------------- reward-to-go


def loop_reward_to_go(rewards, mask, gamma):
  rewards, mask = np.asarray(rewards, np.float64), np.asarray(mask, bool)
  out = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    for t in range(rewards.shape[1]):
      out[b, t] = (
          sum(gamma ** (u - t) * rewards[b, u] * mask[b, u] for u in range(t, rewards.shape[1]))
          if mask[b, t]
          else 0.0
      )
  return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_reward_to_go_matches_loop(gamma):
  rewards = random_logits(0, (4, 7))
  mask = jnp.array(
      [
          [1, 1, 1, 1, 1, 1, 1],
          [1, 1, 1, 0, 0, 0, 0],  # right padding
          [0, 0, 1, 1, 1, 1, 0],  # left and right padding
          [1, 1, 0, 1, 1, 0, 1],
      ]
  )  # holes inside the sequence
  np.testing.assert_allclose(
      obj.reward_to_go(rewards, mask, gamma=gamma),
      loop_reward_to_go(rewards, mask, gamma),
      rtol=1e-5,
      atol=1e-6,
  )


def test_reward_to_go_edge_gammas_and_hand_values():
  rewards = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  mask = jnp.ones((1, 4))
  np.testing.assert_allclose(obj.reward_to_go(rewards, mask, gamma=0.0), rewards)
  np.testing.assert_allclose(obj.reward_to_go(rewards, mask, gamma=1.0), [[10, 9, 7, 4]])
  np.testing.assert_allclose(obj.reward_to_go(rewards, mask, gamma=0.5), [[3.25, 4.5, 5, 4]])
  # A masked position inside the sequence carries no reward but keeps the chain (and the
  # discount step): G_0 = 1 + 0.5·(0 + 0.5·3) with position 1 masked.
  holes = jnp.array([[1, 0, 1, 0]])
  np.testing.assert_allclose(obj.reward_to_go(rewards, holes, gamma=0.5), [[1.75, 0, 3, 0]])


def test_reward_to_go_rows_never_mix():
  rewards = random_logits(1, (3, 5))
  mask = jnp.ones((3, 5))
  base = obj.reward_to_go(rewards, mask, gamma=1.0)
  changed = obj.reward_to_go(rewards.at[1].set(100.0), mask, gamma=1.0)
  np.testing.assert_array_equal(base[0], changed[0])
  np.testing.assert_array_equal(base[2], changed[2])
  # Masked-out garbage (even NaN) never leaks.
  poisoned = obj.reward_to_go(rewards.at[0, 2].set(jnp.nan), mask.at[0, 2].set(0), gamma=1.0)
  assert np.all(np.isfinite(poisoned))


def test_reward_to_go_is_stop_gradiented_and_transformable():
  rewards, mask = random_logits(2, (2, 4)), jnp.ones((2, 4))
  grad = jax.grad(lambda r: jnp.sum(obj.reward_to_go(r, mask, gamma=0.9)))(rewards)
  np.testing.assert_array_equal(grad, 0.0)
  fn = lambda r, m: obj.reward_to_go(r, m, gamma=0.7)
  eager = fn(rewards, mask)
  np.testing.assert_allclose(jax.jit(fn)(rewards, mask), eager, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(fn)(rewards[:, None], mask[:, None])[:, 0], eager, rtol=1e-6)


def test_reward_to_go_bad_input():
  with pytest.raises(ValueError, match=r"gamma must be in \[0.0, 1.0\], got -0.1"):
    obj.reward_to_go(jnp.zeros((2, 3)), jnp.ones((2, 3)), gamma=-0.1)
  with pytest.raises(ValueError, match=r"gamma must be in \[0.0, 1.0\], got 1.5"):
    obj.reward_to_go(jnp.zeros((2, 3)), jnp.ones((2, 3)), gamma=1.5)
  with pytest.raises(ValueError, match=r"rewards must have rank 2, got shape \(3,\)"):
    obj.reward_to_go(jnp.zeros(3), jnp.ones(3), gamma=1.0)
  with pytest.raises(ValueError, match=r"rewards \(2, 3\) and mask \(2, 4\)"):
    obj.reward_to_go(jnp.zeros((2, 3)), jnp.ones((2, 4)), gamma=1.0)


# ---------------------------------------------------------------- sequence level, exactly

VOCAB, LENGTH = 3, 3
PREFIXES = [p for t in range(LENGTH) for p in itertools.product(range(VOCAB), repeat=t)]
PREFIX_INDEX = {p: i for i, p in enumerate(PREFIXES)}
SEQUENCES = jnp.array(list(itertools.product(range(VOCAB), repeat=LENGTH)))  # [27, 3]
SEQ_PREFIX = jnp.array(
    [[PREFIX_INDEX[tuple(map(int, s[:t]))] for t in range(LENGTH)] for s in SEQUENCES]
)  # [27, 3]


def tabular_log_probs(table):
  """log π(y_t | y_<t) for every sequence: [27, 3]. `table` is [13 prefixes, V] logits."""
  return obj.token_log_probs(table[SEQ_PREFIX], SEQUENCES)


def sequence_reverse_kl(student, teacher):
  lp, lq = tabular_log_probs(student), tabular_log_probs(teacher)
  seq_lp = jnp.sum(lp, -1)
  return jnp.sum(jnp.exp(seq_lp) * jnp.sum(lp - lq, -1))


def expected_estimator_grad(student, teacher, gamma, rewards_fn=obj.opd_rewards):
  """E_{y~π_θ}[∇ Σ_t −sg(G_t^γ) log p(y_t)], summed exactly over all 27 sequences."""
  weights = jax.lax.stop_gradient(jnp.exp(jnp.sum(tabular_log_probs(student), -1)))
  mask = jnp.ones_like(SEQUENCES)

  def surrogate(student):
    lp, lq = tabular_log_probs(student), tabular_log_probs(teacher)
    returns = obj.reward_to_go(rewards_fn(lp, lq), mask, gamma=gamma)
    return jnp.sum(weights * jnp.sum(obj.policy_gradient_loss(lp, returns), -1))

  return jax.grad(surrogate)(student)


def per_prefix_kl_with_fixed_visitation(student, teacher):
  """Σ_t Σ_{s_t} sg(d_θ(s_t)) KL(p(·|s_t) ‖ q(·|s_t)), enumerating prefixes directly."""
  probs = jax.lax.stop_gradient(jax.nn.softmax(student))
  total = 0.0
  for prefix in PREFIXES:
    visit = 1.0
    for t, token in enumerate(prefix):
      visit = visit * probs[PREFIX_INDEX[prefix[:t]], token]
    index = PREFIX_INDEX[prefix]
    total = total + visit * obj.reverse_kl(student[index], teacher[index])
  return total


@pytest.fixture(name="tables")
def fixture_tables():
  return random_logits(3, (len(PREFIXES), VOCAB)), random_logits(4, (len(PREFIXES), VOCAB))


def test_tabular_policy_is_normalised(tables):
  student, _ = tables
  np.testing.assert_allclose(
      jnp.sum(jnp.exp(jnp.sum(tabular_log_probs(student), -1))), 1.0, rtol=1e-6
  )


def test_gamma_one_is_the_exact_sequence_level_reverse_kl_gradient(tables):
  student, teacher = tables
  np.testing.assert_allclose(
      expected_estimator_grad(student, teacher, 1.0),
      jax.grad(sequence_reverse_kl)(student, teacher),
      atol=1e-6,
  )


def test_gamma_zero_is_the_per_prefix_kl_gradient_with_fixed_visitation(tables):
  student, teacher = tables
  exact = jax.grad(per_prefix_kl_with_fixed_visitation)(student, teacher)
  np.testing.assert_allclose(expected_estimator_grad(student, teacher, 0.0), exact, atol=1e-6)


def test_gamma_zero_and_one_differ_only_where_the_future_matters(tables):
  student, teacher = tables
  g0 = expected_estimator_grad(student, teacher, 0.0)
  g1 = expected_estimator_grad(student, teacher, 1.0)
  last = np.array([len(p) == LENGTH - 1 for p in PREFIXES])
  # Last-step prefixes have no future: both estimators agree there exactly.
  np.testing.assert_allclose(g0[last], g1[last], atol=1e-6)
  # Earlier prefixes see the future KL only with γ = 1.
  assert float(jnp.max(jnp.abs(g0[~last] - g1[~last]))) > 1e-2
  # The values agree: the sequence KL is the sum of per-prefix KLs under the visitation.
  np.testing.assert_allclose(
      sequence_reverse_kl(student, teacher),
      per_prefix_kl_with_fixed_visitation(student, teacher),
      rtol=1e-5,
  )


# ---------------------------------------------------------------- G-OPD


def test_gopd_lambda_one_is_opd_for_any_reference():
  p, q, r = (random_logits(s, (3, 5)) for s in (5, 6, 7))
  expected = obj.opd_rewards(p, q)
  for reference in (r, -r, jnp.full_like(r, -jnp.inf)):
    np.testing.assert_array_equal(obj.gopd_rewards(p, q, reference, reward_scale=1.0), expected)
  np.testing.assert_allclose(expected, q - p)


def test_gopd_formula_and_edges():
  p, q, r = (random_logits(s, (4,)) for s in (8, 9, 10))
  for lam in (0.0, 0.5, 1.25, 1.5):
    np.testing.assert_allclose(
        obj.gopd_rewards(p, q, r, reward_scale=lam), lam * (q - r) - (p - r), rtol=1e-5, atol=1e-6
    )
  np.testing.assert_allclose(obj.gopd_rewards(p, q, r, reward_scale=0.0), r - p, rtol=1e-6)
  with pytest.raises(ValueError, match=r"reward_scale \(λ\) must be >= 0, got -1.0"):
    obj.gopd_rewards(p, q, r, reward_scale=-1.0)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.25])
def test_gopd_expected_gradient_is_reverse_kl_to_the_tilted_teacher(lam):
  z, y, w = (random_logits(s, (6,)) for s in (11, 12, 13))
  tokens = jnp.arange(6)
  p = jax.nn.softmax(z)

  def surrogate(z):
    lp = obj.token_log_probs(jnp.tile(z, (6, 1)), tokens)
    lq = obj.token_log_probs(jnp.tile(y, (6, 1)), tokens)
    lr = obj.token_log_probs(jnp.tile(w, (6, 1)), tokens)
    rewards = obj.gopd_rewards(lp, lq, lr, reward_scale=lam)
    return jnp.sum(jax.lax.stop_gradient(p) * obj.policy_gradient_loss(lp, rewards))

  tilted = obj.tilted_teacher_logits(y, w, reward_scale=lam)
  np.testing.assert_allclose(jax.grad(surrogate)(z), jax.grad(obj.reverse_kl)(z, tilted), atol=1e-6)


def test_tilted_teacher_logits():
  y, w = random_logits(14, (3, 5)), random_logits(15, (3, 5))
  np.testing.assert_array_equal(
      obj.tilted_teacher_logits(y, w, reward_scale=1.0), jax.nn.log_softmax(y)
  )
  np.testing.assert_array_equal(
      obj.tilted_teacher_logits(y, w, reward_scale=0.0), jax.nn.log_softmax(w)
  )
  tilted = obj.tilted_teacher_logits(y, w, reward_scale=1.25)
  np.testing.assert_allclose(jnp.sum(jnp.exp(tilted), -1), 1.0, rtol=1e-6)
  expected = jax.nn.log_softmax(1.25 * jax.nn.log_softmax(y) - 0.25 * jax.nn.log_softmax(w))
  np.testing.assert_allclose(tilted, expected, atol=1e-6)
  # Extrapolating never resurrects a token the reference rules out.
  masked = obj.tilted_teacher_logits(y[0], w[0].at[2].set(-jnp.inf), reward_scale=1.5)
  assert np.isneginf(masked[2]) and np.all(np.isfinite(np.delete(np.asarray(masked), 2)))
  np.testing.assert_array_equal(
      jax.grad(
          lambda y: jnp.sum(obj.reverse_kl(w, obj.tilted_teacher_logits(y, w, reward_scale=0.5)))
      )(y),
      0.0,
  )
  with pytest.raises(ValueError, match="vocabulary sizes differ"):
    obj.tilted_teacher_logits(y, w[:, :4], reward_scale=0.5)


# ---------------------------------------------------------------- GRPO and mixing


def test_grpo_advantages():
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
  adv = obj.grpo_advantages(rewards, epsilon=1e-6)
  np.testing.assert_allclose(adv[0], [1, -1, -1, 1], rtol=1e-5)
  np.testing.assert_array_equal(adv[1], 0.0)  # no signal in a group of equal rewards
  np.testing.assert_allclose(adv[2], (rewards[2] - 0.75) / np.std([0, 0, 0, 3]), rtol=1e-5)
  np.testing.assert_allclose(
      obj.grpo_advantages(rewards, normalize_std=False)[2], [-0.75, -0.75, -0.75, 2.25]
  )
  np.testing.assert_allclose(jnp.sum(adv, -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jax.jit(obj.grpo_advantages)(rewards), adv)
  np.testing.assert_allclose(jax.vmap(obj.grpo_advantages)(rewards), adv)
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    obj.grpo_advantages(rewards, epsilon=0.0)
  with pytest.raises(ValueError, match=r"rewards must be \[..., G\]"):
    obj.grpo_advantages(jnp.float32(1.0))


def test_mix_opd_rl_advantages():
  opd = random_logits(16, (2, 4))
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  seq = jnp.array([0.5, -1.0])
  mixed = obj.mix_opd_rl_advantages(opd, seq, mask, rl_weight=2.0)
  expected = np.where(np.asarray(mask) > 0, np.asarray(opd) + 2.0 * np.asarray(seq)[:, None], 0)
  np.testing.assert_allclose(mixed, expected, rtol=1e-6)
  np.testing.assert_allclose(
      obj.mix_opd_rl_advantages(opd, seq, mask, rl_weight=0.0),
      np.where(np.asarray(mask) > 0, opd, 0),
  )
  with pytest.raises(ValueError, match="rl_weight must be >= 0"):
    obj.mix_opd_rl_advantages(opd, seq, mask, rl_weight=-1.0)
  with pytest.raises(ValueError, match="sequence_advantages has 3 rows, opd_advantages has 2"):
    obj.mix_opd_rl_advantages(opd, jnp.zeros(3), mask, rl_weight=1.0)
