"""Reads the commands and code snippets out of the Markdown docs, for tests/test_docs.py.

A snippet is a fenced code block (```python runs as Python; ```bash, ```sh or an unlabelled
block holds shell commands, one per line, `\\` continuing a line) or an inline code span that
starts with a program (`python ...`, `make ...`). Shell commands keep their text as written
(quotes, `$VAR`, `# comments`): bash splits and expands them when they run. Each snippet keeps
its file and line, so a failure points at the docs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# An inline code span is a command when its first word is one of these programs.
PROGRAMS = (
    "python",
    "python3",
    ".venv/bin/python",
    ".venv/bin/pip",
    ".venv/bin/tensorboard",
    ".venv/bin/mkdocs",
    "make",
    "bash",
    "pip",
    "tensorboard",
    "huggingface-cli",
)
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


@dataclass(frozen=True)
class Snippet:
    """One runnable thing from the docs: `kind` "python" (a block) or "shell" (one command)."""

    path: str
    line: int
    kind: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _shell_commands(path: str, first_line: int, body: list[str]) -> list[Snippet]:
    out, pending, start = [], "", first_line
    for offset, raw in enumerate(body):
        line = raw.rstrip()
        if not pending:
            start = first_line + offset
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text = (pending + line.strip()).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append(Snippet(path, start, "shell", text))
    return out


def _paragraphs(indices: list[int]) -> list[list[int]]:
    paras: list[list[int]] = []
    for i in indices:
        if paras and paras[-1][-1] == i - 1:
            paras[-1].append(i)
        else:
            paras.append([i])
    return paras


def _inline_commands(rel: str, lines: list[str], prose: list[int]) -> list[Snippet]:
    """Command-like inline spans in the prose lines (a span may wrap onto the next line)."""
    out = []
    for para in _paragraphs(prose):
        text = "\n".join(lines[i] for i in para)
        for m in _INLINE.finditer(text):
            span = " ".join(m.group(1).split())
            if " " in span and span.split(" ", 1)[0] in PROGRAMS:
                line = para[0] + text.count("\n", 0, m.start()) + 1
                out.append(Snippet(rel, line, "shell", span))
    return out


def snippets(path: Path, root: Path) -> list[Snippet]:
    """Every fenced block and command-like inline span of the Markdown file `path`.

    Fenced blocks: `python` runs as Python; `bash`, `sh`, `shell` or no label hold shell
    commands; other labels (`text`, `json`, ...) are not run.
    """
    rel = str(path.relative_to(root))
    lines = path.read_text().splitlines()
    found: list[Snippet] = []
    prose: list[int] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            if lines[i].strip() and not lines[i].lstrip().startswith("|"):  # tables: results
                prose.append(i)
            i += 1
            continue
        lang, start = m.group(2).lower(), i + 1
        end = next(j for j in range(start, len(lines)) if _FENCE.match(lines[j]))
        body = lines[start:end]
        if lang == "python":
            found.append(Snippet(rel, start + 1, "python", "\n".join(body)))
        elif lang in ("", "bash", "sh", "shell"):
            found += _shell_commands(rel, start + 1, body)
        i = end + 1
    found += _inline_commands(rel, lines, prose)
    return sorted(found, key=lambda s: s.line)
