"""A run whose workdir is a `gs://` bucket, against a Google Cloud Storage endpoint on
localhost (tests/gcs_emulator.py): every file the run writes goes to the bucket through the
client each writer uses in production (gcsfs for `etils.epath`, TensorStore for Orbax,
google-cloud-storage for tensorboardX), and a run killed there resumes from there."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gcsfs.core import GCSFileSystem  # the plain client (see gcs_emulator.environment)

from opdjax import metrics
from tests import gcs_emulator

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "tests" / "experiments" / "two_stages.py"

KILLED_AFTER_OPD_STEP_2 = (
    "import os, signal, sys\n"
    "from opdjax import checkpoint\n"
    "save = checkpoint.Checkpointer.save\n"
    "def save_then_die(self, step, *args, **kwargs):\n"
    "  save(self, step, *args, **kwargs)\n"
    "  if step == 2 and '/opd/' in str(self.directory):\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "checkpoint.Checkpointer.save = save_then_die\n"
    "from opdjax.train import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(name="gcs_url")
def fixture_gcs_url():
  """The URL of a fresh in-memory endpoint with the bucket `bucket`."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
      [sys.executable, "-m", "tests.gcs_emulator", str(port)],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
  )
  try:
    assert server.stdout.readline().strip() == "serving"
    url = f"http://localhost:{port}"
    deadline = time.monotonic() + 30
    while socket.socket().connect_ex(("localhost", port)) != 0:
      assert time.monotonic() < deadline, "the emulator did not open its port"
      time.sleep(0.1)
    yield url
  finally:
    server.kill()
    server.wait()


def _history(text: str) -> list[dict]:
  rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  return [{k: v for k, v in row.items() if k not in metrics.CLOCK_KEYS} for row in rows]


def test_a_run_on_gcs_writes_everything_to_the_bucket_and_resumes_there(
    gcs_url, two_stages_reference, tmp_path
):
  """`two_stages` (SFT, then OPD whose two teachers load the SFT checkpoint and whose
  prompts are JSONL files in the workdir) on `gs://bucket/run`, killed with SIGKILL after
  the OPD stage's checkpoint at step 2 and run again, logs exactly what an uninterrupted
  run in a local directory logs (every value but the clock's, bitwise), and
  the bucket holds each stage's files. An object store cannot append: writing
  `metrics.jsonl` by appending kept only its last line. Nothing is written locally."""
  local = two_stages_reference
  env = {**os.environ, **gcs_emulator.environment(gcs_url)}
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  cli = ["--exp", str(EXPERIMENT), "--workdir", "gs://bucket/run"]
  env.update(  # the rerun loads what the killed run compiled
      PYTHONPATH=str(REPO),
      OPDJAX_COMPILATION_CACHE=str(tmp_path / "xla"),
      OPDJAX_COMPILATION_CACHE_MIN_SECONDS="0",
  )
  kw = dict(cwd=cwd, env=env, capture_output=True, text=True)
  killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_OPD_STEP_2, *cli], **kw)
  assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
  fs = GCSFileSystem(endpoint_url=gcs_url, token="anon", skip_instance_cache=True)
  assert fs.ls("bucket/run/opd/checkpoints", detail=False) == ["bucket/run/opd/checkpoints/2"]
  resumed = subprocess.run([sys.executable, "-m", "opdjax.train", *cli], **kw)
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
  fs.invalidate_cache()  # gcsfs caches listings

  for stage in ("sft", "opd"):
    want = _history((local / stage / "metrics.jsonl").read_text())
    assert [r["step"] for r in want if r["split"] == "train"] == [2, 4]
    got = _history(fs.cat(f"bucket/run/{stage}/metrics.jsonl").decode())
    assert got == want, stage
    model_config = fs.cat(f"bucket/run/{stage}/model_config.json")
    assert model_config == (local / stage / "model_config.json").read_bytes()
    assert fs.ls(f"bucket/run/{stage}/tensorboard"), stage
    assert fs.exists(f"bucket/run/{stage}/checkpoints/4"), stage
  config = json.loads(fs.cat("bucket/run/opd/config.json"))
  assert config["teachers"]["a"]["checkpoint"] == "gs://bucket/run/sft"
  assert config["task"]["train_jsonl"] == "gs://bucket/run/train.jsonl"
  assert fs.cat("bucket/run/opd/curves.png").startswith(b"\x89PNG")
  assert fs.cat("bucket/run/train.jsonl") == (local / "train.jsonl").read_bytes()
  assert not list(cwd.iterdir())  # no `gs:` directory, no local staging left behind
