"""The jitted train step, without the loop: micro-batches give the whole-batch update, the
sampler's log-probs line up with the step's targets, and updates go the right way."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from opdjax import objectives as obj
from opdjax import recipes, sharding, trainer
from opdjax.models import Decoder, tiny_config
from opdjax.recipes.base import join, loss_from_logits
from opdjax.sampling import SamplingParams, generate

BATCH, PROMPT, NEW = 8, 6, 5


def recipe_of(**kwargs):
  c = ml_collections.ConfigDict(dict(
      name="opd", estimator="full", divergence="reverse_kl", divergence_kwargs={}, top_k=0,
      tail_bucket=False, gamma=0.0, correction="none", clip_epsilon=0.2, truncation=2.0,
      lambda_on=0.5, reward_scale=1.0))
  c.update(kwargs)
  return recipes.build(c)


@pytest.fixture(scope="module", name="setup")
def fixture_setup():
  config = tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,))
  student = Decoder(config, rngs=nnx.Rngs(0))
  teacher = Decoder(tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,), hidden_size=48),
                    rngs=nnx.Rngs(1))
  rng = np.random.RandomState(0)
  prompts = jnp.asarray(rng.randint(2, 23, (BATCH, PROMPT)))
  prompt_mask = np.ones((BATCH, PROMPT), bool)
  prompt_mask[1, :3] = prompt_mask[4, :1] = prompt_mask[6, :5] = False    # left padding
  prompt_mask = jnp.asarray(prompt_mask)
  gen = generate(student, prompts, prompt_mask, key=jax.random.key(3), max_new_tokens=NEW,
                 sampling=SamplingParams(eos_ids=(1,)))
  seq = join(prompts, prompt_mask, gen.tokens, gen.mask, gen.sample_logprobs, gen.model_logprobs)
  return student, teacher, seq


def teacher_head(teacher, seq):
  tokens, mask = recipes.inputs_of(seq)
  return obj.Head(teacher.hidden_states(tokens, attention_mask=mask), teacher.head_kernel())


def one_step(student, teacher, seq, recipe, *, microbatches=1, tx=None, reference=None):
  mesh = sharding.make_mesh((1,), ("data",))
  graphdef, params = nnx.split(student)
  params = jax.tree.map(jnp.copy, params)
  tx = tx or optax.adam(1e-3)
  opt_state = tx.init(params)
  step = trainer.make_train_step(graphdef, recipe, tx, sharding.state_shardings(params, mesh),
                                 jax.tree.map(lambda _: None, opt_state),
                                 microbatches=microbatches, chunk_size=7)
  models = {"teacher": teacher, "reference": reference if reference is not None else student}
  frozen = {role: teacher_head(models[role], seq) for role in recipe.roles} or None
  params, _, metrics = step(params, opt_state, seq, frozen)
  return nnx.merge(graphdef, params), jax.device_get(metrics)


@pytest.mark.parametrize("recipe_kwargs", [dict(name="sft"), dict(estimator="full"),
                                           dict(estimator="sampled", gamma=1.0),
                                           dict(name="gopd", estimator="sampled", reward_scale=1.25)],
                         ids=["sft", "opd_full", "opd_sampled", "gopd_sampled"])
def test_four_microbatches_equal_the_whole_batch(setup, recipe_kwargs):
  student, teacher, seq = setup
  recipe = recipe_of(**recipe_kwargs)
  # SGD, so the parameters compare the summed gradients (Adam's first step is lr·sign(g)).
  whole, metrics_1 = one_step(student, teacher, seq, recipe, microbatches=1, tx=optax.sgd(1.0))
  split, metrics_4 = one_step(student, teacher, seq, recipe, microbatches=4, tx=optax.sgd(1.0))
  np.testing.assert_allclose(metrics_4["loss"][0], metrics_1["loss"][0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics_4["grad_norm"][0], metrics_1["grad_norm"][0], rtol=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(whole)),
                               nnx.to_flat_state(nnx.state(split))):
    np.testing.assert_allclose(b.get_value(), a.get_value(), atol=1e-6, err_msg=str(path))
  # And the step really moved the parameters (an update of zero would also "agree").
  moved = [np.abs(a.get_value() - b.get_value()).max() for (_, a), (_, b) in
           zip(nnx.to_flat_state(nnx.state(student)), nnx.to_flat_state(nnx.state(whole)))]
  assert max(moved) > 1e-4


def test_sampler_logprobs_align_with_the_step_targets(setup):
  """The step scores token t+1 from the logits at slot t; a one-slot shift is caught."""
  student, _, seq = setup
  tokens, mask = recipes.inputs_of(seq)
  targets = recipes.targets_of(seq)
  log_p = obj.token_log_probs(student(tokens, attention_mask=mask), targets.tokens)
  on = np.asarray(targets.mask)
  assert on.sum() > BATCH
  np.testing.assert_allclose(np.asarray(log_p)[on], np.asarray(targets.model_logprobs)[on],
                             atol=1e-5)
  shifted = obj.token_log_probs(student(tokens, attention_mask=mask)[:, 1:], targets.tokens[:, :-1])
  assert np.abs(np.asarray(shifted)[on[:, :-1]] - np.asarray(targets.model_logprobs)[:, :-1][on[:, :-1]]).max() > 1e-2
  # The first masked target of every row is its first completion token.
  first = np.argmax(on, axis=1)
  np.testing.assert_array_equal(np.asarray(targets.tokens)[np.arange(BATCH), first],
                                np.asarray(seq.tokens)[:, PROMPT])
  np.testing.assert_array_equal(first, PROMPT - 1)


def test_an_opd_update_lowers_the_reverse_kl_on_its_rollout(setup):
  student, teacher, seq = setup
  recipe = recipe_of(estimator="full")
  tokens, mask = recipes.inputs_of(seq)
  targets = recipes.targets_of(seq)

  def token_reverse_kl(model):
    values = obj.reverse_kl(model(tokens, attention_mask=mask),
                            teacher(tokens, attention_mask=mask))
    return float(obj.token_mean(values, targets.mask))

  updated, _ = one_step(student, teacher, seq, recipe)
  assert token_reverse_kl(updated) < token_reverse_kl(student) - 1e-4


def test_sampled_loss_gradient_is_minus_reward_times_score(setup):
  """On-policy, d loss / d z = −(1/N) Σ_t (log q(a_t) − log p(a_t)) ∇_z log p(a_t), γ = 0."""
  student, teacher, seq = setup
  recipe = recipe_of(estimator="sampled", gamma=0.0)
  tokens, mask = recipes.inputs_of(seq)
  targets = recipes.targets_of(seq)
  teacher_logits = teacher(tokens, attention_mask=mask)
  logits = student(tokens, attention_mask=mask)
  # On-policy: the rollout's old log-probs are the current student's.
  targets = targets._replace(model_logprobs=obj.token_log_probs(logits, targets.tokens))

  def loss(z):
    per_token, _ = loss_from_logits(recipe, z, teacher_logits, targets)
    return obj.token_mean(per_token, targets.mask)

  def expected(z):
    log_p = obj.token_log_probs(z, targets.tokens)
    reward = jax.lax.stop_gradient(obj.token_log_probs(teacher_logits, targets.tokens) - log_p)
    return -obj.masked_sum(reward * log_p, targets.mask) / jnp.sum(targets.mask)

  np.testing.assert_allclose(jax.grad(loss)(logits), jax.grad(expected)(logits), atol=1e-6)
  # Gradient descent on it raises log p(a_t) where the teacher likes a_t more than p does.
  reward = np.asarray(obj.token_log_probs(teacher_logits, targets.tokens) - targets.model_logprobs)
  step = -1e-2 * jax.grad(loss)(logits)
  gain = np.asarray(obj.token_log_probs(logits + step, targets.tokens) - targets.model_logprobs)
  on = np.asarray(targets.mask)
  assert np.corrcoef(reward[on], gain[on])[0, 1] > 0.5


def test_gkd_coin_is_on_policy_with_probability_lambda_on():
  from opdjax.recipes.gkd import on_policy_coin
  steps = 4000
  for lambda_on in (0.0, 0.3, 1.0):
    on = sum(on_policy_coin(7, step, lambda_on=lambda_on) == "student" for step in range(steps))
    if lambda_on in (0.0, 1.0):
      assert on == lambda_on * steps
    else:   # 5 standard deviations of a binomial(4000, 0.3) is ±145
      assert abs(on - lambda_on * steps) < 5 * np.sqrt(steps * lambda_on * (1 - lambda_on))
  recipe = recipe_of(name="gkd", lambda_on=0.3)
  assert {recipe.source_at(0, s) for s in range(50)} == {"student", "dataset"}
  assert recipe.source_at(3, 11) == on_policy_coin(3, 11, lambda_on=0.3)   # the trainer's draw


def test_gopd_with_lambda_one_is_opd_bitwise(setup):
  """Whatever the reference (here a third model), λ = 1 gives opd's update exactly."""
  student, teacher, seq = setup
  reference = Decoder(tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,)), rngs=nnx.Rngs(9))
  opd, _ = one_step(student, teacher, seq, recipe_of(estimator="sampled", gamma=0.5))
  gopd, _ = one_step(student, teacher, seq, recipe_of(name="gopd", estimator="sampled",
                                                      gamma=0.5, reward_scale=1.0),
                     reference=reference)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(opd)), nnx.to_flat_state(nnx.state(gopd))):
    np.testing.assert_array_equal(b.get_value(), a.get_value(), err_msg=str(path))
  # λ ≠ 1 with that reference is a different update.
  other, _ = one_step(student, teacher, seq, recipe_of(name="gopd", estimator="sampled",
                                                       gamma=0.5, reward_scale=0.5),
                      reference=reference)
  assert max(np.abs(a.get_value() - b.get_value()).max() for (_, a), (_, b) in zip(
      nnx.to_flat_state(nnx.state(opd)), nnx.to_flat_state(nnx.state(other)))) > 1e-6


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_gopd_with_lambda_zero_pulls_toward_the_reference(setup, estimator):
  student, teacher, seq = setup
  reference = Decoder(tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,)), rngs=nnx.Rngs(9))
  tokens, mask = recipes.inputs_of(seq)
  targets = recipes.targets_of(seq)

  def kl_to(model, target):
    values = obj.reverse_kl(model(tokens, attention_mask=mask), target(tokens, attention_mask=mask))
    return float(obj.token_mean(values, targets.mask))

  recipe = recipe_of(name="gopd", estimator=estimator, reward_scale=0.0)
  if estimator == "full":
    updated, _ = one_step(student, teacher, seq, recipe, reference=reference)
    assert kl_to(updated, reference) < kl_to(student, reference) - 1e-4
  else:   # a sampled estimate: the reward is log r − log p_old, so log p moves toward log r
    updated, metrics = one_step(student, teacher, seq, recipe, reference=reference,
                                tx=optax.sgd(0.1))
    log_p = lambda m: obj.token_log_probs(m(tokens, attention_mask=mask), targets.tokens)
    log_r = obj.token_log_probs(reference(tokens, attention_mask=mask), targets.tokens)
    on = np.asarray(targets.mask)
    gap_before = np.abs(np.asarray(log_r - log_p(student)))[on].mean()
    gap_after = np.abs(np.asarray(log_r - log_p(updated)))[on].mean()
    assert gap_after < gap_before
