"""Several processes on one machine (gloo collectives over loopback).

Two processes with 4 simulated CPU devices each must train exactly as one process with 8:
the same losses and final parameters, for SFT and for OPD with the sampler (the two stages
of `tests/experiments/two_stages.py`; the second routes its rows between two teachers, so
each process's rows reach their own teacher's forward pass through the gathered route, and
each teacher is evaluated on a share of the held-out rows that does not split evenly over
the devices: 7 and 1 of 8; the one-process run is `two_stages_reference` in
tests/conftest.py, which the run on a bucket shares). Only process 0 writes the run's
files, and a run whose processes are all killed after a checkpoint resumes to the
parameters of an uninterrupted one (bitwise resume on one process:
`test_torn_checkpoint_falls_back_to_the_previous_one`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flax import nnx

from opdjax import checkpoint, metrics
from opdjax.models import Decoder
from tests.conftest import FAST_COMPILE

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "tests" / "experiments" / "two_stages.py"
STAGES = ("sft", "opd")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir: Path, processes: int, devices: int, cache: Path) -> list[subprocess.Popen]:
  """`processes` (two or more) CLI processes of the two-stage experiment, `devices` CPU
  devices each, sharing the compilation cache `cache` (a rerun loads what an earlier run
  compiled)."""
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      OPDJAX_COMPILATION_CACHE=str(cache),
      OPDJAX_COMPILATION_CACHE_MIN_SECONDS="0",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
  )
  command = [
      sys.executable,
      "-m",
      "opdjax.train",
      "--exp",
      str(EXPERIMENT),
      "--workdir",
      str(workdir),
  ]
  address = f"127.0.0.1:{_free_port()}"
  return [
      subprocess.Popen(
          command
          + [
              "--coordinator_address",
              address,
              "--num_processes",
              str(processes),
              "--process_id",
              str(i),
          ],
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(processes)
  ]


def finish(procs, timeout=600) -> None:
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"


def final_params(workdir: Path):
  abstract = nnx.state(Decoder(checkpoint.read_model_config(workdir), rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(checkpoint.restore_params(workdir, abstract))
  return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}


def records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def check_equal(one: Path, two: Path, stage: str) -> None:
  """Same logged values (to float32 rounding) and final parameters to 1e-5."""
  a, b = records(one), records(two)
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for x, y in zip(a, b):
    for key in x:
      if key not in (*metrics.CLOCK_KEYS, "split"):
        np.testing.assert_allclose(
            y[key], x[key], rtol=1e-5, atol=1e-6, err_msg=f"{stage} step {x['step']} {key}"
        )
  pa, pb = final_params(one), final_params(two)
  assert pa.keys() == pb.keys()
  for name in pa:
    np.testing.assert_allclose(pb[name], pa[name], atol=1e-5, err_msg=f"{stage} {name}")
  if stage == "opd":  # the sampler ran, and each routed teacher was evaluated on its rows
    assert "sampled_log_ratio" in a[0]
    final = [r for r in a if r["split"] == "eval"][-1]
    assert {"a/sequence_reverse_kl", "b/sequence_reverse_kl"} <= final.keys()


def check_written_once(workdir: Path, stage: str, *, runs: int = 1) -> None:
  """Process 0 alone wrote: each metrics line once, one TensorBoard file per run."""
  steps = [(r["step"], r["split"]) for r in records(workdir)]
  assert len(steps) == len(set(steps)), f"{stage}: metrics.jsonl has lines from two processes"
  assert len(list((workdir / "tensorboard").iterdir())) <= runs
  assert (workdir / "model_config.json").exists()
  assert (workdir / "curves.png").exists() == (stage == "opd")  # the stage that evaluates


def test_two_processes_killed_and_resumed_equal_one(two_stages_reference, tmp_path):
  """The 2 x 4 run is SIGKILLed once its SFT stage has a checkpoint, then rerun, so it
  resumes (each process its own data position) and goes on to the OPD stage. Both stages
  must equal the uninterrupted run of one process with 8 devices (`two_stages_reference`)."""
  cache = tmp_path / "xla"  # the rerun loads what the killed run compiled
  two = launch(tmp_path / "two", 2, 4, cache)
  checkpoints = tmp_path / "two" / "sft" / "checkpoints"
  deadline = time.time() + 600
  saved = lambda: checkpoints.exists() and any(d.name.isdigit() for d in checkpoints.iterdir())
  while time.time() < deadline and all(p.poll() is None for p in two) and not saved():
    time.sleep(0.05)
  for p in two:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert (
      saved() and not (checkpoints / "4").exists()
  ), "the run was not interrupted between its first checkpoint and its end"
  finish(launch(tmp_path / "two", 2, 4, cache))
  for stage in STAGES:
    check_equal(two_stages_reference / stage, tmp_path / "two" / stage, stage)
    check_written_once(tmp_path / "two" / stage, stage, runs=2 if stage == "sft" else 1)
  assert any(p.name.startswith("jit_step-") for p in cache.iterdir())  # the step was cached
