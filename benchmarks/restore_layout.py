"""Restoring a checkpoint saved in the other layer layout: peak array bytes and seconds.

Saves a random Qwen3-style model (16 layers, hidden 1024, float32: 0.81 GB) in one layout
and restores it into the other two ways, printing one JSON line each:
- `by_parameter`: `build.restore_either_layout`, which reads one parameter's layers at a
  time (Orbax's partial restore) and converts it before reading the next;
- `whole`: the whole tree read in its saved layout, then converted and placed (what
  `restore_either_layout` did before session 18).
The peak is the largest sum of `jax.live_arrays()` bytes seen by a thread polling every
2 ms, above what was live before the restore: on an accelerator, device memory.

    python benchmarks/restore_layout.py --out benchmarks/results/restore_layout_cpu_2core.jsonl

About 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)
from flax import nnx

from opdjax import build, checkpoint, sharding
from opdjax.models import Decoder, ModelConfig
from opdjax.models.decoder import stack_layers, unstack_layers
from opdjax.models.hf import abstract_model

CONFIG = ModelConfig(
    vocab_size=1024,
    hidden_size=1024,
    intermediate_size=3072,
    num_layers=16,
    num_heads=16,
    num_kv_heads=8,
    head_dim=64,
    model_type="qwen3",
    max_position_embeddings=64,
)


def live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def peak_while(fn):
  """`(fn(), seconds, peak live-array bytes above those live before)`."""
  gc.collect()  # the previous restore's arrays
  base, peak, done = live_bytes(), [0], threading.Event()

  def poll():
    while not done.is_set():
      try:
        peak[0] = max(peak[0], live_bytes() - base)
      except RuntimeError:  # an array deleted while summing
        pass
      time.sleep(0.002)

  thread = threading.Thread(target=poll)
  thread.start()
  start = time.perf_counter()
  try:
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start, peak[0]
  finally:
    done.set()
    thread.join()


def restore_whole(workdir, abstract, mesh, *, scanned: bool):
  """The whole tree read in its saved layout, then converted and placed."""
  convert, back = (unstack_layers, stack_layers) if scanned else (stack_layers, unstack_layers)
  saved = sharding.abstract_state(jax.eval_shape(convert, abstract), mesh)
  return sharding.place_state(back(checkpoint.restore_params(workdir, saved)), mesh)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  mesh = sharding.make_mesh((1,), ("data",))
  with tempfile.TemporaryDirectory() as tmp:
    for saved_scanned in (False, True):
      workdir = os.path.join(tmp, f"scanned_{saved_scanned}")
      model = Decoder(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0), scan_layers=saved_scanned)
      state = nnx.state(model)
      model_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
      saver = checkpoint.Checkpointer(workdir)
      saver.save(1, state, {"unused": jnp.zeros(1)}, {})
      saver.close()
      del model, state
      scanned = not saved_scanned
      _, abstract = nnx.split(abstract_model(CONFIG, jnp.float32, scan_layers=scanned))
      ways = {
          "by_parameter": functools.partial(
              build.restore_either_layout, workdir, abstract, mesh, scanned=scanned
          ),
          "whole": functools.partial(restore_whole, workdir, abstract, mesh, scanned=scanned),
      }
      for _ in range(args.repeats):
        for way, restore in ways.items():
          restored, seconds, peak = peak_while(restore)
          del restored
          emit(
              dict(
                  benchmark="restore_layout",
                  way=way,
                  saved="scanned" if saved_scanned else "per-layer",
                  restored_into="scanned" if scanned else "per-layer",
                  layers=CONFIG.num_layers,
                  hidden=CONFIG.hidden_size,
                  model_bytes=model_bytes,
                  peak_live_bytes=peak,
                  peak_over_model=round(peak / model_bytes, 3),
                  seconds=round(seconds, 3),
                  device=jax.devices()[0].device_kind,
                  jax=jax.__version__,
              ),
              args.out,
          )


if __name__ == "__main__":
  main()
