"""The Colab notebooks (colab/*.ipynb): built from colab/build_notebooks.py, badge first, no
outputs committed, and each executes top to bottom on CPU with a small number of steps.

Each notebook runs in its own `python3` kernel (nbclient) with BF16JAX_NB_STEPS small and JAX on
CPU with one device (the conftest's 8 fake devices are not passed on); plots must render.
A failing cell fails the test with that cell's traceback.
"""

import importlib.util
import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))
# Every log / eval / plot / int8 path runs at 10 steps; the time is compiles, not steps (the
# real defaults: 300 GPT steps, 10,000 tiny updates, 600 ViT steps).
STEPS = 10
# Per cell: 03 trains three ViTs in one cell (3 x 3 compiles: train step, its logging variant,
# eval); 608 s under a load of ~12 on 2 cores, so the limit is for a hung kernel, not speed.
TIMEOUT_S = 1800


def _build_module():
    spec = importlib.util.spec_from_file_location("build_notebooks", COLAB / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_module()


def kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(JAX_PLATFORMS="cpu", BF16JAX_NB_STEPS=str(STEPS))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend turns plots into image/png outputs
    return env


def test_every_notebook_is_built_and_tested():
    assert NOTEBOOKS == sorted(BUILD.NOTEBOOKS), "run python colab/build_notebooks.py"
    assert {"01_quickstart.ipynb", "03_quantization.ipynb", "04_pretrained.ipynb"} <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_build_script(name):
    text = (COLAB / name).read_text()
    assert text == BUILD.render(name), f"{name} is stale: run python colab/build_notebooks.py"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_badge_first_and_no_outputs(name):
    nb = nbformat.read(COLAB / name, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert first.source.startswith("[![Open In Colab](https://colab.research.google.com/assets/")
    assert f"/blob/main/colab/{name})" in first.source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
        assert "(not measured yet)" not in cell.source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in code
    assert 'os.environ.get("BF16JAX_NB_STEPS"' in code


def test_kernel_runs_this_interpreter(tmp_path):
    assert KernelSpecManager().get_kernel_spec("python3")  # found in the venv (ipykernel)
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(nb, kernel_name="python3", timeout=60)
    client.execute(env=kernel_env(), cwd=str(tmp_path))
    assert nb.cells[0].outputs[0].text.strip() == sys.executable


@pytest.mark.slow  # a kernel per notebook, each training for BF16JAX_NB_STEPS
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(COLAB / name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=kernel_env())  # raises CellExecutionError naming the failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)
