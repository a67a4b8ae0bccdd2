"""The packing plan of T5 packed span corruption, built once per setting and kept on disk.

Chunks: each document without its EOS, cut every `chunk` tokens (stream start int64, length
int32). Rows: chunks packed greedily in order while the corrupted inputs fit `enc_len` and the
targets `dec_len` (`pack_plan`'s rule); a row may continue into the next shard. The plan is
built a shard at a time (memory: one shard's chunks), written under DATASET/plans/ (or
~/.cache/bf16jax/plans/ where the dataset is not writable) with a JSON index holding its key
(the dataset's meta_sha256, the split and the span settings), version and sha256s, and read by
`pread`: a loader's memory does not grow with the corpus, and a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from bf16jax.data import prepared as fmt

__all__ = ["PLAN_VERSION", "SpanPlan", "span_counts_vec", "greedy_rows", "open_plan"]

PLAN_VERSION = 1
_FILES = (("starts", "<i8"), ("lens", "<i4"), ("rows", "<i8"))
_BLOCK = 1 << 16  # chunks planned at a time


def span_counts_vec(lengths: np.ndarray, density: float, mean_span: float):
    """`span_counts` for every length at once (same rounding: half to even, as Python's)."""
    n = np.maximum(np.asarray(lengths, np.int32), 2)
    noise = np.minimum(np.maximum(np.rint(n * density).astype(np.int32), 1), n - 1)
    spans = np.maximum(np.rint(noise / mean_span).astype(np.int32), 1)
    return noise, spans


def greedy_rows(needs: list[np.ndarray], limits: list[int], final: bool) -> tuple[list[int], int]:
    """Row starts of items packed greedily in order (an item joins the row while every
    need's total stays <= its limit; a row's first item always joins), and where the last row
    starts when it may go on past these items (`final` False; else len). Vectorized: each
    row's end is a search in the needs' prefix sums; one Python step per row."""
    n = len(needs[0])
    if n == 0:
        return [], 0
    end = np.full(n, n, np.int64)
    for need, limit in zip(needs, limits, strict=True):
        prefix = np.concatenate([[0], np.cumsum(need, dtype=np.int64)])
        end = np.minimum(end, np.searchsorted(prefix, prefix[:-1] + limit, "right") - 1)
    end = np.maximum(end, np.arange(1, n + 1)).tolist()
    starts, s = [], 0
    while s < n:
        if end[s] >= n and not final:
            return starts, s  # this row may take items that come later
        starts.append(s)
        s = end[s]
    return starts, n


def _chunks(offsets: np.ndarray, base: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream start int64, length int32) of one shard's chunks."""
    offs = np.asarray(offsets, np.int64)
    body = np.maximum(np.diff(offs) - 1, 0)
    pieces = -(-body // chunk)
    owner = np.repeat(np.arange(len(body)), pieces)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return offs[:-1][owner] + base + k * chunk, np.minimum(chunk, body[owner] - k * chunk)


def _build(stream, chunk: int, enc_len: int, dec_len: int, density, mean_span, out: str) -> dict:
    """Writes the plan's files at `out`.{starts,lens,rows}; returns its counts."""
    files = {name: open(f"{out}.{name}", "wb") for name, _ in _FILES}
    n_chunks, n_rows = 0, 0
    carry_l = np.zeros(0, np.int64)  # the lengths of the open row's chunks
    try:
        shards = list(zip(stream.offsets, stream.bases[:-1].tolist(), strict=True))
        for k, (offs, base) in enumerate(shards):
            starts, lens = _chunks(offs, base, chunk)
            files["starts"].write(starts.astype("<i8").tobytes())
            files["lens"].write(lens.astype("<i4").tobytes())
            for lo in range(0, max(len(lens), 1), _BLOCK):
                last = k == len(shards) - 1 and lo + _BLOCK >= len(lens)
                block = np.concatenate([carry_l, lens[lo : lo + _BLOCK]])
                noise, spans = span_counts_vec(block, density, mean_span)
                needs = [block - noise + spans + 1, noise + spans + 1]
                rows, stop = greedy_rows(needs, [enc_len, dec_len], last)
                first = n_chunks - len(carry_l)  # global index of block[0]
                files["rows"].write((np.asarray(rows, np.int64) + first).astype("<i8").tobytes())
                n_rows += len(rows)
                n_chunks += len(block) - len(carry_l)
                carry_l = block[stop:]
        files["rows"].write(np.asarray([n_chunks], "<i8").tobytes())
    finally:
        for f in files.values():
            f.close()
    return {"chunks": n_chunks, "rows": n_rows}


class SpanPlan:
    """An opened plan: `len(plan)` rows; `plan.row(r)` = (chunk starts, chunk lengths)."""

    def __init__(self, prefix: str, rows: int):
        self.rows = rows
        self._arrays = {
            name: fmt.FileArray(f"{prefix}.{name}", np.dtype(dtype)) for name, dtype in _FILES
        }

    def __len__(self) -> int:
        return self.rows

    def row(self, r: int) -> tuple[list[int], list[int]]:
        lo, hi = self._arrays["rows"][r : r + 2].tolist()
        return self._arrays["starts"][lo:hi].tolist(), self._arrays["lens"][lo:hi].tolist()


def _plan_dirs(ds) -> list[str]:
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    out = [os.path.join(home, "bf16jax", "plans", ds.meta_sha256[:16])]
    if not fmt.is_url(ds.path):
        out.insert(0, os.path.join(ds.path, "plans"))
    return out


def _valid(index_path: str, key: dict) -> dict | None:
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if index.get("version") != PLAN_VERSION or index.get("key") != key:
        return None
    prefix = index_path[: -len(".json")]
    for name, want in index["files"].items():
        path = f"{prefix}.{name}"
        if not os.path.isfile(path) or os.path.getsize(path) != want["bytes"]:
            return None
        if fmt.sha256_file(path) != want["sha256"]:
            return None
    return index


def open_plan(ds, split: str, stream, chunk: int, enc_len: int, dec_len: int, density, span):
    """The plan of (dataset, split, settings): read from disk, or built and written first."""
    key = {
        "meta_sha256": ds.meta_sha256,
        "split": split,
        "chunk": chunk,
        "enc_len": enc_len,
        "dec_len": dec_len,
        "noise_density": density,
        "mean_noise_span": span,
    }
    name = "t5span-" + hashlib.sha256(fmt.canonical_json(key)).hexdigest()[:16]
    for directory in _plan_dirs(ds):
        index = _valid(os.path.join(directory, name + ".json"), key)
        if index is not None:
            return SpanPlan(os.path.join(directory, name), index["rows"])

    def places():
        yield from _plan_dirs(ds)
        yield tempfile.mkdtemp(prefix="bf16jax-plan-")  # only where nothing else is writable

    for directory in places():
        try:
            os.makedirs(directory, exist_ok=True)
            # Unique across hosts sharing the directory: they may build the same plan at once.
            tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}")
            counts = _build(stream, chunk, enc_len, dec_len, density, span, tmp)
        except OSError:
            continue  # not writable: the next place
        files = {}
        for file_name, _ in _FILES:
            path = f"{tmp}.{file_name}"
            files[file_name] = {"bytes": os.path.getsize(path), "sha256": fmt.sha256_file(path)}
            os.replace(path, os.path.join(directory, f"{name}.{file_name}"))
        index = {"version": PLAN_VERSION, "key": key, "files": files, **counts}
        tmp_index = f"{tmp}.json"
        with open(tmp_index, "w") as f:
            json.dump(index, f)
        os.replace(tmp_index, os.path.join(directory, name + ".json"))  # last: marks it done
        return SpanPlan(os.path.join(directory, name), counts["rows"])
    raise OSError("no writable place for the T5 packing plan")  # mkdtemp raised before this
