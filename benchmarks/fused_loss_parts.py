"""Where one chunk of the fused JSD(β=0.5) loss spends its time, JAX against torch.

`benchmarks/fused_loss.py` times the whole loss; this times its parts for one chunk of `C`
tokens (H hidden, V vocabulary, float32), each as its own compiled program, and scales
each by the `8192 / C` chunks of the benchmark's (8192, H, V) shape:

  * `student_logits`, `teacher_logits`: `[C, H] @ [H, V]`;
  * `jsd_value_and_grad`: the divergence and its gradient w.r.t. the student's logits
    (`objectives.generalized_jsd` under `jax.value_and_grad`; torch: autograd of the same
    formula);
  * `grad_hidden`: `dlogits [C, V] @ kernelᵀ`;
  * `grad_kernel_accumulate`: `acc [H, V] += hiddenᵀ @ dlogits`, the head's gradient summed
    over chunks, in place on both sides (JAX: `acc` donated, as the fused loss's scan
    carries it; torch: `addmm_`, which accumulates inside the matrix product; XLA forms the
    product, then adds it).

    python benchmarks/fused_loss_parts.py --out benchmarks/results/fused_loss_parts_cpu_2core.jsonl
    python benchmarks/fused_loss_parts.py --chunk 1024

One JSON line per (framework, part): milliseconds per chunk (best of `--repeats`) and the
seconds for all chunks. About 1 minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import platform

import jax
import jax.numpy as jnp
from _jsonl import emit  # benchmarks/, next to this script
from _timing import best_seconds

from opdjax import objectives as obj

BETA = 0.5
TOKENS = 8192


def jax_parts(c: int, h: int, v: int, repeats: int) -> dict[str, float]:
  ks = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(ks[0], (c, h))
  kernel = jax.random.normal(ks[1], (h, v)) * h**-0.5
  t_hidden = jax.random.normal(ks[2], (c, h))
  t_kernel = jax.random.normal(ks[3], (h, v)) * h**-0.5
  matmul = jax.jit(lambda a, b: a @ b)
  jsd = lambda s, t: jnp.sum(obj.generalized_jsd(s, t, beta=BETA))
  value_and_grad = jax.jit(lambda s, t: jax.value_and_grad(jsd)(s, t))
  grad_hidden = jax.jit(lambda g, w: g @ w.T)
  # In place, as the fused loss's scan carries it (`acc` donated).
  accumulate = jax.jit(lambda acc, x, g: acc + x.T @ g, donate_argnums=0)
  s, t = matmul(hidden, kernel), matmul(t_hidden, t_kernel)
  g = value_and_grad(s, t)[1]
  acc = [jnp.zeros((h, v))]

  def accumulate_in_place():
    acc[0] = jax.block_until_ready(accumulate(acc[0], hidden, g))

  run = lambda fn, *args: lambda: jax.block_until_ready(fn(*args))
  return {
      "student_logits": best_seconds(run(matmul, hidden, kernel), repeats),
      "teacher_logits": best_seconds(run(matmul, t_hidden, t_kernel), repeats),
      "jsd_value_and_grad": best_seconds(run(value_and_grad, s, t), repeats),
      "grad_hidden": best_seconds(run(grad_hidden, g, kernel), repeats),
      "grad_kernel_accumulate": best_seconds(accumulate_in_place, repeats),
  }


def torch_parts(c: int, h: int, v: int, repeats: int) -> dict[str, float]:
  import torch

  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision on a GPU
  randn = lambda *shape: torch.randn(*shape, device=device)
  hidden, t_hidden = randn(c, h), randn(c, h)
  kernel, t_kernel = randn(h, v) * h**-0.5, randn(h, v) * h**-0.5
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  timed = lambda fn: lambda: (fn(), sync())
  s, t = hidden @ kernel, t_hidden @ t_kernel

  def value_and_grad():
    z = s.detach().requires_grad_()
    log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    log_m = torch.logaddexp(log_q + math.log(BETA), log_p + math.log1p(-BETA))
    kl = lambda log_a: (log_a.exp() * (log_a - log_m)).sum(-1)
    loss = (BETA * kl(log_q) + (1 - BETA) * kl(log_p)).sum()
    loss.backward()
    return z.grad

  g = value_and_grad()
  acc = torch.zeros(h, v, device=device)
  return {
      "student_logits": best_seconds(timed(lambda: hidden @ kernel), repeats),
      "teacher_logits": best_seconds(timed(lambda: t_hidden @ t_kernel), repeats),
      "jsd_value_and_grad": best_seconds(timed(value_and_grad), repeats),
      "grad_hidden": best_seconds(timed(lambda: g @ kernel.T), repeats),
      "grad_kernel_accumulate": best_seconds(timed(lambda: acc.addmm_(hidden.T, g)), repeats),
  }


def device_name(framework: str) -> str:
  if framework == "jax":
    return str(jax.devices()[0].device_kind)
  import torch

  return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunk", type=int, default=64, help="tokens per chunk (C)")
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=65536)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--frameworks", nargs="+", default=["jax", "torch"])
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  chunks = TOKENS // args.chunk
  for framework in args.frameworks:
    parts = {"jax": jax_parts, "torch": torch_parts}[framework]
    for part, seconds in parts(args.chunk, args.hidden, args.vocab, args.repeats).items():
      emit(
          dict(
              benchmark="fused_loss_parts",
              framework=framework,
              part=part,
              chunk=args.chunk,
              hidden=args.hidden,
              vocab=args.vocab,
              ms_per_chunk=round(seconds * 1e3, 2),
              seconds_all_chunks=round(seconds * chunks, 2),
              device=device_name(framework),
              cpus=os.cpu_count(),
              machine=platform.machine(),
          ),
          args.out,
      )


if __name__ == "__main__":
  main()
