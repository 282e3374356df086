"""The chunked hidden → loss path equals the full-logits path (values and gradients), and
its compiled train step holds no `[B·T, V]` buffer."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from opdjax import objectives as obj
from opdjax import recipes
from opdjax.recipes.base import (
    Targets,
    batch_loss,
    frozen_argument,
    loss_from_hidden,
    loss_from_logits,
)

B, T, D, DT, V = 3, 7, 8, 12, 19  # T = 7: not a multiple of a chunk's 2 positions a row
CHUNK = 4  # positions per chunk: 2 of each of the 3 rows


def _problem(seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  hidden = jax.random.normal(ks[0], (B, T, D))
  kernel = 0.7 * jax.random.normal(ks[1], (D, V))
  teacher_hidden = jax.random.normal(ks[2], (B, T, DT))
  teacher_kernel = 0.7 * jax.random.normal(ks[3], (DT, V))
  vocab_mask = jnp.ones((V,), bool).at[jnp.array([2, 11])].set(False)  # two -inf entries
  tokens = jax.random.randint(ks[4], (B, T), 0, V)
  tokens = jnp.where(vocab_mask[tokens], tokens, 0)  # targets are allowed
  mask = jax.random.bernoulli(ks[5], 0.6, (B, T)).at[1].set(False)  # row 1 fully masked
  behaviour = -jax.random.uniform(ks[6], (B, T), minval=0.5, maxval=3.0)
  old = -jax.random.uniform(ks[7], (B, T), minval=0.5, maxval=3.0)
  targets = Targets(tokens=tokens, mask=mask, behaviour_logprobs=behaviour, model_logprobs=old)
  return hidden, kernel, teacher_hidden, teacher_kernel, vocab_mask, targets


def _full_logits(hidden, kernel, vocab_mask):
  return jnp.where(vocab_mask, obj.fused.logits_of(hidden, kernel), -jnp.inf)


DIVERGENCES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("reverse_kl", {"temperature": 2.0}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.1, "temperature": 0.7}),
    ("alpha_divergence", {"alpha": 0.3}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2}),
    ("total_variation", {}),
]


@pytest.mark.parametrize("name,kwargs", DIVERGENCES, ids=lambda x: str(x))
def test_every_divergence_fused_equals_full(name, kwargs):
  hidden, kernel, t_hidden, t_kernel, vocab_mask, targets = _problem()
  divergence = obj.get_divergence(name, **kwargs)
  fn = lambda s, t, a: {"d": divergence(s, t)}

  def fused(hidden, kernel):
    values = obj.token_values(
        fn,
        obj.Head(hidden, kernel),
        targets.tokens,
        teacher=obj.Head(t_hidden, t_kernel),
        vocab_mask=vocab_mask,
        chunk_size=CHUNK,
    )["d"]
    return obj.token_mean(values, targets.mask), values

  def full(hidden, kernel):
    values = divergence(
        _full_logits(hidden, kernel, vocab_mask), _full_logits(t_hidden, t_kernel, vocab_mask)
    )
    return obj.token_mean(values, targets.mask), values

  (loss_f, values_f), grads_f = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(
      hidden, kernel
  )
  (loss_u, values_u), grads_u = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(
      hidden, kernel
  )
  np.testing.assert_allclose(values_f, values_u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_f, loss_u, rtol=1e-5, atol=1e-6)
  for g_f, g_u in zip(grads_f, grads_u):
    assert np.all(np.isfinite(g_f))
    np.testing.assert_allclose(g_f, g_u, rtol=1e-5, atol=1e-6)
  # The -inf vocabulary entries get exactly no gradient through the head.
  np.testing.assert_array_equal(grads_f[1][:, ~np.asarray(vocab_mask)], 0.0)


RECIPE_CONFIGS = {
    "sft_nll": dict(name="sft"),
    "opd_full_jsd": dict(
        name="opd",
        estimator="full",
        divergence="generalized_jsd",
        divergence_kwargs={"beta": 0.5, "temperature": 1.5},
    ),
    "opd_topk": dict(name="opd", estimator="topk", divergence="reverse_kl", top_k=5),
    "opd_topk_tail": dict(
        name="opd", estimator="topk", divergence="forward_kl", top_k=5, tail_bucket=True
    ),
    "opd_sampled": dict(name="opd", estimator="sampled", gamma=0.5, correction="ppo_clip"),
    "gopd_sampled": dict(name="gopd", estimator="sampled", reward_scale=1.25, gamma=0.0),
    "gopd_full": dict(
        name="gopd",
        estimator="full",
        reward_scale=0.5,
        divergence="generalized_jsd",
        divergence_kwargs={"beta": 0.5},
    ),
}


def _recipe(kwargs):
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
      )
  )
  c.update(kwargs)
  return recipes.build(c)


@pytest.mark.parametrize("variant", sorted(RECIPE_CONFIGS))
def test_recipe_loss_and_metrics_fused_equal_full(variant):
  """NLL, top-K with and without the tail, the sampled estimator and every logged metric."""
  recipe = _recipe(RECIPE_CONFIGS[variant])
  hidden, kernel, t_hidden, t_kernel, vocab_mask, targets = _problem(1)
  heads = {
      "teacher": obj.Head(t_hidden, t_kernel),
      "reference": obj.Head(t_hidden[::-1], 0.5 * t_kernel[:, ::-1]),
  }
  frozen = frozen_argument(recipe, heads)
  frozen_logits = jax.tree.map(
      lambda h: obj.fused.logits_of(*h), frozen, is_leaf=lambda x: isinstance(x, obj.Head)
  )

  def fused(hidden, kernel):
    per_token, metrics = loss_from_hidden(
        recipe, obj.Head(hidden, kernel), frozen, targets, chunk_size=CHUNK
    )
    return obj.token_mean(per_token, targets.mask), metrics

  def full(hidden, kernel):
    per_token, metrics = loss_from_logits(
        recipe, obj.fused.logits_of(hidden, kernel), frozen_logits, targets
    )
    return obj.token_mean(per_token, targets.mask), metrics

  (loss_f, metrics_f), grads_f = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(
      hidden, kernel
  )
  (loss_u, metrics_u), grads_u = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(
      hidden, kernel
  )
  np.testing.assert_allclose(loss_f, loss_u, rtol=1e-5, atol=1e-6)
  assert sorted(metrics_f) == sorted(metrics_u)
  expected = {"student_entropy"} | ({"nll"} if variant == "sft_nll" else {"token_reverse_kl"})
  assert expected <= set(metrics_f), sorted(metrics_f)
  if variant.startswith("opd_topk"):
    assert {"topk_teacher_mass", "topk_student_mass", "topk_overlap"} <= set(metrics_f)
  for name in metrics_f:
    np.testing.assert_allclose(metrics_f[name], metrics_u[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for g_f, g_u in zip(grads_f, grads_u):
    assert np.abs(g_u).max() > 0
    np.testing.assert_allclose(g_f, g_u, rtol=1e-5, atol=1e-6)

  # The trainer's loss: the one-pass gradient where the recipe names its loss value.
  assert (recipe.loss_value is None) == variant.endswith("sampled")
  num_tokens = jnp.sum(targets.mask).astype(jnp.float32)
  trained = lambda hidden, kernel: batch_loss(
      recipe, obj.Head(hidden, kernel), frozen, targets, num_tokens=num_tokens, chunk_size=CHUNK
  )
  (loss_t, metrics_t), grads_t = jax.value_and_grad(trained, argnums=(0, 1), has_aux=True)(
      hidden, kernel
  )
  np.testing.assert_allclose(loss_t, loss_u, rtol=1e-5, atol=1e-6)
  for name in metrics_u:
    np.testing.assert_allclose(metrics_t[name], metrics_u[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for g_t, g_u in zip(grads_t, grads_u):
    np.testing.assert_allclose(g_t, g_u, rtol=1e-5, atol=1e-6)


# The one-pass loss's head backward: one product (the GPU/TPU form), and blocks of the
# vocabulary (the CPU form) with V = 19 = 3 blocks of 5 and a shorter last one.
HEAD_BLOCKS = pytest.mark.parametrize("head_block", [0, 5], ids=["one_product", "blocks_of_5"])


@HEAD_BLOCKS
def test_one_pass_and_rematerialised_paths_equal_whole_logits(head_block, monkeypatch):
  monkeypatch.setitem(obj.fused.HEAD_BLOCK, jax.default_backend(), head_block)
  hidden, kernel, t_hidden, t_kernel, vocab_mask, targets = _problem(3)
  weights = targets.mask / jnp.sum(targets.mask)
  fn = lambda s, t, a: {
      "loss": obj.skew_reverse_kl(s, t, alpha=0.2),
      "lp": obj.token_log_probs(s, a),
  }

  def one_pass(hidden, kernel):
    return obj.fused.weighted_token_sum(
        fn,
        obj.Head(hidden, kernel),
        targets.tokens,
        weights,
        teacher=obj.Head(t_hidden, t_kernel),
        vocab_mask=vocab_mask,
        chunk_size=CHUNK,
    )

  def remat(hidden, kernel):
    values = obj.token_values(
        fn,
        obj.Head(hidden, kernel),
        targets.tokens,
        teacher=obj.Head(t_hidden, t_kernel),
        vocab_mask=vocab_mask,
        chunk_size=CHUNK,
    )
    return jnp.sum(weights * values["loss"]), values

  def full(hidden, kernel):  # the reference: whole logits, autodiff
    student = _full_logits(hidden, kernel, vocab_mask)
    values = fn(student, _full_logits(t_hidden, t_kernel, vocab_mask), targets.tokens)
    return jnp.sum(weights * values["loss"]), values

  (l1, v1), g1 = jax.value_and_grad(one_pass, argnums=(0, 1), has_aux=True)(hidden, kernel)
  (l2, v2), g2 = jax.value_and_grad(remat, argnums=(0, 1), has_aux=True)(hidden, kernel)
  (l0, _), g0 = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, kernel)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(l0, l2, rtol=1e-6)
  np.testing.assert_allclose(v1["lp"], v2["lp"], rtol=1e-6, atol=1e-6)
  for a, b, reference in zip(g1, g2, g0):  # both paths run the head backward in blocks
    np.testing.assert_allclose(a, reference, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, reference, rtol=1e-5, atol=1e-7)
  # Under jit and scaled by an outer factor (the cotangent reaches the stored gradients).
  g3 = jax.jit(jax.grad(lambda h, k: 3.0 * one_pass(h, k)[0], argnums=(0, 1)))(hidden, kernel)
  for a, b in zip(g3, g2):
    np.testing.assert_allclose(a, 3.0 * b, rtol=1e-5, atol=1e-7)


def test_chunk_size_does_not_change_values():
  hidden, kernel, t_hidden, t_kernel, _, targets = _problem(2)
  fn = lambda s, t, a: {"lp": obj.token_log_probs(s, a), "kl": obj.reverse_kl(s, t)}
  outs = [
      obj.token_values(
          fn,
          obj.Head(hidden, kernel),
          targets.tokens,
          teacher=obj.Head(t_hidden, t_kernel),
          chunk_size=c,
          row_shards=shards,
      )
      for c, shards in ((1, 1), (5, 1), (B * T, 1), (64, 1), (0, 1), (2, 2), (4, 3), (0, 3))
  ]
  for out in outs[1:]:
    for name in ("lp", "kl"):
      np.testing.assert_allclose(out[name], outs[0][name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [0, 2, 5, 64])
def test_head_backward_partial_sums_by_row_block_add_up_to_the_whole(block):
  """`head_backward` with `[S, D, V]` partial sums (one per block of rows) adds each block's
  product to its own sum, whole or in vocabulary blocks; their total is the `[D, V]` one."""
  ks = jax.random.split(jax.random.key(3), 4)
  hidden_c, kernel = jax.random.normal(ks[0], (6, D)), jax.random.normal(ks[1], (D, V))
  grad_logits = jax.random.normal(ks[2], (6, V))
  start = jax.random.normal(ks[3], (3, D, V))
  whole_h, whole_k = obj.fused.head_backward(
      hidden_c, kernel, grad_logits, start.sum(0), block=block
  )
  partial_h, partial_k = obj.fused.head_backward(hidden_c, kernel, grad_logits, start, block=block)
  np.testing.assert_allclose(partial_h, whole_h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(partial_k.sum(0), whole_k, rtol=1e-5, atol=1e-5)
  for s in range(3):  # rows 2s and 2s + 1 went to sum s
    rows = slice(2 * s, 2 * s + 2)
    np.testing.assert_allclose(
        partial_k[s] - start[s], hidden_c[rows].T @ grad_logits[rows], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("one_pass", [True, False], ids=["weighted_token_sum", "token_values"])
def test_row_shards_change_no_gradient(one_pass):
  """Split into row blocks (`row_shards` = 3 divides B = 3: the head gradient is summed per
  block, then over blocks), values and gradients equal one block's."""
  hidden, kernel, t_hidden, t_kernel, vocab_mask, targets = _problem(4)
  fn = lambda s, t, a: {"kl": obj.reverse_kl(s, t)}
  weights = targets.mask / jnp.sum(targets.mask)

  def loss(hidden, kernel, row_shards):
    kwargs = dict(
        teacher=obj.Head(t_hidden, t_kernel),
        vocab_mask=vocab_mask,
        chunk_size=CHUNK,
        row_shards=row_shards,
    )
    student = obj.Head(hidden, kernel)
    if one_pass:
      total, _ = obj.fused.weighted_token_sum(
          fn, student, targets.tokens, weights, key="kl", **kwargs
      )
      return total
    return obj.masked_sum(obj.token_values(fn, student, targets.tokens, **kwargs)["kl"], weights)

  one = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel, 1)
  three = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel, 3)
  for a, b in zip(jax.tree.leaves(three), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("one_pass", [True, False], ids=["weighted_token_sum", "token_values"])
def test_rows_split_over_devices_are_chunked_where_they_lie(one_pass):
  """With the batch's rows split over 8 devices, each device computes the chunks of its own
  rows: the compiled loss gathers nothing and sums the head's gradient over devices once,
  outside the chunk loop. (Chunks of the flattened `B·T` positions each lay on one device,
  so XLA gathered the whole batch onto every device and each computed every chunk; a
  replicated `[D, V]` accumulator was summed over devices in every chunk.)"""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from opdjax import sharding

  mesh = sharding.make_mesh((8,), ("fsdp",))
  rows, whole = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
  hidden = jax.ShapeDtypeStruct((16, 24, 32), jnp.float32, sharding=rows)
  kernel = jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=whole)
  tokens = jax.ShapeDtypeStruct((16, 24), jnp.int32, sharding=rows)
  fn = lambda s, t, a: {"kl": obj.reverse_kl(s, t)}

  def loss(hidden, kernel, t_hidden, t_kernel, tokens):
    student = obj.Head(hidden, kernel)
    # 2 rows × 16 positions of each chunk on each device
    kwargs = dict(teacher=obj.Head(t_hidden, t_kernel), chunk_size=32, row_shards=8)
    if one_pass:
      weights = jnp.ones(tokens.shape)
      return obj.fused.weighted_token_sum(fn, student, tokens, weights, key="kl", **kwargs)[0]
    return jnp.sum(obj.token_values(fn, student, tokens, **kwargs)["kl"])

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  text = grad.lower(hidden, kernel, hidden, kernel, tokens).compile().as_text()
  loop_bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
  collectives = r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
  found, computation = set(), None
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
    if header and line.rstrip().endswith("{"):
      computation = header[1]
    where = "in a loop" if computation in loop_bodies else "once"
    found |= {(op, where) for op in re.findall(collectives, line)}
  assert found == {("all-reduce", "once")}, found


def test_auto_chunk_size_by_backend(monkeypatch):
  """A backend in `AUTO_CHUNK_TOKENS` (the GPU's) gets that many tokens whatever the
  vocabulary; the others get about `AUTO_CHUNK_ELEMENTS` logits, in multiples of 8."""
  backend = jax.default_backend()
  monkeypatch.setattr(obj.fused, "AUTO_CHUNK_TOKENS", {})
  monkeypatch.setattr(obj.fused, "AUTO_CHUNK_ELEMENTS", {backend: 1 << 22})
  assert obj.fused.auto_chunk_size(151_936, 4096) == 24  # 27 tokens' logits, down to 8s
  assert obj.fused.auto_chunk_size(32_768, 4096) == 128
  assert obj.fused.auto_chunk_size(32_768, 100) == 100  # never more than the tokens
  assert obj.fused.auto_chunk_size(1 << 23, 4096) == 8  # at least 8
  monkeypatch.setattr(obj.fused, "AUTO_CHUNK_TOKENS", {backend: 1024})
  assert obj.fused.auto_chunk_size(151_936, 4096) == obj.fused.auto_chunk_size(32_768, 4096) == 1024
  assert obj.fused.auto_chunk_size(151_936, 600) == 600


def test_bad_input_names_the_value():
  hidden, kernel, t_hidden, t_kernel, _, targets = _problem()
  fn = lambda s, t, a: {"lp": obj.token_log_probs(s, a)}
  with pytest.raises(ValueError, match="chunk_size must be an integer >= 0"):
    obj.token_values(fn, obj.Head(hidden, kernel), targets.tokens, chunk_size=-1)
  with pytest.raises(ValueError, match="row_shards must be an integer >= 1, got 0"):
    obj.token_values(fn, obj.Head(hidden, kernel), targets.tokens, row_shards=0)
  with pytest.raises(ValueError, match=r"tokens \(3, 6\) must be \[B, T\]"):
    obj.token_values(fn, obj.Head(hidden, kernel), targets.tokens[:, :6])
  with pytest.raises(ValueError, match="teacher hidden"):
    obj.token_values(
        fn, obj.Head(hidden, kernel), targets.tokens, teacher=obj.Head(t_hidden, t_kernel[:, :5])
    )
  with pytest.raises(ValueError, match="kernel"):
    obj.token_values(fn, obj.Head(hidden, kernel.T), targets.tokens)
  # The one-pass sum validates the same inputs, and its weights.
  weights = jnp.ones(targets.tokens.shape)
  with pytest.raises(ValueError, match="chunk_size must be an integer >= 0"):
    obj.fused.weighted_token_sum(
        fn, obj.Head(hidden, kernel), targets.tokens, weights, key="lp", chunk_size=-1
    )
  with pytest.raises(ValueError, match="teacher hidden"):
    obj.fused.weighted_token_sum(
        fn,
        obj.Head(hidden, kernel),
        targets.tokens,
        weights,
        key="lp",
        teacher=obj.Head(t_hidden, t_kernel[:, :5]),
    )
  with pytest.raises(ValueError, match=r"weights \(3, 6\) must be \[B, T\]"):
    obj.fused.weighted_token_sum(
        fn, obj.Head(hidden, kernel), targets.tokens, weights[:, :6], key="lp"
    )


def test_teacher_gets_no_gradient():
  hidden, kernel, t_hidden, t_kernel, _, targets = _problem()
  fn = lambda s, t, a: {"d": obj.generalized_jsd(s, t, beta=0.5)}

  def loss(t_hidden, t_kernel):
    values = obj.token_values(
        fn,
        obj.Head(hidden, kernel),
        targets.tokens,
        teacher=obj.Head(t_hidden, t_kernel),
        chunk_size=CHUNK,
    )
    return jnp.sum(values["d"])

  for grad in jax.grad(loss, argnums=(0, 1))(t_hidden, t_kernel):
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
    "recipe_kwargs",
    [
        dict(
            name="opd",
            estimator="full",
            divergence="generalized_jsd",
            divergence_kwargs={"beta": 0.5},
        ),
        dict(name="opd", estimator="sampled", gamma=1.0),
    ],
    ids=["jsd_one_pass", "sampled_remat"],
)
def test_compiled_opd_step_at_qwen3_vocabulary_holds_no_full_logits(recipe_kwargs):
  """V = 151,936, hidden 64, B·T = 4096: one [B·T, V] float32 buffer would be 2.5 GB."""
  vocab, width, batch, length = 151_936, 64, 16, 256
  recipe = _recipe(recipe_kwargs)
  shapes = dict(hidden=(batch, length, width), kernel=(width, vocab))

  @jax.jit
  def step(hidden, kernel, t_hidden, t_kernel, tokens, mask):
    targets = Targets(
        tokens=tokens,
        mask=mask,
        behaviour_logprobs=jnp.zeros(tokens.shape),
        model_logprobs=jnp.zeros(tokens.shape),
    )

    def loss(hidden, kernel):
      return batch_loss(
          recipe,
          obj.Head(hidden, kernel),
          obj.Head(t_hidden, t_kernel),
          targets,
          num_tokens=jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32),
      )

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, kernel)

  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  compiled = step.lower(
      f32(shapes["hidden"]),
      f32(shapes["kernel"]),
      f32(shapes["hidden"]),
      f32(shapes["kernel"]),
      jax.ShapeDtypeStruct((batch, length), jnp.int32),
      jax.ShapeDtypeStruct((batch, length), bool),
  ).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  full_logits = batch * length * vocab * 4
  assert full_logits > 2.4e9
  assert temp < 1e9, f"temporaries {temp / 1e9:.2f} GB"


@HEAD_BLOCKS
def test_bfloat16_hidden_states_get_bfloat16_gradients(head_block, monkeypatch):
  """Mixed precision: bf16 hidden/head in, float32 loss, gradients in the inputs' dtype and
  close to the float32 computation, on both fused paths."""
  monkeypatch.setitem(obj.fused.HEAD_BLOCK, jax.default_backend(), head_block)
  hidden, kernel, t_hidden, t_kernel, _, targets = _problem(4)
  weights = targets.mask / jnp.sum(targets.mask)
  fn = lambda s, t, a: {"loss": obj.reverse_kl(s, t)}
  bf16 = lambda x: x.astype(jnp.bfloat16)

  def one_pass(h, k):
    return obj.fused.weighted_token_sum(
        fn,
        obj.Head(h, k),
        targets.tokens,
        weights,
        teacher=obj.Head(bf16(t_hidden), bf16(t_kernel)),
        chunk_size=CHUNK,
    )[0]

  def remat(h, k):
    values = obj.token_values(
        fn,
        obj.Head(h, k),
        targets.tokens,
        teacher=obj.Head(bf16(t_hidden), bf16(t_kernel)),
        chunk_size=CHUNK,
    )
    return jnp.sum(weights * values["loss"])

  reference = jax.grad(remat, argnums=(0, 1))(
      bf16(hidden).astype(jnp.float32), bf16(kernel).astype(jnp.float32)
  )
  for loss in (one_pass, remat):
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(bf16(hidden), bf16(kernel))
    assert value.dtype == jnp.float32
    for g, r in zip(grads, reference):
      assert g.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0.05, atol=2e-3)


def test_routed_hidden_states_score_each_row_with_its_own_head():
  """`route_hidden` + the stacked kernels give row b the logits of model route[b], for
  models of different widths, and the fused loss takes them as one teacher."""
  keys = jax.random.split(jax.random.key(7), 4)
  h0, h1 = jax.random.normal(keys[0], (4, 3, 5)), jax.random.normal(keys[1], (4, 3, 7))
  w0, w1 = jax.random.normal(keys[2], (5, 11)), jax.random.normal(keys[3], (7, 11))
  route = jnp.array([1, 0, 0, 1])
  logits = obj.route_hidden([h0, h1], route) @ jnp.concatenate([w0, w1])
  own = jnp.where((route == 0)[:, None, None], h0 @ w0, h1 @ w1)
  np.testing.assert_allclose(logits, own, rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits, jnp.where((route == 1)[:, None, None], h0 @ w0, h1 @ w1))
