"""The jitted train step, without the loop: micro-batches give the whole-batch update, the
sampler's log-probs line up with the step's targets, and updates go the right way."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from opdjax import learner, recipes, rollouts, sharding
from opdjax import objectives as obj
from opdjax.models import Decoder, tiny_config
from opdjax.recipes.base import join, loss_from_logits
from opdjax.sampling import SamplingParams, generate

BATCH, PROMPT, NEW = 8, 6, 5


def recipe_of(**kwargs):
  c = ml_collections.ConfigDict(
      dict(
          name="opd",
          estimator="full",
          divergence="reverse_kl",
          divergence_kwargs={},
          top_k=0,
          tail_bucket=False,
          gamma=0.0,
          correction="none",
          clip_epsilon=0.2,
          truncation=2.0,
          lambda_on=0.5,
          reward_scale=1.0,
          group_size=2,
          normalize_std=True,
          opd_weight=0.0,
          loss_mean="token",
      )
  )
  c.update(kwargs)
  return recipes.build(c)


@pytest.fixture(scope="module", name="setup")
def fixture_setup():
  config = tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,))
  student = Decoder(config, rngs=nnx.Rngs(0))
  teacher = Decoder(
      tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,), hidden_size=48), rngs=nnx.Rngs(1)
  )
  rng = np.random.RandomState(0)
  prompts = jnp.asarray(rng.randint(2, 23, (BATCH, PROMPT)))
  prompt_mask = np.ones((BATCH, PROMPT), bool)
  prompt_mask[1, :3] = prompt_mask[4, :1] = prompt_mask[6, :5] = False  # left padding
  prompt_mask = jnp.asarray(prompt_mask)
  gen = generate(
      student,
      prompts,
      prompt_mask,
      key=jax.random.key(3),
      max_new_tokens=NEW,
      sampling=SamplingParams(eos_ids=(1,)),
  )
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
  step = learner.make_train_step(
      graphdef,
      recipe,
      tx,
      sharding.state_shardings(params, mesh),
      jax.tree.map(lambda _: None, opt_state),
      microbatches=microbatches,
      chunk_size=7,
  )
  models = {"teacher": teacher, "reference": reference if reference is not None else student}
  frozen = {role: teacher_head(models[role], seq) for role in recipe.roles} or None
  params, _, metrics = step(params, opt_state, seq, frozen)
  return nnx.merge(graphdef, params), jax.device_get(metrics)


@pytest.mark.parametrize(
    "recipe_kwargs",
    [
        dict(name="sft"),
        dict(estimator="full"),
        dict(estimator="sampled", gamma=1.0),
        dict(name="gopd", estimator="sampled", reward_scale=1.25),
        dict(name="grpo", group_size=2, loss_mean="sequence"),
    ],
    ids=["sft", "opd_full", "opd_sampled", "gopd_sampled", "grpo_sequence_mean"],
)
def test_four_microbatches_equal_the_whole_batch(setup, recipe_kwargs):
  student, teacher, seq = setup
  recipe = recipe_of(**recipe_kwargs)
  if recipe.reward:  # groups of 2 with unequal rewards, so the update is not zero
    seq = seq._replace(rewards=jnp.array([1, 0, 0, 1, 1, 0, 1, 1], jnp.float32))
  # SGD, so the parameters compare the summed gradients (Adam's first step is lr·sign(g)).
  whole, metrics_1 = one_step(student, teacher, seq, recipe, microbatches=1, tx=optax.sgd(1.0))
  split, metrics_4 = one_step(student, teacher, seq, recipe, microbatches=4, tx=optax.sgd(1.0))
  np.testing.assert_allclose(metrics_4["loss"][0], metrics_1["loss"][0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics_4["grad_norm"][0], metrics_1["grad_norm"][0], rtol=1e-5)
  for (path, a), (_, b) in zip(
      nnx.to_flat_state(nnx.state(whole)), nnx.to_flat_state(nnx.state(split))
  ):
    np.testing.assert_allclose(b.get_value(), a.get_value(), atol=1e-6, err_msg=str(path))
  # And the step really moved the parameters (an update of zero would also "agree").
  moved = [
      np.abs(a.get_value() - b.get_value()).max()
      for (_, a), (_, b) in zip(
          nnx.to_flat_state(nnx.state(student)), nnx.to_flat_state(nnx.state(whole))
      )
  ]
  assert max(moved) > 1e-4


def test_sampler_logprobs_align_with_the_step_targets(setup):
  """The step scores token t+1 from the logits at slot t; a one-slot shift is caught."""
  student, _, seq = setup
  tokens, mask = recipes.inputs_of(seq)
  targets = recipes.targets_of(seq)
  log_p = obj.token_log_probs(student(tokens, attention_mask=mask), targets.tokens)
  on = np.asarray(targets.mask)
  assert on.sum() > BATCH
  np.testing.assert_allclose(
      np.asarray(log_p)[on], np.asarray(targets.model_logprobs)[on], atol=1e-5
  )
  shifted = obj.token_log_probs(student(tokens, attention_mask=mask)[:, 1:], targets.tokens[:, :-1])
  assert (
      np.abs(
          np.asarray(shifted)[on[:, :-1]] - np.asarray(targets.model_logprobs)[:, :-1][on[:, :-1]]
      ).max()
      > 1e-2
  )
  # The first masked target of every row is its first completion token.
  first = np.argmax(on, axis=1)
  np.testing.assert_array_equal(
      np.asarray(targets.tokens)[np.arange(BATCH), first], np.asarray(seq.tokens)[:, PROMPT]
  )
  np.testing.assert_array_equal(first, PROMPT - 1)


def test_an_opd_update_lowers_the_reverse_kl_on_its_rollout(setup):
  student, teacher, seq = setup
  recipe = recipe_of(estimator="full")
  tokens, mask = recipes.inputs_of(seq)
  targets = recipes.targets_of(seq)

  def token_reverse_kl(model):
    values = obj.reverse_kl(
        model(tokens, attention_mask=mask), teacher(tokens, attention_mask=mask)
    )
    return float(obj.token_mean(values, targets.mask))

  updated, _ = one_step(student, teacher, seq, recipe)
  assert token_reverse_kl(updated) < token_reverse_kl(student) - 1e-4


def test_importance_ratio_is_one_on_policy(setup):
  """Rollouts sampled at T = 1 without truncation and used once: the ratio of the learner's
  to the sampler's probability of every completion token is 1 (to 1e-4)."""
  student, teacher, seq = setup
  _, metrics = one_step(student, teacher, seq, recipe_of(estimator="sampled", correction="plain"))
  total, count = metrics["importance_ratio"]
  assert count > BATCH and abs(total / count - 1.0) < 1e-4


def test_sampled_opd_updates_lower_the_reverse_kl_on_average():
  """The sampled estimator is noisy per rollout, but its expected update is the reverse-KL
  gradient: over 8 rollouts, one small SGD step lowers the token reverse KL on average."""
  config = tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,))
  student = Decoder(config, rngs=nnx.Rngs(0))
  teacher = Decoder(
      tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,), hidden_size=48), rngs=nnx.Rngs(1)
  )
  prompts = jnp.asarray(np.random.RandomState(1).randint(2, 23, (BATCH, PROMPT)))
  prompt_mask = jnp.ones((BATCH, PROMPT), bool)
  recipe = recipe_of(estimator="sampled", gamma=0.0)
  mesh = sharding.make_mesh((1,), ("data",))
  graphdef, params = nnx.split(student)
  tx = optax.sgd(0.05)
  step = learner.make_train_step(
      graphdef,
      recipe,
      tx,
      sharding.state_shardings(params, mesh),
      jax.tree.map(lambda _: None, tx.init(params)),
      chunk_size=7,
  )
  t_graphdef, t_state = nnx.split(teacher)

  @jax.jit
  def token_reverse_kl(params, seq):
    tokens, mask = recipes.inputs_of(seq)
    values = obj.reverse_kl(
        nnx.merge(graphdef, params)(tokens, attention_mask=mask),
        nnx.merge(t_graphdef, t_state)(tokens, attention_mask=mask),
    )
    return obj.token_mean(values, recipes.targets_of(seq).mask)

  drops = []
  for seed in range(8):
    gen = generate(
        student,
        prompts,
        prompt_mask,
        key=jax.random.key(100 + seed),
        max_new_tokens=NEW,
        sampling=SamplingParams(eos_ids=(1,)),
    )
    seq = join(prompts, prompt_mask, gen.tokens, gen.mask, gen.sample_logprobs, gen.model_logprobs)
    fresh = jax.tree.map(jnp.copy, params)
    new_params, _, _ = step(fresh, tx.init(fresh), seq, {"teacher": teacher_head(teacher, seq)})
    drops.append(float(token_reverse_kl(params, seq) - token_reverse_kl(new_params, seq)))
  assert np.mean(drops) > 0, drops


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
    else:  # 5 standard deviations of a binomial(4000, 0.3) is ±145
      assert abs(on - lambda_on * steps) < 5 * np.sqrt(steps * lambda_on * (1 - lambda_on))
  recipe = recipe_of(name="gkd", lambda_on=0.3)
  assert {recipe.source_at(0, s) for s in range(50)} == {"student", "dataset"}
  assert recipe.source_at(3, 11) == on_policy_coin(3, 11, lambda_on=0.3)  # the trainer's draw


def test_gopd_with_lambda_one_is_opd_bitwise(setup):
  """Whatever the reference (here a third model), λ = 1 gives opd's update exactly."""
  student, teacher, seq = setup
  reference = Decoder(tiny_config("qwen3", vocab_size=23, eos_token_ids=(1,)), rngs=nnx.Rngs(9))
  opd, _ = one_step(student, teacher, seq, recipe_of(estimator="sampled", gamma=0.5))
  gopd, _ = one_step(
      student,
      teacher,
      seq,
      recipe_of(name="gopd", estimator="sampled", gamma=0.5, reward_scale=1.0),
      reference=reference,
  )
  for (path, a), (_, b) in zip(
      nnx.to_flat_state(nnx.state(opd)), nnx.to_flat_state(nnx.state(gopd))
  ):
    np.testing.assert_array_equal(b.get_value(), a.get_value(), err_msg=str(path))
  # λ ≠ 1 with that reference is a different update.
  other, _ = one_step(
      student,
      teacher,
      seq,
      recipe_of(name="gopd", estimator="sampled", gamma=0.5, reward_scale=0.5),
      reference=reference,
  )
  assert (
      max(
          np.abs(a.get_value() - b.get_value()).max()
          for (_, a), (_, b) in zip(
              nnx.to_flat_state(nnx.state(opd)), nnx.to_flat_state(nnx.state(other))
          )
      )
      > 1e-6
  )


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
  else:  # a sampled estimate: the reward is log r − log p_old, so log p moves toward log r
    updated, metrics = one_step(
        student, teacher, seq, recipe, reference=reference, tx=optax.sgd(0.1)
    )
    log_p = lambda m: obj.token_log_probs(m(tokens, attention_mask=mask), targets.tokens)
    log_r = obj.token_log_probs(reference(tokens, attention_mask=mask), targets.tokens)
    on = np.asarray(targets.mask)
    gap_before = np.abs(np.asarray(log_r - log_p(student)))[on].mean()
    gap_after = np.abs(np.asarray(log_r - log_p(updated)))[on].mean()
    assert gap_after < gap_before


def grpo_targets():
  """Two groups of two rows: rewards (1, 0) and (1, 1); three completion tokens per row."""
  mask = jnp.array([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], bool)
  old = -jnp.arange(16, dtype=jnp.float32).reshape(4, 4) / 10
  return recipes.Targets(
      tokens=jnp.zeros((4, 4), jnp.int32),
      mask=mask,
      behaviour_logprobs=old,
      model_logprobs=old,
      rewards=jnp.array([1.0, 0.0, 1.0, 1.0]),
  )


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_loss_by_hand(normalize_std):
  """Â = (R − mean)/(std + ε) per group, on every completion token; identical rewards give a
  zero gradient; opd_weight = 0 is pure GRPO."""
  targets = grpo_targets()
  recipe = recipe_of(name="grpo", group_size=2, normalize_std=normalize_std, opd_weight=0.0)
  assert recipe.roles == () and recipe.reward == "exact" and recipe.group_size == 2
  log_p = jnp.full((4, 4), -1.0)
  per_token, metrics = recipe.loss({"log_p": log_p, "student_entropy": jnp.zeros((4, 4))}, targets)
  # Group (1, 0): mean 0.5, centred ±0.5, std 0.5. Group (1, 1): all 0.
  advantage = np.array([0.5, -0.5, 0.0, 0.0]) / (0.5 + 1e-6 if normalize_std else 1.0)
  expected = np.where(targets.mask, advantage[:, None], 0.0)  # −Â·log p with log p = −1
  np.testing.assert_allclose(np.where(targets.mask, per_token, 0.0), expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["verifier_reward"][0] / metrics["verifier_reward"][1], 0.75)
  np.testing.assert_allclose(metrics["zero_std_groups"], (1.0, 2.0))  # (1, 1) of 2 groups
  grad = jax.grad(
      lambda lp: obj.masked_sum(
          recipe.loss({"log_p": lp, "student_entropy": lp}, targets)[0], targets.mask
      )
  )(log_p)
  np.testing.assert_array_equal(grad[2:], 0.0)  # the (1, 1) group
  assert np.abs(grad[:2]).max() > 0.4


def test_sequence_mean_weighs_each_completion_equally():
  """loss_mean="sequence": a row's tokens share 1/(|o_b|·B), so each completion weighs the
  same whatever its length; "token": every token of the batch weighs 1/N."""
  mask = jnp.array([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], bool)
  token = recipes.base.token_weights(recipe_of(name="grpo"), mask, num_tokens=6.0, num_rows=2.0)
  sequence = recipes.base.token_weights(
      recipe_of(name="grpo", loss_mean="sequence"), mask, num_tokens=6.0, num_rows=2.0
  )
  np.testing.assert_allclose(token, np.where(mask, 1 / 6, 0.0))
  np.testing.assert_allclose(sequence, np.where(mask, [[1 / 4], [1 / 8]], 0.0))
  with pytest.raises(Exception, match="recipe.loss_mean must be one of .*got 'row'"):
    recipe_of(name="grpo", loss_mean="row")


def test_grpo_opd_weight_adds_the_teachers_dense_advantage():
  targets = grpo_targets()
  log_q = -jnp.ones((4, 4)) * 0.5
  values = {"log_p": jnp.full((4, 4), -1.0), "log_q": log_q, "student_entropy": jnp.zeros((4, 4))}
  pure, _ = recipe_of(name="grpo", group_size=2).loss(values, targets)
  mixed_recipe = recipe_of(name="grpo", group_size=2, opd_weight=0.5, gamma=0.0)
  assert mixed_recipe.roles == ("teacher",)
  mixed, _ = mixed_recipe.loss(values, targets)
  dense = np.asarray(log_q - targets.model_logprobs)  # γ = 0: per-token rewards
  # loss = −A·log p = A (log p = −1), so the difference is 0.5·dense on the mask.
  np.testing.assert_allclose(
      np.where(targets.mask, mixed - pure, 0.0),
      np.where(targets.mask, 0.5 * dense, 0.0),
      rtol=1e-5,
      atol=1e-6,
  )


def test_group_rows_keep_each_prompt_with_its_index():
  batch = {"prompt_tokens": np.array([[1, 2], [3, 4]]), "index": np.array([7, 9])}
  rows = rollouts.repeat_rows(batch, 3)
  np.testing.assert_array_equal(rows["index"], [7, 7, 7, 9, 9, 9])
  np.testing.assert_array_equal(rows["prompt_tokens"][:, 0], [1, 1, 1, 3, 3, 3])


def test_sampled_recipes_declare_their_correction_and_full_ones_none():
  """The trainer refuses correction='none' on off-policy rollouts only for recipes that are
  sampled-token estimators; the recipe says which it is."""
  assert recipe_of(estimator="sampled", correction="ppo_clip").correction == "ppo_clip"
  assert recipe_of(estimator="sampled").correction == "none"
  assert recipe_of(name="gopd", estimator="sampled").correction == "none"
  assert recipe_of(name="grpo").correction == "none"
  for kwargs in (
      dict(estimator="full"),
      dict(estimator="topk", top_k=3),
      dict(name="sft"),
      dict(name="gkd"),
      dict(name="gopd", estimator="full"),
  ):
    assert recipe_of(**kwargs).correction is None, kwargs


def test_microbatches_of_rows_split_over_devices_move_no_rows():
  """On 8 devices with the rows split over them, a step of 4 micro-batches (GRPO groups of
  2, kept whole) takes each block from every device's own rows (`learner.strided_blocks`):
  its compiled program moves no rows between devices; the only exchange is the embedding
  lookup's (its gather and, backward, its scatter-add, as in the whole-batch step's
  parts). Blocks of consecutive rows each lay on two devices, and XLA moved the rollout and
  the teacher's hidden states with collective permutes in every step."""
  import re

  mesh = sharding.make_mesh((8,), ("fsdp",))
  config = tiny_config("qwen3", vocab_size=64, hidden_size=64, intermediate_size=128)
  model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), scan_layers=True, mesh=mesh))
  graphdef, params = nnx.split(model)
  params = sharding.abstract_state(params, mesh)
  tx = optax.adam(1e-3)
  opt_state = learner.abstract_optimizer_state(tx, params, mesh)
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  step = learner.make_train_step(
      graphdef,
      recipe_of(name="grpo", group_size=2, opd_weight=0.5),
      tx,
      shardings(params),
      shardings(opt_state),
      microbatches=4,
      row_shards=8,
  )
  rows = sharding.batch_sharding(mesh)
  seq = recipes.Sequences.spec(64, 33, rows)
  hidden = jax.ShapeDtypeStruct((64, 32, 48), jnp.float32, sharding=rows)
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  kernel = jax.ShapeDtypeStruct((48, 64), jnp.float32, sharding=whole)
  text = step.lower(params, opt_state, seq, {"teacher": obj.Head(hidden, kernel)}).compile()
  moves = [
      (op, re.search(r'op_name="([^"]*)"', line)[1])
      for line in text.as_text().splitlines()
      for op in re.findall(r"(all-to-all|collective-permute)(?:-start)?\(", line)
  ]
  rows_moved = [(op, name) for op, name in moves if "jit(_take)" not in name]
  assert moves and not rows_moved, rows_moved
