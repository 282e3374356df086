"""The benchmarks' one output format: a JSON line on stdout, also appended to `--out`."""

from __future__ import annotations

import json


def emit(record: dict, out: str | None) -> None:
  """Prints `record` as one JSON line and appends it to the file `out` (if given), at once,
  so a benchmark killed by its time limit keeps what it measured."""
  line = json.dumps(record)
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")
