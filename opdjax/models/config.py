"""`ModelConfig`: the decoder's hyperparameters, read from and written to HF `config.json`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from opdjax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyperparameters (frozen and hashable, so it can be a static jit argument).

  Covers the Qwen3 family (q/k RMSNorm, no biases), Qwen2 (q/k/v biases) and Llama 2/3.x
  (optional attention/MLP biases, llama3 RoPE scaling); all use RMSNorm, RoPE, grouped-query
  attention and a SwiGLU MLP.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  model_type: str = "qwen3"
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = True
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
      )
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(
          f"unsupported rope_type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
      )
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    ):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention"
      )
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

  def inverse_frequencies(self) -> np.ndarray:
    """RoPE inverse frequencies `[head_dim // 2]` (float32), with the config's scaling."""
    exponents = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32) / self.head_dim
    inv_freq = (1.0 / (self.rope_theta**exponents)).astype(np.float32)
    if self.rope_type == "linear":
      inv_freq = inv_freq / self.rope_factor
    elif self.rope_type == "llama3":
      old = self.rope_original_max_position_embeddings
      low_wavelen = old / self.rope_low_freq_factor
      high_wavelen = old / self.rope_high_freq_factor
      wavelen = 2 * math.pi / inv_freq
      scaled = np.where(wavelen > low_wavelen, inv_freq / self.rope_factor, inv_freq)
      smooth = (old / wavelen - self.rope_low_freq_factor) / (
          self.rope_high_freq_factor - self.rope_low_freq_factor
      )
      smoothed = (1 - smooth) * scaled / self.rope_factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq

  # ------------------------------------------------------------ Hugging Face config.json

  @classmethod
  def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
    """Builds a config from a Hugging Face `config.json` dict (transformers v4 or v5 keys)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"{source}: unsupported architecture model_type={model_type!r} "
          f"(architectures={hf.get('architectures')}); supported: "
          f"{SUPPORTED_MODEL_TYPES}"
      )
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("use_sliding_window"):
      raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    # v5 keeps RoPE settings in rope_parameters; v4 in rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:
      rope = dict(hf.get("rope_scaling") or {})
      rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(
          f"{source}: rope_type={rope_type!r} is not supported; supported: "
          f"{SUPPORTED_ROPE_TYPES}"
      )
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    attention_bias = bool(hf.get("attention_bias", False))
    return cls(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", 8192)
        ),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
    )

  def to_hf(self, *, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict that `transformers` (v5) loads into the same architecture."""
    rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type in ("linear", "llama3"):
      rope["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rope.update(
          low_freq_factor=self.rope_low_freq_factor,
          high_freq_factor=self.rope_high_freq_factor,
          original_max_position_embeddings=self.rope_original_max_position_embeddings,
      )
    eos = (
        None
        if not self.eos_token_ids
        else (self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids))
    )
    hf = {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "rope_parameters": rope,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
        "dtype": dtype,
    }
    if self.model_type == "llama":
      hf["attention_bias"] = self.qkv_bias
      hf["mlp_bias"] = self.mlp_bias
    elif self.model_type == "qwen3":
      hf["attention_bias"] = self.qkv_bias
    return hf


def tiny_config(model_type: str = "qwen3", **overrides) -> ModelConfig:
  """A few-layer model for tests and the synthetic CPU experiments (vocab of tens)."""
  base = dict(
      vocab_size=48,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      model_type=model_type,
      qk_norm=model_type == "qwen3",
      qkv_bias=model_type == "qwen2",
      max_position_embeddings=512,
  )
  base.update(overrides)
  return ModelConfig(**base)
