"""One OPD step of a Qwen3-0.6B-shaped random model at V = 151,936: seconds and peak memory.

The step is what `opdjax.trainer` runs per rollout: the teacher's forward pass to hidden
states (no gradient), then the student's jitted update (forward, fused chunked JSD(β=0.5)
loss from hidden states, backward, AdamW). Shapes default to Qwen3-0.6B (28 layers, hidden
1024, 16 heads / 8 KV heads of 128, MLP 3072, tied embeddings, V = 151,936), bfloat16
compute with float32 master weights for the student and a bfloat16 teacher of the same
shape. With `--sample`, the completion is first sampled by the student (the whole on-policy
step). Prints one JSON line: compile (first call) and median seconds per part, the step's
compiled temporaries (`memory_analysis`), and peak memory (RSS on a CPU, the allocator's
peak on an accelerator).

    python benchmarks/opd_step_scale.py --out benchmarks/results/opd_step_scale_cpu_2core.jsonl
    python benchmarks/opd_step_scale.py --layers 4 --seq 128     # a quick look
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)
from flax import nnx

from opdjax import configs, recipes, sharding
from opdjax import objectives as obj
from opdjax.evaluation import forward_hidden
from opdjax.learner import make_optimizer, make_train_step
from opdjax.models import Decoder, ModelConfig
from opdjax.sampling import SamplingParams, generate


def peak_bytes() -> int:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return int(device.memory_stats()["peak_bytes_in_use"])


def timed(fn, repeats):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return out, first, statistics.median(times) if times else first


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=28)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--intermediate", type=int, default=3072)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--vocab", type=int, default=151_936)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=512, help="prompt + completion tokens per row")
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--loss_chunk_size", type=int, default=0)
  p.add_argument("--microbatches", type=int, default=1)
  p.add_argument("--scan_layers", action="store_true")
  p.add_argument("--remat", default="auto", choices=["auto", "none", "full", "save_dots"])
  p.add_argument("--sample", action="store_true", help="also time sampling the completion")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  config = ModelConfig(
      vocab_size=args.vocab,
      hidden_size=args.hidden,
      intermediate_size=args.intermediate,
      num_layers=args.layers,
      num_heads=args.heads,
      num_kv_heads=args.kv_heads,
      head_dim=args.head_dim,
      model_type="qwen3",
      tie_word_embeddings=True,
      max_position_embeddings=max(args.seq, 512),
  )
  compute = jnp.dtype(args.dtype)
  mesh = sharding.make_mesh((1,), ("data",))
  layout = dict(scan_layers=args.scan_layers)
  student = Decoder(
      config, dtype=compute, param_dtype=jnp.float32, rngs=nnx.Rngs(0), remat=args.remat, **layout
  )
  teacher = Decoder(config, dtype=compute, param_dtype=compute, rngs=nnx.Rngs(1), **layout)
  run_config = configs.base_config()
  run_config.recipe.divergence = "generalized_jsd"
  run_config.recipe.divergence_kwargs = {"beta": 0.5}
  recipe = recipes.build(run_config.recipe)
  graphdef, params = nnx.split(student)
  params = sharding.place_state(params, mesh)  # as the trainer places them: no recompiles
  t_graphdef, t_state = nnx.split(teacher)
  tx = make_optimizer(run_config)
  opt_state = sharding.init_optimizer(tx, params, mesh)
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  step = make_train_step(
      graphdef,
      recipe,
      tx,
      shardings(params),
      shardings(opt_state),
      microbatches=args.microbatches,
      chunk_size=args.loss_chunk_size,
  )

  b, new = args.batch, args.seq - args.prompt
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(1, args.vocab, (b, args.prompt)), jnp.int32)
  prompt_mask = jnp.ones((b, args.prompt), bool)
  timings = {}
  if args.sample:
    sample = lambda: generate(
        student,
        prompts,
        prompt_mask,
        key=jax.random.key(0),
        max_new_tokens=new,
        sampling=SamplingParams(),
    ).tokens
    completion, timings["sample_first_s"], timings["sample_median_s"] = timed(sample, args.repeats)
  else:
    completion = jnp.asarray(rng.integers(1, args.vocab, (b, new)), jnp.int32)
  seq = recipes.join(prompts, prompt_mask, completion, jnp.ones((b, new), bool))
  tokens, mask = recipes.inputs_of(seq)

  score = lambda: forward_hidden(t_graphdef, t_state, tokens, mask)
  hidden, timings["teacher_first_s"], timings["teacher_median_s"] = timed(score, args.repeats)
  frozen = {"teacher": obj.Head(hidden, teacher.head_kernel())}
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, seq, frozen).compile()
  timings["update_compile_s"] = time.perf_counter() - start
  temporaries = compiled.memory_analysis().temp_size_in_bytes

  state = {"params": params, "opt_state": opt_state}

  def update():
    state["params"], state["opt_state"], m = compiled(
        state["params"], state["opt_state"], seq, frozen
    )
    return m["loss"][0]

  loss, timings["update_first_s"], timings["update_median_s"] = timed(update, args.repeats)
  line = dict(
      benchmark="opd_step_scale",
      device=jax.devices()[0].device_kind,
      platform=jax.devices()[0].platform,
      layers=args.layers,
      hidden=args.hidden,
      vocab=args.vocab,
      batch=b,
      seq=args.seq,
      dtype=args.dtype,
      microbatches=args.microbatches,
      scan_layers=args.scan_layers,
      remat=args.remat,
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
      loss=float(loss),
      step_temporaries_gb=temporaries / 1e9,
      peak_gb=peak_bytes() / 1e9,
      bt_v_float32_gb=b * (args.seq - 1) * args.vocab * 4 / 1e9,
      **{k: round(v, 4) for k, v in timings.items()},
  )
  line["step_median_s"] = round(sum(v for k, v in timings.items() if k.endswith("median_s")), 4)
  emit(line, args.out)


if __name__ == "__main__":
  sys.exit(main())
