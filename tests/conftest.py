"""Suite-wide settings: CPU only, and a skipped or xfailed test fails the run."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if reporter is None:
    return
  skipped = [r for key in ("skipped", "xfailed", "xpassed") for r in reporter.stats.get(key, [])]
  if skipped and session.exitstatus == pytest.ExitCode.OK:
    reporter.write_line(
        f"FAILED: {len(skipped)} test(s) skipped or xfailed; this suite runs everything.",
        red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
