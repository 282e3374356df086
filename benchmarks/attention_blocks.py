"""XLA's attention in blocks of queries against all queries at once: temporaries and seconds.

Compiles the value and gradient (in q, k and v) of causal attention over a padded batch
(B = 2, 16 query heads over 8 key-value heads, head dim 128, Qwen3's) for each sequence
length, with all queries in one block, in blocks of `--block` queries
(`opdjax.models.attention.attend_query_blocks`, what `attend` runs for XLA) and in those
blocks split into causal groups (`attend_causal_groups`, what a model's full-sequence
forward runs), in float32 and bfloat16, and prints one JSON line each: the compiled
program's temporaries (`memory_analysis()`), the median seconds of `--repeats` calls, and
the largest difference from the one-block gradients relative to their largest entry.

    python benchmarks/attention_blocks.py --out benchmarks/results/attention_blocks_cpu_2core.jsonl

About seven and a half minutes on 2 CPU cores (the one-block gradient at 4,096 tokens
holds 10.8 GB of temporaries).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)

from opdjax.models import attention


def measure(length: int, block: int, dtype, repeats: int, reference=None, causal=False):
  batch, heads, kv_heads, dim = 2, 16, 8, 128
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (batch, length, heads, dim)).astype(dtype)
  k, v = (jax.random.normal(key, (batch, length, kv_heads, dim)).astype(dtype) for key in ks[1:3])
  valid = jnp.ones((batch, length), bool).at[0, : length // 8].set(False)  # a left-padded row
  mask = jnp.tril(jnp.ones((length, length), bool))[None] & valid[:, None, :]
  cot = jax.random.normal(ks[3], q.shape) * valid[:, :, None, None]  # padding is never read

  def loss(q, k, v):
    out = attention.attend(q, k, v, mask, implementation="xla", query_block=block, causal=causal)
    return jnp.sum(out.astype(jnp.float32) * cot)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  grads = jax.block_until_ready(compiled(q, k, v))[1]
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    seconds.append(time.perf_counter() - start)
  record = dict(
      benchmark="attention_blocks",
      device=jax.devices()[0].device_kind,
      batch=batch,
      heads=f"{heads}/{kv_heads}",
      head_dim=dim,
      tokens=length,
      dtype=jnp.dtype(dtype).name,
      query_block=block,
      causal_groups=attention.CAUSAL_QUERY_GROUPS if causal else 1,
      temporaries_gb=round(compiled.memory_analysis().temp_size_in_bytes / 1e9, 3),
      median_s=round(statistics.median(seconds), 3),
  )
  if reference is not None:
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    as_f32 = lambda tree: [np.asarray(x, np.float32) for x in tree]
    record["grad_max_rel_diff"] = max(map(rel, as_f32(grads), as_f32(reference)))
  return record, grads


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
  parser.add_argument("--block", type=int, default=attention.QUERY_BLOCK)
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  for dtype in args.dtypes:
    for length in args.tokens:
      whole, grads = measure(length, length, jnp.dtype(dtype), args.repeats)
      emit(whole, args.out)
      for causal in (False, True):
        record = measure(length, args.block, jnp.dtype(dtype), args.repeats, grads, causal)[0]
        emit(record, args.out)


if __name__ == "__main__":
  sys.exit(main())
