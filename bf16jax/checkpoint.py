"""Checkpoints: an Orbax CheckpointManager holding the train state and the grain iterator state.

Each step directory has two items: `state` (any pytree of arrays, PRNG keys included) and `data`
(the grain iterator's position). Invariants: restore always goes through a target of sharded
`jax.ShapeDtypeStruct`s, so it lands on any mesh and casts floating leaves to the target dtype
(never integers or PRNG keys); a checkpoint is trusted only once Orbax committed it; the target
must match the checkpoint leaf for leaf (path, shape, dtype kind), else restore raises naming the
difference rather than silently re-initializing; nothing already on disk is overwritten, and a
directory that holds anything else is refused.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bf16jax.precision import Policy

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)

_STATE, _DATA = "state", "data"
_COMMITTED = "commit_success.txt"  # written by Orbax when a step is finalized (all atomicity modes)
_TMP_STEP = re.compile(r"^\d+\..*tmp.*$")  # "<step>.orbax-checkpoint-tmp-<n>": unfinished save
_SHOW = 5  # how many offending paths an error message lists


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path: tuple) -> str:
    return "/".join(_key_name(k) for k in path)


def _listing(paths: list[str]) -> str:
    more = f" (+{len(paths) - _SHOW} more)" if len(paths) > _SHOW else ""
    return ", ".join(paths[:_SHOW]) + more


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


class Checkpointer:
    """Saves and restores (state, data iterator) per step; see the module docstring.

    Typical use in a trainer:

        ckpt = Checkpointer.from_config(config.checkpoint, f"{workdir}/checkpoints")
        state, step = ckpt.restore_or_init(abstract, lambda: create_sharded(init, abstract), it)
        ...
        ckpt.save(step, state, it)          # every `save_interval_steps`; force=True at the end
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
    ):
        """Opens (or creates) a checkpoint directory.

        Args:
          directory: local path or a URL Orbax understands (gs://...).
          max_to_keep: newest checkpoints kept; older ones are deleted after a save. None = all.
          save_interval_steps: `save` writes only steps divisible by it (0 = only when forced).
          async_save: write in a background thread; `wait()` blocks until written.
          create: create `directory` if missing; if False a missing directory is an error.

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
        self._check_directory(create)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=create
        )
        # PyTree (not Standard) handler for `state`: same on-disk format as StandardSave, and its
        # restore accepts `ocp.PLACEHOLDER` leaves, which partial restores need.
        handlers = {
            _STATE: ocp.PyTreeCheckpointHandler(),
            _DATA: grain.checkpoint.CheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    @classmethod
    def from_config(cls, ckpt_cfg: Any, directory: str | epath.PathLike) -> Checkpointer:
        """From `config.checkpoint` (every_steps, max_to_keep, async_save)."""
        return cls(
            directory,
            max_to_keep=ckpt_cfg.max_to_keep,
            save_interval_steps=ckpt_cfg.every_steps,
            async_save=ckpt_cfg.async_save,
        )

    # ------------------------------------------------------------------------- directory
    def _check_directory(self, create: bool) -> None:
        path = self.directory
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
                f"{path} holds entries that are not checkpoint steps: {_listing(junk)}. Refusing "
                "to use it (nothing was changed): pass an empty directory or one bf16jax wrote."
            )
        for name in names:
            step_dir = path / name
            if name.isdigit() and (step_dir / _COMMITTED).exists():
                items = sorted(p.name for p in step_dir.iterdir())
                if _STATE not in items:
                    raise ValueError(
                        f"{step_dir} is not a bf16jax checkpoint (it has {items}, no '{_STATE}' "
                        "item): pass a directory this library wrote, or an empty one."
                    )

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        """Steps with a committed checkpoint, ascending; unfinished saves are left out."""
        return sorted(
            s for s in self._manager.all_steps() if (self._step_dir(s) / _COMMITTED).exists()
        )

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------------- save
    def should_save(self, step: int) -> bool:
        """True on multiples of `save_interval_steps` and when a preemption was signalled."""
        periodic = self.save_interval_steps > 0 and step % self.save_interval_steps == 0
        return periodic or self.reached_preemption(step)

    def reached_preemption(self, step: int) -> bool:
        """True once the host got a preemption notice (SIGTERM on a TPU VM / under
        jax.distributed), agreed on by every process at this step: save now and stop."""
        return bool(self._manager.reached_preemption(step))

    def save(
        self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False
    ) -> bool:
        """Saves `state` (and the grain iterator's position) as `step`, asynchronously if enabled.

        The iterator's state is captured before this returns, so the caller may advance it.

        Args:
          step: the step number; the state should be the one *after* `step` updates.
          state: a pytree of arrays (jax.Array, PRNG keys, numpy).
          data_iterator: a grain iterator (`iter(dataset.to_iter_dataset())` or DataLoader's).
          force: save even if `should_save(step)` is False.

        Returns:
          True if a save was started; False if skipped (not due, or `step` already saved).

        Raises:
          ValueError: if an unfinished directory for `step` is in the way.
        """
        if not (force or self.should_save(step)):
            return False
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
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- restore
    def _saved_leaves(self, step: int) -> tuple[Any, dict[str, Any]]:
        metadata = self._manager.item_metadata(step)
        tree = metadata.get(_STATE) if metadata is not None else None
        tree = getattr(tree, "tree", tree)
        if tree is None:
            raise ValueError(f"{self._step_dir(step)} has no readable '{_STATE}' item.")
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return tree, {_path_str(p): m for p, m in flat}

    def _check_target(self, step: int, saved: dict, wanted: dict, partial: bool) -> None:
        where = f"checkpoint step {step} in {self.directory}"
        missing = [p for p in wanted if p not in saved]
        unexpected = [] if partial else [p for p in saved if p not in wanted]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"target leaves missing from the checkpoint: {_listing(missing)}")
            if unexpected:
                parts.append(f"checkpoint leaves not in the target: {_listing(unexpected)}")
            raise ValueError(
                f"The {where} does not match the target state ({'; '.join(parts)}). It was "
                "probably written by a run with another model/optimizer config: use a fresh "
                "checkpoint directory, or restore a subset with partial=True."
            )
        for path, leaf in wanted.items():
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(
                    f"Restore target leaf {path!r} has no sharding: build the target with "
                    "bf16jax.sharding.abstract_state(...) (ShapeDtypeStructs with shardings)."
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
        """Restores `step` into the structure, shardings and dtypes of `target`.

        Args:
          step: a committed step (see `all_steps()`).
          target: pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, e.g.
            `bf16jax.sharding.abstract_state(init, mesh, rules)` — on any mesh. Float leaves are
            cast to the target's dtype (FP32 master weights -> BF16 params); integer leaves and
            PRNG keys must match the checkpoint and are never cast.
          data_iterator: grain iterator to rewind to the saved position (in place).
          dtype: optional override: a float dtype or a Policy (its param_dtype) for every float
            leaf of `target`.
          partial: restore only the leaves in `target` (e.g. `{"params": ...}` for inference),
            ignoring the rest of the checkpoint.

        Returns:
          The restored state, structured like `target`.

        Raises:
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
        wanted = {_path_str(p): leaf for p, leaf in flat}
        saved_tree, saved = self._saved_leaves(step)
        self._check_target(step, saved, wanted, partial)

        def target_for(path, _):
            return wanted.get(_path_str(path), ocp.PLACEHOLDER)

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
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))[_STATE]
        by_path = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
        return treedef.unflatten([by_path[_path_str(p)] for p, _ in flat])

    def restore_or_init(
        self, target: Any, init_fn: Callable[[], Any], data_iterator: Any = None
    ) -> tuple[Any, int]:
        """Resumes from the newest committed checkpoint, or calls `init_fn()` if there is none.

        A checkpoint that does not match `target` raises (see `restore`) instead of being
        silently replaced by a fresh init.

        Returns:
          (state, step): the restored state and its step, or `(init_fn(), 0)`.
        """
        step = self.latest_step()
        if step is None:
            pending = self._manager.all_steps()
            if pending:
                log.warning(
                    "Ignoring uncommitted checkpoint steps %s in %s.", pending, self.directory
                )
            return init_fn(), 0
        log.info("Restoring checkpoint step %d from %s.", step, self.directory)
        return self.restore(step, target, data_iterator), step
