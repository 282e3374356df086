"""Prompt datasets: records -> fixed-shape token arrays -> a deterministic grain stream.

A `PromptSet` holds, for N problems, left-padded prompts `[N, P]` and right-padded
reference answers (EOS appended) `[N, A]`, with masks. `batches(...)` is a grain
`MapDataset` (shuffled with a seed, repeated, batched); its iterator's `get_state()` is a
small dict that the trainer stores in every checkpoint, so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from opdjax.data import tasks
from opdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Record:
  prompt: str
  answer: str


@dataclasses.dataclass
class PromptSet:
  """Token arrays of N prompts and their reference answers (numpy, host memory)."""

  prompt_tokens: np.ndarray   # [N, P] int32, left-padded
  prompt_mask: np.ndarray     # [N, P] bool
  answer_tokens: np.ndarray   # [N, A] int32, right-padded, EOS after the answer
  answer_mask: np.ndarray     # [N, A] bool
  answers: list[str]          # the answer strings, for verification

  def __len__(self) -> int:
    return len(self.answers)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return dict(prompt_tokens=self.prompt_tokens[index], prompt_mask=self.prompt_mask[index],
                answer_tokens=self.answer_tokens[index], answer_mask=self.answer_mask[index],
                index=np.int32(index))


def encode(records: Sequence[Record], tokenizer, *, prompt_length: int,
           answer_length: int, source: str = "records") -> PromptSet:
  """Tokenizes records into fixed shapes; too-long prompts or answers raise with the index."""
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  n = len(records)
  prompt_tokens = np.full((n, prompt_length), pad, np.int32)
  prompt_mask = np.zeros((n, prompt_length), bool)
  answer_tokens = np.full((n, answer_length), pad, np.int32)
  answer_mask = np.zeros((n, answer_length), bool)
  for i, record in enumerate(records):
    prompt = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(record.answer, add_special_tokens=False)["input_ids"] + [eos]
    if not prompt:
      raise ConfigError(f"{source}[{i}]: empty prompt")
    if len(prompt) > prompt_length:
      raise ConfigError(f"{source}[{i}]: prompt has {len(prompt)} tokens, more than "
                       f"prompt_length={prompt_length}")
    if len(answer) > answer_length:
      raise ConfigError(f"{source}[{i}]: answer has {len(answer)} tokens with EOS, more than "
                       f"answer_length={answer_length}")
    prompt_tokens[i, prompt_length - len(prompt):] = prompt
    prompt_mask[i, prompt_length - len(prompt):] = True
    answer_tokens[i, :len(answer)] = answer
    answer_mask[i, :len(answer)] = True
  return PromptSet(prompt_tokens, prompt_mask, answer_tokens, answer_mask,
                   [r.answer for r in records])


def synthetic_records(task: str, *, difficulty: int, size: int, held_out: bool,
                      seed: int = 0) -> list[Record]:
  return [Record(p.prompt, p.answer) for p in
          tasks.split(task, difficulty=difficulty, size=size, held_out=held_out, seed=seed)]


def load_jsonl(path: str | Path, tokenizer=None) -> list[Record]:
  """Reads `{"prompt": str, "answer": str}` or `{"messages": [...], "answer": str}` lines.

  Chat messages are rendered with the tokenizer's chat template (generation prompt
  added). Errors name the file and line number.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"prompt file {path} does not exist")
  records = []
  with path.open() as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(item).__name__}")
      answer = item.get("answer", "")
      if not isinstance(answer, str):
        raise ConfigError(f"{where}: 'answer' must be a string, got {type(answer).__name__}")
      if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"]:
          raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
        prompt = item["prompt"]
      elif "messages" in item:
        messages = item["messages"]
        if (not isinstance(messages, list) or not messages or
            not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
          raise ConfigError(f"{where}: 'messages' must be a non-empty list of "
                           "{'role': ..., 'content': ...} objects")
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
          raise ConfigError(f"{where}: chat messages need a tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
      else:
        raise ConfigError(f"{where}: needs a 'prompt' or a 'messages' field, got keys {sorted(item)}")
      records.append(Record(prompt, answer))
  if not records:
    raise ConfigError(f"{path} holds no records")
  return records


def batches(prompts: PromptSet, *, batch_size: int, seed: int) -> grain.MapDataset:
  """Shuffled (per epoch, by `seed`), repeated, batched stream of `PromptSet` rows."""
  if batch_size > len(prompts):
    raise ConfigError(f"batch_size {batch_size} is larger than the dataset ({len(prompts)} rows)")
  return (grain.MapDataset.source(prompts).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True))
