"""Tiny random Hugging Face checkpoints built with `transformers` itself (PyTorch, CPU)."""

import numpy as np
import torch
import transformers

VOCAB = 40


def build_hf_model(kind: str, seed: int = 0):
  """A tiny random `transformers` causal LM; norms and biases are perturbed so they matter."""
  torch.manual_seed(seed)
  common = dict(
      vocab_size=VOCAB,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=256,
  )
  if kind == "qwen3":  # tied embeddings, q/k norm, head_dim != hidden/heads
    config = transformers.Qwen3Config(
        num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, **common
    )
    model = transformers.Qwen3ForCausalLM(config)
  elif kind == "llama":  # untied, GQA with one KV head, llama3 RoPE scaling
    config = transformers.LlamaConfig(
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **common,
    )
    model = transformers.LlamaForCausalLM(config)
  elif kind == "qwen2":  # q/k/v biases
    config = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    model = transformers.Qwen2ForCausalLM(config)
  else:
    raise ValueError(kind)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name or "bias" in name:
        param.add_(0.2 * torch.randn_like(param))
  return model.eval()


def padded_batch(seed: int = 0):
  """Tokens `[4, 11]` with a full row, a left-padded, a right-padded and a short row."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, VOCAB, (4, 11))
  mask = np.ones((4, 11), bool)
  mask[1, :4] = False
  mask[2, 7:] = False
  mask[3, :2] = False
  mask[3, 6:] = False
  return tokens, mask


def hf_logits(model, tokens, mask):
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return (
        model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
        .logits.float()
        .numpy()
    )


def save_tiny_tokenizer(directory, num_tokens: int = VOCAB):
  """A word-level fast tokenizer of `num_tokens` entries with a chat template."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
  vocab.update({f"w{i}": i for i in range(3, num_tokens)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
  )
  fast.chat_template = (
      "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
      "{% if add_generation_prompt %}assistant {% endif %}"
  )
  fast.save_pretrained(str(directory))
  return fast
