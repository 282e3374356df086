"""Metrics: token-weighted `(sum, count)` accumulation, JSONL + TensorBoard writers,
terminal tables and PNG plots of the curves."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

HISTORY_FILE = "metrics.jsonl"  # a run's logged values, one JSON object per line
# Logged values measured on the clock: they differ between two runs that train identically.
CLOCK_KEYS = ("steps_per_s", "tokens_per_s", "compile_s")


class Accumulator:
  """Sums `(sum, count)` pairs over steps; `means()` divides once (exact token weighting)."""

  def __init__(self):
    self.sums: dict[str, float] = defaultdict(float)
    self.counts: dict[str, float] = defaultdict(float)

  def add(self, metrics: Mapping[str, tuple]) -> None:
    for name, (total, count) in metrics.items():
      self.sums[name] += float(total)
      self.counts[name] += float(count)

  def means(self) -> dict[str, float]:
    return {
        name: self.sums[name] / self.counts[name] for name in self.sums if self.counts[name] > 0
    }

  def reset(self) -> None:
    self.sums.clear()
    self.counts.clear()


class CompileClock:
  """Seconds JAX spends tracing, lowering to MLIR and compiling, counted from JAX's own
  monitoring events while the clock is open (`with CompileClock() as clock: ...`; read
  `clock.seconds`), in any thread: seconds compiled in the background while other work
  ran count too. A persistent compilation cache hit skips the compile, not the trace."""

  EVENTS = (
      "/jax/core/compile/jaxpr_trace_duration",
      "/jax/core/compile/jaxpr_to_mlir_module_duration",
      "/jax/core/compile/backend_compile_duration",
  )

  def __init__(self):
    self.seconds = 0.0
    self._lapped = self._excluded = 0.0
    self._lock = threading.Lock()  # events also arrive from the train step's compile thread

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event in self.EVENTS:
      with self._lock:
        self.seconds += duration

  def lap(self) -> float:
    """The seconds counted since the last lap, less those inside `excluded()`."""
    seconds = self.seconds - self._lapped - self._excluded
    self._lapped, self._excluded = self.seconds, 0.0
    return seconds

  @contextlib.contextmanager
  def excluded(self):
    """Leaves what compiles inside the block out of the current lap (evaluation's programs,
    as the training rates leave out its time)."""
    before = self.seconds
    try:
      yield
    finally:
      self._excluded += self.seconds - before

  def __enter__(self) -> "CompileClock":
    import jax

    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    import jax

    jax.monitoring.unregister_event_duration_listener(self._listen)


class Writer:
  """Appends `{"step", "split", **scalars}` lines to `metrics.jsonl` and TensorBoard events.

  Only an `enabled` writer (process 0 of a multi-host run) touches files; the others keep
  the same calls and write nothing. `workdir` may be an `etils.epath` path (`gs://...`).
  A local file gets each line as it is written. An object store cannot append to an
  object, so there the whole file is rewritten, at most every `store_every_s` seconds and
  on `flush()`: the trainer flushes before each checkpoint (a resumed run redoes the lines
  after it), before stopping on a non-finite loss, and on `close()`."""

  def __init__(
      self,
      workdir,
      *,
      tensorboard: bool = True,
      enabled: bool = True,
      store_every_s: float = 30.0,
  ):
    from etils import epath

    from opdjax.checkpoint import is_remote

    self.workdir = epath.Path(workdir)
    self.path = self.workdir / HISTORY_FILE
    self.enabled = enabled
    self._lines: list[str] | None = [] if is_remote(self.workdir) else None  # object stores
    self._stored, self._stored_at, self.store_every_s = 0, time.monotonic(), store_every_s
    self._tb = None
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (a resumed run redoes them)."""
    if self.enabled and self.path.exists():
      keep = [
          line + "\n"
          for line in self.path.read_text().splitlines()
          if line.strip() and json.loads(line)["step"] <= step
      ]
      self.path.write_text("".join(keep))
      if self._lines is not None:
        self._lines, self._stored = keep, len(keep)

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
    line = json.dumps(record) + "\n"
    if self._lines is None:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      if time.monotonic() - self._stored_at >= self.store_every_s:
        self.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

  def flush(self) -> None:
    """Stores every line written so far (on an object store; a local file has them)."""
    if self.enabled and self._lines is not None and self._stored < len(self._lines):
      self.path.write_text("".join(self._lines))
      self._stored, self._stored_at = len(self._lines), time.monotonic()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()


def read_history(path) -> list[dict]:
  from etils import epath

  path = epath.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_table(rows: list[Mapping], columns: Iterable[str]) -> str:
  """A plain-text table (floats to 4 significant digits)."""
  columns = list(columns)

  def fmt(v):
    if isinstance(v, float):
      return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)

  cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
  widths = [
      max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
  ]
  line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))
  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _figure(panels: int):
  """A row of `panels` axes on a pyplot-free `Figure`: no global backend is switched, so
  plotting from a training run leaves a notebook's inline plots alone."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(4.4 * panels, 3.5))
  return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig, path: str | Path, title: str) -> Path:
  from etils import epath

  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = epath.Path(path)
  with path.open("wb") as f:  # through epath, so a gs:// workdir works
    fig.savefig(f, dpi=110, format="png")
  from opdjax.checkpoint import is_remote

  return path if is_remote(path) else Path(str(path))


def plot_curves(
    series: Mapping[str, list[dict]],
    keys: Iterable[str],
    path: str | Path,
    *,
    split: str = "eval",
    title: str = "",
) -> Path:
  """One panel per metric key, one line per named run; saves a PNG and returns its path."""
  keys = list(keys)
  fig, axes = _figure(len(keys))
  for ax, key in zip(axes, keys):
    for name, history in series.items():
      points = [(r["step"], r[key]) for r in history if r.get("split") == split and key in r]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  return _save(fig, path, title)


def plot_panels(panels: list[Mapping], path: str | Path | None = None, *, title: str = ""):
  """Draws an experiment's result panels; saves a PNG when `path` is given.

  Each panel is `{"title", "x" (axis label), "series": {label: {"x": [...], "y": [...],
  "std": [...] (optional band)}}, "log_y": bool (optional)}`, the form experiments store in
  their results JSON, so `notebooks/03_results.ipynb` redraws the same figure from it.

  Returns:
    The saved path, or the `matplotlib.figure.Figure` when `path` is None.
  """
  fig, axes = _figure(len(panels))
  for ax, panel in zip(axes, panels):
    for label, line in panel["series"].items():
      ax.plot(line["x"], line["y"], "o-", markersize=3, label=label)
      if "std" in line:
        y, s = np.asarray(line["y"], float), np.asarray(line["std"], float)
        ax.fill_between(line["x"], y - s, y + s, alpha=0.2)
    ax.set_xlabel(panel["x"])
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)  # 1e5 ×
    ax.set_title(panel["title"], fontsize=10)
    if panel.get("log_y"):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if path is None:
    if title:
      fig.suptitle(title)
    fig.tight_layout()
    return fig
  return _save(fig, path, title)


def mean_and_std(values: Iterable[float]) -> tuple[float, float]:
  values = np.asarray(list(values), np.float64)
  return float(values.mean()), float(values.std())


def mean_std_text(stat: Mapping) -> str:
  """`"0.512 ± 0.037"` from a `seed_summary` (or any `{"mean", "std"}`)."""
  return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def seed_summary(values: Iterable[float]) -> dict:
  """`{"mean", "std", "per_seed"}` of one measure over an experiment's seeds."""
  values = [float(v) for v in values]
  mean, std = mean_and_std(values)
  return dict(mean=mean, std=std, per_seed=values)


def mean_eval_curve(histories: Iterable[list[dict]], key: str) -> tuple[list[int], list[float]]:
  """`(steps, mean over runs)` of the held-out `key` at the evaluation steps all runs share."""
  evals = [{r["step"]: r[key] for r in h if r["split"] == "eval" and key in r} for h in histories]
  steps = sorted(set.intersection(*(set(e) for e in evals))) if evals else []
  return steps, [float(np.mean([e[s] for e in evals])) for s in steps]
