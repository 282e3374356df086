"""Suite-wide settings: CPU only, and a skipped or xfailed test fails the run."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache stays off unless a test turns it on for itself.
os.environ["OPDJAX_COMPILATION_CACHE"] = ""
# Eight simulated CPU devices, so sharding is tested on every machine (the default device,
# and so every unsharded computation, is still device 0).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
# The suite's shapes are tiny, so its time goes to compiling. XLA's CPU backend skips LLVM's
# optimisation of the kernels it emits (about a fifth less compile time), and emits fusions
# with its older LLVM emitters rather than the MLIR fusion emitters (a tiny train step
# compiles in 1.4 s instead of 2.6 s; a `jax.random.normal` in 0.11 s instead of 0.2 s).
# Subprocess tests pass these on with their own flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if FAST_COMPILE not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE

import contextlib  # noqa: E402
import fcntl  # noqa: E402

import pytest  # noqa: E402


def shared_dir(tmp_path_factory, name: str):
  """`name` in the directory the xdist workers of this test session share (the session's
  own temporary directory without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@contextlib.contextmanager
def locked(path):
  """Holds an exclusive lock on `path.lock` across the xdist workers: one works, the others
  wait, then find its result."""
  with open(f"{path}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def pytest_sessionfinish(session, exitstatus):
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if reporter is None:
    return
  skipped = [r for key in ("skipped", "xfailed", "xpassed") for r in reporter.stats.get(key, [])]
  if skipped and session.exitstatus == pytest.ExitCode.OK:
    reporter.write_line(
        f"FAILED: {len(skipped)} test(s) skipped or xfailed; this suite runs everything.", red=True
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", name="copy_finished_stages")
def fixture_copy_finished_stages(tmp_path_factory):
  """`(stages: {name: config}, workdir)`: puts each finished stage in `workdir/name`.

  Each distinct stage config (by content) trains once per test session, shared by the xdist
  workers (a lock file per config), and is copied from there; an experiment run in `workdir`
  then reuses it as it reuses any finished stage. For the stages several `:tiny` experiments
  and notebooks have in common (a teacher, a warm start), which only need to exist."""
  import hashlib
  import shutil

  from opdjax import trainer

  root = shared_dir(tmp_path_factory, "finished_stages")
  root.mkdir(exist_ok=True)

  def copy(stages, workdir):
    for name, config in stages.items():
      text = config.to_json(sort_keys=True)
      assert '"@' not in text, f"stage {name} names another stage; share only standalone ones"
      run_dir = root / hashlib.sha256(text.encode()).hexdigest()[:16]
      with locked(run_dir):
        trainer.run(config, run_dir, quiet=True)  # returns at once once finished
      shutil.copytree(run_dir, workdir / name)

  return copy


@pytest.fixture(scope="session", name="two_stages_reference")
def fixture_two_stages_reference(tmp_path_factory):
  """The workdir of `tests/experiments/two_stages.py` run uninterrupted in a test process (8
  CPU devices, one process): the run that the multi-process run and the run on a bucket
  must each equal. It runs once per test session, shared by the xdist workers (the first to
  take the lock runs it; `done` marks it finished). Tests read it and write nothing there."""
  from tests.experiments.two_stages import get_config, main

  workdir = shared_dir(tmp_path_factory, "two_stages_reference")
  with locked(workdir):
    if not (workdir / "done").exists():
      main(get_config(), workdir)
      (workdir / "done").touch()
  return workdir
