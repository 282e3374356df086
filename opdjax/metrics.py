"""Metrics: token-weighted `(sum, count)` accumulation, JSONL + TensorBoard writers,
terminal tables and PNG plots of the curves."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np


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


class Writer:
  """Appends `{"step", "split", **scalars}` lines to `metrics.jsonl` and TensorBoard events.

  Only an `enabled` writer (process 0 of a multi-host run) touches files; the others keep
  the same calls and write nothing. `workdir` may be an `etils.epath` path (`gs://...`)."""

  def __init__(self, workdir, *, tensorboard: bool = True, enabled: bool = True):
    from etils import epath

    self.workdir = epath.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.enabled = enabled
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
          line
          for line in self.path.read_text().splitlines()
          if line.strip() and json.loads(line)["step"] <= step
      ]
      self.path.write_text("".join(line + "\n" for line in keep))

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

  def close(self) -> None:
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


def plot_curves(
    series: Mapping[str, list[dict]],
    keys: Iterable[str],
    path: str | Path,
    *,
    split: str = "eval",
    title: str = "",
) -> Path:
  """One panel per metric key, one line per named run; saves a PNG and returns its path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = list(keys)
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for name, history in series.items():
      points = [(r["step"], r[key]) for r in history if r.get("split") == split and key in r]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  from etils import epath

  path = epath.Path(path)
  with path.open("wb") as f:  # through epath, so a gs:// workdir works
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)
  return path if "://" in str(path) else Path(str(path))


def mean_and_std(values: Iterable[float]) -> tuple[float, float]:
  values = np.asarray(list(values), np.float64)
  return float(values.mean()), float(values.std())
