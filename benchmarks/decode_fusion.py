"""Would merged projections or another decode attention speed up batch-1 decode? A
Qwen3-shaped decode loop in plain JAX.

Greedy decoding of `--steps` tokens through a stack of Qwen3 layers (RMSNorm, q/k
RMSNorm, RoPE, grouped-query attention over a `[B, K, S, Dh]` KV cache as the model's,
SwiGLU). Two axes: `--projections` `separate` (seven matmuls a layer, as
`opdjax.models.decoder` computes them) or `merged` (one matmul for q, k and v and one for
gate and up: five a layer); `--attention` `einsum` (scores, a softmax and a weighted sum
over the whole cache), `onepass` (the softmax's normaliser and the weighted sum in one
reduction, divided after), `pallas` (the model's `attention.attend_range`: JAX's Pallas GPU
decode kernel, split over the cache and reading only the filled slots; interpreted off a
GPU) or `none` (the value passed
through, to size what attention costs). One JSON line per pair: milliseconds per step,
weight bandwidth, and the fraction of greedy tokens equal to the first pair's.

    python benchmarks/decode_fusion.py --batch 1 --dtype bfloat16            # GPU, Qwen3-0.6B
    python benchmarks/decode_fusion.py --layers 2 --hidden 256 --mlp 512 --heads 4 \
        --kv_heads 2 --head_dim 64 --vocab 512 --steps 64 --repeats 1        # CPU, small
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from _jsonl import emit  # benchmarks/ is the script's directory

from opdjax.models.attention import LayerCache, attend_range

PROJECTIONS = ("separate", "merged")
ATTENTIONS = ("einsum", "onepass", "pallas", "none")


def rms_norm(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def rope(x, position, head_dim):
  """x: [B, heads, D] at one position per row ([B])."""
  inv = 1.0 / (10000.0 ** (jnp.arange(0, head_dim, 2) / head_dim))
  angle = position[:, None, None].astype(jnp.float32) * inv  # [B, 1, D/2]
  cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, -1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def init(key, a, merged: bool, dtype):
  """One dict of weights per layer; merged layers hold `qkv` and `gate_up` instead."""
  q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
  shapes = dict(q=(a.hidden, q), k=(a.hidden, kv), v=(a.hidden, kv), o=(q, a.hidden))
  shapes.update(gate=(a.hidden, a.mlp), up=(a.hidden, a.mlp), down=(a.mlp, a.hidden))
  layers = []
  embed_key, *layer_keys = jax.random.split(key, a.layers + 1)
  for layer_key in layer_keys:
    keys = dict(zip(shapes, jax.random.split(layer_key, len(shapes))))
    w = {
        n: (jax.random.normal(keys[n], s) / math.sqrt(s[0])).astype(dtype)
        for n, s in shapes.items()
    }
    if merged:
      w["qkv"] = jnp.concatenate([w.pop("q"), w.pop("k"), w.pop("v")], 1)
      w["gate_up"] = jnp.concatenate([w.pop("gate"), w.pop("up")], 1)
    layers.append(w)
  embed = (jax.random.normal(embed_key, (a.vocab, a.hidden)) * 0.02).astype(dtype)
  return embed, layers


def attend(kind, q, k_cache, v_cache, position):
  """One query a row: q `[B, K, G, Dh]`, caches `[B, K, S, Dh]` written up to `position`
  (the same for every row). "pallas" is the model's own `attention.attend_range` (JAX's
  Pallas GPU kernel, interpreted off a GPU) over slots `[0, position]`."""
  if kind == "pallas":
    batch, kv_heads, group, head_dim = q.shape
    keys = k_cache.swapaxes(-1, -2)  # the model's cache keeps keys [B, K, Dh, S]
    cache = LayerCache(keys, v_cache, position[0], start=jnp.zeros((batch,), jnp.int32))
    out = attend_range(q.reshape(batch, 1, kv_heads * group, head_dim), cache)
    return out.reshape(q.shape)
  s = jnp.einsum("bkgd,bksd->bkgs", q, k_cache, preferred_element_type=jnp.float32)
  s = s * q.shape[-1] ** -0.5
  valid = (jnp.arange(k_cache.shape[2])[None, :] <= position[:, None])[:, None, None, :]
  if kind == "einsum":
    p = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), -1).astype(q.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", p, v_cache)
  m = jnp.max(jnp.where(valid, s, -jnp.inf), -1, keepdims=True)
  e = jnp.where(valid, jnp.exp(s - m), 0.0)
  out = jnp.einsum(
      "bkgs,bksd->bkgd", e.astype(q.dtype), v_cache, preferred_element_type=jnp.float32
  )
  return (out / jnp.sum(e, -1)[..., None]).astype(q.dtype)


def make_decode(a, projections: str, attention: str):
  q_size, kv_size = a.heads * a.head_dim, a.kv_heads * a.head_dim
  group = a.heads // a.kv_heads

  def layer(w, x, position, k_cache, v_cache):
    b = x.shape[0]
    h = rms_norm(x)
    if "qkv" in w:
      q, k, v = jnp.split(h @ w["qkv"], [q_size, q_size + kv_size], -1)
    else:
      q, k, v = h @ w["q"], h @ w["k"], h @ w["v"]
    q = rope(rms_norm(q.reshape(b, a.heads, a.head_dim)), position, a.head_dim)
    k = rope(rms_norm(k.reshape(b, a.kv_heads, a.head_dim)), position, a.head_dim)
    v = v.reshape(b, a.kv_heads, a.head_dim)
    rows = jnp.arange(b)
    k_cache = k_cache.at[rows, :, position].set(k)
    v_cache = v_cache.at[rows, :, position].set(v)
    if attention == "none":
      out = jnp.repeat(v, group, 1)
    else:
      qg = q.reshape(b, a.kv_heads, group, a.head_dim)
      out = attend(attention, qg, k_cache, v_cache, position)
    x = x + out.reshape(b, q_size) @ w["o"]
    h = rms_norm(x)
    if "gate_up" in w:
      gate, up = jnp.split(h @ w["gate_up"], 2, -1)
    else:
      gate, up = h @ w["gate"], h @ w["up"]
    return x + (jax.nn.silu(gate) * up) @ w["down"], k_cache, v_cache

  @jax.jit
  def decode(embed, layers, token, k_caches, v_caches):
    """The greedy tokens `[B, steps]`."""

    def step(s, carry):
      token, tokens, k_caches, v_caches = carry
      position = jnp.full(token.shape, s)
      x = embed[token]
      new_k, new_v = [], []
      for w, kc, vc in zip(layers, k_caches, v_caches):  # unrolled, as the model's layers
        x, kc, vc = layer(w, x, position, kc, vc)
        new_k.append(kc)
        new_v.append(vc)
      token = jnp.argmax(rms_norm(x) @ embed.T, -1).astype(token.dtype)
      return token, tokens.at[:, s].set(token), new_k, new_v

    tokens = jnp.zeros((token.shape[0], a.steps), token.dtype)
    return jax.lax.fori_loop(0, a.steps, step, (token, tokens, k_caches, v_caches))[1]

  return decode


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=128)
  parser.add_argument("--layers", type=int, default=28)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--mlp", type=int, default=3072)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=151_936)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=PROJECTIONS)
  parser.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
  a = parser.parse_args(argv)
  dtype = jnp.dtype(a.dtype)
  token = jnp.zeros((a.batch,), jnp.int32)
  cache = lambda: [jnp.zeros((a.batch, a.kv_heads, a.steps, a.head_dim), dtype)] * a.layers
  reference = None
  for projections in a.projections:
    embed, layers = init(jax.random.key(0), a, projections == "merged", dtype)
    for attention in a.attention:
      decode = make_decode(a, projections, attention)
      start = time.perf_counter()
      first = decode(embed, layers, token, cache(), cache()).block_until_ready()
      compile_s = time.perf_counter() - start
      times = []
      for _ in range(a.repeats):
        start = time.perf_counter()
        out = decode(embed, layers, token, cache(), cache()).block_until_ready()
        times.append(time.perf_counter() - start)
      assert np.array_equal(out, first), "the decode is not deterministic"
      reference = first if reference is None else reference
      weight_bytes = sum(x.nbytes for x in jax.tree.leaves((embed, layers)))
      step_s = float(np.median(times)) / a.steps
      emit(
          dict(
              benchmark="decode_fusion",
              projections=projections,
              attention=attention,
              device=jax.devices()[0].device_kind,
              dtype=a.dtype,
              batch=a.batch,
              layers=a.layers,
              hidden=a.hidden,
              vocab=a.vocab,
              steps=a.steps,
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              ms_per_step=round(step_s * 1e3, 4),
              weight_gb_per_s=round(weight_bytes / step_s / 1e9, 1),
              compile_plus_first_run_s=round(compile_s, 2),
              tokens_equal_to_first=float(np.mean(np.asarray(first) == np.asarray(reference))),
          ),
          a.out,
      )


if __name__ == "__main__":
  main()
