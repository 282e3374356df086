"""The student's layout while it samples (`sampling.layout`), on 8 simulated CPU devices.

With FSDP weights every decode step all-gathers each weight matrix for every token. The
`tensor` layout reshards the student once per rollout (weights whole over "fsdp", still split
over "tensor"), so the decode loop only moves activations. For each layout this prints one
JSON line: the once-per-rollout reshard time, the decode time of `--new_tokens` tokens, and
the all-gathers and all-reduces in the compiled sampler.

    python benchmarks/sampling_layout.py --out benchmarks/results/sampling_layout_cpu8.jsonl
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)
from flax import nnx  # noqa: E402

from opdjax import sharding  # noqa: E402
from opdjax.models import Decoder, ModelConfig  # noqa: E402
from opdjax.sampling import SamplingParams, _generate_jit, bucket_size, generate  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mesh", default="4,2", help="fsdp,tensor sizes")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  fsdp, tensor = map(int, args.mesh.split(","))
  mesh = sharding.make_mesh((fsdp, tensor), ("fsdp", "tensor"))
  config = ModelConfig(
      vocab_size=8192,
      hidden_size=512,
      intermediate_size=1536,
      num_layers=4,
      num_heads=8,
      num_kv_heads=4,
      head_dim=64,
      model_type="qwen3",
      max_position_embeddings=256,
  )
  graphdef, state = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
  state = sharding.place_state(state, mesh)
  rows = sharding.batch_sharding(mesh)
  prompts = jax.device_put(jnp.ones((args.batch, 16), jnp.int32), rows)
  mask = jax.device_put(jnp.ones((args.batch, 16), bool), rows)
  sampling = SamplingParams()
  for layout in sharding.SAMPLING_LAYOUTS:
    shardings = sharding.state_shardings(
        state, mesh, sharding.sampling_rules(sharding.DEFAULT_RULES, layout)
    )
    reshard, decode = [], []
    for i in range(args.repeats + 1):
      start = time.perf_counter()
      placed = jax.block_until_ready(jax.device_put(state, shardings))
      middle = time.perf_counter()
      out = generate(
          nnx.merge(graphdef, placed),
          prompts,
          mask,
          key=jax.random.key(i),
          max_new_tokens=args.new_tokens,
          sampling=sampling,
      )
      jax.block_until_ready(out.tokens)
      if i:  # the first call compiles
        reshard.append(middle - start)
        decode.append(time.perf_counter() - middle)
    hlo = (
        _generate_jit.lower(
            graphdef,
            placed,
            prompts,
            mask,
            jax.random.key(0),
            jnp.int32(args.new_tokens),
            sampling=sampling,
            eos_ids=tuple(config.eos_token_ids),
            steps=bucket_size(args.new_tokens),
            return_logits=False,
            num_samples=1,
            rows=rows,
        )
        .compile()
        .as_text()
    )
    line = dict(
        layout=layout,
        mesh=dict(mesh.shape),
        batch=args.batch,
        new_tokens=args.new_tokens,
        reshard_s=statistics.median(reshard),
        decode_s=statistics.median(decode),
        all_gathers=len(re.findall(r"= \S+ all-gather(?:-start)?\(", hlo)),
        all_reduces=len(re.findall(r"= \S+ all-reduce(?:-start)?\(", hlo)),
        device=jax.devices()[0].device_kind,
        devices=jax.device_count(),
    )
    emit(line, args.out)


if __name__ == "__main__":
  main()
