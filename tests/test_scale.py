"""Real scale: a run through the CLI at Qwen3's vocabulary never forms a `[B, T, V]` tensor
(the peak RSS of the training process), and a step at Qwen3's widths split over 8 devices
plans one device's share of the batch."""

import json
import os
import re
import subprocess
import sys

from flax import nnx

from opdjax import build, configs, learner
from opdjax.experiments.qwen3_opd import save_shapes
from opdjax.models import Decoder, save_pretrained, tiny_config
from tests.models.hf_fixtures import save_tiny_tokenizer

VOCAB = 151_936

EXPERIMENT = """
from opdjax import configs

def get_config(arg=None):
  c = configs.float32(configs.base_config())   # bfloat16 matmuls are slow on CPUs
  c.student.hf_path, c.teacher.hf_path = {student!r}, {teacher!r}
  c.recipe.update(dict(name="opd", estimator="full", divergence="reverse_kl"))
  c.task.train_jsonl = {data!r}
  c.task.prompt_length, c.task.completion_length, c.task.eval_size = 8, 256, 16
  c.train.batch_size, c.train.steps, c.train.save_every = 16, 1, 1
  c.train.tensorboard, c.eval.every, c.mesh.shape = False, 0, (1,)
  return c
"""

# Runs the CLI in this process and prints its resident memory once the heavy modules are
# imported and the backend is up (the baseline: torch comes in with the HF tokenizer), and
# its peak. The peak is VmHWM, this address space's own high-water mark: getrusage's
# ru_maxrss would also carry the forking parent's (pytest's) RSS across the exec.
RUNNER = """
import resource, runpy, sys
import jax, torch, transformers, opdjax.trainer
jax.devices()
with open("/proc/self/statm") as f:
  baseline = int(f.read().split()[1]) * resource.getpagesize()
sys.argv = ["opdjax.train"] + sys.argv[1:]
try:
  runpy.run_module("opdjax.train", run_name="__main__")
except SystemExit as e:
  code = e.code
with open("/proc/self/status") as f:
  peak = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0]
print("RSS_BYTES", baseline, peak, code)
"""


def test_cli_run_at_qwen3_vocabulary_peaks_far_below_one_btv_tensor(tmp_path):
  for name, seed in (("student", 0), ("teacher", 1)):
    config = tiny_config(
        "qwen3",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        eos_token_ids=(1,),
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    save_pretrained(Decoder(config, rngs=nnx.Rngs(seed)), tmp_path / name)
    save_tiny_tokenizer(tmp_path / name, 64)
  rows = [json.dumps({"prompt": f"w{3 + i % 50} w{4 + i % 40}", "answer": "w9"}) for i in range(32)]
  (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
  (tmp_path / "scale_exp.py").write_text(
      EXPERIMENT.format(
          student=str(tmp_path / "student"),
          teacher=str(tmp_path / "teacher"),
          data=str(tmp_path / "train.jsonl"),
      )
  )
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's run has
  proc = subprocess.run(
      [
          sys.executable,
          "-c",
          RUNNER,
          "--exp",
          str(tmp_path / "scale_exp.py"),
          "--workdir",
          str(tmp_path / "run"),
      ],
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  marker = [l.split() for l in proc.stdout.splitlines() if l.startswith("RSS_BYTES")]
  assert marker and marker[0][3] in ("0", "None"), proc.stdout[-2000:] + proc.stderr[-3000:]
  baseline, peak = int(marker[0][1]), int(marker[0][2])
  history = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in history if r["split"] == "train"] == [1]
  assert history[-1]["completion_tokens"] > 200  # per row: long completions trained
  one_tensor = 16 * (8 + 256 - 1) * VOCAB * 4  # one float32 [B, T, V]: 2.56 GB
  print(
      f"peak RSS {peak / 1e9:.2f} GB, {(peak - baseline) / 1e9:.2f} GB above the imports; "
      f"one [B, T, V] float32 tensor {one_tensor / 1e9:.2f} GB"
  )
  # What remains above the imports is mostly XLA's compilers; the step's own temporaries,
  # as the run's memory plan prints them, are a small fraction of one [B, T, V] tensor.
  temporaries = float(re.search(r"train step temporaries\s+([0-9.]+) GB", proc.stdout)[1])
  print(f"train step temporaries {temporaries:.3f} GB")
  assert temporaries * 1e9 < 0.1 * one_tensor
  assert peak - baseline < 0.5 * one_tensor


def test_a_step_at_qwen3_widths_on_8_devices_plans_one_devices_share(tmp_path):
  """FSDP at real widths: the memory plan of an OPD step with Qwen3-1.7B's student and
  Qwen3-8B's teacher widths (2 scanned layers each, V = 151,936, 1,279 positions a row)
  holds no more per device for 64 rows on 8 devices than one device does for 8 rows (1.00×
  here). Before the decoder kept its rows split between layers (`Decoder._rows`), every
  device computed every row on a slice of the hidden dimension: 2.1×."""
  save_shapes(tmp_path / "student", "1.7B", num_layers=2)
  save_shapes(tmp_path / "teacher", "8B", num_layers=2)
  (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "w3 w4", "answer": "w5"}) + "\n")

  def temporaries(devices, rows):
    c = configs.base_config()  # bfloat16 compute, float32 master weights
    c.student.hf_path, c.teacher.hf_path = str(tmp_path / "student"), str(tmp_path / "teacher")
    c.student.scan_layers = "on"
    c.recipe.update(dict(name="opd", estimator="full", divergence="reverse_kl"))
    c.task.train_jsonl = str(tmp_path / "train.jsonl")
    c.task.prompt_length, c.task.completion_length = 256, 1024
    c.train.batch_size, c.mesh.shape = rows, (devices,)
    return learner.memory_plan(c, build.setup(c)).terms["train step temporaries"]

  ratio = temporaries(8, 64) / temporaries(1, 8)
  print(f"per device on 8 devices / one device's share: {ratio:.2f}")
  assert ratio < 1.25, ratio
