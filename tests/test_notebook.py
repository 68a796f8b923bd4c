"""docs/notebooks/quickstart.ipynb runs top to bottom in a fresh kernel, so it cannot rot.

It trains a small CNN with HAM on the bundled digits through the library's jitted step, mines
its hard examples and attacks it; the test reads the numbers it printed and checks what any
working run must show: a model that learned (clean accuracy far above chance), robust accuracy
that only falls as attacks are added, and the plots rendered.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "quickstart.ipynb"
SUMMARY = re.compile(r"^\s*(.+?): average ([\d.]+)%, worst class (\S+) ([\d.]+)%$", re.M)


def _stream_text(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream")


def _image_count(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells
               if cell.cell_type == "code" for out in cell.outputs)


def test_quickstart_notebook_executes_and_reports_sane_accuracies(monkeypatch):
    """Executed with this interpreter (the kernel spec says `python`: PATH decides which one)."""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    repo = str(NOTEBOOK.parents[2])
    monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "save the notebook with its outputs cleared")

    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    text = _stream_text(nb)
    averages = {name: float(avg) for name, avg, _, _ in SUMMARY.findall(text)}
    assert list(averages) == ["clean", "PGD-20", "PGD-20 + APGD-CE"], text
    assert averages["clean"] > 80.0, text  # ten classes: chance is 10%
    assert averages["clean"] >= averages["PGD-20"] >= averages["PGD-20 + APGD-CE"], text
    hard = float(re.search(r"hard after M = 3 steps: ([\d.]+)", text).group(1))
    assert 0.0 < hard < 1.0, text
    assert _image_count(nb) == 2
