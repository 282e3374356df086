"""Sampler throughput: opdjax `generate` vs Hugging Face `transformers` `generate`.

Prints one JSON line per (model, batch, implementation): tokens/s in steady state
(median of `--repeats` runs), and for opdjax the first call's compile-plus-run time
separately. Both implementations decode greedily with the same config and weights, and
the line reports the fraction of generated tokens on which they agree.

    python benchmarks/sampler.py                    # CPU, tiny and small models
    python benchmarks/sampler.py --batches 1 8 --new_tokens 32 --out sampler.jsonl

Needs the `parity` extra (PyTorch) for the transformers side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opdjax.models import Decoder, ModelConfig, save_pretrained, tiny_config
from opdjax.sampling import SamplingParams, generate

CONFIGS = {
    "tiny": tiny_config("qwen3"),
    "small": ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=4,
                         num_heads=8, num_kv_heads=4, head_dim=32, model_type="qwen3",
                         max_position_embeddings=1024),
}


def time_opdjax(model, prompts, mask, new_tokens, repeats):
  run = lambda seed: generate(model, prompts, mask, key=jax.random.key(seed),
                              max_new_tokens=new_tokens, sampling=SamplingParams(greedy=True))
  start = time.perf_counter()
  out = run(0)
  jax.block_until_ready(out.tokens)
  first = time.perf_counter() - start
  times = []
  for seed in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(seed).tokens)
    times.append(time.perf_counter() - start)
  return np.asarray(out.tokens), first, statistics.median(times)


def time_transformers(directory, prompts, new_tokens, repeats):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  ids = torch.tensor(np.asarray(prompts))
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0)
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
      times.append(time.perf_counter() - start)
  return out[:, ids.shape[1]:].numpy(), statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_transformers", action="store_true")
  parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
  args = parser.parse_args(argv)
  sink = open(args.out, "a") if args.out else None
  device = str(jax.devices()[0].platform)

  for name in args.models:
    config = CONFIGS[name]
    model = Decoder(config, rngs=nnx.Rngs(0))
    directory = tempfile.mkdtemp()
    save_pretrained(model, directory)
    for batch in args.batches:
      prompts = jax.random.randint(jax.random.key(batch), (batch, args.prompt_len), 1,
                                   config.vocab_size)
      mask = jnp.ones(prompts.shape, bool)
      ours, first, steady = time_opdjax(model, prompts, mask, args.new_tokens, args.repeats)
      generated = batch * args.new_tokens
      rows = [dict(impl="opdjax", tokens_per_s=generated / steady, steady_s=steady,
                   compile_plus_first_run_s=first, compile_s_estimate=first - steady)]
      if not args.no_transformers:
        theirs, hf_steady = time_transformers(directory, prompts, args.new_tokens, args.repeats)
        rows.append(dict(impl="transformers", tokens_per_s=generated / hf_steady,
                         steady_s=hf_steady, greedy_token_agreement=float(np.mean(ours == theirs))))
      for row in rows:
        line = json.dumps(dict(benchmark="sampler", model=name, device=device, batch=batch,
                               prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                               params=sum(int(np.prod(v.get_value().shape)) for _, v in
                                          nnx.to_flat_state(nnx.state(model, nnx.Param))),
                               **{k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in row.items()}))
        print(line, flush=True)
        if sink:
          sink.write(line + "\n")
  if sink:
    sink.close()


if __name__ == "__main__":
  sys.exit(main())
