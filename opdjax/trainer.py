"""The training loop every recipe plugs into: build, validate, (resume,) train, evaluate, save.

One step: take a prompt batch (grain), produce completions (dataset answers, teacher or
student samples, per the recipe), score them with the teacher (no gradient), update the
student with the recipe's loss (one jitted step with explicit shardings), log, evaluate
and checkpoint. Rollouts are reused for `train.updates_per_rollout` updates.

With `train.rollout_ahead`, the next rollout is sampled from the parameters an update
starts from and dispatched before that update, so its host work (reading the completions
back, verifying rewards, the next batch) runs while the device updates. It is then one
update stale, and the recipe's importance correction accounts for it. The rollout after a
checkpoint is sampled on-policy, as a resumed run would, so a resume is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from opdjax import checkpoint, distributed, evaluation, memory, metrics, recipes, sharding
from opdjax import objectives as obj
from opdjax.data import (
    PromptSet,
    PromptSource,
    batches,
    char_tokenizer,
    encode,
    load_jsonl,
    stream,
    synthetic_records,
)
from opdjax.errors import ConfigError
from opdjax.evaluation import (
    evaluate,
    forward_hidden,
    forward_hidden_rows,
    own_rows,
    privileged_hidden,
)
from opdjax.models import Decoder, ModelConfig, load_pretrained, load_tokenizer, read_config
from opdjax.models.decoder import (
    ATTENTION_IMPLEMENTATIONS,
    REMAT_POLICIES,
    stack_layers,
    unstack_layers,
)
from opdjax.models.hf import abstract_model
from opdjax.recipes.base import batch_loss, frozen_argument, join
from opdjax.recipes.self_distill import ema_update
from opdjax.sampling import Generation, SamplingParams, generate

# Model shapes for the synthetic experiments (vocabulary and special ids come from the
# tokenizer). Width, depth and heads only: a Qwen3-style decoder.
MODEL_PRESETS = {
    "student-tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    ),
    "student-small": dict(
        hidden_size=96,
        intermediate_size=288,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=24,
    ),
    "teacher-small": dict(
        hidden_size=128,
        intermediate_size=384,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    ),
}


ASYNC_CHECKPOINTING = ("auto", "on", "off")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf; the run stopped without saving."""


@dataclasses.dataclass
class RunResult:
  workdir: Path
  history: list[dict]
  final_eval: dict[str, float]
  plot: Path | None


# ---------------------------------------------------------------- building blocks


def _dtype(name: str):
  if name not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype and param_dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def build_tokenizer(config):
  if config.student.hf_path:
    tokenizer = load_tokenizer(config.student.hf_path)
    if tokenizer is None:
      raise ConfigError(f"student.hf_path {config.student.hf_path} has no tokenizer files")
    return tokenizer
  return char_tokenizer()


def build_data(config, tokenizer, routes=None, privileged=None) -> tuple[PromptSource, PromptSet]:
  """The training prompts (tokenised as they are read) and the held-out set (tokenised now).

  With `routes` (the routed teachers' names) every example must name one of them; with
  `privileged=(template, length)` the training rows and the held-out set carry the
  self-distillation teacher's prompt.
  Every process checks an interleaved 1/N of the training records at start-up, so a record
  that does not fit stops the run before the first step, and no host tokenises them all."""
  task = config.task
  length = dict(
      prompt_length=task.prompt_length, answer_length=task.completion_length, routes=routes
  )
  if task.train_jsonl:
    eval_path = task.eval_jsonl or task.train_jsonl
    train = PromptSource(
        load_jsonl(task.train_jsonl, tokenizer),
        tokenizer,
        source=task.train_jsonl,
        privileged=privileged,
        **length,
    )
    held_out = encode(
        load_jsonl(eval_path, tokenizer)[: task.eval_size],
        tokenizer,
        source=eval_path,
        privileged=privileged,
        **length,
    )
  else:
    make = lambda size, held_out: synthetic_records(
        task.name, difficulty=task.difficulty, size=size, held_out=held_out, seed=task.seed
    )
    train = PromptSource(
        make(task.train_size, False),
        tokenizer,
        source=f"{task.name}/train",
        privileged=privileged,
        **length,
    )
    held_out = encode(
        make(task.eval_size, True),
        tokenizer,
        source=f"{task.name}/held_out",
        privileged=privileged,
        **length,
    )
  train.check(range(jax.process_index(), len(train), jax.process_count()))
  return train, held_out


def model_config_of(model_config, tokenizer) -> ModelConfig:
  """The `ModelConfig` a `student`/`teacher` config section describes (no parameters)."""
  if model_config.hf_path:
    return read_config(model_config.hf_path)
  if model_config.get("checkpoint"):
    return checkpoint.read_model_config(model_config.checkpoint)
  if model_config.get("init_from"):
    return checkpoint.read_model_config(model_config.init_from)
  if model_config.preset not in MODEL_PRESETS:
    raise ConfigError(
        f"unknown model preset {model_config.preset!r}; valid: {sorted(MODEL_PRESETS)}"
    )
  return ModelConfig(
      vocab_size=len(tokenizer),
      model_type="qwen3",
      eos_token_ids=(tokenizer.eos_token_id,),
      pad_token_id=tokenizer.pad_token_id,
      max_position_embeddings=512,
      **MODEL_PRESETS[model_config.preset],
  )


def build_model(
    model_config, config_of: ModelConfig, *, seed: int, mesh, rules=sharding.DEFAULT_RULES
):
  """A model on `mesh`: from a HF directory, an earlier run's checkpoint, or a fresh init.

  Parameters are stored in the section's `param_dtype` and computed in its `dtype`, with
  its layer layout (`scan_layers`, `remat`); a checkpoint saved in the other layer layout is
  converted on restore. Parameters are laid out on `mesh` by the partition `rules`."""
  kwargs = _model_kwargs(model_config, mesh)
  if model_config.hf_path:
    model, _ = load_pretrained(model_config.hf_path, rules=rules, with_tokenizer=False, **kwargs)
    return model
  source = model_config.get("checkpoint") or model_config.get("init_from")
  if source:  # restore straight into the shardings; no throw-away random init
    graphdef, abstract = nnx.split(abstract_model(config_of, **kwargs))
    return nnx.merge(
        graphdef,
        restore_either_layout(source, abstract, mesh, rules, scanned=kwargs["scan_layers"]),
    )
  graphdef, state = nnx.split(Decoder(config_of, rngs=nnx.Rngs(seed), **kwargs))
  return nnx.merge(graphdef, sharding.place_state(state, mesh, rules))


def restore_either_layout(source, abstract, mesh, rules=sharding.DEFAULT_RULES, *, scanned: bool):
  """A run's parameters restored into `abstract`'s layer layout (`scanned` or per-layer),
  whichever of the two layouts the checkpoint was saved in."""
  try:
    return checkpoint.restore_params(source, sharding.abstract_state(abstract, mesh, rules))
  except (ValueError, KeyError):
    convert, back = (unstack_layers, stack_layers) if scanned else (stack_layers, unstack_layers)
    other = jax.eval_shape(convert, abstract)
    restored = checkpoint.restore_params(source, sharding.abstract_state(other, mesh, rules))
    return sharding.place_state(back(restored), mesh, rules)


def build_mesh(config):
  shape, axes = tuple(config.mesh.shape), tuple(config.mesh.axes)
  unknown = [a for a in axes if a not in sharding.MESH_AXES]
  if unknown:
    raise ConfigError(
        f"mesh.axes {axes} has unknown names {unknown}; valid: " f"{', '.join(sharding.MESH_AXES)}"
    )
  try:
    mesh = sharding.make_mesh(shape, axes)
  except ValueError as e:
    raise ConfigError(
        f"mesh: {e} ({jax.process_count()} process(es) with "
        f"{jax.local_device_count()} device(s) each)"
    ) from None
  if jax.process_count() > 1 and mesh.devices.size != jax.device_count():
    raise ConfigError(
        f"mesh.shape={shape} uses {mesh.devices.size} of the {jax.device_count()} "
        f"devices of {jax.process_count()} process(es); a run uses all of them "
        "(use -1 for the remaining devices)"
    )
  return mesh


def build_rules(config):
  """The config's partition rules as `(regex, PartitionSpec)` pairs."""
  try:
    return sharding.partition_rules(config.sharding.rules)
  except ValueError as e:
    raise ConfigError(f"sharding.rules: {e}") from None


def validate(config, recipe, mesh, model_configs: dict[str, ModelConfig]):
  """Every check that needs no parameters; `model_configs` maps each model role (`student`,
  `teacher` or `teacher/NAME` per routed teacher, `reference`) to its `ModelConfig`."""
  train = config.train
  student_cfg = model_configs["student"]
  sampler = config.sampling
  off_policy = [
      why
      for why, on in (
          (f"sampling.temperature={sampler.temperature}", sampler.temperature != 1.0),
          (f"sampling.top_k={sampler.top_k}", bool(sampler.top_k)),
          (f"sampling.top_p={sampler.top_p}", sampler.top_p < 1.0),
          (f"train.updates_per_rollout={train.updates_per_rollout}", train.updates_per_rollout > 1),
          ("train.rollout_ahead=True", train.get("rollout_ahead", False)),
      )
      if on
  ]
  if recipe.correction == "none" and off_policy:
    raise ConfigError(
        f"the sampled estimator is off-policy here ({', '.join(off_policy)}): the "
        "sampler's distribution is not the learner's, so recipe.correction='none' "
        "would train biased; set recipe.correction to plain, truncated or ppo_clip"
    )
  if train.get("rollout_ahead", False):
    if recipe.source != "student":
      source = "GKD's coin" if callable(recipe.source) else repr(recipe.source)
      raise ConfigError(
          f"train.rollout_ahead=True samples the next rollout from the student ahead of the "
          f"update, but recipe {recipe.name!r} takes its completions from {source}; it "
          "applies to recipes that sample from the student: opd, gopd, grpo"
      )
    if recipe.self_teacher:
      raise ConfigError(
          "train.rollout_ahead=True does not apply to self_distill: its teacher is formed "
          "from the student's weights when the rollout is scored, which would be a step stale"
      )
  for role in ("student", "teacher", "reference"):
    if config[role].attention not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(
          f"{role}.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got "
          f"{config[role].attention!r}"
      )
    if config[role].attention == "splash" and jax.default_backend() != "tpu":
      warnings.warn(
          f"{role}.attention='splash' is a TPU kernel; on {jax.default_backend()} it runs in "
          "Pallas's interpret mode (exact, and far slower: for tests)",
          stacklevel=2,
      )
    if config[role].get("remat", "none") not in REMAT_POLICIES:
      raise ConfigError(
          f"{role}.remat must be one of {tuple(REMAT_POLICIES)}, got " f"{config[role].remat!r}"
      )
  if recipe.needs_teacher or recipe.source == "teacher":
    if not any(role.partition("/")[0] == "teacher" for role in model_configs):
      raise ConfigError(
          f"recipe {recipe.name!r} needs a teacher: set teacher.checkpoint "
          "(an earlier run's workdir) or teacher.hf_path, or teachers.NAME.*"
      )
  for role, other in model_configs.items():
    if role != "student" and other.vocab_size != student_cfg.vocab_size:
      raise ConfigError(
          f"student and {role} vocabularies differ: student vocab_size="
          f"{student_cfg.vocab_size}, {role} vocab_size={other.vocab_size}"
      )
  data_devices = sharding.row_splits(mesh)
  rows = train.batch_size * recipe.group_size
  if rows % data_devices:
    grouped = (
        f" (x recipe.group_size={recipe.group_size} = {rows} rows)" if recipe.group_size > 1 else ""
    )
    raise ConfigError(
        f"train.batch_size={train.batch_size}{grouped} is not divisible by the "
        f"{data_devices} data-parallel devices of mesh {dict(mesh.shape)}"
    )
  if recipe.group_size > 1 and recipe.source != "student":
    raise ConfigError(f"recipe {recipe.name!r} samples groups, so its source must be the student")
  if config.task.eval_size % data_devices:
    raise ConfigError(
        f"task.eval_size={config.task.eval_size} is not divisible by the "
        f"{data_devices} data-parallel devices of mesh {dict(mesh.shape)}"
    )
  for name in (
      "steps",
      "batch_size",
      "updates_per_rollout",
      "save_every",
      "log_every",
      "microbatches",
  ):
    if train[name] < 1:
      raise ConfigError(f"train.{name} must be >= 1, got {train[name]}")
  if rows % train.microbatches:
    raise ConfigError(
        f"train.batch_size={train.batch_size} ({rows} rows) is not divisible by "
        f"train.microbatches={train.microbatches}"
    )
  if recipe.group_size > 1 and rows % (train.microbatches * recipe.group_size):
    raise ConfigError(
        f"train.microbatches={train.microbatches} would split a group of "
        f"{recipe.group_size} samples: {rows} rows must divide into "
        f"micro-batches of whole groups"
    )
  if sampler.get("layout", "train") not in sharding.SAMPLING_LAYOUTS:
    raise ConfigError(
        f"sampling.layout must be one of {sharding.SAMPLING_LAYOUTS}, got " f"{sampler.layout!r}"
    )
  if train.get("async_checkpointing", "auto") not in ASYNC_CHECKPOINTING:
    raise ConfigError(
        f"train.async_checkpointing must be one of {ASYNC_CHECKPOINTING}, got "
        f"{train.async_checkpointing!r}"
    )
  if rows % jax.process_count() or config.task.eval_size % jax.process_count():
    raise ConfigError(
        f"train.batch_size={train.batch_size} ({rows} rows) and task.eval_size="
        f"{config.task.eval_size} must divide among the {jax.process_count()} "
        "processes"
    )
  if train.loss_chunk_size < 0:
    raise ConfigError(f"train.loss_chunk_size must be >= 0 (0 = auto), got {train.loss_chunk_size}")
  if config.eval.batch_size < 1:
    raise ConfigError(f"eval.batch_size must be >= 1, got {config.eval.batch_size}")
  if train.save_every % train.updates_per_rollout:
    raise ConfigError(
        f"train.save_every={train.save_every} must be a multiple of "
        f"train.updates_per_rollout={train.updates_per_rollout} (a checkpoint "
        "must not fall in the middle of a reused rollout)"
    )
  if recipe.self_teacher:
    length = privileged_length(config)
    if length < 1 or length + config.task.completion_length > student_cfg.max_position_embeddings:
      raise ConfigError(
          f"recipe.privileged_length={length} must be >= 1 and, with "
          f"task.completion_length, fit the student's max_position_embeddings="
          f"{student_cfg.max_position_embeddings}"
      )
  if (
      config.task.prompt_length + config.task.completion_length
      > student_cfg.max_position_embeddings
  ):
    raise ConfigError(
        f"task.prompt_length + task.completion_length exceeds the student's "
        f"max_position_embeddings={student_cfg.max_position_embeddings}"
    )


def make_optimizer(config) -> optax.GradientTransformation:
  opt = config.optimizer
  if opt.schedule not in ("cosine", "constant"):
    raise ConfigError(f"optimizer.schedule must be 'cosine' or 'constant', got {opt.schedule!r}")
  if opt.warmup_steps < 0:
    raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
  decay_steps = max(config.train.steps - opt.warmup_steps, 1)
  after_warmup = (
      optax.cosine_decay_schedule(opt.learning_rate, decay_steps, alpha=opt.final_lr_fraction)
      if opt.schedule == "cosine"
      else optax.constant_schedule(opt.learning_rate)
  )
  lr = (  # update 0 takes the full rate when there is no warm-up
      optax.join_schedules(
          [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), after_warmup],
          [opt.warmup_steps],
      )
      if opt.warmup_steps
      else after_warmup
  )
  name = opt.get("name", "adamw")
  if name == "adamw":
    update = optax.adamw(lr, b1=0.9, b2=0.98, weight_decay=opt.weight_decay)
  elif name == "sgd":
    update = optax.sgd(lr)
  else:
    raise ConfigError(f"optimizer.name must be 'adamw' or 'sgd', got {name!r}")
  return optax.chain(optax.clip_by_global_norm(opt.grad_clip), update)


def make_train_step(
    graphdef,
    recipe,
    tx,
    param_shardings,
    opt_shardings,
    *,
    microbatches: int = 1,
    chunk_size: int = 0,
):
  """`(params, opt_state, seq, frozen) -> (params, opt_state, metrics)`, jitted.

  `frozen` is `{role: Head}` for the recipe's roles (their hidden states and heads, computed
  once per rollout), or None. The student runs to its final hidden states and the loss is
  computed from them in token chunks (`recipes.base.batch_loss`: one pass when the recipe
  names its `loss_value`, else a rematerialised scan), so no `[B, T, V]` array is formed.
  With `microbatches = M` the batch is split into M row blocks whose gradients are summed
  in a `lax.scan`; the loss is normalised by the whole batch's completion tokens (or rows,
  for a recipe's sequence mean), so the update equals the whole-batch one.
  """

  def grads_of(params, seq, frozen_hidden, frozen_kernels, num_tokens, num_rows):
    tokens, mask = recipes.inputs_of(seq)
    targets = recipes.targets_of(seq)
    frozen = {role: obj.Head(frozen_hidden[role], frozen_kernels[role]) for role in recipe.roles}

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      student = obj.Head(model.hidden_states(tokens, attention_mask=mask), model.head_kernel())
      return batch_loss(
          recipe,
          student,
          frozen_argument(recipe, frozen),
          targets,
          num_tokens=num_tokens,
          num_rows=num_rows,
          chunk_size=chunk_size,
      )

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads

  def step(params, opt_state, seq, frozen):
    frozen = frozen or {}
    hidden = {role: head.hidden for role, head in frozen.items()}
    kernels = {role: head.kernel for role, head in frozen.items()}
    targets = recipes.targets_of(seq)
    num_tokens = jnp.maximum(jnp.sum(targets.mask), 1).astype(jnp.float32)
    num_rows = jnp.float32(seq.tokens.shape[0])
    if microbatches == 1:
      loss, step_metrics, grads = grads_of(params, seq, hidden, kernels, num_tokens, num_rows)
    else:
      split = lambda x: x.reshape((microbatches, x.shape[0] // microbatches) + x.shape[1:])
      blocks = jax.tree.map(split, (seq, hidden))

      def accumulate(total, block):
        out = grads_of(params, *block, kernels, num_tokens, num_rows)
        return jax.tree.map(jnp.add, total, out), None

      first = jax.tree.map(lambda x: x[0], blocks)
      zeros = jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype),
          jax.eval_shape(grads_of, params, *first, kernels, num_tokens, num_rows),
      )
      (loss, step_metrics, grads), _ = jax.lax.scan(accumulate, zeros, blocks)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    step_metrics = dict(
        step_metrics,
        loss=(loss, jnp.float32(1)),
        grad_norm=(optax.tree.norm(grads), jnp.float32(1)),
        completion_tokens=(jnp.sum(targets.mask), jnp.float32(seq.tokens.shape[0])),
    )
    return params, opt_state, step_metrics

  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_shardings, opt_shardings, None))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def head_kernel(graphdef, state) -> jax.Array:
  """A frozen model's `[D, V]` LM head (jitted, so the memory plan's compiled step sees the
  layout the run passes it)."""
  return nnx.merge(graphdef, state).head_kernel()


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


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ---------------------------------------------------------------- the run


class Sampled(NamedTuple):
  """A rollout's completions, dispatched but not read back (`train.rollout_ahead`)."""

  batch: dict  # this process's prompt rows (host): prompt_tokens [b, P], index [b], ...
  rows: dict  # the global batch, each prompt repeated for its group: [B·G, ...]
  gen: Generation | None  # [B·G, N] completions; None for dataset answers


class Rollout(NamedTuple):
  """What a step trains on, kept while the rollout is reused."""

  seq: recipes.Sequences  # prompt + completion [B·G, P + N], with log-probs and rewards
  frozen: dict | None  # role -> obj.Head: each frozen model's [B·G, P + N, H] hidden states
  drift: jax.Array | None  # self_distill: KL of the teacher's weights from the current ones


@dataclasses.dataclass
class Setup:
  """What a run decides before it allocates anything."""

  recipe: recipes.Recipe
  tokenizer: object
  mesh: object
  rules: tuple  # (regex, PartitionSpec) partition rules of every model
  sections: dict  # role -> config section of each model the run builds
  model_configs: dict  # role -> ModelConfig
  routes: tuple = ()  # routed teachers' names; row route k -> section teacher/routes[k]


def setup(config) -> Setup:
  """Builds the recipe, tokenizer and mesh, reads every model's config and validates."""
  recipe = recipes.build(config.recipe)
  tokenizer = build_tokenizer(config)
  mesh = build_mesh(config)
  rules = build_rules(config)
  sections = {"student": config.student}
  routes = routes_of(config)
  external_teacher = bool(config.teacher.hf_path or config.teacher.checkpoint)
  if external_teacher:
    if routes:
      raise ConfigError(
          f"set either teacher.* (one teacher) or teachers.* (routed: " f"{list(routes)}), not both"
      )
    sections["teacher"] = config.teacher
  if routes:
    if not recipe.needs_teacher:
      raise ConfigError(
          f"recipe {recipe.name!r} reads no teacher, so teachers {list(routes)} " "would be unused"
      )
    if recipe.source not in ("student", "dataset"):
      raise ConfigError(
          f"routing between teachers needs a recipe whose completions come from "
          f"the student or the dataset; {recipe.name!r} samples from a teacher"
      )
    for name in routes:
      sections[f"teacher/{name}"] = config.teachers[name]
  if "reference" in recipe.roles:
    # The reference (G-OPD) is the section's model, or else the student's initial weights.
    own = bool(config.reference.hf_path or config.reference.checkpoint)
    sections["reference"] = config.reference if own else config.student
  if recipe.self_teacher:  # the frozen roles are the student's own weights
    if external_teacher or routes:
      raise ConfigError(
          f"recipe {recipe.name!r} is its own teacher (recipe.teacher_mode); "
          "unset teacher.* and teachers.*"
      )
    for role, _ in recipe.self_teacher.weights:
      sections[role] = config.student
  model_configs = {role: model_config_of(section, tokenizer) for role, section in sections.items()}
  validate(config, recipe, mesh, model_configs)
  return Setup(recipe, tokenizer, mesh, rules, sections, model_configs, routes)


def privileged_length(config) -> int:
  """Tokens of the self-distillation teacher's prompt (0 in the config: the prompt, the
  answer (at most `completion_length`) and 32 for the template)."""
  return int(
      config.recipe.get("privileged_length", 0)
      or config.task.prompt_length + config.task.completion_length + 32
  )


def routes_of(config) -> tuple[str, ...]:
  """The routed teachers' names (sorted: a row's route is an index into this), or ()."""
  return tuple(sorted(config.get("teachers") or {}))


def members(run_setup: "Setup", role: str) -> list[str]:
  """The sections that make up a frozen role: the routed teachers for `teacher` when the
  run routes, else the role itself."""
  if role == "teacher" and run_setup.routes:
    return [f"teacher/{name}" for name in run_setup.routes]
  return [role]


def _model_kwargs(section, mesh) -> dict:
  return dict(
      dtype=_dtype(section.dtype),
      param_dtype=_dtype(section.param_dtype),
      attention=section.attention,
      scan_layers=bool(section.get("scan_layers", False)),
      remat=section.get("remat", "none"),
      mesh=mesh,  # where "splash" attention runs its shard_map
  )


def format_layout(run_setup: Setup) -> str:
  """The mesh, the partition rules and where each student parameter lands (`--dry_run`)."""
  mesh, rules = run_setup.mesh, run_setup.rules
  lines = [
      f"mesh {dict(mesh.shape)}: {mesh.devices.size} device(s), {jax.process_count()} "
      f"process(es); batch rows split over {sharding.batch_sharding(mesh).spec[0]}",
      "partition rules (first match wins):",
  ]
  lines += [f"  {pattern:34s} {spec}" for pattern, spec in rules]
  _, state = nnx.split(
      abstract_model(
          run_setup.model_configs["student"],
          **_model_kwargs(run_setup.sections["student"], run_setup.mesh),
      )
  )
  placed = {}
  for path, variable in nnx.to_flat_state(state):
    name = sharding.path_string(path)
    shape = variable.get_value().shape
    spec = sharding.spec_for(name, shape, mesh, rules)
    placed.setdefault(re.sub(r"layers/\d+/", "layers/*/", name), (shape, spec))
  lines.append("student parameters (shape -> spec on this mesh):")
  lines += [f"  {name:40s} {str(shape):18s} {spec}" for name, (shape, spec) in placed.items()]
  return "\n".join(lines)


def routed_kernel_sharding(run_setup: Setup, width: int):
  """The layout of routed teachers' stacked `[ΣD, V]` head: the partition rules' LM head."""
  vocab = run_setup.model_configs["student"].vocab_size
  return sharding.sharding_for("lm_head/kernel", (width, vocab), run_setup.mesh, run_setup.rules)


def abstract_split(run_setup: Setup, role: str):
  """`(graphdef, ShapeDtypeStructs with shardings)` of the model section `role`: its layout
  on the run's mesh, from shapes alone."""
  section = run_setup.sections[role]
  graphdef, state = nnx.split(
      abstract_model(run_setup.model_configs[role], **_model_kwargs(section, run_setup.mesh))
  )
  return graphdef, sharding.abstract_state(state, run_setup.mesh, run_setup.rules)


def abstract_optimizer_state(tx, params, mesh):
  """`tx.init(params)` as ShapeDtypeStructs with the shardings `sharding.init_optimizer` gives."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(tx.init, params),
      sharding.optimizer_shardings(tx, params, mesh),
  )


class Plan(NamedTuple):
  terms: dict[str, int]  # per-device bytes of each part of a step
  train_step: Callable  # the compiled step; the run calls it (so it compiles once)


def memory_plan(config, run_setup: Setup) -> Plan:
  """Per-device bytes of each part of a step (`opdjax.memory`), from shapes alone: nothing
  is allocated. The train step is compiled here, and the run calls that executable, which
  refuses (rather than recompiles) arguments laid out otherwise."""
  recipe, mesh = run_setup.recipe, run_setup.mesh
  abstract = {}
  for role in run_setup.sections:
    if role != "student" and role.partition("/")[0] not in recipe.roles:
      continue
    abstract[role] = abstract_split(run_setup, role)
  graphdef, params = abstract["student"]
  tx = make_optimizer(config)
  opt_state = abstract_optimizer_state(tx, params, mesh)
  terms = {
      "student parameters": memory.per_device_bytes(params),
      "optimizer state": memory.per_device_bytes(opt_state),
  }
  rows = config.train.batch_size * recipe.group_size
  length = config.task.prompt_length + config.task.completion_length
  batch = sharding.batch_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch)
  seq = recipes.Sequences(
      tokens=spec((rows, length), jnp.int32),
      attention_mask=spec((rows, length), bool),
      completion_mask=spec((rows, length), bool),
      behaviour_logprobs=spec((rows, length), jnp.float32),
      model_logprobs=spec((rows, length), jnp.float32),
      rewards=spec((rows,), jnp.float32),
  )
  frozen = {}
  for role in recipe.roles:
    names = members(run_setup, role)
    terms[f"{role} parameters"] = sum(memory.per_device_bytes(abstract[n][1]) for n in names)
    widths = [run_setup.model_configs[n].hidden_size for n in names]
    dtype = jnp.result_type(*[_dtype(run_setup.sections[n].dtype) for n in names])
    kernels = [
        jax.eval_shape(functools.partial(head_kernel, abstract[n][0]), abstract[n][1])
        for n in names
    ]
    if len(names) == 1:
      kernel_sharding = head_kernel.lower(*abstract[role]).compile().output_shardings
    else:
      kernel_sharding = routed_kernel_sharding(run_setup, sum(widths))
    frozen[role] = obj.Head(
        spec((rows, length - 1, sum(widths)), dtype),
        jax.ShapeDtypeStruct(
            (sum(widths), kernels[0].shape[1]),
            jnp.result_type(*[k.dtype for k in kernels]),
            sharding=kernel_sharding,
        ),
    )
  if frozen:
    terms["frozen hidden states"] = memory.per_device_bytes([h.hidden for h in frozen.values()])
  sampled_rows = rows if recipe.source != "dataset" else 0
  if config.eval.every:
    sampled_rows = max(sampled_rows, min(config.eval.batch_size, config.task.eval_size))
  if sampled_rows:
    cfg = run_setup.model_configs["student"]
    data_devices = sharding.row_splits(mesh)
    itemsize = jnp.dtype(_dtype(config.student.dtype)).itemsize
    terms["KV cache (sampling)"] = (
        math.ceil(sampled_rows / data_devices)
        * length
        * cfg.num_layers
        * 2
        * cfg.num_kv_heads
        * cfg.head_dim
        * itemsize
    )
  step = make_train_step(
      graphdef,
      recipe,
      tx,
      jax.tree.map(lambda x: x.sharding, params),
      jax.tree.map(lambda x: x.sharding, opt_state),
      microbatches=config.train.microbatches,
      chunk_size=config.train.loss_chunk_size,
  )
  compiled = step.lower(params, opt_state, seq, frozen or None).compile()
  terms["train step temporaries"] = int(compiled.memory_analysis().temp_size_in_bytes)
  return Plan(terms, compiled)


def check_memory(config, run_setup: Setup, *, quiet: bool) -> Plan:
  """Prints the memory plan (unless quiet) and stops with one line if it does not fit."""
  plan = memory_plan(config, run_setup)
  terms = plan.terms
  limit = int(config.train.memory_limit_gb * 1e9) or memory.device_limit_bytes()
  if not quiet:
    print(memory.format_plan(terms, limit))
  memory.check(terms, limit)
  return plan


def run(config, workdir: str | Path, *, quiet: bool = False) -> RunResult:
  """Trains (or resumes, or returns a finished run from) `workdir`. See `opdjax/experiments/`."""
  workdir = checkpoint.resolve(workdir)
  run_setup = setup(config)
  recipe, tokenizer, mesh, rules = (
      run_setup.recipe,
      run_setup.tokenizer,
      run_setup.mesh,
      run_setup.rules,
  )
  main_process = distributed.is_main()
  student_cfg = run_setup.model_configs["student"]
  teacher_cfg = run_setup.model_configs.get("teacher")
  has_teacher = teacher_cfg is not None
  reference_cfg = run_setup.model_configs.get("reference")
  reference_section = run_setup.sections.get("reference")
  self_teacher = recipe.self_teacher
  train_set, eval_set = build_data(
      config,
      tokenizer,
      routes=run_setup.routes or None,
      privileged=(self_teacher.privileged, privileged_length(config)) if self_teacher else None,
  )
  if config.train.batch_size > len(train_set):
    raise ConfigError(
        f"train.batch_size={config.train.batch_size} exceeds the "
        f"{len(train_set)} training prompts"
    )
  if config.train.memory_limit_gb < 0:
    raise ConfigError(
        f"train.memory_limit_gb must be >= 0 (0 = the device's own limit), got "
        f"{config.train.memory_limit_gb}"
    )
  # Restored before anything is built or compiled: a finished run is reported as it is.
  async_save = {"on": True, "off": False}.get(
      config.train.async_checkpointing, jax.default_backend() != "cpu"
  )
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=async_save)
  tx = make_optimizer(config)
  student_graphdef, abstract_params = abstract_split(run_setup, "student")
  keeps_ema = bool(self_teacher) and any(kind == "ema" for _, kind in self_teacher.weights)
  restored = ckpt.restore_latest(
      abstract_params,
      abstract_optimizer_state(tx, abstract_params, mesh),
      {"ema": abstract_params} if keeps_ema else {},
  )
  if restored and restored[0] >= config.train.steps:
    ckpt.close()
    return report(workdir, recipe.name, quiet=quiet or not main_process)
  train_step = check_memory(config, run_setup, quiet=quiet or not main_process).train_step

  place = dict(mesh=mesh, rules=rules)
  if restored:  # the checkpoint's parameters and optimizer state: nothing to initialise or load
    graphdef = student_graphdef
  else:
    graphdef, params = nnx.split(
        build_model(config.student, student_cfg, seed=config.seed, **place)
    )
    opt_state = sharding.init_optimizer(tx, params, mesh)
  teacher = (
      build_model(config.teacher, teacher_cfg, seed=config.seed + 1, **place)
      if has_teacher
      else None
  )
  frozen_models = {}  # section name -> the frozen model the step reads
  for name in (n for role in recipe.roles for n in members(run_setup, role)):
    if self_teacher:  # the student's initial weights (also an EMA's start); none for current
      if self_teacher.kind(name) != "current":
        frozen_models[name] = build_model(config.student, student_cfg, seed=config.seed, **place)
    elif name == "teacher":
      frozen_models[name] = teacher
    elif name == "reference":  # same seed: a fresh copy of the student's initial weights
      frozen_models[name] = build_model(reference_section, reference_cfg, seed=config.seed, **place)
    else:  # a routed teacher, teacher/NAME
      frozen_models[name] = build_model(
          run_setup.sections[name], run_setup.model_configs[name], seed=config.seed + 1, **place
      )
  checkpoint.write_model_config(workdir, student_cfg)
  if main_process:  # the settings this run trains with, next to what it produces
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  batch_sharding = sharding.batch_sharding(mesh)
  frozen_parts = {}
  for name, model in frozen_models.items():
    model_def, state = nnx.split(model)
    frozen_parts[name] = (model_def, state, head_kernel(model_def, state))
  # An EMA teacher's weights: updated after every step, saved with the checkpoint.
  ema_role = (
      next((r for r, kind in self_teacher.weights if kind == "ema"), None) if self_teacher else None
  )
  extra = {"ema": frozen_parts[ema_role][1]} if ema_role else {}
  ema_step = (
      jax.jit(functools.partial(ema_update, rate=self_teacher.ema_rate), donate_argnums=0)
      if ema_role
      else None
  )
  routed_kernels = {  # routed teachers' heads stacked once: [ΣD, V] (objectives.route_hidden)
      role: jax.device_put(
          jnp.concatenate([frozen_parts[n][2] for n in members(run_setup, role)]),
          routed_kernel_sharding(
              run_setup,
              sum(run_setup.model_configs[n].hidden_size for n in members(run_setup, role)),
          ),
      )
      for role in recipe.roles
      if len(members(run_setup, role)) > 1
  }

  data = stream(
      batches(
          train_set,
          batch_size=config.train.batch_size,
          seed=config.seed,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
      )
  )
  writer = metrics.Writer(workdir, tensorboard=config.train.tensorboard, enabled=main_process)
  start = 0
  if restored:
    start, params, opt_state, meta, extra = restored
    data.set_state(meta["data_state"])  # a position in the global stream: one for all processes
    writer.truncate_after(start)
  total = config.train.steps
  base_key = jax.random.key(config.seed)
  eval_key = jax.random.key(config.seed + 1_000_003)
  sampling = SamplingParams(
      temperature=config.sampling.temperature,
      top_k=config.sampling.top_k,
      top_p=config.sampling.top_p,
  )
  completion_length, prompt_length = config.task.completion_length, config.task.prompt_length
  put = lambda tree: jax.device_put(tree, batch_sharding)
  to_global = lambda local: distributed.global_batch(local, batch_sharding)
  # The student's layout while it samples (sampling.layout): resharded once per rollout.
  sample_shardings = (
      None
      if config.sampling.layout == "train"
      else sharding.state_shardings(
          params, mesh, sharding.sampling_rules(rules, config.sampling.layout)
      )
  )

  # Routed teachers are evaluated each on its own held-out rows, as `NAME/metric`.
  routed_teachers = [
      n for n in members(run_setup, "teacher") if n.startswith("teacher/") and n in frozen_models
  ]

  def frozen_heads(tokens, mask, rows, batch):
    """`{role: Head}` of a rollout: each frozen model's `[B, T, H]` hidden states (never
    `[B, T, V]`), laid out as the memory plan compiled the step; routed teachers as one."""
    heads = {}
    for role in recipe.roles:
      names = members(run_setup, role)
      if len(names) == 1:
        hidden = forward_hidden(*frozen_parts[names[0]][:2], tokens, mask)
        heads[role] = obj.Head(put(hidden), frozen_parts[names[0]][2])
        continue
      # Each teacher runs on its own rows only; the route is read from the host batch (every
      # process's rows), not copied back from the device.
      route = distributed.all_rows(repeat_rows(batch, recipe.group_size)["route"])
      hidden = []
      for k, name in enumerate(names):
        graphdef_k, state_k, kernel_k = frozen_parts[name]
        gather, scatter = own_rows(route, k)
        if gather.size:
          hidden.append(forward_hidden_rows(graphdef_k, state_k, tokens, mask, gather, scatter))
        else:
          hidden.append(jnp.zeros(tokens.shape + kernel_k.shape[:1], kernel_k.dtype))
      heads[role] = obj.Head(put(route_hidden(hidden, rows["route"])), routed_kernels[role])
    return heads or None

  def self_teacher_weights(role, params, extra):
    kind = self_teacher.kind(role)
    return params if kind == "current" else extra["ema"] if kind == "ema" else frozen_parts[role][1]

  def run_eval(step, params, extra):
    evaluate_on = functools.partial(
        evaluate,
        nnx.merge(graphdef, params),
        tokenizer=tokenizer,
        key=eval_key,
        max_new_tokens=completion_length,
        temperature=config.eval.temperature,
        batch_size=config.eval.batch_size,
        chunk_size=config.train.loss_chunk_size,
        batch_sharding=batch_sharding,
    )
    if self_teacher:  # the teacher role's weights, reading the privileged prompts
      weights = nnx.merge(graphdef, self_teacher_weights("teacher", params, extra))
      results = evaluate_on(eval_set, teacher=weights, privileged=True)
    elif not routed_teachers:
      results = evaluate_on(eval_set, teacher=teacher)
    else:  # the unprefixed metrics: the teachers' values weighted by their rows
      results, counts = {}, {}
      for route, name in enumerate(routed_teachers):
        rows = eval_set.routed_to(route)
        if len(rows):
          counts[name] = len(rows)
          part = evaluate_on(rows, teacher=frozen_models[name])
          results |= {f"{name.split('/', 1)[1]}/{k}": v for k, v in part.items()}
      total = sum(counts.values())
      for key in {k.split("/", 1)[1] for k in results}:
        results[key] = sum(
            results[f"{n.split('/', 1)[1]}/{key}"] * c / total for n, c in counts.items()
        )
    writer.write(step, "eval", results)
    return results

  def self_teacher_heads(rows, params, extra, seq):
    """Self-distillation: each role is the student's graph with its weights (initial,
    current or EMA) reading the privileged prompt + the student's completion, its hidden
    states moved to the student's completion positions. Also the drift of the first
    non-current role from the current weights on that same input."""
    privileged = join(
        rows["privileged_tokens"],
        rows["privileged_mask"],
        seq.tokens[:, prompt_length:],
        seq.attention_mask[:, prompt_length:],
    )
    moved = lambda weights: put(
        privileged_hidden(
            graphdef,
            weights,
            privileged,
            prompt_length=prompt_length,
            completion_length=completion_length,
        )
    )
    heads = {}
    for role in recipe.roles:
      kind = self_teacher.kind(role)
      weights = self_teacher_weights(role, params, extra)
      kernel = frozen_parts[role][2] if kind == "initial" else head_kernel(graphdef, weights)
      heads[role] = obj.Head(moved(weights), kernel)
    drifting = [r for r in recipe.roles if self_teacher.kind(r) != "current"]
    if not drifting:
      return heads, None
    current = next((heads[r] for r in recipe.roles if self_teacher.kind(r) == "current"), None)
    if current is None:  # no role holds the current weights: one more forward
      current = obj.Head(moved(params), head_kernel(graphdef, params))
    return heads, drift_kl(heads[drifting[0]], current, recipes.targets_of(seq))

  def sample(step, params) -> Sampled:
    """Draws step `step`'s prompts and dispatches their completions (dataset answers, or
    samples of the teacher or of the student with `params`); nothing is read back yet."""
    batch = next(data)
    rows = to_global(repeat_rows(batch, recipe.group_size))  # a group's G rows share their prompt
    source = recipe.source_at(config.seed, step)
    if source == "dataset":
      return Sampled(batch, rows, None)
    if source == "teacher":
      model = teacher
    else:
      model = nnx.merge(
          graphdef, params if sample_shardings is None else jax.device_put(params, sample_shardings)
      )
    unique = to_global({k: batch[k] for k in ("prompt_tokens", "prompt_mask")})
    gen = generate(
        model,
        unique["prompt_tokens"],
        unique["prompt_mask"],
        key=jax.random.fold_in(base_key, step),
        max_new_tokens=completion_length,
        sampling=sampling,
        num_samples=recipe.group_size,
    )  # one prefill per prompt
    return Sampled(batch, rows, gen)

  def score(sampled: Sampled, params, extra) -> Rollout:
    """The rollout a step trains on: the completions joined to their prompts (with their
    rewards, read back and verified on the host), and the frozen models' hidden states."""
    batch, rows, gen = sampled
    prompts, prompt_mask = rows["prompt_tokens"], rows["prompt_mask"]
    if gen is None:
      seq = join(prompts, prompt_mask, rows["answer_tokens"], rows["answer_mask"])
    else:
      rewards = None
      if recipe.reward:  # each process scores its own rows
        answers = [train_set.answers[i] for i in repeat_rows(batch, recipe.group_size)["index"]]
        scorer = evaluation.REWARDS[recipe.reward]
        rewards = to_global(np.asarray(scorer(tokenizer, gen, answers), np.float32))
      seq = join(
          prompts,
          prompt_mask,
          gen.tokens,
          gen.mask,
          gen.sample_logprobs,
          gen.model_logprobs,
          rewards,
      )
    seq = put(seq)
    if self_teacher:
      return Rollout(seq, *self_teacher_heads(rows, params, extra, seq))
    # kept while the rollout is reused
    return Rollout(seq, frozen_heads(*recipes.inputs_of(seq), rows, batch), None)

  if start == 0 and config.eval.every and config.eval.at_start:
    run_eval(0, params, extra)
  accumulator = metrics.Accumulator()
  progress = tqdm(
      total=total,
      initial=start,
      desc=f"{recipe.name}",
      disable=quiet or not main_process,
      dynamic_ncols=True,
      mininterval=0.5,
  )
  last_eval = {}
  pending = []  # (step, on-device metrics) not yet read back: the host syncs only below
  rollout = ahead = None  # this step's Rollout; the next one's Sampled, when sampled ahead
  started, logged = time.perf_counter(), start  # the rates' clock and step at the last log

  def fail(message):
    progress.close()
    raise NonFiniteLossError(
        f"{message}; stopped without saving, the last good checkpoint "
        f"(step {ckpt.latest_step()}) in {ckpt.directory} is kept"
    )

  def read_back():
    for done_step, values in jax.device_get(pending):
      loss, grad_norm = float(values["loss"][0]), float(values["grad_norm"][0])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        fail(f"non-finite loss={loss} / grad_norm={grad_norm} at step {done_step}")
      accumulator.add(values)
    pending.clear()

  for step in range(start, total):
    fresh = step % config.train.updates_per_rollout == 0 or rollout is None
    if fresh:
      rollout = score(ahead if ahead is not None else sample(step, params), params, extra)
      ahead = None
    upcoming = step + 1
    if (  # sample the next rollout now, from the parameters this update starts from
        config.train.rollout_ahead
        and upcoming < total
        and upcoming % config.train.updates_per_rollout == 0
        and upcoming % config.train.save_every  # after a checkpoint: on-policy, as a resume is
    ):
      ahead = sample(upcoming, params)
    params, opt_state, step_metrics = train_step(params, opt_state, rollout.seq, rollout.frozen)
    if ema_step is not None:
      extra = {"ema": ema_step(extra["ema"], params)}
    if fresh and rollout.drift is not None:
      step_metrics = dict(step_metrics, teacher_drift_kl=rollout.drift)
    done = step + 1
    pending.append((done, step_metrics))
    progress.update(1)
    log_now = done % config.train.log_every == 0 or done == total
    eval_now = bool(config.eval.every) and (done % config.eval.every == 0 or done == total)
    save_now = done % config.train.save_every == 0 or done == total
    if log_now or eval_now or save_now:
      read_back()
    if log_now:
      means = accumulator.means()
      elapsed = max(time.perf_counter() - started, 1e-9)
      means["steps_per_s"] = (done - logged) / elapsed
      means["tokens_per_s"] = accumulator.sums["completion_tokens"] / elapsed  # trained tokens
      started, logged = time.perf_counter(), done
      writer.write(done, "train", means)
      accumulator.reset()
      progress.set_postfix(
          {k: f"{means[k]:.3g}" for k in ("loss", "token_reverse_kl", "nll") if k in means}
          | (
              {"acc": f"{last_eval['accuracy_greedy']:.2f}"}
              if "accuracy_greedy" in last_eval
              else {}
          )
      )
    if eval_now:
      evaluating = time.perf_counter()
      last_eval = run_eval(done, params, extra)
      started += time.perf_counter() - evaluating  # the rates count training time only
    if save_now:
      if not all_finite(params):
        fail(f"non-finite parameters after step {done}")
      ckpt.save(
          done,
          params,
          opt_state,
          {"step": done, "data_state": data.get_state(), "seed": config.seed},
          extra=extra,
      )
  progress.close()
  ckpt.close()  # waits for an asynchronous save
  writer.close()
  distributed.barrier("opdjax_run_end")  # process 0 has written everything

  return report(workdir, recipe.name, quiet=quiet or not main_process, redraw=True)


def report(workdir, recipe_name: str, *, quiet: bool, redraw: bool = False) -> RunResult:
  """A run's `RunResult` from its `metrics.jsonl`; process 0 draws `curves.png` of the
  held-out metrics (when `redraw` or missing) and prints the last evaluation unless `quiet`."""
  history = metrics.read_history(workdir / metrics.HISTORY_FILE)
  evals = [r for r in history if r["split"] == "eval"]
  final_eval = {k: v for k, v in evals[-1].items() if k not in ("step", "split")} if evals else {}
  plot = None
  if evals and distributed.is_main():
    plot = workdir / "curves.png"
    if redraw or not plot.exists():
      keys = [
          k
          for k in ("accuracy_greedy", "sequence_reverse_kl", "token_reverse_kl")
          if k in evals[-1]
      ]
      metrics.plot_curves(
          {recipe_name: history}, keys, plot, title=f"{recipe_name}: held-out metrics"
      )
  if not quiet and final_eval:
    print(
        metrics.format_table(
            [{"metric": k, "value": v} for k, v in final_eval.items()], ["metric", "value"]
        )
    )
  return RunResult(workdir=workdir, history=history, final_eval=final_eval, plot=plot)
