"""Decoder: KV-cache path equals the full forward on padded batches; head split; config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdjax.models import Decoder, ModelConfig, attention, positions_from_mask, tiny_config


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


@pytest.mark.parametrize(
    "kind,overrides,scan_layers,dtype",
    [
        ("qwen3", {}, False, jnp.float32),  # GQA (2 query heads per key-value head), q/k norms
        ("qwen2", dict(num_kv_heads=1), True, jnp.float32),  # q/k/v biases, scanned layers
        ("llama", {}, False, jnp.bfloat16),  # float32 weights, bfloat16 compute
    ],
)
def test_fused_projections_compute_what_the_separate_ones_do(kind, overrides, scan_layers, dtype):
  """`fuse_projections` (the sampler's layout: q, k and v in one matmul grouped by key-value
  head, gate and up in another, weights cast once) through a full forward and a cached
  prefill and decode step. A misordered group or a swapped k and v changes every logit."""
  config = tiny_config(kind, **overrides)
  model = Decoder(
      config, dtype=dtype, param_dtype=jnp.float32, scan_layers=scan_layers, rngs=nnx.Rngs(0)
  )
  fused = nnx.merge(*nnx.split(model))
  fused.fuse_projections()
  group = config.num_heads // config.num_kv_heads
  assert (fused.layers if scan_layers else fused.layers[0]).attn.qkv.kernel.shape[-3:] == (
      config.num_kv_heads,
      group + 2,
      config.head_dim,
  )
  tolerance = 1e-6 if dtype == jnp.float32 else 2e-2  # a bfloat16 ulp, should XLA reorder
  prompts, prompt_mask, completion = padded_prompts(config.vocab_size)
  np.testing.assert_allclose(
      fused(prompts, attention_mask=prompt_mask),
      model(prompts, attention_mask=prompt_mask),
      atol=tolerance,
  )
  outputs = []
  for m in (model, fused):
    cache = m.init_cache(prompts.shape[0], prompts.shape[1] + 1)
    _, cache = m.prefill(prompts, positions_from_mask(prompt_mask), cache, token_mask=prompt_mask)
    outputs.append(m.decode(completion[:, 0], jnp.sum(prompt_mask, axis=1), cache)[0])
  np.testing.assert_allclose(outputs[1], outputs[0], atol=tolerance)


def test_decode_with_many_windows_equals_full_forward(monkeypatch):
  """Windows of 1 slot up to half of a 24-slot cache: every decode step picks a different
  branch, and an off-by-one in the choice would drop the newest token."""
  monkeypatch.setattr(attention, "DECODE_WINDOW", 1)
  monkeypatch.setattr(attention, "MAX_DECODE_WINDOWS", 16)
  model = make_model()
  prompts, prompt_mask, completion = padded_prompts(model.config.vocab_size, seed=2)
  full_tokens = jnp.concatenate([prompts, completion], axis=1)
  full_mask = jnp.concatenate([prompt_mask, jnp.ones(completion.shape, bool)], axis=1)
  full = model(full_tokens, attention_mask=full_mask)
  cache = model.init_cache(4, 24)
  assert attention.decode_windows(cache.max_length) == tuple(range(1, 13)) + (24,)
  _, cache = model.prefill(prompts, positions_from_mask(prompt_mask), cache, token_mask=prompt_mask)
  lengths = jnp.sum(prompt_mask, axis=1)
  decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
  for step in range(completion.shape[1]):
    logits, cache = decode(model, completion[:, step], lengths + step, cache)
    np.testing.assert_allclose(logits, full[:, 6 + step], atol=1e-5, err_msg=f"step {step}")


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


def _max_diff(a, b):

  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
def test_scanned_layers_equal_the_per_layer_model(remat):
  """One `lax.scan` over stacked layers (with each remat policy) gives the per-layer model's
  logits, parameter gradients and greedy generations; `stack_layers`/`unstack_layers` are
  inverses."""

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


def test_a_model_attending_in_query_blocks_computes_what_it_does_in_one(monkeypatch):
  """With `attention.QUERY_BLOCK = 4`, a scanned, rematerialised (save_dots) model's forward
  over 11 padded tokens (two causal groups: a loop over 2 blocks and a block of 3 queries,
  in each layer) and its prefill of 6 (2 blocks) equal the model's in one block, and so do
  its parameter gradients."""
  config = tiny_config("qwen3")  # 2 layers
  graphdef, state = nnx.split(Decoder(config, rngs=nnx.Rngs(0), scan_layers=True))
  prompts, prompt_mask, completion = padded_prompts(config.vocab_size)
  tokens = jnp.concatenate([prompts, completion], axis=1)
  mask = jnp.concatenate([prompt_mask, jnp.ones(completion.shape, bool)], axis=1)

  def run(block):
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    forward = lambda s: nnx.merge(graphdef, s)(tokens, attention_mask=mask)  # a new trace
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(4, 11)
    positions = positions_from_mask(prompt_mask)
    prefill, _ = model.prefill(prompts, positions, cache, token_mask=prompt_mask)
    grads = jax.grad(lambda s: jnp.mean(forward(s)[mask] ** 2))(state)
    loops = str(jax.make_jaxpr(forward)(state)).count("scan[")  # the layers' and the blocks'
    return forward(state), prefill, grads, loops > 1

  (logits, prefill, grads, looped), (logits1, prefill1, grads1, looped1) = run(4), run(64)
  assert looped and not looped1
  np.testing.assert_allclose(logits[mask], logits1[mask], atol=1e-6)
  np.testing.assert_allclose(prefill[prompt_mask], prefill1[prompt_mask], atol=1e-6)
  assert _max_diff(grads, grads1) < 1e-6


def test_a_scanned_decode_step_carries_the_stacked_cache_through_its_layers():
  """Scanned layers must carry the stacked KV cache and write their slots in place. Passed
  through the layer scan as inputs and outputs, every layer's whole cache was copied in
  every decode step: the sampler ran 2–4.5× slower at batch 64–256 on a CPU."""

  model = Decoder(tiny_config("qwen3"), rngs=nnx.Rngs(0), scan_layers=True)
  cache = model.init_cache(2, 16)
  step = lambda cache: model.decode(jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), cache)
  (scan,) = [e for e in jax.make_jaxpr(step)(cache).eqns if e.primitive.name == "scan"]
  consts, carried = scan.params["num_consts"], scan.params["num_carry"]
  shapes = (cache.keys.shape, cache.values.shape)
  stacked = lambda variables: sum(v.aval.shape in shapes for v in variables)
  assert stacked(scan.invars[consts : consts + carried]) == 2  # keys and values
  assert stacked(scan.invars[consts + carried :]) == stacked(scan.outvars[carried:]) == 0


def test_scanned_program_size_is_flat_in_depth():
  """The lowered train-step program of a scanned model barely grows from 4 to 32 layers,
  while the per-layer one grows about linearly (`benchmarks/compile_depth.py` times it)."""

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


def test_a_scanned_backward_keeps_only_the_matmuls_with_save_dots():
  """Without remat a layer scan keeps every intermediate of its body for the backward,
  elementwise ones too (per-layer, XLA fuses those away), so a scanned gradient holds more
  temporaries than the per-layer one; "save_dots" (what `remat="auto"` picks for scanned
  layers, `remat_policy_name`) keeps only the matmuls' outputs and holds fewer than both."""

  def temporaries(scan_layers, remat):
    config = tiny_config("qwen3", num_layers=4)
    graphdef, state = nnx.split(
        nnx.eval_shape(
            lambda: Decoder(config, rngs=nnx.Rngs(0), scan_layers=scan_layers, remat=remat)
        )
    )
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    loss = lambda state, tokens: jnp.mean(nnx.merge(graphdef, state).hidden_states(tokens))
    compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  per_layer, scanned = temporaries(False, "none"), temporaries(True, "none")
  save_dots = temporaries(True, "save_dots")
  assert save_dots < per_layer < scanned, (save_dots, per_layer, scanned)
  default = lambda scan_layers: nnx.eval_shape(
      lambda: Decoder(tiny_config("qwen3"), rngs=nnx.Rngs(0), scan_layers=scan_layers)
  ).remat
  assert (default(True), default(False)) == ("save_dots", "none")


@pytest.mark.parametrize(
    "scan_layers,query_block",
    [(True, None), (False, None), (True, 32)],
    ids=["scanned", "per-layer", "scanned-query-blocks"],
)
def test_a_model_on_a_mesh_keeps_the_batch_rows_split_between_layers(
    monkeypatch, scan_layers, query_block
):
  """FSDP: with the rows of a batch split over 8 devices and the weights' hidden dimension
  split too (`sharding.DEFAULT_RULES`), each device holds its rows' activations, about an
  eighth of one device's. Without the constraint between layers (`Decoder._rows`) XLA
  propagated the weights' sharding into a layer scan's carry, and each device computed
  every row on a slice of the hidden dimension: 0.61 of one device's temporaries. The
  attention's loop over query blocks keeps the rows split too."""
  from opdjax import sharding

  if query_block:
    monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)  # 128 tokens: 4 blocks
  config = tiny_config("qwen3", vocab_size=64, hidden_size=64, intermediate_size=128)

  def temporaries(mesh):
    model = nnx.eval_shape(
        lambda: Decoder(config, rngs=nnx.Rngs(0), scan_layers=scan_layers, mesh=mesh)
    )
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((64, 128), jnp.int32)
    if mesh is not None:
      state = sharding.abstract_state(state, mesh)
      tokens = jax.ShapeDtypeStruct(
          tokens.shape, tokens.dtype, sharding=sharding.batch_sharding(mesh)
      )
    loss = lambda state, tokens: jnp.sum(nnx.merge(graphdef, state).hidden_states(tokens))
    compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ratio = temporaries(sharding.make_mesh((8,), ("fsdp",))) / temporaries(None)
  assert ratio < 0.2, ratio


def test_scanned_rematerialised_decoder_with_splash_on_a_mesh_equals_xla(monkeypatch):
  """The configuration a TPU run would use: scanned layers, full remat, splash attention per
  shard on a 2 × 2 fsdp × tensor mesh (the scanned layers keep the mesh: the kernel sees
  per-shard shapes). Its loss and gradients equal XLA attention's."""

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
  for kernel in ("xla", "splash"):
    model = Decoder(
        config,
        rngs=nnx.Rngs(0),
        attention=kernel,
        scan_layers=True,
        remat="full",
        mesh=mesh,
    )
    graphdef, state = nnx.split(model)
    state = sharding.place_state(state, mesh)

    def loss(state, graphdef=graphdef):
      hidden = nnx.merge(graphdef, state).hidden_states(tokens, attention_mask=mask)
      return jnp.sum(jnp.where(mask[..., None], hidden, 0.0) ** 2)

    results[kernel] = jax.jit(jax.value_and_grad(loss))(state)
  # 4 rows over fsdp, the heads over tensor
  assert set(shards) == {(2, 9, config.num_heads // 2, config.head_dim)}, set(shards)
  (want, want_grads), (got, got_grads) = results["xla"], results["splash"]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-4)
