"""Every notebook in notebooks/ runs top to bottom at a tiny size (nbclient); any error fails.

Each notebook has one cell tagged `parameters`; the test replaces it with the tiny values
below, and runs the notebook in a temporary directory (so nothing is written to the repo).
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from opdjax.configs import teacher_config, tiny_stage, warmstart_config
from tests.conftest import FAST_COMPILE

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"

TINY = {
    "01_logit_gradients.ipynb": "SAMPLE_COUNTS = (10, 1000)\nREPEATS = 50\nSEED = 0",
    "02_quickstart.ipynb": (
        "WORKDIR = 'workdirs/notebook_quickstart'\n"
        "TEACHER_STEPS, WARMSTART_STEPS, OPD_STEPS = 2, 2, 2\n"
        "BATCH_SIZE = 8\nTRAIN_SIZE, EVAL_SIZE = 32, 8\nTEACHER_EVAL = False\nEVAL_EVERY = 2\n"
        "REFRESH_SECONDS = 0.5\nSHOW = 3"
    ),
    "03_results.ipynb": f"RESULTS = {str(RESULTS)!r}",
}


def test_every_notebook_has_a_tiny_setting():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs(name, tmp_path, monkeypatch, copy_finished_stages):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # the kernel sees one CPU device, as in Colab
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
  tagged[0].source = TINY[name]
  assert "colab.research.google.com" in notebook.cells[0].source  # the Open-in-Colab badge
  if name == "02_quickstart.ipynb":
    # The teacher and warm start come finished (the suite shares them with the `:tiny`
    # experiments); the notebook reuses them as it does on a rerun and trains the OPD stage.
    stages = {
        "teacher": tiny_stage(teacher_config("addition"), 2),
        "warmstart": tiny_stage(warmstart_config("addition"), 2),
    }
    copy_finished_stages(stages, tmp_path / "workdirs" / "notebook_quickstart")
  client = NotebookClient(
      notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
