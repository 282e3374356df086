"""Compiled temporaries of a JSD(β=0.5) loss step at Qwen3's vocabulary, chunked or not.

Compiles (does not run) forward + backward of the loss from hidden states at V = 151,936,
hidden 64, B·T = 16 × 256 = 4096 tokens, and prints XLA's `memory_analysis()` temporaries
for each path as JSON lines: the trainer's one-pass sum, the rematerialised scan with
automatic chunks, and the scan with one whole-batch chunk (what an unfused loss holds).
One `[B·T, V]` float32 buffer is 2.5 GB.

    python benchmarks/fused_memory.py
"""

import functools
import json

import jax
import jax.numpy as jnp

from opdjax import objectives as obj

VOCAB, WIDTH, BATCH, LENGTH = 151_936, 64, 16, 256


def temporaries(path: str, chunk_size: int) -> int:
  fn = lambda s, t, a: {"loss": obj.generalized_jsd(s, t, beta=0.5)}

  def loss(hidden, kernel, t_hidden, t_kernel, tokens, mask):
    weights = mask / jnp.maximum(jnp.sum(mask), 1)
    student, teacher = obj.Head(hidden, kernel), obj.Head(t_hidden, t_kernel)
    if path == "one_pass":
      return obj.fused.weighted_token_sum(
          fn, student, tokens, weights, teacher=teacher, chunk_size=chunk_size
      )[0]
    values = obj.token_values(fn, student, tokens, teacher=teacher, chunk_size=chunk_size)
    return jnp.sum(weights * values["loss"])

  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = step.lower(
      f32((BATCH, LENGTH, WIDTH)),
      f32((WIDTH, VOCAB)),
      f32((BATCH, LENGTH, WIDTH)),
      f32((WIDTH, VOCAB)),
      jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32),
      f32((BATCH, LENGTH)),
  ).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  for path, chunk_size in (("one_pass", 0), ("remat_scan", 0), ("remat_scan", BATCH * LENGTH)):
    temp = temporaries(path, chunk_size)
    print(
        json.dumps(
            dict(
                path=path,
                chunk_size=chunk_size or "auto",
                vocab=VOCAB,
                tokens=BATCH * LENGTH,
                temp_gb=round(temp / 1e9, 3),
                full_logits_gb=round(BATCH * LENGTH * VOCAB * 4 / 1e9, 3),
            )
        )
    )


if __name__ == "__main__":
  main()
