"""The built-in character tokenizer of the synthetic tasks.

Built with the `tokenizers` library and wrapped as a `transformers` fast tokenizer, so the
synthetic tasks and real Hugging Face data go through one code path (`tokenizer(text)`,
`tokenizer.decode`, `save_pretrained`).
"""

from __future__ import annotations

import functools

CHARACTERS = "0123456789+-*%=,:;>?abcdefghijklmnopqrstuvwxyz "
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


@functools.lru_cache(maxsize=1)
def char_tokenizer():
  """A `PreTrainedTokenizerFast` with one token per character (pad 0, eos 1, bos 2)."""
  import transformers
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
  for char in CHARACTERS:
    vocab[char] = len(vocab)
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tokenizer.decoder = decoders.Fuse()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer,
      pad_token="<pad>",
      eos_token="<eos>",
      bos_token="<bos>",
      unk_token="<unk>",
  )
  fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
  return fast
