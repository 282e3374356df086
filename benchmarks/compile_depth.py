"""Compile time and program size against depth: per-layer vs scanned layers, 4 vs 32 layers.

Lowers and compiles the gradient of a mean-logit loss (the backward pass a train step
builds) for a Qwen3-style model with hidden 256 and vocabulary 4096, for each
(layers, layout), and prints one JSON line each: seconds to lower, seconds to compile, and
the StableHLO text size.

    python benchmarks/compile_depth.py --out benchmarks/results/compile_depth_cpu_2core.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)
from flax import nnx

from opdjax.models import Decoder, ModelConfig


def measure(num_layers: int, scan_layers: bool, remat: str) -> dict:
  config = ModelConfig(
      vocab_size=4096,
      hidden_size=256,
      intermediate_size=768,
      num_layers=num_layers,
      num_heads=4,
      num_kv_heads=2,
      head_dim=64,
      model_type="qwen3",
      max_position_embeddings=512,
  )
  graphdef, state = nnx.split(
      nnx.eval_shape(
          lambda: Decoder(config, rngs=nnx.Rngs(0), scan_layers=scan_layers, remat=remat)
      )
  )
  tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)
  loss = lambda state, tokens: jnp.mean(nnx.merge(graphdef, state)(tokens))
  start = time.perf_counter()
  lowered = jax.jit(jax.grad(loss)).lower(state, tokens)
  lowered_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  return dict(
      benchmark="compile_depth",
      device=jax.devices()[0].device_kind,
      layers=num_layers,
      scan_layers=scan_layers,
      remat=remat,
      lower_s=round(lowered_s, 3),
      compile_s=round(time.perf_counter() - start, 3),
      hlo_chars=len(lowered.as_text()),
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", nargs="+", type=int, default=[4, 32])
  parser.add_argument("--remat", default="full")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  for scan_layers in (False, True):
    for layers in args.layers:
      emit(measure(layers, scan_layers, args.remat), args.out)


if __name__ == "__main__":
  sys.exit(main())
