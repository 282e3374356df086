"""Where one chunk of the fused JSD(β=0.5) loss spends its time, JAX against torch.

`benchmarks/fused_loss.py` times the whole loss; this times its parts for the chunks of
`C` tokens (H hidden, V vocabulary, float32) of the benchmark's (8192, H, V) shape. JAX
runs each part over all `8192 / C` chunks in one program, as the loss's scan does (see
`jax_parts`); torch runs it chunk by chunk, eagerly, its allocator reusing memory:

  * `student_logits`, `teacher_logits`: `[C, H] @ [H, V]`;
  * `jsd_value_and_grad`: the divergence and its gradient w.r.t. the student's logits
    (`objectives.generalized_jsd` under `jax.value_and_grad`; torch: autograd of the same
    formula);
  * `grad_hidden`: `dlogits [C, V] @ kernelᵀ`;
  * `grad_kernel_accumulate`: `acc [H, V] += hiddenᵀ @ dlogits`, the head's gradient summed
    over chunks (torch: `addmm_`, which accumulates inside the matrix product; XLA's CPU
    backend forms the product, then adds it);
  * `head_backward`: the two above together, as `objectives.fused.head_backward` runs
    them; on a CPU also `head_backward_blocks_of_N`, the same over vocabulary blocks
    (`objectives.fused.HEAD_BLOCK`), which the loss uses there.

    python benchmarks/fused_loss_parts.py --out benchmarks/results/fused_loss_parts_cpu_2core.jsonl
    python benchmarks/fused_loss_parts.py --chunk 1024

One JSON line per (framework, part): milliseconds per chunk (best of `--repeats`, divided
by the chunks) and the seconds for all chunks. About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp
from _jsonl import emit  # benchmarks/, next to this script
from _timing import best_seconds

from opdjax import objectives as obj

BETA = 0.5
TOKENS = 8192


def jax_parts(c: int, h: int, v: int, repeats: int) -> dict[str, float]:
  """Seconds per chunk of each part. Each part runs all `TOKENS / c` chunks in one program
  (a `fori_loop`, as the loss's scan runs them), so its buffers are allocated once: a
  program per chunk would pay for fresh output pages on every call (for the `[H, V]`
  head gradient, 128 MB a chunk at the default shape), which the loss does not. Each
  chunk's input is scaled by `1 + i·2⁻²⁰` so that XLA cannot hoist the work out of the
  loop; the scaling is one elementwise pass over the input (`head_backward` scales the
  logits' gradient, which both of its products read)."""
  ks = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(ks[0], (c, h))
  kernel = jax.random.normal(ks[1], (h, v)) * h**-0.5
  t_hidden = jax.random.normal(ks[2], (c, h))
  t_kernel = jax.random.normal(ks[3], (h, v)) * h**-0.5
  chunks = TOKENS // c
  jsd = lambda s, t: jnp.sum(obj.generalized_jsd(s, t, beta=BETA))
  s, t = hidden @ kernel, t_hidden @ t_kernel
  g = jax.grad(jsd)(s, t)
  block = obj.fused.HEAD_BLOCK.get(jax.default_backend(), 0)

  def looped(part, carry, x, *operands):
    """A program running `carry = part(carry, x · (1 + i·2⁻²⁰), *operands)` for every
    chunk i (the arrays are arguments: as constants XLA would fold the products away)."""

    def program(carry, x, *operands):
      scaled = lambda i: x * (1 + i * 2.0**-20)
      return jax.lax.fori_loop(0, chunks, lambda i, c: part(c, scaled(i), *operands), carry)

    run = jax.jit(program)
    jax.block_until_ready(run(carry, x, *operands))
    return lambda: jax.block_until_ready(run(carry, x, *operands))

  def value_and_grad(total, s, t):
    value, grad = jax.value_and_grad(jsd)(s, t)
    return total + value + grad[0, 0]

  def head_backward(carry, g, hidden, kernel, *, block):  # g varies: both products do
    grad_hidden, grad_kernel = obj.fused.head_backward(hidden, kernel, g, carry[1], block=block)
    return carry[0] + grad_hidden, grad_kernel

  zero = jnp.float32(0)
  both = (jnp.zeros((c, h)), jnp.zeros((h, v)))
  logits = lambda total, x, w: total + jnp.sum(x @ w)
  programs = {
      "student_logits": looped(logits, zero, hidden, kernel),
      "teacher_logits": looped(logits, zero, t_hidden, t_kernel),
      "jsd_value_and_grad": looped(value_and_grad, zero, s, t),
      "grad_hidden": looped(lambda acc, g, w: acc + g @ w.T, jnp.zeros((c, h)), g, kernel),
      "grad_kernel_accumulate": looped(
          lambda acc, x, g: acc + x.T @ g, jnp.zeros((h, v)), hidden, g
      ),
      "head_backward": looped(functools.partial(head_backward, block=0), both, g, hidden, kernel),
  }
  if block:
    programs[f"head_backward_blocks_of_{block}"] = looped(
        functools.partial(head_backward, block=block), both, g, hidden, kernel
    )
  return {name: best_seconds(program, repeats) / chunks for name, program in programs.items()}


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
      "head_backward": best_seconds(
          timed(lambda: (g @ kernel.T, acc.addmm_(hidden.T, g))), repeats
      ),
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
          ),
          args.out,
      )


if __name__ == "__main__":
  main()
