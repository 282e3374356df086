"""Attention over a KV cache: the cache's layout, the full-sequence kernels, and the decode
step's attention over the filled slots.

Shapes: `B` batch, `T` new tokens, `S` cache slots, `H`/`K` query/key-value heads, `Dh`
head dim, `L` layers.

Padding scheme (exact for left- and right-padded batches): every row writes its tokens
into the same cache *slots* (slot = step index, shared by the batch), while RoPE uses each
row's own *positions*. A boolean `valid[B, S]` records which slots hold real tokens, so
a query attends exactly the real tokens at or before its slot. Padded slots cost memory
but never change a real token's output.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opdjax.models.config import ModelConfig


class KVCache(NamedTuple):
  """Per-layer key/value buffers plus the bookkeeping that makes padding exact.

  Attributes:
    keys: tuple over layers of `[B, K, Dh, S]`, or one `[L, B, K, Dh, S]` array for a
      model with scanned layers. Slots last: a decode step's scores `Σ_d q_d k_{d,s}` add
      whole vectors of slots, one head dimension at a time, where slots before head
      dimensions would reduce each slot's few head dimensions (see `attend_one`).
    values: `[B, K, S, Dh]` per layer, or `[L, B, K, S, Dh]`: the weighted sum over slots
      adds whole rows of head dimensions.
    valid: `[B, S]` bool, True where a slot holds a real token.
    index: int32 scalar, the next slot to write.
    start: `[B]` int32 where each row's tokens fill slots `[start, index)` without a hole,
      or None where they may not. The sampler sets it where the backend's decode kernel is
      "pallas" (`DECODE_KERNEL`), after laying each prompt's real tokens at the end of its
      slots; a decode step then attends over that range with the Pallas kernel.
  """

  keys: tuple[jax.Array, ...] | jax.Array
  values: tuple[jax.Array, ...] | jax.Array
  valid: jax.Array
  index: jax.Array
  start: jax.Array | None = None

  @classmethod
  def create(
      cls,
      config: ModelConfig,
      batch_size: int,
      max_length: int,
      dtype=jnp.float32,
      *,
      stacked: bool = False,
  ) -> "KVCache":
    heads = (batch_size, config.num_kv_heads)
    if stacked:
      make = lambda *shape: jnp.zeros((config.num_layers,) + heads + shape, dtype)
    else:
      make = lambda *shape: tuple(jnp.zeros(heads + shape, dtype) for _ in range(config.num_layers))
    return cls(
        keys=make(config.head_dim, max_length),
        values=make(max_length, config.head_dim),
        valid=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
    )

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]


class LayerCache(NamedTuple):
  """One layer's part of a `KVCache` in a cached forward pass.

  Attributes:
    keys: that layer's `[B, K, Dh, S]` buffer, or, with `layer` set, every layer's
      stacked `[L, B, K, Dh, S]` buffer (scanned layers: the stack is the scan's carry and
      each layer writes its row in place; passing rows in and out of the scan would copy
      the whole cache in every step).
    values: the same for `[B, K, S, Dh]` (`[L, B, K, S, Dh]`).
    index: int32 scalar, the first slot to write.
    layer: int32 scalar row of the stacked buffers, or None.
    start: the `KVCache`'s `start` (`[B]` or None).
  """

  keys: jax.Array
  values: jax.Array
  index: jax.Array
  layer: jax.Array | None = None
  start: jax.Array | None = None

  def write(self, k, v) -> "LayerCache":
    """Writes `k, v [B, T, K, Dh]` at slots `[index, index + T)`."""
    lead = () if self.layer is None else (self.layer,)
    zero = jnp.zeros((), jnp.int32)

    def put(cache, new, start):
      new = new.astype(cache.dtype).reshape((1,) * len(lead) + new.shape)
      return jax.lax.dynamic_update_slice(cache, new, lead + start)

    return self._replace(
        keys=put(self.keys, k.transpose(0, 2, 3, 1), (zero, zero, zero, self.index)),
        values=put(self.values, v.swapaxes(1, 2), (zero, zero, self.index, zero)),
    )

  def read(self, slots: int | None = None) -> tuple[jax.Array, jax.Array]:
    """This layer's keys `[B, K, Dh, slots]` and values `[B, K, slots, Dh]`: its first
    `slots` (default all)."""
    if self.layer is None:
      return self.keys[..., :slots], self.values[:, :, :slots]
    slots = slots or self.values.shape[-2]
    zeros = (jnp.zeros((), jnp.int32),) * 4
    row = lambda x, size: jax.lax.dynamic_slice(x, (self.layer,) + zeros, (1,) + size)[0]
    heads = self.values.shape[1:3]
    return row(self.keys, heads + (self.keys.shape[-2], slots)), row(
        self.values, heads + (slots, self.values.shape[-1])
    )


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# Queries per block of XLA's attention (`attend`): a longer sequence attends one block of
# queries after another, and the backward pass recomputes each block's scores, so the
# scores held at once are `[B, H, QUERY_BLOCK, S]`, not `[B, H, T, S]`. On a 2-core CPU
# (B = 2, 16 heads over 8, Dh = 128, float32, value and gradient) T = 4,096 needs 1.59 GB
# of temporaries instead of 10.77 GB, in 9.6 instead of 13.7 s; T = 2,048: 0.81 against
# 2.70 GB, 2.5 against 3.1 s (benchmarks/results/attention_blocks_cpu_2core.jsonl). A
# sequence of at most QUERY_BLOCK tokens computes as before, in one block.
QUERY_BLOCK = 512


def attend(
    q,
    k,
    v,
    mask,
    *,
    implementation: str = "auto",
    query_block: int | None = None,
    causal: bool = False,
) -> jax.Array:
  """Softmax attention `[B, T, H, Dh]` over keys `[B, S, K, Dh]` (GQA: H a multiple of K).

  `mask [B, T, S]` is True where a query may attend a key. Runs `jax.nn.dot_product_attention`
  (float32 softmax): "xla" everywhere, "cudnn" (flash attention) on GPUs, "auto" = cuDNN on
  a GPU for 16-bit inputs, XLA otherwise. XLA's attention runs in blocks of `query_block`
  queries (default `QUERY_BLOCK`; `attend_query_blocks`); with `causal` (the caller's
  promise that no query attends a key after its own slot, query t being slot t, as in a
  full-sequence forward) it skips the keys after each group of blocks
  (`attend_causal_groups`). A fully masked query row attends uniformly (it is padding
  whose output is never read) rather than producing NaN. ("splash", the TPU kernel,
  serves full-sequence forwards through `splash.splash_attention`; for any other mask,
  here, it means "auto".)
  """
  if resolve_implementation(implementation, q.dtype, q.shape[-1]) != "cudnn":
    blocks = attend_causal_groups if causal else attend_query_blocks
    return blocks(q, k, v, mask, block=query_block or QUERY_BLOCK)
  length = q.shape[1]
  q, k, v, mask = even_lengths(q, k, v, mask)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
  return out[:, :length]


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
  """The kernel `attend` runs for setting `implementation` on this backend: "xla" or
  "cudnn" ("auto" and "splash" are cuDNN on a GPU for 16-bit inputs and head dims up to
  128 that are multiples of 8, XLA otherwise; an unknown name is an error)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
        f"got {implementation!r}"
    )
  if implementation not in ("auto", "splash"):
    return implementation
  cudnn = (
      jax.default_backend() == "gpu"
      and head_dim <= 128
      and head_dim % 8 == 0
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  )
  return "cudnn" if cudnn else "xla"


def attend_query_blocks(q, k, v, mask, *, block: int) -> jax.Array:
  """XLA's attention (`attend`'s arguments) over blocks of `block` queries in a loop, each
  block rematerialised in the backward pass: memory `O(block · S)` rather than `O(T · S)`.

  Every query still attends all S keys in one softmax, so each output equals the whole
  sequence's to rounding (XLA may tile a smaller product differently); the keys' and
  values' gradients are summed over blocks. Queries are padded to a whole number of blocks
  with fully masked rows, which are dropped. This is the query-chunking half of the
  memory-efficient attention of Rabe & Staats; it computes every score, masked or not, as
  XLA's attention does (a flash kernel skips the blocks a causal mask hides).

  References:
    Rabe & Staats, "Self-attention Does Not Need O(n²) Memory", 2021.
    https://arxiv.org/abs/2112.05682
  """
  batch, length = q.shape[:2]
  if length <= block:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
  count = -(-length // block)
  pad = lambda x: pad_end(x, 1, count * block - length)
  blocks = lambda x: x.reshape((batch, count, block) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one_block(q_and_mask):
    q_b, mask_b = q_and_mask
    return jax.nn.dot_product_attention(q_b, k, v, mask=mask_b[:, None], implementation="xla")

  out = jax.lax.map(one_block, (blocks(pad(q)), blocks(pad(mask))))  # [count, B, block, H, Dh]
  return out.swapaxes(0, 1).reshape((batch, count * block) + out.shape[3:])[:, :length]


# Runs of query blocks in a causal attention (`attend_causal_groups`), each over the keys
# up to its last query: two groups skip a quarter of the scores. On a 2-core CPU (the
# `QUERY_BLOCK` comment's shapes, float32, value and gradient) T = 2,048 runs in 2.01
# instead of 2.59 s and holds 0.91 instead of 0.81 GB; T = 4,096: 7.50 against 9.73 s,
# 1.80 against 1.59 GB (benchmarks/results/attention_blocks_cpu_2core.jsonl). XLA runs the
# groups' loops side by side, so more groups hold more (four, in an ad-hoc run: 1.71 s and
# 1.75 GB at 2,048).
CAUSAL_QUERY_GROUPS = 2


def attend_causal_groups(q, k, v, mask, *, block: int) -> jax.Array:
  """`attend_query_blocks` for a causal `mask` (query t is slot t and attends no later
  slot): the blocks are split into `CAUSAL_QUERY_GROUPS` runs, and each run's queries
  attend only the keys up to its last query, which are all any of them may see.

  A query's softmax then runs over fewer keys, all of the dropped ones masked, so its
  output equals the ungrouped one to rounding; a fully masked (padding) query attends
  uniformly over its group's keys instead of all S, an output that is never read.
  """
  length = q.shape[1]
  count = -(-length // block)
  groups = min(CAUSAL_QUERY_GROUPS, count)
  ends = [min(-(-count * g // groups) * block, length) for g in range(1, groups + 1)]
  outs = [
      attend_query_blocks(
          q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end], block=block
      )
      for start, end in zip([0] + ends[:-1], ends)
  ]
  return jnp.concatenate(outs, axis=1)


DECODE_WINDOW = 128  # slots per step of the decode attention's window (see `attend_one`)
MAX_DECODE_WINDOWS = 8  # at most this many window sizes (one compiled branch each)
# The largest window short of the whole cache, as a fraction of its slots. XLA's CPU
# backend copies a window out of the cache before reducing it, and past about half the
# cache the copy costs more than the slots it skips: over 640 slots (batch 64, 4 KV heads,
# head dim 32, 300 filled) a 384-slot window took 6.65 ms a step against 4.65 ms for the
# whole cache, and the CPU sampler at 512 new tokens ran 1.09-1.42x faster with windows up
# to half the cache than up to all of it (benchmarks/results/decode_attention_cpu_2core.jsonl,
# decode_windows_cpu_2core.jsonl; docs/benchmarks.md).
DECODE_WINDOWS_UP_TO = 0.5
# The smallest layer cache (keys and values of every row, in bytes) whose decode steps use
# windows, by backend (absent: 0, always; None: never). Each layer picks its window with a
# `lax.switch`, and XLA's GPU backend runs a conditional from the host. On an H200 a
# Qwen3-0.6B-shaped bfloat16 decode read its cache whole 1.28x faster at batch 1 and 1.22x
# at batch 64 (144 slots, 2 windows: 0.5 ms a step), and 1.20x faster at batch 64 with
# 1,040 slots (a 272 MB layer cache, 8 windows, where the windows skip some 3.8 GB of
# cache reads a step), compiling in 11 s against 91 s
# (benchmarks/results/decode_windows_h200.jsonl): a GPU reads the cache whole.
WINDOWED_DECODE_MIN_BYTES = {"gpu": None}


def decode_windows(max_length: int, layer_bytes: int | None = None) -> tuple[int, ...]:
  """The window sizes a decode step may attend over in a cache of `max_length` slots:
  multiples of `DECODE_WINDOW` up to `DECODE_WINDOWS_UP_TO` of the cache (coarser for long
  caches, at most `MAX_DECODE_WINDOWS` in all), then `max_length`; only `max_length` where
  the backend's `WINDOWED_DECODE_MIN_BYTES` is None or above a layer cache of
  `layer_bytes`.

  >>> decode_windows(528), decode_windows(200)
  ((128, 256, 528), (200,))
  """
  threshold = WINDOWED_DECODE_MIN_BYTES.get(jax.default_backend(), 0)
  largest = min(int(max_length * DECODE_WINDOWS_UP_TO), max_length - 1)
  small = threshold is None or (layer_bytes is not None and layer_bytes < threshold)
  if small or MAX_DECODE_WINDOWS < 2 or largest < DECODE_WINDOW:
    return (max_length,)
  step = max(DECODE_WINDOW, -(-largest // (MAX_DECODE_WINDOWS - 1)))
  return tuple(range(step, largest + 1, step)) + (max_length,)


# The decode step's attention kernel by backend (absent: "xla"): "xla" (`attend_one`'s
# multiply-and-reduce over a window of the cache) or "pallas" (`attend_range`: JAX's Pallas
# GPU decode kernel, which reads only each row's filled slots; interpreted off a GPU).
DECODE_KERNELS = ("xla", "pallas")
DECODE_KERNEL: dict[str, str] = {}


def decode_kernel(kernel: str | None = None) -> str:
  """`kernel`, or by default the backend's `DECODE_KERNEL`; an unknown name is an error, and
  so is "pallas" on a TPU (a GPU kernel, which only a CPU interprets, for tests)."""
  backend = jax.default_backend()
  kernel = DECODE_KERNEL.get(backend, "xla") if kernel is None else kernel
  if kernel not in DECODE_KERNELS:
    raise ValueError(f"decode kernel must be one of {DECODE_KERNELS}, got {kernel!r}")
  if kernel == "pallas" and backend not in ("gpu", "cpu"):  # a CPU interprets it (tests)
    raise ValueError(f"the 'pallas' decode kernel is a GPU (Triton) kernel; on {backend} use 'xla'")
  return kernel


def attend_range(q, cache: LayerCache) -> jax.Array:
  """`attend_one` where each row's tokens fill slots `[cache.start, cache.index]`, with
  `jax.experimental.pallas.ops.gpu.decode_attention`'s kernel (Triton), one program per
  key-value head and block of slots, each reading only the filled part of its block, then
  XLA combining the blocks' partial softmaxes. Off a GPU the kernel is interpreted (tests).

  Args:
    q: `[B, 1, H, Dh]`.
    cache: the layer's `LayerCache` with `start` set, this step's token already written.
  """
  from jax.experimental.pallas.ops.gpu import decode_attention  # Triton: only where used

  batch, _, heads, head_dim = q.shape
  keys, values = cache.read()  # [B, K, Dh, S], [B, K, S, Dh]
  keys = keys.swapaxes(-1, -2)  # the kernel reads [S, Dh] per head
  kv_heads, slots = keys.shape[1], keys.shape[2]
  block = math.gcd(slots, 128)  # the kernel's blocks are powers of two that divide S
  if block < 16:
    raise ValueError(f"the Pallas decode kernel needs a multiple of 16 cache slots, got {slots}")
  kernel = functools.partial(
      decode_attention.decode_attn_unbatched,
      sm_scale=head_dim**-0.5,
      block_h=16,
      block_k=block,
      k_splits=slots // block,
      num_warps=None,
      num_stages=2,
      grid=None,
      interpret=jax.default_backend() != "gpu",
      debug=False,
      return_residuals=False,
      normalize_output=True,
  )
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None, None))
  q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
  per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0, None))
  out = per_row(q, keys.astype(q.dtype), values.astype(q.dtype), cache.start, cache.index + 1)
  return out.reshape(batch, 1, heads, head_dim)


def attend_one(q, cache: LayerCache, mask) -> jax.Array:
  """`attend` for one query per row (a decode step), reading only the filled cache slots.

  Args:
    q: `[B, 1, H, Dh]`.
    cache: the layer's `LayerCache`, this step's token already written at `cache.index`,
      so `filled = cache.index + 1` slots hold tokens.
    mask: `[B, 1, S]`, True where the query may attend a slot; False from slot `filled` on.

  The step attends over the smallest of `decode_windows(S, ...)` that holds `filled` slots,
  so its work grows with the length generated so far rather than with the cache size (where
  the backend's `WINDOWED_DECODE_MIN_BYTES` allows: a GPU reads the cache whole, cheaper
  there than the conditional that picks the window). The
  slots left out are masked, so the result is the same as over the whole cache. Scores and
  the weighted sum are multiply-and-add over whole vectors of slots (keys `[Dh, S]`) and of
  head dimensions (values `[S, Dh]`): a batched `dot_general` of one query row costs more
  on a CPU and no less elsewhere, where a decode step is bound by reading the cache.
  Softmax in float32. A cache with `start` set (the sampler's layout for the "pallas"
  `DECODE_KERNEL`) goes to `attend_range`.
  """
  if cache.start is not None:
    return attend_range(q, cache)
  batch, _, heads, head_dim = q.shape
  kv_heads = cache.values.shape[-3]
  q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim, 1).astype(jnp.float32)
  scale = head_dim**-0.5

  def over(window):
    k, v = (x[:, :, None].astype(jnp.float32) for x in cache.read(window))
    seen = mask[:, None, None, 0, :window]  # [B, 1, 1, W]
    scores = jnp.sum(q * k, axis=-2)  # q [B, K, G, Dh, 1], k [B, K, 1, Dh, W] -> [B, K, G, W]
    scores = jnp.where(seen, scores * scale, -jnp.inf)
    scores = jnp.where(jnp.any(seen, axis=-1, keepdims=True), scores, 0.0)  # padding rows
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.sum(weights[..., None] * v, axis=3)  # v [B, K, 1, W, Dh] -> [B, K, G, Dh]

  slots = mask.shape[-1]
  windows = decode_windows(
      slots, 2 * batch * kv_heads * slots * head_dim * cache.keys.dtype.itemsize
  )
  if len(windows) == 1:
    out = over(windows[0])
  else:
    which = jnp.searchsorted(jnp.asarray(windows), cache.index + 1)  # the filled slots
    out = jax.lax.switch(
        jnp.minimum(which, len(windows) - 1), [functools.partial(over, w) for w in windows]
    )
  return out.reshape(batch, 1, heads, head_dim)


def pad_end(x: jax.Array, axis: int, n: int) -> jax.Array:
  """`x` with `n` zeros (False) appended along `axis`."""
  return jnp.pad(x, [(0, n if a == axis else 0) for a in range(x.ndim)])


def even_lengths(q, k, v, mask):
  """Pads odd query and key lengths by one slot (cuDNN's masked training kernels need even
  lengths). The extra key is masked for every real query, and the extra query sees only the
  extra key, so no row is fully masked and the real rows' outputs and gradients are unchanged.
  """
  pad_q, pad_k = q.shape[1] % 2, k.shape[1] % 2
  if not (pad_q or pad_k):
    return q, k, v, mask
  q, k, v = pad_end(q, 1, pad_q), pad_end(k, 1, pad_k), pad_end(v, 1, pad_k)
  mask = pad_end(pad_end(mask, 1, pad_q), 2, pad_k)
  if pad_q and pad_k:
    mask = mask.at[:, -1, -1].set(True)
  elif pad_q:  # the extra query row attends the first key (its output is dropped)
    mask = mask.at[:, -1, 0].set(True)
  return q, k, v, mask
