"""Suite-wide settings: CPU only, and a skipped or xfailed test fails the run."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache stays off unless a test turns it on for itself.
os.environ["OPDJAX_COMPILATION_CACHE"] = ""
# Eight simulated CPU devices, so sharding is tested on every machine (the default device,
# and so every unsharded computation, is still device 0).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

# One persistent XLA compilation cache shared by the session's processes (both xdist workers
# and the notebooks' kernels; the CLI's own cache setting, which the 2-process test uses,
# takes precedence in its children): a program several tests compile (the same tiny step,
# the sampler, evaluation) is compiled once. It is keyed by the pytest process that owns the
# run (an xdist worker's parent) and removed when that process ends.
_OWNER = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
_CACHE = os.path.join(tempfile.gettempdir(), f"opdjax-test-xla-{_OWNER}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402


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


def pytest_unconfigure(config):
  if not hasattr(config, "workerinput"):  # the owning process, after every worker is done
    shutil.rmtree(_CACHE, ignore_errors=True)
