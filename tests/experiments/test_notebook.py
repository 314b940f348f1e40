"""The quickstart notebook runs end to end (nbclient, a fresh kernel, CPU)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "experiments" / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "pip" in first.source and '"google.colab" in sys.modules' in first.source
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
    outputs = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )
    assert "Installing" not in outputs and "restored step 60" in outputs
    after = float(outputs.split("validation after training: ")[1].split()[0])
    before = float(outputs.split("validation before training: ")[1].split()[0])
    assert after < before - 1.0  # sixty steps learn something
    samples = [line for line in outputs.splitlines() if line.startswith("sample: ")]
    assert len(samples) == 2 and all(s[len("sample: ") + 1 :].startswith("def ") for s in samples)
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) == 1  # the loss curve
