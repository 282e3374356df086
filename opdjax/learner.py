"""The jitted update (`make_train_step`), its optimizer, and the memory plan that compiles
it from shapes before anything is allocated (`check_memory`)."""

from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

from opdjax import memory, recipes, sampling, sharding
from opdjax import objectives as obj
from opdjax.build import (
    Setup,
    abstract_split,
    dtype_of,
    members,
    privileged_length,
    routed_kernel_sharding,
)
from opdjax.errors import ConfigError
from opdjax.models.attention import KVCache
from opdjax.recipes.base import batch_loss, frozen_argument


def make_optimizer(config) -> optax.GradientTransformation:
  opt = config.optimizer
  if opt.schedule not in ("cosine", "constant"):
    raise ConfigError(f"optimizer.schedule must be 'cosine' or 'constant', got {opt.schedule!r}")
  if opt.warmup_steps < 0:
    raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
  # A negative rate or clip norm would flip every update's sign without an error.
  if not opt.learning_rate >= 0:
    raise ConfigError(f"optimizer.learning_rate must be >= 0, got {opt.learning_rate}")
  if not opt.grad_clip > 0:
    raise ConfigError(f"optimizer.grad_clip (a global norm) must be > 0, got {opt.grad_clip}")
  if not opt.weight_decay >= 0:
    raise ConfigError(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
  if not 0 <= opt.final_lr_fraction <= 1:
    raise ConfigError(f"optimizer.final_lr_fraction must be in [0, 1], got {opt.final_lr_fraction}")
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


def strided_blocks(x: jax.Array, *, count: int, unit: int = 1) -> jax.Array:
  """`x [B, ...]` as `count` blocks of rows `[count, B / count, ...]`, taking runs of `unit`
  rows (a GRPO group) in turn: block m holds runs m, m + count, m + 2·count, ...

  Where the batch's rows are split over devices in consecutive runs, each device then holds
  its share of every block, so a micro-batch is computed by all devices without moving rows;
  blocks of consecutive rows would each lie on a few devices, and XLA moved rows between
  devices to split each one (all-to-alls and collective permutes of the rollout and the
  teacher's hidden states in every step).

  >>> strided_blocks(jnp.arange(8), count=2).tolist()
  [[0, 2, 4, 6], [1, 3, 5, 7]]
  >>> strided_blocks(jnp.arange(8), count=2, unit=2).tolist()
  [[0, 1, 4, 5], [2, 3, 6, 7]]
  """
  runs = x.reshape((x.shape[0] // (count * unit), count, unit) + x.shape[1:])
  return jnp.swapaxes(runs, 0, 1).reshape((count, x.shape[0] // count) + x.shape[1:])


def make_train_step(
    graphdef,
    recipe,
    tx,
    param_shardings,
    opt_shardings,
    *,
    microbatches: int = 1,
    chunk_size: int = 0,
    row_shards: int = 1,
):
  """`(params, opt_state, seq, frozen) -> (params, opt_state, metrics)`, jitted.

  `frozen` is `{role: Head}` for the recipe's roles (their hidden states and heads, computed
  once per rollout), or None. The student runs to its final hidden states and the loss is
  computed from them in token chunks (`recipes.base.batch_loss`: one pass when the recipe
  names its `loss_value`, else a rematerialised scan), so no `[B, T, V]` array is formed.
  With `microbatches = M` the batch is split into M row blocks (`strided_blocks`) whose
  gradients are summed in a `lax.scan`; the loss is normalised by the whole batch's
  completion tokens (or rows, for a recipe's sequence mean), so the update equals the
  whole-batch one. `chunk_size` is the loss's positions per chunk on each device, and
  `row_shards` the number of devices the batch's rows are split over
  (`sharding.row_splits`), which sizes the chunks.
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
          row_shards=row_shards,
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
      split = functools.partial(strided_blocks, count=microbatches, unit=recipe.group_size)
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


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def abstract_optimizer_state(tx, params, mesh):
  """`tx.init(params)` as ShapeDtypeStructs with the shardings `sharding.init_optimizer` gives."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(tx.init, params),
      sharding.optimizer_shardings(tx, params, mesh),
  )


class Plan(NamedTuple):
  terms: dict[str, int]  # per-device bytes of each part of a step
  train_step: Callable  # the compiled step (`CompilingStep` from `check_memory`); the run calls it


def memory_plan(config, run_setup: Setup) -> Plan:
  """Per-device bytes of each part of a step (`opdjax.memory`), from shapes alone: nothing
  is allocated. The train step is compiled here, and the run calls that executable, which
  refuses (rather than recompiles) arguments laid out otherwise."""
  terms, lower = shape_terms(config, run_setup)
  compiled = lower().compile()
  terms["train step temporaries"] = temporaries(compiled)
  return Plan(terms, compiled)


def temporaries(compiled) -> int:
  """Per-device bytes of a compiled step's temporaries (XLA's `memory_analysis()`)."""
  return int(compiled.memory_analysis().temp_size_in_bytes)


def shape_terms(config, run_setup: Setup) -> tuple[dict[str, int], Callable]:
  """The plan's terms that shapes alone give, and a function lowering the train step for
  the abstract arguments the run will pass it."""
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
  seq = recipes.Sequences.spec(rows, length, batch)
  frozen = {}
  for role in recipe.roles:
    names = members(run_setup, role)
    terms[f"{role} parameters"] = sum(memory.per_device_bytes(abstract[n][1]) for n in names)
    widths = [run_setup.model_configs[n].hidden_size for n in names]
    dtype = jnp.result_type(*[dtype_of(run_setup.sections[n].dtype) for n in names])
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
  kv_cache = kv_cache_bytes(config, run_setup)
  if kv_cache:
    terms["KV cache (sampling)"] = kv_cache
  resharded = resharded_student(config, run_setup)
  if resharded is not None:
    terms["student parameters (sampling layout)"] = memory.per_device_bytes(resharded)
  copies = sampler_copy_bytes(config, run_setup)
  if copies:
    terms["weight copies (sampling)"] = copies
  step = make_train_step(
      graphdef,
      recipe,
      tx,
      jax.tree.map(lambda x: x.sharding, params),
      jax.tree.map(lambda x: x.sharding, opt_state),
      microbatches=config.train.microbatches,
      chunk_size=config.train.loss_chunk_size,
      row_shards=sharding.row_splits(mesh),
  )
  return terms, lambda: step.lower(params, opt_state, seq, frozen or None)


def sampled_models(config, run_setup: Setup) -> list[tuple[str, int, int]]:
  """`(model section, rows, prompt length)` of each kind of `generate` call a run makes: the
  rollouts' sampler (the student, or the teacher for SeqKD; every prompt's group of rows),
  and in evaluation the student and each teacher, a self-distillation teacher after its
  privileged prompt."""
  recipe, prompt = run_setup.recipe, config.task.prompt_length
  rows = config.train.batch_size * recipe.group_size
  uses = []
  if recipe.source == "teacher":
    uses.append(("teacher", rows, prompt))
  elif rollouts_sample_student(recipe):
    uses.append(("student", rows, prompt))
  if config.eval.every:
    eval_rows = min(config.eval.batch_size, config.task.eval_size)
    uses.append(("student", eval_rows, prompt))
    teacher_prompt = privileged_length(config) if recipe.self_teacher else prompt
    for name in run_setup.model_configs:
      if name.partition("/")[0] == "teacher":
        uses.append((name, eval_rows, teacher_prompt))
  return uses


def rollouts_sample_student(recipe) -> bool:
  """Whether a recipe's rollouts sample the student (GKD's coin samples it on some steps)."""
  return recipe.source not in ("dataset", "teacher")


def resharded_student(config, run_setup: Setup):
  """The student's abstract parameters as its rollouts sample them where `sampling.layout`
  is not "train" (`Rollouts.sample` puts a copy in that layout beside the training
  parameters), else None."""
  if config.sampling.layout == "train" or not rollouts_sample_student(run_setup.recipe):
    return None
  rules = sharding.sampling_rules(run_setup.rules, config.sampling.layout)
  return sharding.abstract_state(abstract_split(run_setup, "student")[1], run_setup.mesh, rules)


def kv_cache_bytes(config, run_setup: Setup) -> int:
  """Per-device bytes of the largest KV cache a run's `generate` calls allocate (one at a
  time, `sampled_models`). Each cache holds `sampling.cache_slots` positions of its own
  model's layers and KV heads (`KVCache`: keys, values and the slot mask)."""
  completion = config.task.completion_length
  data_devices = sharding.row_splits(run_setup.mesh)

  def size(name, rows, prompt_length):  # one device's rows of the cache, from shapes
    return memory.per_device_bytes(
        jax.eval_shape(
            functools.partial(
                KVCache.create,
                run_setup.model_configs[name],
                math.ceil(rows / data_devices),
                sampling.cache_slots(prompt_length, completion),
                dtype_of(run_setup.sections[name].dtype),
            )
        )
    )

  return max((size(*use) for use in sampled_models(config, run_setup)), default=0)


def sampler_copy_bytes(config, run_setup: Setup) -> int:
  """Per-device bytes of the weights `generate` copies inside its jitted function, for the
  largest model that samples: a scanned model's layers sliced out of the stack where the
  backend unrolls them (`sampling.UNROLL_LAYERS`, `Decoder.unroll_layers`), and where it
  merges projections (`sampling.fuse_projections` in the config, as for the run;
  `Decoder.fuse_projections`) the merged q/k/v and gate/up kernels and the matmul weights
  cast to the compute dtype. Every array the two leave in the copy that the model did not
  hold counts (merging drops the separate projections, so an unrolled layer's q/k/v and
  gate/up slices do not). They are taken to be split over the devices as the model's
  parameters are where it samples, on average (the student's `sampling.layout` copy where
  its rollouts use one).
  """
  fuse = sampling.fuses_projections(sampling.FUSE_SETTINGS[config.sampling.fuse_projections])
  unroll = sampling.UNROLL_LAYERS.get(jax.default_backend(), False)
  if not fuse and not unroll:
    return 0

  def size(name):
    graphdef, state = abstract_split(run_setup, name)

    def copy(state):
      model = nnx.merge(graphdef, state)
      if unroll:
        model.unroll_layers()
      if fuse:
        model.fuse_projections()
      return nnx.state(model, nnx.Param)

    before = {p: (v.shape, v.dtype) for p, v in nnx.to_flat_state(state)}
    added = sum(
        v.size * v.dtype.itemsize
        for p, v in nnx.to_flat_state(jax.eval_shape(copy, state))
        if before.get(p) != (v.shape, v.dtype)
    )
    whole = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(state))
    held = memory.per_device_bytes(state)
    laid_out = resharded_student(config, run_setup) if name == "student" else None
    if laid_out is not None:  # split as the sampling layout's copy, if that holds more
      held = max(held, memory.per_device_bytes(laid_out))
    return math.ceil(added * held / whole)

  return max((size(name) for name in {u[0] for u in sampled_models(config, run_setup)}), default=0)


def check_memory(config, run_setup: Setup, *, quiet: bool, background: bool = False) -> Plan:
  """Prints the memory plan (unless quiet) and stops with one line if it does not fit.

  With `background`, the terms that shapes give are checked now, the train step is traced
  here (so it sees this thread's JAX settings, such as `jax.default_matmul_precision`), and
  XLA compiles it in a thread while the run builds its models and samples its first
  rollout (XLA compiles without holding Python's lock); the first call of
  `Plan.train_step` waits for it, then prints and checks the whole plan before the first
  update. A run's first step then costs about the longest of its compilations rather than
  their sum where the host has cores to spare (on two cores the compilations share them).
  """
  limit = int(config.train.memory_limit_gb * 1e9) or memory.device_limit_bytes()
  terms, lower = shape_terms(config, run_setup)
  if background:  # the shape terms now, before anything is built; the whole plan later
    memory.check(terms, limit)
  step = CompilingStep(lower(), terms, limit, quiet=quiet)
  if not background:
    step.wait()
  return Plan(terms, step)


class CompilingStep:
  """The train step, compiled in a background thread.

  `lowered` is the step traced in the caller's thread. `wait()` (the first call does it)
  waits for the compilation, adds the step's temporaries to the plan's terms (the same
  dict), prints the plan unless quiet, and stops with `memory.check`'s one line if it
  does not fit; every call runs the compiled executable.
  """

  def __init__(self, lowered, terms: dict[str, int], limit: int | None, *, quiet: bool):
    self.lowered = lowered
    self._terms, self._limit, self._quiet = terms, limit, quiet
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
    self._future = self._executor.submit(lowered.compile)
    self._compiled = None

  def wait(self):
    """The compiled step, once the whole plan is printed and checked."""
    if self._compiled is None:
      compiled = self._future.result()  # re-raises a compilation error here
      self._executor.shutdown()
      self._terms["train step temporaries"] = temporaries(compiled)
      if not self._quiet:
        tqdm.write(memory.format_plan(self._terms, self._limit))
      memory.check(self._terms, self._limit)
      self._compiled = compiled
    return self._compiled

  def __call__(self, *args):
    return self.wait()(*args)
