"""Held-out evaluation: task accuracy and distances to the teacher (docs/theory.md §9).

Rows are generated and scored `batch_size` at a time, and scores come from hidden states
in token chunks, so evaluation memory does not grow with the eval set or the vocabulary.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from opdjax import objectives as obj
from opdjax.data import PromptSet, step_credit, verify
from opdjax.distributed import all_rows, global_batch, is_main, local_rows
from opdjax.recipes.base import (
    Sequences,
    inputs_of,
    join,
    metric_pairs,
    sampled_token_values,
    targets_of,
)
from opdjax.sampling import Generation, SamplingParams, generate
from opdjax.sharding import row_splits


@functools.partial(jax.jit, static_argnames=("graphdef",))
def forward_hidden(graphdef, state, tokens, attention_mask):
  """Final hidden states `[B, T, D]` of a model given as `(graphdef, state)`."""
  return nnx.merge(graphdef, state).hidden_states(tokens, attention_mask=attention_mask)


def own_rows(route: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Where model `k` of a routed batch reads and writes: `(gather, scatter)` index arrays of
  a power-of-two length (at most the batch), for `forward_hidden_rows`.

  `gather` lists the rows routed to `k`, then repeats the first of them as padding (so the
  model only ever sees its own rows); `scatter` is the same rows, then `B`, out of range,
  so the padding is dropped. The length is bucketed so that a run compiles a few shapes per
  model rather than one per row count. A model without rows gets empty arrays.

  >>> own_rows(np.array([0, 1, 1, 0, 1]), 1)
  (array([1, 2, 4, 1]), array([1, 2, 4, 5]))
  """
  rows = np.flatnonzero(np.asarray(route) == k)
  if rows.size == 0:
    return rows, rows
  batch = len(route)
  size = min(1 << (rows.size - 1).bit_length(), batch)
  pad = size - rows.size
  return np.concatenate([rows, np.full(pad, rows[0])]), np.concatenate([rows, np.full(pad, batch)])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def forward_hidden_rows(graphdef, state, tokens, attention_mask, gather, scatter):
  """`forward_hidden` on the rows `gather` only, written back to rows `scatter` of a
  `[B, T, D]` array of zeros (see `own_rows`): a routed teacher runs on its own rows."""
  model = nnx.merge(graphdef, state)
  hidden = model.hidden_states(tokens[gather], attention_mask=attention_mask[gather])
  out = jnp.zeros((tokens.shape[0],) + hidden.shape[1:], hidden.dtype)
  return out.at[scatter].set(hidden, mode="drop")


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_length", "completion_length"))
def privileged_hidden(
    graphdef, state, privileged: Sequences, *, prompt_length: int, completion_length: int
):
  """A self-distillation teacher's hidden states on `privileged` (its own prompt of P'
  tokens, then the student's N completion tokens), moved to the student's positions: the
  student's row is `[0]·(P−1) ++ h[P'−1:]`, so position P−1+j predicts completion token j
  in both layouts (prompt positions carry no loss)."""
  tokens, mask = inputs_of(privileged)
  hidden = nnx.merge(graphdef, state).hidden_states(tokens, attention_mask=mask)
  completion = hidden[:, -completion_length:]  # = h[P'−1:], the N completion-predicting slots
  pad = jnp.zeros((hidden.shape[0], prompt_length - 1, hidden.shape[2]), hidden.dtype)
  return jnp.concatenate([pad, completion], axis=1)


def decode_completions(tokenizer, gen: Generation) -> list[str]:
  """The completions of this process's rows (all rows on one process)."""
  tokens, lengths = local_rows(gen.tokens), local_rows(gen.lengths)
  return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(tokens, lengths)]


def verified(tokenizer, gen: Generation, answers) -> list[bool]:
  return [verify(c, a) for c, a in zip(decode_completions(tokenizer, gen), answers)]


def credited(tokenizer, gen: Generation, answers) -> list[float]:
  """Each row's `step_credit`: the fraction of steps right before its first mistake."""
  return [step_credit(c, a) for c, a in zip(decode_completions(tokenizer, gen), answers)]


REWARDS = {"exact": verified, "step_credit": credited}  # a recipe's `reward`, by name


def accuracy(tokenizer, gen: Generation, answers) -> float:
  return float(np.mean(verified(tokenizer, gen, answers)))


@functools.partial(
    jax.jit,
    static_argnames=(
        "student_graphdef",
        "teacher_graphdef",
        "chunk_size",
        "row_shards",
        "completion_length",
    ),
)
def _sequence_scores(
    student_graphdef,
    student_state,
    teacher_graphdef,
    teacher_state,
    seq,
    teacher_seq,
    *,
    chunk_size,
    row_shards,
    completion_length,
):
  """Per-row `Σ_t log p(a_t) − log q(a_t)` on `seq`'s completions, plus token metrics. The
  teacher reads `teacher_seq` (its own prompt, the same completions) when one is given."""
  tokens, mask = inputs_of(seq)
  targets = targets_of(seq)
  student = nnx.merge(student_graphdef, student_state)
  teacher = nnx.merge(teacher_graphdef, teacher_state)
  if teacher_seq is None:
    teacher_hidden = teacher.hidden_states(tokens, attention_mask=mask)
  else:  # its hidden states moved onto the student's positions
    teacher_hidden = privileged_hidden(
        teacher_graphdef,
        teacher_state,
        teacher_seq,
        prompt_length=seq.tokens.shape[1] - completion_length,
        completion_length=completion_length,
    )
  heads = [
      obj.Head(student.hidden_states(tokens, attention_mask=mask), student.head_kernel()),
      obj.Head(teacher_hidden, teacher.head_kernel()),
  ]
  values = obj.token_values(
      sampled_token_values,
      heads[0],
      targets.tokens,
      teacher=heads[1],
      chunk_size=chunk_size,
      row_shards=row_shards,
  )
  log_ratio = values["log_p"] - values["log_q"]
  per_row = jnp.sum(jnp.where(targets.mask, log_ratio, 0.0), axis=1)
  return per_row, metric_pairs(values, targets.mask)


def _score_completions(
    models, prompts, teacher_prompts, gen: Generation, *, chunk_size, row_shards
):
  """`_sequence_scores` of `gen`'s completions after `prompts` (`(tokens, mask)`), the
  teacher's after `teacher_prompts` (None: the same prompts)."""
  seq = join(*prompts, gen.tokens, gen.mask)
  teacher_seq = None if teacher_prompts is None else join(*teacher_prompts, gen.tokens, gen.mask)
  return _sequence_scores(
      *models,
      seq,
      teacher_seq,
      chunk_size=chunk_size,
      row_shards=row_shards,
      completion_length=gen.tokens.shape[1],
  )


def evaluate(
    student,
    prompts: PromptSet,
    tokenizer,
    *,
    key,
    max_new_tokens: int,
    teacher=None,
    temperature: float = 1.0,
    batch_size: int = 128,
    chunk_size: int = 0,
    batch_sharding=None,
    privileged: bool = False,
    fuse_projections: bool | None = None,
) -> dict[str, float]:
  """Greedy and sampled accuracy, greedy step credit (`tasks.step_credit`), lengths,
  truncation; with a teacher, KLs to it.

  `sequence_reverse_kl` is `E_{y~student}[Σ_t log p/q]` and `sequence_forward_kl`
  `E_{y~teacher}[Σ_t log q/p]` (Monte Carlo over the held-out prompts); the `token_*` KLs
  are full-vocabulary per-token values at the student's sampled prefixes. Rows go
  `batch_size` at a time, with a progress bar where there are several blocks; block i
  samples with `fold_in(key, i)`.

  With a `batch_sharding` (`opdjax.sharding.batch_sharding(mesh)`), each
  block is laid out by it (its size rounded to a multiple of the devices it splits over);
  on several processes each process feeds and verifies its share of a block's rows and the
  means are taken over all of them, so every process returns the same numbers.

  With `privileged` (self-distillation, docs/theory.md §8) the teacher reads each row's
  privileged prompt `x ⊕ c` (`prompts.privileged_tokens`) and the student the plain `x`: the
  reverse KL is `E_{y~π(·|x)}[Σ_t log π(a_t|x, y<t) − log q(a_t|x⊕c, y<t)]`, the forward KL
  samples `y ~ q(·|x⊕c)`, and the token KLs are taken at the same completion positions.

  `fuse_projections` is `generate`'s, for every model this samples.
  """
  if privileged and prompts.privileged_tokens is None:
    raise ValueError("evaluate(privileged=True) needs a PromptSet with privileged prompts")
  greedy_ok, sampled_ok, greedy_credit, lengths, truncated, kept = [], [], [], [], [], []
  reverse, forward = [], []
  token_sums: dict[str, list] = {}
  sample = SamplingParams(temperature=temperature)
  models = (*nnx.split(student), *nnx.split(teacher)) if teacher is not None else ()
  splits = 1 if batch_sharding is None else row_splits(batch_sharding.mesh)
  batch_size = max(splits, batch_size // splits * splits)
  processes, me = jax.process_count(), jax.process_index()
  unit = math.lcm(splits, processes)  # a block's rows must split over devices and processes
  starts = range(0, len(prompts.answers), batch_size)
  quiet = len(starts) < 2 or not is_main()
  progress = tqdm(starts, desc="held-out evaluation", unit="block", leave=False, disable=quiet)
  for block, start in enumerate(progress):
    stop = min(start + batch_size, len(prompts.answers))
    size = -(-(stop - start) // unit) * unit  # a short last block (or a routed teacher's
    share = size // processes  # rows) repeats its last row
    index = np.arange(start + me * share, start + (me + 1) * share)  # this process's rows
    rows, real = np.minimum(index, stop - 1), index < stop
    kept += real.tolist()
    local = dict(tokens=prompts.prompt_tokens[rows], mask=prompts.prompt_mask[rows], real=real)
    if privileged:
      local |= dict(
          teacher_tokens=prompts.privileged_tokens[rows],
          teacher_mask=prompts.privileged_mask[rows],
      )
    placed = (
        jax.tree.map(jnp.asarray, local)
        if batch_sharding is None
        else global_batch(local, batch_sharding)
    )
    prompt_tokens, prompt_mask = placed["tokens"], placed["mask"]
    teacher_prompts = (placed["teacher_tokens"], placed["teacher_mask"]) if privileged else None
    # a repeated row's completion is masked, so it adds no tokens to the token metrics
    without_padding = lambda gen, real=placed["real"]: gen._replace(mask=gen.mask & real[:, None])
    answers = [prompts.answers[i] for i in rows]
    block_key = jax.random.fold_in(key, block)
    run = functools.partial(
        generate, max_new_tokens=max_new_tokens, fuse_projections=fuse_projections
    )
    run_student = functools.partial(run, prompt_tokens=prompt_tokens, prompt_mask=prompt_mask)
    greedy = run_student(student, key=block_key, sampling=SamplingParams(greedy=True))
    sampled = run_student(student, key=jax.random.fold_in(block_key, 1), sampling=sample)
    greedy_ok += verified(tokenizer, greedy, answers)
    greedy_credit += credited(tokenizer, greedy, answers)
    sampled_ok += verified(tokenizer, sampled, answers)
    lengths += local_rows(sampled.lengths).tolist()
    truncated += local_rows(sampled.truncated).tolist()
    if teacher is None:
      continue
    score = functools.partial(
        _score_completions,
        models,
        (prompt_tokens, prompt_mask),
        teacher_prompts,
        chunk_size=chunk_size,
        row_shards=splits,
    )
    per_row, token_metrics = score(without_padding(sampled))
    reverse += local_rows(per_row).tolist()
    for name, (total, count) in token_metrics.items():
      token_sums.setdefault(name, []).append((float(total), float(count)))
    teacher_sampled = run(
        teacher,
        *(teacher_prompts or (prompt_tokens, prompt_mask)),
        key=jax.random.fold_in(block_key, 2),
        sampling=sample,
    )
    per_row_teacher, _ = score(without_padding(teacher_sampled))
    forward += (-local_rows(per_row_teacher)).tolist()
  kept = all_rows(np.asarray(kept, bool))
  greedy_ok, sampled_ok, greedy_credit, lengths, truncated, reverse, forward = (
      all_rows(np.asarray(x, np.float64))[kept] if x else np.zeros(0)
      for x in (greedy_ok, sampled_ok, greedy_credit, lengths, truncated, reverse, forward)
  )
  results = {
      "accuracy_greedy": float(np.mean(greedy_ok)),
      "accuracy_sampled": float(np.mean(sampled_ok)),
      "step_credit_greedy": float(np.mean(greedy_credit)),
      "completion_length": float(np.mean(lengths)),
      "truncation_rate": float(np.mean(truncated)),
  }
  if teacher is not None:
    results["sequence_reverse_kl"] = float(np.mean(reverse))
    results["sequence_forward_kl"] = float(np.mean(forward))
    for name, pairs in token_sums.items():
      total, count = np.sum(pairs, axis=0)
      results[name] = float(total) / max(float(count), 1.0)
  return results
