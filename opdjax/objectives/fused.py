"""Hidden states → per-token values in token chunks, never holding `[B, T, V]` logits.

Every training loss and logged metric in opdjax is a function of the logits at one
position and the token that follows (a divergence to the teacher, `log p(a_t)`, an
entropy, a top-K overlap). Anything that mixes positions (reward-to-go, group advantages,
reductions) acts on the resulting `[B, T]` values, which are small. So one routine serves
every objective: `token_values(fn, student, tokens, teacher=...)` cuts the sequence axis
into chunks of a few positions of every row (padding the last) and `lax.scan`s over them, so
where the rows are split over devices each device works on its own rows; each chunk
computes `hidden @ kernel` for the student (and the teacher), applies `fn`, and keeps only
`fn`'s per-token outputs. Its `custom_vjp` keeps only the inputs, and its backward pass
recomputes one chunk's logits at a time: peak memory is O(chunk · V) whatever B·T is, and
the head kernel's gradient is summed across chunks as they go (`head_backward`).

`fn` is exactly the function one would apply to full logits (it only reduces the last
axis), so `fn(full_student_logits, full_teacher_logits, tokens)` is the unfused reference
that the tests compare against.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from opdjax import objectives as obj
  >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
  >>> w = jax.random.normal(jax.random.key(1), (8, 11))
  >>> tokens = jnp.zeros((2, 5), jnp.int32)
  >>> fn = lambda s, t, a: {"log_p": obj.token_log_probs(s, a)}
  >>> fused = obj.token_values(fn, obj.Head(h, w), tokens, chunk_size=4)
  >>> full = fn(h @ w, None, tokens)
  >>> bool(jnp.allclose(fused["log_p"], full["log_p"], atol=1e-5))
  True
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

# A per-token function of `(student_logits [C, V], teacher_logits [C, V] | None,
# tokens [C])` returning a dict of `[C]` arrays. It must not mix positions.
TokenFn = Callable[[jax.Array, "jax.Array | None", jax.Array], dict]

# Tokens per chunk when `chunk_size` is 0 ("auto"), by backend: `AUTO_CHUNK_TOKENS` where
# it names the backend, else as many as keep one chunk's `[C, V]` logits near
# `AUTO_CHUNK_ELEMENTS`. GPU: 1,024 tokens, Liger-Kernel's chunk. On an H200, against
# Liger in the same session (benchmarks/results/fused_loss_h200.jsonl), the one-pass JSD
# loss takes 0.52x / 0.75x Liger's time at 0.73x / 0.78x its peak memory at the float32
# (B·T, H, V) = (4096, 256, 32768) / (8192, 512, 65536), where 2,048 tokens took 0.47x /
# 0.70x at 1.4x / 1.5x the memory and 512 tokens 0.56x / 0.82x; at a bfloat16 Qwen3-1.7B
# head (8192, 2048, 151936), 81 ms against Liger's 63 ms (small chunks starve the matmuls:
# 110 tokens took 3.7x Liger's time on an H100). CPU: 2**22 logits, whose RAM is shared
# with everything else and whose matmuls need no tall tiles (an OPD step at V = 151,936 and
# B·T = 4,208 compiles to 0.19 GB of temporaries instead of 0.53 GB). TPU (unmeasured):
# 2**24 logits.
AUTO_CHUNK_TOKENS = {"gpu": 1024}
AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 22}
AUTO_CHUNK_ELEMENTS_DEFAULT = 1 << 24
# Vocabulary entries per block of the LM head's backward (`head_backward`), by backend;
# 0 (the default) is one product over the whole vocabulary.
HEAD_BLOCK = {"cpu": 4096}


class Head(NamedTuple):
  """A model's final hidden states and its LM head: `logits = hidden @ kernel`.

  Attributes:
    hidden: `[B, T, D]` final (normed) hidden states, any float dtype.
    kernel: `[D, V]` head weights (for tied embeddings, the embedding matrix transposed).
  """

  hidden: jax.Array
  kernel: jax.Array


def route_hidden(hiddens: Sequence[jax.Array], route: jax.Array) -> jax.Array:
  """K frozen models' hidden states as one, for the kernel `concatenate(kernels, axis=0)`.

  Row b keeps model `route[b]`'s states in that model's block of the feature axis and
  zeros elsewhere, `h_b = [h⁰_b·1{r_b=0}, …, h^{K−1}_b·1{r_b=K−1}]`, so with
  `W = [W⁰; …; W^{K−1}]` (`[ΣD_k, V]`) the logits are `h_b W = h^{r_b}_b W^{r_b}`: each row is
  scored by its own model in one matmul (the other blocks add exact zeros), and every loss
  that takes a `Head` takes routed teachers unchanged. The models may differ in width.

  Args:
    hiddens: K arrays `[B, T, D_k]`.
    route: `[B]` int, the model of each row.

  Returns:
    `[B, T, ΣD_k]`, in the promoted dtype of `hiddens`.

  >>> h = route_hidden([jnp.ones((2, 1, 1)), 2 * jnp.ones((2, 1, 2))], jnp.array([1, 0]))
  >>> h[:, 0].tolist()
  [[0.0, 2.0, 2.0], [1.0, 0.0, 0.0]]
  """
  dtype = jnp.result_type(*hiddens)
  return jnp.concatenate(
      [jnp.where((route == k)[:, None, None], h, 0).astype(dtype) for k, h in enumerate(hiddens)],
      axis=-1,
  )


def logits_of(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
  """`hidden [..., D] @ kernel [D, V]` accumulated in float32."""
  return jnp.einsum("...d,dv->...v", hidden, kernel, preferred_element_type=jnp.float32)


def head_backward(
    hidden_c: jax.Array,
    kernel: jax.Array,
    grad_logits: jax.Array,
    grad_kernel: jax.Array,
    *,
    block: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The LM head's backward for one chunk of `logits = hidden_c @ kernel`.

  Returns `(grad_logits @ kernelᵀ, grad_kernel + hidden_cᵀ @ grad_logits)`: the chunk's
  hidden-state gradient (`[C, D]`, in `hidden_c`'s dtype) and the head gradient summed so
  far (`[D, V]`, float32). A `grad_kernel` of `[S, D, V]` keeps S partial sums, one per
  block of `C / S` consecutive positions (`_Chunks.row_blocks`: the rows each device holds),
  so where the rows are split over devices each device adds only its own rows' products and
  the sum over devices happens once, after the last chunk, rather than once per chunk.

  `block` defaults to `HEAD_BLOCK` for the backend. With `block = 0` both are one product
  each. On a GPU or TPU XLA folds the sum into the matrix product (a GEMM that accumulates
  into its output); XLA's CPU backend writes the `[D, V]` product and then adds it, two
  more passes over `D·V` floats per chunk. With
  `block > 0` both products run over blocks of `block` vocabulary entries (the last one
  shorter), each block's share of the sum added while it is in cache: at (8192, 512,
  65,536) in 64-token chunks on 2 CPU cores, 7.40 → 6.83 s for this part, 5–12% of the whole
  loss, and 168 → 67 MB of compiled temporaries (`HEAD_BLOCK["cpu"]`;
  `benchmarks/fused_loss_parts.py`). On an accelerator the loop would only add launches.

  >>> h, w = jnp.ones((2, 3)), jnp.ones((3, 5))
  >>> g = jnp.arange(10.0).reshape(2, 5)
  >>> gh, gw = head_backward(h, w, g, jnp.zeros((3, 5)), block=2)
  >>> gh.tolist(), gw[0].tolist()
  ([[10.0, 10.0, 10.0], [35.0, 35.0, 35.0]], [5.0, 7.0, 9.0, 11.0, 13.0])
  """
  if block is None:
    block = HEAD_BLOCK.get(jax.default_backend(), 0)
  partial = grad_kernel.ndim == 3
  if not partial and (not block or block >= kernel.shape[1]):
    _, vjp = jax.vjp(logits_of, hidden_c, kernel)
    grad_hidden_c, grad_kernel_c = vjp(grad_logits)
    return grad_hidden_c, grad_kernel + grad_kernel_c

  def kernel_product(g):  # hidden_cᵀ @ g, by row block where the sums are partial
    if not partial:
      return jnp.einsum("cd,cv->dv", hidden_c, g, preferred_element_type=jnp.float32)
    by_block = lambda x: x.reshape((grad_kernel.shape[0], -1) + x.shape[1:])
    return jnp.einsum(
        "scd,scv->sdv", by_block(hidden_c), by_block(g), preferred_element_type=jnp.float32
    )

  if not block or block >= kernel.shape[1]:
    grad_hidden_c = jnp.einsum("cv,dv->cd", grad_logits, kernel, preferred_element_type=jnp.float32)
    return grad_hidden_c.astype(hidden_c.dtype), grad_kernel + kernel_product(grad_logits)

  def add_block(start, size, carry):
    grad_hidden_c, grad_kernel = carry
    g = jax.lax.dynamic_slice_in_dim(grad_logits, start, size, axis=1)
    w = jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1)
    vocab_axis = grad_kernel.ndim - 1
    acc = jax.lax.dynamic_slice_in_dim(grad_kernel, start, size, axis=vocab_axis)
    acc = acc + kernel_product(g)
    grad_hidden_c += jnp.einsum("cv,dv->cd", g, w, preferred_element_type=jnp.float32)
    grad_kernel = jax.lax.dynamic_update_slice_in_dim(grad_kernel, acc, start, axis=vocab_axis)
    return grad_hidden_c, grad_kernel

  vocab = kernel.shape[1]
  carry = (jnp.zeros(hidden_c.shape, jnp.float32), grad_kernel)
  carry = jax.lax.fori_loop(0, vocab // block, lambda i, c: add_block(i * block, block, c), carry)
  if vocab % block:
    carry = add_block(vocab - vocab % block, vocab % block, carry)
  grad_hidden_c, grad_kernel = carry
  return grad_hidden_c.astype(hidden_c.dtype), grad_kernel


def auto_chunk_size(vocab_size: int, num_tokens: int) -> int:
  """Tokens per chunk: `AUTO_CHUNK_TOKENS` for the backend, else so many that one chunk's
  logits hold about `AUTO_CHUNK_ELEMENTS` values."""
  backend = jax.default_backend()
  elements = AUTO_CHUNK_ELEMENTS.get(backend, AUTO_CHUNK_ELEMENTS_DEFAULT)
  size = AUTO_CHUNK_TOKENS.get(backend, max(8, (elements // max(vocab_size, 1)) // 8 * 8))
  return min(size, max(num_tokens, 1))


def _is_head(x) -> bool:
  return isinstance(x, Head)


class _Chunks(NamedTuple):
  """How `[B, T]` positions are cut into `count` chunks, each of `size` consecutive
  positions of every row (the last chunk zero-padded). A chunk keeps all rows, so where
  the batch's rows are split over devices each device computes its own rows' part of every
  chunk; chunks of the flattened `B·T` positions would each lie on one device, and XLA
  would gather the whole batch onto every device to scan them."""

  batch: int
  length: int
  size: int  # positions of each row in a chunk
  count: int
  row_blocks: int  # the devices the rows are split over, where they divide the rows, else 1

  def head_gradient(self, kernel):
    """A zero head gradient: `[D, V]`, or `[row_blocks, D, V]` partial sums, one per block
    of rows (`head_backward`); `total` sums them."""
    lead = () if self.row_blocks == 1 else (self.row_blocks,)
    return jnp.zeros(lead + kernel.shape, jnp.float32)

  def total(self, grad_kernel):
    return grad_kernel if self.row_blocks == 1 else jnp.sum(grad_kernel, axis=0)

  def split(self, x):
    """`[B, T, ...] -> [count, B·size, ...]`."""
    pad = self.count * self.size - self.length
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.swapaxes(x.reshape((self.batch, self.count, self.size) + x.shape[2:]), 0, 1)
    return x.reshape((self.count, self.batch * self.size) + x.shape[3:])

  def join(self, v):
    """`[count, B·size, ...] -> [B, T, ...]`, dropping the padding."""
    v = jnp.swapaxes(v.reshape((self.count, self.batch, self.size) + v.shape[2:]), 0, 1)
    return v.reshape((self.batch, self.count * self.size) + v.shape[3:])[:, : self.length]


def _chunked(student: Head, tokens, teacher, vocab_mask, chunk_size, row_shards):
  """Validates the inputs shared by `token_values` and `weighted_token_sum`; returns the
  chunking, the vocabulary mask as a function of logits, the (stop-gradiented) teachers'
  logits as a function of their hidden states in one chunk, and those hidden states cut
  into chunks."""
  hidden, kernel = student
  if hidden.ndim != 3 or kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0]:
    raise ValueError(
        f"student hidden must be [B, T, D] and kernel [D, V]; got {hidden.shape} "
        f"and {kernel.shape}"
    )
  batch, length, _ = hidden.shape
  vocab = kernel.shape[1]
  if tokens.shape != (batch, length):
    raise ValueError(f"tokens {tokens.shape} must be [B, T] = {(batch, length)}")
  for head in jax.tree.leaves(teacher, is_leaf=_is_head):
    if not _is_head(head):
      raise ValueError(f"teacher must be a Head or a pytree of Heads, got a leaf {type(head)}")
    if head.hidden.shape[:2] != (batch, length) or head.kernel.shape[1] != vocab:
      raise ValueError(
          f"teacher hidden {head.hidden.shape} / kernel {head.kernel.shape} "
          f"do not match the student's [B, T] = {(batch, length)} and V = {vocab}"
      )
  if vocab_mask is not None and vocab_mask.shape != (vocab,):
    raise ValueError(f"vocab_mask must have shape ({vocab},), got {vocab_mask.shape}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
    raise ValueError(f"chunk_size must be an integer >= 0 (0 = auto), got {chunk_size!r}")
  if isinstance(row_shards, bool) or not isinstance(row_shards, int) or row_shards < 1:
    raise ValueError(f"row_shards must be an integer >= 1, got {row_shards!r}")
  rows = -(-batch // row_shards)  # on each device
  per_device = chunk_size or auto_chunk_size(vocab, rows * length)
  size = min(length, -(-per_device // rows))  # positions of each row in a chunk
  blocks = row_shards if batch % row_shards == 0 else 1
  chunks = _Chunks(batch, length, size, -(-length // size), blocks)

  teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
  teacher_kernels = jax.tree.map(lambda h: h.kernel, teacher, is_leaf=_is_head)
  teacher_hidden = jax.tree.map(lambda h: chunks.split(h.hidden), teacher, is_leaf=_is_head)

  def masked(logits):
    return logits if vocab_mask is None else jnp.where(vocab_mask, logits, -jnp.inf)

  def teacher_logits(teacher_hidden_c):
    return jax.tree.map(lambda h, w: masked(logits_of(h, w)), teacher_hidden_c, teacher_kernels)

  return chunks, masked, teacher_logits, teacher_hidden


def token_values(
    fn: TokenFn,
    student: Head,
    tokens: jax.Array,
    *,
    teacher=None,
    vocab_mask: jax.Array | None = None,
    chunk_size: int = 0,
    row_shards: int = 1,
) -> dict:
  """Applies the per-token function `fn` to chunks of positions.

  Under `jax.grad` only the inputs are kept: the backward pass computes each chunk's
  logits again, differentiates `fn` at them and runs the head's backward as
  `weighted_token_sum` does (`head_backward`, in vocabulary blocks where `HEAD_BLOCK` names
  the backend). For losses that mix positions (reward-to-go) or weigh tokens by values
  known only after the pass; fixed-weight sums are faster through `weighted_token_sum`.

  Args:
    fn: `(student_logits [C, V], teacher_logits [C, V] | None, tokens [C]) -> {name: [C]}`.
      The student's logits are differentiated; the teacher's are stop-gradiented here.
    student: the student's `Head` (`hidden [B, T, D]`, `kernel [D, V]`).
    tokens: `[B, T]` integer targets (the token that follows each position).
    teacher: the teacher's `Head` (`hidden [B, T, D']`, `kernel [D', V]`), None, or any
      pytree of `Head`s (say `{"teacher": ..., "reference": ...}`), in which case `fn`
      receives the same pytree of `[C, V]` logits. All are stop-gradiented.
    vocab_mask: optional `[V]` bool; False entries get `-inf` logits for both models
      (for example the padded rows of a checkpoint's embedding).
    chunk_size: positions per chunk on each device (rounded up to whole positions of
      each row); 0 picks `auto_chunk_size(V, positions on a device)`.
    row_shards: over how many devices the batch's rows are split (`sharding.row_splits`);
      it only sizes the chunks, whose positions of every row stay where their row is.

  Returns:
    `{name: [B, T]}`: `fn`'s outputs at every position, equal to `fn` on full logits.
  """
  chunks, masked, teacher_logits, teacher_hidden = _chunked(
      student, tokens, teacher, vocab_mask, chunk_size, row_shards
  )
  hidden, kernel = student
  xs = (teacher_hidden, chunks.split(tokens))

  def chunk_values(student_logits, teacher_hidden_c, tokens_c):
    return fn(masked(student_logits), teacher_logits(teacher_hidden_c), tokens_c)

  def values(hidden, kernel):
    def body(carry, x):
      hidden_c, *rest = x
      return carry, chunk_values(logits_of(hidden_c, kernel), *rest)

    _, out = jax.lax.scan(body, None, (chunks.split(hidden),) + xs)
    return jax.tree.map(chunks.join, out)

  def backward(residuals, grad_values):  # each chunk's logits again, then its backward
    hidden, kernel = residuals

    def body(grad_kernel, x):
      hidden_c, grad_c, *rest = x
      values_c = lambda logits: chunk_values(logits, *rest)
      _, vjp = jax.vjp(values_c, logits_of(hidden_c, kernel))
      (grad_logits,) = vjp(grad_c)
      grad_hidden_c, grad_kernel = head_backward(hidden_c, kernel, grad_logits, grad_kernel)
      return grad_kernel, grad_hidden_c

    grad_kernel, grad_hidden = jax.lax.scan(
        body,
        chunks.head_gradient(kernel),
        (chunks.split(hidden), jax.tree.map(chunks.split, grad_values)) + xs,
    )
    grad_kernel = chunks.total(grad_kernel).astype(kernel.dtype)
    return chunks.join(grad_hidden).astype(hidden.dtype), grad_kernel

  rematerialised = jax.custom_vjp(values)
  rematerialised.defvjp(lambda hidden, kernel: (values(hidden, kernel), (hidden, kernel)), backward)
  return rematerialised(hidden, kernel)


def weighted_token_sum(
    fn: TokenFn,
    student: Head,
    tokens: jax.Array,
    weights: jax.Array,
    *,
    key: str = "loss",
    teacher=None,
    vocab_mask: jax.Array | None = None,
    chunk_size: int = 0,
    row_shards: int = 1,
):
  """`Σ_t weights_t · fn(...)[key]_t` in one pass, with its gradient formed on the way.

  For losses that are a fixed-weight sum of one per-token value (every divergence loss and
  the NLL, with `weights = mask / Σ mask`), the gradient w.r.t. each chunk's logits is
  known during the forward pass, so each chunk's logits are computed once: the student's
  and the teacher's head matmuls plus the two of the student's backward, where
  `token_values` under `jax.grad` recomputes the forward in the backward pass (the
  approach of Liger-Kernel's fused linear losses). The head's part of the backward is
  `head_backward`, in vocabulary blocks where `HEAD_BLOCK` names the backend. The other
  outputs of `fn` are returned as `[B, T]` values without gradient (metrics).

  Args:
    fn, student, tokens, teacher, vocab_mask, chunk_size, row_shards: as in `token_values`.
    weights: `[B, T]` float weights (not differentiated).
    key: the output of `fn` that is summed.

  Returns:
    `(loss, values)`: the scalar weighted sum (differentiable w.r.t. `student`) and the
    dict of all `[B, T]` outputs of `fn` (constants).
  """
  chunks, masked, teacher_logits, teacher_hidden = _chunked(
      student, tokens, teacher, vocab_mask, chunk_size, row_shards
  )
  hidden, kernel = student
  if weights.shape != hidden.shape[:2]:
    raise ValueError(f"weights {weights.shape} must be [B, T] = {hidden.shape[:2]}")
  xs = (
      teacher_hidden,
      chunks.split(tokens),
      chunks.split(jax.lax.stop_gradient(weights).astype(jnp.float32)),
  )

  def chunk_loss(student_logits, teacher_hidden_c, tokens_c, weights_c):
    out = fn(masked(student_logits), teacher_logits(teacher_hidden_c), tokens_c)
    return jnp.sum(weights_c * out[key]), out

  def primal(hidden, kernel):  # no gradient wanted: the sum and values only
    def body(carry, x):
      hidden_c, *rest = x
      return carry, chunk_loss(logits_of(hidden_c, kernel), *rest)

    _, (totals, out) = jax.lax.scan(body, None, (chunks.split(hidden),) + xs)
    return jnp.sum(totals), jax.tree.map(chunks.join, out)

  def forward(hidden, kernel):  # the sum, the values, and the gradient for `backward`
    def body(grad_kernel, x):
      hidden_c, *rest = x
      loss_c = lambda logits: chunk_loss(logits, *rest)
      total, vjp, out = jax.vjp(loss_c, logits_of(hidden_c, kernel), has_aux=True)
      (grad_logits,) = vjp(jnp.ones_like(total))
      grad_hidden_c, grad_kernel = head_backward(hidden_c, kernel, grad_logits, grad_kernel)
      return grad_kernel, (total, out, grad_hidden_c)

    grad_kernel, (totals, out, grad_hidden) = jax.lax.scan(
        body, chunks.head_gradient(kernel), (chunks.split(hidden),) + xs
    )
    grad_kernel = chunks.total(grad_kernel)
    grad_hidden = chunks.join(grad_hidden.astype(hidden.dtype))
    return (jnp.sum(totals), jax.tree.map(chunks.join, out)), (grad_hidden, grad_kernel)

  def backward(residuals, cotangents):
    grad_hidden, grad_kernel = residuals
    g = cotangents[0]  # the values are metrics: their cotangents are ignored
    return (g * grad_hidden).astype(hidden.dtype), (g * grad_kernel).astype(kernel.dtype)

  loss_and_values = jax.custom_vjp(primal)
  loss_and_values.defvjp(forward, backward)
  loss, values = loss_and_values(hidden, kernel)
  return loss, jax.tree.map(jax.lax.stop_gradient, values)
