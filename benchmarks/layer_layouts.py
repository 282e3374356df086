"""A model's gradient per layer layout and remat policy: temporaries and seconds.

Compiles the gradient of a mean-hidden-state loss for a Qwen3-style model (8 layers ×
512, MLP 1,536, one row of 256 tokens by default) per-layer and scanned, under each remat
policy, in float32 and with bfloat16 compute, and prints one JSON line each: the compiled
program's temporaries (`memory_analysis()`) and the median seconds of `--repeats` calls.
A layer scan without remat keeps every intermediate of its body for the backward, which
is why `remat="auto"` means save_dots for scanned layers (`models.decoder.
remat_policy_name`).

    python benchmarks/layer_layouts.py --out benchmarks/results/layer_layouts_cpu_2core.jsonl

About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)
from flax import nnx

from opdjax.models import Decoder, ModelConfig

LAYOUTS = (
    (False, "none"),
    (False, "save_dots"),
    (True, "none"),
    (True, "save_dots"),
    (True, "full"),
)


def measure(config: ModelConfig, dtype, scan_layers: bool, remat: str, tokens, repeats: int):
  model = Decoder(
      config,
      dtype=dtype,
      param_dtype=jnp.float32,
      scan_layers=scan_layers,
      remat=remat,
      rngs=nnx.Rngs(0),
  )
  graphdef, state = nnx.split(model)
  loss = lambda state, tokens: jnp.mean(
      nnx.merge(graphdef, state).hidden_states(tokens).astype(jnp.float32)
  )
  compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
  jax.block_until_ready(compiled(state, tokens))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, tokens))
    seconds.append(time.perf_counter() - start)
  return dict(
      benchmark="layer_layouts",
      device=jax.devices()[0].device_kind,
      layers=config.num_layers,
      hidden=config.hidden_size,
      tokens=tokens.shape[1],
      dtype=jnp.dtype(dtype).name,
      scan_layers=scan_layers,
      remat=remat,
      temporaries_mb=round(compiled.memory_analysis().temp_size_in_bytes / 1e6, 1),
      median_s=round(statistics.median(seconds), 4),
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  config = ModelConfig(
      vocab_size=4096,
      hidden_size=args.hidden,
      intermediate_size=3 * args.hidden,
      num_layers=args.layers,
      num_heads=args.hidden // 64,
      num_kv_heads=args.hidden // 128,
      head_dim=64,
      model_type="qwen3",
      max_position_embeddings=max(512, args.tokens),
  )
  tokens = jnp.zeros((1, args.tokens), jnp.int32)
  for dtype in (jnp.float32, jnp.bfloat16):
    for scan_layers, remat in LAYOUTS:
      emit(measure(config, dtype, scan_layers, remat, tokens, args.repeats), args.out)


if __name__ == "__main__":
  sys.exit(main())
