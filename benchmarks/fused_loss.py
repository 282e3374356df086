"""Fused chunked JSD(β=0.5) loss, forward + backward: time and peak memory, JSON lines.

Compares, at the same (BT, H, V) shapes and on the same machine:
  * `opdjax`: `objectives.token_values` (hidden states → loss in token chunks, each
    chunk's logits computed again in the backward pass);
  * `opdjax_vjp`: `objectives.fused.weighted_token_sum` (one pass: each chunk's gradient is
    formed in the forward pass, `custom_vjp`);
  * `naive`:  the same JSD on full `[BT, V]` logits in JAX;
  * `liger` / `liger_compiled`: Liger-Kernel's `LigerFusedLinearJSDLoss` (torch, CPU), when
    the optional `liger-kernel` package is installed (`pip install liger-kernel`).

Each (implementation, shape) runs in a fresh subprocess so that its peak resident memory
(VmHWM minus the RSS after imports and inputs) is its own. Usage:

    python benchmarks/fused_loss.py --out benchmarks/results/fused_loss_cpu_2core.jsonl
    python benchmarks/fused_loss.py --shapes 4096,256,32768 --impls opdjax,naive
    python benchmarks/fused_loss.py --dtype bfloat16 --shapes 8192,2048,151936 --repeats 10

On a GPU both sides run there (peak = the allocator's peak above the inputs; torch matmuls
in TF32, as XLA's default precision for float32), and each line reports the achieved
matmul rate against the 8·BT·H·V FLOPs every implementation must do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)

SHAPES = ((4096, 256, 32768), (8192, 512, 65536))
IMPLS = ("opdjax", "opdjax_vjp", "naive", "liger", "liger_compiled")


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
  """This address space's high-water RSS (VmHWM; ru_maxrss would include the parent's)."""
  with open("/proc/self/status") as f:
    return [int(l.split()[1]) for l in f if l.startswith("VmHWM:")][0] / 1024


def run_jax(impl: str, bt: int, h: int, v: int, repeats: int, dtype: str, chunk: int = 0) -> dict:
  import jax
  import jax.numpy as jnp

  from opdjax import objectives as obj

  ks = jax.random.split(jax.random.key(0), 4)
  cast = lambda x: x.astype(dtype)
  hidden = cast(jax.random.normal(ks[0], (1, bt, h)) * 0.5)
  kernel = cast(jax.random.normal(ks[1], (h, v)) * h**-0.5)
  t_hidden = cast(jax.random.normal(ks[2], (1, bt, h)) * 0.5)
  t_kernel = cast(jax.random.normal(ks[3], (h, v)) * h**-0.5)
  device = jax.devices()[0]
  on_gpu = device.platform != "cpu"
  tokens = jnp.zeros((1, bt), jnp.int32)
  jsd = lambda s, t: obj.generalized_jsd(s, t, beta=0.5)

  if impl == "opdjax_vjp":
    weights = jnp.full((1, bt), 1.0 / bt)

    def loss(hidden, kernel):
      return obj.fused.weighted_token_sum(
          lambda s, t, a: {"loss": jsd(s, t)},
          obj.Head(hidden, kernel),
          tokens,
          weights,
          teacher=obj.Head(t_hidden, t_kernel),
          chunk_size=chunk,
      )[0]

  elif impl == "opdjax":

    def loss(hidden, kernel):
      values = obj.token_values(
          lambda s, t, a: {"d": jsd(s, t)},
          obj.Head(hidden, kernel),
          tokens,
          teacher=obj.Head(t_hidden, t_kernel),
          chunk_size=chunk,
      )
      return jnp.mean(values["d"])

  else:

    def loss(hidden, kernel):
      f32 = lambda x: x.astype(jnp.float32)
      return jnp.mean(jsd(f32(hidden @ kernel), f32(t_hidden @ t_kernel)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  jax.block_until_ready((hidden, kernel, t_hidden, t_kernel))
  base = device.memory_stats()["bytes_in_use"] / 2**20 if on_gpu else rss_mb()
  start = time.perf_counter()
  jax.block_until_ready(step(hidden, kernel))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(hidden, kernel))
    times.append(time.perf_counter() - start)
  temp = step.lower(hidden, kernel).compile().memory_analysis().temp_size_in_bytes
  peak = device.memory_stats()["peak_bytes_in_use"] / 2**20 if on_gpu else peak_mb()
  return dict(
      first_s=first,
      median_s=statistics.median(times),
      device=device.device_kind,
      peak_extra_mb=peak - base,
      xla_temp_mb=temp / 2**20,
  )


def run_liger(impl: str, bt: int, h: int, v: int, repeats: int, dtype: str, chunk: int = 0) -> dict:
  import torch
  from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

  cuda = torch.cuda.is_available()
  dev = "cuda" if cuda else "cpu"
  torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as XLA's default precision
  torch.manual_seed(0)
  dt = getattr(torch, dtype)
  make = lambda *shape, scale: (torch.randn(*shape, device=dev) * scale).to(dt)
  hidden = make(bt, h, scale=0.5).requires_grad_()
  weight = make(v, h, scale=h**-0.5).requires_grad_()
  t_hidden = make(bt, h, scale=0.5)
  t_weight = make(v, h, scale=h**-0.5)
  labels = torch.zeros(bt, dtype=torch.long, device=dev)
  module = LigerFusedLinearJSDLoss(beta=0.5)
  if impl == "liger_compiled":
    module = torch.compile(module)

  def step():
    hidden.grad = weight.grad = None
    module(hidden, weight, t_hidden, t_weight, labels).backward()
    if cuda:
      torch.cuda.synchronize()

  if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  base = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mb()
  return dict(
      first_s=first,
      median_s=statistics.median(times),
      peak_extra_mb=peak - base,
      device=torch.cuda.get_device_name() if cuda else "cpu",
  )


def one(impl: str, bt: int, h: int, v: int, repeats: int, dtype: str, chunk: int = 0) -> dict:
  runner = run_jax if impl in ("opdjax", "opdjax_vjp", "naive") else run_liger
  result = runner(impl, bt, h, v, repeats, dtype, chunk)
  # The matmuls any implementation must do: the student and teacher head forward (2·BT·H·V
  # each) and the student's backward to hidden and head (2·BT·H·V each).
  flops = 4 * 2 * bt * h * v
  return dict(
      impl=impl,
      bt=bt,
      h=h,
      v=v,
      dtype=dtype,
      repeats=repeats,
      chunk_size=chunk,
      forward_flops=2 * bt * h * v,
      matmul_tflop_per_s=flops / result["median_s"] / 1e12,
      **result,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES])
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument(
      "--chunk_sizes",
      default="0",
      help="comma-separated tokens per chunk for the opdjax impls (0 = auto)",
  )
  parser.add_argument("--out", default=None, help="append JSON lines here")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    impl, bt, h, v = args.one.split(",")
    print(
        json.dumps(
            one(impl, int(bt), int(h), int(v), args.repeats, args.dtype, int(args.chunk_sizes))
        )
    )
    return
  runs = [
      (impl, chunk)
      for impl in args.impls.split(",")
      for chunk in (args.chunk_sizes.split(",") if impl.startswith("opdjax") else ["0"])
  ]
  for shape in args.shapes:
    for impl, chunk in runs:
      proc = subprocess.run(
          [
              sys.executable,
              __file__,
              "--one",
              f"{impl},{shape}",
              "--repeats",
              str(args.repeats),
              "--dtype",
              args.dtype,
              "--chunk_sizes",
              chunk,
          ],
          capture_output=True,
          text=True,
      )
      if proc.returncode:
        line = dict(
            impl=impl,
            shape=shape,
            dtype=args.dtype,
            error=(proc.stderr.strip().splitlines() or ["no output"])[-1],
        )
      else:
        line = json.loads(proc.stdout.strip().splitlines()[-1])
      emit(line, args.out)


if __name__ == "__main__":
  main()
