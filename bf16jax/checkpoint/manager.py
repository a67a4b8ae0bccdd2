"""Checkpoints: an Orbax CheckpointManager holding the train state, the data position and checksums.

Each step directory has three items: `state` (any pytree of arrays, PRNG keys included), `data`
(each process's grain iterator position) and `manifest` (per-leaf checksums, finiteness and the
data files' CRCs, `bf16jax.checkpoint.integrity`), committed together by Orbax. Invariants:
- restore goes through a target of sharded `jax.ShapeDtypeStruct`s, so it lands on any mesh; it
  reads the stored dtypes, verifies every leaf against the manifest, then casts floating leaves
  to the target's dtype (never integers or PRNG keys);
- a checkpoint is trusted only once Orbax committed it and it verifies (a missing or malformed
  manifest is damage: every checkpoint is saved with one); `restore_or_init` falls
  back from a damaged or non-finite newest checkpoint to the newest one that verifies, loudly,
  and moves the bad one to `<dir>/.quarantine/` (it is never deleted);
- retention (`max_to_keep`) never deletes the newest verified, healthy checkpoint, whatever newer
  ones exist; a save is verified by reading it back (`verify_saves`) once Orbax committed it;
- the target must match the checkpoint leaf for leaf (path, shape, dtype kind), else restore
  raises naming the difference rather than silently re-initializing; nothing on disk is
  overwritten; a directory that holds anything else is refused; uncommitted step directories and
  stale Orbax temporaries are moved to the quarantine at start-up (`restore_or_init`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bf16jax.checkpoint import directory as checkpoint_dir
from bf16jax.checkpoint import integrity
from bf16jax.checkpoint.integrity import CheckpointDamaged, first_line
from bf16jax.precision import Policy

__all__ = ["Checkpointer", "CheckpointDamaged", "QUARANTINE"]

log = logging.getLogger(__name__)

_STATE, _DATA, _MANIFEST = "state", "data", "manifest"
_COMMITTED = checkpoint_dir.COMMITTED
QUARANTINE = checkpoint_dir.QUARANTINE


def _is_key(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _is_float(dtype: Any) -> bool:
    return not _is_key(dtype) and jnp.issubdtype(dtype, jnp.floating)


def _stored_shape(leaf: jax.ShapeDtypeStruct) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a target leaf has on disk: typed PRNG keys are stored as their key data."""
    if _is_key(leaf.dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _cast_target(target: Any, dtype: Any) -> Any:
    if dtype is None:
        return target
    dtype = np.dtype(dtype.param_dtype if isinstance(dtype, Policy) else dtype)
    if not _is_float(dtype):
        raise ValueError(f"restore dtype={dtype} is not a float dtype: use e.g. jnp.bfloat16.")

    def cast(x):
        if isinstance(x, jax.ShapeDtypeStruct) and _is_float(x.dtype):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x

    return jax.tree.map(cast, target)


class _Position:
    """A data position frozen as text; grain's checkpoint handler writes `get_state()` as is."""

    def __init__(self, text: str):
        self.text = text

    def get_state(self) -> bytes:
        return self.text.encode()


class Checkpointer:
    """Saves and restores (state, data position) per step, verified; see the module docstring.

    Typical use in a trainer:

        ckpt = Checkpointer.from_config(config.checkpoint, f"{workdir}/checkpoints")
        state, step = ckpt.restore_or_init(abstract, lambda: create_sharded(init, abstract), it)
        ...
        ckpt.save(step, state, it.get_state())  # every `save_interval_steps`; force=True at end
        ckpt.close()
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        max_to_keep: int | None = 2,
        save_interval_steps: int = 1,
        async_save: bool = True,
        create: bool = True,
        verify_saves: bool = True,
    ):
        """Opens (or creates) a checkpoint directory.

        Args:
          directory: local path or a URL Orbax understands (gs://...).
          max_to_keep: newest checkpoints kept (plus the newest verified healthy one, if older);
            older ones are deleted after a save. None = all.
          save_interval_steps: `save` writes only steps divisible by it (0 = only when forced).
          async_save: write in a background thread; `wait()` blocks until written.
          create: create `directory` if missing; if False a missing directory is an error.
          verify_saves: once a save has committed, read it back (host memory, this process's
            share of the leaves) and check it against its manifest before retention may delete
            an older checkpoint in its favour. Costs one read of each checkpoint.

        Raises:
          ValueError: if `directory` is a file, missing (with create=False), or holds anything
            but Orbax step directories of bf16jax checkpoints.
        """
        if "://" not in str(directory):
            # Orbax's OCDBT store rejects relative paths ("runs/x" from the command line).
            directory = os.path.abspath(os.fspath(directory))
        self.directory = epath.Path(directory)
        self.save_interval_steps = save_interval_steps
        if save_interval_steps < 0:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 0.")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None: keep all).")
        self.max_to_keep = max_to_keep
        self.verify_saves = verify_saves
        self._check_directory(create)
        # Deletion is ours (`_apply_retention`): Orbax's max_to_keep would count damaged ones.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=async_save, create=create
        )
        # PyTree (not Standard) handler for `state`: same on-disk format as StandardSave, and its
        # restore accepts `ocp.PLACEHOLDER` leaves, which partial restores need.
        handlers = {
            _STATE: ocp.PyTreeCheckpointHandler(),
            _DATA: grain.checkpoint.CheckpointHandler(),
            _MANIFEST: ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._good: set[int] = set()  # verified (read back or restored), finite and healthy
        self._pending: tuple[int, dict] | None = None  # a save not yet settled, its manifest
        self._interrupted = False  # a wait for a save was interrupted (KeyboardInterrupt)

    @classmethod
    def from_config(cls, ckpt_cfg: Any, directory: str | epath.PathLike) -> Checkpointer:
        """From `config.checkpoint` (every_steps, max_to_keep, async_save, verify_saves)."""
        return cls(
            directory,
            max_to_keep=ckpt_cfg.max_to_keep,
            save_interval_steps=ckpt_cfg.every_steps,
            async_save=ckpt_cfg.async_save,
            verify_saves=ckpt_cfg.get("verify_saves", True),
        )

    # ------------------------------------------------------------------------- directory
    def _check_directory(self, create: bool) -> None:
        checkpoint_dir.check_directory(self.directory, create, required_item=_STATE)

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _set_aside(self, name: str, why: str) -> epath.Path:
        return checkpoint_dir.set_aside(self.directory, name, why)

    def set_aside_unfinished(self) -> list[str]:
        """Moves uncommitted step directories and stale Orbax temporaries to the quarantine
        (`checkpoint_dir.unfinished`); returns the names moved (each is logged)."""
        moved = []
        for name in checkpoint_dir.unfinished(self.directory):
            dest = self._set_aside(name, "unfinished")
            log.warning(
                "Checkpoint directory %s was never committed (an interrupted save): moved to "
                "%s. Delete it once you no longer need it.",
                self.directory / name,
                dest,
            )
            moved.append(name)
        if moved:
            self._manager.reload()
        return moved

    def all_steps(self) -> list[int]:
        """Steps with a committed checkpoint, ascending; unfinished saves are left out."""
        return sorted(
            s for s in self._manager.all_steps() if (self._step_dir(s) / _COMMITTED).exists()
        )

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def manifest(self, step: int) -> dict:
        """The checksums manifest of `step`, checked field by field (`integrity.read_manifest`).

        Raises:
          CheckpointDamaged: the manifest is missing (every checkpoint this library writes has
            one, committed with the arrays), cannot be read, or lacks a field.
        """
        return integrity.read_manifest(step, self._step_dir(step) / _MANIFEST)

    # ------------------------------------------------------------------------- save
    def should_save(self, step: int) -> bool:
        """True on multiples of `save_interval_steps`."""
        return self.save_interval_steps > 0 and step % self.save_interval_steps == 0

    def save(
        self,
        step: int,
        state: Any,
        data_position: Any = None,
        *,
        force: bool = False,
        healthy: bool = True,
    ) -> bool:
        """Saves `state`, the data position and their manifest as `step` (async if enabled).

        Args:
          step: the step number; the state should be the one *after* `step` updates.
          state: a pytree of arrays (jax.Array, PRNG keys, numpy).
          data_position: where the data resumes: a grain iterator (its current position is
            taken now) or a position captured earlier with `iterator.get_state()` — e.g. before
            a batch was fetched ahead of the step that consumes it.
          force: save even if `should_save(step)` is False.
          healthy: False marks a checkpoint saved while steps are being skipped (non-finite):
            retention and rollback never take it as the last good one.

        Returns:
          True if a save was started; False if skipped (not due, or `step` already saved).

        Raises:
          ValueError: if an unfinished directory for `step` is in the way.
        """
        if not (force or self.should_save(step)):
            return False
        self._settle()
        if step in self._manager.all_steps():
            if (self._step_dir(step) / _COMMITTED).exists():
                log.info(
                    "Checkpoint step %d already exists in %s: not overwritten.",
                    step,
                    self.directory,
                )
                return False
            raise ValueError(
                f"{self._step_dir(step)} exists but was never committed (an interrupted save?): "
                "move it away before saving this step again."
            )
        items = {_STATE: ocp.args.PyTreeSave(state)}
        crcs = None
        if data_position is not None:
            if hasattr(data_position, "get_state"):
                data_position = data_position.get_state()
            text = integrity.position_text(data_position)
            items[_DATA] = grain.checkpoint.CheckpointSave(_Position(text))
            crcs = integrity.data_crcs(text)
        manifest = integrity.build_manifest(step, state, crcs, {"healthy": bool(healthy)})
        items[_MANIFEST] = ocp.args.JsonSave(manifest)
        started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        if started:
            self._pending = (step, manifest)
        return started

    def _settle(self) -> None:
        """Waits for the pending save, verifies it (`verify_saves`), applies retention."""
        try:
            self._manager.wait_until_finished()
        except BaseException:
            # A second SIGINT in the wait: Orbax's thread goes on writing, and a later wait may
            # return before it commits. That save is unsettled, not failed.
            self._interrupted = True
            raise
        if self._pending is None:
            return
        step, manifest = self._pending
        self._pending = None
        if not (self._step_dir(step) / _COMMITTED).exists():
            if self._interrupted:
                log.warning(
                    "Checkpoint step %d in %s was still being written when interrupted: not "
                    "verified now. The next run verifies it (resumes from it once committed, "
                    "else sets it aside as unfinished).",
                    step,
                    self.directory,
                )
                return
            log.error("Checkpoint step %d in %s did not commit.", step, self.directory)
            return
        reason = ""
        if self.verify_saves:
            try:
                self._read_back(step, manifest)
            except CheckpointDamaged as e:
                reason = e.reason
            if not integrity.all_processes_agree(not reason):
                dest = self._set_aside(str(step), "damaged")
                self._manager.reload()
                log.error(
                    "Checkpoint step %d did not read back as saved (%s): moved to %s. The "
                    "storage under %s may be failing; older checkpoints are kept.",
                    step,
                    reason or "on another process",
                    dest,
                    self.directory,
                )
                return
        if manifest["finite"] and manifest.get("healthy", True):
            self._good.add(step)
        self._apply_retention()

    def _read_back(self, step: int, manifest: dict) -> None:
        """Reads this process's share of `step`'s leaves into host memory and checks them."""
        where = self._step_dir(step)
        names = sorted(manifest["leaves"])
        mine = set(names[jax.process_index() :: jax.process_count()])
        try:
            tree, _ = self._saved_leaves(step)
            wanted = jax.tree_util.tree_map_with_path(
                lambda p, _: integrity.leaf_path(p) in mine, tree
            )
            args = jax.tree.map(
                lambda w: ocp.RestoreArgs(restore_type=np.ndarray) if w else ocp.PLACEHOLDER,
                wanted,
            )
            item = jax.tree.map(lambda w, m: m if w else ocp.PLACEHOLDER, wanted, tree)
            restore = ocp.args.PyTreeRestore(item=item, restore_args=args)
            got = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: restore}))
        except CheckpointDamaged:
            raise
        except Exception as e:  # noqa: BLE001 - a save that cannot be read back is damaged
            raise CheckpointDamaged(step, where, first_line(e)) from e
        host = {p: v for p, v in integrity.flat_leaves(got[_STATE]).items() if p in mine}
        integrity.verify_host(step, where, host, manifest)
        integrity.check_data_file(step, where, manifest)

    def _apply_retention(self) -> None:
        """Deletes committed steps beyond the newest `max_to_keep`, never the newest good one."""
        if self.max_to_keep is None:
            return
        steps = self.all_steps()
        keep = set(steps[-self.max_to_keep :])
        good = [s for s in steps if s in self._good]
        if good:
            keep.add(good[-1])
        for step in steps:
            if step not in keep:
                self._manager.delete(step)
                self._good.discard(step)

    def wait(self) -> None:
        """Blocks until every started save is on disk (and verified, see `verify_saves`)."""
        self._settle()

    def close(self) -> None:
        """Waits for pending saves (verifies them) and releases the manager."""
        try:
            self._settle()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- restore
    def _saved_leaves(self, step: int) -> tuple[Any, dict[str, Any]]:
        try:
            metadata = self._manager.item_metadata(step)
            tree = metadata.get(_STATE) if metadata is not None else None
        except Exception as e:  # noqa: BLE001 - unreadable metadata is damage
            raise CheckpointDamaged(step, self._step_dir(step), first_line(e)) from e
        tree = getattr(tree, "tree", tree)
        if tree is None:
            raise CheckpointDamaged(step, self._step_dir(step), f"no readable '{_STATE}' item")
        return tree, integrity.flat_leaves(tree)

    def _check_target(self, step: int, saved: dict, wanted: dict, partial: bool) -> None:
        where = f"checkpoint step {step} in {self.directory}"
        missing = [p for p in wanted if p not in saved]
        unexpected = [] if partial else [p for p in saved if p not in wanted]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(
                    f"target leaves missing from the checkpoint: {integrity.listing(missing)}"
                )
            if unexpected:
                parts.append(
                    f"checkpoint leaves not in the target: {integrity.listing(unexpected)}"
                )
            raise ValueError(
                f"The {where} does not match the target state ({'; '.join(parts)}). It was "
                "probably written by a run with another model/optimizer config (or an older "
                "bf16jax): use a fresh checkpoint directory, or restore a subset with "
                "partial=True."
            )
        for path, leaf in wanted.items():
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(
                    f"Restore target leaf {path!r} has no sharding: build the target with "
                    "bf16jax.parallel.sharding.abstract_state(...) (ShapeDtypeStructs with "
                    "shardings)."
                )
            shape, dtype = _stored_shape(leaf)
            meta = saved[path]
            if tuple(meta.shape) != shape:
                raise ValueError(
                    f"Leaf {path!r}: the {where} has shape {tuple(meta.shape)}, the target "
                    f"{tuple(leaf.shape)} ({leaf.dtype}): the configs differ; use a matching "
                    "config or a fresh checkpoint directory."
                )
            if np.dtype(meta.dtype) != dtype and not (_is_float(meta.dtype) and _is_float(dtype)):
                raise ValueError(
                    f"Leaf {path!r}: the {where} holds {meta.dtype}, the target asks for "
                    f"{leaf.dtype}; only float leaves may change dtype on restore."
                )

    def restore(
        self,
        step: int,
        target: Any,
        data_iterator: Any = None,
        *,
        dtype: Any = None,
        partial: bool = False,
    ) -> Any:
        """Restores `step` into the structure, shardings and dtypes of `target`, verified.

        Args:
          step: a committed step (see `all_steps()`).
          target: pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, e.g.
            `bf16jax.parallel.sharding.abstract_state(init, mesh, rules)` — on any mesh. Float
            leaves are
            cast to the target's dtype after verification (FP32 master weights -> BF16 params);
            integer leaves and PRNG keys must match the checkpoint and are never cast.
          data_iterator: grain iterator to rewind to the saved position (in place).
          dtype: optional override: a float dtype or a Policy (its param_dtype) for every float
            leaf of `target`.
          partial: restore only the leaves in `target` (e.g. `{"params": ...}` for inference),
            ignoring the rest of the checkpoint.

        Returns:
          The restored state, structured like `target`.

        Raises:
          CheckpointDamaged: the checkpoint cannot be read, or what it gives back differs from
            what was saved (its manifest's checksums); a ValueError.
          ValueError: for a missing step (listing the available ones), a target that differs from
            the checkpoint (naming the leaf paths, shapes or dtypes), or a missing data item.
        """
        steps = self.all_steps()
        if step not in steps:
            raise ValueError(
                f"No committed checkpoint for step {step} in {self.directory}; available steps: "
                f"{steps or 'none'}."
            )
        if partial and data_iterator is not None:
            raise ValueError("partial=True restores state only: pass data_iterator=None.")
        target = _cast_target(target, dtype)
        flat, treedef = jax.tree_util.tree_flatten_with_path(target)
        wanted = {integrity.leaf_path(p): leaf for p, leaf in flat}
        manifest = self.manifest(step)
        saved_tree, saved = self._saved_leaves(step)
        integrity.check_metadata(step, self._step_dir(step), saved, manifest)
        self._check_target(step, saved, wanted, partial)

        def stored(leaf, meta):  # read as saved; cast after verification
            if _is_key(leaf.dtype) or np.dtype(meta.dtype) == np.dtype(leaf.dtype):
                return leaf
            return jax.ShapeDtypeStruct(leaf.shape, meta.dtype, sharding=leaf.sharding)

        as_saved = {path: stored(leaf, saved[path]) for path, leaf in wanted.items()}

        def target_for(path, _):
            return as_saved.get(integrity.leaf_path(path), ocp.PLACEHOLDER)

        item = jax.tree_util.tree_map_with_path(target_for, saved_tree)
        restore_args = jax.tree.map(
            lambda x: x if x is ocp.PLACEHOLDER else ocp.checkpoint_utils.construct_restore_args(x),
            item,
        )
        items = {_STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args)}
        if data_iterator is not None:
            if not (self._step_dir(step) / _DATA).exists():
                raise ValueError(
                    f"{self._step_dir(step)} has no data-iterator state (saved without one): "
                    "pass data_iterator=None to restore the state only."
                )
            integrity.check_data_file(step, self._step_dir(step), manifest)
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))[_STATE]
        except Exception as e:  # noqa: BLE001 - the target was checked: a read failure is damage
            raise CheckpointDamaged(step, self._step_dir(step), first_line(e)) from e
        by_path = integrity.flat_leaves(restored)
        integrity.check_read_back(step, self._step_dir(step), by_path, as_saved)
        mine = {p: by_path[p] for p in wanted}  # a partial restore leaves placeholders
        integrity.verify(step, self._step_dir(step), mine, manifest)
        leaves = []
        for p, leaf in flat:
            value = by_path[integrity.leaf_path(p)]
            leaves.append(value if value.dtype == leaf.dtype else value.astype(leaf.dtype))
        return treedef.unflatten(leaves)

    def restore_or_init(
        self, target: Any, init_fn: Callable[[], Any], data_iterator: Any = None
    ) -> tuple[Any, int]:
        """Resumes from the newest checkpoint that verifies, or calls `init_fn()` if there is none.

        Start-up housekeeping first: unfinished saves are moved to the quarantine. A damaged or
        non-finite newest checkpoint is reported (step, path, reason), moved to the quarantine,
        and the next older one is tried. A checkpoint that does not match `target` raises (see
        `restore`) instead of being silently replaced by a fresh init.

        Returns:
          (state, step): the restored state and its step, or `(init_fn(), 0)`.

        Raises:
          ValueError: no committed checkpoint verifies (nothing is moved then: the message says
            how to start over), or a checkpoint does not match `target`.
        """
        self.set_aside_unfinished()
        bad: list[CheckpointDamaged] = []
        for step in reversed(self.all_steps()):
            try:
                manifest = self.manifest(step)
                if not manifest["finite"]:
                    raise CheckpointDamaged(
                        step, self._step_dir(step), "it holds Inf/NaN values", kind="non-finite"
                    )
                log.info("Restoring checkpoint step %d from %s.", step, self.directory)
                state = self.restore(step, target, data_iterator)
            except CheckpointDamaged as e:
                log.error("%s.", e)
                bad.append(e)
                continue
            if manifest["finite"] and manifest.get("healthy", True):
                self._good.add(step)
            for e in bad:
                dest = self._set_aside(str(e.step), e.kind)
                log.error(
                    "Checkpoint step %d was %s (%s): moved to %s. Resumed from step %d, the "
                    "newest checkpoint that verifies.",
                    e.step,
                    e.kind,
                    e.reason,
                    dest,
                    step,
                )
            if bad:
                self._manager.reload()
            return state, step
        if bad:
            steps = ", ".join(f"{e.step} ({e.kind}: {e.reason})" for e in bad)
            raise ValueError(
                f"No checkpoint in {self.directory} verifies: step {steps}. Nothing was moved or "
                f"deleted. To start over from step 0, move them away (mv {self.directory} "
                f"{self.directory}.bad) or use a new --workdir."
            )
        return init_fn(), 0

    def set_aside_newer(self, step: int, why: str) -> list[int]:
        """Moves every committed step above `step` to the quarantine (a rollback's abandoned
        branch); returns the steps moved."""
        self._settle()
        moved = [s for s in self.all_steps() if s > step]
        for s in moved:
            dest = self._set_aside(str(s), why)
            self._good.discard(s)
            log.warning("Checkpoint step %d moved to %s (%s).", s, dest, why)
        if moved:
            self._manager.reload()
        return moved

    def newest_good(self, before: int | None = None) -> int | None:
        """The newest step verified in this process's lifetime (finite, healthy), below `before`."""
        good = [s for s in sorted(self._good) if before is None or s < before]
        return good[-1] if good else None
