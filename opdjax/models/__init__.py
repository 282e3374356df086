"""Decoder models (Qwen3, Qwen2, Llama families) and Hugging Face interop."""

from opdjax.models.attention import KVCache
from opdjax.models.config import ModelConfig, tiny_config
from opdjax.models.decoder import Decoder, positions_from_mask, stack_layers, unstack_layers
from opdjax.models.hf import load_pretrained, load_tokenizer, read_config, save_pretrained
