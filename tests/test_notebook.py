"""examples/quickstart.ipynb runs top to bottom in a fresh kernel (offline, on the built-in
dataset), and is committed without outputs."""

import json
import os
import pathlib
import re
import sys

import pytest

from tests.test_train import environment

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.ipynb"
CELL_TIMEOUT_S = 600


def execute(path, workdir, tmp_path, monkeypatch):
    """The notebook executed in a kernel of this interpreter, with `workdir` as its current
    directory; raises nbclient's CellExecutionError on the first failing cell."""
    # A "python3" kernelspec installed for the user or the system (Jupyter looks there before
    # the venv's) could start another interpreter; JUPYTER_PATH comes first, so this one wins.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "convnets tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = environment(TFDS_DATA_DIR=str(tmp_path / "tfds"), PYTHONPATH=pythonpath,
                      IPYTHONDIR=str(tmp_path / "ipython"))   # no user profile or startup files
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)
    return notebook


def outputs(notebook, output_type):
    return [o for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.outputs if o.output_type == output_type]


def test_quickstart_runs_offline_and_learns(tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    notebook = execute(QUICKSTART, workdir, tmp_path, monkeypatch)

    assert outputs(notebook, "error") == []
    stdout = "".join(o.text for o in outputs(notebook, "stream") if o.name == "stdout")
    assert "test accuracy (EMA params): top-1" in stdout   # training.run's final line
    # tools.evaluate's line (the notebook asserts the same itself); chance is 10%.
    top1 = re.search(r"^top-1 ([\d.]+)%, top-5 [\d.]+% on 360 images$", stdout, re.M)
    assert top1 and float(top1[1]) > 30, stdout[-2000:]
    predicted = re.findall(r"^label \d: (\d) \d+%, \d \d+%, \d \d+%$", stdout, re.M)
    assert len(predicted) == 2, stdout[-2000:]   # tools.predict: top 3 of two test digits
    images = [o for o in outputs(notebook, "display_data") if "image/png" in o.data]
    assert len(images) == 2, "the training curve and the feature maps"
    # Everything it writes stays under its current directory (the data dir aside).
    assert (workdir / "runs" / "quickstart" / "metrics.jsonl").exists()
    assert (tmp_path / "tfds" / "sklearn_digits").is_dir()


def test_quickstart_is_committed_without_outputs():
    notebook = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert [c.execution_count for c in code] == [None] * len(code)
    assert [c.outputs for c in code] == [[]] * len(code)
    assert notebook.metadata.kernelspec.name == "python3"
