"""On-policy distillation at real scale: Qwen3-1.7B from Qwen3-8B, on your prompts.

The job opdjax is for, on a GPU node or a TPU slice, given three paths as the argument: the
student's and the teacher's Hugging Face directories (local or `gs://`) and a JSONL file of
`{"prompt", "answer"}` or `{"messages", "answer"}` lines (held out: the first
`task.eval_size` lines of `task.eval_jsonl`, by default of the same file). Each step the
student samples a completion of up to 2,048 tokens for each of 64 prompts of up to 512
tokens, the teacher scores them, and the student takes one AdamW step on the exact
full-vocabulary per-token reverse KL to the teacher (docs/theory.md §1), computed from
hidden states in chunks, in 4 micro-batches.

opdjax has not run this configuration on an accelerator: its settings are starting points,
not tuned results (the learning rate is a usual one for full fine-tuning at this size).
Check the memory plan before the run: `--dry_run` prints it for the devices at hand. On 8
simulated CPU devices (the real checkpoints' `config.json` files; XLA's attention in
blocks of 512 queries, which holds more than cuDNN's or splash's) it plans per device
0.86 GB of student parameters, 1.72 GB of optimizer state, 2.05 GB of teacher, 0.17 GB of
teacher hidden states, 3.02 GB of KV cache, 1.74 GB of the sampler's weight copies and
19.2 GB of step temporaries (59.0 GB in one micro-batch): 28.8 GB in all. To plan before
downloading the checkpoints, `save_shapes` writes directories with their `config.json`
files alone, and simulated CPU devices stand in for the accelerators (about 10 s on a
2-core CPU; `--exp.train.memory_limit_gb=80` checks the plan against an 80 GB card):

    python -c "from opdjax.experiments import qwen3_opd as q
    q.save_shapes('/tmp/s', '1.7B'); q.save_shapes('/tmp/t', '8B')"
    echo '{"prompt": "hi", "answer": "x"}' > /tmp/p.jsonl
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m opdjax.train \\
        --exp qwen3_opd:/tmp/s,/tmp/t,/tmp/p.jsonl --dry_run

The run itself:

    python -m opdjax.train --exp qwen3_opd:/ckpt/Qwen3-1.7B,/ckpt/Qwen3-8B,/data/train.jsonl \\
        --dry_run
    python -m opdjax.train --exp qwen3_opd:/ckpt/Qwen3-1.7B,/ckpt/Qwen3-8B,/data/train.jsonl \\
        --workdir gs://BUCKET/qwen3_opd
"""

import os

from opdjax import configs
from opdjax.errors import ConfigError

RELEASED_WIDTHS = {  # the released checkpoints' config.json values
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, tie_word_embeddings=False),
}  # fmt: skip

USAGE = (
    "STUDENT_DIR,TEACHER_DIR,TRAIN_JSONL "
    "(--exp qwen3_opd:/ckpt/Qwen3-1.7B,/ckpt/Qwen3-8B,/data/train.jsonl)"
)


def get_config(arg=None):
  paths = (arg or "").split(",")
  if len(paths) != 3 or not all(paths):
    raise ConfigError(f"qwen3_opd takes {USAGE}, got {arg!r}")
  c = configs.base_config()  # bfloat16 compute, float32 master weights, a bfloat16 teacher
  c.student.hf_path, c.teacher.hf_path, c.task.train_jsonl = paths
  c.recipe.update(dict(name="opd", estimator="full", divergence="reverse_kl"))
  c.task.prompt_length, c.task.completion_length = 512, 2048
  c.task.eval_size = 256
  c.train.batch_size, c.train.microbatches = 64, 4
  c.train.steps, c.train.save_every, c.train.log_every = 200, 25, 1
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-6, 10
  c.eval.every, c.eval.batch_size = 50, 64
  return c


def save_shapes(directory: str | os.PathLike, size: str, *, num_layers: int | None = None) -> None:
  """Writes a Hugging Face directory with Qwen3-`size`'s `config.json` (vocabulary 151,936;
  at `num_layers` layers if given) and the synthetic tasks' character tokenizer, without
  weights: what `--dry_run` reads to plan this experiment's memory.

  >>> import json, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   save_shapes(tmp, "8B", num_layers=2)
  ...   config = json.load(open(os.path.join(tmp, "config.json")))
  >>> config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
  (4096, 2, 151936)
  """
  import transformers

  from opdjax.data.tokenizer import char_tokenizer

  if size not in RELEASED_WIDTHS:
    raise ValueError(f"size must be one of {tuple(RELEASED_WIDTHS)}, got {size!r}")
  widths = dict(RELEASED_WIDTHS[size])
  if num_layers is not None:
    widths["num_hidden_layers"] = num_layers
  config = transformers.Qwen3Config(
      vocab_size=151_936, head_dim=128, num_key_value_heads=8, **widths
  )
  config.save_pretrained(directory)
  char_tokenizer().save_pretrained(directory)
