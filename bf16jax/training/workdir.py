"""The run directory: checks made before anything is written, and the resolved-config record.

Layout: `WORKDIR/config.json` (the resolved config of the run's latest start, written by process
0 once the start-up checks passed), `checkpoints/` (`bf16jax.checkpoint.manager`), `metrics.jsonl`
and
`tb/` (`bf16jax.training.metrics.MetricWriter`). On resume the new config is compared with
config.json:
a change that alters the meaning of the saved state (`bf16jax.config.resume_changes`) is refused
with the diff unless `checkpoint.allow_config_change` names it; other changes are logged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from typing import Any

import jax

from bf16jax import config as config_lib

__all__ = [
    "CONFIG_FILE",
    "check_workdir",
    "check_config_change",
    "write_config",
    "read_config",
    "dataset_record",
    "trained_data",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


def _is_url(path: str) -> bool:
    return "://" in path


def check_workdir(workdir: str) -> None:
    """Refuses a workdir that is empty, not UTF-8, a file or cannot be written (before anything
    is written)."""
    if not workdir:
        raise ValueError("--workdir is empty: pass a directory (it is created), e.g. runs/NAME.")
    try:
        os.path.abspath(workdir).encode("utf-8")
    except UnicodeEncodeError:
        # why: Orbax / TensorStore paths are UTF-8; such a run would crash at its first save.
        shown = os.path.abspath(workdir).encode("utf-8", "backslashreplace").decode()
        raise ValueError(
            f"--workdir={shown} is not valid UTF-8 (checkpoint paths must be): rename it, or "
            "pass another --workdir."
        ) from None
    if _is_url(workdir):
        return  # object stores: permissions show at the first write
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file: pass a directory (it is created).")
    probe = os.path.abspath(workdir)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"--workdir={workdir}: {probe} is a file, so it cannot be created.")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        why = "read-only file system" if e.errno == errno.EROFS else e.strerror or str(e)
        raise ValueError(
            f"--workdir={workdir} cannot be written ({probe}: {why}): pass a writable directory."
        ) from None


def _config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def _read_saved(workdir: str) -> dict | None:
    path = _config_path(workdir)
    if _is_url(workdir):
        from etils import epath

        p = epath.Path(path)
        return json.loads(p.read_text()) if p.exists() else None
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} cannot be read ({e}): restore it from the run's launch command, or delete "
            "it to resume without checking the config."
        ) from None


def _show(value: Any) -> str:
    return json.dumps(value)


def check_config_change(config, workdir: str, resuming: bool) -> None:
    """Compares `config` with the one the checkpoints were written under.

    Args:
      config: the new run's config.
      workdir: the run directory.
      resuming: whether `workdir` holds a committed checkpoint (else there is nothing to keep
        consistent with, and nothing is checked).

    Raises:
      ValueError: a change that alters the meaning of the saved state, not allowed by
        `checkpoint.allow_config_change`; one line with the diff and the three ways out.
    """
    if not resuming:
        return
    saved = _read_saved(workdir)
    if saved is None:
        log.warning(
            "%s has checkpoints but no %s (written by an older bf16jax): the config "
            "cannot be compared with theirs.",
            workdir,
            CONFIG_FILE,
        )
        return
    _check_dataset(saved, config, workdir)
    changes = config_lib.resume_changes(config_lib.flatten(saved), config)
    allowed = config_lib.allowed_changes(config)
    refused = [c for c in changes["state"] if not config_lib.is_allowed(c[0], allowed)]
    diff = "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in refused)
    if refused:
        keys = ",".join(k for k, _, _ in refused)
        raise ValueError(
            f"resuming {workdir} with a config that changes the meaning of its checkpoint: "
            f"{diff}. Rerun with the config it was saved with ({_config_path(workdir)}), pass a "
            f"new --workdir, or convert the saved state with "
            f"--config.checkpoint.allow_config_change={keys}."
        )
    for key, old, new in changes["state"]:
        log.warning(
            "Config change allowed by checkpoint.allow_config_change: %s %s -> %s "
            "(the saved state is converted on restore).",
            key,
            _show(old),
            _show(new),
        )
    for key, old, new in changes["trajectory"]:
        log.warning(
            "Config change on resume: %s %s -> %s (training continues differently "
            "from the run that wrote the checkpoint).",
            key,
            _show(old),
            _show(new),
        )
    for key, old, new in changes["harmless"]:
        log.info("Config change on resume: %s %s -> %s.", key, _show(old), _show(new))


def dataset_record(config) -> list[dict] | None:
    """The prepared dataset(s) a run reads (path, metadata hash, tokenizer, weight), or None."""
    if config.data.get("name") != "prepared":
        return None
    from bf16jax.data import mixture

    return mixture.prepared_record(config.data)


def trained_data(workdir: str) -> dict | None:
    """The `bf16jax.data.provenance` record of the data the run in `workdir` trained on (from
    its config.json; None when it has none)."""
    from bf16jax.data import provenance

    return provenance.describe_saved(_read_saved(workdir))


def _check_dataset(saved: dict, config, workdir: str) -> None:
    """Refuses a resume on a prepared dataset whose metadata changed (same path, new corpus)."""
    old, new = saved.get("dataset"), dataset_record(config)
    if old is None or new is None:
        return
    before = [(d["path"], d["meta_sha256"], d["weight"]) for d in old]
    after = [(d["path"], d["meta_sha256"], d["weight"]) for d in new]
    if before != after and not config_lib.is_allowed("data", config_lib.allowed_changes(config)):
        raise ValueError(
            f"resuming {workdir} on a prepared dataset that changed since its checkpoints were "
            f"written ({before} -> {after}): the data position would mean other documents. "
            "Restore the dataset, pass a new --workdir, or allow it with "
            "--config.checkpoint.allow_config_change=data."
        )


def write_config(config, workdir: str) -> None:
    """Writes the resolved `config` to WORKDIR/config.json (process 0; atomic on local disks),
    with the prepared dataset's record under "dataset" (`dataset_record`)."""
    if jax.process_index() != 0:
        return
    tree = config.to_dict()
    record = dataset_record(config)
    if record is not None:
        tree["dataset"] = record
    text = json.dumps(tree, indent=1, sort_keys=True, default=str) + "\n"
    path = _config_path(workdir)
    if _is_url(workdir):
        from etils import epath

        epath.Path(path).write_text(text)
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_config(workdir: str):
    """The resolved config a run in `workdir` started with (its config.json), locked.

    Raises:
      ValueError: `workdir` has no config.json, or it cannot be read.
    """
    import ml_collections

    saved = _read_saved(workdir)
    if saved is None:
        raise ValueError(
            f"{_config_path(workdir)} not found: pass the --workdir of a training run, or "
            "--config=configs/NAME.py with the run's overrides."
        )
    mesh = saved.get("mesh")
    if isinstance(mesh, dict) and isinstance(mesh.get("rules"), list):  # JSON has no tuples
        mesh["rules"] = tuple(tuple(r) for r in mesh["rules"])
    config = ml_collections.ConfigDict(saved)
    config.lock()
    return config
