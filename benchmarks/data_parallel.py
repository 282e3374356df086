"""The memory plan of a Qwen3-1.7B-from-Qwen3-8B OPD step with its rows split over devices.

Writes the released checkpoints' shapes (`config.json` only: `qwen3_opd.save_shapes`) and
plans the `qwen3_opd` experiment's step on simulated CPU devices (`--devices`), from
shapes alone: one JSON line per variant with the plan's per-device terms. Each device
should hold its share of the batch: 64 rows on 8 devices about what 8 rows take on one.
`--without_row_constraint` plans it as before session 18, with `Decoder._rows` (the
constraint that keeps the residual stream's rows split between layers) turned off.

    python benchmarks/data_parallel.py --out benchmarks/results/data_parallel_cpu8.jsonl
    python benchmarks/data_parallel.py --without_row_constraint \\
        --out benchmarks/results/data_parallel_cpu8.jsonl

About 25 seconds on 2 CPU cores. The plan's attention there is XLA's, in blocks of
`--query_block` queries (default `attention.QUERY_BLOCK`; lines without
`attention_query_block` predate the blocks, and `--query_block 4096` plans them again);
cuDNN on a GPU and splash on a TPU hold less. On an accelerator the variants that need
more devices than it has are skipped (`gpu_session.sh`'s `plan_qwen3` plans one GPU's 8
rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

# (devices, rows, micro-batches, student remat)
VARIANTS = [(8, 64, 1, "auto"), (8, 64, 4, "auto"), (8, 64, 1, "full"), (1, 8, 1, "auto")]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--without_row_constraint", action="store_true")
  p.add_argument("--query_block", type=int, default=None)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  )
  import jax
  from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)

  from opdjax import build, learner
  from opdjax.experiments import qwen3_opd
  from opdjax.models import attention
  from opdjax.models.decoder import Decoder

  if args.without_row_constraint:
    Decoder._rows = lambda self, x: x
  if args.query_block:
    attention.QUERY_BLOCK = args.query_block
  with tempfile.TemporaryDirectory() as tmp:
    qwen3_opd.save_shapes(f"{tmp}/student", "1.7B")
    qwen3_opd.save_shapes(f"{tmp}/teacher", "8B")
    with open(f"{tmp}/train.jsonl", "w") as f:
      f.write(json.dumps({"prompt": "w3 w4", "answer": "w5"}) + "\n")
    for devices, rows, microbatches, remat in VARIANTS:
      if devices > jax.device_count():
        continue
      config = qwen3_opd.get_config(f"{tmp}/student,{tmp}/teacher,{tmp}/train.jsonl")
      config.mesh.shape = (devices,)
      config.train.batch_size, config.train.microbatches = rows, microbatches
      config.student.remat = remat
      terms = learner.memory_plan(config, build.setup(config)).terms
      emit(
          dict(
              benchmark="data_parallel",
              row_constraint=not args.without_row_constraint,
              devices=devices,
              rows=rows,
              tokens_per_row=config.task.prompt_length + config.task.completion_length - 1,
              microbatches=microbatches,
              remat=remat,
              attention_query_block=attention.QUERY_BLOCK,
              attention_causal_groups=attention.CAUSAL_QUERY_GROUPS,
              per_device_gb={k: round(v / 1e9, 3) for k, v in terms.items()},
              total_gb=round(sum(terms.values()) / 1e9, 3),
              jax=jax.__version__,
          ),
          args.out,
      )


if __name__ == "__main__":
  sys.exit(main())
