"""The benchmarks' one output format: a JSON line on stdout, also appended to `--out`."""

from __future__ import annotations

import functools
import json
import os
import platform


@functools.cache
def cpu_model() -> str:
  """The host CPU's model name and core count, e.g. "AMD EPYC (16 cores)". A CPU's
  instruction set changes XLA's code, so its speed and its float32 rounding: results from
  two CPUs are not comparable figure for figure."""
  name = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      name = next(
          (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name
      )
  except OSError:
    pass
  return f"{name or platform.machine()} ({os.cpu_count()} cores)"


def emit(record: dict, out: str | None) -> None:
  """Prints `record` as one JSON line, with the host's `cpu_model`, and appends it to the
  file `out` (if given), at once, so a benchmark killed by its time limit keeps what it
  measured."""
  line = json.dumps({**record, "cpu_model": record.get("cpu_model", cpu_model())})
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")
