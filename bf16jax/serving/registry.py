"""A registry of serving artifacts: versions, promotion through the gate, rollback.

Layout of a registry directory:

    registry.json        {"format", "active", "history", "versions": {name: record}, "rejected"}
    reference/           the FP32 reference artifact every candidate is gated against
    versions/v0001/ ...  one verified copy of each promoted artifact

`python -m bf16jax.registry --registry=DIR init --reference=ART_FP32`, then `promote
--artifact=ART` (runs `bf16jax.serving.gate` against the reference; only a passing artifact becomes
a
version and the active one), `list`, `rollback [--to=vNNNN]`. Invariants:

- atomic on a local file system: a version directory is copied under a temporary name and
  renamed into place (a killed writer's temporaries are removed by the next one, under the
  lock); `registry.json` is replaced with `os.replace` after an fsync; writers hold an
  exclusive `flock` on `.lock`, so concurrent promotes / rollbacks serialize;
- every version records its source: the artifact path it was promoted from, the manifest's
  sha256 (checked again whenever a server loads it), the run (workdir, step, git revision),
  its precision and the gate report's checks;
- only `init` creates a registry: promote / rollback on a directory that is not one refuse
  before creating anything;
- a failed gate changes nothing but the `rejected` log; rollback only activates versions that
  exist; the reference is never a version.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import uuid
from typing import Any

from bf16jax.serving import artifact as artifact_lib

__all__ = ["FORMAT", "Registry", "GateFailed"]

FORMAT = "bf16jax-registry/1"
_STATE = "registry.json"
_REFERENCE = "reference"
_VERSIONS = "versions"

log = logging.getLogger(__name__)


class GateFailed(RuntimeError):
    """A promotion the gate refused; `report` holds the gate's report."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    """A registry directory (see the module docstring). Reading needs no lock."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)

    # ----------------------------------------------------------------- state
    @property
    def state_path(self) -> str:
        return os.path.join(self.directory, _STATE)

    @property
    def reference_dir(self) -> str:
        return os.path.join(self.directory, _REFERENCE)

    def version_dir(self, name: str) -> str:
        return os.path.join(self.directory, _VERSIONS, name)

    def state(self) -> dict[str, Any]:
        """The current registry.json (a consistent snapshot: it is replaced atomically)."""
        if not os.path.isfile(self.state_path):
            raise ValueError(
                f"{self.directory} is not a registry (no {_STATE}): create it with "
                "`python -m bf16jax.registry --registry=DIR init --reference=ART_FP32`."
            )
        with open(self.state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("format") != FORMAT:
            raise ValueError(f"{self.state_path}: format {state.get('format')!r}, not {FORMAT}.")
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = f"{self.state_path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1, sort_keys=True, default=float)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        _fsync_dir(self.directory)

    @contextlib.contextmanager
    def _locked(self, create: bool = False):
        """The writers' exclusive lock. Only `init` (create=True) may create the directory: any
        other writer first checks that it is a registry, so nothing is made where it is not.
        Holding the lock, it removes the temporaries a killed writer left (`_clean_stale`)."""
        if not create:
            self.state()  # raises, naming the directory, before anything is created
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._clean_stale()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _clean_stale(self) -> list[str]:
        """Removes `.tmp-*` copies and `registry.json.tmp-*` files (call with the lock held: no
        writer is running, so each is what a killed promote / init left); returns them."""
        stale = []
        for where in (self.directory, os.path.join(self.directory, _VERSIONS)):
            if not os.path.isdir(where):
                continue
            for name in sorted(os.listdir(where)):
                if name.startswith(".tmp-") or name.startswith(f"{_STATE}.tmp-"):
                    path = os.path.join(where, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
                    stale.append(path)
        for path in stale:
            log.warning("Registry: removed %s, left by an interrupted write.", path)
        return stale

    def _copy_in(self, source: str, dest: str) -> str:
        """Verifies `source` and copies it to `dest` atomically; returns the manifest digest."""
        artifact_lib.verify(source)
        digest = artifact_lib.sha256_file(os.path.join(source, artifact_lib.MANIFEST))
        tmp = os.path.join(os.path.dirname(dest), f".tmp-{uuid.uuid4().hex[:8]}")
        shutil.copytree(source, tmp)
        try:
            artifact_lib.verify(tmp, digest)  # the copy is what was verified
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(os.path.dirname(dest))
        return digest

    # ----------------------------------------------------------------- operations
    def init(self, reference: str) -> dict[str, Any]:
        """Creates the registry with `reference` (an fp32 artifact) as the gate's reference."""
        with self._locked(create=True):
            if os.path.exists(self.state_path):
                raise ValueError(f"{self.directory} is already a registry: nothing changed.")
            manifest = artifact_lib.verify(reference)
            if manifest["precision"] != "fp32":
                raise ValueError(
                    f"The reference must be an fp32 export; {reference} is "
                    f"{manifest['precision']}: export the run with --precision=fp32."
                )
            os.makedirs(os.path.join(self.directory, _VERSIONS), exist_ok=True)
            digest = self._copy_in(reference, self.reference_dir)
            state = {
                "format": FORMAT,
                "created": _now(),
                "reference": {
                    "from": os.path.abspath(reference),
                    "manifest_sha256": digest,
                    "source": manifest["source"],
                },  # fmt: skip
                "active": None,
                "history": [],
                "versions": {},
                "rejected": [],
            }
            self._write_state(state)
            return state

    def promote(self, artifact: str, gate_fn, **gate_kwargs) -> tuple[str, dict[str, Any]]:
        """Gates `artifact` against the reference; if it passes, adds it and activates it.

        Args:
          artifact: the candidate directory.
          gate_fn: (candidate_dir, reference_dir, **gate_kwargs) -> gate report
            (`bf16jax.serving.gate.gate` on two Scorers; injected so this module needs no JAX).

        Returns:
          (version name, gate report).

        Raises:
          GateFailed: the gate refused it (recorded under "rejected"; nothing else changes).
        """
        with self._locked():
            state = self.state()
            manifest = artifact_lib.verify(artifact)
            artifact_lib.verify(self.reference_dir, state["reference"]["manifest_sha256"])
            report = gate_fn(artifact, self.reference_dir, **gate_kwargs)
            checks = {c["check"]: c for c in report["checks"]}
            if not report["passed"]:
                failed = [c for c in report["checks"] if not c["passed"]]
                state["rejected"].append({"artifact": os.path.abspath(artifact), "at": _now(),
                                          "failed": failed})  # fmt: skip
                self._write_state(state)
                names = ", ".join(f"{c['check']}={c['value']:.4g}" for c in failed)
                raise GateFailed(f"The gate refused {artifact}: {names}.", report)
            name = f"v{len(state['versions']) + 1:04d}"
            while name in state["versions"] or os.path.exists(self.version_dir(name)):
                name = f"v{int(name[1:]) + 1:04d}"
            digest = self._copy_in(artifact, self.version_dir(name))
            state["versions"][name] = {
                "from": os.path.abspath(artifact),
                "manifest_sha256": digest,
                "precision": manifest["precision"],
                "family": manifest["family"],
                "source": manifest["source"],
                "git_revision": manifest["git_revision"],
                "promoted": _now(),
                "gate": {
                    k: {"value": c["value"], "passed": c["passed"]} for k, c in checks.items()
                },
            }
            state["history"].append(name)
            state["active"] = name
            self._write_state(state)
            return name, report

    def rollback(self, to: str | None = None) -> str:
        """Activates the version active before the current one, or version `to`."""
        with self._locked():
            state = self.state()
            if to is not None:
                if to not in state["versions"]:
                    raise ValueError(f"Unknown version {to!r}: the registry has "
                                     f"{sorted(state['versions']) or 'none'}.")  # fmt: skip
                state["history"].append(to)
            else:
                if len(state["history"]) < 2:
                    raise ValueError("Nothing to roll back to: fewer than two activations.")
                state["history"].pop()
            state["active"] = state["history"][-1]
            self._write_state(state)
            return state["active"]

    def active(self) -> tuple[str, str, str] | None:
        """(name, directory, manifest sha256) of the active version, or None."""
        state = self.state()
        name = state["active"]
        if name is None:
            return None
        return name, self.version_dir(name), state["versions"][name]["manifest_sha256"]

    def resolve(self, name: str) -> tuple[str, str]:
        """(directory, manifest sha256) of version `name`; ValueError if unknown."""
        versions = self.state()["versions"]
        if name not in versions:
            raise ValueError(f"Unknown version {name!r}: known versions are {sorted(versions)}.")
        return self.version_dir(name), versions[name]["manifest_sha256"]

    def listing(self) -> list[dict[str, Any]]:
        """One row per version: name, active, precision, source, promoted, gate."""
        state = self.state()
        return [{"version": n, "active": n == state["active"], **rec}
                for n, rec in sorted(state["versions"].items())]  # fmt: skip
