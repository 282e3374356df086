"""Verifiable synthetic tasks: every problem has one exact answer string.

Each task maps an integer index to a `Problem(prompt, answer)` deterministically, keeps a
fixed held-out split (problems whose index hashes into the held-out bucket never appear
in training), and has a difficulty knob. `verify(completion, answer)` is exact match, and
`step_credit(completion, answer)` the fraction of steps right before the first mistake.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import numpy as np

from opdjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str
  answer: str


def addition(rng: np.random.Generator, *, digits: int) -> Problem:
  """`a+b=` -> `c`, with a and b of up to `digits` digits."""
  high = 10**digits
  a, b = int(rng.integers(0, high)), int(rng.integers(0, high))
  return Problem(prompt=f"{a}+{b}=", answer=str(a + b))


def modular_chain(rng: np.random.Generator, *, steps: int, modulus: int = 10) -> Problem:
  """A chain of `steps` operations mod `modulus`, answered with every intermediate value.

  Prompt `3:+4,*2,-7=` (start at 3, add 4, multiply by 2, subtract 7); answer `7,4,7`
  (the running values mod 10). The intermediate steps make it a multi-step task whose
  later tokens depend on the earlier ones.
  """
  start = value = int(rng.integers(0, modulus))
  ops, values = [], []
  for _ in range(steps):
    op, operand = "+-*"[int(rng.integers(0, 3))], int(rng.integers(0, modulus))
    value = {"+": value + operand, "-": value - operand, "*": value * operand}[op] % modulus
    ops.append(f"{op}{operand}")
    values.append(str(value))
  return Problem(prompt=f"{start}:{','.join(ops)}=", answer=",".join(values))


TASKS: dict[str, tuple[Callable[..., Problem], str]] = {
    "addition": (addition, "digits"),
    "modular_chain": (modular_chain, "steps"),
}


def make_problem(task: str, index: int, *, difficulty: int, seed: int = 0) -> Problem:
  """The problem with this index (deterministic in task, index, difficulty and seed)."""
  if task not in TASKS:
    raise ConfigError(f"unknown task {task!r}; valid: {sorted(TASKS)}")
  if difficulty < 1:
    raise ConfigError(f"difficulty must be >= 1, got {difficulty}")
  fn, knob = TASKS[task]
  rng = np.random.default_rng([seed, index, difficulty])
  return fn(rng, **{knob: difficulty})


def is_held_out(problem: Problem, fraction: float = 0.1) -> bool:
  """A fixed split by the prompt's hash: the same problem is always on the same side."""
  digest = hashlib.sha256(problem.prompt.encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def split(
    task: str, *, difficulty: int, size: int, held_out: bool, seed: int = 0, fraction: float = 0.1
) -> list[Problem]:
  """`size` distinct problems from one side of the fixed train/held-out split."""
  problems, seen, index = [], set(), 0
  while len(problems) < size:
    problem = make_problem(task, index, difficulty=difficulty, seed=seed)
    index += 1
    if is_held_out(problem, fraction) == held_out and problem.prompt not in seen:
      seen.add(problem.prompt)
      problems.append(problem)
    if index > 50 * size + 10_000:
      raise ConfigError(
          f"task {task!r} at difficulty {difficulty} has fewer than {size} "
          f"distinct {'held-out' if held_out else 'training'} problems"
      )
  return problems


def verify(completion: str, answer: str) -> bool:
  """Exact match after stripping surrounding whitespace."""
  return completion.strip() == answer.strip()


def step_credit(completion: str, answer: str) -> float:
  """Per-step partial credit: the fraction of the answer's comma-separated steps that the
  completion gets right, step by step from the left, up to its first wrong step.

  A chain's later values are computed from the earlier ones, so a step after a mistake is
  not counted even if it happens to match. A completion with extra steps gets no credit
  for them and loses none; exact answers score 1 (and single-step answers score like
  `verify`).

  >>> step_credit("7,4,9", "7,4,7"), step_credit("7,5,7", "7,4,7"), step_credit("7,4,7", "7,4,7")
  (0.6666666666666666, 0.3333333333333333, 1.0)
  """
  expected = answer.strip().split(",")
  given = completion.strip().split(",")
  correct = 0
  for got, want in zip(given, expected):
    if got != want:
      break
    correct += 1
  return correct / len(expected)
