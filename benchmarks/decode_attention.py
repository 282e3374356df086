"""One decode step's attention: `models.attention.attend_one` against torch's SDPA, JSON lines.

A decode step attends one query per row over the filled part of the KV cache. At large
batches on a CPU this dominates the step of a small model, so this times it alone: for
each filled length, opdjax's `attend_one` (the smallest of `attention.decode_windows`
holding the filled slots, float32 softmax; each line names the window) and
`torch.nn.functional.scaled_dot_product_attention` (on the CPU) over the same filled
slots, GQA heads expanded as transformers' eager path does. opdjax's steps run `STEPS` at
a time in one compiled loop, as the sampler runs them.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_cpu_2core.jsonl
    python benchmarks/decode_attention.py --batch 64 --kv_heads 4 --groups 2 --head_dim 32
    python benchmarks/decode_attention.py --windows_up_to 1.0   # windows up to the whole cache

`--windows_up_to` sets `attention.DECODE_WINDOWS_UP_TO`, the largest window short of the
whole cache as a fraction of it. Each line records the cache's key layout (`cache_keys`).

The default shape is the `tiny` sampler model's at batch 256 (2 KV heads, 2 query heads
per KV head, head dim 16) with a 640-slot cache. Milliseconds are the best of `--repeats`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _jsonl import emit  # benchmarks/, next to this script
from _timing import best_seconds

from opdjax.models import attention
from opdjax.models.attention import LayerCache, attend_one

# Decode steps per timed program: the sampler runs its steps inside one compiled loop, so
# buffers are allocated once per call rather than once per step (a program per step would
# time fresh pages for its temporaries, which the sampler does not pay).
STEPS = 32


def time_both(filled, repeats, *, batch, kv_heads, groups, head_dim, slots) -> dict:
  """Milliseconds of opdjax's and torch's attention for one query per row over `filled`
  of `slots` cache slots."""
  import torch

  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, 1, kv_heads * groups, head_dim))
  cache_k = jax.random.normal(keys[1], (batch, kv_heads, head_dim, slots))  # the cache's layout
  cache_v = jax.random.normal(keys[2], (batch, kv_heads, slots, head_dim))
  mask = jnp.broadcast_to(jnp.arange(slots) < filled, (batch, 1, slots))
  length = jnp.int32(filled)

  @jax.jit
  def steps(q, cache_k, cache_v, mask, length):  # STEPS decode steps in one program
    def step(i, out):
      cache = LayerCache(cache_k, cache_v, index=length - 1)
      return out + attend_one(q * (1 + i * 2.0**-20), cache, mask)

    return jax.lax.fori_loop(0, STEPS, step, jnp.zeros_like(q))

  tq = torch.from_numpy(np.array(q)).transpose(1, 2)  # [B, H, 1, Dh]
  expand = lambda x: torch.from_numpy(np.array(x[:, :, :filled])).repeat_interleave(groups, 1)
  tk, tv = expand(cache_k.swapaxes(-1, -2)), expand(cache_v)  # [B, H, filled, Dh]
  opdjax = lambda: jax.block_until_ready(steps(q, cache_k, cache_v, mask, length))
  sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
  opdjax()  # compiles
  return {
      "opdjax": best_seconds(opdjax, repeats) * 1e3 / STEPS,
      "torch_sdpa": best_seconds(sdpa, repeats) * 1e3,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--groups", type=int, default=2, help="query heads per KV head")
  parser.add_argument("--head_dim", type=int, default=16)
  parser.add_argument("--slots", type=int, default=640, help="cache slots (S)")
  parser.add_argument("--filled", type=int, nargs="+", default=[100, 300, 600])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--windows_up_to", type=float, default=attention.DECODE_WINDOWS_UP_TO)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  attention.DECODE_WINDOWS_UP_TO = args.windows_up_to
  shape = dict(
      batch=args.batch,
      kv_heads=args.kv_heads,
      groups=args.groups,
      head_dim=args.head_dim,
      slots=args.slots,
  )
  # The windows `attend_one` picks from: it passes its float32 keys' and values' bytes.
  layer_bytes = 2 * 4 * args.batch * args.kv_heads * args.slots * args.head_dim
  windows = attention.decode_windows(args.slots, layer_bytes)
  for filled in args.filled:
    window = next(w for w in windows if w >= filled)
    for impl, ms in time_both(filled, args.repeats, **shape).items():
      emit(
          dict(
              benchmark="decode_attention",
              impl=impl,
              **shape,
              filled=filled,
              **(
                  dict(cache_keys="[B, K, Dh, S]", window=window, windows_up_to=args.windows_up_to)
                  if impl == "opdjax"
                  else {}
              ),
              ms=round(ms, 3),
              device=str(jax.devices()[0].device_kind) if impl == "opdjax" else "cpu",
          ),
          args.out,
      )


if __name__ == "__main__":
  main()
