"""The built wheel carries the experiments: a non-editable install, outside the repository,
lists them and dry-runs the quickstart."""

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_install_lists_and_dry_runs_experiments(tmp_path):
  subprocess.run(
      [
          sys.executable,
          "-m",
          "pip",
          "wheel",
          "--quiet",
          "--no-deps",
          "-w",
          str(tmp_path / "dist"),
          str(REPO),
      ],
      check=True,
  )
  (wheel,) = (tmp_path / "dist").glob("opdjax-*.whl")
  venv = tmp_path / "venv"
  # No pip of its own (ensurepip takes ~7 s): this environment's pip installs into it.
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  subprocess.run(
      [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps"]
      + [str(wheel)],
      check=True,
  )
  # Dependencies come from this environment's site-packages, which holds no opdjax package
  # of its own (the editable install is a .pth hook, and PYTHONPATH entries run no .pth).
  env = {
      "PYTHONPATH": sysconfig.get_paths()["purelib"],
      "PATH": "/usr/bin:/bin",
      "JAX_PLATFORMS": "cpu",
  }
  run = lambda *args: subprocess.run(
      [str(python), *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
  ).stdout
  location = run("-c", "import opdjax; print(opdjax.__file__)")
  assert location.startswith(str(venv)), location
  listed = run("-m", "opdjax.train", "--list")
  for name in ("quickstart", "teacher_sft", "compare_objectives"):
    assert name in listed, listed
  config = run("-m", "opdjax.train", "--exp", "quickstart", "--dry_run")
  assert "stage_order" in config and "opd" in config
