"""Builds the Colab notebooks in colab/ from the cells in colab/notebook_cells.py, without outputs.

Run `python colab/build_notebooks.py` after editing a cell; `--check` exits 1 if a committed
notebook differs from what this script generates (tests/test_notebooks.py checks the same).
Cells only *use* bf16jax: configs, training, plots and printing, never library code. Each
notebook opens with an "Open in Colab" badge, installs bf16jax only on Colab, and reads its
length from `BF16JAX_NB_STEPS` so the tests can run it top to bottom in seconds.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from notebook_cells import NOTEBOOKS, NUMBERS  # noqa: E402

REPO = "bf16jax/bf16jax"  # GitHub owner/name; not public yet (see colab/README.md)
BRANCH = "main"
HERE = pathlib.Path(__file__).resolve().parent
STEPS_ENV = "BF16JAX_NB_STEPS"


def badge(filename: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/colab/{filename}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def install_cell(extras: str = "plots") -> str:
    return f"""# On Colab: clone bf16jax (its configs/ live in the repository) and install it
# with the JAX build for the runtime's device. Elsewhere this does nothing: run the
# notebook from a clone after `pip install -e ".[{extras}]"`.
import os
import shutil
import subprocess
import sys

if "google.colab" in sys.modules:
    CLONE = "/content/bf16jax"
    URL = "https://github.com/{REPO}"
    if not os.path.isdir(CLONE):
        subprocess.run(["git", "clone", "--depth=1", URL, CLONE], check=True)
    if os.environ.get("COLAB_TPU_ADDR") or os.path.exists("/dev/accel0"):
        jax_spec = ["jax[tpu]"]
    elif shutil.which("nvidia-smi"):
        jax_spec = ["jax[cuda12]"]
    else:
        jax_spec = []
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"{{CLONE}}[{extras}]", *jax_spec], check=True)
    sys.path.insert(0, CLONE)  # import the clone, so bf16jax.config.config_path finds configs/"""


def steps_cell(default: int, meaning: str) -> str:
    return f"""import os

# {meaning}
# The tests run this notebook with {STEPS_ENV} set to a small number.
STEPS = int(os.environ.get("{STEPS_ENV}", {default}))
print("STEPS =", STEPS)"""


def build(filename: str) -> nbformat.NotebookNode:
    """The notebook `filename` (a key of NOTEBOOKS), with the badge first and no outputs."""
    stem = filename.split("_")[0]
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "colab": {"provenance": [], "name": filename},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    cells = [("markdown", badge(filename)), *NOTEBOOKS[filename]]
    for i, (kind, source) in enumerate(cells):
        if kind == "install":
            kind, source = "code", install_cell(source)
        elif kind == "steps":
            kind, source = "code", steps_cell(*source)
        for key, value in NUMBERS.items():
            source = source.replace(key, value)
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source)
        cell.id = f"nb{stem}-cell{i:02d}"  # fixed ids: regenerating gives identical files
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(filename: str) -> str:
    return nbformat.writes(build(filename)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook is stale")
    args = parser.parse_args(argv)
    stale = []
    for filename in NOTEBOOKS:
        path = HERE / filename
        text = render(filename)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(filename)
        else:
            path.write_text(text)
            print("wrote", path)
    if stale:
        print(f"Stale notebooks {stale}: run python colab/build_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
