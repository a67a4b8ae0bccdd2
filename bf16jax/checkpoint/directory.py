"""The checkpoint directory: what may be in it, and the quarantine for what must not be used.

A bf16jax checkpoint directory holds Orbax step directories (`<step>/`, committed once they have
`commit_success.txt`), Orbax temporaries of saves in flight (`<step>.orbax-checkpoint-tmp-*`)
and `.quarantine/`. Anything else makes it refused (nothing is changed). Step directories that
must not be resumed from (never committed, damaged, non-finite, a rolled-back branch) are moved
into `.quarantine/<name>.<why>` with a log line: never deleted, since it may be the only copy.
"""

from __future__ import annotations

import re

import jax
from etils import epath
from orbax.checkpoint import multihost

from bf16jax.checkpoint.integrity import listing

__all__ = ["COMMITTED", "QUARANTINE", "check_directory", "unfinished", "set_aside"]

COMMITTED = "commit_success.txt"  # written by Orbax when a step is finalized (all atomicity modes)
QUARANTINE = ".quarantine"
_TMP_STEP = re.compile(r"^\d+\..*tmp.*$")  # "<step>.orbax-checkpoint-tmp-<n>": unfinished save


def check_directory(path: epath.Path, create: bool, required_item: str) -> None:
    """Raises ValueError for a file, a missing directory (create=False), foreign entries, or a
    committed step without `required_item`; nothing is changed."""
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"Checkpoint directory {path} is a file: pass a directory (WORKDIR/checkpoints)."
        )
    if not path.exists():
        if not create:
            raise ValueError(f"Checkpoint directory {path} does not exist: check the path.")
        return
    names = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    junk = sorted(n for n in names if not (n.isdigit() or _TMP_STEP.match(n)))
    if junk:
        raise ValueError(
            f"{path} holds entries that are not checkpoint steps: {listing(junk)}. Refusing "
            "to use it (nothing was changed): pass an empty directory or one bf16jax wrote."
        )
    for name in names:
        step_dir = path / name
        if name.isdigit() and (step_dir / COMMITTED).exists():
            items = sorted(p.name for p in step_dir.iterdir())
            if required_item not in items:
                raise ValueError(
                    f"{step_dir} is not a bf16jax checkpoint (it has {items}, no "
                    f"'{required_item}' item): pass a directory this library wrote, or an empty "
                    "one."
                )


def unfinished(path: epath.Path) -> list[str]:
    """Names of step directories never committed and of Orbax temporaries in `path`.

    An interrupted save leaves one (a temporary, or on object stores a step directory without
    `commit_success.txt`); left in place, a rerun would fail when it reaches that step.
    """
    if not path.exists():
        return []
    names = sorted(p.name for p in path.iterdir())
    return [
        n
        for n in names
        if (n.isdigit() and not (path / n / COMMITTED).exists()) or _TMP_STEP.match(n)
    ]


def set_aside(path: epath.Path, name: str, why: str) -> epath.Path:
    """Moves `path/name` to `path/.quarantine/name.why[.n]` (on process 0); returns where to.

    Every process must call it: barriers around the move keep multi-host runs in step.
    """
    if jax.process_count() > 1:  # every process picks the same free name below
        multihost.sync_global_processes(f"bf16jax_before_set_aside_{name}_{why}")
    quarantine = path / QUARANTINE
    dest = quarantine / f"{name}.{why}"
    n = 1
    while dest.exists():
        n += 1
        dest = quarantine / f"{name}.{why}.{n}"
    if jax.process_index() == 0:
        quarantine.mkdir(parents=True, exist_ok=True)
        (path / name).rename(dest)
    if jax.process_count() > 1:
        multihost.sync_global_processes(f"bf16jax_set_aside_{name}_{why}")
    return dest
