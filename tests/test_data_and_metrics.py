"""Data pipeline (tasks, tokenizer, JSONL, grain determinism) and metric reductions."""

import json
import time

import numpy as np
import pytest

from opdjax import metrics
from opdjax.data import (
    PromptSource,
    batches,
    char_tokenizer,
    encode,
    load_jsonl,
    stream,
    synthetic_records,
    tasks,
    verify,
)
from opdjax.data.pipeline import READ_AHEAD_BATCHES


def test_tasks_are_deterministic_verifiable_and_split():
  a = tasks.make_problem("addition", 7, difficulty=3)
  assert a == tasks.make_problem("addition", 7, difficulty=3)
  x, y = map(int, a.prompt.rstrip("=").split("+"))
  assert a.answer == str(x + y)
  chain = tasks.make_problem("modular_chain", 3, difficulty=4)
  start, ops = chain.prompt.rstrip("=").split(":")
  value = int(start)
  for op, expected in zip(ops.split(","), chain.answer.split(",")):
    value = eval(f"{value}{op}") % 10  # noqa: S307 (our own arithmetic strings)
    assert value == int(expected)
  train = {p.prompt for p in tasks.split("addition", difficulty=2, size=500, held_out=False)}
  held = {p.prompt for p in tasks.split("addition", difficulty=2, size=100, held_out=True)}
  assert not train & held and len(train) == 500 and len(held) == 100
  assert verify(" 42 ", "42") and not verify("420", "42")
  with pytest.raises(ValueError, match="unknown task 'sorting'"):
    tasks.make_problem("sorting", 0, difficulty=1)
  with pytest.raises(ValueError, match="difficulty must be >= 1, got 0"):
    tasks.make_problem("addition", 0, difficulty=0)
  with pytest.raises(ValueError, match="fewer than 500 distinct"):
    tasks.split("addition", difficulty=1, size=500, held_out=True)


def test_step_credit_counts_steps_before_the_first_mistake():
  assert tasks.step_credit("7,4,7", "7,4,7") == 1.0
  assert tasks.step_credit(" 7,4,7 ", "7,4,7") == 1.0
  assert tasks.step_credit("7,4,9", "7,4,7") == pytest.approx(2 / 3)
  # A later step that matches after a mistake is not credited (it was computed from a wrong
  # value), and an early mistake costs more than a late one.
  assert tasks.step_credit("7,5,7", "7,4,7") == pytest.approx(1 / 3)
  assert tasks.step_credit("1,4,7", "7,4,7") == 0.0
  assert tasks.step_credit("7,4", "7,4,7") == pytest.approx(2 / 3)  # stopped early
  assert tasks.step_credit("7,4,7,1", "7,4,7") == 1.0  # extra steps are not credited
  assert tasks.step_credit("42", "42") == 1.0 and tasks.step_credit("41", "42") == 0.0
  assert tasks.step_credit("", "7,4,7") == 0.0


def test_long_horizon_task_shape_fits_its_config():
  """modular_chain's default (the long-horizon task): answers of 24 tokens with EOS, and
  prompts and answers that fit the configured lengths for every training problem drawn."""
  from opdjax.configs import TASK_SHAPES, base_config, task_section

  c = task_section(base_config(), "modular_chain")
  assert c.task.difficulty == 12 and c.task.completion_length >= 24
  tok = char_tokenizer()
  prompts = encode(
      synthetic_records("modular_chain", difficulty=12, size=50, held_out=False),
      tok,
      prompt_length=c.task.prompt_length,
      answer_length=c.task.completion_length,
  )
  assert prompts.answer_mask.sum(1).min() >= 24
  with pytest.raises(ValueError, match=r"unknown task 'sorting'; valid: \['addition'"):
    task_section(base_config(), "sorting")
  assert set(TASK_SHAPES) == set(tasks.TASKS)


def test_tokenizer_round_trip_and_encoding():
  tok = char_tokenizer()
  ids = tok("12+34=", add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == "12+34=" and len(ids) == 6
  prompts = encode(
      synthetic_records("addition", difficulty=2, size=10, held_out=False),
      tok,
      prompt_length=8,
      answer_length=5,
  )
  assert prompts.prompt_tokens.shape == (10, 8)
  # Left-padded prompts, right-padded answers ending in EOS.
  assert prompts.prompt_mask[:, -1].all()
  lengths = prompts.answer_mask.sum(1)
  assert (prompts.answer_tokens[np.arange(10), lengths - 1] == tok.eos_token_id).all()
  with pytest.raises(
      ValueError, match=r"addition\[0\]: prompt has 6 tokens, more than prompt_length=3"
  ):
    encode(
        [tasks.Problem("12+34=", "46")], tok, prompt_length=3, answer_length=5, source="addition"
    )


def test_jsonl_prompts_and_errors(tmp_path):
  tok = char_tokenizer()
  good = tmp_path / "good.jsonl"
  good.write_text(
      '{"prompt": "1+2=", "answer": "3"}\n\n'
      '{"messages": [{"role": "user", "content": "2+2="}], "answer": "4"}\n'
  )
  records = load_jsonl(good, tok)
  assert [(r.prompt, r.answer) for r in records] == [("1+2=", "3"), ("2+2=", "4")]
  cases = {
      '{"prompt": "1+2=", "answer": "3"}\n{"prompt": oops}\n': r"bad.jsonl:2: not valid JSON",
      "[1, 2]\n": r"bad.jsonl:1: expected a JSON object, got list",
      '{"question": "1+1="}\n': r"bad.jsonl:1: needs a 'prompt' or a 'messages' field, got keys \['question'\]",
      '{"prompt": "", "answer": "1"}\n': r"bad.jsonl:1: 'prompt' must be a non-empty string",
      '{"prompt": "1+1=", "answer": 2}\n': r"bad.jsonl:1: 'answer' must be a string",
      '{"messages": [{"content": "x"}]}\n': r"bad.jsonl:1: 'messages' must be a non-empty list",
  }
  for text, message in cases.items():
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
      load_jsonl(bad, tok)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_jsonl(tmp_path / "missing.jsonl")


def test_batches_are_deterministic_and_resumable():
  tok = char_tokenizer()
  prompts = encode(
      synthetic_records("addition", difficulty=2, size=40, held_out=False),
      tok,
      prompt_length=8,
      answer_length=5,
  )
  first = [
      b["index"].tolist() for _, b in zip(range(12), iter(batches(prompts, batch_size=8, seed=1)))
  ]
  again = [
      b["index"].tolist() for _, b in zip(range(12), iter(batches(prompts, batch_size=8, seed=1)))
  ]
  other = [
      b["index"].tolist() for _, b in zip(range(12), iter(batches(prompts, batch_size=8, seed=2)))
  ]
  assert first == again and first != other
  assert sorted(sum(first[:5], [])) == list(range(40))  # one epoch covers every row once
  it = iter(batches(prompts, batch_size=8, seed=1))
  for _ in range(7):
    next(it)
  state = it.get_state()
  resumed = iter(batches(prompts, batch_size=8, seed=1))
  resumed.set_state(json.loads(json.dumps(state)))  # survives the JSON checkpoint
  assert next(resumed)["index"].tolist() == first[7]
  with pytest.raises(ValueError, match="batch_size 64 is larger than the dataset"):
    batches(prompts, batch_size=64, seed=0)


class CountingRows:
  """Rows `{"index": i}` that count how many have been read."""

  def __init__(self, size):
    self.size, self.reads = size, 0

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    self.reads += 1
    return {"index": np.int32(i)}


def test_stream_reads_a_few_batches_ahead_and_resumes_like_the_dataset():
  rows = CountingRows(4000)
  it = stream(batches(rows, batch_size=8, seed=1))
  first = next(it)["index"].tolist()
  time.sleep(0.5)  # give the reader thread time to run ahead
  assert rows.reads <= 8 * (1 + READ_AHEAD_BATCHES + 1)  # grain's default: 501 batches
  whole = [b["index"].tolist() for _, b in zip(range(6), iter(batches(rows, batch_size=8, seed=1)))]
  assert first == whole[0]
  for _ in range(2):
    next(it)
  resumed = stream(batches(rows, batch_size=8, seed=1))
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  assert next(resumed)["index"].tolist() == whole[3]


def test_process_shares_make_the_same_global_batches_and_tokenise_only_their_rows():
  """Process p of N gets rows [p·B/N, (p+1)·B/N) of the global batch a single process gets,
  and reads (tokenises) only those; the resumable state is one shared position."""
  tok = char_tokenizer()
  records = synthetic_records("addition", difficulty=2, size=40, held_out=False)
  read = []

  class Counting(PromptSource):

    def __getitem__(self, index):
      read.append(int(index))
      return super().__getitem__(index)

  make = lambda: Counting(records, tok, prompt_length=8, answer_length=5)
  whole = batches(make(), batch_size=8, seed=3)
  shares = [
      batches(make(), batch_size=8, seed=3, process_index=p, process_count=4) for p in range(4)
  ]
  for step in range(6):  # random access: batch `step` alone, no read-ahead
    want = whole[step]
    for p, share in enumerate(shares):
      read.clear()
      got = share[step]
      assert read == want["index"][2 * p : 2 * p + 2].tolist()  # only its own rows
      for name in want:
        np.testing.assert_array_equal(got[name], want[name][2 * p : 2 * p + 2])
  single, share = iter(whole), iter(shares[1])  # the iterators agree too (state included)
  first = next(single)
  np.testing.assert_array_equal(next(share)["index"], first["index"][2:4])
  assert share.get_state() == single.get_state()
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    batches(make(), batch_size=8, seed=0, process_index=0, process_count=3)
  # A record that does not fit names its index when checked (every process checks 1/N).
  with pytest.raises(ValueError, match=r"records\[1\]: prompt has"):
    PromptSource(
        [records[0], tasks.Problem("1" * 20, "1")], tok, prompt_length=8, answer_length=5
    ).check(range(2))


def test_accumulator_is_token_weighted():
  acc = metrics.Accumulator()
  acc.add({"kl": (6.0, 3.0)})  # 3 tokens averaging 2
  acc.add({"kl": (1.0, 1.0)})  # 1 token of 1
  acc.add({"empty": (0.0, 0.0)})  # no tokens: no value rather than NaN
  assert acc.means() == {"kl": 7.0 / 4.0}
  acc.reset()
  assert acc.means() == {}


def test_writer_truncates_after_resume_and_table(tmp_path):
  writer = metrics.Writer(tmp_path, tensorboard=True)
  for step in (1, 2, 3):
    writer.write(step, "train", {"loss": float(step)})
  writer.truncate_after(2)
  writer.write(3, "train", {"loss": 30.0})
  writer.close()
  history = metrics.read_history(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in history] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  assert any((tmp_path / "tensorboard").iterdir())
  table = metrics.format_table([{"a": 1.23456, "b": "x"}], ["a", "b"])
  assert "1.235" in table and "x" in table
  path = metrics.plot_curves(
      {"run": [{"step": 1, "split": "eval", "acc": 0.5}]}, ["acc"], tmp_path / "plot.png"
  )
  assert path.stat().st_size > 1000


def test_on_an_object_store_the_writer_rewrites_the_file_on_flush_and_every_interval(
    tmp_path, monkeypatch
):
  """An object cannot be appended to, so there the writer keeps the lines and rewrites the
  whole file on `flush()` (the trainer's checkpoints, a non-finite stop, `close()`) or once
  `store_every_s` has passed; a resumed writer starts from the stored lines."""
  from opdjax import checkpoint

  monkeypatch.setattr(checkpoint, "is_remote", lambda path: True)  # tmp_path as a bucket
  stored = lambda: [(r["step"], r["loss"]) for r in metrics.read_history(writer.path)]
  writer = metrics.Writer(tmp_path, tensorboard=False, store_every_s=3600)
  writer.write(1, "train", {"loss": 1.0})
  writer.write(2, "train", {"loss": 2.0})
  assert stored() == []
  writer.flush()
  assert stored() == [(1, 1.0), (2, 2.0)]
  writer.store_every_s = 0
  writer.write(3, "train", {"loss": 3.0})
  assert stored() == [(1, 1.0), (2, 2.0), (3, 3.0)]
  writer = metrics.Writer(tmp_path, tensorboard=False, store_every_s=3600)  # a resume
  writer.truncate_after(2)
  writer.write(3, "train", {"loss": 30.0})
  writer.close()
  assert stored() == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_evaluation_credits_decoded_completions_against_their_own_answers():
  """`credited` decodes each row up to its length and scores it against that row's answer
  (a row shift or decoding past the EOS would change the credits)."""
  import jax.numpy as jnp

  from opdjax.evaluation import credited, verified
  from opdjax.sampling import Generation

  tok = char_tokenizer()
  texts = ["7,4,9", "1,2,3", "5,5"]
  ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
  width = max(map(len, ids)) + 2
  tokens = np.zeros((3, width), np.int32)
  for row, seq in zip(tokens, ids):
    row[: len(seq)] = seq
    row[len(seq) :] = tok("8", add_special_tokens=False)["input_ids"][0]  # junk past the end
  lengths = np.array([len(seq) for seq in ids], np.int32)
  mask = np.arange(width)[None] < lengths[:, None]
  zeros = jnp.zeros((3, width), jnp.float32)
  gen = Generation(
      jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths), jnp.zeros(3, bool), zeros, zeros
  )
  answers = ["7,4,7", "1,2,3", "5,5,5,5"]
  np.testing.assert_allclose(credited(tok, gen, answers), [2 / 3, 1.0, 0.5])
  assert verified(tok, gen, answers) == [False, True, False]
