"""The default experiment configuration; every `opdjax/experiments/NAME.py` starts from it."""

from __future__ import annotations

import json

import ml_collections

from opdjax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """All settings with their defaults: an OPD run on synthetic addition, with the precision a
  TPU user expects (float32 master weights and bfloat16 compute for the student, a bfloat16
  teacher). The synthetic CPU experiments switch to float32 with `float32(config)`."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.task = ml_collections.ConfigDict()
  c.task.name = "addition"  # synthetic task: addition | modular_chain
  c.task.difficulty = 2  # digits (addition) or steps (modular_chain)
  c.task.seed = 0  # which problems (the train/held-out split is fixed by hash)
  c.task.train_size = 4000
  c.task.eval_size = 128
  c.task.prompt_length = 8  # prompt tokens (left-padded)
  c.task.completion_length = 8  # answer tokens incl. EOS; also the sampler's max_new_tokens
  c.task.train_jsonl = ""  # JSONL prompts instead of a synthetic task
  c.task.eval_jsonl = ""

  c.student = ml_collections.ConfigDict()
  c.student.preset = "student-tiny"  # opdjax.build.MODEL_PRESETS, when not loading weights
  c.student.hf_path = ""  # a Hugging Face directory, local or a URI (gs://...)
  c.student.init_from = ""  # warm start from an earlier run's workdir
  c.student.dtype = "bfloat16"  # compute dtype (activations, KV cache)
  c.student.param_dtype = "float32"  # master weights and optimizer state
  c.student.attention = "auto"  # auto (cuDNN on GPU for 16-bit, else XLA) | xla | cudnn
  # auto | on | off: the layers stacked in one lax.scan, so compile time stays flat in depth
  # (auto: from 16 layers, `build.SCAN_LAYERS_FROM`; the small presets stay per-layer)
  c.student.scan_layers = "auto"
  # auto | none | full | save_dots: what each layer's backward recomputes (auto: save_dots
  # for scanned layers, none per-layer; `models.decoder.remat_policy_name`)
  c.student.remat = "auto"

  c.teacher = ml_collections.ConfigDict()
  c.teacher.preset = "teacher-small"
  c.teacher.hf_path = ""
  c.teacher.checkpoint = ""  # an earlier run's workdir (read-only)
  c.teacher.dtype = "bfloat16"  # the teacher is bfloat16 throughout
  c.teacher.param_dtype = "bfloat16"
  c.teacher.attention = "auto"
  c.teacher.scan_layers = "auto"

  # Several teachers, each example scored by the one it names (its JSONL "teacher" field, or
  # the task name for synthetic tasks): name -> a section like `teacher` (`teacher_section`).
  # When set, `teacher` itself stays unset.
  c.teachers = ml_collections.ConfigDict()

  c.reference = ml_collections.ConfigDict()  # gopd: default the student's initial weights
  c.reference.preset = ""
  c.reference.hf_path = ""
  c.reference.checkpoint = ""  # an earlier run's workdir, e.g. the teacher's base model
  c.reference.dtype = "bfloat16"
  c.reference.param_dtype = "bfloat16"
  c.reference.attention = "auto"
  c.reference.scan_layers = "auto"

  c.recipe = ml_collections.ConfigDict()
  c.recipe.name = "opd"  # sft | seqkd | supervised_kd | gkd | opd | gopd | grpo | self_distill
  c.recipe.estimator = "full"  # opd: full | topk | sampled; gopd: sampled | full
  c.recipe.divergence = "reverse_kl"
  c.recipe.divergence_kwargs = ml_collections.ConfigDict()
  c.recipe.top_k = 0
  c.recipe.tail_bucket = False
  c.recipe.gamma = 0.0  # sampled: reward-to-go discount
  c.recipe.correction = "none"  # sampled: none | plain | truncated | ppo_clip
  c.recipe.clip_epsilon = 0.2
  c.recipe.truncation = 2.0
  c.recipe.lambda_on = 0.5  # gkd: probability of on-policy student samples
  c.recipe.reward_scale = 1.0  # gopd: λ (1 = opd, > 1 = ExOPD)
  c.recipe.group_size = 4  # grpo: completions per prompt
  c.recipe.reward = "exact"  # grpo: exact (verifier, 0/1) | step_credit (partial credit)
  c.recipe.normalize_std = True  # grpo: divide by the group's std (False = Dr. GRPO)
  c.recipe.opd_weight = 0.0  # grpo: weight of the teacher's dense OPD advantage
  c.recipe.loss_mean = "token"  # grpo: token | sequence (average each completion first)
  c.recipe.teacher_mode = "frozen"  # self_distill: frozen | current | ema | trust_region
  c.recipe.privileged = "answer {answer}; {prompt}"  # self_distill: the teacher's prompt
  c.recipe.privileged_length = 0  # self_distill: its tokens; 0 = prompt + completion length + 32
  c.recipe.ema_rate = 0.05  # self_distill (ema): θ' ← θ' + r·(θ − θ')
  c.recipe.trust_region_alpha = 0.5  # self_distill (trust_region): weight of the current weights

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0
  c.sampling.top_p = 1.0
  c.sampling.layout = "train"  # train | tensor | replicated: the student's layout while it samples
  # auto | on | off: merge each layer's q/k/v and gate/up matmuls while sampling (auto: the
  # backend's `sampling.FUSE_PROJECTIONS`, on for a GPU); the memory plan counts the copy.
  c.sampling.fuse_projections = "auto"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | sgd (plain gradient descent, no momentum)
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = "cosine"  # cosine | constant
  c.optimizer.final_lr_fraction = 0.1  # cosine: the rate at the last step / learning_rate
  c.optimizer.weight_decay = 0.0  # adamw's decoupled decay
  c.optimizer.grad_clip = 1.0  # the gradient's global norm is clipped to this (> 0)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 32
  c.train.updates_per_rollout = 1
  c.train.rollout_ahead = False  # sample the next rollout before this update (one update stale)
  c.train.microbatches = 1  # row blocks per step, gradients summed (same update)
  # Positions per fused-loss chunk on each device; 0 = auto (4M logits CPU, 1,024 tokens GPU,
  # 16M logits TPU).
  c.train.loss_chunk_size = 0
  c.train.memory_limit_gb = 0.0  # per-device plan limit; 0 = the device's own (none on CPU)
  c.train.log_every = 10
  c.train.save_every = 50
  c.train.keep_checkpoints = 2
  c.train.tensorboard = True
  c.train.async_checkpointing = "auto"  # auto (on for GPU/TPU) | on | off

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 50  # 0 = no held-out evaluation
  c.eval.at_start = True
  c.eval.temperature = 1.0
  c.eval.batch_size = 128  # rows generated and scored at once

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1,)  # -1: all remaining devices
  c.mesh.axes = ("fsdp",)  # data | fsdp | tensor; fsdp splits the batch and the weights
  # Partition rules: (regex on a parameter path, one mesh axis or None per dimension); the
  # first match wins. See opdjax.sharding; `--dry_run` prints where each parameter lands.
  from opdjax.sharding import RULES

  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = RULES
  return c


def teacher_section(**settings) -> ml_collections.ConfigDict:
  """A `teachers` entry: the default `teacher` section with `settings` applied, e.g.
  `c.teachers.addition = teacher_section(checkpoint="workdirs/addition_teacher")`."""
  section = ml_collections.ConfigDict(base_config().teacher.to_dict())
  section.update(settings)
  return section


def float32(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every model of `c` in float32 (the synthetic CPU experiments; bfloat16 is slow on CPUs)."""
  for role in ("student", "teacher", "reference"):
    c[role].dtype = c[role].param_dtype = "float32"
  for section in c.teachers.values():
    section.dtype = section.param_dtype = "float32"
  return c


# Each synthetic task's default difficulty and lengths (prompt tokens, completion tokens incl.
# EOS). modular_chain at 12 steps is the long-horizon task: 24-token answers in which every
# value depends on the one before, so an early mistake spoils the rest of the completion.
TASK_SHAPES = {
    "addition": dict(difficulty=2, prompt_length=8, completion_length=8),
    "modular_chain": dict(difficulty=12, prompt_length=40, completion_length=24),
}


def task_section(c: ml_collections.ConfigDict, task: str) -> ml_collections.ConfigDict:
  """Sets `c.task` to `task` with its `TASK_SHAPES` defaults (in place; returns `c`)."""
  if task not in TASK_SHAPES:
    raise ConfigError(f"unknown task {task!r}; valid: {sorted(TASK_SHAPES)}")
  c.task.name = task
  c.task.update(TASK_SHAPES[task])
  return c


def teacher_config(task: str = "addition") -> ml_collections.ConfigDict:
  """SFT of the `teacher-small` preset from scratch. On 2-digit addition its held-out greedy
  accuracy jumps late and the jump's timing is sensitive to float rounding (0.40-0.73 at 600
  steps across code versions), so it trains for 1000 steps (0.69 measured)."""
  c = task_section(float32(base_config()), task)
  c.student.preset = "teacher-small"  # the model being trained here is the teacher
  c.recipe.name = "sft"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 30
  c.train.steps = 1000
  c.train.batch_size = 64
  c.train.log_every = 25
  c.train.save_every = 200
  c.eval.every = 200
  c.eval.at_start = False
  if task == "modular_chain":
    # The 12-step chain is learnt in a jump around step 900-1100 at lr ~2e-3; a cosine
    # decay over 1000 steps stops it half way (0.45 greedy accuracy measured), so the
    # rate stays constant and the stage runs past the jump.
    c.optimizer.schedule = "constant"
    c.train.steps = 1200
  return c


def warmstart_config(task: str = "addition") -> ml_collections.ConfigDict:
  """SFT of the `student-small` preset long enough to start solving the task (~1000 steps)."""
  c = task_section(float32(base_config()), task)
  c.recipe.name = "sft"
  c.student.preset = "student-small"
  c.optimizer.learning_rate = 2e-3
  c.train.batch_size = 64
  c.train.steps = 1000  # the student starts to solve 2-digit addition after ~700
  c.train.save_every = 1000
  c.eval.every = 1000
  c.eval.at_start = False
  return c


def distill_config(recipe: dict, task: str = "addition") -> ml_collections.ConfigDict:
  """A distillation stage from the `warmstart` stage toward the `teacher` stage."""
  c = task_section(float32(base_config()), task)
  c.student.preset = "student-small"  # informational: the weights come from init_from
  c.student.init_from = "@warmstart"
  c.teacher.checkpoint = "@teacher"
  c.recipe.update(recipe)
  # Below the rate the warm start ended at (2e-4): a fresh Adam state at a higher rate
  # first knocks the student off its solution (seen as a dip for every method).
  c.optimizer.learning_rate = 1e-4
  return c


def is_tiny(arg, *, experiment: str) -> bool:
  """An experiment's size argument: `tiny` (its test-suite variant), or `full`/none."""
  if arg not in (None, "tiny", "full"):
    raise ConfigError(f"{experiment} takes no arg, 'full' or 'tiny', got {arg!r}")
  return arg == "tiny"


def size_and_options(arg, *, experiment: str, options: tuple[str, ...]) -> tuple[bool, set]:
  """An experiment's comma-separated argument: one size (`tiny`, or `full`/none, as
  `is_tiny`) and any of `options`. Returns `(tiny, the options given)`."""
  parts = [a for a in (arg or "").split(",") if a]
  size = [a for a in parts if a not in options]
  if len(size) > 1:
    raise ConfigError(f"{experiment} takes one size ('full' or 'tiny'), got {size}")
  try:
    tiny = is_tiny(size[0] if size else None, experiment=experiment)
  except ConfigError as error:
    raise ConfigError(f"{error}, optionally with {', '.join(options)}") from None
  return tiny, set(parts) & set(options)


def distillation_comparison(
    recipe: dict, task: str = "addition", *, steps: int, eval_every: int, tiny: bool = False
) -> ml_collections.ConfigDict:
  """The config of a distillation comparison on `task`: `seeds` (3; tiny 1), `stages` with
  the `teacher` (`teacher_config`) and the `warmstart` (`warmstart_config`, not evaluated:
  each method evaluates it at its step 0), and the `method_template`, `distill_config(recipe)`
  for `steps` updates evaluated every `eval_every`. `tiny`: each stage shrunk to 2 steps by
  `tiny_stage`, the method evaluated at its end. Callers add their own settings."""
  teacher, warmstart = teacher_config(task), warmstart_config(task)
  warmstart.eval.every = 0
  method = distill_config(recipe, task)
  method.train.steps = method.train.save_every = steps
  method.eval.every = eval_every
  if tiny:
    for stage in (teacher, warmstart, method):
      tiny_stage(stage, 2)
    method.eval.every = 2
  c = ml_collections.ConfigDict()
  c.seeds = 1 if tiny else 3
  c.stages = ml_collections.ConfigDict({"teacher": teacher, "warmstart": warmstart})
  c.method_template = method
  return c


def tiny_stage(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """Shrinks a stage for an experiment's `:tiny` variant (the test suite's size): `steps`
  updates of 8 rows from 32 training prompts, 8 held-out prompts, one device, no held-out
  evaluation unless the caller turns it back on (in place)."""
  c.train.steps = steps
  c.eval.every = 0
  c.train.batch_size = 8
  c.train.save_every = steps
  c.train.log_every = 1
  c.train.tensorboard = False
  c.task.train_size = 32
  c.task.eval_size = 8
  c.eval.batch_size = 8
  c.mesh.shape = (1,)
  return c


class _ReadRecorder:
  """A read-only view of a config section that records which keys are read."""

  def __init__(self, section: ml_collections.ConfigDict):
    self._section, self.read = section, set()

  def __getattr__(self, key):
    self.read.add(key)
    return getattr(self._section, key)

  def __getitem__(self, key):
    self.read.add(key)
    return self._section[key]

  def get(self, key, default=None):
    self.read.add(key)
    return self._section.get(key, default)

  def __contains__(self, key):
    return key in self._section


def applicable(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with only the settings its run reads, as `--dry_run` prints it.

  The recipe section keeps the keys its recipe's `build` reads (recorded while building, so
  the list cannot drift from the code); model sections appear only for the roles the recipe
  uses (`teacher`, or `teachers` when routing; `reference`), and not for a self-distillation
  recipe, whose teachers are the student's own weights. Multi-stage experiments are pruned
  stage by stage."""
  from opdjax import recipes

  shown = ml_collections.ConfigDict(config.to_dict())
  for name, value in config.items():  # stages, a method template, ...
    if isinstance(value, ml_collections.ConfigDict) and "recipe" not in config:
      shown[name] = applicable(value)
  if "recipe" not in config:
    return shown
  recorder = _ReadRecorder(config.recipe)
  recipe = recipes.build(recorder)
  read = {"name", *recorder.read}
  for key in list(shown.recipe.keys()):
    if key not in read:
      del shown.recipe[key]
  external = recipe.self_teacher is None
  uses_teacher = external and ("teacher" in recipe.roles or recipe.source == "teacher")
  routed = bool(list(config.get("teachers", {}).keys()))
  keep = {
      "teacher": uses_teacher and not routed,
      "teachers": uses_teacher and routed,
      "reference": external and "reference" in recipe.roles,
  }
  for section, kept in keep.items():
    if section in shown and not kept:
      del shown[section]
  return shown


# Settings a rerun in the same workdir may change without changing what its checkpoint
# trained: how long it goes on, how it is watched and saved, and how the same update is laid
# out on the devices. Keys ending in a model section's layout settings are also free.
RERUN_MAY_CHANGE = (
    "train.steps",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.tensorboard",
    "train.memory_limit_gb",
    "train.async_checkpointing",
    "train.loss_chunk_size",
    "train.microbatches",
    "eval.",
    "task.eval_size",
    "task.eval_jsonl",
    "mesh.",
    "sharding.",
    "sampling.layout",
    "sampling.fuse_projections",
)
_LAYOUT_SUFFIXES = (".attention", ".scan_layers", ".remat")


def changed_settings(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """`key: old -> new` for each setting in which `config` differs from `saved` (a run's
  `config.json`), leaving out those a rerun may change (`RERUN_MAY_CHANGE`).

  >>> c = base_config()
  >>> saved = json.loads(c.to_json_best_effort())
  >>> c.optimizer.learning_rate, c.train.steps = 2e-3, 500
  >>> changed_settings(saved, c)
  ['optimizer.learning_rate: 0.001 -> 0.002']
  """

  def flat(tree, prefix=""):
    if not isinstance(tree, dict):
      return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}

  before, now = flat(saved), flat(json.loads(config.to_json_best_effort()))
  free = lambda key: key.startswith(RERUN_MAY_CHANGE) or key.endswith(_LAYOUT_SUFFIXES)
  return [
      f"{key}: {before.get(key, '(unset)')} -> {now.get(key, '(unset)')}"
      for key in sorted(before.keys() | now.keys())
      if not free(key) and before.get(key) != now.get(key)
  ]
