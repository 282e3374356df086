"""Each benchmark script imports against the current package (a moved function would
otherwise break it silently: the scripts run only by hand or on a GPU). Their peers (torch,
TRL, Liger) are imported inside the functions that time them, so the suite needs none."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports(script, monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # their shared `_jsonl`
  spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)
  spec.loader.exec_module(module)  # top-level imports only: each runs under __main__
  assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
