"""Checksums of what a checkpoint stores, and the manifest that carries them.

A checkpoint's manifest records, per state leaf, its shape, dtype, whether it is finite and a
64-bit checksum of its bits; and the CRC32 of each process's data-iterator position file. It is
saved as one more item of the same Orbax checkpoint, so it commits atomically with the arrays.
Restoring recomputes the checksums of the restored arrays and compares: a flipped byte, a
truncated or deleted file that still decodes to other values, is caught.

The checksum of an array of words u_i (its elements' bits widened to uint32; 8-byte elements
give two words, typed PRNG keys their key data) is the pair, mod 2^32,
  h1 = sum_i (2i + 1) * u_i          (odd weights: changing any one word always changes h1)
  h2 = sum_i fmix32(u_i + i * 0x9E3779B9)   (MurmurHash3's finalizer: a non-linear companion)
Sums of unsigned integers wrap exactly, in any order, so the result does not depend on the
sharding, the mesh or the number of processes: an array saved from 8 devices and restored on
1 checks the same. `checksums` runs jitted on (sharded) device arrays; `host_checksum` is the
same arithmetic in NumPy, for host-side read-backs.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CheckpointDamaged",
    "MANIFEST_FORMAT",
    "check_manifest",
    "read_manifest",
    "check_metadata",
    "check_data_file",
    "check_read_back",
    "verify",
    "verify_host",
    "checksums",
    "host_checksum",
    "leaf_path",
    "flat_leaves",
    "build_manifest",
    "position_text",
    "data_crcs",
    "all_processes_agree",
    "text_crc",
]

MANIFEST_FORMAT = 1
_SHOW = 5  # how many offending leaves a message lists


class CheckpointDamaged(ValueError):
    """A committed checkpoint that cannot be read back as it was saved (or is not finite)."""

    def __init__(self, step: int, path: Any, reason: str, kind: str = "damaged"):
        super().__init__(f"checkpoint step {step} in {path} is {kind}: {reason}")
        self.step, self.path, self.reason, self.kind = step, path, reason, kind


def listing(paths: list[str]) -> str:
    more = f" (+{len(paths) - _SHOW} more)" if len(paths) > _SHOW else ""
    return ", ".join(paths[:_SHOW]) + more


def first_line(error: BaseException) -> str:
    """ "TypeName: first line of the message" (TensorStore errors run to dozens of lines)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


_GOLDEN = 0x9E3779B9
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_path(path: tuple) -> str:
    """A pytree key path as "params/blocks/0/kernel" (how checkpoints and manifests name leaves)."""
    return "/".join(_key_name(k) for k in path)


def flat_leaves(tree: Any) -> dict[str, Any]:
    """{leaf path: leaf} of a pytree, in flattening order."""
    return {leaf_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_key(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words in `x`'s shape: one word per element; 8-byte elements
    give two, on a trailing axis. Never raveled: a reshape of a sharded array can make XLA
    gather it (the one-program checksums of an FSDP-sharded state held 30 all-gathers)."""
    if _is_key(x.dtype):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, _UINT[size]).astype(jnp.uint32)


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's index in the row-major raveled array (mod 2^32), built from iotas."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _checksum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    u = _words(x)
    i = _flat_index(u.shape)
    h1 = jnp.sum((2 * i + 1) * u, dtype=jnp.uint32)
    h2 = jnp.sum(_fmix32(u + i * np.uint32(_GOLDEN)), dtype=jnp.uint32)
    return h1, h2


def _finite(x: jax.Array) -> jax.Array:
    if _is_key(x.dtype) or not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.asarray(True)
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _leaf_summary(x: jax.Array):
    """(h1, h2, finite) of one leaf. One small program per leaf shape, dtype and sharding, shared
    by all the leaves (and runs) that have them: one program over the whole train state of
    vit_digits under `fp32; q=w8a8` took 4.4 s to compile on CPU (XLA's CPU backend is
    superlinear in the number of kernels in a program); its 12 distinct leaves take 0.27 s."""
    return (*_checksum(x), _finite(x))


@jax.jit
def _tree_summary(leaves: list[jax.Array]):
    """([n] h1, [n] h2, [n] finite) of n leaves: `_leaf_summary` of each, in one program."""
    sums = [(*_checksum(x), _finite(x)) for x in leaves]
    return tuple(jnp.stack(column) for column in zip(*sums, strict=True))


def _hex(h1, h2) -> str:
    return f"{int(h1):08x}{int(h2):08x}"


def _batched(leaves: list) -> bool:
    """Whether `checksums` runs one program over all the leaves: off CPU. XLA:CPU runs one per
    leaf, each waited for: its compile time grows superlinearly with a program's kernels
    (gpt2_124m's 596 leaves: 7-11 s for one program vs 2-4 s for the per-leaf ones, and no
    faster warm), and the per-leaf programs cannot be left in flight together: on 8 fake
    devices their all-reduces wait on each other's rendezvous and the process aborts. One
    program over all the leaves does not hang there (tests/test_checkpoint.py runs it)."""
    devices = {d for x in leaves for d in x.sharding.device_set}
    return bool(devices) and all(d.platform != "cpu" for d in devices)


def checksums(tree: Any, *, batched: bool | None = None) -> dict[str, dict[str, Any]]:
    """{leaf path: {"checksum": 16 hex digits, "finite": bool}} of a pytree of jax Arrays.

    One jitted program over all the leaves, fetched once (`batched`; the default off CPU), or
    one program per leaf, each waited for (see `_batched`): the same digits either way. Every
    process gets the same answer for global arrays.
    """
    leaves = flat_leaves(tree)
    values = list(leaves.values())
    if batched is None:
        batched = _batched(values)
    if batched and values:
        h1, h2, ok = jax.device_get(_tree_summary(values))
        summary = list(zip(h1, h2, ok, strict=True))
    else:
        summary = [jax.block_until_ready(_leaf_summary(x)) for x in values]
        summary = jax.device_get(summary)
    return {
        path: {"checksum": _hex(h1, h2), "finite": bool(ok)}
        for path, (h1, h2, ok) in zip(leaves, summary, strict=True)
    }


def host_checksum(x: np.ndarray) -> str:
    """`checksums`' digest of one host array, computed in NumPy (same bits, same answer)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        u = x.reshape(-1).astype(np.uint32)
    elif x.dtype.itemsize == 8:
        u = x.reshape(-1).view(np.uint32)
    else:
        u = x.reshape(-1).view(_UINT[x.dtype.itemsize]).astype(np.uint32)
    i = np.arange(u.shape[0], dtype=np.uint32)
    with np.errstate(over="ignore"):
        h1 = np.sum((2 * i + 1) * u, dtype=np.uint32)
        h2 = np.sum(_fmix32(u + i * np.uint32(_GOLDEN)), dtype=np.uint32)
    return _hex(h1, h2)


def position_text(position: Any) -> str:
    """The text grain's checkpoint handler writes for a data position (a state dict or bytes)."""
    if isinstance(position, bytes):
        return position.decode()
    if isinstance(position, str):
        return position
    return json.dumps(position, indent=4)


def text_crc(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def all_processes_agree(ok: bool) -> bool:
    """True iff `ok` on every process (one small all-gather on multi-host runs)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))


def data_crcs(text: str) -> list[str]:
    """Every process's CRC of its data-position text, in process order."""
    crc = text_crc(text)
    if jax.process_count() == 1:
        return [crc]
    from jax.experimental import multihost_utils

    words = multihost_utils.process_allgather(np.asarray([int(crc, 16)], np.uint32))
    return [f"{int(w):08x}" for w in np.asarray(words).reshape(-1)]


def _stored_dtype(x: Any) -> str:
    if _is_key(x.dtype):
        return str(jax.random.key_data(x).dtype)
    return str(np.dtype(x.dtype))


def build_manifest(
    step: int, state: Any, data_crcs: list[str] | None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest of `state` saved as `step` (see the module docstring).

    Args:
      step: the checkpoint's step.
      state: the pytree of jax Arrays being saved.
      data_crcs: CRC32 of every process's data-position text (index = process), or None.
      extra: more JSON fields (e.g. the state's count of skipped steps in a row).
    """
    sums = checksums(state)
    leaves = {}
    for path, x in flat_leaves(state).items():
        shape = jax.random.key_data(x).shape if _is_key(x.dtype) else x.shape
        leaves[path] = {"shape": list(shape), "dtype": _stored_dtype(x), **sums[path]}
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": int(step),
        "finite": all(v["finite"] for v in leaves.values()),
        "leaves": leaves,
        "data_crcs": data_crcs,
    }
    manifest.update(extra or {})
    return manifest


# ----------------------------------------------------------------------------- verification
_LEAF_FIELDS = {"shape": list, "dtype": str, "checksum": str, "finite": bool}


def _manifest_problem(manifest: Any) -> str | None:
    """What makes `manifest` (parsed JSON) not one `build_manifest` wrote, or None."""
    if not isinstance(manifest, dict):
        return f"not a JSON object but {type(manifest).__name__}"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"unknown format {manifest.get('format')!r}"
    for key, kind in (("step", int), ("finite", bool), ("leaves", dict)):
        if not isinstance(manifest.get(key), kind):
            return f"field {key!r} missing or not a {kind.__name__}"
    crcs = manifest.get("data_crcs")
    if crcs is not None and not (isinstance(crcs, list) and all(isinstance(c, str) for c in crcs)):
        return "field 'data_crcs' is not a list of CRCs"
    for path, leaf in manifest["leaves"].items():
        if not isinstance(leaf, dict):
            return f"leaf {path}: not a JSON object"
        for key, kind in _LEAF_FIELDS.items():
            if not isinstance(leaf.get(key), kind):
                return f"leaf {path}: field {key!r} missing or not a {kind.__name__}"
        if not all(isinstance(n, int) for n in leaf["shape"]):
            return f"leaf {path}: shape {leaf['shape']} is not a list of ints"
        try:
            np.dtype(leaf["dtype"])
        except TypeError:
            return f"leaf {path}: unknown dtype {leaf['dtype']!r}"
    return None


def read_manifest(step: int, item: Any) -> dict:
    """The manifest saved in `item` (a step's `manifest` directory, an epath), checked.

    Raises:
      CheckpointDamaged: the item is missing (every checkpoint bf16jax writes has one), its
        JSON cannot be read, or a field is missing (`check_manifest`).
    """
    where = item.parent
    if not item.exists():
        raise CheckpointDamaged(
            step,
            where,
            f"it has no checksum manifest ('{item.name}' item), which every bf16jax checkpoint "
            "is saved with: it cannot be verified",
        )
    try:
        manifest = json.loads((item / "metadata").read_text())
    except Exception as e:  # noqa: BLE001 - any failure to read it is damage
        raise CheckpointDamaged(step, where, f"checksum manifest: {first_line(e)}") from e
    return check_manifest(step, where, manifest)


def check_manifest(step: int, where: Any, manifest: Any) -> dict:
    """Returns `manifest` if it has every field `build_manifest` writes, with its types; a
    manifest that does not (a flipped byte that still parses: `"dthpe"`) is damage, never a
    KeyError further on.

    Raises:
      CheckpointDamaged: naming the first field that is wrong.
    """
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise CheckpointDamaged(step, where, f"checksum manifest: {problem}")
    return manifest


def check_metadata(step: int, where: Any, saved: Mapping[str, Any], manifest: dict) -> None:
    """The stored metadata ({leaf path: metadata}) must describe the manifest's leaves."""
    leaves = manifest["leaves"]
    if set(saved) != set(leaves):
        odd = sorted(set(saved) ^ set(leaves))
        raise CheckpointDamaged(step, where, f"leaves differ from its manifest: {listing(odd)}")
    for path, meta in saved.items():
        want = leaves[path]
        if list(meta.shape) != want["shape"] or str(np.dtype(meta.dtype)) != want["dtype"]:
            raise CheckpointDamaged(
                step,
                where,
                f"leaf {path}: metadata {tuple(meta.shape)} {meta.dtype} but saved as "
                f"{tuple(want['shape'])} {want['dtype']}",
            )


def check_read_back(
    step: int, where: Any, restored: Mapping[str, Any], asked: Mapping[str, Any]
) -> None:
    """Each leaf asked for ({leaf path: ShapeDtypeStruct}) must come back with that shape and
    dtype: with Orbax's array metadata lost, PRNG keys come back as their uint32 words."""
    for path, want in asked.items():
        got = restored[path]
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            raise CheckpointDamaged(
                step,
                where,
                f"leaf {path}: read back as {tuple(got.shape)} {got.dtype} but saved as "
                f"{tuple(want.shape)} {want.dtype}",
            )


def check_data_file(step: int, where: Any, manifest: dict) -> None:
    """This process's data-position file must have the CRC recorded at save time."""
    crcs = manifest.get("data_crcs")
    count = jax.process_count()
    if not crcs or len(crcs) != count:
        return  # saved without one, or by another process count (grain names the missing file)
    index = jax.process_index()
    path = where / "data" / f"process_{index}-of-{count}.json"
    try:
        text = path.read_text()
    except Exception as e:  # noqa: BLE001 - unreadable is damaged
        raise CheckpointDamaged(step, where, f"data position: {first_line(e)}") from e
    if text_crc(text) != crcs[index]:
        raise CheckpointDamaged(step, where, f"data position {path.name}: CRC mismatch")


def verify(step: int, where: Any, restored: Mapping[str, Any], manifest: dict) -> None:
    """Restored device arrays ({leaf path: array}) must have their manifest checksums."""
    sums = checksums(dict(restored))
    bad = [p for p, s in sums.items() if s["checksum"] != manifest["leaves"][p]["checksum"]]
    if bad:
        raise CheckpointDamaged(step, where, f"checksum mismatch in {listing(bad)}")


def verify_host(step: int, where: Any, restored: Mapping[str, np.ndarray], manifest: dict) -> None:
    """`verify` for host (NumPy) arrays, e.g. a read-back after a save."""
    bad = [
        p
        for p, x in restored.items()
        if host_checksum(np.asarray(x)) != manifest["leaves"][p]["checksum"]
    ]
    if bad:
        raise CheckpointDamaged(step, where, f"checksum mismatch in {listing(bad)}")
