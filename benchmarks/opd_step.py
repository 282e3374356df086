"""One on-policy JSD(β=0.5) step, opdjax against TRL's `GKDTrainer`, same shapes, one run.

A step is the whole on-policy iteration: the student samples `--new_tokens` tokens for
each of `--batch` prompts (temperature 1, no top-k/p, no EOS, so every row is full length),
the teacher scores prompt + completion, and the student takes one AdamW update on the
full-vocabulary generalized JSD(β=0.5) of its completion tokens. Both sides start from the
same random weights (opdjax writes them with `save_pretrained`, TRL loads them), compute in
float32, and see the same prompts.

Tools (one JSON line each):
- `opdjax`: `sampling.generate`, `evaluation.forward_hidden` and `learner.make_train_step`,
  the functions `trainer.run` calls each step, with the fused chunked loss; its first step
  compiles all three, the update in a thread while the rollout runs, as `trainer.run` does
  (`--serial_compile` compiles it in line, as this benchmark did before);
- `opdjax_cached`: the same in a fresh process whose persistent compilation cache was
  filled by an earlier process (`opdjax.train.enable_compilation_cache`, on by default in
  the CLI): the first step of a rerun, a resume or the next seed;
- `trl`: `GKDTrainer(lmbda=1, beta=0.5, temperature=1)`, whose `training_step` samples with
  `model.generate`, runs the teacher, and backpropagates through `[B, T, V]` logits, with
  gradient checkpointing off (its fastest setting here); the step is timed from
  `on_step_begin` to `on_step_end`, the optimizer step included;
- `trl_default`: the same with TRL's default `gradient_checkpointing=True`, which also
  turns off the KV cache in `generate`;
- `trl_distill`: TRL's maintained `DistillationTrainer(beta=0.5, temperature=1)`, which
  TRL recommends over `GKDTrainer` for this on-policy configuration (always on-policy; a
  chunked loss), gradient checkpointing off. It takes text prompts, so the token ids are
  spelled as words of one width (`t000` … `t511`) and tokenised back to the same ids;
  completions run their full length through `min_new_tokens`.

Each line gives the first step's seconds and the median of the others. The default shapes:
student 4 layers × 256, teacher 8 layers × 512, V = 512, 16 prompts of 16 tokens, 64 new
tokens.

    python benchmarks/opd_step.py --out benchmarks/results/opd_step_cpu_2core.jsonl
    python benchmarks/opd_step.py --steps 4 --tools opdjax trl   # a quick look
    python benchmarks/opd_step.py --scan_layers --tools opdjax opdjax_cached  # layers scanned

Needs the `bench` extra (PyTorch, TRL) for the TRL side. About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from _jsonl import emit  # noqa: E402  (benchmarks/, next to this script)
from flax import nnx

from opdjax import configs, recipes, sharding
from opdjax import objectives as obj
from opdjax.evaluation import forward_hidden
from opdjax.learner import CompilingStep, head_kernel, make_optimizer, make_train_step
from opdjax.models import Decoder, ModelConfig, save_pretrained
from opdjax.models.decoder import stack_layers
from opdjax.models.hf import abstract_model
from opdjax.sampling import SamplingParams, generate

TOOLS = ("opdjax", "opdjax_cached", "trl", "trl_default", "trl_distill")
BETA = 0.5
LEARNING_RATE = 1e-5


def model_config(layers: int, width: int, vocab: int) -> ModelConfig:
  return ModelConfig(
      vocab_size=vocab,
      hidden_size=width,
      intermediate_size=width * 11 // 4,
      num_layers=layers,
      num_heads=width // 32,
      num_kv_heads=width // 64,
      head_dim=32,
      model_type="qwen3",
      max_position_embeddings=1024,
  )


def opdjax_steps(
    student: Decoder, teacher: Decoder, prompts: np.ndarray, args
) -> tuple[list[float], dict]:
  """Seconds of each on-policy step (the first includes compiling the sampler, the
  teacher's forward pass and the update), and the seconds of JAX's compile-path events
  during the first step, summed by event over every thread (tracing, lowering, XLA's
  compilation or a cache's retrieval), so a slow first step says where it went."""
  run_config = configs.base_config()
  run_config.recipe.divergence = "generalized_jsd"
  run_config.recipe.divergence_kwargs = {"beta": BETA}
  run_config.optimizer.learning_rate = LEARNING_RATE
  recipe = recipes.build(run_config.recipe)
  mesh = sharding.make_mesh((1,), ("data",))
  graphdef, params = nnx.split(student)
  params = sharding.place_state(params, mesh)
  t_graphdef, t_state = nnx.split(teacher)
  tx = make_optimizer(run_config)
  opt_state = sharding.init_optimizer(tx, params, mesh)
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  update = make_train_step(graphdef, recipe, tx, shardings(params), shardings(opt_state))
  sampling = SamplingParams(temperature=1.0, eos_ids=())
  prompt_tokens = jnp.asarray(prompts)
  prompt_mask = jnp.ones(prompts.shape, bool)
  key = jax.random.key(0)
  times, events = [], {}

  def listen(event, duration, **_):
    if event.startswith(("/jax/core/compile/", "/jax/compilation_cache/")):
      events[event] = events.get(event, 0.0) + duration  # a float add: safe across threads

  jax.monitoring.register_event_duration_secs_listener(listen)  # for the first step only
  for i in range(args.steps):
    start = time.perf_counter()
    if i == 0 and not args.serial_compile:  # as `trainer.run`: compiled beside the rollout
      update = background_compile(update, params, opt_state, prompts.shape, args, teacher)
    gen = generate(
        nnx.merge(graphdef, params),
        prompt_tokens,
        prompt_mask,
        key=jax.random.fold_in(key, i),
        max_new_tokens=args.new_tokens,
        sampling=sampling,
    )
    seq = recipes.join(
        prompt_tokens, prompt_mask, gen.tokens, gen.mask, gen.sample_logprobs, gen.model_logprobs
    )
    tokens, mask = recipes.inputs_of(seq)
    hidden = forward_hidden(t_graphdef, t_state, tokens, mask)
    frozen = {"teacher": obj.Head(hidden, head_kernel(t_graphdef, t_state))}
    params, opt_state, metrics = update(params, opt_state, seq, frozen)
    float(metrics["loss"][0])  # the step is done when its loss is on the host
    times.append(time.perf_counter() - start)
    if i == 0:
      jax.monitoring.unregister_event_duration_listener(listen)
  return times, {name: round(seconds, 4) for name, seconds in sorted(events.items())}


def background_compile(update, params, opt_state, prompt_shape, args, teacher: Decoder):
  """`update`, lowered here for the rollout's shapes and compiled in a thread by the
  trainer's own `learner.CompilingStep`; its first call waits for the compilation."""
  rows, prompt_len = prompt_shape
  seq = recipes.Sequences.spec(rows, prompt_len + args.new_tokens)
  t_graphdef, t_state = nnx.split(teacher)
  score = lambda seq: forward_hidden(t_graphdef, t_state, *recipes.inputs_of(seq))
  hidden = jax.eval_shape(score, seq)
  kernel = jax.eval_shape(lambda state: head_kernel(t_graphdef, state), t_state)
  lowered = update.lower(params, opt_state, seq, {"teacher": obj.Head(hidden, kernel)})
  return CompilingStep(lowered, {}, None, quiet=True)  # the trainer's: no plan, no limit


def trl_steps(tool: str, student_dir: str, teacher_dir: str, prompts, args) -> list[float]:
  """Seconds of each TRL trainer step (on_step_begin → on_step_end)."""
  import torch
  import transformers

  torch.manual_seed(0)
  load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  student, teacher = load(student_dir), load(teacher_dir)
  for model in (student, teacher):
    model.generation_config.eos_token_id = None

  times, started = [], []

  sync = lambda: None
  if torch.cuda.is_available():
    sync = torch.cuda.synchronize
    torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision on a GPU

  class Timer(transformers.TrainerCallback):

    def on_step_begin(self, *_, **__):
      sync()
      started.append(time.perf_counter())

    def on_step_end(self, *_, **__):
      sync()  # the step's kernels have run, not only been queued
      times.append(time.perf_counter() - started[-1])

  with tempfile.TemporaryDirectory() as out:
    common = dict(
        output_dir=out,
        per_device_train_batch_size=len(prompts),
        max_steps=args.steps,
        learning_rate=LEARNING_RATE,
        beta=BETA,
        temperature=1.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        dataloader_num_workers=0,
        # TRL's default (True) also turns off the KV cache in generate: "trl_default".
        gradient_checkpointing=tool == "trl_default",
        seed=0,
    )
    if tool == "trl_distill":
      trainer = distillation_trainer(student, teacher, prompts, args, common)
    else:
      trainer = gkd_trainer(student, teacher, prompts, args, common)
    trainer.add_callback(Timer())
    trainer.train()
  return times


def gkd_trainer(student, teacher, prompts, args, common):
  """`GKDTrainer(lmbda=1)` on token-id prompts (its collator takes them as they are)."""
  import datasets
  import tokenizers
  import torch
  import transformers
  from trl.experimental.gkd import GKDConfig, GKDTrainer

  vocab = {str(i): i for i in range(args.vocab)}
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="0")),
      pad_token="0",
  )

  def collate(rows):
    ids = torch.tensor([row["prompt"] for row in rows])
    ones = torch.ones_like(ids)
    # lmbda = 1: training_step replaces input_ids/attention_mask/labels by the sample.
    return dict(
        input_ids=ids, attention_mask=ones, labels=ids, prompts=ids, prompt_attention_mask=ones
    )

  config = GKDConfig(lmbda=1.0, max_new_tokens=args.new_tokens, max_length=None, **common)
  data = datasets.Dataset.from_dict({"prompt": [list(map(int, row)) for row in prompts]})
  return GKDTrainer(
      model=student,
      teacher_model=teacher,
      args=config,
      data_collator=collate,
      train_dataset=data,
      processing_class=tokenizer,
  )


def distillation_trainer(student, teacher, prompts, args, common):
  """`DistillationTrainer` on text prompts that tokenise to the same ids: each id is a word
  of one width, so no token (the pad and EOS among them) is a substring of another."""
  import datasets
  import tokenizers
  import transformers
  from trl import DistillationConfig, DistillationTrainer

  width = len(str(args.vocab - 1))
  word = lambda i: f"t{int(i):0{width}d}"
  words = tokenizers.Tokenizer(
      tokenizers.models.WordLevel({word(i): i for i in range(args.vocab)}, unk_token=word(0))
  )
  words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  # It needs an EOS id; min_new_tokens keeps every completion at full length, as opdjax's.
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=words, pad_token=word(0), eos_token=word(args.vocab - 1)
  )
  config = DistillationConfig(
      max_completion_length=args.new_tokens,
      generation_kwargs={"min_new_tokens": args.new_tokens},
      **common,
  )
  data = datasets.Dataset.from_dict({"prompt": [" ".join(map(word, row)) for row in prompts]})
  return DistillationTrainer(
      model=student,
      teacher_model=teacher,
      args=config,
      train_dataset=data,
      processing_class=tokenizer,
  )


def cached_run(argv, out):
  """opdjax's step as the CLI's second run sees it: the same measurement in a fresh
  process twice, sharing a new persistent compilation cache (`opdjax.train.
  enable_compilation_cache`); the first fills the cache, the second's line is emitted."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--tools" in argv:  # drop the tool list and any --out: the child prints, we emit
    i = argv.index("--tools")
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
      j += 1
    del argv[i:j]
  if "--out" in argv:
    del argv[argv.index("--out") : argv.index("--out") + 2]
  with tempfile.TemporaryDirectory() as cache:
    env = dict(os.environ, OPDJAX_COMPILATION_CACHE=cache)
    command = [sys.executable, __file__, *argv, "--tools", "opdjax", "--use_cache"]
    for _ in range(2):
      result = subprocess.run(command, env=env, capture_output=True, text=True)
      if result.returncode:  # show why: a bare CalledProcessError hides the child's error
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
  emit(json.loads(result.stdout.strip().splitlines()[-1]), out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--student", type=int, nargs=2, default=(4, 256), metavar=("LAYERS", "WIDTH"))
  p.add_argument("--teacher", type=int, nargs=2, default=(8, 512), metavar=("LAYERS", "WIDTH"))
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument(
      "--steps", type=int, default=6, help="steps per tool (the first is reported apart)"
  )
  p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
  p.add_argument(
      "--scan_layers",
      action="store_true",
      help="opdjax models scan over their layers (`scan_layers=True`, remat auto: save_dots)",
  )
  p.add_argument(
      "--serial_compile",
      action="store_true",
      help="opdjax compiles its update in line in the first step, not beside the rollout",
  )
  p.add_argument("--out", default=None)
  p.add_argument("--use_cache", action="store_true", help=argparse.SUPPRESS)  # see cached_run
  args = p.parse_args(argv)
  if args.steps < 2:
    p.error(f"--steps must be >= 2 (the first step is reported apart), got {args.steps}")

  student = Decoder(model_config(*args.student, args.vocab), dtype=jnp.float32, rngs=nnx.Rngs(0))
  teacher = Decoder(model_config(*args.teacher, args.vocab), dtype=jnp.float32, rngs=nnx.Rngs(1))
  if args.scan_layers:  # the same weights, stacked for `lax.scan`
    scanned = lambda m: nnx.merge(
        nnx.split(abstract_model(m.config, jnp.float32, scan_layers=True))[0],
        stack_layers(nnx.state(m)),
    )
    opdjax_models = scanned(student), scanned(teacher)
  else:
    opdjax_models = student, teacher
  prompts = np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.prompt))
  prompts = prompts.astype(np.int32)
  shapes = dict(
      student=list(args.student),
      teacher=list(args.teacher),
      vocab=args.vocab,
      batch=args.batch,
      prompt=args.prompt,
      new_tokens=args.new_tokens,
      steps=args.steps,
      beta=BETA,
      dtype="float32",
      device=jax.devices()[0].device_kind,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
  )
  with tempfile.TemporaryDirectory() as tmp:
    student_dir, teacher_dir = f"{tmp}/student", f"{tmp}/teacher"
    save_pretrained(student, student_dir)
    save_pretrained(teacher, teacher_dir)
    for tool in args.tools:
      if tool == "opdjax_cached":
        cached_run(argv, args.out)
        continue
      if tool == "opdjax":
        if args.use_cache:
          from opdjax.train import enable_compilation_cache

          enable_compilation_cache()
        times, events = opdjax_steps(*opdjax_models, prompts, args)
        version = {
            "jax": jax.__version__,
            "compilation_cache": args.use_cache,
            "scan_layers": args.scan_layers,
            "remat": opdjax_models[0].remat,  # "auto": save_dots scanned (since session 17)
            "background_compile": not args.serial_compile,
            "first_step_events_s": events,
        }
      else:
        import torch
        import trl

        if args.threads:
          torch.set_num_threads(args.threads)
        times = trl_steps(tool, student_dir, teacher_dir, prompts, args)
        version = {"trl": trl.__version__, "torch": torch.__version__}
      emit(
          dict(
              benchmark="opd_step",
              tool=tool,
              **version,
              **shapes,
              first_step_s=round(times[0], 4),
              median_step_s=round(statistics.median(times[1:]), 4),
              step_s=[round(t, 4) for t in times],
          ),
          args.out,
      )


if __name__ == "__main__":
  sys.exit(main())
