"""The benchmarks' one best-of timer for calls that return when their work is done."""

from __future__ import annotations

import time


def best_seconds(fn, repeats: int) -> float:
  """The fastest of `repeats` timed calls of `fn`, after one untimed call (compilation,
  warm-up). `fn` must block until its work is done (`jax.block_until_ready`, a CUDA sync)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)
