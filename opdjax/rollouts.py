"""A training step's rollout: its prompts, their completions and the frozen models' view of
them.

`Rollouts.sample` draws a step's prompts and dispatches their completions (dataset answers,
or samples of the teacher or of the student), reading nothing back; `Rollouts.score` joins
them to their prompts (with verified rewards) and runs each frozen model on them: an external
teacher or reference, routed teachers on their own rows, or the student's own weights
reading a privileged prompt (self-distillation). The two halves are apart so that
`train.rollout_ahead` can sample the next rollout before an update.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opdjax import distributed, evaluation, recipes
from opdjax import objectives as obj
from opdjax.build import members, routed_kernel_sharding, sampling_params
from opdjax.evaluation import forward_hidden, forward_hidden_rows, own_rows, privileged_hidden
from opdjax.learner import head_kernel
from opdjax.recipes.base import join
from opdjax.sampling import FUSE_SETTINGS, Generation, generate


def repeat_rows(batch: dict, group: int) -> dict:
  """Each row of a host batch `group` times in a row (the G samples of a prompt are adjacent)."""
  return batch if group == 1 else {k: np.repeat(v, group, axis=0) for k, v in batch.items()}


route_hidden = jax.jit(obj.route_hidden)


@jax.jit
def drift_kl(teacher: obj.Head, current: obj.Head, targets: recipes.Targets):
  """`(Σ, count)` over completion tokens of `KL(q_θ'(·|x⊕c, y<t) ‖ π_θ(·|x⊕c, y<t))`, both
  read from hidden states already moved to the student's positions: how far the teacher's
  weights have moved from the student's, seen with the privileged context."""
  values = obj.token_values(
      lambda t, c, _: {"kl": obj.reverse_kl(t, c)}, teacher, targets.tokens, teacher=current
  )
  return recipes.base.pair(values["kl"], targets.mask)


class Sampled(NamedTuple):
  """A rollout's completions, dispatched but not read back (`train.rollout_ahead`)."""

  local: dict  # this process's rows (host), each prompt repeated for its group: index [b·G], ...
  rows: dict  # the global batch of those rows: [B·G, ...]
  gen: Generation | None  # [B·G, N] completions; None for dataset answers


class Rollout(NamedTuple):
  """What a step trains on, kept while the rollout is reused."""

  seq: recipes.Sequences  # prompt + completion [B·G, P + N], with log-probs and rewards
  frozen: dict | None  # role -> obj.Head: each frozen model's [B·G, P + N − 1, H] hidden states
  drift: jax.Array | None  # self_distill: KL of the teacher's weights from the current ones


class FrozenModel(NamedTuple):
  """A model the step reads but does not train, split once."""

  graphdef: nnx.GraphDef
  state: nnx.State
  kernel: jax.Array  # its LM head [D, V]

  @classmethod
  def of(cls, model: nnx.Module) -> "FrozenModel":
    graphdef, state = nnx.split(model)
    return cls(graphdef, state, head_kernel(graphdef, state))

  def model(self) -> nnx.Module:
    """The module again (it shares the state's arrays), for evaluation."""
    return nnx.merge(self.graphdef, self.state)


def self_teacher_weights(recipe: recipes.Recipe, role: str, params, extra, frozen: dict):
  """The weights a self-distillation role reads: the current parameters, the EMA (kept in
  `extra`), or the initial weights (`frozen[role]`)."""
  kind = recipe.self_teacher.kind(role)
  return params if kind == "current" else extra["ema"] if kind == "ema" else frozen[role].state


class Rollouts:
  """Samples and scores the rollouts of one run (see the module docstring)."""

  def __init__(
      self,
      config,
      run_setup,
      *,
      graphdef: nnx.GraphDef,  # the student's
      teacher: nnx.Module | None,  # the external teacher, which SeqKD and GKD sample from
      frozen: dict[str, FrozenModel],  # section name -> model
      data,  # the stream of this process's prompt batches
      train_set,
      batch_sharding,
      sample_shardings,  # the student's layout while it samples (sampling.layout), or None
  ):
    self.config, self.run_setup, self.recipe = config, run_setup, run_setup.recipe
    self.graphdef, self.teacher, self.frozen = graphdef, teacher, frozen
    self.data, self.train_set = data, train_set
    self.batch_sharding, self.sample_shardings = batch_sharding, sample_shardings
    self.key = jax.random.key(config.seed)
    self.sampling = sampling_params(config)
    self.routed_kernels = {  # routed teachers' heads stacked once: [ΣD, V] (route_hidden)
        role: jax.device_put(
            jnp.concatenate([frozen[n].kernel for n in members(run_setup, role)]),
            routed_kernel_sharding(
                run_setup,
                sum(run_setup.model_configs[n].hidden_size for n in members(run_setup, role)),
            ),
        )
        for role in self.recipe.roles
        if len(members(run_setup, role)) > 1
    }

  def _put(self, tree):
    return jax.device_put(tree, self.batch_sharding)

  def _to_global(self, local):
    return distributed.global_batch(local, self.batch_sharding)

  def sample(self, step: int, params) -> Sampled:
    """Draws step `step`'s prompts and dispatches their completions (dataset answers, or
    samples of the teacher or of the student with `params`); nothing is read back yet."""
    recipe = self.recipe
    batch = next(self.data)
    local = repeat_rows(batch, recipe.group_size)  # a group's rows share a prompt
    rows = self._to_global(local)
    source = recipe.source_at(self.config.seed, step)
    if source == "dataset":
      return Sampled(local, rows, None)
    if source == "teacher":
      model = self.teacher
    else:
      if self.sample_shardings is not None:
        params = jax.device_put(params, self.sample_shardings)
      model = nnx.merge(self.graphdef, params)
    unique = self._to_global({k: batch[k] for k in ("prompt_tokens", "prompt_mask")})
    gen = generate(
        model,
        unique["prompt_tokens"],
        unique["prompt_mask"],
        key=jax.random.fold_in(self.key, step),
        max_new_tokens=self.config.task.completion_length,
        sampling=self.sampling,
        num_samples=recipe.group_size,
        fuse_projections=FUSE_SETTINGS[self.config.sampling.fuse_projections],
    )  # one prefill per prompt
    return Sampled(local, rows, gen)

  def score(self, sampled: Sampled, params, extra) -> Rollout:
    """The rollout a step trains on: the completions joined to their prompts (with their
    rewards, read back and verified on the host), and the frozen models' hidden states."""
    recipe = self.recipe
    local, rows, gen = sampled
    prompts, prompt_mask = rows["prompt_tokens"], rows["prompt_mask"]
    if gen is None:
      seq = join(prompts, prompt_mask, rows["answer_tokens"], rows["answer_mask"])
    else:
      rewards = None
      if recipe.reward:  # each process scores its own rows
        answers = [self.train_set.answers[i] for i in local["index"]]
        scorer = evaluation.REWARDS[recipe.reward]
        tokenizer = self.run_setup.tokenizer
        rewards = self._to_global(np.asarray(scorer(tokenizer, gen, answers), np.float32))
      seq = join(
          prompts,
          prompt_mask,
          gen.tokens,
          gen.mask,
          gen.sample_logprobs,
          gen.model_logprobs,
          rewards,
      )
    seq = self._put(seq)
    if recipe.self_teacher:
      return Rollout(seq, *self._self_teacher_heads(rows, params, extra, seq))
    return Rollout(seq, self._frozen_heads(*recipes.inputs_of(seq), rows, local), None)

  def _frozen_heads(self, tokens, mask, rows, local):
    """`{role: Head}` of a rollout: each frozen model's `[B, T, H]` hidden states (never
    `[B, T, V]`), laid out as the memory plan compiled the step; routed teachers as one."""
    heads = {}
    for role in self.recipe.roles:
      names = members(self.run_setup, role)
      if len(names) == 1:
        model = self.frozen[names[0]]
        hidden = forward_hidden(model.graphdef, model.state, tokens, mask)
        heads[role] = obj.Head(self._put(hidden), model.kernel)
        continue
      # Each teacher runs on its own rows only; the route is read from the host batch (every
      # process's rows), not copied back from the device.
      route = distributed.all_rows(local["route"])
      hidden = []
      for k, name in enumerate(names):
        model = self.frozen[name]
        gather, scatter = own_rows(route, k)
        if gather.size:
          hidden.append(
              forward_hidden_rows(model.graphdef, model.state, tokens, mask, gather, scatter)
          )
        else:
          hidden.append(jnp.zeros(tokens.shape + model.kernel.shape[:1], model.kernel.dtype))
      routed = route_hidden(hidden, rows["route"])
      heads[role] = obj.Head(self._put(routed), self.routed_kernels[role])
    return heads or None

  def _self_teacher_heads(self, rows, params, extra, seq):
    """Self-distillation: each role is the student's graph with its weights (initial,
    current or EMA) reading the privileged prompt + the student's completion, its hidden
    states moved to the student's completion positions. Also the drift of the first
    non-current role from the current weights on that same input."""
    recipe, graphdef = self.recipe, self.graphdef
    prompt_length = self.config.task.prompt_length
    privileged = join(
        rows["privileged_tokens"],
        rows["privileged_mask"],
        seq.tokens[:, prompt_length:],
        seq.attention_mask[:, prompt_length:],
    )
    moved = lambda weights: self._put(
        privileged_hidden(
            graphdef,
            weights,
            privileged,
            prompt_length=prompt_length,
            completion_length=self.config.task.completion_length,
        )
    )
    kind = recipe.self_teacher.kind
    heads = {}
    for role in recipe.roles:
      weights = self_teacher_weights(recipe, role, params, extra, self.frozen)
      kernel = (
          self.frozen[role].kernel if kind(role) == "initial" else head_kernel(graphdef, weights)
      )
      heads[role] = obj.Head(moved(weights), kernel)
    drifting = [r for r in recipe.roles if kind(r) != "current"]
    if not drifting:
      return heads, None
    current = next((heads[r] for r in recipe.roles if kind(r) == "current"), None)
    if current is None:  # no role holds the current weights: one more forward
      current = obj.Head(moved(params), head_kernel(graphdef, params))
    return heads, drift_kl(heads[drifting[0]], current, recipes.targets_of(seq))
