"""The training system end to end: every recipe for a few steps, CLI errors, resume after
a torn checkpoint, a three-axis mesh equals one device, non-finite loss handling,
multi-stage experiments, several teachers. (Resume after SIGKILL: tests/test_multihost.py.)"""

import dataclasses
import json
import os
import re
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from opdjax import (
    build,
    checkpoint,
    configs,
    evaluation,
    learner,
    metrics,
    recipes,
    rollouts,
    sampling,
    sharding,
    trainer,
)
from opdjax.errors import ConfigError
from opdjax.models import Decoder, attention, save_pretrained, splash, tiny_config
from opdjax.models.attention import KVCache
from opdjax.sampling import cache_slots, generate
from opdjax.train import experiment_names, load_experiment
from opdjax.train import main as cli_main

REPO = Path(__file__).resolve().parent.parent


def tiny(recipe="sft", **recipe_kwargs):
  """A config that trains in seconds: tiny model, 8-row batches, short completions."""
  c = configs.float32(configs.base_config())
  c.task.train_size = 64
  c.task.eval_size = 8
  c.task.completion_length = 4
  c.task.difficulty = 1
  c.task.prompt_length = 6
  c.recipe.name = recipe
  c.recipe.update(recipe_kwargs)
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.save_every = 2
  c.train.tensorboard = False
  c.eval.every = 4
  c.eval.at_start = False
  c.mesh.shape = (1,)
  return c


@pytest.fixture(scope="module", name="teacher_dir")
def fixture_teacher_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("teacher")
  config = tiny("sft")
  config.train.steps = 6
  config.eval.every = 0
  trainer.run(config, workdir, quiet=True)
  return workdir


RECIPES = {
    "sft": {},
    "seqkd": {},
    "supervised_kd": dict(divergence="forward_kl"),
    "gkd": dict(divergence="generalized_jsd", divergence_kwargs={"beta": 0.5}, lambda_on=0.5),
    "opd_full": dict(name="opd", estimator="full", divergence="reverse_kl"),
    "opd_topk": dict(
        name="opd", estimator="topk", divergence="reverse_kl", top_k=4, tail_bucket=True
    ),
    "opd_sampled": dict(name="opd", estimator="sampled", gamma=1.0, correction="ppo_clip"),
    "gopd_sampled": dict(name="gopd", estimator="sampled", reward_scale=1.25),
    "grpo_opd": dict(name="grpo", group_size=2, opd_weight=0.5, correction="ppo_clip"),
}


@pytest.mark.parametrize("variant", sorted(RECIPES))
def test_every_recipe_runs(variant, teacher_dir, tmp_path, monkeypatch):
  kwargs = dict(RECIPES[variant])
  config = tiny(kwargs.pop("name", variant), **kwargs)
  config.teacher.checkpoint = str(teacher_dir)
  config.teacher.preset = "student-tiny"
  if variant in ("opd_sampled", "grpo_opd"):
    config.train.updates_per_rollout = 2  # reuse each rollout: exercises the IS correction
  if variant == "opd_full":  # scanned layers throughout; the teacher was saved per-layer
    config.student.scan_layers = config.teacher.scan_layers = "on"
    config.student.remat = "save_dots"
  else:  # evaluation does not depend on the recipe: one variant evaluates (suite time)
    config.eval.every = 0
  result = trainer.run(config, tmp_path, quiet=True)
  train_rows = [r for r in result.history if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in train_rows)
  rows = config.train.batch_size * recipes.build(config.recipe).group_size
  for r in train_rows:  # both rates share one clock: their ratio is the step's trained tokens
    assert r["steps_per_s"] > 0
    assert r["tokens_per_s"] / r["steps_per_s"] == pytest.approx(r["completion_tokens"] * rows)
  if variant == "opd_full":
    for key in (
        "accuracy_greedy",
        "accuracy_sampled",
        "sequence_reverse_kl",
        "sequence_forward_kl",
        "token_reverse_kl",
        "token_forward_kl",
        "student_entropy",
        "completion_length",
        "truncation_rate",
    ):
      assert key in result.final_eval, key
    assert result.plot is not None and result.plot.exists()
  assert checkpoint.Checkpointer(tmp_path).latest_step() == 4
  if variant.startswith("opd") or variant == "gkd" or variant == "supervised_kd":
    assert "token_reverse_kl" in train_rows[-1]
  if variant == "opd_topk":
    assert 0 < train_rows[-1]["topk_teacher_mass"] <= 1
  if variant == "opd_sampled":
    assert 0 < train_rows[-1]["importance_ratio"] < 10
  if variant == "grpo_opd":
    assert 0 <= train_rows[-1]["verifier_reward"] <= 1
    assert train_rows[-1]["completion_tokens"] > 0

  # A finished run is returned as it is, without building or compiling anything again.
  def fail(*args, **kwargs):
    raise AssertionError("a finished run compiled its step again")

  monkeypatch.setattr(trainer, "check_memory", fail)
  again = trainer.run(config, tmp_path, quiet=True)
  assert again.history == result.history
  if variant == "opd_full":
    assert_restores_in_both_layouts(config, tmp_path, monkeypatch)


def assert_restores_in_both_layouts(config, workdir, monkeypatch):
  """A scanned run's checkpoint restores into a per-layer model (and back) unchanged, read
  one parameter (all its layers) at a time when it converts."""
  from opdjax.models import stack_layers
  from opdjax.models.decoder import shared_layer_path

  mesh = build.build_mesh(config)
  model_config = checkpoint.read_model_config(workdir)
  section = config.student.copy_and_resolve_references()
  section.init_from = str(workdir)
  scanned = nnx.state(build.build_model(section, model_config, seed=0, mesh=mesh), nnx.Param)
  assert scanned["layers"]["attn"]["q_proj"]["kernel"].get_value().ndim == 3
  section.scan_layers = "off"
  restore_parts, parts = checkpoint.restore_param_parts, []

  def recording(workdir, parts_like, **kwargs):
    for part in restore_parts(workdir, parts_like, **kwargs):
      parts.append((kwargs.get("partial", True), part))
      yield part

  monkeypatch.setattr(checkpoint, "restore_param_parts", recording)
  per_layer = nnx.state(build.build_model(section, model_config, seed=0, mesh=mesh), nnx.Param)
  assert 0 in per_layer["layers"]
  for a, b in zip(jax.tree.leaves(stack_layers(per_layer)), jax.tree.leaves(scanned)):
    np.testing.assert_array_equal(a, b)
  read = [nnx.to_flat_state(part) for partial, part in parts if partial]
  assert [len({shared_layer_path(path) for path, _ in part}) for part in read] == [1] * len(read)
  assert sum(len(part) for part in read) == len(jax.tree.leaves(scanned))  # each read once


@pytest.mark.parametrize("mesh_shape", [(4,)])
def test_memory_plan_counts_each_term_and_stops_over_the_limit(teacher_dir, mesh_shape):
  """The plan's terms equal the bytes the run allocates per device (parameters split over 4
  FSDP devices hold about a quarter), and a limit below the total is one clear error that
  names the biggest term."""
  config = tiny("opd", estimator="full", divergence="reverse_kl")
  config.teacher.checkpoint = str(teacher_dir)
  config.mesh.shape, config.mesh.axes = mesh_shape, ("fsdp",)
  run_setup = build.setup(config)
  terms = learner.memory_plan(config, run_setup).terms
  student = build.build_model(
      config.student, run_setup.model_configs["student"], seed=0, mesh=run_setup.mesh
  )
  whole = sum(x.nbytes for x in jax.tree.leaves(nnx.state(student)))
  on_device_0 = sum(
      x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(nnx.state(student))
  )
  assert terms["student parameters"] == on_device_0
  assert on_device_0 < 0.4 * whole  # FSDP over 4 devices
  assert 2 * on_device_0 <= terms["optimizer state"] <= 2 * on_device_0 + 64  # Adam: mu, nu
  teacher_cfg = run_setup.model_configs["teacher"]
  rows, length = 8 // mesh_shape[0], 6 + 4
  slots = cache_slots(6, 4)  # the student's and the teacher's caches are alike here
  kv_and_mask = rows * slots * teacher_cfg.num_layers * 2 * teacher_cfg.num_kv_heads
  kv_and_mask = kv_and_mask * teacher_cfg.head_dim * 4 + rows * slots
  assert terms["KV cache (sampling)"] == kv_and_mask + 4  # + the int32 write index
  assert terms["frozen hidden states"] == rows * (length - 1) * teacher_cfg.hidden_size * 4
  assert terms["train step temporaries"] > 0
  config.train.memory_limit_gb = sum(terms.values()) / 2e9
  with pytest.raises(
      ConfigError,
      match=r"GB per device, above the .* limit .* the biggest "
      r"term is (student|teacher|optimizer|train step)",
  ):
    learner.check_memory(config, run_setup, quiet=True)


def test_a_step_compiled_in_the_background_checks_the_whole_plan_before_the_first_update(
    teacher_dir, tmp_path, capsys
):
  """`check_memory(background=True)` (the trainer's) checks the terms shapes give at once,
  traces the step in the caller's thread (its JAX settings apply), and checks the whole
  plan, temporaries included, when the first update waits for the compiled step: a limit
  that only the temporaries exceed stops the run there, with no update and no checkpoint,
  and a limit the shape terms exceed stops it before anything is built."""
  config = tiny("opd", estimator="full", divergence="reverse_kl")
  config.teacher.checkpoint = str(teacher_dir)
  run_setup = build.setup(config)
  terms = learner.memory_plan(config, run_setup).terms
  temporaries = terms["train step temporaries"]
  shapes_only = sum(terms.values()) - temporaries
  assert temporaries > 0

  config.train.memory_limit_gb = (shapes_only + temporaries / 2) / 1e9
  with jax.default_matmul_precision("highest"):  # a thread-local setting the step must see
    plan = learner.check_memory(config, run_setup, quiet=False, background=True)
  assert "HIGHEST" in plan.train_step.lowered.as_text()  # traced here, not in the thread
  assert "train step temporaries" not in plan.terms
  with pytest.raises(ConfigError, match="above the .* limit"):
    plan.train_step()  # waits for the compilation; the check stops it before any argument
  assert plan.terms == terms  # the same dict, now whole
  assert "train step temporaries" in capsys.readouterr().out  # the plan, printed

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(rollouts, "generate", lambda *a, **k: pytest.fail("sampled over the limit"))
    config.train.memory_limit_gb = shapes_only / 2e9
    with pytest.raises(ConfigError, match="above the .* limit"):
      trainer.run(config, tmp_path / "shapes", quiet=True)

  sampled = []
  generate = rollouts.generate
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(rollouts, "generate", lambda *a, **k: sampled.append(1) or generate(*a, **k))
    config.train.memory_limit_gb = (shapes_only + temporaries / 2) / 1e9
    with pytest.raises(ConfigError, match="above the .* limit"):
      trainer.run(config, tmp_path / "temporaries", quiet=True)
  assert sampled  # the first rollout was sampled while the step compiled, and no update ran
  history = tmp_path / "temporaries" / "metrics.jsonl"
  assert not history.exists() or not metrics.read_history(history)
  assert not list((tmp_path / "temporaries" / "checkpoints").glob("[0-9]*"))


def test_sampling_fuse_projections_reaches_the_rollouts_and_evaluation(teacher_dir, tmp_path):
  """`sampling.fuse_projections="on"` merges the projections on a CPU, whose default is
  off: the rollouts' `generate` and evaluation's (the student's and the teacher's samples)
  are called with it and the sampler merges; a bad value is one clear error."""
  config = tiny("opd")
  config.teacher.checkpoint = str(teacher_dir)
  config.train.steps, config.eval.every = 2, 2
  config.sampling.fuse_projections = "on"
  seen = {"rollouts": [], "evaluation": []}
  fused = []

  def recording(calls):
    def spy(*args, **kwargs):
      calls.append(kwargs["fuse_projections"])
      return generate(*args, **kwargs)

    return spy

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(rollouts, "generate", recording(seen["rollouts"]))
    patch.setattr(evaluation, "generate", recording(seen["evaluation"]))
    original = Decoder.fuse_projections
    patch.setattr(Decoder, "fuse_projections", lambda m: fused.append(1) or original(m))
    trainer.run(config, tmp_path / "on", quiet=True)
  assert seen["rollouts"] and set(seen["rollouts"]) == {True}
  assert len(seen["evaluation"]) >= 3  # greedy, sampled, the teacher's
  assert set(seen["evaluation"]) == {True}
  assert fused, "no sampler merged its projections"
  config.sampling.fuse_projections = "yes"
  with pytest.raises(
      ConfigError,
      match=r"sampling.fuse_projections must be one of \('auto', 'on', 'off'\), got 'yes'",
  ):
    trainer.run(config, tmp_path / "bad", quiet=True)


def test_scan_layers_auto_stacks_deep_models_only(tmp_path, monkeypatch):
  """`scan_layers="auto"` (the default) scans a model of `SCAN_LAYERS_FROM` layers or more
  and keeps a shallower one per-layer; "on" and "off" override it for either. `remat=
  "auto"` keeps only the matmuls' outputs (save_dots) where the layers are scanned."""
  config = tiny("opd")
  student_cfg = build.setup(tiny("sft")).model_configs["student"]
  depth = student_cfg.num_layers + 1
  checkpoint.write_model_config(  # the layout is decided from shapes alone
      tmp_path, dataclasses.replace(student_cfg, num_layers=depth)
  )
  config.teacher.checkpoint = str(tmp_path)

  def stacked(role):
    _, state = build.abstract_split(build.setup(config), role)
    return 0 not in state["layers"]  # per-layer: state["layers"][i], i = 0, 1, ...

  def remat():  # the policy the student's model is built with
    run_setup = build.setup(config)
    model_config = run_setup.model_configs["student"]
    kwargs = build.model_kwargs(config.student, model_config, run_setup.mesh)
    return build.abstract_model(model_config, **kwargs).remat

  assert config.student.scan_layers == config.teacher.scan_layers == "auto"
  assert config.student.remat == "auto"
  assert build.SCAN_LAYERS_FROM > depth  # the presets are per-layer as they are
  assert not stacked("teacher") and not stacked("student") and remat() == "none"
  monkeypatch.setattr(build, "SCAN_LAYERS_FROM", depth)
  assert stacked("teacher") and not stacked("student")
  config.student.scan_layers, config.teacher.scan_layers = "on", "off"
  assert stacked("student") and not stacked("teacher") and remat() == "save_dots"
  config.student.remat = "none"
  assert remat() == "none"


def test_memory_plan_kv_cache_is_what_generate_allocates_for_the_model_that_samples(tmp_path):
  """SeqKD samples its rollouts from the teacher: the plan's KV cache term is the cache
  `generate` allocates for the teacher (its layers and KV heads, both lengths rounded up to
  their buckets), here larger than the student's; evaluation's caches are smaller."""
  config = tiny("seqkd")
  config.eval.batch_size = 4
  student_cfg = build.setup(tiny("sft")).model_configs["student"]
  big = dataclasses.replace(student_cfg, num_layers=3, num_kv_heads=4, num_heads=8)
  checkpoint.write_model_config(tmp_path, big)  # the plan reads shapes only
  config.teacher.checkpoint = str(tmp_path)
  run_setup = build.setup(config)
  allocated = []
  create = KVCache.create

  def recording_create(model_config, batch, max_length, *args, **kwargs):
    cache = create(model_config, batch, max_length, *args, **kwargs)
    allocated.append(sum(x.nbytes for x in jax.tree.leaves(cache)))
    return cache

  teacher = Decoder(big, dtype=jnp.float32, rngs=nnx.Rngs(0))
  prompts = jnp.ones((8, config.task.prompt_length), jnp.int32)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(KVCache, "create", staticmethod(recording_create))
    generate(
        teacher,
        prompts,
        prompts > 0,
        key=jax.random.key(0),
        max_new_tokens=config.task.completion_length,
    )
  assert learner.kv_cache_bytes(config, run_setup) == max(allocated)
  assert learner.memory_plan(config, run_setup).terms["KV cache (sampling)"] == max(allocated)
  student_rollout_kv = 8 * cache_slots(6, 4) * 2 * 2 * 2 * 16 * 4  # 2 layers, 2 KV heads
  assert max(allocated) > 8 * cache_slots(6, 4) * 3 * 2 * 4 * 16 * 4 > student_rollout_kv
  assert "weight copies (sampling)" not in learner.memory_plan(config, run_setup).terms
  # Where the backend merges projections (a GPU), the plan counts the sampling teacher's
  # merged weights: the arrays `fuse_projections` adds (float32 throughout: no casts).
  teacher.fuse_projections()
  added = sum(
      x.nbytes
      for layer in teacher.layers
      for x in jax.tree.leaves(nnx.state(layer.attn.qkv))
      + jax.tree.leaves(nnx.state(layer.mlp.gate_up))
  )
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sampling, "FUSE_PROJECTIONS", {jax.default_backend(): True})
    assert learner.sampler_copy_bytes(config, run_setup) == added
    assert learner.memory_plan(config, run_setup).terms["weight copies (sampling)"] == added
    config.sampling.fuse_projections = "off"  # the config overrides the backend's default
    assert learner.sampler_copy_bytes(config, run_setup) == 0
  config.sampling.fuse_projections = "on"
  assert learner.sampler_copy_bytes(config, run_setup) == added
  # A CPU unrolls a scanned model's layers to sample (`UNROLL_LAYERS`): a copy of them all.
  config.sampling.fuse_projections = "off"
  config.teacher.scan_layers = "on"
  run_setup = build.setup(config)
  layers = nnx.state(Decoder(big, dtype=jnp.float32, rngs=nnx.Rngs(0)).layers, nnx.Param)
  assert learner.sampler_copy_bytes(config, run_setup) == sum(
      x.nbytes for x in jax.tree.leaves(layers)
  )
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sampling, "UNROLL_LAYERS", {jax.default_backend(): False})
    assert learner.sampler_copy_bytes(config, run_setup) == 0
  # Both: the merged arrays replace the unrolled slices of q/k/v and gate/up.
  config.sampling.fuse_projections = "on"
  separate = sum(
      x.nbytes
      for layer in Decoder(big, dtype=jnp.float32, rngs=nnx.Rngs(0)).layers
      for module in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj)
      + (layer.mlp.gate_proj, layer.mlp.up_proj)
      for x in jax.tree.leaves(nnx.state(module))
  )
  assert learner.sampler_copy_bytes(config, run_setup) == (
      sum(x.nbytes for x in jax.tree.leaves(layers)) - separate + added
  )


def test_memory_plan_counts_the_copy_a_sampling_layout_holds(tmp_path):
  """With `sampling.layout` other than "train" the rollouts sample from a copy of the
  student in that layout, held beside the training parameters: the plan counts it at the
  bytes one device holds of the copy `Rollouts.sample` makes, and the merged projections
  at that copy's split. Recipes whose rollouts do not sample the student hold no copy."""
  config = tiny("opd")
  config.mesh.shape, config.mesh.axes = (8,), ("fsdp",)
  student_cfg = build.setup(tiny("sft")).model_configs["student"]
  checkpoint.write_model_config(tmp_path, student_cfg)  # the plan reads shapes only
  config.teacher.checkpoint = str(tmp_path)
  run_setup = build.setup(config)
  terms = lambda: learner.shape_terms(config, run_setup)[0]
  assert "student parameters (sampling layout)" not in terms()  # "train": no copy
  params = nnx.state(Decoder(student_cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), nnx.Param)
  params = sharding.place_state(params, run_setup.mesh, run_setup.rules)
  on_device = lambda tree: sum(
      s.data.nbytes
      for x in jax.tree.leaves(tree)
      for s in x.addressable_shards
      if s.device == jax.devices()[0]
  )
  whole = sum(x.nbytes for x in jax.tree.leaves(params))
  assert terms()["student parameters"] == on_device(params) < whole / 4  # split by FSDP
  for layout in ("replicated", "tensor"):  # no tensor axis: "tensor" replicates too
    config.sampling.layout = layout
    rules = sharding.sampling_rules(run_setup.rules, layout)
    copy = jax.device_put(params, sharding.state_shardings(params, run_setup.mesh, rules))
    assert terms()["student parameters (sampling layout)"] == on_device(copy) == whole
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(sampling, "FUSE_PROJECTIONS", {jax.default_backend(): True})
      replicated_merge = learner.sampler_copy_bytes(config, run_setup)
      config.sampling.layout = "train"
      assert replicated_merge > 4 * learner.sampler_copy_bytes(config, run_setup)
  config.sampling.layout = "replicated"
  config.recipe.name = "supervised_kd"  # trains on the dataset's answers: nothing sampled
  assert (
      "student parameters (sampling layout)"
      not in learner.shape_terms(config, build.setup(config))[0]
  )


def test_three_axis_mesh_equals_one_device(teacher_dir, tmp_path, monkeypatch):
  """data x fsdp x tensor = (2, 2, 2): sampled OPD (the sampler runs on the sharded batch and
  weights) gives the losses and parameters of one device. The sharded run's student uses
  the splash attention kernel (Pallas interpret mode on a CPU) per shard under `shard_map`
  in its update; the one-device run uses XLA's attention."""

  def run(shape, axes, workdir, attention="xla"):
    config = tiny("opd", estimator="sampled")
    config.student.attention = attention
    config.teacher.checkpoint = str(teacher_dir)
    config.train.steps = 3
    config.train.log_every = 1
    config.train.save_every = 3
    config.eval.every = 0  # evaluation on a sharded batch: tests/test_multihost.py
    config.mesh.shape, config.mesh.axes = shape, axes
    result = trainer.run(config, workdir, quiet=True)
    model_config = checkpoint.read_model_config(workdir)
    abstract = nnx.state(Decoder(model_config, rngs=nnx.Rngs(0)))
    params = checkpoint.restore_params(workdir, abstract)
    return [r for r in result.history if "loss" in r or r["split"] == "eval"], params

  history_1, params_1 = run((1,), ("data",), tmp_path / "one")
  shards = []  # the splash kernel's per-shard query shapes, as traced
  rows = splash._rows
  monkeypatch.setattr(splash, "_rows", lambda q, *a: shards.append(q.shape) or rows(q, *a))
  with pytest.warns(UserWarning, match="student.attention='splash' is a TPU kernel; on cpu"):
    history_8, params_8 = run((2, 2, 2), ("data", "fsdp", "tensor"), tmp_path / "eight", "splash")
  # 8 rows over data x fsdp, 4 heads over tensor, 9 input tokens
  assert set(shards) == {(2, 9, 2, 16)}, set(shards)
  for a, b in zip(history_1, history_8, strict=True):
    for key in ("loss", "grad_norm"):
      if key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for (path, a), (_, b) in zip(nnx.to_flat_state(params_1), nnx.to_flat_state(params_8)):
    np.testing.assert_allclose(
        np.asarray(b.get_value()), np.asarray(a.get_value()), atol=1e-5, err_msg=str(path)
    )


# The failed restore's read tasks call back into Orbax's event loop after it has closed
# (the coroutines themselves are filtered in setup.cfg, wherever they are collected).
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning"
)
def test_torn_checkpoint_falls_back_to_the_previous_one(teacher_dir, tmp_path, monkeypatch):
  """A truncated file in the newest checkpoint: the run warns, deletes it, resumes from the
  one before and ends with the parameters of the uninterrupted run. The resumed run builds
  no student (its parameters come from the checkpoint, not a discarded init or HF load)."""
  import shutil

  def no_student(section, *args, **kwargs):
    raise AssertionError(f"a resumed run built a model for {section.preset!r}")

  monkeypatch.setattr(trainer, "build_model", no_student)  # SFT has no other model

  workdir = tmp_path / "torn"
  shutil.copytree(teacher_dir, workdir)
  newest = workdir / "checkpoints" / "6"
  data = max(
      (p for p in (newest / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  config = tiny("sft")  # the teacher fixture's config
  config.train.steps = 6
  config.eval.every = 0
  with pytest.warns(UserWarning, match=r"checkpoints/6 cannot be restored.*resuming from step 4"):
    trainer.run(config, workdir, quiet=True)
  abstract = nnx.state(Decoder(checkpoint.read_model_config(workdir), rngs=nnx.Rngs(0)))
  want = checkpoint.restore_params(teacher_dir, abstract)
  got = checkpoint.restore_params(workdir, abstract)
  for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
    np.testing.assert_array_equal(
        np.asarray(b.get_value()), np.asarray(a.get_value()), err_msg=str(path)
    )


def test_a_signal_stops_the_run_after_its_step_and_the_rerun_resumes_exactly(
    teacher_dir, tmp_path, monkeypatch
):
  """SIGTERM during step 3 (a preemption notice): the run finishes the step, logs and saves
  it (not a regular checkpoint: those are every 2), raises `Stopped` and leaves no handler
  behind; the same call then resumes from step 3 and ends with the parameters of the
  uninterrupted run (the teacher fixture's, same config) to the bit."""
  from opdjax.rollouts import Rollouts
  from opdjax.stopping import Stopped

  sample = Rollouts.sample

  def sample_and_signal(self, step, params):
    if step == 2:  # the third step's rollout
      os.kill(os.getpid(), signal.SIGTERM)
    return sample(self, step, params)

  monkeypatch.setattr(Rollouts, "sample", sample_and_signal)
  config = tiny("sft")  # the teacher fixture's config
  config.train.steps = 6
  config.eval.every = 0
  workdir = tmp_path / "stopped"
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Stopped, match="stopped by SIGTERM after step 3; its checkpoint is in"):
    trainer.run(config, workdir, quiet=True)
  assert signal.getsignal(signal.SIGTERM) is handler
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 3]
  monkeypatch.setattr(Rollouts, "sample", sample)
  result = trainer.run(config, workdir, quiet=True)
  # step 3's line holds the steps since the last (logged every 2); none is lost or repeated
  assert [r["step"] for r in result.history] == [2, 3, 4, 6]
  abstract = nnx.state(Decoder(checkpoint.read_model_config(workdir), rngs=nnx.Rngs(0)))
  want = checkpoint.restore_params(teacher_dir, abstract)
  got = checkpoint.restore_params(workdir, abstract)
  for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
    np.testing.assert_array_equal(
        np.asarray(b.get_value()), np.asarray(a.get_value()), err_msg=str(path)
    )


def test_the_cli_exits_with_the_signals_code_when_a_run_stops(capsys, tmp_path, monkeypatch):
  from opdjax.stopping import Stopped

  def stopped(config, workdir):
    raise Stopped(signal.SIGTERM, 3, workdir)

  monkeypatch.setattr(trainer, "run", stopped)
  code, _, err = run_cli(capsys, "--exp", "teacher_sft", "--workdir", str(tmp_path))
  assert code == 143  # 128 + SIGTERM, as a shell reports a process a signal ended
  assert err == (
      f"stopped by SIGTERM after step 3; its checkpoint is in {tmp_path}; "
      "the same command (or call) resumes from it\n"
  )


def test_a_second_ctrl_c_interrupts_at_once():
  from opdjax.stopping import StopOnSignal

  with StopOnSignal() as stop:
    assert not stop.reached()
    os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop after the step
    assert stop.reached() and stop.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_on_several_processes_jaxs_preemption_service_decides_with_one_count(monkeypatch):
  """Several processes leave SIGTERM to JAX's preemption service and ask it at each check,
  numbered by one count that keeps growing across runs (stages), as its protocol needs: a
  count restarting per run could name a step a later stage never reaches."""
  from jax.experimental import multihost_utils

  from opdjax import stopping

  asked = []
  monkeypatch.setattr(stopping.jax, "process_count", lambda: 2)
  monkeypatch.setattr(
      multihost_utils,
      "reached_preemption_sync_point",
      lambda i: asked.append(i) or len(asked) == 4,  # the service names the 4th check
  )
  handlers = {s: signal.getsignal(s) for s in stopping.StopOnSignal.SIGNALS}
  answers = []
  for _ in range(2):  # two stages
    with stopping.StopOnSignal() as stop:
      assert {s: signal.getsignal(s) for s in handlers} == handlers  # none installed
      answers += [stop.reached(), stop.reached()]
  assert answers == [False, False, False, True]
  assert asked == list(range(asked[0], asked[0] + 4))


def test_a_rerun_with_other_settings_says_which_run_it_reuses(teacher_dir, tmp_path):
  """A finished workdir rerun with another learning rate would print the old run's results
  as if they were the new setting's: it warns, naming the setting. Running longer or
  evaluating more often are what a rerun is for, and stay silent."""
  import shutil
  import warnings

  workdir = tmp_path / "rerun"
  shutil.copytree(teacher_dir, workdir)
  config = tiny("sft")  # the teacher fixture's config
  config.train.steps = 6
  config.eval.every = 0
  config.optimizer.learning_rate = 2e-3
  with pytest.warns(
      UserWarning,
      match=r"optimizer.learning_rate: 0.001 -> 0.002\); its step-6 "
      r"checkpoint is reported as it is",
  ):
    trainer.run(config, workdir, quiet=True)
  config.optimizer.learning_rate = 1e-3
  config.eval.every, config.train.log_every = 3, 1
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer.run(config, workdir, quiet=True)
  assert not [w for w in caught if "other settings" in str(w.message)]


def test_workdir_uris_keep_their_scheme(tmp_path):
  """`gs://...` stays a cloud path (not `$PWD/gs:/...`); a local one becomes absolute.
  (tests/test_object_store.py runs training into a bucket.)"""
  cloud = checkpoint.resolve("gs://bucket/runs/opd")
  assert str(cloud) == "gs://bucket/runs/opd"
  assert str(checkpoint.resolve("relative/run")) == str(Path("relative/run").absolute())


def test_non_finite_loss_stops_without_overwriting(tmp_path):
  config = tiny("sft")
  config.train.steps = 10
  config.train.save_every = 1
  config.eval.every = 0
  config.optimizer.learning_rate = 1e30
  config.optimizer.warmup_steps = 1
  config.optimizer.schedule = "constant"
  with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite loss.*last good checkpoint"):
    trainer.run(config, tmp_path, quiet=True)
  last = checkpoint.Checkpointer(tmp_path).latest_step()
  abstract = nnx.state(Decoder(checkpoint.read_model_config(tmp_path), rngs=nnx.Rngs(0)))
  if last is not None:
    params = checkpoint.restore_params(tmp_path, abstract)
    assert all(np.isfinite(np.asarray(v.get_value())).all() for _, v in nnx.to_flat_state(params))


def test_a_run_stopped_before_its_first_checkpoint_logs_each_step_once(tmp_path):
  """A run killed before its first checkpoint starts again from step 0; the lines it had
  logged are redone, so they are dropped rather than kept beside the new ones."""
  stale = {"step": 2, "split": "train", "loss": 123.0}
  (tmp_path / metrics.HISTORY_FILE).write_text(json.dumps(stale) + "\n")
  config = tiny("sft")
  config.train.steps, config.eval.every = 2, 0
  result = trainer.run(config, tmp_path, quiet=True)
  assert [(r["step"], r["split"]) for r in result.history] == [(2, "train")]
  assert result.history[0]["loss"] != stale["loss"]


# ---------------------------------------------------------------- command line


def run_cli(capsys, *argv):
  code = cli_main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_list_and_dry_run(capsys):
  code, out, _ = run_cli(capsys, "--list")
  assert code == 0
  for name in ("quickstart", "compare_objectives", "teacher_sft"):
    assert name in out
  code, out, _ = run_cli(capsys, "--exp", "teacher_sft", "--exp.train.steps=7", "--dry_run")
  assert code == 0 and "steps: 7" in out
  blocks = f"xla in blocks of {attention.QUERY_BLOCK} queries"
  assert f"  student: 3 layers, per-layer (auto), remat none, attention {blocks} (auto)\n" in out
  code, out, _ = run_cli(
      capsys,
      "--exp",
      "teacher_sft",
      "--exp.student.scan_layers=on",
      "--exp.student.attention=xla",
      "--dry_run",
  )
  assert code == 0
  assert f"  student: 3 layers, scanned (on), remat save_dots, attention {blocks} (xla)\n" in out


def test_dry_run_shows_only_the_settings_a_run_reads():
  def shown(**recipe):
    c = configs.base_config()
    c.recipe.update(recipe)
    return configs.applicable(c)

  sft = shown(name="sft")
  assert dict(sft.recipe) == {"name": "sft"}
  assert "teacher" not in sft and "reference" not in sft and "teachers" not in sft
  opd = shown(name="opd", estimator="sampled")
  assert {"gamma", "correction"} <= set(opd.recipe) and "reward_scale" not in opd.recipe
  assert "divergence" not in opd.recipe and "teacher" in opd and "reference" not in opd
  full = shown(name="opd", estimator="full", divergence="generalized_jsd")
  assert "divergence" in full.recipe and "gamma" not in full.recipe
  gopd = shown(name="gopd", estimator="sampled")
  assert "reward_scale" in gopd.recipe and "reference" in gopd and "teacher" in gopd
  grpo = shown(name="grpo")
  assert {"group_size", "opd_weight"} <= set(grpo.recipe) and "teacher" not in grpo
  assert "teacher" in shown(name="grpo", opd_weight=0.5)
  assert "teacher" in shown(name="seqkd")  # it samples from the teacher
  self_distill = shown(name="self_distill", teacher_mode="ema")
  assert "teacher" not in self_distill and "ema_rate" in self_distill.recipe
  assert "trust_region_alpha" not in self_distill.recipe
  routed = configs.base_config()
  routed.teachers.addition = configs.teacher_section(checkpoint="somewhere")
  assert "teachers" in configs.applicable(routed) and "teacher" not in configs.applicable(routed)
  staged = configs.applicable(
      ml_collections.ConfigDict({"stages": {"a": configs.teacher_config()}})
  )
  assert "teacher" not in staged.stages.a and staged.stages.a.student.preset == "teacher-small"


def test_cli_runs_a_users_own_experiment_file(capsys, tmp_path):
  path = tmp_path / "my_exp.py"
  path.write_text(
      '"""My experiment."""\nfrom opdjax import configs\n\n'
      "def get_config(arg=None):\n  c = configs.base_config()\n"
      '  c.recipe.name = "sft"\n'
      "  c.train.steps = int(arg or 5)\n  return c\n"
  )
  code, out, _ = run_cli(capsys, "--exp", f"{path}:9", "--dry_run")
  assert code == 0 and "steps: 9" in out
  code, _, err = run_cli(capsys, "--exp", str(tmp_path / "missing.py"))
  assert code == 2 and "missing.py' does not exist" in err


def test_every_shipped_experiment_rejects_an_argument_it_does_not_take():
  # `--exp NAME:ARG` names the workdir after ARG, so an ignored typo would train from scratch
  for name in experiment_names():
    with pytest.raises(ConfigError, match="'bogus'"):
      load_experiment(name).get_config("bogus")


@pytest.mark.parametrize(
    "argv,message",
    [
        (("--exp", "nope"), "unknown experiment 'nope'; valid: "),
        (
            ("--exp", "teacher_sft", "--exp.train.stepz=3"),
            "unknown override key 'train.stepz': no 'stepz' at train; valid: [",
        ),
        (
            ("--exp", "teacher_sft", "--exp.train.steps=many"),
            "--exp.train.steps: expected an int, got 'many'",
        ),
        (("--exp", "teacher_sft", "--exp.train.tensorboard=maybe"), "expected a bool"),
        (("--exp", "teacher_sft", "--train.steps=3"), "unrecognised argument '--train.steps=3'"),
        (("--exp", "teacher_sft", "--exp.recipe.name=ppo"), "unknown recipe 'ppo'; valid: "),
        (
            ("--exp", "teacher_sft", "--exp.student.remat=some"),
            "student.remat must be one of ('auto', 'none', 'full', 'save_dots'), got 'some'",
        ),
        (
            ("--exp", "teacher_sft", "--exp.train.memory_limit_gb=0.001", "--dry_run"),
            "GB per device, above the 0.00 GB limit (train.memory_limit_gb, 0 = the device's own); "
            "the biggest term is train step temporaries",
        ),
        (
            ("--exp", "teacher_sft", "--exp.recipe.name=opd", "--exp.recipe.divergence=jsd"),
            "unknown divergence 'jsd'; valid: ['alpha_divergence'",
        ),
        (
            ("--exp", "teacher_sft", "--exp.train.batch_size=12", "--exp.mesh.shape=(8,)"),
            "train.batch_size=12 is not divisible by the 8 data-parallel devices",
        ),
        (("--exp", "teacher_sft", "--exp.recipe.name=opd"), "recipe 'opd' needs a teacher"),
        (("--exp", "teacher_sft", "--exp.task.name=sorting"), "unknown task 'sorting'; valid: "),
        (
            ("--exp", "teacher_sft", "--exp.sampling.top_p=1.5"),
            "sampling.top_p must be in (0, 1], got 1.5",
        ),
        (
            ("--exp", "teacher_sft", "--exp.recipe.name=grpo", "--exp.sampling.top_k=-3"),
            "error: sampling.top_k must be an integer >= 0 (0 = off), got -3",
        ),
        (
            ("--exp", "teacher_sft", "--exp.eval.every=-1"),
            "eval.every must be >= 0 (0 = no evaluation), got -1",
        ),
        (("--exp", "teacher_sft", "--exp.seed=-1"), "seed must be in [0, 2**32), got -1"),
        (
            ("--exp", "teacher_sft", "--exp.train.keep_checkpoints=0"),
            "train.keep_checkpoints must be >= 1, got 0",
        ),
        (
            (
                "--exp",
                "teacher_sft",
                "--exp.recipe.name=self_distill",
                "--exp.recipe.privileged=hint {hint}; {prompt}",
            ),
            "recipe.privileged may use only {prompt} and {answer} (a literal brace is doubled), "
            "got 'hint {hint}; {prompt}': KeyError 'hint'",
        ),
        (
            ("--exp", "teacher_sft", "--exp.eval.temperature=-1.0"),
            "eval.temperature must be >= 0 (0 = greedy), got -1.0",
        ),
        (
            ("--exp", "teacher_sft", "--exp.task.eval_size=0"),
            "task.eval_size must be >= 1 when eval.every=200 evaluates, got 0",
        ),
        (
            ("--exp", "teacher_sft", "--exp.task.completion_length=0"),
            "task.completion_length must be >= 1, got 0",
        ),
        (
            ("--exp", "teacher_sft", "--exp.optimizer.learning_rate=-0.001"),
            "optimizer.learning_rate must be >= 0, got -0.001",
        ),
        (
            ("--exp", "compare_objectives:huge"),
            "takes 'tiny', 'full' and a task ('modular_chain' or 'addition'), got ['huge']",
        ),
        (
            (
                "--exp",
                "teacher_sft",
                "--exp.recipe.name=opd",
                "--exp.recipe.estimator=sampled",
                "--exp.sampling.temperature=0.7",
            ),
            "the sampled estimator is off-policy here (sampling.temperature=0.7)",
        ),
        (
            (
                "--exp",
                "teacher_sft",
                "--exp.recipe.name=opd",
                "--exp.recipe.estimator=sampled",
                "--exp.train.rollout_ahead=True",
            ),
            "the sampled estimator is off-policy here (train.rollout_ahead=True)",
        ),
        (
            ("--exp", "teacher_sft", "--exp.train.rollout_ahead=True"),
            "recipe 'sft' takes its completions from 'dataset'; it applies to recipes that "
            "sample from the student: opd, gopd, grpo",
        ),
        (
            (
                "--exp",
                "teacher_sft",
                "--exp.recipe.name=self_distill",
                "--exp.train.rollout_ahead=1",
            ),
            "train.rollout_ahead=True does not apply to self_distill",
        ),
        (
            ("--exp", "teacher_sft", "--num_processes", "2", "--process_id", "0"),
            "missing: --coordinator_address",
        ),
        (
            (
                "--exp",
                "teacher_sft",
                "--coordinator_address",
                "h:1",
                "--num_processes",
                "2",
                "--process_id",
                "2",
            ),
            "--process_id=2 must be in [0, --num_processes=2)",
        ),
        (
            ("--exp", "teacher_sft", "--exp.sampling.layout=fsdp"),
            "sampling.layout must be one of ('train', 'tensor', 'replicated'), got 'fsdp'",
        ),
        (
            ("--exp", "teacher_sft", "--exp.student.scan_layers=True"),
            "student.scan_layers must be one of ('auto', 'on', 'off'), got 'True'",
        ),
        (
            ("--exp", "teacher_sft", "--exp.train.async_checkpointing=yes"),
            "train.async_checkpointing must be one of ('auto', 'on', 'off'), got 'yes'",
        ),
        (
            ("--exp", "teacher_sft", "--exp.sharding.rules=(('embed', ('vocab',)),)"),
            "sharding.rules: partition rule 'embed': unknown mesh axes ['vocab']",
        ),
    ],
)
def test_cli_errors_are_one_clear_line(capsys, tmp_path, argv, message):
  code, _, err = run_cli(capsys, *argv, "--workdir", str(tmp_path))
  assert code == 2
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err, err


def test_a_bugs_value_error_keeps_its_traceback(capsys, tmp_path, monkeypatch):
  """Only configuration errors become one line; a ValueError from a bug propagates."""

  def broken(config, workdir, **kwargs):
    raise ValueError("an internal shape bug")

  monkeypatch.setattr(trainer, "run", broken)
  with pytest.raises(ValueError, match="an internal shape bug"):
    run_cli(capsys, "--exp", "teacher_sft", "--workdir", str(tmp_path))


def test_vocabulary_mismatch_is_reported_before_compiling(capsys, tmp_path):
  teacher = Decoder(tiny_config("qwen3", vocab_size=40), rngs=nnx.Rngs(0))
  save_pretrained(teacher, tmp_path / "hf_teacher")
  code, _, err = run_cli(
      capsys,
      "--exp",
      "teacher_sft",
      "--exp.recipe.name=opd",
      f"--exp.teacher.hf_path={tmp_path / 'hf_teacher'}",
      "--workdir",
      str(tmp_path / "run"),
  )
  assert code == 2
  assert (
      "student and teacher vocabularies differ: student vocab_size=51, teacher vocab_size=40" in err
  )


def test_compare_objectives_tiny(capsys, tmp_path, copy_finished_stages):
  from opdjax.experiments import compare_objectives

  copy_finished_stages(compare_objectives.get_config("tiny").stages, tmp_path)
  code, out, err = run_cli(
      capsys,
      "--exp",
      "compare_objectives:tiny",
      "--workdir",
      str(tmp_path),
      "--exp.methods=opd_sampled_g0",
  )  # one method: suite time (the cost accounting per recipe is tested in test_experiments)
  assert code == 0, err
  assert "opd_sampled_g0" in out and "teacher held-out greedy accuracy" in out
  summary = json.loads((tmp_path / "compare_objectives.json").read_text())
  assert summary["task"] == "modular_chain" and summary["claim"] and summary["verdict"]
  assert set(summary["methods"]) == {"opd_sampled_g0"}
  opd = summary["methods"]["opd_sampled_g0"]["flops_per_update"]
  assert opd["total"] == opd["update"] + opd["sampling"] + opd["scoring"] and opd["sampling"] > 0
  for key, value in summary["teacher_after_mistakes"].items():
    assert 0 <= value <= (np.log(64) if key.endswith("entropy") else 1), key
  axes = {p["x"] for p in summary["panels"]}
  assert axes == {"update", "FLOPs", "trained completion tokens"}
  assert (tmp_path / "compare_objectives.png").exists()


def test_hf_teacher_and_jsonl_prompts(tmp_path):
  from opdjax.data import char_tokenizer

  tok = char_tokenizer()
  teacher = Decoder(
      tiny_config("llama", vocab_size=len(tok), eos_token_ids=(tok.eos_token_id,)), rngs=nnx.Rngs(0)
  )
  save_pretrained(teacher, tmp_path / "hf_teacher")
  lines = [
      json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) for a in range(4) for b in range(4)
  ]
  (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
  config = tiny("opd", estimator="full", divergence="reverse_kl")
  config.teacher.hf_path = str(tmp_path / "hf_teacher")
  config.task.train_jsonl = str(tmp_path / "train.jsonl")
  config.task.eval_size = 8
  config.train.steps = 2
  config.eval.every = 2
  result = trainer.run(config, tmp_path / "run", quiet=True)
  assert "sequence_reverse_kl" in result.final_eval
  bad = tmp_path / "bad.jsonl"
  bad.write_text(lines[0] + "\n{broken\n")
  config.task.train_jsonl = str(bad)
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
    trainer.run(config, tmp_path / "run_bad", quiet=True)


def test_default_precision_is_float32_master_weights_with_bfloat16_compute(teacher_dir, tmp_path):
  """The defaults: the student keeps float32 parameters (and so float32 Adam moments) and
  computes in bfloat16; the teacher, restored from a float32 checkpoint, is bfloat16."""
  import jax
  import jax.numpy as jnp

  from opdjax import sharding

  defaults = configs.base_config()
  config = tiny("opd", estimator="full", divergence="reverse_kl")
  for role in ("student", "teacher"):
    config[role].dtype, config[role].param_dtype = defaults[role].dtype, defaults[role].param_dtype
  assert (config.student.param_dtype, config.student.dtype) == ("float32", "bfloat16")
  assert (config.teacher.param_dtype, config.teacher.dtype) == ("bfloat16", "bfloat16")
  config.teacher.checkpoint = str(teacher_dir)
  mesh = sharding.make_mesh((1,), ("data",))
  tokenizer = build.build_tokenizer(config)
  models = {
      role: build.build_model(
          config[role], build.model_config_of(config[role], tokenizer), seed=0, mesh=mesh
      )
      for role in ("student", "teacher")
  }
  dtypes = {
      role: {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))}
      for role, m in models.items()
  }
  assert dtypes == {"student": {jnp.dtype("float32")}, "teacher": {jnp.dtype("bfloat16")}}
  tokens = jnp.ones((2, 5), jnp.int32)
  assert models["student"].hidden_states(tokens).dtype == jnp.bfloat16
  assert models["student"](tokens).dtype == jnp.float32  # logits are float32

  config.train.steps = config.train.save_every = 2  # bfloat16 is slow on CPUs
  config.eval.every = 0
  result = trainer.run(config, tmp_path, quiet=True)
  assert all(np.isfinite(r["loss"]) for r in result.history if r["split"] == "train")
  abstract = nnx.state(Decoder(checkpoint.read_model_config(tmp_path), rngs=nnx.Rngs(0)))
  saved = checkpoint.restore_params(tmp_path, abstract)
  assert {x.dtype for x in jax.tree.leaves(saved)} == {jnp.dtype("float32")}


def test_no_recompilation_across_steps(teacher_dir, tmp_path, monkeypatch):
  """A compile counter: after the first step (which compiles sampling, the teacher's forward
  pass and the update), later steps compile nothing, and the logged `compile_s` says so."""
  config = tiny("opd", estimator="sampled", correction="none")
  config.teacher.checkpoint = str(teacher_dir)
  config.train.steps, config.train.log_every, config.train.save_every = 5, 1, 5
  config.eval.every = 0
  compiles, at_step = [], {}
  listener = (
      lambda event, duration, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration"
      else None
  )
  jax.monitoring.register_event_duration_secs_listener(listener)
  write = trainer.metrics.Writer.write

  def counting_write(self, step, split, values):
    at_step[step] = len(compiles)
    return write(self, step, split, values)

  monkeypatch.setattr(trainer.metrics.Writer, "write", counting_write)
  try:
    result = trainer.run(config, tmp_path, quiet=True)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert at_step[1] > 0 and at_step[2] == at_step[5], at_step
  # The run reports it: its compile_s is the first step's compilation, then nothing.
  compile_s = [r["compile_s"] for r in result.history if r["split"] == "train"]
  assert compile_s[0] > 0.5 and compile_s[1:] == [0.0] * 4, compile_s


def test_rollout_ahead_samples_from_the_parameters_before_each_update(
    teacher_dir, tmp_path, monkeypatch
):
  """`train.rollout_ahead`: step k + 1's rollout is sampled from the parameters update k
  starts from (one update stale), except after a checkpoint, where it is on-policy as a
  resumed run's is; so a resume ends with the uninterrupted run's parameters bitwise."""
  import shutil

  fingerprint = lambda state: float(
      sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(state))
  )
  sampled_from, updated_from = [], []
  generate = rollouts.generate

  def recording_generate(model, *args, **kwargs):
    sampled_from.append(fingerprint(nnx.state(model, nnx.Param)))
    return generate(model, *args, **kwargs)

  check_memory = trainer.check_memory

  def recording_check_memory(*args, **kwargs):
    plan = check_memory(*args, **kwargs)

    def train_step(params, *rest):
      updated_from.append(fingerprint(params))
      return plan.train_step(params, *rest)

    return plan._replace(train_step=train_step)

  monkeypatch.setattr(rollouts, "generate", recording_generate)
  monkeypatch.setattr(trainer, "check_memory", recording_check_memory)

  def run(ahead, workdir):
    config = tiny("opd", estimator="sampled", correction="ppo_clip")
    config.teacher.checkpoint = str(teacher_dir)
    config.train.steps, config.train.save_every, config.train.log_every = 5, 3, 1
    config.train.rollout_ahead = ahead
    config.optimizer.warmup_steps = 0  # so the first update moves the parameters too
    config.eval.every = 0
    sampled_from.clear(), updated_from.clear()
    result = trainer.run(config, workdir, quiet=True)
    return result, list(sampled_from), list(updated_from)

  _, on_policy, p = run(False, tmp_path / "on_policy")
  assert on_policy == p and len(set(p)) == 5  # each rollout from the parameters it updates
  result, ahead, p = run(True, tmp_path / "ahead")
  # rollouts for steps 0..4 in order: 0 before any update, 1 and 2 a step stale, 3 after the
  # checkpoint at step 3 on-policy, 4 a step stale again
  assert ahead == [p[0], p[0], p[1], p[3], p[3]], (ahead, p)
  ratios = [r["importance_ratio"] for r in result.history if r["split"] == "train"]
  assert all(r != 1.0 for r in ratios[1:3] + ratios[4:]), ratios  # the correction sees it

  abstract = nnx.state(Decoder(checkpoint.read_model_config(tmp_path / "ahead"), rngs=nnx.Rngs(0)))
  want = checkpoint.restore_params(tmp_path / "ahead", abstract)
  shutil.rmtree(tmp_path / "ahead" / "checkpoints" / "5")
  _, resumed, p_resumed = run(True, tmp_path / "ahead")
  assert resumed == [p[3], p[3]] and p_resumed == p[3:]
  got = checkpoint.restore_params(tmp_path / "ahead", abstract)
  for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
    np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(a.get_value()), str(path))


def test_grpo_reward_is_the_one_the_recipe_names(tmp_path, monkeypatch):
  """`recipe.reward` picks the scorer the rollout calls: exact match and step credit on
  literal completions, then a GRPO run whose step-credit scorer is replaced by a constant
  logs exactly that reward (a run wired to the exact verifier would not)."""
  from opdjax import evaluation
  from opdjax.data import char_tokenizer
  from opdjax.sampling import Generation

  tok = char_tokenizer()
  rows = ["7,4,7", "7,4,9", "7,5,7"]
  ids = [tok.encode(r, add_special_tokens=False) for r in rows]
  tokens = jnp.asarray(ids, jnp.int32)
  ones = jnp.ones(tokens.shape, bool)
  zeros = jnp.zeros(tokens.shape, jnp.float32)
  gen = Generation(tokens, ones, jnp.full((3,), tokens.shape[1]), ~ones[:, 0], zeros, zeros)
  assert evaluation.REWARDS["exact"](tok, gen, ["7,4,7"] * 3) == [True, False, False]
  np.testing.assert_allclose(
      evaluation.REWARDS["step_credit"](tok, gen, ["7,4,7"] * 3), [1.0, 2 / 3, 1 / 3]
  )
  with pytest.raises(ConfigError, match=r"recipe.reward must be one of \('exact', 'step_credit'\)"):
    recipes.build(tiny("grpo", group_size=2, reward="partial").recipe)

  monkeypatch.setitem(evaluation.REWARDS, "step_credit", lambda t, g, a: [0.25] * len(a))
  config = tiny("grpo", group_size=2, reward="step_credit")
  config.eval.every = 0
  result = trainer.run(config, tmp_path, quiet=True)
  assert [r["verifier_reward"] for r in result.history if r["split"] == "train"] == [0.25, 0.25]


# ---------------------------------------------------------------- several teachers


def test_each_routed_teacher_runs_on_its_own_rows_only():
  """Model k reads only rows routed to k (padding repeats one of them and is dropped), and
  the routed hidden states equal running every model on the whole batch."""
  from opdjax.evaluation import forward_hidden, forward_hidden_rows, own_rows
  from opdjax.objectives import route_hidden

  route = np.array([0, 1, 1, 0, 1, 1])
  gather, scatter = own_rows(route, 1)
  np.testing.assert_array_equal(gather, [1, 2, 4, 5])
  np.testing.assert_array_equal(own_rows(route, 0)[0], [0, 3])
  gather, scatter = own_rows(np.array([1, 0, 1, 1, 1]), 1)  # 4 rows: no padding
  np.testing.assert_array_equal(gather, [0, 2, 3, 4])
  gather, scatter = own_rows(np.array([1, 0, 0, 0, 0]), 1)
  np.testing.assert_array_equal(gather, [0]), np.testing.assert_array_equal(scatter, [0])
  gather, scatter = own_rows(np.array([0, 1, 1, 1, 0]), 1)  # 3 rows padded to 4
  np.testing.assert_array_equal(gather, [1, 2, 3, 1])
  np.testing.assert_array_equal(scatter, [1, 2, 3, 5])  # 5 = B: the padding is dropped
  assert own_rows(np.array([0, 0]), 1)[0].size == 0

  models = [
      Decoder(tiny_config("llama", hidden_size=h), rngs=nnx.Rngs(i)) for i, h in enumerate((32, 48))
  ]
  route = np.array([1, 0, 1, 1, 0, 0])  # 3 rows each, padded to 4
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 50, (6, 7)), jnp.int32)
  mask = jnp.asarray(rng.random((6, 7)) < 0.9).at[:, -1].set(True)
  whole = route_hidden([forward_hidden(*nnx.split(m), tokens, mask) for m in models], route)
  own = route_hidden(
      [
          forward_hidden_rows(*nnx.split(m), tokens, mask, *own_rows(route, k))
          for k, m in enumerate(models)
      ],
      route,
  )
  np.testing.assert_allclose(own, whole, atol=1e-6)


def test_teachers_score_each_row_by_the_teacher_it_names(tmp_path):
  """Routing every row to "a" equals the single teacher a; a mix of a and b differs from
  it (so b's rows are scored by b); a missing or unknown name and a teacher with another
  vocabulary are one-line errors."""
  from opdjax.data import char_tokenizer

  tok = char_tokenizer()
  for name, seed in (("a", 0), ("b", 1)):
    model = Decoder(
        tiny_config("llama", vocab_size=len(tok), eos_token_ids=(tok.eos_token_id,)),
        rngs=nnx.Rngs(seed),
    )
    save_pretrained(model, tmp_path / name)
  save_pretrained(Decoder(tiny_config("llama", vocab_size=40), rngs=nnx.Rngs(0)), tmp_path / "v40")
  sums = [(a, b) for a in range(4) for b in range(4)]

  def run(tag, names, *, single=None, b_path=tmp_path / "b"):
    path = tmp_path / f"{tag}.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"prompt": f"{a}+{b}=", "answer": str(a + b), **({"teacher": n} if n else {})}
            )
            + "\n"
            for (a, b), n in zip(sums, names)
        )
    )
    config = tiny("opd", estimator="full", divergence="reverse_kl")
    config.task.train_jsonl = str(path)
    config.train.steps = 2
    config.eval.every = 2 if tag in ("single_a", "routed_a") else 0
    if single:
      config.teacher.hf_path = str(single)
    else:
      for name, where in (("a", tmp_path / "a"), ("b", b_path)):
        config.teachers[name] = configs.teacher_section(
            hf_path=str(where), dtype="float32", param_dtype="float32"
        )
    evals[tag] = trainer.run(config, tmp_path / tag, quiet=True).final_eval
    abstract = nnx.state(Decoder(checkpoint.read_model_config(tmp_path / tag), rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(checkpoint.restore_params(tmp_path / tag, abstract))
    return {str(p): np.asarray(v.get_value()) for p, v in flat}

  evals = {}
  single_a = run("single_a", [""] * 16, single=tmp_path / "a")
  routed_a = run("routed_a", ["a"] * 16)
  mixed = run("mixed", ["a", "b"] * 8)
  for name in single_a:
    np.testing.assert_allclose(routed_a[name], single_a[name], atol=1e-6, err_msg=name)
  assert max(np.abs(mixed[n] - routed_a[n]).max() for n in mixed) > 1e-4
  # Evaluation scores each teacher's rows against that teacher: all rows routed to a give
  # single-teacher a's KLs under a's name (b has no rows, so no b/ metrics).
  for key in ("sequence_reverse_kl", "sequence_forward_kl", "token_reverse_kl"):
    np.testing.assert_allclose(evals["routed_a"][f"a/{key}"], evals["single_a"][key], rtol=1e-5)
    np.testing.assert_allclose(evals["routed_a"][key], evals["single_a"][key], rtol=1e-5)
  assert "b/sequence_reverse_kl" not in evals["routed_a"]
  with pytest.raises(
      ConfigError,
      match=r"missing.jsonl\[3\]: no 'teacher' field; with several "
      r"teachers every example names one of \['a', 'b'\]",
  ):
    run("missing", ["a", "b", "a", ""] * 4)
  with pytest.raises(
      ConfigError,
      match=r"unknown.jsonl\[1\]: teacher 'c' is not one of the "
      r"configured teachers \['a', 'b'\]",
  ):
    run("unknown", ["a", "c"] * 8)
  with pytest.raises(ConfigError, match="student and teacher/b vocabularies differ"):
    run("vocab", ["a", "b"] * 8, b_path=tmp_path / "v40")


def test_sgd_takes_a_plain_clipped_gradient_step_and_unknown_optimizers_are_named():
  import jax.numpy as jnp
  import optax

  config = configs.base_config()
  config.optimizer.update(name="sgd", schedule="constant", warmup_steps=1, learning_rate=0.5)
  config.optimizer.grad_clip = 1.0
  tx = learner.make_optimizer(config)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([3.0, 4.0])}  # norm 5: clipped to norm 1
  state = tx.init(params)
  _, state = tx.update(grads, state, params)  # step 0 of the warm-up has rate 0
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], [1.0 - 0.3, -2.0 - 0.4])
  config.optimizer.name = "lion"
  with pytest.raises(ConfigError, match="optimizer.name must be 'adamw' or 'sgd', got 'lion'"):
    learner.make_optimizer(config)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("learning_rate", -1e-3, "optimizer.learning_rate must be >= 0, got -0.001"),
        ("grad_clip", -1.0, "optimizer.grad_clip (a global norm) must be > 0, got -1.0"),
        ("grad_clip", 0.0, "optimizer.grad_clip (a global norm) must be > 0, got 0.0"),
        ("weight_decay", -0.1, "optimizer.weight_decay must be >= 0, got -0.1"),
        ("final_lr_fraction", 1.5, "optimizer.final_lr_fraction must be in [0, 1], got 1.5"),
    ],
)
def test_optimizer_settings_that_would_flip_or_stop_updates_are_refused(key, value, message):
  # optax takes them silently: a negative clip norm scales every gradient by a negative factor
  config = configs.base_config()
  config.optimizer[key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    learner.make_optimizer(config)


@pytest.mark.parametrize(
    "recipe,message",
    [
        (
            dict(estimator="topk", top_k=-2),
            "recipe.estimator='topk' needs recipe.top_k >= 1, got -2",
        ),
        (
            dict(divergence="generalized_jsd", divergence_kwargs={"beta": 1.5}),
            "recipe.divergence / recipe.divergence_kwargs: beta must be in [0.0, 1.0], got 1.5",
        ),
        (
            dict(divergence_kwargs={"temperature": 0.0}),
            "recipe.divergence / recipe.divergence_kwargs: temperature must be > 0, got 0.0",
        ),
    ],
)
def test_recipe_values_out_of_range_are_config_errors_before_tracing(recipe, message):
  # raised from inside the traced step, the divergence's own check was a ValueError traceback
  config = configs.base_config()
  config.recipe.update(recipe)
  with pytest.raises(ConfigError, match=re.escape(message)):
    recipes.build(config.recipe)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_without_warm_up_the_first_update_takes_the_full_rate(schedule):
  """`optimizer.warmup_steps=0` means no warm-up: update 0 moves by the full rate (it used to
  take rate 0, a lost update); with a warm-up, update 0 takes rate 0 and update w the full."""
  import jax.numpy as jnp

  config = configs.base_config()
  config.optimizer.update(name="sgd", schedule=schedule, warmup_steps=0, learning_rate=0.5)
  config.train.steps = 100
  params, grads = {"w": jnp.array([1.0])}, {"w": jnp.array([0.5])}  # under the clip
  tx = learner.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.25])
  config.optimizer.warmup_steps = 2
  tx = learner.make_optimizer(config)
  state = tx.init(params)
  steps = []
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    steps.append(float(updates["w"][0]))
  np.testing.assert_allclose(steps, [0.0, -0.125, -0.25])
  config.optimizer.warmup_steps = -1
  with pytest.raises(ConfigError, match="optimizer.warmup_steps must be >= 0, got -1"):
    learner.make_optimizer(config)


def test_evaluation_pads_rows_that_do_not_split_over_the_devices(teacher_dir):
  """5 held-out rows on 8 devices (a routed teacher's share of a held-out set, say): the
  block is padded to 8 by repeating its last row, and the padding counts nowhere, so every
  metric equals one device's (near-zero temperature: the samples are the same)."""
  from opdjax.data import PromptSet
  from opdjax.evaluation import evaluate
  from opdjax.sharding import batch_sharding, make_mesh

  config = tiny("opd")
  tokenizer = build.build_tokenizer(config)
  _, held_out = build.build_data(config, tokenizer)
  five = PromptSet(
      *(x[:5] for x in (held_out.prompt_tokens, held_out.prompt_mask, held_out.answer_tokens)),
      held_out.answer_mask[:5],
      held_out.answers[:5],
  )
  section = config.student.copy_and_resolve_references()
  section.init_from = str(teacher_dir)
  model_config = checkpoint.read_model_config(teacher_dir)
  results = []
  for mesh in (make_mesh((1,)), make_mesh((8,))):
    results.append(
        evaluate(
            build.build_model(section, model_config, seed=0, mesh=mesh),
            five,
            tokenizer,
            key=jax.random.key(0),
            max_new_tokens=config.task.completion_length,
            teacher=build.build_model(config.student, model_config, seed=3, mesh=mesh),
            temperature=1e-4,
            batch_sharding=batch_sharding(mesh),
        )
    )
  one, eight = results
  assert one.keys() == eight.keys() and "token_reverse_kl" in one
  for key in one:
    np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
