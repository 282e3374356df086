"""Sampler: greedy equals a naive re-run loop, log-probs equal teacher forcing, samples
follow the model's distribution (chi-square), truncation settings, EOS, keys, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from opdjax.models import Decoder, stack_layers, tiny_config
from opdjax.sampling import SamplingParams, bucket_size, generate, sampling_distribution

GREEDY = SamplingParams(greedy=True)
NO_EOS = SamplingParams(eos_ids=())


@pytest.fixture(scope="module", name="model")
def fixture_model():
  # A larger init scale than the default makes next-token distributions peaked, so the
  # greedy, top-k and top-p checks are not decided by near-ties.
  model = Decoder(tiny_config("qwen3", vocab_size=24), rngs=nnx.Rngs(1))
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    if value.ndim == 2:
      var.set_value(value * 6.0)
  return model


def scanned(model):
  """`model` with its layers stacked for `lax.scan` (the same weights)."""
  graphdef, _ = nnx.split(Decoder(model.config, rngs=nnx.Rngs(0), scan_layers=True))
  return nnx.merge(graphdef, stack_layers(nnx.state(model)))


def mixed_prompts():
  tokens = jnp.array(
      [
          [5, 6, 7, 8, 9, 10],
          [0, 0, 0, 11, 12, 13],  # left padded
          [14, 15, 0, 0, 0, 0],  # right padded
          [0, 16, 17, 18, 0, 0],
      ]
  )  # both
  return tokens, tokens != 0


def naive_greedy(model, tokens, mask, steps):
  """Re-runs the full model on the growing (padded) sequence; argmax at the last real slot."""
  seq, seq_mask, out = tokens, mask, []
  forward = nnx.jit(lambda m, t, a: m(t, attention_mask=a))
  for _ in range(steps):
    logits = forward(model, seq, seq_mask)
    last = seq.shape[1] - 1 - jnp.argmax(seq_mask[:, ::-1], axis=1)
    nxt = jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], axis=-1)
    out.append(nxt)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    seq_mask = jnp.concatenate([seq_mask, jnp.ones((seq.shape[0], 1), bool)], axis=1)
  return jnp.stack(out, axis=1)


def test_greedy_equals_naive_loop(model):
  tokens, mask = mixed_prompts()
  gen = generate(model, tokens, mask, key=jax.random.key(0), max_new_tokens=7, sampling=GREEDY)
  np.testing.assert_array_equal(gen.tokens, naive_greedy(model, tokens, mask, 7))
  assert gen.mask.all() and (gen.lengths == 7).all() and gen.truncated.all()
  np.testing.assert_array_equal(gen.sample_logprobs, 0.0)


def teacher_forced_logits(model, tokens, mask, gen):
  """`[B, N, V]`: the full forward's logits over prompt + completion that predict each
  completion token; for token n they sit at the previous real slot."""
  full = jnp.concatenate([tokens, gen.tokens], axis=1)
  logits = model(full, attention_mask=jnp.concatenate([mask, gen.mask], axis=1))
  prompt_len = tokens.shape[1]
  last_prompt = prompt_len - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  return jnp.concatenate(
      [logits[jnp.arange(len(tokens)), last_prompt][:, None], logits[:, prompt_len:-1]], axis=1
  )


def test_logprobs_equal_teacher_forcing(model):
  tokens, mask = mixed_prompts()
  sampling = SamplingParams(temperature=0.7, top_k=10)
  gen = generate(
      model,
      tokens,
      mask,
      key=jax.random.key(1),
      max_new_tokens=6,
      sampling=sampling,
      return_logits=True,
  )
  predictors = teacher_forced_logits(model, tokens, mask, gen)
  np.testing.assert_allclose(gen.logits, predictors, atol=1e-5)
  model_lp = jnp.take_along_axis(jax.nn.log_softmax(predictors), gen.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(gen.model_logprobs, model_lp, atol=1e-5)
  sample_lp = jnp.take_along_axis(
      sampling_distribution(predictors, sampling), gen.tokens[..., None], -1
  )[..., 0]
  np.testing.assert_allclose(gen.sample_logprobs, sample_lp, atol=1e-5)
  # The two differ (truncation and temperature change the distribution).
  assert float(jnp.max(jnp.abs(gen.sample_logprobs - gen.model_logprobs))) > 0.1


def test_long_generation_equals_teacher_forcing():
  """512 new tokens: the cache has 520 slots, so decode steps pass through every attention
  window (128, 256, 384, 512, 520 slots); each step's log-prob equals the full forward's."""
  model = Decoder(
      tiny_config("qwen3", vocab_size=24, max_position_embeddings=1024), rngs=nnx.Rngs(1)
  )
  tokens, mask = mixed_prompts()
  gen = generate(
      model,
      tokens,
      mask,
      key=jax.random.key(2),
      max_new_tokens=512,
      sampling=SamplingParams(eos_ids=()),
  )
  assert gen.mask.all()
  predictors = teacher_forced_logits(model, tokens, mask, gen)
  expected = jnp.take_along_axis(jax.nn.log_softmax(predictors), gen.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(gen.model_logprobs, expected, atol=2e-5)


def first_step_distribution(model, prompt, sampling):
  logits = model(prompt[None])[0, -1]
  return np.asarray(jnp.exp(sampling_distribution(logits[None], sampling)[0]), np.float64)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(),
        SamplingParams(temperature=1.5),
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.8),
        SamplingParams(min_p=0.05),
    ],
)
def test_samples_follow_the_distribution(model, sampling):
  prompt = jnp.array([3, 9, 4])
  rows = 4000
  gen = generate(
      model,
      jnp.tile(prompt, (rows, 1)),
      jnp.ones((rows, 3), bool),
      key=jax.random.key(2),
      max_new_tokens=1,
      sampling=sampling,
  )
  expected = first_step_distribution(model, prompt, sampling)
  expected /= expected.sum()
  counts = np.bincount(np.asarray(gen.tokens[:, 0]), minlength=expected.size)
  support = expected > 0
  assert counts[~support].sum() == 0, "a token outside the truncated support was emitted"
  # Pool rare categories so every expected count is >= 5 (chi-square validity).
  order = np.argsort(expected[support])
  exp_counts, obs_counts = rows * expected[support][order], counts[support][order]
  pooled_exp, pooled_obs, acc_e, acc_o = [], [], 0.0, 0
  for e, o in zip(exp_counts, obs_counts):
    acc_e, acc_o = acc_e + e, acc_o + o
    if acc_e >= 5:
      pooled_exp.append(acc_e)
      pooled_obs.append(acc_o)
      acc_e, acc_o = 0.0, 0
  pooled_exp[-1] += acc_e
  pooled_obs[-1] += acc_o
  if len(pooled_exp) > 1:
    _, p_value = stats.chisquare(pooled_obs, pooled_exp)
    assert p_value > 1e-3, (p_value, pooled_obs, pooled_exp)
  if sampling.top_k:
    assert support.sum() == sampling.top_k
  if sampling.top_p < 1:
    assert support.sum() < expected.size


def test_truncation_never_emits_excluded_tokens(model):
  tokens, mask = mixed_prompts()
  for sampling in (SamplingParams(top_k=2), SamplingParams(top_p=0.5)):
    gen = generate(
        model,
        tokens,
        mask,
        key=jax.random.key(3),
        max_new_tokens=8,
        sampling=sampling,
        return_logits=True,
    )
    allowed = jnp.isfinite(sampling_distribution(gen.logits, sampling))
    assert bool(
        jnp.all(jnp.take_along_axis(allowed, gen.tokens[..., None], -1)[..., 0] | ~gen.mask)
    )


def test_low_temperature_equals_greedy(model):
  tokens, mask = mixed_prompts()
  greedy = generate(model, tokens, mask, key=jax.random.key(0), max_new_tokens=6, sampling=GREEDY)
  cold = generate(
      model,
      tokens,
      mask,
      key=jax.random.key(4),
      max_new_tokens=6,
      sampling=SamplingParams(temperature=1e-4),
  )
  np.testing.assert_array_equal(cold.tokens, greedy.tokens)
  zero = generate(
      model,
      tokens,
      mask,
      key=jax.random.key(4),
      max_new_tokens=6,
      sampling=SamplingParams(temperature=0.0),
  )
  np.testing.assert_array_equal(zero.tokens, greedy.tokens)


def test_eos_stops_rows_independently(model):
  tokens, mask = mixed_prompts()
  free = generate(model, tokens, mask, key=jax.random.key(0), max_new_tokens=9, sampling=GREEDY)
  row0 = [int(t) for t in free.tokens[0]]
  stop_at = next(i for i in range(1, 9) if row0[i] not in row0[:i])  # a mid-sequence first hit
  eos = row0[stop_at]
  gen = generate(
      model,
      tokens,
      mask,
      key=jax.random.key(0),
      max_new_tokens=9,
      sampling=SamplingParams(greedy=True, eos_ids=(eos, 999)),
  )
  for row in range(4):
    seq = np.asarray(free.tokens[row])
    hits = np.flatnonzero(seq == eos)
    length = hits[0] + 1 if hits.size else 9
    assert int(gen.lengths[row]) == length
    assert bool(gen.truncated[row]) == (not hits.size)
    np.testing.assert_array_equal(gen.mask[row], np.arange(9) < length)
    np.testing.assert_array_equal(gen.tokens[row, :length], seq[:length])
    np.testing.assert_array_equal(gen.tokens[row, length:], 0)
    np.testing.assert_array_equal(gen.model_logprobs[row, length:], 0.0)
  assert int(gen.lengths[0]) == stop_at + 1 < 9


def test_keys_and_bucketing(model):
  tokens, mask = mixed_prompts()
  sampling = SamplingParams(temperature=1.0)
  a = generate(model, tokens, mask, key=jax.random.key(5), max_new_tokens=10, sampling=sampling)
  b = generate(model, tokens, mask, key=jax.random.key(5), max_new_tokens=10, sampling=sampling)
  c = generate(model, tokens, mask, key=jax.random.key(6), max_new_tokens=10, sampling=sampling)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  # A longer request (another bucket) reproduces the shorter one as its prefix, and an
  # extra padding column in the prompt changes nothing.
  longer = generate(
      model, tokens, mask, key=jax.random.key(5), max_new_tokens=20, sampling=sampling
  )
  np.testing.assert_array_equal(longer.tokens[:, :10], a.tokens)
  padded = generate(
      model,
      jnp.pad(tokens, ((0, 0), (0, 1))),
      jnp.pad(mask, ((0, 0), (0, 1))),
      key=jax.random.key(5),
      max_new_tokens=10,
      sampling=sampling,
  )
  np.testing.assert_array_equal(padded.tokens, a.tokens)
  assert [bucket_size(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_one_compilation_per_bucket(model):
  from opdjax import sampling as sampling_lib

  before = sampling_lib._generate_jit._cache_size()
  for prompt_len, new in ((3, 5), (7, 9), (12, 16), (5, 2)):
    generate(
        model,
        jnp.ones((2, prompt_len), jnp.int32),
        jnp.ones((2, prompt_len), bool),
        key=jax.random.key(0),
        max_new_tokens=new,
        sampling=SamplingParams(top_k=3),
    )
  assert sampling_lib._generate_jit._cache_size() - before == 1


def test_generate_compiles_nothing_but_the_sampler_after_its_inputs(model):
  """The lengths and truncation flags are computed inside the compiled sampler: as eager
  ops after it, each was a program compiled on first use (13 more on the first call of a
  new shape, ~0.3 s of a CPU run's first step) and dispatched on every call."""
  compiled = []
  listener = lambda event, duration, **kw: (
      compiled.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
  )
  tokens = jnp.ones((5, 16), jnp.int32)  # a shape no other test samples: a first call
  mask = jnp.ones((5, 16), bool)
  jax.block_until_ready((tokens, mask))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for new in (20, 32):  # cut to 20 of the 32-token bucket, then the whole bucket
      gen = generate(
          model, tokens, mask, key=jax.random.key(0), max_new_tokens=new, sampling=NO_EOS
      )
      jax.block_until_ready(gen)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # the sampler, the cut to 20 columns, and the conversion of `max_new_tokens`
  assert len(compiled) <= 3, compiled
  assert gen.tokens.shape == (5, 32) and gen.truncated.all() and (gen.lengths == 32).all()


def test_bad_input(model):
  tokens, mask = mixed_prompts()
  with pytest.raises(ValueError, match=r"exceeds the KV cache limit of 12"):
    generate(model, tokens, mask, key=jax.random.key(0), max_new_tokens=8, max_cache_length=12)
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
    SamplingParams(top_p=1.5)
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
    SamplingParams(top_p=0)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    SamplingParams(temperature=-1.0)
  with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
    SamplingParams(top_k=-3)
  with pytest.raises(ValueError, match=r"empty prompt batch"):
    generate(
        model,
        jnp.zeros((2, 0), jnp.int32),
        jnp.zeros((2, 0), bool),
        key=jax.random.key(0),
        max_new_tokens=4,
    )
  with pytest.raises(ValueError, match=r"prompt rows \[1\] have no real tokens"):
    generate(model, tokens, mask.at[1].set(False), key=jax.random.key(0), max_new_tokens=4)
  with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
    generate(model, tokens, mask, key=jax.random.key(0), max_new_tokens=0)
  with pytest.raises(ValueError, match=r"prompt_mask \(4, 5\) must match"):
    generate(model, tokens, mask[:, :5], key=jax.random.key(0), max_new_tokens=4)


def test_top_p_prefilter_is_exact_on_a_large_vocabulary():
  """Top-p looks among the top 256 tokens first; rows whose top 256 hold less than top_p (a
  flat row here) fall back to the full sort. Both must equal the sorted-nucleus reference."""
  rng = np.random.RandomState(0)
  vocab = 1000
  logits = np.stack(
      [
          rng.randn(vocab) * 4.0,  # peaked: nucleus well inside the top 256
          rng.randn(vocab) * 0.01,  # flat: needs most of the vocabulary
          np.where(np.arange(vocab) < 3, 5.0, 0.0),
      ]
  )  # ties at the top
  for top_p in (0.3, 0.9):
    got = np.asarray(
        sampling_distribution(jnp.asarray(logits, jnp.float32), SamplingParams(top_p=top_p))
    )
    for row, out in zip(logits, got):
      probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
      order = np.argsort(-row, kind="stable")
      before = np.cumsum(probs[order]) - probs[order]
      keep = np.zeros(vocab, bool)
      keep[order[before < top_p]] = True
      np.testing.assert_array_equal(np.isfinite(out), keep)
      expected = np.where(keep, probs, 0) / probs[keep].sum()
      np.testing.assert_allclose(np.exp(out), expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_num_samples_shares_the_prefill_and_equals_repeated_prompts(
    model, monkeypatch, scan_layers
):
  """G samples per prompt from one prefill are the rows that repeating each prompt G times
  gives with the same key (same draws, same log-probs), and a prompt's samples differ; a
  scanned model's layer scan repeats its stacked cache's rows."""
  from opdjax import sampling

  monkeypatch.setattr(sampling, "UNROLL_LAYERS", {})  # an accelerator's default: the scan
  model = scanned(model) if scan_layers else model
  tokens, mask = mixed_prompts()
  shared = generate(model, tokens, mask, key=jax.random.key(3), max_new_tokens=6, num_samples=3)
  repeated = generate(
      model,
      jnp.repeat(tokens, 3, axis=0),
      jnp.repeat(mask, 3, axis=0),
      key=jax.random.key(3),
      max_new_tokens=6,
  )
  assert shared.tokens.shape == (12, 6)
  np.testing.assert_array_equal(shared.tokens, repeated.tokens)
  # A prefill over 4 rows and one over 12 round differently (float32, log-probs ~ -3).
  np.testing.assert_allclose(shared.model_logprobs, repeated.model_logprobs, atol=1e-6, rtol=1e-6)
  groups = np.asarray(shared.tokens).reshape(4, 3, 6)
  assert any(len({tuple(row) for row in group}) > 1 for group in groups)
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
    generate(model, tokens, mask, key=jax.random.key(0), max_new_tokens=2, num_samples=0)


def test_fused_projections_sample_what_the_separate_ones_do(model, monkeypatch):
  """`fuse_projections=True` decodes with merged matmuls and samples the same tokens with
  the same log-probs; the default follows `FUSE_PROJECTIONS` for the backend."""
  from opdjax import sampling

  tokens, mask = mixed_prompts()
  run = lambda steps=6, **kw: generate(
      model, tokens, mask, key=jax.random.key(2), max_new_tokens=steps, sampling=NO_EOS, **kw
  )
  fused, separate = run(fuse_projections=True), run(fuse_projections=False)
  np.testing.assert_array_equal(fused.tokens, separate.tokens)
  np.testing.assert_allclose(fused.model_logprobs, separate.model_logprobs, atol=1e-6)
  calls = []
  original = Decoder.fuse_projections
  monkeypatch.setattr(Decoder, "fuse_projections", lambda m: calls.append(1) or original(m))
  monkeypatch.setattr(sampling, "FUSE_PROJECTIONS", {jax.default_backend(): True})
  run(steps=17)  # a new bucket: no compiled sampler to reuse
  assert calls, "the backend's default did not fuse"
  with pytest.raises(ValueError, match="fuse_projections must be True, False or None.*'yes'"):
    run(fuse_projections="yes")


@pytest.mark.parametrize("unroll", [False, True])
def test_a_scanned_model_samples_what_its_per_layer_model_samples(model, monkeypatch, unroll):
  """A scanned model samples the tokens and log-probs of the same weights per layer,
  whether `generate` decodes it with its layer scan or unrolls its layers into modules
  first (`UNROLL_LAYERS`, a CPU's default); unrolled, its KV cache is per layer, and the
  model passed in keeps its stacked layers."""
  from opdjax import sampling
  from opdjax.models.attention import KVCache

  monkeypatch.setattr(sampling, "UNROLL_LAYERS", {jax.default_backend(): unroll})
  stacked, create = [], KVCache.create

  def recording(*args, **kwargs):
    stacked.append(kwargs["stacked"])
    return create(*args, **kwargs)

  monkeypatch.setattr(KVCache, "create", staticmethod(recording))
  tokens, mask = mixed_prompts()
  run = lambda m: generate(  # 40 tokens: a bucket no other test compiles
      m, tokens, mask, key=jax.random.key(5), max_new_tokens=40, sampling=NO_EOS, num_samples=2
  )
  layered, per_layer = scanned(model), run(model)
  stacked.clear()
  got = run(layered)
  assert stacked == [not unroll]
  assert layered.scan_layers
  np.testing.assert_array_equal(got.tokens, per_layer.tokens)
  np.testing.assert_allclose(got.model_logprobs, per_layer.model_logprobs, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_pallas_decode_kernel_samples_what_xla_samples(model, monkeypatch, scan_layers):
  """`decode_kernel="pallas"` moves each prompt's real tokens to the end of its slots (the
  mixed prompts have left and right padding and a hole) and attends over each row's range
  with the Pallas kernel (interpreted here): the same tokens and log-probs as the XLA
  decode, with G samples a prompt, and a scanned model decoded by its layer scan too."""
  from opdjax import sampling

  monkeypatch.setattr(sampling, "UNROLL_LAYERS", {})  # a GPU's default: the layer scan
  model = scanned(model) if scan_layers else model
  tokens, mask = mixed_prompts()
  run = lambda kernel: generate(
      model,
      tokens,
      mask,
      key=jax.random.key(4),
      max_new_tokens=20,
      sampling=NO_EOS,
      num_samples=2,
      decode_kernel=kernel,
  )
  pallas, xla = run("pallas"), run("xla")
  np.testing.assert_array_equal(pallas.tokens, xla.tokens)
  np.testing.assert_allclose(pallas.model_logprobs, xla.model_logprobs, atol=1e-5)
  with pytest.raises(ValueError, match=r"decode kernel must be one of .*got 'cuda'"):
    run("cuda")


@pytest.mark.parametrize(
    "scan_layers,unroll,fuse",
    [(False, False, False), (True, False, False), (True, True, False), (False, False, True)],
)
def test_sharded_prompts_give_batch_sharded_outputs_equal_to_one_device(
    model, monkeypatch, scan_layers, unroll, fuse
):
  """On a data x fsdp x tensor = (2, 2, 2) mesh with weights laid out by the partition rules,
  the sampler keeps the prompts' row sharding (KV cache included) and samples exactly
  what one device samples: a scanned model decoded by its layer scan or unrolled (its
  sharded stack sliced per layer), and with the projections merged (their key-value-head
  grouping keeps a tensor shard's q, k and v together)."""
  from opdjax import sampling, sharding

  monkeypatch.setattr(sampling, "UNROLL_LAYERS", {jax.default_backend(): unroll})

  mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  graphdef, state = nnx.split(scanned(model) if scan_layers else model)
  single = nnx.merge(graphdef, state)
  placed = nnx.merge(graphdef, sharding.place_state(state, mesh))
  tokens, mask = mixed_prompts()
  tokens, mask = jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask])  # 8 rows
  rows = sharding.batch_sharding(mesh)
  key = jax.random.key(3)
  want = generate(single, tokens, mask, key=key, max_new_tokens=5, num_samples=2)
  got = generate(
      placed,
      jax.device_put(tokens, rows),
      jax.device_put(mask, rows),
      key=key,
      max_new_tokens=5,
      num_samples=2,
      fuse_projections=fuse,
  )
  for name in ("tokens", "sample_logprobs", "model_logprobs"):
    out = getattr(got, name)
    assert out.sharding.spec[0] == ("data", "fsdp"), (name, out.sharding)
    np.testing.assert_allclose(np.asarray(out), np.asarray(getattr(want, name)), atol=1e-5)
