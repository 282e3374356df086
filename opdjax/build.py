"""What a config builds before a run allocates anything: the recipe, tokenizer, data, mesh,
partition rules and every model's config (`setup`, which also validates them), and the
models themselves (`build_model`: from Hugging Face, a checkpoint or a fresh init)."""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from opdjax import checkpoint, recipes, sharding
from opdjax.data import (
    PromptSet,
    PromptSource,
    char_tokenizer,
    encode,
    load_jsonl,
    synthetic_records,
)
from opdjax.errors import ConfigError
from opdjax.models import (
    Decoder,
    ModelConfig,
    attention,
    load_pretrained,
    load_tokenizer,
    read_config,
)
from opdjax.models.decoder import REMAT_SETTINGS, shared_layer_path, stack_layers, unstack_layers
from opdjax.models.hf import abstract_model
from opdjax.sampling import FUSE_SETTINGS, SamplingParams

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
SCAN_LAYERS = ("auto", "on", "off")
# `scan_layers="auto"` stacks the layers of a model this deep or deeper. Per-layer programs
# grow with depth and a scan's do not. One update of a Qwen3-0.6B-shaped model (28 layers,
# `benchmarks/opd_step_scale.py`, 2-core CPU): per-layer 16.4 s to compile, 23.9 s a step,
# 7.2 GB of temporaries; scanned with `remat="auto"` (save_dots, `Decoder`) 4.1 s, 22.0 s,
# 4.9 GB. An H200 ran the small OPD step at least as fast scanned (20–21 ms against 22–30
# ms). The synthetic experiments' presets (2–3 layers) stay per-layer, as their results
# were made so.
SCAN_LAYERS_FROM = 16


def dtype_of(name: str):
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
  converted on restore, one parameter at a time (`restore_either_layout`). Parameters are
  laid out on `mesh` by the partition `rules`."""
  kwargs = model_kwargs(model_config, config_of, mesh)
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


def build_frozen_models(config, run_setup: Setup, teacher, *, mesh, rules) -> dict:
  """`{section name: model}` for each frozen model the recipe's roles read: the external
  `teacher` (already built), each routed teacher, the reference (the student's seed: a copy
  of its initial weights unless it loads its own), and for self-distillation the student's
  initial weights (a frozen teacher, trust-region's second role, an EMA's start; no model
  for the current weights)."""
  student_cfg = run_setup.model_configs["student"]
  self_teacher = run_setup.recipe.self_teacher
  place = dict(mesh=mesh, rules=rules)
  models = {}
  for name in (n for role in run_setup.recipe.roles for n in members(run_setup, role)):
    if self_teacher:
      if self_teacher.kind(name) != "current":
        models[name] = build_model(config.student, student_cfg, seed=config.seed, **place)
    elif name == "teacher":
      models[name] = teacher
    else:  # the reference (the student's seed) or a routed teacher, teacher/NAME
      seed = config.seed if name == "reference" else config.seed + 1
      models[name] = build_model(
          run_setup.sections[name], run_setup.model_configs[name], seed=seed, **place
      )
  return models


def restore_either_layout(source, abstract, mesh, rules=sharding.DEFAULT_RULES, *, scanned: bool):
  """A run's parameters restored into `abstract`'s layer layout (`scanned` or per-layer),
  whichever of the two layouts the checkpoint was saved in.

  A checkpoint in the other layout is read one parameter at a time (all its layers), each
  converted and placed before the next is read, so the conversion holds the model once
  plus one parameter in both layouts."""
  try:
    return checkpoint.restore_params(source, sharding.abstract_state(abstract, mesh, rules))
  except (ValueError, KeyError):
    convert, back = (unstack_layers, stack_layers) if scanned else (stack_layers, unstack_layers)
    saved = sharding.abstract_state(jax.eval_shape(convert, abstract), mesh, rules)
    groups = {}  # the saved entries of each parameter: a stacked one, or its layers
    for path, variable in nnx.to_flat_state(saved):
      groups.setdefault(shared_layer_path(path), []).append((path, variable))
    parts = (nnx.from_flat_state(group) for group in groups.values())
    converted = []
    for part in checkpoint.restore_param_parts(source, parts):
      converted += nnx.to_flat_state(sharding.place_state(back(part), mesh, rules))
    return nnx.from_flat_state(converted)


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


def _named(section: str, make):
  """`make()`, with its `ConfigError` prefixed by the config section whose values it read."""
  try:
    return make()
  except ConfigError as e:
    raise ConfigError(f"{section}.{e}") from None


def sampling_params(config) -> SamplingParams:
  """How the student draws its rollouts, from `config.sampling` (whose values it checks)."""
  s = config.sampling
  return _named(
      "sampling", lambda: SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
  )


def validate(config, recipe, mesh, model_configs: dict[str, ModelConfig]):
  """Every check that needs no parameters; `model_configs` maps each model role (`student`,
  `teacher` or `teacher/NAME` per routed teacher, `reference`) to its `ModelConfig`."""
  train = config.train
  student_cfg = model_configs["student"]
  sampler = config.sampling
  sampling_params(config)  # a bad value is named as itself, before the checks that read it
  if not 0 <= config.seed < 2**32:  # grain's shuffle takes an unsigned 32-bit seed
    raise ConfigError(f"seed must be in [0, 2**32), got {config.seed}")
  # the held-out sampler's, checked here rather than at the first evaluation
  _named("eval", lambda: SamplingParams(temperature=config.eval.temperature))
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
    if config[role].attention not in attention.ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(
          f"{role}.attention must be one of {attention.ATTENTION_IMPLEMENTATIONS}, got "
          f"{config[role].attention!r}"
      )
    if config[role].attention == "splash" and jax.default_backend() != "tpu":
      warnings.warn(
          f"{role}.attention='splash' is a TPU kernel; on {jax.default_backend()} it runs in "
          "Pallas's interpret mode (exact, and far slower: for tests)",
          stacklevel=2,
      )
    if config[role].get("remat", "auto") not in REMAT_SETTINGS:
      raise ConfigError(f"{role}.remat must be one of {REMAT_SETTINGS}, got {config[role].remat!r}")
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
      "keep_checkpoints",
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
  if sampler.get("fuse_projections", "auto") not in FUSE_SETTINGS:
    raise ConfigError(
        f"sampling.fuse_projections must be one of {tuple(FUSE_SETTINGS)}, got "
        f"{sampler.fuse_projections!r}"
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
  if config.eval.every < 0:
    raise ConfigError(f"eval.every must be >= 0 (0 = no evaluation), got {config.eval.every}")
  if config.eval.every and config.task.eval_size < 1:
    raise ConfigError(
        f"task.eval_size must be >= 1 when eval.every={config.eval.every} evaluates, got "
        f"{config.task.eval_size}"
    )
  for name in ("prompt_length", "completion_length"):
    if config.task[name] < 1:
      raise ConfigError(f"task.{name} must be >= 1, got {config.task[name]}")
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
  for role, section in sections.items():
    scans_layers(section, model_configs[role], role=role)  # a bad setting fails before a build
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


def scans_layers(section, model_config: ModelConfig, *, role: str = "student") -> bool:
  """Whether the model of config `section` (role `role`, named in the error) stacks its
  layers in one scan: `scan_layers` is "on", or "auto" and the model has at least
  `SCAN_LAYERS_FROM` layers."""
  setting = section.get("scan_layers", "auto")
  if setting not in SCAN_LAYERS:
    field = role.replace("teacher/", "teachers.") + ".scan_layers"
    raise ConfigError(f"{field} must be one of {SCAN_LAYERS}, got {setting!r}")
  return setting == "on" or (setting == "auto" and model_config.num_layers >= SCAN_LAYERS_FROM)


def model_kwargs(section, model_config: ModelConfig, mesh) -> dict:
  """`Decoder`'s keyword arguments for the model of config `section`."""
  return dict(
      dtype=dtype_of(section.dtype),
      param_dtype=dtype_of(section.param_dtype),
      attention=section.attention,
      scan_layers=scans_layers(section, model_config),
      remat=section.get("remat", "auto"),
      mesh=mesh,  # where "splash" attention runs its shard_map
  )


def format_layout(run_setup: Setup) -> str:
  """The mesh, the partition rules, each model's layer layout and where each student
  parameter lands (`--dry_run`)."""
  mesh, rules = run_setup.mesh, run_setup.rules
  lines = [
      f"mesh {dict(mesh.shape)}: {mesh.devices.size} device(s), {jax.process_count()} "
      f"process(es); batch rows split over {sharding.batch_sharding(mesh).spec[0]}",
      "partition rules (first match wins):",
  ]
  lines += [f"  {pattern:34s} {spec}" for pattern, spec in rules]
  models = {
      role: abstract_model(
          model_config, **model_kwargs(run_setup.sections[role], model_config, mesh)
      )
      for role, model_config in run_setup.model_configs.items()
  }
  lines.append("layer layouts (scan_layers, remat, full-sequence attention):")
  for role, model in models.items():
    section = run_setup.sections[role]
    layout = "scanned" if model.scan_layers else "per-layer"
    remat = f", remat {model.remat}" if role == "student" else ""  # frozen: no backward
    setting = section.get("scan_layers", "auto")
    lines.append(
        f"  {role}: {model.config.num_layers} layers, {layout} ({setting}){remat}, "
        f"attention {describe_attention(section, model.config)}"
    )
  _, state = nnx.split(models["student"])
  placed = {}
  for path, variable in nnx.to_flat_state(state):
    name = sharding.path_string(path)
    shape = variable.get_value().shape
    spec = sharding.spec_for(name, shape, mesh, rules)
    placed.setdefault(re.sub(r"layers/\d+/", "layers/*/", name), (shape, spec))
  lines.append("student parameters (shape -> spec on this mesh):")
  lines += [f"  {name:40s} {str(shape):18s} {spec}" for name, (shape, spec) in placed.items()]
  return "\n".join(lines)


def describe_attention(section, model_config: ModelConfig) -> str:
  """The full-sequence attention the model of config `section` runs on this backend, and
  its setting: "xla in blocks of 512 queries (auto)", "cudnn (auto)", "splash"."""
  setting = section.attention
  if setting == "splash":
    return "splash"
  kernel = attention.resolve_implementation(setting, dtype_of(section.dtype), model_config.head_dim)
  if kernel == "xla":
    kernel = f"xla in blocks of {attention.QUERY_BLOCK} queries"
  return f"{kernel} ({setting})"


def routed_kernel_sharding(run_setup: Setup, width: int):
  """The layout of routed teachers' stacked `[ΣD, V]` head: the partition rules' LM head."""
  vocab = run_setup.model_configs["student"].vocab_size
  return sharding.sharding_for("lm_head/kernel", (width, vocab), run_setup.mesh, run_setup.rules)


def abstract_split(run_setup: Setup, role: str):
  """`(graphdef, ShapeDtypeStructs with shardings)` of the model section `role`: its layout
  on the run's mesh, from shapes alone."""
  model_config = run_setup.model_configs[role]
  graphdef, state = nnx.split(
      abstract_model(
          model_config, **model_kwargs(run_setup.sections[role], model_config, run_setup.mesh)
      )
  )
  return graphdef, sharding.abstract_state(state, run_setup.mesh, run_setup.rules)
