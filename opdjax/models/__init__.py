"""Decoder models (Qwen3, Qwen2, Llama families) and Hugging Face interop."""

from opdjax.models.config import ModelConfig
from opdjax.models.config import tiny_config
from opdjax.models.decoder import Decoder
from opdjax.models.decoder import KVCache
from opdjax.models.decoder import positions_from_mask
from opdjax.models.decoder import stack_layers
from opdjax.models.decoder import unstack_layers
from opdjax.models.hf import load_pretrained
from opdjax.models.hf import load_tokenizer
from opdjax.models.hf import read_config
from opdjax.models.hf import save_pretrained
