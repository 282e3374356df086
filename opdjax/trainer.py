"""The training loop every recipe plugs into: set up (`opdjax.build`), plan the step's memory
(`opdjax.learner`), resume, train, evaluate, save.

One step: take a prompt batch (grain), produce completions (dataset answers, teacher or
student samples, per the recipe) and score them with the frozen models, no gradient
(`opdjax.rollouts`), update the student with the recipe's loss (one jitted step with
explicit shardings), log, evaluate and checkpoint. Rollouts are reused for
`train.updates_per_rollout` updates.

With `train.rollout_ahead`, the next rollout is sampled from the parameters an update
starts from and dispatched before that update, so its host work (reading the completions
back, verifying rewards, the next batch) runs while the device updates. It is then one
update stale, and the recipe's importance correction accounts for it. The rollout after a
checkpoint is sampled on-policy, as a resumed run would, so a resume is exact.

SIGTERM or Ctrl-C ends the loop after its current step with a checkpoint and raises
`opdjax.stopping.Stopped` (whose docstring says how several processes agree on the step).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
import warnings
from pathlib import Path

import jax
from flax import nnx
from tqdm.auto import tqdm

from opdjax import checkpoint, configs, distributed, metrics, sharding
from opdjax.build import (
    abstract_split,
    build_data,
    build_frozen_models,
    build_model,
    members,
    privileged_length,
    setup,
)
from opdjax.data import batches, stream
from opdjax.errors import ConfigError
from opdjax.evaluation import evaluate
from opdjax.learner import (
    abstract_optimizer_state,
    all_finite,
    check_memory,
    make_optimizer,
)
from opdjax.recipes.self_distill import ema_update
from opdjax.rollouts import FrozenModel, Rollouts, self_teacher_weights
from opdjax.sampling import FUSE_SETTINGS
from opdjax.stopping import StopOnSignal, Stopped


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf; the run stopped without saving."""


@dataclasses.dataclass
class RunResult:
  workdir: Path
  history: list[dict]
  final_eval: dict[str, float]
  plot: Path | None


# ---------------------------------------------------------------- the run


def run(config, workdir: str | Path, *, quiet: bool = False) -> RunResult:
  """Trains (or resumes, or returns a finished run from) `workdir`. See `opdjax/experiments/`.

  Each logged training line's `compile_s` is the time JAX spent tracing and compiling since
  the line before, evaluation's programs left out: the first line's includes the memory
  plan's compilation of the update and the first rollout's programs; later lines read 0
  unless something recompiled.

  SIGTERM or Ctrl-C during training ends it after the current step with a checkpoint and
  raises `opdjax.stopping.Stopped`; calling `run` again resumes."""
  with metrics.CompileClock() as compile_clock:
    return _run(config, workdir, quiet=quiet, compile_clock=compile_clock)


def _run(config, workdir, *, quiet: bool, compile_clock: metrics.CompileClock) -> RunResult:
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
  finished = bool(restored) and restored.step >= config.train.steps
  saved_config = workdir / "config.json"
  if restored and saved_config.exists():  # a rerun with other settings: say what it reuses
    changed = configs.changed_settings(json.loads(saved_config.read_text()), config)
    if changed:
      warnings.warn(
          f"{workdir} holds a run trained with other settings ({'; '.join(changed)}); its "
          f"step-{restored.step} checkpoint is {'reported' if finished else 'resumed'} as it "
          "is. Give another --workdir to train with these settings.",
          stacklevel=2,
      )
  if finished:
    ckpt.close()
    return report(workdir, recipe.name, quiet=quiet or not main_process)
  # Compiled in a thread while the models are built and the first rollout is sampled.
  train_step = check_memory(
      config, run_setup, quiet=quiet or not main_process, background=True
  ).train_step

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
  frozen = {  # section name -> FrozenModel
      name: FrozenModel.of(model)
      for name, model in build_frozen_models(config, run_setup, teacher, **place).items()
  }
  checkpoint.write_model_config(workdir, student_cfg)
  if main_process:  # the settings this run trains with, next to what it produces
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  batch_sharding = sharding.batch_sharding(mesh)
  # An EMA teacher's weights: updated after every step, saved with the checkpoint.
  ema_role = (
      next((r for r, kind in self_teacher.weights if kind == "ema"), None) if self_teacher else None
  )
  extra = {"ema": frozen[ema_role].state} if ema_role else {}
  ema_step = (
      jax.jit(functools.partial(ema_update, rate=self_teacher.ema_rate), donate_argnums=0)
      if ema_role
      else None
  )
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
  start = restored.step if restored else 0
  if restored:
    params, opt_state, extra = restored.params, restored.opt_state, restored.extra
    # A position in the global stream: one for all processes.
    data.set_state(restored.meta["data_state"])
  # Lines past the checkpoint are redone; a run that stopped before its first has none to keep.
  writer.truncate_after(start if restored else -1)
  total = config.train.steps
  rollouts = Rollouts(
      config,
      run_setup,
      graphdef=graphdef,
      teacher=teacher,
      frozen=frozen,
      data=data,
      train_set=train_set,
      batch_sharding=batch_sharding,
      sample_shardings=(
          None
          if config.sampling.layout == "train"
          else sharding.state_shardings(
              params, mesh, sharding.sampling_rules(rules, config.sampling.layout)
          )
      ),
  )
  eval_key = jax.random.key(config.seed + 1_000_003)
  # Routed teachers are evaluated each on its own held-out rows, as `NAME/metric`.
  routed_teachers = [
      n for n in members(run_setup, "teacher") if n.startswith("teacher/") and n in frozen
  ]

  def run_eval(step, params, extra):
    evaluate_on = functools.partial(
        evaluate,
        nnx.merge(graphdef, params),
        tokenizer=tokenizer,
        key=eval_key,
        max_new_tokens=config.task.completion_length,
        temperature=config.eval.temperature,
        batch_size=config.eval.batch_size,
        chunk_size=config.train.loss_chunk_size,
        batch_sharding=batch_sharding,
        fuse_projections=FUSE_SETTINGS[config.sampling.fuse_projections],
    )
    if self_teacher:  # the teacher role's weights, reading the privileged prompts
      weights = self_teacher_weights(recipe, "teacher", params, extra, frozen)
      results = evaluate_on(eval_set, teacher=nnx.merge(graphdef, weights), privileged=True)
    elif not routed_teachers:
      results = evaluate_on(eval_set, teacher=teacher)
    else:  # the unprefixed metrics: the teachers' values weighted by their rows
      results, counts = {}, {}
      for route, name in enumerate(routed_teachers):
        rows = eval_set.routed_to(route)
        if len(rows):
          counts[name] = len(rows)
          part = evaluate_on(rows, teacher=frozen[name].model())
          results |= {f"{name.split('/', 1)[1]}/{k}": v for k, v in part.items()}
      total = sum(counts.values())
      for key in {k.split("/", 1)[1] for k in results}:
        results[key] = sum(
            results[f"{n.split('/', 1)[1]}/{key}"] * c / total for n, c in counts.items()
        )
    writer.write(step, "eval", results)
    return results

  if start == 0 and config.eval.every and config.eval.at_start:
    with compile_clock.excluded():
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
    writer.flush()  # the lines that led here
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

  stopping = False
  with StopOnSignal() as stop:
    for step in range(start, total):
      fresh = step % config.train.updates_per_rollout == 0 or rollout is None
      if fresh:
        sampled = ahead if ahead is not None else rollouts.sample(step, params)
        rollout = rollouts.score(sampled, params, extra)
        ahead = None
      upcoming = step + 1
      if (  # sample the next rollout now, from the parameters this update starts from
          config.train.rollout_ahead
          and upcoming < total
          and upcoming % config.train.updates_per_rollout == 0
          and upcoming % config.train.save_every  # after a checkpoint: on-policy, as a resume is
      ):
        ahead = rollouts.sample(upcoming, params)
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
      # A signal stops the run where a rollout begins, with a checkpoint (opdjax.stopping),
      # after logging the steps since the last line (a resumed run's lines start after it).
      stopping = done < total and done % config.train.updates_per_rollout == 0 and stop.reached()
      log_now, save_now = log_now or stopping, save_now or stopping
      eval_now = eval_now and not stopping
      if log_now or eval_now or save_now:
        read_back()
      if log_now:
        means = accumulator.means()
        elapsed = max(time.perf_counter() - started, 1e-9)
        means["steps_per_s"] = (done - logged) / elapsed
        means["tokens_per_s"] = accumulator.sums["completion_tokens"] / elapsed  # trained tokens
        means["compile_s"] = compile_clock.lap()
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
        with compile_clock.excluded():
          last_eval = run_eval(done, params, extra)
        started += time.perf_counter() - evaluating  # the rates count training time only
      if save_now:
        if not all_finite(params):
          fail(f"non-finite parameters after step {done}")
        writer.flush()  # every line up to the checkpoint is stored before it
        ckpt.save(
            done,
            params,
            opt_state,
            {"step": done, "data_state": data.get_state(), "seed": config.seed},
            extra=extra,
        )
      if stopping:
        break
  progress.close()
  ckpt.close()  # waits for an asynchronous save
  writer.close()
  distributed.barrier("opdjax_run_end")  # process 0 has written everything
  if stopping:  # on several processes JAX's preemption service caught a SIGTERM
    raise Stopped(stop.received or signal.SIGTERM, done, ckpt.directory)
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
