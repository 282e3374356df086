"""Autoregressive sampling with a KV cache: prefill once, then decode inside `jax.jit`.

`generate` pads the prompt length and the number of new tokens up to power-of-two buckets
(at least 16), so a run compiles once per (batch, bucket) pair rather than per batch; the
real `max_new_tokens` is a traced value. Decoding is a `lax.while_loop` over fixed-size
`lax.scan` chunks that exits once every row has finished; step `s` always draws with
`fold_in(key, s)`, so early exit and bucketing never change the samples. The KV cache lives
inside the jitted computation (the loop carry), so XLA updates it in place.

Prompts may be left- or right-padded (or have holes): `prompt_mask` marks real tokens,
each row continues from its own last real token, and RoPE positions are per row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opdjax.distributed import local_rows
from opdjax.errors import ConfigError
from opdjax.models import attention, positions_from_mask
from opdjax.models.attention import KVCache

_CHUNK = 16  # decode steps per scan chunk between early-exit checks
_MIN_BUCKET = 16
# Whether `generate` decodes with merged projections (`Decoder.fuse_projections`), by
# backend. On an H200 a batch-1 Qwen3-0.6B-shaped decode step took 1.54 ms merged against
# 2.02 ms (`benchmarks/decode_fusion.py`; equal at batch 64).
FUSE_PROJECTIONS = {"gpu": True}
# Whether `generate` decodes a scanned model with one module per layer
# (`Decoder.unroll_layers`), by backend. CPU: XLA copies each layer's weights out of the
# stack in every decode step otherwise.
UNROLL_LAYERS = {"cpu": True}
# The config's `sampling.fuse_projections` names for `generate`'s `fuse_projections`.
FUSE_SETTINGS = {"auto": None, "on": True, "off": False}
_TOP_P_CANDIDATES = 256  # top-p looks for the nucleus among this many tokens first


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is drawn (hashable: it is a static argument of the compiled loop).

  Attributes:
    temperature: divides the logits; 0 means greedy.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    min_p: keep tokens with probability ≥ `min_p` × the top probability (0 = off).
    greedy: take the argmax (same as temperature 0).
    eos_ids: tokens that end a row; None uses the model config's `eos_token_ids`.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  greedy: bool = False
  eos_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
    if not 0 <= self.min_p < 1:
      raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
    if self.eos_ids is not None:
      object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0


class Generation(NamedTuple):
  """What `generate` returns; every array has batch size B and N = max_new_tokens.

  Attributes:
    tokens: `[B, N]` int32 completion ids (0 after a row's end).
    mask: `[B, N]` bool, True on real completion tokens (the EOS token included).
    lengths: `[B]` int32 number of real completion tokens.
    truncated: `[B]` bool, True where the row hit `max_new_tokens` without an EOS.
    sample_logprobs: `[B, N]` float32 log-prob of each token under the distribution it was
      drawn from (after temperature/top-k/top-p/min-p; 0 for greedy); 0 where masked.
    model_logprobs: `[B, N]` float32 log-prob under the untruncated model at temperature 1;
      0 where masked.
    logits: `[B, N, V]` float32 model logits per step, only if `return_logits=True`.
  """

  tokens: jax.Array
  mask: jax.Array
  lengths: jax.Array
  truncated: jax.Array
  sample_logprobs: jax.Array
  model_logprobs: jax.Array
  logits: jax.Array | None = None


class DecodeState(NamedTuple):
  """The decode loop's carry (B rows, N = bucketed new tokens, S cache slots, V vocab)."""

  step: jax.Array  # [] int32, the next decode step (= completion index)
  cache: KVCache  # per layer keys [B, K, Dh, S], values [B, K, S, Dh], valid [B, S], index []
  next_logits: jax.Array  # [B, V] float32 logits of the token to draw at `step`
  next_position: jax.Array  # [B] int32 RoPE position of that token in its own row
  done: jax.Array  # [B] bool, row has emitted EOS (or is past max_new_tokens)
  buffers: dict  # {tokens, mask, sample_logprobs, model_logprobs[, logits]}: [B, N(, V)]


def bucket_size(n: int, minimum: int = _MIN_BUCKET) -> int:
  """The compile bucket of a length: the next power of two, at least `minimum`."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def cache_slots(prompt_length: int, max_new_tokens: int) -> int:
  """The length of the KV cache `generate` allocates: the prompt and the new tokens, each
  rounded up to its compile bucket (`bucket_size`)."""
  return bucket_size(prompt_length) + bucket_size(max_new_tokens)


def sampling_distribution(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
  """Log-probabilities `[..., V]` the sampler draws from (processed, renormalised).

  Temperature first, then top-k, top-p and min-p masks (each keeps at least one token).
  """
  logits = logits.astype(jnp.float32) / (sampling.temperature if not sampling.is_greedy else 1.0)
  vocab = logits.shape[-1]
  if sampling.top_k and sampling.top_k < vocab:
    _, keep = jax.lax.top_k(logits, sampling.top_k)
    kept = jnp.zeros(logits.shape, bool)
    kept = jnp.put_along_axis(kept, keep, True, axis=-1, inplace=False)
    logits = jnp.where(kept, logits, -jnp.inf)
  if sampling.top_p < 1.0:
    logits = _top_p_mask(logits, sampling.top_p)
  if sampling.min_p > 0.0:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    threshold = jnp.max(log_probs, axis=-1, keepdims=True) + jnp.log(sampling.min_p)
    logits = jnp.where(log_probs >= threshold, logits, -jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1)


def _nucleus(logits, top_p: float, candidates: int):
  """`logits` with every token outside the top-p nucleus among the top `candidates` masked,
  and whether those candidates held at least `top_p` of the mass (then the mask is exact)."""
  top_logits, top_ids = jax.lax.top_k(logits, candidates)  # sorted, descending
  log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  top_probs = jnp.exp(top_logits - log_z)
  mass_before = jnp.cumsum(top_probs, axis=-1) - top_probs
  keep_sorted = mass_before < top_p  # the first token stays
  kept = jnp.put_along_axis(
      jnp.zeros(logits.shape, bool), top_ids, keep_sorted, axis=-1, inplace=False
  )
  enough = jnp.all(jnp.sum(top_probs, axis=-1) >= top_p)
  return jnp.where(kept, logits, -jnp.inf), enough


def _top_p_mask(logits, top_p: float):
  """Top-p (nucleus) truncation. The nucleus is searched among the top 256 tokens first
  (`lax.top_k`, no vocabulary-wide sort); only if some row's top 256 hold less than `top_p`
  of the mass does it sort the whole vocabulary, so the result is always exact."""
  vocab = logits.shape[-1]
  if vocab <= _TOP_P_CANDIDATES:
    return _nucleus(logits, top_p, vocab)[0]
  masked, enough = _nucleus(logits, top_p, _TOP_P_CANDIDATES)
  return jax.lax.cond(enough, lambda: masked, lambda: _nucleus(logits, top_p, vocab)[0])


def _draw(logits, key, sampling: SamplingParams):
  """One token per row `[B]`, with its sampling and model log-probs."""
  model_log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if sampling.is_greedy:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample_log_prob = jnp.zeros(token.shape, jnp.float32)
  else:
    sample_log_probs = sampling_distribution(logits, sampling)
    token = jax.random.categorical(key, sample_log_probs, axis=-1).astype(jnp.int32)
    sample_log_prob = jnp.take_along_axis(sample_log_probs, token[:, None], axis=-1)[:, 0]
  model_log_prob = jnp.take_along_axis(model_log_probs, token[:, None], axis=-1)[:, 0]
  return token, sample_log_prob, model_log_prob


def _repeat_rows(cache: KVCache, count: int, stacked: bool) -> KVCache:
  """Each prompt's cache rows `count` times in a row (the samples of a prompt are adjacent)."""
  repeat = lambda x, axis: jnp.repeat(x, count, axis=axis)
  kv_axis = 1 if stacked else 0  # [L, B, K, ...] or per layer [B, K, ...]
  return cache._replace(
      keys=jax.tree.map(lambda k: repeat(k, kv_axis), cache.keys),
      values=jax.tree.map(lambda v: repeat(v, kv_axis), cache.values),
      valid=repeat(cache.valid, 0),
      start=None if cache.start is None else repeat(cache.start, 0),
  )


def _shard_rows(cache: KVCache, rows, stacked: bool, tensor: bool) -> KVCache:
  """Pins the cache's batch dimension to the prompts' row sharding (and its KV heads to
  "tensor" when the mesh has that axis and it divides them)."""
  if rows is None:
    return cache
  mesh, row_axes = rows.mesh, rows.spec[0] if rows.spec else None
  lead = (None,) if stacked else ()
  heads = "tensor" if tensor else None
  kv = NamedSharding(mesh, P(*lead, row_axes, heads, None, None))
  constrain = lambda x, s: jax.lax.with_sharding_constraint(x, s)
  return cache._replace(
      keys=jax.tree.map(lambda k: constrain(k, kv), cache.keys),
      values=jax.tree.map(lambda v: constrain(v, kv), cache.values),
      valid=constrain(cache.valid, NamedSharding(mesh, P(row_axes, None))),
      start=None
      if cache.start is None
      else constrain(cache.start, NamedSharding(mesh, P(row_axes))),
  )


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "sampling",
        "eos_ids",
        "steps",
        "return_logits",
        "num_samples",
        "rows",
        "fuse",
        "unroll",
        "kernel",
    ),
)
def _generate_jit(
    graphdef,
    state,
    prompt_tokens,
    prompt_mask,
    key,
    max_new_tokens,
    *,
    sampling: SamplingParams,
    eos_ids: tuple[int, ...],
    steps: int,
    return_logits: bool,
    num_samples: int,
    rows,
    fuse: bool,
    unroll: bool,
    kernel: str,
):
  model = nnx.merge(graphdef, state)
  if unroll:
    model.unroll_layers()
  if fuse:
    model.fuse_projections()
  batch, prompt_len = prompt_tokens.shape
  if kernel == "pallas":  # each row's real tokens last, so its slots have no hole
    order = jnp.argsort(prompt_mask, axis=1, stable=True)
    prompt_tokens = jnp.take_along_axis(prompt_tokens, order, axis=1)
    prompt_mask = jnp.take_along_axis(prompt_mask, order, axis=1)
  positions = positions_from_mask(prompt_mask)
  tensor = (
      rows is not None
      and rows.mesh.shape.get("tensor", 1) > 1
      and model.config.num_kv_heads % rows.mesh.shape["tensor"] == 0
  )
  pin = lambda c: _shard_rows(c, rows, model.scan_layers, tensor)
  cache = pin(model.init_cache(batch, prompt_len + steps))
  last_real = prompt_len - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)
  next_logits, cache = model.prefill(
      prompt_tokens, positions, cache, token_mask=prompt_mask, logits_at=last_real
  )
  next_position = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
  if kernel == "pallas":  # slots [P - real tokens, index) hold each row's tokens
    cache = pin(cache._replace(start=prompt_len - next_position))
  if num_samples > 1:  # one prefill per prompt, then num_samples decode rows each
    cache = pin(_repeat_rows(cache, num_samples, model.scan_layers))
    next_logits = jnp.repeat(next_logits, num_samples, axis=0)
    next_position = jnp.repeat(next_position, num_samples, axis=0)
    batch *= num_samples
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  buffers = dict(
      tokens=jnp.zeros((batch, steps), jnp.int32),
      mask=jnp.zeros((batch, steps), bool),
      sample_logprobs=jnp.zeros((batch, steps), jnp.float32),
      model_logprobs=jnp.zeros((batch, steps), jnp.float32),
  )
  if return_logits:
    buffers["logits"] = jnp.zeros((batch, steps, next_logits.shape[-1]), jnp.float32)

  def step_fn(state: DecodeState, _):
    active = ~state.done & (state.step < max_new_tokens)
    token, sample_lp, model_lp = _draw(
        state.next_logits, jax.random.fold_in(key, state.step), sampling
    )
    token = jnp.where(active, token, 0)
    updates = dict(
        tokens=token,
        mask=active,
        sample_logprobs=jnp.where(active, sample_lp, 0.0),
        model_logprobs=jnp.where(active, model_lp, 0.0),
    )
    if return_logits:
      updates["logits"] = state.next_logits.astype(jnp.float32)
    buffers = {
        name: jax.lax.dynamic_update_slice_in_dim(buf, updates[name][:, None], state.step, axis=1)
        for name, buf in state.buffers.items()
    }
    new_logits, cache = model.decode(token, state.next_position, state.cache, active=active)
    return (
        DecodeState(
            step=state.step + 1,
            cache=cache,
            next_logits=new_logits,
            next_position=state.next_position + active.astype(jnp.int32),
            done=state.done | ~active | jnp.isin(token, eos),
            buffers=buffers,
        ),
        None,
    )

  def chunk(state):
    state, _ = jax.lax.scan(step_fn, state, None, length=min(_CHUNK, steps))
    return state

  def keep_going(state):
    return (state.step < jnp.minimum(max_new_tokens, steps)) & ~jnp.all(state.done)

  state = DecodeState(
      step=jnp.zeros((), jnp.int32),
      cache=cache,
      next_logits=next_logits,
      next_position=next_position,
      done=jnp.zeros((batch,), bool),
      buffers=buffers,
  )
  out = jax.lax.while_loop(keep_going, chunk, state).buffers
  out["lengths"] = jnp.sum(out["mask"], axis=1).astype(jnp.int32)
  last = jnp.take_along_axis(out["tokens"], jnp.maximum(out["lengths"] - 1, 0)[:, None], axis=1)
  out["truncated"] = (out["lengths"] == max_new_tokens) & ~jnp.isin(last[:, 0], eos)
  return out


@functools.partial(jax.jit, static_argnames="length")
def _first_columns(buffers: dict, length: int) -> dict:
  """Each `[B, N_bucket, ...]` buffer cut to its first `length` columns, in one program."""
  return {name: value[:, :length] for name, value in buffers.items()}


def _row_sharding(x):
  """`x`'s sharding if it is a `NamedSharding` that splits rows, else None."""
  sharding = getattr(x, "sharding", None)
  if (
      isinstance(sharding, NamedSharding)
      and sharding.spec
      and sharding.spec[0] is not None
      and not isinstance(x, jax.core.Tracer)
  ):
    return sharding
  return None


def fuses_projections(fuse: bool | None = None) -> bool:
  """Whether `generate(..., fuse_projections=fuse)` merges projections: `fuse`, or by
  default (None) `FUSE_PROJECTIONS` for the backend."""
  if fuse is None:
    return FUSE_PROJECTIONS.get(jax.default_backend(), False)
  if not isinstance(fuse, bool):
    raise ValueError(f"fuse_projections must be True, False or None (auto), got {fuse!r}")
  return fuse


def generate(
    model,
    prompt_tokens,
    prompt_mask,
    *,
    key: jax.Array,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    return_logits: bool = False,
    max_cache_length: int | None = None,
    num_samples: int = 1,
    fuse_projections: bool | None = None,
    decode_kernel: str | None = None,
) -> Generation:
  """Samples up to `max_new_tokens` completion tokens for every prompt row.

  Args:
    model: an `opdjax.models.Decoder` (any dtype; logits and log-probs are float32). A
      scanned model is decoded by its layer scan, or on a backend in `UNROLL_LAYERS` (a
      CPU) with its layers sliced out of the stack once (`Decoder.unroll_layers`).
    prompt_tokens: `[B, P]` int ids, left- or right-padded (or with holes).
    prompt_mask: `[B, P]` bool/0-1, True on real prompt tokens; every row needs at least one.
    key: a `jax.random` key; the same key gives the same output.
    max_new_tokens: N ≥ 1.
    sampling: `SamplingParams`.
    return_logits: also return the `[B, N, V]` model logits of every step.
    max_cache_length: the KV cache size limit (default the model's
      `max_position_embeddings`); `P + N` must fit.
    num_samples: G independent completions per prompt. The prompt is prefilled once and
      its cache copied to G rows; the output has `B·G` rows, prompt b's samples at rows
      `b·G … b·G + G − 1` (as `jnp.repeat(prompts, G, axis=0)` would order them).
    fuse_projections: decode with each layer's q/k/v and gate/up projections merged
      (`Decoder.fuse_projections`: an extra copy of those weights while sampling, and one
      matmul for three and for two); default (None) `FUSE_PROJECTIONS[backend]`.
    decode_kernel: the decode step's attention, "xla" or "pallas"
      (`attention.DECODE_KERNEL`, the backend's by default). With "pallas" each prompt's
      real tokens are moved to the end of its slots first, an exact change (positions
      count real tokens), so that a row's tokens fill one range of the cache.

  Returns:
    A `Generation`.
  """
  rows = _row_sharding(prompt_tokens)  # the sampler keeps the prompts' row layout
  prompt_tokens = jnp.asarray(prompt_tokens)
  prompt_mask = jnp.asarray(prompt_mask).astype(bool)
  if prompt_tokens.ndim != 2 or not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise ValueError(
        f"prompt_tokens must be int ids [B, P], got {prompt_tokens.dtype} " f"{prompt_tokens.shape}"
    )
  if prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(
        f"prompt_mask {prompt_mask.shape} must match prompt_tokens {prompt_tokens.shape}"
    )
  batch, prompt_len = prompt_tokens.shape
  if batch == 0 or prompt_len == 0:
    raise ValueError(f"empty prompt batch: prompt_tokens has shape {prompt_tokens.shape}")
  if not isinstance(prompt_mask, jax.core.Tracer):  # this process's rows (all, on one)
    empty_rows = np.flatnonzero(~local_rows(prompt_mask).any(axis=1))
    if empty_rows.size:
      where = f" of process {jax.process_index()}" if jax.process_count() > 1 else ""
      raise ValueError(
          f"prompt rows {empty_rows.tolist()}{where} have no real tokens " "(all-False prompt_mask)"
      )
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
  limit = max_cache_length or model.config.max_position_embeddings
  if prompt_len + max_new_tokens > limit:
    raise ValueError(
        f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
        f"{prompt_len + max_new_tokens} exceeds the KV cache limit of {limit} "
        "(max_cache_length / the model's max_position_embeddings)"
    )

  padded_len = bucket_size(prompt_len)
  steps = bucket_size(max_new_tokens)
  if padded_len > prompt_len:  # padding is masked out, so it changes nothing
    extra = padded_len - prompt_len
    prompt_tokens = jnp.pad(prompt_tokens, ((0, 0), (0, extra)))
    prompt_mask = jnp.pad(prompt_mask, ((0, 0), (0, extra)))
  eos_ids = sampling.eos_ids if sampling.eos_ids is not None else tuple(model.config.eos_token_ids)
  graphdef, state = nnx.split(model)
  out = _generate_jit(
      graphdef,
      state,
      prompt_tokens.astype(jnp.int32),
      prompt_mask,
      key,
      jnp.int32(max_new_tokens),
      sampling=sampling,
      eos_ids=tuple(eos_ids),
      steps=steps,
      return_logits=return_logits,
      num_samples=num_samples,
      rows=rows,
      fuse=fuses_projections(fuse_projections),
      unroll=model.scan_layers and UNROLL_LAYERS.get(jax.default_backend(), False),
      kernel=attention.decode_kernel(decode_kernel),
  )
  lengths, truncated = out.pop("lengths"), out.pop("truncated")
  if max_new_tokens < steps:  # no eager ops after the sampler: each would compile on first use
    out = _first_columns(out, max_new_tokens)
  return Generation(
      tokens=out["tokens"],
      mask=out["mask"],
      lengths=lengths,
      truncated=truncated,
      sample_logprobs=out["sample_logprobs"],
      model_logprobs=out["model_logprobs"],
      logits=out.get("logits"),
  )
