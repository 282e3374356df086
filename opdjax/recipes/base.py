"""What every recipe shares: the sequence layout, target alignment and teacher metrics.

A training sequence is `[pad…, prompt, completion, pad…]` (prompts left-padded,
completions right-padded), so real tokens are contiguous and logits at slot t predict
the token at slot t+1. `Targets` holds that shifted view. A `Recipe`'s loss is a per-token
function of logits plus a step over the resulting `[B, T]` values (see `Recipe`), and its
metrics are token-weighted `(sum, count)` pairs so they reduce exactly across steps,
micro-batches and devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from opdjax import objectives as obj
from opdjax.errors import ConfigError


class Sequences(NamedTuple):
  """Prompt + completion rows `[B, L]` (numpy or jax)."""

  tokens: jax.Array  # int32
  attention_mask: jax.Array  # bool, real tokens
  completion_mask: jax.Array  # bool, completion tokens (the ones trained on)
  behaviour_logprobs: jax.Array  # float32, log μ(a_t) of completion tokens (0 elsewhere)
  model_logprobs: jax.Array  # float32, sampler's log p_old(a_t) at temperature 1
  rewards: jax.Array | None = None  # [B] float32 sequence reward (the task verifier; GRPO)

  @classmethod
  def spec(cls, rows: int, length: int, sharding=None) -> "Sequences":
    """`ShapeDtypeStruct`s of what a rollout gives (`join`'s output) for `rows` rows of
    `length` slots, laid out by `sharding`: to compile a step before the first rollout."""
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return cls(
        tokens=spec((rows, length), jnp.int32),
        attention_mask=spec((rows, length), bool),
        completion_mask=spec((rows, length), bool),
        behaviour_logprobs=spec((rows, length), jnp.float32),
        model_logprobs=spec((rows, length), jnp.float32),
        rewards=spec((rows,), jnp.float32),
    )


class Targets(NamedTuple):
  """The shifted view: position t of every field refers to the token at slot t+1."""

  tokens: jax.Array  # [B, L-1]
  mask: jax.Array  # [B, L-1] bool, completion tokens
  behaviour_logprobs: jax.Array  # [B, L-1]
  model_logprobs: jax.Array  # [B, L-1]
  rewards: jax.Array | None = None  # [B] sequence rewards


@jax.jit  # one dispatch, not one per op: eagerly, its ~15 ops cost more than a small step
def join(
    prompt_tokens,
    prompt_mask,
    completion_tokens,
    completion_mask,
    behaviour_logprobs=None,
    model_logprobs=None,
    rewards=None,
) -> Sequences:
  """Concatenates left-padded prompts `[B, P]` with right-padded completions `[B, N]`."""
  zeros_p = jnp.zeros(prompt_tokens.shape, jnp.float32)
  zeros_n = jnp.zeros(completion_tokens.shape, jnp.float32)
  behaviour = zeros_n if behaviour_logprobs is None else behaviour_logprobs
  model = zeros_n if model_logprobs is None else model_logprobs
  return Sequences(
      tokens=jnp.concatenate([prompt_tokens, completion_tokens], 1).astype(jnp.int32),
      attention_mask=jnp.concatenate([prompt_mask, completion_mask], 1).astype(bool),
      completion_mask=jnp.concatenate([jnp.zeros_like(prompt_mask), completion_mask], 1).astype(
          bool
      ),
      behaviour_logprobs=jnp.concatenate([zeros_p, behaviour], 1).astype(jnp.float32),
      model_logprobs=jnp.concatenate([zeros_p, model], 1).astype(jnp.float32),
      rewards=(
          jnp.zeros(prompt_tokens.shape[:1], jnp.float32)
          if rewards is None
          else jnp.asarray(rewards, jnp.float32)
      ),
  )


def targets_of(seq: Sequences) -> Targets:
  return Targets(
      tokens=seq.tokens[:, 1:],
      mask=seq.completion_mask[:, 1:],
      behaviour_logprobs=seq.behaviour_logprobs[:, 1:],
      model_logprobs=seq.model_logprobs[:, 1:],
      rewards=seq.rewards,
  )


def inputs_of(seq: Sequences):
  """`(tokens, attention_mask)` `[B, L-1]` whose logits predict `targets_of(seq)`."""
  return seq.tokens[:, :-1], seq.attention_mask[:, :-1]


def pair(values, mask):
  """A token-weighted metric: `(Σ_masked values, number of masked tokens)`."""
  mask = mask.astype(jnp.float32)
  return obj.masked_sum(values, mask), jnp.sum(mask)


def distribution_values(student_logits, teacher_logits) -> dict:
  """Per-token metric values (no gradient): the student's entropy and, with a teacher, the
  full-vocabulary token reverse and forward KLs. Shapes `[..., V] -> [...]`."""
  student_logits = jax.lax.stop_gradient(student_logits)
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  values = {
      "student_entropy": -jnp.sum(jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * log_p, 0.0), axis=-1)
  }
  if teacher_logits is not None:
    values["token_reverse_kl"] = obj.reverse_kl(student_logits, teacher_logits)
    values["token_forward_kl"] = obj.forward_kl(student_logits, teacher_logits)
  return values


METRIC_VALUES = ("student_entropy", "token_reverse_kl", "token_forward_kl")


def metric_pairs(values: dict, mask, names=METRIC_VALUES) -> dict:
  """`(sum, count)` pairs over `mask` for the per-token values named in `names`."""
  return {name: pair(values[name], mask) for name in names if name in values}


def sampled_token_values(student_logits, teacher_logits, tokens) -> dict:
  """Per token: `log p(a_t)` (differentiated), `log q(a_t)` and the distribution metrics."""
  return dict(
      distribution_values(student_logits, teacher_logits),
      log_p=obj.token_log_probs(student_logits, tokens),
      log_q=obj.token_log_probs(teacher_logits, tokens),
  )


def nll_token_values(student_logits, teacher_logits, tokens) -> dict:
  """Per token: `−log p(y_t)` and the distribution metrics (SFT and SeqKD)."""
  return dict(
      distribution_values(student_logits, teacher_logits),
      nll=-obj.token_log_probs(student_logits, tokens),
  )


def nll_loss(values: dict, targets: Targets):
  """`−log p(y_t)` on the completion (SFT and SeqKD)."""
  return values["nll"], dict(
      metric_pairs(values, targets.mask), nll=pair(values["nll"], targets.mask)
  )


LOSS_MEANS = ("token", "sequence")
ROLES = ("teacher", "reference")


@dataclasses.dataclass(frozen=True)
class SelfTeacher:
  """Frozen roles formed from the student itself (self-distillation, docs/theory.md §8).

  Attributes:
    weights: `((role, kind), ...)`, kind "initial" (a copy of the student's initial
      weights), "current" (the parameters that sampled the rollout) or "ema" (an average
      the trainer updates after every step and keeps in the checkpoint).
    privileged: the template of those roles' prompt, from `{prompt}` and `{answer}`; the
      student's prompt is the plain `{prompt}`.
    ema_rate: r in `θ' ← θ' + r·(θ − θ')`.
  """

  weights: tuple[tuple[str, str], ...]
  privileged: str
  ema_rate: float = 0.0

  def kind(self, role: str) -> str:
    return dict(self.weights)[role]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A whole algorithm: where its completions come from, which frozen models it reads, and
  how it turns a model's outputs into a loss.

  The loss is split in two so that it runs from hidden states in token chunks
  (`opdjax.objectives.token_values`) or from full logits with the same numbers:

  * `token_values(student_logits [..., V], frozen_logits, tokens [...])` returns a dict of
    per-position values `[...]` (it reduces only the vocabulary axis). `frozen_logits` is
    None without roles, the teacher's `[..., V]` logits when `roles == ("teacher",)`, and
    a dict `{role: [..., V]}` otherwise;
  * `loss(values: {name: [B, T]}, targets)` returns `(per_token_loss [B, T], metrics)`,
    where metrics are token-weighted `(sum, count)` pairs. It may mix positions of a row
    (reward-to-go) but never rows of different micro-batches. The trainer minimises
    `Σ_t mask·per_token_loss / Σ mask` over the whole batch (the completion token mean).

  Attributes:
    name: registry name.
    source: where a step's completions come from: "dataset", "teacher" or "student", or a
      function `(seed, step) -> one of those` (GKD's coin), evaluated on the host.
    token_values: see above.
    loss: see above.
    roles: the frozen models `token_values` reads, from `ROLES`; the trainer builds each
      and hands their hidden states and heads to the step.
    group_size: completions sampled per prompt (G > 1: the rows of a prompt are adjacent).
    reward: the task reward each rollout completion carries (`Sequences.rewards`), by
      name (`evaluation.REWARDS`): "exact" (1 if the verifier accepts it, else 0) or
      "step_credit" (the fraction of steps right before the first mistake); None: none.
    correction: for a sampled-token (policy-gradient) loss, its importance correction
      against the sampler ("none", "plain", "truncated", "ppo_clip"); None for losses on
      full distributions, which need none. The trainer refuses "none" on off-policy
      rollouts.
    loss_value: the name of the `token_values` output that *is* the per-token loss, when
      `loss` returns it unchanged (divergences, NLL). The gradient is then formed in one
      pass over the vocabulary (`objectives.fused.weighted_token_sum`) instead of a
      rematerialised backward pass; None for losses that mix positions (reward-to-go).
    loss_mean: how per-token losses become the batch's loss (`token_weights`): "token"
      (every completion token of the batch weighs the same) or "sequence" (each
      completion's tokens are averaged first, then completions weigh the same, as in
      GRPO's original objective).
    self_teacher: a `SelfTeacher` when the frozen roles are the student's own weights
      seeing privileged context (self-distillation), else None (external models).
  """

  name: str
  source: str | Callable[[int, int], str]
  token_values: Callable
  loss: Callable
  roles: tuple[str, ...] = ()
  group_size: int = 1
  reward: str | None = None
  correction: str | None = None
  loss_value: str | None = None
  loss_mean: str = "token"
  self_teacher: SelfTeacher | None = None

  def __post_init__(self):
    unknown = [r for r in self.roles if r not in ROLES]
    if unknown:
      raise ConfigError(f"recipe {self.name!r} asks for unknown roles {unknown}; valid: {ROLES}")
    if self.loss_mean not in LOSS_MEANS:
      raise ConfigError(f"recipe.loss_mean must be one of {LOSS_MEANS}, got {self.loss_mean!r}")

  @property
  def needs_teacher(self) -> bool:
    return "teacher" in self.roles

  def source_at(self, seed: int, step: int) -> str:
    """Where step `step`'s completions come from."""
    return self.source(seed, step) if callable(self.source) else self.source


def frozen_argument(recipe: Recipe, by_role: dict):
  """What `recipe.token_values` gets for the frozen models in `by_role` (see `Recipe`)."""
  if not recipe.roles:
    return None
  if recipe.roles == ("teacher",):
    return by_role["teacher"]
  return {role: by_role[role] for role in recipe.roles}


def loss_from_hidden(
    recipe: Recipe,
    student: obj.Head,
    frozen,
    targets: Targets,
    *,
    chunk_size: int = 0,
    row_shards: int = 1,
):
  """`recipe`'s `(per-token loss [B, T], metrics)` from hidden states, in token chunks
  (`chunk_size`, `row_shards`: `objectives.token_values`).

  `frozen` is `frozen_argument(recipe, {role: Head})`."""
  values = obj.token_values(
      recipe.token_values,
      student,
      targets.tokens,
      teacher=frozen,
      chunk_size=chunk_size,
      row_shards=row_shards,
  )
  return recipe.loss(values, targets)


def token_weights(recipe: Recipe, mask, *, num_tokens, num_rows):
  """Each token's weight in the batch loss `Σ w·per_token_loss`.

  "token": `mask / num_tokens`; "sequence": `mask / (|o_b| · num_rows)`, with `|o_b|` the
  row's completion length. `num_tokens` and `num_rows` count the whole batch, so the
  weights of micro-batches add up to the whole batch's."""
  mask = mask.astype(jnp.float32)
  if recipe.loss_mean == "sequence":
    return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0) / num_rows
  return mask / num_tokens


def batch_loss(
    recipe: Recipe,
    student: obj.Head,
    frozen,
    targets: Targets,
    *,
    num_tokens,
    num_rows=None,
    chunk_size: int = 0,
    row_shards: int = 1,
):
  """The scalar the trainer minimises, `Σ token_weights·per_token_loss`, and metrics.

  `num_tokens`/`num_rows` are the whole batch's completion tokens and rows (so micro-batches
  add up; `num_rows` defaults to this batch's). Uses the one-pass gradient when the recipe
  names its `loss_value`."""
  num_rows = targets.mask.shape[0] if num_rows is None else num_rows
  weights = token_weights(recipe, targets.mask, num_tokens=num_tokens, num_rows=num_rows)
  if recipe.loss_value is None:
    per_token, metrics = loss_from_hidden(
        recipe, student, frozen, targets, chunk_size=chunk_size, row_shards=row_shards
    )
    return obj.masked_sum(per_token, weights), metrics
  loss, values = obj.fused.weighted_token_sum(
      recipe.token_values,
      student,
      targets.tokens,
      weights,
      key=recipe.loss_value,
      teacher=frozen,
      chunk_size=chunk_size,
      row_shards=row_shards,
  )
  return loss, recipe.loss(values, targets)[1]


def loss_from_logits(recipe: Recipe, student_logits, frozen_logits, targets: Targets):
  """The unfused reference: `recipe` on full `[B, T, V]` logits -> `(per-token loss, metrics)`."""
  return recipe.loss(recipe.token_values(student_logits, frozen_logits, targets.tokens), targets)
