"""Where a decode step's time goes: a `jax.profiler` trace of one `generate`, summarised.

Answers whether a decode is bound by its kernels or by what lies between them (launches,
host round trips for loop conditions and conditionals): one JSON line with the wall time
per decode step, the device kernels per step, their summed time, and the fraction of the
wall time in which some kernel ran; then the kernels that took the most time.

    python benchmarks/decode_profile.py --models qwen3-0.6b --dtype bfloat16 --batch 1  # GPU
    python benchmarks/decode_profile.py --models small --batch 8 --new_tokens 256       # CPU

On a GPU the kernels are the device's (CUPTI); on a CPU, XLA's thunks on its threads.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from _jsonl import emit  # benchmarks/ is the script's directory
from flax import nnx
from sampler import CONFIGS, add_decode_flags, apply_decode_flags, opdjax_run

from opdjax.models import Decoder

# Markers and a CPU executor's waits, which overlap the work they wait for.
NOT_WORK = ("end: ", "ThunkExecutor::", "SlinkyThreadPool::", "ThreadpoolListener::")


def kernel_events(trace: dict) -> tuple[list[dict], dict]:
  """The kernels of a trace, and the events per line of its device for the record.

  On a GPU they are the events of the device's stream lines (`/device:...` processes,
  `Stream #...` threads; its other lines repeat them by XLA op and module), taken whole: a
  stream's kernels do not nest, and back-to-back kernels can overlap by a tick. Where there
  is no device (a CPU), they are the innermost events of XLA's threads (`tf_XLA...`: its
  thread pool, or the client's own thread where a small program runs in line).
  """
  names = {}
  threads = {}
  for e in trace["traceEvents"]:
    if e.get("ph") == "M" and e["name"] == "process_name":
      names[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e["name"] == "thread_name":
      threads[e["pid"], e["tid"]] = e["args"]["name"]
  events = [
      e
      for e in trace["traceEvents"]
      if e.get("ph") == "X" and e["dur"] > 0 and not e["name"].startswith(NOT_WORK)
  ]
  device = [e for e in events if names.get(e["pid"], "").startswith("/device:")]
  lines = collections.defaultdict(lambda: [0, 0.0])
  for e in device:
    line = lines[threads.get((e["pid"], e["tid"]), str(e["tid"]))]
    line[0] += 1
    line[1] += e["dur"]
  if device:
    streams = [e for e in device if threads.get((e["pid"], e["tid"]), "").startswith("Stream")]
    return streams or device, dict(lines)
  cpu = [e for e in events if threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")]
  return leaves(cpu), {}


def leaves(events: list[dict]) -> list[dict]:
  """The events that contain no other event of their thread (a CPU trace nests XLA's
  thunks inside its loops and executors; a GPU stream's kernels do not nest)."""
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[e["pid"], e["tid"]].append(e)
  out = []
  for group in by_thread.values():
    group.sort(key=lambda e: (e["ts"], -e["dur"]))
    for e, after in zip(group, group[1:] + [None]):
      if after is None or after["ts"] >= e["ts"] + e["dur"]:
        out.append(e)
  return out


def busy_us(events: list[dict]) -> float:
  """Microseconds in which at least one event ran (the union of their intervals)."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="small", choices=list(CONFIGS))
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--scan_layers", action="store_true")
  add_decode_flags(parser)
  parser.add_argument("--top", type=int, default=12, help="kernels listed, by total time")
  parser.add_argument("--names", action="store_true", help="also print every kernel name")
  parser.add_argument("--out", default=None, help="also append the JSON line to this file")
  args = parser.parse_args(argv)
  windows = apply_decode_flags(args)
  config = CONFIGS[args.models]
  dtype = jnp.dtype(args.dtype)
  model = Decoder(
      config, dtype=dtype, param_dtype=dtype, scan_layers=args.scan_layers, rngs=nnx.Rngs(0)
  )
  shape = (args.batch, args.prompt_len)
  prompts = jax.random.randint(jax.random.key(0), shape, 1, config.vocab_size)
  mask = jnp.ones(prompts.shape, bool)
  _, _, run = opdjax_run(model, prompts, mask, args.new_tokens)  # compiled, run once
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory)
    start = time.perf_counter()
    run()
    wall_us = (time.perf_counter() - start) * 1e6
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(directory, "plugins/profile/*/*.trace.json.gz"))
    with gzip.open(path) as f:
      events, lines = kernel_events(json.load(f))
  steps = args.new_tokens
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    total[e["name"]] += e["dur"]
    count[e["name"]] += 1
  line = dict(
      benchmark="decode_profile",
      model=args.models,
      device=jax.devices()[0].device_kind,
      dtype=args.dtype,
      batch=args.batch,
      new_tokens=steps,
      scan_layers=args.scan_layers,
      **windows,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      wall_ms_per_step=round(wall_us / steps / 1e3, 4),
      kernels_per_step=round(len(events) / steps, 1),
      kernel_ms_per_step=round(sum(total.values()) / steps / 1e3, 4),
      busy_fraction=round(busy_us(events) / wall_us, 4),
      device_lines={
          name: dict(per_step=round(n / steps, 2), ms_per_step=round(t / steps / 1e3, 4))
          for name, (n, t) in lines.items()
      },
      top=[
          dict(name=name[:80], ms_per_step=round(t / steps / 1e3, 4), per_step=count[name] / steps)
          for name, t in total.most_common(args.top)
      ],
  )
  emit(line, args.out)
  if args.names:
    for name, t in total.most_common():
      print(f"{t / steps / 1e3:9.4f} ms/step {count[name] / steps:6.2f}/step  {name}")


if __name__ == "__main__":
  main()
