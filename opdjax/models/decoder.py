"""A Flax NNX decoder for the Qwen3, Qwen2 and Llama families, with a KV cache.

Shapes: `B` batch, `T` new tokens, `S` cache slots, `D` model width, `H`/`K` query/key-value
heads, `Dh` head dim, `V` vocabulary. The cache, its padding scheme and the attention
kernels are in `opdjax.models.attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from opdjax import sharding
from opdjax.models.attention import (
    ATTENTION_IMPLEMENTATIONS,
    KVCache,
    LayerCache,
    attend,
    attend_one,
)
from opdjax.models.config import ModelConfig
from opdjax.models.splash import splash_attention


class RMSNorm(nnx.Module):
  """`x / sqrt(mean(x²) + ε) · w`, statistics in float32, as Hugging Face computes it."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype=None):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype or dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(config: ModelConfig, positions: jax.Array, dtype):
  """`(cos, sin)` of shape `[B, T, Dh]` for integer `positions [B, T]`."""
  inv_freq = jnp.asarray(config.inverse_frequencies())
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x [B, T, heads, Dh]` (the "rotate half" layout of HF checkpoints)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _linear(din: int, dout: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      din,
      dout,
      use_bias=bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.initializers.normal(0.02),
      rngs=rngs,
  )


class _Fused(nnx.Module):
  """Several projections of one input as one matmul: `kernel [D, *out]`, `bias [*out]`, in
  the compute dtype (`Attention.fuse_projections`, `MLP.fuse_projections`)."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None):
    self.kernel = nnx.Param(kernel)
    self.bias = None if bias is None else nnx.Param(bias)

  def __call__(self, spec: str, x: jax.Array) -> jax.Array:
    """`einsum(spec, x, kernel) + bias` in the kernel's dtype; `spec`'s last operand and
    output letters name the kernel's and output's axes (`"btd,dji->btji"`)."""
    kernel = self.kernel[...]
    y = jnp.einsum(spec, x.astype(kernel.dtype), kernel)
    return y if self.bias is None else y + self.bias[...]


class Attention(nnx.Module):
  """Grouped-query attention with RoPE and optional q/k RMSNorm (Qwen3)."""

  def __init__(
      self,
      config: ModelConfig,
      *,
      dtype,
      param_dtype,
      rngs: nnx.Rngs,
      implementation: str = "auto",
      mesh=None,
  ):
    c = config
    if implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
          f"got {implementation!r}"
      )
    self.implementation = implementation
    self.mesh = mesh if implementation == "splash" else None  # the kernel's shard_map mesh
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.q_proj = _linear(
        c.hidden_size,
        c.num_heads * c.head_dim,
        bias=c.qkv_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.k_proj = _linear(
        c.hidden_size,
        c.num_kv_heads * c.head_dim,
        bias=c.qkv_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.v_proj = _linear(
        c.hidden_size,
        c.num_kv_heads * c.head_dim,
        bias=c.qkv_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.o_proj = _linear(
        c.num_heads * c.head_dim,
        c.hidden_size,
        bias=c.o_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    if c.qk_norm:
      self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
      self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None
    self.qkv = nnx.data(None)  # set by `fuse_projections`

  def fuse_projections(self) -> None:
    """Replaces the q, k and v matmuls by one, in place (the sampler's layout; see
    `Decoder.fuse_projections`): the separate projections are dropped from the module.

    `qkv.kernel` is `[..., D, K, G + 2, Dh]`: for each key-value head, the G query heads
    that read it, then its key and its value. Grouped by key-value head, a "tensor" sharding
    of K keeps each device's q, k and v on it, and slicing them apart is local.
    """
    dtype = self.q_proj.dtype
    parts = ((self.q_proj, self.num_heads // self.num_kv_heads), (self.k_proj, 1), (self.v_proj, 1))
    grouped = lambda x, n: x.reshape(x.shape[:-1] + (self.num_kv_heads, n, self.head_dim))
    merge = lambda name: jnp.concatenate(
        [grouped(getattr(p, name)[...], n).astype(dtype) for p, n in parts], axis=-2
    )
    self.qkv = _Fused(merge("kernel"), merge("bias") if self.q_proj.use_bias else None)
    self.q_proj = self.k_proj = self.v_proj = nnx.data(None)

  def _project(self, x):
    """`x [B, T, D]` -> q `[B, T, H, Dh]`, k and v `[B, T, K, Dh]`."""
    batch, length, _ = x.shape
    if self.qkv is None:
      q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
      k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
      v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
      return q, k, v
    qkv = self.qkv("btd,dkjh->btkjh", x)
    group = self.num_heads // self.num_kv_heads
    q = qkv[..., :group, :].reshape(batch, length, self.num_heads, self.head_dim)
    return q, qkv[..., group, :], qkv[..., group + 1, :]

  def __call__(self, x, cos, sin, mask, cache: LayerCache | None = None):
    """x `[B, T, D]`, mask `[B, T, S]` -> `(out [B, T, D], cache)`; with a `cache`, the new
    keys and values are written at its index and attention reads the cache. Without one
    the mask is causal (token t attends no later token; `Decoder.hidden_states`), which
    lets XLA's attention skip keys (`attention.attend_causal_groups`)."""
    batch, length, _ = x.shape
    q, k, v = self._project(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
      if self.implementation == "splash":  # the mask is causal & valid: valid is its diagonal
        out = splash_attention(q, k, v, jnp.diagonal(mask, axis1=1, axis2=2), mesh=self.mesh)
      else:
        out = attend(q, k, v, mask, implementation=self.implementation, causal=True)
      return self.o_proj(out.reshape(batch, length, -1).astype(x.dtype)), cache
    cache = cache.write(k, v)
    if length == 1:  # a decode step
      out = attend_one(q, cache, mask)
    else:  # a prefill: once per generation, so the cache's transposes cost little
      k, v = cache.read()  # [B, K, Dh, S], [B, K, S, Dh]
      k, v = k.transpose(0, 3, 1, 2).astype(q.dtype), v.swapaxes(1, 2).astype(q.dtype)
      out = attend(q, k, v, mask, implementation=self.implementation)
    return self.o_proj(out.reshape(batch, length, -1).astype(x.dtype)), cache


class MLP(nnx.Module):
  """SwiGLU: `down(silu(gate(x)) · up(x))`."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    self.gate_proj = _linear(
        c.hidden_size,
        c.intermediate_size,
        bias=c.mlp_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.up_proj = _linear(
        c.hidden_size,
        c.intermediate_size,
        bias=c.mlp_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.down_proj = _linear(
        c.intermediate_size,
        c.hidden_size,
        bias=c.mlp_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.gate_up = nnx.data(None)  # set by `fuse_projections`

  def fuse_projections(self) -> None:
    """Replaces the gate and up matmuls by one, in place (the separate ones are dropped):
    `gate_up.kernel` is `[..., D, 2, I]` (a "tensor" sharding of I stays whole)."""
    dtype = self.gate_proj.dtype
    merge = lambda name: jnp.stack(
        [getattr(p, name)[...].astype(dtype) for p in (self.gate_proj, self.up_proj)], axis=-2
    )
    self.gate_up = _Fused(merge("kernel"), merge("bias") if self.gate_proj.use_bias else None)
    self.gate_proj = self.up_proj = nnx.data(None)

  def __call__(self, x):
    if self.gate_up is None:
      gate, up = self.gate_proj(x), self.up_proj(x)
    else:
      gate_up = self.gate_up("btd,dji->btji", x)
      gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: attention then MLP."""

  def __init__(
      self,
      config: ModelConfig,
      *,
      dtype,
      param_dtype,
      rngs: nnx.Rngs,
      attention: str = "auto",
      mesh=None,
  ):
    self.input_norm = RMSNorm(
        config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.attn = Attention(
        config,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        implementation=attention,
        mesh=mesh,
    )
    self.post_attention_norm = RMSNorm(
        config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, mask, cache: LayerCache | None = None):
    attn_out, cache = self.attn(self.input_norm(x), cos, sin, mask, cache)
    x = x + attn_out
    return x + self.mlp(self.post_attention_norm(x)), cache


REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each layer in backward
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections
}
REMAT_SETTINGS = ("auto", *REMAT_POLICIES)  # auto: `remat_policy_name`


def remat_policy_name(remat: str, *, scan_layers: bool) -> str:
  """The `REMAT_POLICIES` name for setting `remat`, where "auto" is "save_dots" for
  scanned layers and "none" per-layer.

  A scan's backward reads every intermediate it kept from the forward loop as a stacked
  residual, elementwise ones included, which XLA cannot fuse away across the loop as it
  does per-layer: the gradient of an 8-layer, hidden-512 model over 256 tokens holds
  207 MB of temporaries scanned against 93 MB per-layer in float32 (303 against 123 MB in
  bfloat16) and runs 1.3–1.5× slower on a CPU (`benchmarks/layer_layouts.py`). Keeping
  only the matmuls' outputs and recomputing the rest ("save_dots") makes it 69 MB (66 MB)
  at 1.1–1.2× per-layer's time; at Qwen3-0.6B's shape the scanned update with "save_dots"
  is faster than per-layer (22.0 against 23.9 s; with "none" 29.4 s) and holds 4.9 GB of
  temporaries (7.2 GB; 9.3 GB). Per-layer, "none" is as small and as fast as "save_dots".
  """
  if remat not in REMAT_SETTINGS:
    raise ValueError(f"remat must be one of {REMAT_SETTINGS}, got {remat!r}")
  if remat == "auto":
    return "save_dots" if scan_layers else "none"
  return remat


def _layer_fn(graphdef, remat: str):
  """`(state, x, cos, sin, mask, cache) -> (x, cache)` for one layer, rematerialised per
  `remat` (a `REMAT_POLICIES` name)."""

  def apply(state, x, cos, sin, mask, cache):
    return nnx.merge(graphdef, state)(x, cos, sin, mask, cache)

  if remat == "none":
    return apply
  return jax.checkpoint(apply, policy=REMAT_POLICIES[remat])


class Decoder(nnx.Module):
  """Causal language model: embeddings, `num_layers` blocks, final norm, LM head.

  `model(tokens, positions=None, attention_mask=None) -> logits [B, T, V]` (float32).
  For padded batches pass `attention_mask [B, T]` (True/1 on real tokens); positions then
  default to each row's count of real tokens before it, which is exact for left and right
  padding. `hidden_states` + `logits_from_hidden` split the call for losses computed from
  hidden states; `prefill` + `decode` run the same weights through a `KVCache`.
  `attention` picks the attention kernel (`attend`: "auto", "xla" or "cudnn"; or "splash",
  Pallas's TPU kernel for full sequences, `splash.splash_attention`, sharded on `mesh`).
  `scan_layers=True` stores the layers' parameters stacked (`layers/attn/q_proj/kernel` is
  `[L, D, H·Dh]`) and runs them with one `lax.scan`, so compile time and program size do
  not grow with depth; `stack_layers`/`unstack_layers` convert states between the layouts
  (HF files and `save_pretrained` use the per-layer one). `remat` ("none", "full",
  "save_dots") rematerialises each layer in the backward pass (`REMAT_POLICIES`); "auto",
  the default, is "save_dots" for scanned layers and "none" per-layer
  (`remat_policy_name`).
  Parameters are stored in `param_dtype` (default `dtype`) and the computation runs in
  `dtype`: float32 master weights with bfloat16 compute is `param_dtype=jnp.float32,
  dtype=jnp.bfloat16`. RMSNorm statistics, attention softmax and logits are float32.
  """

  def __init__(
      self,
      config: ModelConfig,
      *,
      dtype=jnp.float32,
      param_dtype=None,
      rngs: nnx.Rngs,
      attention: str = "auto",
      scan_layers: bool = False,
      remat: str = "auto",
      mesh=None,
  ):
    self.config = config
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat = remat_policy_name(remat, scan_layers=scan_layers)
    # The residual stream's rows split over the mesh's data axes between layers (`_rows`).
    self.row_sharding = (
        None if mesh is None or mesh.devices.size == 1 else sharding.batch_sharding(mesh)
    )
    param_dtype = param_dtype or dtype
    self.embed = nnx.Embed(
        config.vocab_size,
        config.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )
    make_layer = lambda rngs: DecoderLayer(
        config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention, mesh=mesh
    )
    if scan_layers:
      self.layers = nnx.split_rngs(splits=config.num_layers)(
          nnx.vmap(make_layer, in_axes=0, out_axes=0)
      )(rngs)
    else:
      self.layers = nnx.List([make_layer(rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(
        config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.lm_head = (
        None
        if config.tie_word_embeddings
        else _linear(
            config.hidden_size,
            config.vocab_size,
            bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    )

  # ------------------------------------------------------------ full-sequence path

  def __call__(self, tokens, *, positions=None, attention_mask=None) -> jax.Array:
    return self.logits_from_hidden(
        self.hidden_states(tokens, positions=positions, attention_mask=attention_mask)
    )

  def hidden_states(self, tokens, *, positions=None, attention_mask=None) -> jax.Array:
    """Final (normed) hidden states `[B, T, D]` without the LM head."""
    tokens, attention_mask, positions = _prepare(tokens, attention_mask, positions)
    length = tokens.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None] & attention_mask[:, None, :]
    return self._run(tokens, positions, mask)

  def head_kernel(self) -> jax.Array:
    """The LM head as a `[D, V]` matrix in the compute dtype (the embedding transposed when
    tied)."""
    if self.lm_head is None:
      return self.embed.embedding[...].T.astype(self.dtype)
    return self.lm_head.kernel[...].astype(self.dtype)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """LM head: `[..., D] -> [..., V]` float32 logits (tied or untied)."""
    return jnp.einsum(
        "...d,dv->...v", hidden, self.head_kernel(), preferred_element_type=jnp.float32
    )

  # ------------------------------------------------------------ cached path

  def fuse_projections(self) -> None:
    """The sampler's layout, in place: each layer's q, k and v projections become one
    matmul, and its gate and up projections another (`Attention.fuse_projections`,
    `MLP.fuse_projections`), and every matmul weight is cast to the compute dtype once.

    A batch-1 decode step is a chain of small matrix-vector products, each too short to
    reach the memory bandwidth: on an H200, five a layer instead of seven make a
    Qwen3-0.6B-shaped decode 1.3× faster (`benchmarks/decode_fusion.py`). The cast moves
    the per-step cast of float32 master weights out of the loop; it is the one each matmul
    applied anyway, so it changes no result. Call it on a copy that only decodes (the
    sampler calls it inside its jitted function): the fused weights are an extra copy of
    five of a layer's seven matrices, and training reads the separate ones, which the copy
    no longer holds.
    """
    layers = [self.layers] if self.scan_layers else list(self.layers)
    for layer in layers:  # a scanned model's one module holds every layer's weights
      layer.attn.fuse_projections()
      layer.mlp.fuse_projections()
      for linear in (layer.attn.o_proj, layer.mlp.down_proj):
        linear.kernel.set_value(linear.kernel[...].astype(linear.dtype))
    self.embed.embedding.set_value(self.embed.embedding[...].astype(self.dtype))
    if self.lm_head is not None:
      self.lm_head.kernel.set_value(self.lm_head.kernel[...].astype(self.dtype))

  def unroll_layers(self) -> None:
    """A scanned model's layers as one module each, in place (a per-layer model is left
    as it is); the weights are sliced out of the stack once.

    The sampler's layout on a CPU: there XLA copies each layer's weights out of the stack
    in every step of a scanned decode loop (the slice is not fused into the matrix
    products), which made batch-1 sampling about half as fast as per-layer. Call it on a
    copy that only samples (the sampler calls it inside its jitted function): the slices
    are a second copy of the layers' weights, and the decode step compiles per layer.
    """
    if not self.scan_layers:
      return
    graphdef, state = nnx.split(self.layers)
    layer = lambda i: nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))
    self.layers = nnx.List([layer(i) for i in range(self.config.num_layers)])
    self.scan_layers = False
    self.remat = "none"  # the copy only samples: nothing to recompute

  def init_cache(self, batch_size: int, max_length: int) -> KVCache:
    return KVCache.create(self.config, batch_size, max_length, self.dtype, stacked=self.scan_layers)

  def prefill(self, tokens, positions, cache: KVCache, *, token_mask=None, logits_at=None):
    """Runs `tokens [B, T]` through the model, writing slots `[index, index+T)` of `cache`.

    Args:
      tokens: `[B, T]` ids.
      positions: `[B, T]` RoPE positions of each token in its own row.
      cache: the cache to extend (`cache.index + T ≤ cache.max_length`).
      token_mask: `[B, T]` True on real tokens (padding is written but never attended).
      logits_at: optional `[B]` int, the one position (in `[0, T)`) of each row whose
        logits are wanted, such as each row's last real prompt token. The LM head then runs
        on B positions instead of B·T.

    Returns:
      `(logits, updated cache)`: logits `[B, T, V]` float32, or `[B, V]` with `logits_at`.
    """
    tokens = jnp.asarray(tokens)
    token_mask = (
        jnp.ones(tokens.shape, bool) if token_mask is None else jnp.asarray(token_mask, bool)
    )
    length = tokens.shape[1]
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_mask, cache.index, axis=1)
    query_slots = cache.index + jnp.arange(length)
    causal = jnp.arange(cache.max_length)[None, :] <= query_slots[:, None]  # [T, S]
    mask = causal[None] & valid[:, None, :]
    hidden, keys, values = self._run(tokens, jnp.asarray(positions), mask, cache)
    cache = cache._replace(keys=keys, values=values, valid=valid, index=cache.index + length)
    if logits_at is not None:
      hidden = jnp.take_along_axis(hidden, jnp.asarray(logits_at)[:, None, None], axis=1)[:, 0]
    return self.logits_from_hidden(hidden), cache

  def decode(self, tokens, positions, cache: KVCache, *, active=None):
    """One step: `tokens [B]` at `positions [B]` -> `(logits [B, V], cache)`.

    `active [B]` False marks rows whose token is padding (finished rows).
    """
    tokens = jnp.asarray(tokens)[:, None]
    token_mask = None if active is None else jnp.asarray(active, bool)[:, None]
    return self.prefill(
        tokens,
        jnp.asarray(positions)[:, None],
        cache,
        token_mask=token_mask,
        logits_at=jnp.zeros(tokens.shape[:1], jnp.int32),
    )

  # ------------------------------------------------------------ shared body

  def _run(self, tokens, positions, mask, cache: KVCache | None = None):
    """Hidden states `[B, T, D]`; with a `cache`, also its keys and values with the tokens'
    written at `cache.index`."""
    x = self._rows(self.embed(tokens))
    cos, sin = rope_tables(self.config, positions, x.dtype)
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      layer = _layer_fn(graphdef, self.remat)
      if cache is None:

        def forward(x, layer_state):
          x, _ = layer(layer_state, x, cos, sin, mask, None)
          return self._rows(x), None

        x, _ = jax.lax.scan(forward, x, state)
        return self.final_norm(x)

      def body(carry, layer_state):  # the stacked cache is carried, each layer writes its row
        x, layer_cache = carry
        x, layer_cache = layer(layer_state, x, cos, sin, mask, layer_cache)
        return (self._rows(x), layer_cache._replace(layer=layer_cache.layer + 1)), None

      start = LayerCache(
          cache.keys, cache.values, cache.index, layer=jnp.zeros((), jnp.int32), start=cache.start
      )
      (x, written), _ = jax.lax.scan(body, (x, start), state)
      return self.final_norm(x), written.keys, written.values
    keys, values = [], []
    for i, module in enumerate(self.layers):
      layer_cache = (
          None
          if cache is None
          else LayerCache(cache.keys[i], cache.values[i], cache.index, start=cache.start)
      )
      if self.remat == "none":
        x, layer_cache = module(x, cos, sin, mask, layer_cache)
      else:
        graphdef, state = nnx.split(module)
        x, layer_cache = _layer_fn(graphdef, self.remat)(state, x, cos, sin, mask, layer_cache)
      x = self._rows(x)
      if layer_cache is not None:
        keys.append(layer_cache.keys)
        values.append(layer_cache.values)
    hidden = self.final_norm(x)
    return hidden if cache is None else (hidden, tuple(keys), tuple(values))

  def _rows(self, x: jax.Array) -> jax.Array:
    """`x [B, ...]` with its rows split as the batch is (`sharding.batch_sharding`), on a
    model built for a mesh of several devices.

    Without it XLA propagates the FSDP weights' sharding (their hidden dimension split over
    `fsdp`) into the activations: each device then computed every row of the batch with a
    slice of the hidden dimension, holding the whole batch's activations (a Qwen3-1.7B step
    of 64 rows × 2,560 tokens on 8 devices: 305 GB of temporaries per device, 66.9 GB with
    the constraint; `benchmarks/data_parallel.py`), where splitting the rows and gathering
    each layer's weights is FSDP."""
    if self.row_sharding is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.row_sharding)


def shared_layer_path(path: tuple) -> tuple:
  """A state path without its layer index: `("layers", i, *rest)` (per-layer) becomes
  `("layers", *rest)`, the path of the scanned layout's stacked entry; others are kept."""
  if len(path) > 2 and path[0] == "layers" and isinstance(path[1], int):
    return ("layers",) + tuple(path[2:])
  return tuple(path)


def stack_layers(state):
  """A per-layer NNX state (`layers/{i}/...`) in the scanned layout (`layers/...` with a
  leading layer axis). Other entries pass through."""
  groups, rest = {}, []
  for path, variable in nnx.to_flat_state(state):
    if shared_layer_path(path) != tuple(path):
      groups.setdefault(shared_layer_path(path), []).append((path[1], variable))
    else:
      rest.append((path, variable))
  stacked = [
      (
          path,
          parts[0][1].replace(
              jnp.stack([v.get_value() for _, v in sorted(parts, key=lambda p: p[0])])
          ),
      )
      for path, parts in groups.items()
  ]
  return nnx.from_flat_state(rest + stacked)


def unstack_layers(state):
  """The inverse of `stack_layers`: a scanned state in the per-layer layout."""
  out = []
  for path, variable in nnx.to_flat_state(state):
    if len(path) > 1 and path[0] == "layers" and not isinstance(path[1], int):
      value = variable.get_value()
      out += [
          (("layers", i) + tuple(path[1:]), variable.replace(value[i]))
          for i in range(value.shape[0])
      ]
    else:
      out.append((path, variable))
  return nnx.from_flat_state(out)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Per-row positions `[B, T]`: the number of real tokens before each slot (0 on padding)."""
  attention_mask = jnp.asarray(attention_mask, bool)
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _prepare(tokens, attention_mask, positions):
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
        f"tokens must be integer ids of shape [B, T], got {tokens.dtype} {tokens.shape}"
    )
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, bool)
  attention_mask = jnp.asarray(attention_mask, bool)
  if attention_mask.shape != tokens.shape:
    raise ValueError(f"attention_mask {attention_mask.shape} must match tokens {tokens.shape}")
  if positions is None:
    positions = positions_from_mask(attention_mask)
  positions = jnp.asarray(positions)
  if positions.shape != tokens.shape:
    raise ValueError(f"positions {positions.shape} must match tokens {tokens.shape}")
  return tokens, attention_mask, positions
