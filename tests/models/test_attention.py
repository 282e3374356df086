"""Attention: the decode step's windows over the filled cache, and the full-sequence kernels
(XLA in query blocks, cuDNN's even lengths, Pallas splash) against a plain float32
reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.models import attention


def test_decode_windows(monkeypatch):
  """Multiples of `DECODE_WINDOW` up to `DECODE_WINDOWS_UP_TO` of the cache, coarser where
  there would be more than `MAX_DECODE_WINDOWS`, then the whole cache."""
  assert attention.decode_windows(80) == (80,)
  assert attention.decode_windows(255) == (255,)  # no window short of half the cache
  assert attention.decode_windows(256) == (128, 256)
  assert attention.decode_windows(528) == (128, 256, 528)
  assert attention.decode_windows(4096) == (293, 586, 879, 1172, 1465, 1758, 4096)
  monkeypatch.setattr(attention, "DECODE_WINDOWS_UP_TO", 1.0)  # up to the whole cache
  assert attention.decode_windows(528) == (128, 256, 384, 512, 528)
  assert attention.decode_windows(512) == (128, 256, 384, 512)
  monkeypatch.setattr(attention, "DECODE_WINDOWS_UP_TO", 0.0)  # none
  assert attention.decode_windows(4096) == (4096,)


def test_decode_windows_where_a_conditional_costs_more_than_a_small_cache(monkeypatch):
  """A backend listed in `WINDOWED_DECODE_MIN_BYTES` (the GPU's conditionals run from the
  host) reads a small layer cache whole: its decode step traces to no conditional."""
  monkeypatch.setattr(attention, "DECODE_WINDOW", 2)
  q = jnp.ones((3, 1, 4, 8), jnp.float32)
  keys = jnp.ones((3, 2, 8, 12), jnp.float32)  # 2 * 3 * 2 * 12 * 8 * 4 = 4,608 bytes a layer
  cache = attention.LayerCache(keys, keys.swapaxes(-1, -2), index=jnp.int32(4))
  mask = jnp.ones((3, 1, 12), bool)

  def conditionals(threshold):
    monkeypatch.setattr(attention, "WINDOWED_DECODE_MIN_BYTES", {jax.default_backend(): threshold})
    jaxpr = jax.make_jaxpr(lambda *args: attention.attend_one(*args))(q, cache, mask)  # no cache
    return sum(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns)

  assert len(attention.decode_windows(528, 1 << 20)) == 7  # no threshold for the backend
  assert conditionals(4_609) == 0
  assert attention.decode_windows(12, 4_608) == (12,)
  assert conditionals(4_608) == 1
  assert attention.decode_windows(12, 4_608 + 1) == (2, 4, 6, 12)
  assert conditionals(None) == 0  # never (a GPU's setting)
  assert attention.decode_windows(528) == (528,)


@pytest.mark.parametrize("filled,window", [(5, 6), (6, 6), (7, 8)])
def test_a_decode_step_reads_only_its_window(monkeypatch, filled, window):
  """Slots past the chosen window hold NaN: a step that read them would return NaN (a
  masked slot still multiplies its value by a zero weight). Windows of 2 slots up to half
  of 24: 2, 4, ..., 12, then 24."""
  monkeypatch.setattr(attention, "DECODE_WINDOW", 2)
  assert attention.decode_windows(24) == (2, 4, 6, 8, 10, 12, 24)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(3, 1, 4, 8)), jnp.float32)
  keys, values = (jnp.asarray(rng.normal(size=(3, 2, 24, 8)), jnp.float32) for _ in range(2))
  mask = np.arange(24)[None, None, :] < filled
  mask = jnp.asarray(np.repeat(mask, 3, axis=0))
  mask = mask.at[1, 0, 0].set(False)  # a hole, as padding leaves
  mask = mask.at[2].set(False)  # a fully masked row (a finished row's padding)
  expected = attention.attend(q, keys.swapaxes(1, 2), values.swapaxes(1, 2), mask)
  poison = lambda x: x.at[:, :, window:].set(jnp.nan)  # slots on axis 2: [B, K, S, Dh]
  keys = poison(keys).swapaxes(-1, -2)  # the cache's layout: [B, K, Dh, S]
  cache = attention.LayerCache(keys, poison(values), index=jnp.int32(filled - 1))
  out = attention.attend_one(q, cache, mask)
  np.testing.assert_allclose(out[:2], expected[:2], atol=1e-6)
  assert np.isfinite(out[2]).all()  # its output is never read, but must not be NaN


@pytest.mark.parametrize("stacked", [False, True])
def test_the_pallas_decode_kernel_attends_each_rows_range(stacked):
  """`attend_range` (the "pallas" decode kernel, interpreted on a CPU) over rows whose
  tokens fill slots `[start, index]` equals `attend` over the same slots. The slots outside
  each range hold large keys that would take every weight if read, and 48 slots split into
  three blocks of 16, so a block boundary inside a range is crossed too."""
  rng = np.random.default_rng(1)
  batch, kv_heads, slots, dim = 3, 2, 48, 8
  q = jnp.asarray(rng.normal(size=(batch, 1, 4, dim)), jnp.float32)
  keys, values = (rng.normal(size=(batch, kv_heads, slots, dim)).astype(np.float32) for _ in "kv")
  start, index = np.array([0, 13, 30]), 36  # ranges [0, 36], [13, 36], [30, 36]
  inside = (np.arange(slots)[None] >= start[:, None]) & (np.arange(slots)[None] <= index)
  keys = np.where(inside[:, None, :, None], keys, 50.0 * np.abs(q).max())
  expected = attention.attend(
      q, jnp.asarray(keys).swapaxes(1, 2), jnp.asarray(values).swapaxes(1, 2), inside[:, None]
  )
  keys, values = jnp.asarray(keys).swapaxes(-1, -2), jnp.asarray(values)  # keys [B, K, Dh, S]
  if stacked:  # a scanned model's cache: every layer's rows, this layer's selected
    keys, values = jnp.stack([keys * 0, keys]), jnp.stack([values * 0, values])
  cache = attention.LayerCache(
      keys,
      values,
      jnp.int32(index),
      layer=jnp.int32(1) if stacked else None,
      start=jnp.asarray(start),
  )
  out = attention.attend_one(q, cache, jnp.asarray(inside[:, None]))  # start set: attend_range
  np.testing.assert_allclose(out, expected, atol=2e-6)
  with pytest.raises(ValueError, match=r"one of \('xla', 'pallas'\), got 'triton'"):
    attention.decode_kernel("triton")


def test_the_pallas_decode_kernel_is_refused_on_a_tpu(monkeypatch):
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
  assert attention.decode_kernel() == "xla"
  with pytest.raises(ValueError, match="a GPU \\(Triton\\) kernel; on tpu use 'xla'"):
    attention.decode_kernel("pallas")


def test_dot_product_attention_equals_the_einsum_reference():
  """`attend` (jax.nn.dot_product_attention) against a plain float32 einsum softmax, with GQA,
  padded keys and a query row that sees no key at all."""
  ks = jax.random.split(jax.random.key(0), 3)
  batch, length, slots, heads, kv_heads, dim = 2, 5, 7, 4, 2, 8
  q = jax.random.normal(ks[0], (batch, length, heads, dim))
  k = jax.random.normal(ks[1], (batch, slots, kv_heads, dim))
  v = jax.random.normal(ks[2], (batch, slots, kv_heads, dim))
  mask = np.tril(np.ones((length, slots), bool), k=2)[None].repeat(batch, 0)
  mask[1, :, 0] = False
  mask[0, 3, :] = False  # a padding query: no key
  groups = heads // kv_heads
  qg = q.reshape(batch, length, kv_heads, groups, dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * dim**-0.5
  scores = jnp.where(jnp.asarray(mask)[:, None, None], scores, jnp.finfo(jnp.float32).min)
  expected = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, -1), v).reshape(q.shape)
  np.testing.assert_allclose(attention.attend(q, k, v, jnp.asarray(mask)), expected, atol=2e-6)
  np.testing.assert_allclose(
      attention.attend(q, k, v, jnp.asarray(mask), implementation="xla"), expected, atol=2e-6
  )
  with pytest.raises(ValueError, match="one of .*'auto', 'xla', 'cudnn'.*got 'flash'"):
    attention.attend(q, k, v, jnp.asarray(mask), implementation="flash")


def test_the_kernel_each_setting_resolves_to(monkeypatch):
  """`resolve_implementation` (what `attend` runs and `--dry_run` prints): "auto" and
  "splash" are cuDNN on a GPU for 16-bit inputs with head dims up to 128 in multiples of 8,
  XLA otherwise; explicit kernels stay; an unknown name is an error."""
  resolve = attention.resolve_implementation
  assert resolve("auto", jnp.bfloat16, 128) == "xla"  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve("auto", jnp.bfloat16, 128) == "cudnn"
  assert resolve("splash", jnp.float16, 64) == "cudnn"
  assert resolve("auto", jnp.float32, 128) == "xla"
  assert resolve("auto", jnp.bfloat16, 256) == "xla"
  assert resolve("auto", jnp.bfloat16, 100) == "xla"
  assert resolve("xla", jnp.bfloat16, 128) == "xla"
  with pytest.raises(ValueError, match="one of .*got 'flash'"):
    resolve("flash", jnp.bfloat16, 128)


@pytest.mark.parametrize("block", [3, 5, 10])
def test_attention_in_query_blocks_equals_one_block_in_values_and_gradients(block):
  """Blocks of 3 (the last one padded), 5 (two whole blocks) and 10 (the whole sequence)
  against XLA's attention over all queries at once: outputs and the gradients in q, k and v,
  with GQA, padded keys and a padding query that sees no key."""
  ks = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(ks[0], (2, 10, 4, 8))
  k = jax.random.normal(ks[1], (2, 12, 2, 8))
  v = jax.random.normal(ks[2], (2, 12, 2, 8))
  mask = np.tril(np.ones((10, 12), bool), k=2)[None].repeat(2, 0)
  mask[1, :, :3] = False  # left padding
  mask[0, 4, :] = False  # a padding query: no key
  mask = jnp.asarray(mask)
  cot = jax.random.normal(ks[3], q.shape)
  whole = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
  blocks = lambda q, k, v: attention.attend(q, k, v, mask, implementation="xla", query_block=block)
  np.testing.assert_allclose(blocks(q, k, v), whole(q, k, v), atol=1e-6)  # one softmax each
  loss = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(loss(blocks), loss(whole)):  # k and v: summed over blocks
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_causal_groups_attend_only_the_keys_up_to_their_last_query():
  """10 causal queries in blocks of 3 form two groups (queries 0-5, 6-9). The first group
  must not read the values of slots 6 and on (they hold NaN here, which a masked score
  still multiplies by zero), and on finite inputs the groups equal the ungrouped blocks in
  every real query's output and in the gradients."""
  ks = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(ks[0], (2, 10, 4, 8))
  k = jax.random.normal(ks[1], (2, 10, 2, 8))
  v = jax.random.normal(ks[2], (2, 10, 2, 8))
  valid = np.ones((2, 10), bool)
  valid[1, :3] = False  # left padding: queries 0-2 of row 1 see no key
  mask = jnp.asarray(np.tril(np.ones((10, 10), bool))[None] & valid[:, None, :])
  attend = lambda causal, q, k, v: attention.attend(
      q, k, v, mask, implementation="xla", query_block=3, causal=causal
  )
  poisoned = attend(True, q, k, v.at[:, 6:].set(jnp.nan))
  assert np.isfinite(poisoned[:, :6]).all() and np.isnan(poisoned[:, 6:]).all()
  real = jnp.asarray(valid)[:, :, None, None]
  np.testing.assert_allclose(attend(True, q, k, v) * real, attend(False, q, k, v) * real, atol=1e-6)
  cot = jax.random.normal(ks[3], q.shape) * real  # padding outputs are never read
  loss = lambda causal: jax.grad(lambda *a: jnp.sum(attend(causal, *a) * cot), argnums=(0, 1, 2))(
      q, k, v
  )
  for got, want in zip(loss(True), loss(False)):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_attention_in_query_blocks_holds_one_blocks_scores():
  """The backward pass of 1,024 queries in blocks of 128 holds under one `[B, H, T, S]`
  float32 buffer of temporaries (`memory_analysis`); all queries at once hold four."""
  batch, length, heads = 1, 1024, 4
  q = jax.ShapeDtypeStruct((batch, length, heads, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((batch, length, 2, 16), jnp.float32)
  mask = jax.ShapeDtypeStruct((batch, length, length), bool)
  scores = batch * heads * length * length * 4

  def temporaries(block):
    loss = lambda *a: jnp.sum(attention.attend(*a, implementation="xla", query_block=block))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes

  assert temporaries(length) > 3 * scores
  assert temporaries(128) < scores


@pytest.mark.parametrize("length,slots", [(5, 7), (5, 6), (4, 7)])
def test_even_length_padding_for_cudnn_changes_no_output_or_gradient(length, slots):
  """cuDNN's masked training kernels refuse odd lengths (seen on an H100: "Unsupported
  sequence length Q 511, KV 511"), so `attend` pads them by one slot. The padded problem,
  run through XLA here, must give the same outputs (of every query that sees a key) and
  gradients."""
  ks = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(ks[0], (2, length, 4, 8))
  k = jax.random.normal(ks[1], (2, slots, 2, 8))
  v = jax.random.normal(ks[2], (2, slots, 2, 8))
  mask = np.tril(np.ones((length, slots), bool), k=slots - length)[None].repeat(2, 0)
  mask[0, 1, :] = False
  mask = jnp.asarray(mask)
  # A fully masked (padding) query attends uniformly, so its output depends on the number of
  # slots; it is never read, so it gets no cotangent here either.
  cot = jax.random.normal(ks[3], q.shape) * jnp.any(mask, -1)[..., None, None]
  plain = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask[:, None]) * cot)

  def padded(q, k, v):
    qp, kp, vp, mp = attention.even_lengths(q, k, v, mask)
    assert qp.shape[1] % 2 == 0 and kp.shape[1] % 2 == 0
    assert bool(jnp.all(jnp.any(mp[:, length:], -1)))  # the added query sees a key
    assert not bool(jnp.any(mp[:, :length, slots:]))  # no real query sees the added key
    out = jax.nn.dot_product_attention(qp, kp, vp, mask=mp[:, None])[:, :length]
    return jnp.sum(out * cot)

  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(q, k, v)
  got, got_grads = jax.value_and_grad(padded, argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_splash_attention_equals_attend_on_real_rows_with_its_gradients():
  """The Pallas splash kernel (interpret mode here) against XLA's attention: 200 tokens (two
  128-token blocks after padding), GQA 4:2, rows padded on the left, the right and both
  sides; outputs and the gradients of a loss over real rows (padding rows are never read)."""
  from opdjax.models.splash import splash_attention

  batch, length, heads, kv_heads, head_dim = 3, 200, 4, 2, 32
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:])
  at = np.arange(length)
  valid = jnp.asarray(np.stack([at >= 37, at < 150, (at >= 5) & (at < 190)]))
  causal = jnp.tril(jnp.ones((length, length), bool))[None] & valid[:, None, :]

  def loss(attention):
    return lambda q, k, v: jnp.sum(jnp.where(valid[..., None, None], attention(q, k, v), 0.0) ** 2)

  xla = lambda q, k, v: attention.attend(q, k, v, causal, implementation="xla")
  splash = lambda q, k, v: splash_attention(q, k, v, valid)
  real = np.asarray(valid)
  np.testing.assert_allclose(
      np.asarray(splash(q, k, v))[real], np.asarray(xla(q, k, v))[real], atol=2e-6
  )
  want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", want, got):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5, err_msg=name)
  assert float(jnp.abs(want[0]).max()) > 1.0  # the gradients compared are not all near zero
