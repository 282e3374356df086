"""The training loop every recipe plugs into: set up (`opdjax.build`), plan the step's memory
(`opdjax.step`), resume, train, evaluate, save.

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
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from opdjax import checkpoint, distributed, evaluation, metrics, recipes, sharding
from opdjax import objectives as obj
from opdjax.build import (
    abstract_split,
    build_data,
    build_model,
    members,
    privileged_length,
    routed_kernel_sharding,
    setup,
)
from opdjax.data import batches, stream
from opdjax.errors import ConfigError
from opdjax.evaluation import (
    evaluate,
    forward_hidden,
    forward_hidden_rows,
    own_rows,
    privileged_hidden,
)
from opdjax.learner import (
    abstract_optimizer_state,
    all_finite,
    check_memory,
    head_kernel,
    make_optimizer,
)
from opdjax.recipes.base import join
from opdjax.recipes.self_distill import ema_update
from opdjax.sampling import Generation, SamplingParams, generate


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf; the run stopped without saving."""


@dataclasses.dataclass
class RunResult:
  workdir: Path
  history: list[dict]
  final_eval: dict[str, float]
  plot: Path | None


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


# ---------------------------------------------------------------- the run


class Sampled(NamedTuple):
  """A rollout's completions, dispatched but not read back (`train.rollout_ahead`)."""

  batch: dict  # this process's prompt rows (host): prompt_tokens [b, P], index [b], ...
  rows: dict  # the global batch, each prompt repeated for its group: [B·G, ...]
  gen: Generation | None  # [B·G, N] completions; None for dataset answers


class Rollout(NamedTuple):
  """What a step trains on, kept while the rollout is reused."""

  seq: recipes.Sequences  # prompt + completion [B·G, P + N], with log-probs and rewards
  frozen: dict | None  # role -> obj.Head: each frozen model's [B·G, P + N − 1, H] hidden states
  drift: jax.Array | None  # self_distill: KL of the teacher's weights from the current ones


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
  # Lines past the checkpoint are redone; a run that stopped before its first has none to keep.
  writer.truncate_after(start if restored else -1)
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
      self_teacher_model = nnx.merge(graphdef, self_teacher_weights("teacher", params, extra))
      results = evaluate_on(eval_set, teacher=self_teacher_model, privileged=True)
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
