"""The lab handout: lab.ipynb is docs/lab.md as a notebook, and every cell of it runs (on tiny settings)."""
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent


def test_the_notebook_is_the_handout():
    """One source of truth: `jupytext --to ipynb -o lab.ipynb docs/lab.md` regenerates the notebook."""
    handout = jupytext.read(ROOT / "docs" / "lab.md")
    notebook = nbformat.read(ROOT / "lab.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [(c.cell_type, c.source) for c in handout.cells]
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


def test_every_cell_runs(monkeypatch):
    """Each exercise with 10 training steps (LAB_FAST), in the repository's folder, offline."""
    monkeypatch.setenv("LAB_FAST", "--batch-size 6000 --eval-every 0.5 --threads 1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(ROOT / "lab.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    outputs = ["".join(o.get("text", "") for o in c.outputs) for c in code]
    commands = sum(c.source.count("!python parity_mnist.py") for c in code)
    assert commands >= 10 and sum(text.count("trained 10 steps") for text in outputs) == commands  # each one trained
    assert "law fitted on" in "".join(outputs)
    assert all("Traceback" not in text and "error:" not in text for text in outputs)
