"""The notebooks under notebooks/ execute top to bottom at a tiny budget.

Each notebook reads its budget from ``NB_TOTAL_STEPS``; here it is a few updates, so a run
checks that every cell works with the current API, not that anything learns. Execution uses
``nbclient`` with a fresh ``python3`` kernel in a temporary working directory and fails on the
first cell error. ``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` roughly halves XLA compilation time,
which dominates at this budget (the compiled programs run only a few updates).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 600  # seconds per cell

# env steps per seed: a few updates of each notebook's configuration
BUDGETS = {
    "quickstart": 2048,  # 8 updates of 8 envs x 32 steps
    "emu": 1024,  # 8 updates of 4 x 32
    "trama": 1024,  # 8 updates of 4 x 32
    "dec_pomfc": 1600,  # 4 updates of 8 swarms x 50 steps
    "qarl": 2000,  # 20 updates of 4 x 25
    "wpr": 2048,  # 4 updates of 8 x 64
}


def _read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_every_notebook_is_covered_and_stored_without_outputs():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(BUDGETS)
    for name in BUDGETS:
        nb = _read(name)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), name
        assert 'os.environ.get("NB_TOTAL_STEPS"' in "".join(c.source for c in code), name


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_notebook_executes(name, tmp_path, monkeypatch):
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.setenv("NB_TOTAL_STEPS", str(BUDGETS[name]))
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp))  # the notebooks' tempfile.mkdtemp() run directories
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    # the training summary reached the notebook: printed output is not lost on the way
    assert "steps per seed" in printed, name
    assert not os.listdir(work), f"{name} wrote into its working directory: {os.listdir(work)}"
    runs = [d for d in tmp.iterdir() if d.name.startswith(f"marl_{name}_")]
    assert len(runs) == 1 and any(runs[0].iterdir()), f"{name}: no run directory under TMPDIR"
