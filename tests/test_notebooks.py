"""notebooks/: every `.py` (jupytext percent, the reviewed source) and its `.ipynb` (what Colab opens)
hold the same cells, the `.ipynb` carries no outputs, and every notebook runs top to bottom in a
headless Jupyter kernel (nbclient) with TURBOS_NOTEBOOK_SMOKE=1, which shortens its runs.

The kernel gets one CPU device (a Colab CPU runtime has one), the tests' compilation cache and -O0
XLA backend (the smoke runs are mostly compiling), and the checkout on PYTHONPATH; it runs in a
temporary directory, so nothing is written into the checkout. After editing a `.py`:
`jupytext --sync notebooks/*.py` (docs/notebooks.md).
"""

import glob
import os
import re

import jupytext
import nbclient
import nbformat
import pytest
from helpers import ROOT, subprocess_env

NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
SOURCES = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.py")))
NAMES = [os.path.basename(p)[:-3] for p in SOURCES]
BADGE = re.compile(
    r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/(notebooks/[\w.-]+\.ipynb)"
)


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_notebooks_and_each_has_both_files():
    expected = {"01_quickstart", "02_architecture", "03_kernels", "04_hf_import", "05_post_training"}
    assert expected <= set(NAMES)
    ipynbs = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
    assert [p[:-6] for p in ipynbs] == [p[:-3] for p in SOURCES]


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync_and_outputs_stripped(name):
    base = os.path.join(NOTEBOOK_DIR, name)
    from_py, ipynb = jupytext.read(base + ".py"), nbformat.read(base + ".ipynb", as_version=4)
    assert _cells(from_py) == _cells(ipynb), f"{name}: .py and .ipynb differ; run jupytext --sync"
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: outputs saved in the .ipynb"
    nbformat.validate(ipynb)


def test_install_cells_and_badges_agree():
    """Every notebook starts with the same Colab install cell, and every badge (README and
    notebooks) opens a notebook of this repository at that cell's repository."""
    notebooks = [jupytext.read(p) for p in SOURCES]
    install = [next(c.source for c in nb.cells if c.cell_type == "code") for nb in notebooks]
    assert all(src == install[0] for src in install), "the install cells differ"
    (repo,) = re.findall(r'REPO = "https://github.com/([\w.-]+/[\w.-]+)"', install[0])
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme_badges = BADGE.findall(f.read())
    assert {path for _, path in readme_badges} == {f"notebooks/{n}.ipynb" for n in NAMES}
    for name, nb in zip(NAMES, notebooks, strict=True):
        badges = BADGE.findall(nb.cells[0].source)
        assert badges == [(repo, f"notebooks/{name}.ipynb")], (name, badges)
    assert {r for r, _ in readme_badges} == {repo}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_headless(name, tmp_path):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name + ".ipynb"), as_version=4)
    env = subprocess_env(devices=1, fast_compile=True, TURBOS_NOTEBOOK_SMOKE="1")
    env["TMPDIR"] = str(tmp_path)  # the notebooks' tempfile.mkdtemp workdirs land in pytest's tmp_path
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        startup_timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the kernel's traceback without colours
        pytest.fail(f"{name}: {plain[-3000:]}", pytrace=False)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    printed = "".join(o.get("text", "") for o in outputs)
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images >= 1, f"{name}: no plot was drawn"
    assert "Traceback" not in printed
