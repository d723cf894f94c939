"""The teaching notebooks run top to bottom, headless, and draw their plots, and their code asserts
the figures their text teaches, so a notebook that shows a wrong number fails. (How long each takes
is shown by `pytest --durations=0 test_notebooks.py`; the timeout only stops a hang.)

Each notebook runs in a fresh kernel whose working directory is a temporary folder, so the PNG files
committed in notebooks/ are left alone; nanosp is found through PYTHONPATH. To refresh the committed
plots, run the notebook from notebooks/ (Jupyter, or `jupyter execute --inplace NAME.ipynb`).
"""
import ast
import os
from pathlib import Path

import nbclient
import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

ROOT = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 600  # a hung cell fails the test instead of stalling CI
PLOTS = {
    "01_tensor_parallel.ipynb": ["01_who_holds_what.png"],
    "02_sequence_parallel.ipynb": ["02_activation_memory_by_term.png", "02_communication.png"],
    "03_selective_recompute.ipynb": ["03_memory_vs_recompute.png", "03_loss_curves.png", "03_recompute_frontier.png",
                                     "03_fused_attention.png"],
    "04_autoshard.ipynb": ["04_discovered_placement.png", "04_llama_placement.png"],
}
ASSERTING = list(PLOTS)  # every notebook asserts what it teaches


def test_every_notebook_is_tested():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(PLOTS)
    assert set(ASSERTING) <= set(PLOTS)


@pytest.mark.parametrize("name", ASSERTING)
def test_notebook_asserts_what_it_teaches(name):
    """At least one assert statement in the notebook's code (read as IPython reads it, magics too);
    test_notebook_runs then runs them."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cells = [TransformerManager().transform_cell(c.source) for c in notebook.cells if c.cell_type == "code"]
    asserts = [node for cell in cells for node in ast.walk(ast.parse(cell)) if isinstance(node, ast.Assert)]
    assert asserts, f"{name} asserts nothing: its figures could be wrong and still pass"


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small models: more threads only spin on a busy machine
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    for plot in PLOTS[name]:
        assert (tmp_path / plot).stat().st_size > 10_000, f"{name} did not draw {plot}"
