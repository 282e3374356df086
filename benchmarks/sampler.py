"""Sampler throughput: opdjax `generate` vs Hugging Face `transformers` `generate`.

Prints one JSON line per (model, batch, implementation): tokens/s in steady state
(median of `--repeats` runs, the two implementations' runs taken in turn, so a machine
whose speed drifts slows both alike), and for opdjax the first call's compile-plus-run
time separately. Both implementations decode greedily with the same config and weights, and
the line reports the fraction of generated tokens on which they agree.

    python benchmarks/sampler.py                    # CPU, tiny and small models
    python benchmarks/sampler.py --batches 1 8 --new_tokens 32 --out sampler.jsonl
    python benchmarks/sampler.py --models qwen3-0.6b --dtype bfloat16 --batches 1 64   # GPU

Each line records `XLA_FLAGS`, so runs that try compiler flags (for example command buffers
that capture the decode loop as one CUDA graph) can be told apart:

    XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL python benchmarks/sampler.py \
        --models qwen3-0.6b --dtype bfloat16 --batches 1 64 --new_tokens 128 --no_transformers

`--max_decode_windows 1` makes every decode step attend over the whole cache, with no
`lax.switch` between window sizes in each layer (on a GPU a conditional outside a command
buffer waits for its branch index on the host), to weigh the windows' saved cache reads
against that cost; `--windowed_decode_min_mb 0` makes a GPU use windows, where by default
it reads the cache whole (`attention.WINDOWED_DECODE_MIN_BYTES`); `--decode_windows_up_to
1.0` lets the windows grow to the whole cache rather than stop at half of it
(`attention.DECODE_WINDOWS_UP_TO`).
`--fuse_projections on|off` overrides the backend's choice of merged q/k/v and gate/up
matmuls in the decode (`sampling.FUSE_PROJECTIONS`), and `--decode_kernel xla|pallas` its
decode attention (`attention.DECODE_KERNEL`).

On an accelerator each line also gives the decode roofline: the bytes one decode step must
read (every weight once, plus the filled KV cache) over the measured device-to-device copy
bandwidth, as tokens/s, and the fraction of it reached (prefill included in the time).

Needs the `parity` extra (PyTorch) for the transformers side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from _jsonl import emit  # benchmarks/ is the script's directory
from _timing import alternating_medians
from flax import nnx

from opdjax import sampling
from opdjax.models import Decoder, ModelConfig, attention, save_pretrained, tiny_config
from opdjax.sampling import SamplingParams, generate

CONFIGS = {
    "tiny": tiny_config("qwen3", max_position_embeddings=1024),
    "small": ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
        model_type="qwen3",
        max_position_embeddings=1024,
    ),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        model_type="qwen3",
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}


def copy_bandwidth() -> float:
  """Measured device memory bandwidth in bytes/s (a 2 GiB array read and written)."""
  x = jnp.ones((2**30,), jnp.bfloat16)
  double = jax.jit(lambda x: x * 2)
  jax.block_until_ready(double(x))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(double(x))
    times.append(time.perf_counter() - start)
  return 2 * x.nbytes / statistics.median(times)


def decode_bytes(config, params_bytes, batch, prompt_len, new_tokens, itemsize) -> float:
  """Bytes read per decode step: all weights once, and the KV cache at its mean filled length."""
  filled = prompt_len + new_tokens / 2
  kv = batch * filled * config.num_layers * 2 * config.num_kv_heads * config.head_dim * itemsize
  return params_bytes + kv


def opdjax_run(model, prompts, mask, new_tokens):
  """opdjax's greedy generation of `new_tokens` for `prompts`, compiled and run once: its
  tokens, the first call's seconds (compilation included) and a call that repeats it."""
  run = lambda: jax.block_until_ready(
      generate(
          model,
          prompts,
          mask,
          key=jax.random.key(0),
          max_new_tokens=new_tokens,
          sampling=SamplingParams(greedy=True),
      ).tokens
  )
  start = time.perf_counter()
  tokens = run()
  return np.asarray(tokens), time.perf_counter() - start, run


def transformers_run(directory, prompts, new_tokens, dtype):
  """`transformers.generate`'s greedy generation of the same tokens from the checkpoint in
  `directory`, run once: its tokens and a call that repeats it."""
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision on a GPU
  model = (
      transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
      .to(device)
      .eval()
  )
  ids = torch.tensor(np.asarray(prompts), device=device)
  kwargs = dict(
      max_new_tokens=new_tokens,
      min_new_tokens=new_tokens,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
  )

  @torch.no_grad()
  def run():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  return run()[:, ids.shape[1] :].cpu().numpy(), run


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
  """The decode's backend settings as flags: the windows' three (`attention.MAX_DECODE_WINDOWS`,
  `attention.DECODE_WINDOWS_UP_TO` and `attention.WINDOWED_DECODE_MIN_BYTES`),
  `sampling.FUSE_PROJECTIONS`,
  `sampling.UNROLL_LAYERS` and `attention.DECODE_KERNEL`."""
  parser.add_argument(
      "--max_decode_windows",
      type=int,
      default=attention.MAX_DECODE_WINDOWS,
      help="window sizes a decode step may attend over (1: the whole cache, no lax.switch)",
  )
  parser.add_argument(
      "--decode_windows_up_to",
      type=float,
      default=attention.DECODE_WINDOWS_UP_TO,
      help="the largest window short of the whole cache, as a fraction of its slots",
  )
  parser.add_argument(
      "--windowed_decode_min_mb",
      type=float,
      default=None,
      help="the smallest layer cache (MiB) decoded in windows (default: the backend's; -1: none)",
  )
  parser.add_argument(
      "--fuse_projections",
      choices=["auto", "on", "off"],
      default="auto",
      help="decode with merged q/k/v and gate/up matmuls (auto: the backend's default)",
  )
  parser.add_argument(
      "--unroll_layers",
      choices=["auto", "on", "off"],
      default="auto",
      help="decode a scanned model with a module per layer (auto: the backend's default)",
  )
  parser.add_argument(
      "--decode_kernel",
      choices=["auto", *attention.DECODE_KERNELS],
      default="auto",
      help="the decode step's attention (auto: the backend's attention.DECODE_KERNEL)",
  )


def apply_decode_flags(args) -> dict:
  """Sets the flags of `add_decode_flags`; returns them as fields of a JSON line."""
  backend = jax.default_backend()
  attention.MAX_DECODE_WINDOWS = args.max_decode_windows
  attention.DECODE_WINDOWS_UP_TO = args.decode_windows_up_to
  if args.windowed_decode_min_mb is not None:
    attention.WINDOWED_DECODE_MIN_BYTES = {
        backend: None
        if args.windowed_decode_min_mb < 0
        else int(args.windowed_decode_min_mb * 2**20)
    }
  if args.fuse_projections != "auto":
    sampling.FUSE_PROJECTIONS = {backend: args.fuse_projections == "on"}
  if args.unroll_layers != "auto":
    sampling.UNROLL_LAYERS = {backend: args.unroll_layers == "on"}
  if args.decode_kernel != "auto":
    attention.DECODE_KERNEL = {backend: args.decode_kernel}
  return dict(
      max_decode_windows=args.max_decode_windows,
      decode_windows_up_to=args.decode_windows_up_to,
      windowed_decode_min_bytes=attention.WINDOWED_DECODE_MIN_BYTES.get(backend, 0),
      fuse_projections=sampling.fuses_projections(),
      unroll_layers=sampling.UNROLL_LAYERS.get(backend, False),
      decode_kernel=attention.decode_kernel(),
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_transformers", action="store_true")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--attention", default="auto", help="the decoder's attention implementation")
  parser.add_argument("--scan_layers", action="store_true", help="stacked layers in a lax.scan")
  add_decode_flags(parser)
  parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
  args = parser.parse_args(argv)
  windows = apply_decode_flags(args)
  device = str(jax.devices()[0].platform)
  kind = jax.devices()[0].device_kind
  bandwidth = copy_bandwidth() if device != "cpu" else None
  dtype = jnp.dtype(args.dtype)

  for name in args.models:
    config = CONFIGS[name]
    model = Decoder(
        config,
        dtype=dtype,
        param_dtype=dtype,
        attention=args.attention,
        scan_layers=args.scan_layers,
        rngs=nnx.Rngs(0),
    )
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    directory = tempfile.mkdtemp()
    if not args.no_transformers:
      save_pretrained(model, directory)
    for batch in args.batches:
      prompts = jax.random.randint(
          jax.random.key(batch), (batch, args.prompt_len), 1, config.vocab_size
      )
      mask = jnp.ones(prompts.shape, bool)
      ours, first, runs = opdjax_run(model, prompts, mask, args.new_tokens)
      runs = {"opdjax": runs}
      if not args.no_transformers:
        theirs, runs["transformers"] = transformers_run(
            directory, prompts, args.new_tokens, args.dtype
        )
      seconds = alternating_medians(runs, args.repeats)  # opdjax, transformers, opdjax, ...
      steady = seconds["opdjax"]
      generated = batch * args.new_tokens
      rows = [
          dict(
              impl="opdjax",
              tokens_per_s=generated / steady,
              steady_s=steady,
              compile_plus_first_run_s=first,
              compile_s_estimate=first - steady,
          )
      ]
      if bandwidth:
        step_bytes = decode_bytes(
            config, params_bytes, batch, args.prompt_len, args.new_tokens, dtype.itemsize
        )
        roofline = batch * bandwidth / step_bytes
        rows[0].update(
            roofline_tokens_per_s=roofline,
            fraction_of_roofline=generated / steady / roofline,
            copy_bandwidth_gb_s=bandwidth / 1e9,
        )
      if not args.no_transformers:
        rows.append(
            dict(
                impl="transformers",
                tokens_per_s=generated / seconds["transformers"],
                steady_s=seconds["transformers"],
                greedy_token_agreement=float(np.mean(ours == theirs)),
            )
        )
      for row in rows:
        emit(
            dict(
                benchmark="sampler",
                model=name,
                device=device,
                device_kind=kind,
                dtype=args.dtype,
                attention=args.attention,
                scan_layers=args.scan_layers,
                **windows,
                batch=batch,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                params=sum(
                    int(np.prod(v.get_value().shape))
                    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                ),
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
            ),
            args.out,
        )


if __name__ == "__main__":
  sys.exit(main())
