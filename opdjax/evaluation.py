"""Held-out evaluation: task accuracy and distances to the teacher (THEORY.md §9)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opdjax import objectives as obj
from opdjax.data import PromptSet, verify
from opdjax.recipes.base import distribution_metrics, inputs_of, join, targets_of
from opdjax.sampling import Generation, SamplingParams, generate


@functools.partial(jax.jit, static_argnames=("graphdef",))
def forward_logits(graphdef, state, tokens, attention_mask):
  """Logits `[B, T, V]` of a model given as `(graphdef, state)`; one compile per shape."""
  return nnx.merge(graphdef, state)(tokens, attention_mask=attention_mask)


def model_logits(model, tokens, attention_mask):
  graphdef, state = nnx.split(model)
  return forward_logits(graphdef, state, tokens, attention_mask)


def decode_completions(tokenizer, gen: Generation) -> list[str]:
  tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(tokens, lengths)]


def accuracy(tokenizer, gen: Generation, answers) -> float:
  return float(np.mean([verify(c, a) for c, a in zip(decode_completions(tokenizer, gen), answers)]))


def _sequence_scores(student, teacher, prompts: PromptSet, gen: Generation):
  """Per-row Σ_t log p(a_t) − log q(a_t) on `gen`'s completions, plus token metrics."""
  seq = join(jnp.asarray(prompts.prompt_tokens), jnp.asarray(prompts.prompt_mask),
             gen.tokens, gen.mask)
  tokens, mask = inputs_of(seq)
  targets = targets_of(seq)
  student_logits = model_logits(student, tokens, mask)
  teacher_logits = model_logits(teacher, tokens, mask)
  log_ratio = (obj.token_log_probs(student_logits, targets.tokens) -
               obj.token_log_probs(teacher_logits, targets.tokens))
  per_row = jnp.sum(jnp.where(targets.mask, log_ratio, 0.0), axis=1)
  return per_row, distribution_metrics(student_logits, teacher_logits, targets.mask)


def evaluate(student, prompts: PromptSet, tokenizer, *, key, max_new_tokens: int,
             teacher=None, temperature: float = 1.0) -> dict[str, float]:
  """Greedy and sampled accuracy, lengths, truncation; with a teacher, KLs to it.

  `sequence_reverse_kl` is `E_{y~student}[Σ_t log p/q]` and `sequence_forward_kl`
  `E_{y~teacher}[Σ_t log q/p]` (Monte Carlo over the held-out prompts); the `token_*` KLs
  are full-vocabulary per-token values at the student's sampled prefixes.
  """
  prompt_tokens, prompt_mask = jnp.asarray(prompts.prompt_tokens), jnp.asarray(prompts.prompt_mask)
  run = lambda model, params, k: generate(model, prompt_tokens, prompt_mask, key=k,
                                          max_new_tokens=max_new_tokens, sampling=params)
  greedy = run(student, SamplingParams(greedy=True), key)
  sampled = run(student, SamplingParams(temperature=temperature), jax.random.fold_in(key, 1))
  results = {
      "accuracy_greedy": accuracy(tokenizer, greedy, prompts.answers),
      "accuracy_sampled": accuracy(tokenizer, sampled, prompts.answers),
      "completion_length": float(jnp.mean(sampled.lengths)),
      "truncation_rate": float(jnp.mean(sampled.truncated)),
  }
  if teacher is not None:
    per_row, token_metrics = _sequence_scores(student, teacher, prompts, sampled)
    results["sequence_reverse_kl"] = float(jnp.mean(per_row))
    for name, (total, count) in token_metrics.items():
      results[name] = float(total) / max(float(count), 1.0)
    teacher_samples = run(teacher, SamplingParams(temperature=temperature), jax.random.fold_in(key, 2))
    per_row_teacher, _ = _sequence_scores(student, teacher, prompts, teacher_samples)
    results["sequence_forward_kl"] = float(jnp.mean(-per_row_teacher))
  return results
