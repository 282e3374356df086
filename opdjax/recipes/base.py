"""What every recipe shares: the sequence layout, target alignment and teacher metrics.

A training sequence is `[pad…, prompt, completion, pad…]` (prompts left-padded,
completions right-padded), so real tokens are contiguous and logits at slot t predict
the token at slot t+1. `Targets` holds that shifted view; a recipe's loss maps
`(student_logits, teacher_logits, targets)` to a scalar and a dict of metrics, each a
token-weighted `(sum, count)` pair so they reduce exactly across steps and devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from opdjax import objectives as obj


class Sequences(NamedTuple):
  """Prompt + completion rows `[B, L]` (numpy or jax)."""

  tokens: jax.Array               # int32
  attention_mask: jax.Array       # bool, real tokens
  completion_mask: jax.Array      # bool, completion tokens (the ones trained on)
  behaviour_logprobs: jax.Array   # float32, log μ(a_t) of completion tokens (0 elsewhere)
  model_logprobs: jax.Array       # float32, sampler's log p_old(a_t) at temperature 1


class Targets(NamedTuple):
  """The shifted view: position t of every field refers to the token at slot t+1."""

  tokens: jax.Array               # [B, L-1]
  mask: jax.Array                 # [B, L-1] bool, completion tokens
  behaviour_logprobs: jax.Array   # [B, L-1]
  model_logprobs: jax.Array       # [B, L-1]


def join(prompt_tokens, prompt_mask, completion_tokens, completion_mask,
         behaviour_logprobs=None, model_logprobs=None) -> Sequences:
  """Concatenates left-padded prompts `[B, P]` with right-padded completions `[B, N]`."""
  zeros_p = jnp.zeros(prompt_tokens.shape, jnp.float32)
  zeros_n = jnp.zeros(completion_tokens.shape, jnp.float32)
  behaviour = zeros_n if behaviour_logprobs is None else behaviour_logprobs
  model = zeros_n if model_logprobs is None else model_logprobs
  return Sequences(
      tokens=jnp.concatenate([prompt_tokens, completion_tokens], 1).astype(jnp.int32),
      attention_mask=jnp.concatenate([prompt_mask, completion_mask], 1).astype(bool),
      completion_mask=jnp.concatenate([jnp.zeros_like(prompt_mask), completion_mask], 1).astype(bool),
      behaviour_logprobs=jnp.concatenate([zeros_p, behaviour], 1).astype(jnp.float32),
      model_logprobs=jnp.concatenate([zeros_p, model], 1).astype(jnp.float32))


def targets_of(seq: Sequences) -> Targets:
  return Targets(tokens=seq.tokens[:, 1:], mask=seq.completion_mask[:, 1:],
                 behaviour_logprobs=seq.behaviour_logprobs[:, 1:],
                 model_logprobs=seq.model_logprobs[:, 1:])


def inputs_of(seq: Sequences):
  """`(tokens, attention_mask)` `[B, L-1]` whose logits predict `targets_of(seq)`."""
  return seq.tokens[:, :-1], seq.attention_mask[:, :-1]


def pair(values, mask):
  """A token-weighted metric: `(Σ_masked values, number of masked tokens)`."""
  mask = mask.astype(jnp.float32)
  return obj.masked_sum(values, mask), jnp.sum(mask)


def distribution_metrics(student_logits, teacher_logits, mask) -> dict:
  """Per-token full-vocabulary KLs to the teacher and the student's entropy."""
  student_logits = jax.lax.stop_gradient(student_logits)
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * log_p, 0.0), axis=-1)
  metrics = {"student_entropy": pair(entropy, mask)}
  if teacher_logits is not None:
    metrics["token_reverse_kl"] = pair(obj.reverse_kl(student_logits, teacher_logits), mask)
    metrics["token_forward_kl"] = pair(obj.forward_kl(student_logits, teacher_logits), mask)
  return metrics


def nll_loss(student_logits, targets: Targets):
  """`−log p(y_t)` token mean over the completion (SFT and SeqKD)."""
  nll = -obj.token_log_probs(student_logits, targets.tokens)
  return obj.token_mean(nll, targets.mask), {"nll": pair(nll, targets.mask)}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one algorithm gets its data and turns logits into a loss.

  Attributes:
    name: registry name.
    source: where completions come from each rollout: "dataset", "teacher", "student", or
      "mixed" (student with probability `lambda_on`, else dataset: GKD).
    needs_teacher: whether the loss reads teacher logits.
    loss: `(student_logits, teacher_logits | None, targets) -> (scalar, metrics)`.
    lambda_on: the on-policy probability for source "mixed".
  """

  name: str
  source: str
  needs_teacher: bool
  loss: Callable
  lambda_on: float = 1.0
