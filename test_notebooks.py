"""The teaching notebooks run top to bottom, headless, each within two minutes, and draw their plots.

Each notebook runs in a fresh kernel whose working directory is a temporary folder, so the PNG files
committed in notebooks/ are left alone; nanosp is found through PYTHONPATH. To refresh the committed
plots, run the notebook from notebooks/ (Jupyter, or `jupyter execute --inplace NAME.ipynb`).
"""
import os
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent
BUDGET_S = 120  # each notebook, on a laptop CPU
PLOTS = {
    "01_tensor_parallel.ipynb": ["01_who_holds_what.png"],
    "02_sequence_parallel.ipynb": ["02_activation_memory_by_term.png", "02_communication.png"],
    "03_selective_recompute.ipynb": ["03_memory_vs_recompute.png", "03_loss_curves.png"],
}


def test_every_notebook_is_tested():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(PLOTS)


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=BUDGET_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.monotonic()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    elapsed = time.monotonic() - start
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.0f} s, over its {BUDGET_S} s budget"
    for plot in PLOTS[name]:
        assert (tmp_path / plot).stat().st_size > 10_000, f"{name} did not draw {plot}"
