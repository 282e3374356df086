"""Prompt datasets: records -> fixed-shape token arrays -> a deterministic grain stream.

A `PromptSet` holds, for N problems, left-padded prompts `[N, P]` and right-padded
reference answers (EOS appended) `[N, A]`, with masks; a `PromptSource` holds the records
and tokenises a row when it is read. `batches(...)` is a grain `MapDataset` (shuffled with
a seed, repeated, batched, and cut into one block of rows per process), and `stream(...)`
iterates it a few batches ahead of the trainer; the iterator's `get_state()` is a small
dict that the trainer stores in every checkpoint, so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import grain
import numpy as np
from etils import epath

from opdjax.data import tasks
from opdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Record:
  prompt: str
  answer: str
  teacher: str = ""  # the teacher that scores this example, when a run routes between several


@dataclasses.dataclass
class PromptSet:
  """Token arrays of N prompts and their reference answers (numpy, host memory)."""

  prompt_tokens: np.ndarray  # [N, P] int32, left-padded
  prompt_mask: np.ndarray  # [N, P] bool
  answer_tokens: np.ndarray  # [N, A] int32, right-padded, EOS after the answer
  answer_mask: np.ndarray  # [N, A] bool
  answers: list[str]  # the answer strings, for verification
  route: np.ndarray | None = None  # [N] int32 teacher index of each row (several teachers)
  privileged_tokens: np.ndarray | None = None  # [N, P'] int32 self-distillation teacher's
  privileged_mask: np.ndarray | None = None  # [N, P'] bool   prompt, left-padded

  def __len__(self) -> int:
    return len(self.answers)

  def routed_to(self, route: int) -> "PromptSet":
    """The rows whose teacher is `route` (all rows without routing and route 0)."""
    keep = np.ones(len(self), bool) if self.route is None else self.route == route
    rows = lambda x: None if x is None else x[keep]
    return PromptSet(
        self.prompt_tokens[keep],
        self.prompt_mask[keep],
        self.answer_tokens[keep],
        self.answer_mask[keep],
        [a for a, k in zip(self.answers, keep) if k],
        rows(self.route),
        rows(self.privileged_tokens),
        rows(self.privileged_mask),
    )

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return dict(
        prompt_tokens=self.prompt_tokens[index],
        prompt_mask=self.prompt_mask[index],
        answer_tokens=self.answer_tokens[index],
        answer_mask=self.answer_mask[index],
        index=np.int32(index),
        route=np.int32(0 if self.route is None else self.route[index]),
    )


def _route(record: Record, index: int, routes: Sequence[str] | None, source: str) -> int:
  """The index in `routes` of the teacher `record` names (0 without routing)."""
  if routes is None:
    return 0
  name = getattr(record, "teacher", "")
  if not name:
    raise ConfigError(
        f"{source}[{index}]: no 'teacher' field; with several teachers every "
        f"example names one of {list(routes)}"
    )
  if name not in routes:
    raise ConfigError(
        f"{source}[{index}]: teacher {name!r} is not one of the configured "
        f"teachers {list(routes)}"
    )
  return routes.index(name)


def _encode_one(
    record: Record,
    index: int,
    tokenizer,
    *,
    prompt_length: int,
    answer_length: int,
    source: str,
    routes: Sequence[str] | None = None,
    privileged: tuple[str, int] | None = None,
) -> dict[str, np.ndarray]:
  """One record as a left-padded prompt and a right-padded answer (EOS appended), and the
  index of its teacher in `routes`; an empty or too-long prompt or answer, or a missing or
  unknown teacher name, raises with the record's index."""
  route = _route(record, index, routes, source)
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  prompt = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
  answer = tokenizer(record.answer, add_special_tokens=False)["input_ids"] + [eos]
  if not prompt:
    raise ConfigError(f"{source}[{index}]: empty prompt")
  if len(prompt) > prompt_length:
    raise ConfigError(
        f"{source}[{index}]: prompt has {len(prompt)} tokens, more than "
        f"prompt_length={prompt_length}"
    )
  if len(answer) > answer_length:
    raise ConfigError(
        f"{source}[{index}]: answer has {len(answer)} tokens with EOS, more than "
        f"answer_length={answer_length}"
    )
  row = dict(
      prompt_tokens=np.full(prompt_length, pad, np.int32),
      prompt_mask=np.zeros(prompt_length, bool),
      answer_tokens=np.full(answer_length, pad, np.int32),
      answer_mask=np.zeros(answer_length, bool),
      index=np.int32(index),
      route=np.int32(route),
  )
  row["prompt_tokens"][prompt_length - len(prompt) :] = prompt
  row["prompt_mask"][prompt_length - len(prompt) :] = True
  row["answer_tokens"][: len(answer)] = answer
  row["answer_mask"][: len(answer)] = True
  if privileged:  # self-distillation: the teacher's prompt, with the privileged context
    template, length = privileged
    text = template.format(prompt=record.prompt, answer=record.answer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > length:
      raise ConfigError(
          f"{source}[{index}]: the privileged prompt has {len(ids)} tokens, more "
          f"than recipe.privileged_length={length}"
      )
    row["privileged_tokens"] = np.full(length, pad, np.int32)
    row["privileged_mask"] = np.zeros(length, bool)
    row["privileged_tokens"][length - len(ids) :] = ids
    row["privileged_mask"][length - len(ids) :] = True
  return row


class PromptSource:
  """Records tokenised when read: a grain random-access source of `PromptSet`-like rows.

  A process of a multi-host run reads (so tokenises) only the rows of its share of each batch. With
  `privileged=(template, length)` each row also holds the self-distillation teacher's prompt,
  `template.format(prompt=..., answer=...)` left-padded to `length`. `check(rows)` tokenises rows up
  front, so a bad record stops the run at start-up instead of at the step that first draws it.
  """

  def __init__(
      self,
      records: Sequence[Record],
      tokenizer,
      *,
      prompt_length: int,
      answer_length: int,
      source: str = "records",
      routes: Sequence[str] | None = None,
      privileged: tuple[str, int] | None = None,
  ):
    self.records = list(records)
    self.answers = [r.answer for r in self.records]
    self._encode = lambda i: _encode_one(
        self.records[i],
        i,
        tokenizer,
        source=source,
        prompt_length=prompt_length,
        answer_length=answer_length,
        routes=routes,
        privileged=privileged,
    )

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._encode(int(index))

  def check(self, rows: Sequence[int]) -> None:
    for i in rows:
      self._encode(i)


def encode(
    records: Sequence[Record],
    tokenizer,
    *,
    prompt_length: int,
    answer_length: int,
    source: str = "records",
    routes: Sequence[str] | None = None,
    privileged: tuple[str, int] | None = None,
) -> PromptSet:
  """Tokenizes records into fixed shapes; too-long prompts or answers raise with the index.
  With `privileged=(template, length)` the set also holds the self-distillation teacher's
  prompts (as `PromptSource` does)."""
  lazy = PromptSource(
      records,
      tokenizer,
      prompt_length=prompt_length,
      answer_length=answer_length,
      source=source,
      routes=routes,
      privileged=privileged,
  )
  rows = [lazy[i] for i in range(len(lazy))]
  stack = lambda name: np.stack([row[name] for row in rows]) if name in rows[0] else None
  return PromptSet(
      stack("prompt_tokens"),
      stack("prompt_mask"),
      stack("answer_tokens"),
      stack("answer_mask"),
      lazy.answers,
      stack("route"),
      stack("privileged_tokens"),
      stack("privileged_mask"),
  )


def synthetic_records(
    task: str, *, difficulty: int, size: int, held_out: bool, seed: int = 0
) -> list[Record]:
  return [
      Record(p.prompt, p.answer, teacher=task)
      for p in tasks.split(task, difficulty=difficulty, size=size, held_out=held_out, seed=seed)
  ]


def load_jsonl(path: str | Path, tokenizer=None) -> list[Record]:
  """Reads `{"prompt": str, "answer": str}` or `{"messages": [...], "answer": str}` lines,
  each optionally with `"teacher": str` (which of a run's `teachers` scores it).

  Chat messages are rendered with the tokenizer's chat template (generation prompt
  added). Errors name the file and line number.
  """
  path = epath.Path(path)
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
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        ):
          raise ConfigError(
              f"{where}: 'messages' must be a non-empty list of "
              "{'role': ..., 'content': ...} objects"
          )
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
          raise ConfigError(f"{where}: chat messages need a tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
      else:
        raise ConfigError(
            f"{where}: needs a 'prompt' or a 'messages' field, got keys {sorted(item)}"
        )
      teacher = item.get("teacher", "")
      if not isinstance(teacher, str):
        raise ConfigError(f"{where}: 'teacher' must be a string, got {type(teacher).__name__}")
      records.append(Record(prompt, answer, teacher))
  if not records:
    raise ConfigError(f"{path} holds no records")
  return records


def batches(
    prompts, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
  """This process's rows of a shuffled (per epoch, by `seed`), repeated, batched stream.

  `prompts` is a `PromptSet` or a `PromptSource` (anything indexable by row). The global
  batches are the same for every `process_count`: each is `batch_size` shuffled row
  indices, and process p reads (tokenises) only its block of `batch_size / process_count`
  of them, so a run's data does not depend on how many hosts it has. The iterator state
  (`get_state()`) is a position in that global stream, the same on every process.
  """
  if batch_size > len(prompts):
    raise ConfigError(f"batch_size {batch_size} is larger than the dataset ({len(prompts)} rows)")
  if batch_size % process_count:
    raise ConfigError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
  share = batch_size // process_count
  mine = slice(process_index * share, (process_index + 1) * share)

  def rows(indices):
    items = [prompts[int(i)] for i in indices[mine]]
    return {name: np.stack([item[name] for item in items]) for name in items[0]}

  return (
      grain.MapDataset.range(len(prompts))
      .shuffle(seed=seed)
      .repeat()
      .batch(batch_size, drop_remainder=True)
      .map(rows)
  )


READ_AHEAD_BATCHES = 4


def stream(dataset: grain.MapDataset):
  """An iterator over `dataset` that reads (tokenises) at most `READ_AHEAD_BATCHES` batches
  ahead of the caller, in one thread. `iter(dataset)` alone uses grain's defaults, 16
  threads and 500 elements ahead: 500 batches of rows tokenised before the first step, in
  threads that compete with the training loop for the GIL. Its state (`get_state()`) is the
  same position in the stream as `iter(dataset)`'s."""
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=READ_AHEAD_BATCHES)
  return iter(dataset.to_iter_dataset(options))
