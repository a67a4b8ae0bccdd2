"""The documentation site builds with warnings as errors, and the check can fail.

`mkdocs build --strict` (mkdocs.yml at the repository root: the guides in docs/, results and
READMEs included from where they live, the API reference from the docstrings) turns a broken
link or anchor, a page missing from the nav, an included file that does not exist, and a
docstring or cross-reference mkdocstrings cannot render into a failed build. The reference
parses the source statically (griffe), so the build imports neither bf16jax nor JAX.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cli_runs import REPO

# What mkdocs.yml reads besides docs/: mkdocstrings' sources and the included files.
INCLUDED = ("bf16jax", "experiments", "colab", "CHANGELOG.md")


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of `root`/mkdocs.yml into `site`, from `root` (snippet paths)."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner on stderr
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_docs_site_builds_strict(tmp_path):
    proc = _build(REPO, tmp_path / "site")
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    for page in ("index.html", "guides/serving/index.html", "reference/nn/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # The reference is rendered from the docstrings, not left as a directive.
    layers = (tmp_path / "site" / "reference/nn/index.html").read_text()
    assert "bf16jax.nn.layers" in layers and ":::" not in layers
    # A results page shows the included table, not the include line.
    qat = (tmp_path / "site" / "results/qat/index.html").read_text()
    assert "93.89%" in qat and "--8&lt;--" not in qat and "--8<--" not in qat


def test_a_broken_link_fails_the_build(tmp_path):
    """The check above can fail: the same site with one link to a page that does not exist."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(REPO / "docs", root / "docs")
    for name in INCLUDED:
        (root / name).symlink_to(REPO / name)
    page = root / "docs" / "guides" / "training.md"
    page.write_text(page.read_text() + "\nSee [the missing guide](no_such_guide.md).\n")
    proc = _build(root, tmp_path / "site")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "no_such_guide.md" in output, output


def test_every_module_is_in_the_api_reference():
    """Each library module has a `::: bf16jax.<subpackage>.<module>` directive in docs/reference/,
    so a new module cannot be left out of the reference."""
    text = "\n".join(p.read_text() for p in (REPO / "docs" / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: (bf16jax[\w.]*)\s*$", text, re.M))
    package = REPO / "bf16jax"
    modules = {
        "bf16jax." + ".".join(p.relative_to(package).with_suffix("").parts)
        for p in package.glob("*/*.py")
        if p.stem != "__init__" and not p.stem.startswith("_")
    }
    modules |= {"bf16jax.config", "bf16jax.cli"}
    missing = sorted(modules - documented)
    assert not missing, f"modules without a ::: directive in docs/reference/: {missing}"
    unknown = sorted(
        m
        for m in documented
        if not (REPO / Path(*m.split("."))).with_suffix(".py").is_file()
        and not (REPO / Path(*m.split(".")) / "__init__.py").is_file()
    )
    assert not unknown, f"::: directives naming no module: {unknown}"
