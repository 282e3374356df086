"""Causal attention through Pallas's TPU splash-attention kernel (`attention="splash"`).

The kernel computes blockwise causal attention without forming the `[T, T]` scores
(flash attention), skipping the blocks above the diagonal, with its own backward pass. It
serves the full-sequence forward passes, the ones training and scoring run; a prefill and
the decode steps keep `attention.attend` and `attention.attend_one`.

Padding is expressed as segment ids: real tokens are segment 1 and padding segment 0, so a
real query attends exactly the real keys at or before it, as `attention.attend` does with
the mask `causal & valid`. (A padding query attends padding keys; its output is never
read.) Lengths are padded to a multiple of the kernel's 128-token blocks.

On a mesh the kernel runs under `shard_map`: rows split over the data axes, heads over
`tensor` when it divides both the query and the key/value heads. Off a TPU the kernel runs
in Pallas's interpret mode, which is exact and slow: it is how the suite tests this path
on a CPU.

References:
  Dao et al., FlashAttention, https://arxiv.org/abs/2205.14135
  The kernel: `jax.experimental.pallas.ops.tpu.splash_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from opdjax import sharding

BLOCK = 128  # the kernel's default query and key block (BlockSizes.get_default)


@functools.lru_cache(maxsize=None)
def _kernel(length: int, heads: int, interpret: bool):
  """The causal splash kernel for `heads` query heads over `length` tokens (one row)."""
  causal = masks.MultiHeadMask([masks.CausalMask((length, length))] * heads)
  with jax.ensure_compile_time_eval():  # its block tables are constants, not a trace's values
    return kernels.make_splash_mha(causal, head_shards=1, q_seq_shards=1, interpret=interpret)


def _rows(q, k, v, valid):
  """Splash attention on the rows of one shard: q `[b, T, h, Dh]`, k/v `[b, T, k, Dh]`."""
  length = q.shape[1]
  padded = -(-length // BLOCK) * BLOCK
  pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
  heads_first = lambda x: pad(x).transpose(0, 2, 1, 3)  # [b, heads, T', Dh]
  segments = pad(valid.astype(jnp.int32))  # 1 real, 0 padding (the added slots too)
  kernel = _kernel(padded, q.shape[2], jax.default_backend() != "tpu")
  out = jax.vmap(kernel)(
      heads_first(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)),  # the kernel does not scale
      heads_first(k),
      heads_first(v),
      segment_ids=kernels.SegmentIds(q=segments, kv=segments),
  )
  return out.transpose(0, 2, 1, 3)[:, :length]


def splash_attention(q, k, v, valid, *, mesh: Mesh | None = None) -> jax.Array:
  """Causal softmax attention `[B, T, H, Dh]` of queries over keys and values `[B, T, K,
  Dh]` (GQA: H a multiple of K); `valid [B, T]` is True on real tokens.

  Equals `attention.attend(q, k, v, causal & valid[:, None, :])` on every real query row.
  With a `mesh` of several devices it runs per shard under `shard_map`.

  >>> import numpy as np
  >>> from opdjax.models.attention import attend
  >>> q, k, v = (jax.random.normal(jax.random.key(i), (1, 5, 2, 8)) for i in range(3))
  >>> valid = jnp.array([[False, True, True, True, True]])  # one left-padding slot
  >>> causal = jnp.tril(jnp.ones((5, 5), bool))[None] & valid[:, None, :]
  >>> bool(np.allclose(splash_attention(q, k, v, valid)[:, 1:], attend(q, k, v, causal)[:, 1:],
  ...                  atol=1e-5))
  True
  """
  if mesh is None or mesh.size == 1:
    return _rows(q, k, v, valid)
  rows = tuple(a for a in sharding.DATA_AXES if a in mesh.axis_names) or None
  tensor = mesh.shape.get("tensor", 1)
  heads = "tensor" if tensor > 1 and not (q.shape[2] % tensor or k.shape[2] % tensor) else None
  spec = P(rows, None, heads, None)
  return jax.shard_map(
      _rows, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec, check_vma=False
  )(q, k, v, valid)
