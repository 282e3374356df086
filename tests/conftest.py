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
