"""Decoder: KV-cache path equals the full forward on padded batches; head split; config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdjax.models import Decoder, ModelConfig, decoder, positions_from_mask, tiny_config


def make_model(kind="qwen3", **overrides):
  return Decoder(tiny_config(kind, **overrides), rngs=nnx.Rngs(0))


def padded_prompts(vocab, seed=0):
  rng = np.random.RandomState(seed)
  prompts = rng.randint(0, vocab, (4, 6))
  mask = np.ones((4, 6), bool)
  mask[1, :2] = False  # left padded
  mask[2, 3:] = False  # right padded
  mask[3, :1] = False  # padded on both sides
  mask[3, 4:] = False
  completion = rng.randint(0, vocab, (4, 5))
  return jnp.asarray(prompts), jnp.asarray(mask), jnp.asarray(completion)


@pytest.mark.parametrize(
    "kind,overrides",
    [("qwen3", {}), ("llama", dict(tie_word_embeddings=True)), ("qwen2", dict(num_kv_heads=1))],
)
def test_prefill_and_decode_equal_full_forward(kind, overrides):
  model = make_model(kind, **overrides)
  prompts, prompt_mask, completion = padded_prompts(model.config.vocab_size)
  batch, prompt_len = prompts.shape
  steps = completion.shape[1]
  full_tokens = jnp.concatenate([prompts, completion], axis=1)
  full_mask = jnp.concatenate([prompt_mask, jnp.ones(completion.shape, bool)], axis=1)
  full = model(full_tokens, attention_mask=full_mask)

  cache = model.init_cache(batch, prompt_len + steps)
  logits, cache = model.prefill(
      prompts, positions_from_mask(prompt_mask), cache, token_mask=prompt_mask
  )
  np.testing.assert_allclose(logits[prompt_mask], full[:, :prompt_len][prompt_mask], atol=1e-5)
  lengths = jnp.sum(prompt_mask, axis=1)
  decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
  for step in range(steps):
    step_logits, cache = decode(model, completion[:, step], lengths + step, cache)
    np.testing.assert_allclose(
        step_logits, full[:, prompt_len + step], atol=1e-5, err_msg=f"step {step}"
    )
  assert int(cache.index) == prompt_len + steps


def test_decode_windows():
  assert decoder.decode_windows(80) == (80,)
  assert decoder.decode_windows(528) == (128, 256, 384, 512, 528)
  assert decoder.decode_windows(4096) == (512, 1024, 1536, 2048, 2560, 3072, 3584, 4096)


def test_decode_with_many_windows_equals_full_forward(monkeypatch):
  """Windows of 2 slots in a 16-slot cache: every decode step picks a different branch,
  and an off-by-one in the choice would drop the newest token."""
  monkeypatch.setattr(decoder, "DECODE_WINDOW", 2)
  model = make_model()
  prompts, prompt_mask, completion = padded_prompts(model.config.vocab_size, seed=2)
  full_tokens = jnp.concatenate([prompts, completion], axis=1)
  full_mask = jnp.concatenate([prompt_mask, jnp.ones(completion.shape, bool)], axis=1)
  full = model(full_tokens, attention_mask=full_mask)
  cache = model.init_cache(4, 16)
  assert len(decoder.decode_windows(cache.max_length)) == 8
  _, cache = model.prefill(prompts, positions_from_mask(prompt_mask), cache, token_mask=prompt_mask)
  lengths = jnp.sum(prompt_mask, axis=1)
  decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
  for step in range(completion.shape[1]):
    logits, cache = decode(model, completion[:, step], lengths + step, cache)
    np.testing.assert_allclose(logits, full[:, 6 + step], atol=1e-5, err_msg=f"step {step}")


def test_decode_windows_where_a_conditional_costs_more_than_a_small_cache(monkeypatch):
  """A backend listed in `WINDOWED_DECODE_MIN_BYTES` (the GPU's conditionals run from the
  host) reads a small layer cache whole: its decode step traces to no conditional."""
  monkeypatch.setattr(decoder, "DECODE_WINDOW", 2)
  q = jnp.ones((3, 1, 4, 8), jnp.float32)
  keys = jnp.ones((3, 2, 12, 8), jnp.float32)  # 2 * 3 * 2 * 12 * 8 * 4 = 4,608 bytes a layer
  cache = decoder.LayerCache(keys, keys, index=jnp.int32(4))
  mask = jnp.ones((3, 1, 12), bool)

  def conditionals(threshold):
    monkeypatch.setattr(decoder, "WINDOWED_DECODE_MIN_BYTES", {jax.default_backend(): threshold})
    jaxpr = jax.make_jaxpr(lambda *args: decoder.attend_one(*args))(q, cache, mask)  # no cache
    return sum(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns)

  assert len(decoder.decode_windows(528, 1 << 20)) == 8  # no threshold for the backend
  assert conditionals(4_609) == 0
  assert decoder.decode_windows(12, 4_608) == (12,)
  assert conditionals(4_608) == 1
  assert decoder.decode_windows(12, 4_608 + 1) == (2, 4, 6, 8, 10, 12)


@pytest.mark.parametrize("filled,window", [(5, 6), (6, 6), (7, 8)])
def test_a_decode_step_reads_only_its_window(monkeypatch, filled, window):
  """Slots past the chosen window hold NaN: a step that read them would return NaN (a
  masked slot still multiplies its value by a zero weight)."""
  monkeypatch.setattr(decoder, "DECODE_WINDOW", 2)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(3, 1, 4, 8)), jnp.float32)
  keys, values = (jnp.asarray(rng.normal(size=(3, 2, 12, 8)), jnp.float32) for _ in range(2))
  mask = np.arange(12)[None, None, :] < filled
  mask = jnp.asarray(np.repeat(mask, 3, axis=0))
  mask = mask.at[1, 0, 0].set(False)  # a hole, as padding leaves
  mask = mask.at[2].set(False)  # a fully masked row (a finished row's padding)
  expected = decoder.attend(q, keys.swapaxes(1, 2), values.swapaxes(1, 2), mask)
  poison = lambda x: x.at[:, :, window:].set(jnp.nan)
  cache = decoder.LayerCache(poison(keys), poison(values), index=jnp.int32(filled - 1))
  out = decoder.attend_one(q, cache, mask)
  np.testing.assert_allclose(out[:2], expected[:2], atol=1e-6)
  assert np.isfinite(out[2]).all()  # its output is never read, but must not be NaN


def test_chunked_prefill_equals_single_prefill():
  model = make_model()
  prompts, prompt_mask, _ = padded_prompts(model.config.vocab_size, seed=1)
  positions = positions_from_mask(prompt_mask)
  one, _ = model.prefill(prompts, positions, model.init_cache(4, 8), token_mask=prompt_mask)
  cache = model.init_cache(4, 8)
  first, cache = model.prefill(
      prompts[:, :4], positions[:, :4], cache, token_mask=prompt_mask[:, :4]
  )
  second, cache = model.prefill(
      prompts[:, 4:], positions[:, 4:], cache, token_mask=prompt_mask[:, 4:]
  )
  np.testing.assert_allclose(
      jnp.concatenate([first, second], 1)[prompt_mask], one[prompt_mask], atol=1e-5
  )


def test_padding_never_changes_real_tokens():
  model = make_model("llama")
  tokens = jnp.array([[5, 6, 7, 8]])
  alone = model(tokens)
  for pad in ([[0, 0, 5, 6, 7, 8]], [[5, 6, 7, 8, 0, 0]]):
    padded = jnp.array(pad)
    mask = padded != 0
    out = model(padded, attention_mask=mask)
    np.testing.assert_allclose(out[mask], alone[0], atol=1e-5)


def test_hidden_states_and_head_split():
  for tied in (True, False):
    model = make_model(tie_word_embeddings=tied)
    tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
    hidden = model.hidden_states(tokens)
    assert hidden.shape == (2, 3, model.config.hidden_size)
    np.testing.assert_array_equal(model.logits_from_hidden(hidden), model(tokens))
  assert make_model(tie_word_embeddings=True).lm_head is None


def test_bfloat16_model_returns_float32_logits():
  model = Decoder(tiny_config(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  logits = model(jnp.array([[1, 2, 3]]))
  assert logits.dtype == jnp.float32
  assert model.layers[0].attn.q_proj.kernel.get_value().dtype == jnp.bfloat16


def test_model_bad_input():
  model = make_model()
  with pytest.raises(ValueError, match=r"tokens must be integer ids of shape \[B, T\]"):
    model(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"tokens must be integer ids of shape \[B, T\]"):
    model(jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"attention_mask \(2, 4\) must match tokens \(2, 3\)"):
    model(jnp.zeros((2, 3), jnp.int32), attention_mask=jnp.ones((2, 4)))


def test_config_validation_and_hf_round_trip():
  with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
    tiny_config(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
    tiny_config("mistral")
  config = tiny_config("llama", rope_type="llama3", rope_factor=8.0, eos_token_ids=(1, 2))
  assert ModelConfig.from_hf(config.to_hf()) == config
  # transformers v4 spelling: rope_theta + rope_scaling.
  v4 = dict(config.to_hf())
  del v4["rope_parameters"]
  v4.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
  linear = ModelConfig.from_hf(v4)
  assert linear.rope_type == "linear" and linear.rope_theta == 5e5
  np.testing.assert_allclose(
      linear.inverse_frequencies() * 2.0,
      ModelConfig.from_hf({**v4, "rope_scaling": None}).inverse_frequencies(),
      rtol=1e-6,
  )
  with pytest.raises(ValueError, match="use_sliding_window=true is not supported"):
    ModelConfig.from_hf({**config.to_hf(), "model_type": "qwen2", "use_sliding_window": True})
  with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
    ModelConfig.from_hf({**config.to_hf(), "hidden_act": "gelu"})


def test_dot_product_attention_equals_the_einsum_reference():
  """`attend` (jax.nn.dot_product_attention) against a plain float32 einsum softmax, with GQA,
  padded keys and a query row that sees no key at all."""
  import jax

  from opdjax.models.decoder import attend

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
  np.testing.assert_allclose(attend(q, k, v, jnp.asarray(mask)), expected, atol=2e-6)
  np.testing.assert_allclose(
      attend(q, k, v, jnp.asarray(mask), implementation="xla"), expected, atol=2e-6
  )
  with pytest.raises(ValueError, match="one of .*'auto', 'xla', 'cudnn'.*got 'flash'"):
    attend(q, k, v, jnp.asarray(mask), implementation="flash")


@pytest.mark.parametrize("length,slots", [(5, 7), (5, 6), (4, 7)])
def test_even_length_padding_for_cudnn_changes_no_output_or_gradient(length, slots):
  """cuDNN's masked training kernels refuse odd lengths (seen on an H100: "Unsupported
  sequence length Q 511, KV 511"), so `attend` pads them by one slot. The padded problem,
  run through XLA here, must give the same outputs (of every query that sees a key) and
  gradients."""
  import jax

  from opdjax.models.decoder import even_lengths

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
    qp, kp, vp, mp = even_lengths(q, k, v, mask)
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


def _max_diff(a, b):
  import jax

  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
def test_scanned_layers_equal_the_per_layer_model(remat):
  """One `lax.scan` over stacked layers (with each remat policy) gives the per-layer model's
  logits, parameter gradients and greedy generations; `stack_layers`/`unstack_layers` are
  inverses."""
  import jax

  from opdjax.models import stack_layers, unstack_layers
  from opdjax.sampling import SamplingParams, generate

  config = tiny_config("qwen3")
  model = Decoder(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  scanned_def, _ = nnx.split(Decoder(config, rngs=nnx.Rngs(5), scan_layers=True, remat=remat))
  scanned = nnx.merge(scanned_def, stack_layers(state))
  assert scanned.layers.attn.q_proj.kernel.get_value().shape[0] == config.num_layers
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
  mask = jnp.ones((2, 9), bool).at[0, :3].set(False)
  forward = nnx.jit(lambda m: m(tokens, attention_mask=mask))  # one compile, not one per op
  np.testing.assert_allclose(forward(scanned), forward(model), atol=1e-5)
  assert _max_diff(unstack_layers(nnx.state(scanned)), state) == 0.0

  @functools.partial(jax.jit, static_argnums=1)
  @functools.partial(jax.grad)
  def grad(state, graphdef):
    return jnp.mean(nnx.merge(graphdef, state)(tokens, attention_mask=mask)[..., :7] ** 2)

  want = stack_layers(grad(state, graphdef))
  got = grad(stack_layers(state), scanned_def)
  assert _max_diff(got, want) < 1e-6
  if remat != "none":
    return  # decoding has no backward pass
  greedy = dict(key=jax.random.key(0), max_new_tokens=5, sampling=SamplingParams(greedy=True))
  a, b = generate(model, tokens, mask, **greedy), generate(scanned, tokens, mask, **greedy)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.model_logprobs, b.model_logprobs, atol=1e-5)


def test_a_scanned_decode_step_carries_the_stacked_cache_through_its_layers():
  """Scanned layers must carry the stacked KV cache and write their slots in place. Passed
  through the layer scan as inputs and outputs, every layer's whole cache was copied in
  every decode step: the sampler ran 2–4.5× slower at batch 64–256 on a CPU."""
  import jax

  model = Decoder(tiny_config("qwen3"), rngs=nnx.Rngs(0), scan_layers=True)
  cache = model.init_cache(2, 16)
  step = lambda cache: model.decode(jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), cache)
  (scan,) = [e for e in jax.make_jaxpr(step)(cache).eqns if e.primitive.name == "scan"]
  consts, carried = scan.params["num_consts"], scan.params["num_carry"]
  stacked = lambda variables: sum(v.aval.shape == cache.keys.shape for v in variables)
  assert stacked(scan.invars[consts : consts + carried]) == 2  # keys and values
  assert stacked(scan.invars[consts + carried :]) == stacked(scan.outvars[carried:]) == 0


def test_scanned_program_size_is_flat_in_depth():
  """The lowered train-step program of a scanned model barely grows from 4 to 32 layers,
  while the per-layer one grows about linearly (`benchmarks/compile_depth.py` times it)."""
  import jax

  def program_chars(num_layers, scan_layers):
    config = tiny_config("qwen3", num_layers=num_layers)
    graphdef, state = nnx.split(
        nnx.eval_shape(
            lambda: Decoder(config, rngs=nnx.Rngs(0), scan_layers=scan_layers, remat="full")
        )
    )
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    loss = lambda state, tokens: jnp.mean(nnx.merge(graphdef, state)(tokens))
    return len(jax.jit(jax.grad(loss)).lower(state, tokens).as_text())

  scanned = program_chars(32, True) / program_chars(4, True)
  per_layer = program_chars(32, False) / program_chars(4, False)
  assert scanned < 1.2 and per_layer > 4, (scanned, per_layer)


def test_splash_attention_equals_attend_on_real_rows_with_its_gradients():
  """The Pallas splash kernel (interpret mode here) against XLA's attention: 200 tokens (two
  128-token blocks after padding), GQA 4:2, rows padded on the left, the right and both
  sides; outputs and the gradients of a loss over real rows (padding rows are never read)."""
  import jax

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

  xla = lambda q, k, v: decoder.attend(q, k, v, causal, implementation="xla")
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


def test_scanned_rematerialised_decoder_with_splash_on_a_mesh_equals_xla(monkeypatch):
  """The configuration a TPU run would use: scanned layers, full remat, splash attention per
  shard on a 2 × 2 fsdp × tensor mesh (the scanned layers keep the mesh: the kernel sees
  per-shard shapes). Its loss and gradients equal XLA attention's."""
  import jax

  from opdjax import sharding
  from opdjax.models import splash

  shards = []
  rows = splash._rows
  monkeypatch.setattr(splash, "_rows", lambda q, *a: shards.append(q.shape) or rows(q, *a))

  config = tiny_config("qwen3")
  mesh = sharding.make_mesh((2, 2), ("fsdp", "tensor"))
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, config.vocab_size, (4, 9)))
  mask = jnp.ones((4, 9), bool).at[1, :3].set(False)  # one left-padded row
  results = {}
  for attention in ("xla", "splash"):
    model = Decoder(
        config,
        rngs=nnx.Rngs(0),
        attention=attention,
        scan_layers=True,
        remat="full",
        mesh=mesh,
    )
    graphdef, state = nnx.split(model)
    state = sharding.place_state(state, mesh)

    def loss(state, graphdef=graphdef):
      hidden = nnx.merge(graphdef, state).hidden_states(tokens, attention_mask=mask)
      return jnp.sum(jnp.where(mask[..., None], hidden, 0.0) ** 2)

    results[attention] = jax.jit(jax.value_and_grad(loss))(state)
  # 4 rows over fsdp, the heads over tensor
  assert set(shards) == {(2, 9, config.num_heads // 2, config.head_dim)}, set(shards)
  (want, want_grads), (got, got_grads) = results["xla"], results["splash"]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-4)
