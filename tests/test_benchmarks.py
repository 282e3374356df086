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


def test_decode_profile_keeps_leaf_events_and_measures_their_union(monkeypatch):
  """A CPU trace nests thunks inside loops: only the innermost count as kernels, and the
  busy time is the union of their intervals, not their sum."""
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import decode_profile

  event = lambda tid, ts, dur, name: dict(pid=1, tid=tid, ts=ts, dur=dur, name=name, ph="X")
  events = [
      event(7, 0.0, 10.0, "while"),
      event(7, 1.0, 2.0, "fusion.1"),
      event(7, 4.0, 2.0, "fusion.2"),
      event(8, 2.0, 3.0, "fusion.3"),  # another thread, overlapping both
  ]
  kept = decode_profile.leaves(events)
  assert sorted(e["name"] for e in kept) == ["fusion.1", "fusion.2", "fusion.3"]
  assert decode_profile.busy_us(kept) == 5.0  # [1, 6]; the sum of durations is 7


def test_decode_profile_takes_a_gpu_streams_kernels_whole(monkeypatch):
  """On a GPU the kernels are the stream lines' events, even where two overlap by a tick;
  the device's other lines (XLA ops, modules) repeat them and are only summarised."""
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import decode_profile

  meta = lambda ph_name, pid, tid, name: dict(
      ph="M", name=ph_name, pid=pid, tid=tid, args=dict(name=name)
  )
  event = lambda tid, ts, dur, name: dict(pid=2, tid=tid, ts=ts, dur=dur, name=name, ph="X")
  trace = dict(
      traceEvents=[
          meta("process_name", 2, 0, "/device:GPU:0"),
          meta("thread_name", 2, 5, "Stream #13(Compute)"),
          meta("thread_name", 2, 6, "XLA Modules"),
          meta("process_name", 1, 0, "/host:CPU"),
          event(5, 0.0, 3.0, "gemm_fusion_dot"),
          event(5, 2.5, 2.0, "loop_multiply_fusion"),  # starts before the first ends
          event(6, 0.0, 5.0, "jit_generate"),
          dict(pid=1, tid=1, ts=0.0, dur=9.0, name="host work", ph="X"),
      ]
  )
  kernels, lines = decode_profile.kernel_events(trace)
  assert [e["name"] for e in kernels] == ["gemm_fusion_dot", "loop_multiply_fusion"]
  assert lines == {"Stream #13(Compute)": [2, 5.0], "XLA Modules": [1, 5.0]}


def test_alternating_medians_takes_the_sides_in_turn(monkeypatch):
  """Two implementations timed in turn, not one's repeats then the other's: a machine that
  slows down halfway (a shared VM) would otherwise charge the slowdown to one side."""
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import _timing

  calls, clock = [], iter(range(100))
  monkeypatch.setattr(_timing.time, "perf_counter", lambda: float(next(clock)) ** 2)
  fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
  medians = _timing.alternating_medians(fns, repeats=3)
  assert calls == ["a", "b"] * 3
  # the clock reads 0, 1, 4, 9, 16, ...: a's calls take 1, 9, 17 ticks and b's 5, 13, 21
  assert medians == {"a": 9.0, "b": 13.0}
