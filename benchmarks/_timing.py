"""The benchmarks' timers for calls that return when their work is done."""

from __future__ import annotations

import statistics
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


def alternating_medians(fns: dict, repeats: int) -> dict[str, float]:
  """The median seconds of `repeats` timed calls of each of `fns` ({name: fn}, each already
  warmed up), called in turn (a, b, a, b, ...) so that a machine whose speed drifts during
  the run (a shared VM's CPU) slows each side alike and their ratio stays fair; timing one
  side's repeats and then the other's puts the drift between them. Each `fn` must block
  until its work is done."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
