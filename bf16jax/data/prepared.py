"""The prepared-dataset format on disk (what `python -m bf16jax.prepare` writes) and its
verified loading.

A dataset directory holds, for each of its n parts (one per `--part_index`, n = `--num_parts`):
  part-IIIII-of-NNNNN.json         the part's manifest (canonical JSON: sorted keys, no spaces)
  part-IIIII-of-NNNNN.json.sha256  sha256 of the manifest's bytes (its absence is damage)
  SPLIT-IIIII-KKKKK.FIELD.bin      shard K's tokens of FIELD, flat little-endian uint16 when every
                                   id of the part fits, else uint32 (the manifest says which)
  SPLIT-IIIII-KKKKK.FIELD.idx      its document offsets, int64 [documents + 1]
  SPLIT-IIIII-KKKKK.FIELD.blk      blake2b-128 of each 64 KiB block of the .bin, checked on read
  tokenizer/                       a copy of the tokenizer's files (empty for bytes)
Every manifest records the format version, the settings every part must share (tokenizer and
its files' sha256, fields, split rule, the full input list), and every shard file's size and
sha256. `open_dataset` refuses (ValueError, one line) a missing part, a part from other
settings, an unknown version, a manifest or shard whose bytes differ from their sha256.
A URL (gs://, s3://, any fsspec protocol) is read through fsspec with ranged reads, as a local
directory is with pread; the tokenizer's files are copied to a local cache and checked.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "VERSION",
    "KINDS",
    "FIELDS",
    "canonical_json",
    "manifest_name",
    "write_manifest",
    "shard_prefix",
    "sha256_file",
    "FileArray",
    "Shard",
    "PreparedDataset",
    "open_dataset",
    "is_url",
]

FORMAT = "bf16jax-prepared"
VERSION = 1
# The dataset kinds and the fields each stores (in this order), and which end with EOS.
KINDS = ("text", "text2text", "prompt_completion")
FIELDS = {
    "text": (("text", True),),
    "text2text": (("input", True), ("target", True)),
    "prompt_completion": (("prompt", False), ("completion", True)),
}
# Each token file has a digest file (.blk: 16-byte blake2b per block of BLOCK_BYTES, itself in
# the manifest with its sha256): a reader checks a block the first time it reads from it, so
# opening a dataset costs no pass over its shards, and a block costs ~64 KiB of hashing once.
BLOCK_BYTES = 1 << 16
DIGEST_BYTES = 16
_PART = re.compile(r"^part-(\d{5})-of-(\d{5})\.json$")


def is_url(path: str) -> bool:
    return "://" in path


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.json"


def shard_prefix(split: str, part: int, shard: int) -> str:
    return f"{split}-{part:05d}-{shard:05d}"


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _block_digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


class BlockHasher:
    """Digests of consecutive BLOCK_BYTES blocks of a stream written in pieces."""

    def __init__(self):
        self._buf = bytearray()
        self._digests: list[bytes] = []

    def update(self, data: bytes) -> None:
        self._buf += data
        full = len(self._buf) // BLOCK_BYTES * BLOCK_BYTES
        for at in range(0, full, BLOCK_BYTES):
            self._digests.append(_block_digest(self._buf[at : at + BLOCK_BYTES]))
        del self._buf[:full]

    def digests(self) -> bytes:
        return b"".join(self._digests + ([_block_digest(self._buf)] if self._buf else []))


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: str, manifest: dict) -> str:
    """Writes a part's manifest and its checksum (checksum first: a manifest that is present
    always has one). Returns the manifest's path."""
    part = manifest["part"]
    path = os.path.join(directory, manifest_name(part["index"], part["count"]))
    data = canonical_json(manifest)
    _atomic_write(path + ".sha256", (hashlib.sha256(data).hexdigest() + "\n").encode())
    _atomic_write(path, data)
    return path


# ----------------------------------------------------------------------------- reading
# The fsspec package that reads each object store's protocol (named in the error).
_FS_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


def remote_fs(url: str):
    """(fsspec file system, path within it) of a URL; ValueError naming the package to install
    when the protocol's is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        protocol = url.split("://", 1)[0]
        package = _FS_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise ValueError(
            f"data.path={url}: reading {protocol}:// needs {package} ({e}): `pip install "
            f"{package}`, or copy the dataset to a local directory."
        ) from None


def _read_bytes(path: str) -> bytes:
    if is_url(path):
        fs, p = remote_fs(path)
        return fs.cat_file(p)
    with open(path, "rb") as f:
        return f.read()


def _exists(path: str) -> bool:
    if is_url(path):
        fs, p = remote_fs(path)
        return fs.exists(p)
    return os.path.exists(path)


def _list_parts(path: str) -> list[str]:
    if is_url(path):
        fs, p = remote_fs(path)
        if not fs.isdir(p):
            return []
        names = (os.path.basename(str(x).rstrip("/")) for x in fs.ls(p, detail=False))
        return sorted(n for n in names if _PART.match(n))
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "part-*-of-*.json")))


@functools.lru_cache(maxsize=256)
def _verified_hash(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # the cache key: a rewritten file is hashed again
    return sha256_file(path)


def _check_file(path: str, want: dict, fix: str, full: bool = True) -> None:
    if is_url(path):
        fs, p = remote_fs(path)
        size = fs.size(p) if fs.exists(p) else None
    else:
        st = os.stat(path) if os.path.isfile(path) else None
        size = st.st_size if st else None
    if size is None:
        raise ValueError(f"prepared dataset: {path} is missing ({fix}).")
    if size != want["bytes"]:
        raise ValueError(
            f"prepared dataset: {path} has {size} bytes, its manifest says {want['bytes']} "
            f"(truncated or replaced; {fix})."
        )
    if not full:
        return  # its blocks are checked as they are read (FileArray)
    if is_url(path):
        digest = hashlib.sha256(fs.cat_file(p)).hexdigest()
    else:
        digest = _verified_hash(path, st.st_size, st.st_mtime_ns)
    if digest != want["sha256"]:
        raise ValueError(
            f"prepared dataset: {path} does not match its sha256 in the manifest (damaged; {fix})."
        )


class Shard:
    """One shard of a split: per field, its tokens (memory-mapped) and document offsets."""

    def __init__(self, directory: str, info: dict, fields: tuple[str, ...]):
        self.name, self.documents = info["name"], int(info["documents"])
        self.tokens: dict[str, np.ndarray] = {}
        self.offsets: dict[str, np.ndarray] = {}
        dtype = np.dtype(info["dtype"]).newbyteorder("<")
        for field in fields:
            tok_path = os.path.join(directory, f"{self.name}.{field}.bin")
            idx_path = os.path.join(directory, f"{self.name}.{field}.idx")
            blocks = _read_bytes(os.path.join(directory, f"{self.name}.{field}.blk"))
            self.tokens[field] = _load_array(tok_path, dtype, blocks)
            self.offsets[field] = _load_array(idx_path, np.dtype("<i8"))

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, documents={self.documents})"


class FileArray:
    """A read-only 1-D array on disk, read by `pread` per slice (a URL: by ranged reads): no
    mapping, so a reader's resident memory does not grow with the pages it has visited (a
    memmap's would)."""

    def __init__(self, path: str, dtype: np.dtype, blocks: bytes | None = None):
        self.path, self.dtype, self.blocks = path, np.dtype(dtype), blocks
        if is_url(path):
            fs, p = remote_fs(path)
            size = fs.size(p)
        else:
            size = os.path.getsize(path)
        self._len = size // self.dtype.itemsize
        self._fd = None
        self._verified: set[int] = set()

    def _pread(self, n: int, offset: int) -> bytes:
        if self._fd is None:  # opened lazily: the object can be pickled to grain's workers
            self._fd = (
                remote_fs(self.path) if is_url(self.path) else os.open(self.path, os.O_RDONLY)
            )
        if isinstance(self._fd, int):
            return os.pread(self._fd, n, offset)
        fs, p = self._fd
        return fs.cat_file(p, start=offset, end=min(offset + n, self._len * self.dtype.itemsize))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice):
            return self[key : key + 1][0] if key >= 0 else self[self._len + key]
        start, stop, step = key.indices(self._len)
        if step != 1:
            return self[start:stop][::step]
        if stop <= start:
            return np.zeros(0, self.dtype)
        size = self.dtype.itemsize
        if self.blocks is not None:
            self._verify(start * size, stop * size)
        data = self._pread((stop - start) * size, start * size)
        return np.frombuffer(data, self.dtype)

    def _verify(self, lo: int, hi: int) -> None:
        """Checks the blocks holding bytes [lo, hi) against the manifest, once each."""
        for k in range(lo // BLOCK_BYTES, (hi - 1) // BLOCK_BYTES + 1):
            if k in self._verified:
                continue
            data = self._pread(BLOCK_BYTES, k * BLOCK_BYTES)
            want = self.blocks[k * DIGEST_BYTES : (k + 1) * DIGEST_BYTES]
            if _block_digest(data) != want:
                raise ValueError(
                    f"prepared dataset: {self.path} block {k} (bytes {k * BLOCK_BYTES}+) does "
                    "not match its digest in the manifest (damaged): prepare this part again."
                )
            self._verified.add(k)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def tolist(self) -> list:
        return self[:].tolist()

    def __getstate__(self):
        return dict(self.__dict__, _fd=None, _verified=set())

    def __del__(self):
        if isinstance(getattr(self, "_fd", None), int):
            try:
                os.close(self._fd)
            except (OSError, TypeError, AttributeError):  # at exit, `os` may be gone
                pass


def _load_array(path: str, dtype: np.dtype, blocks: bytes | None = None):
    if blocks is None and is_url(path):  # document offsets: small, read whole (hash checked)
        return np.frombuffer(_read_bytes(path), dtype)
    if blocks is None:
        return np.memmap(path, dtype=dtype, mode="r")  # document offsets: small, searched
    return FileArray(path, dtype, blocks)


class PreparedDataset:
    """A verified prepared dataset: its manifests (one per part) and its shards by split."""

    def __init__(self, path: str, manifests: list[dict], checksums: list[str]):
        self.path, self.manifests = path, manifests
        first = manifests[0]
        self.kind: str = first["kind"]
        self.fields: tuple[str, ...] = tuple(f for f, _ in FIELDS[self.kind])
        self.tokenizer: dict = first["tokenizer"]
        self.settings_sha256: str = first["settings_sha256"]
        # One hash for the whole dataset: its manifests' checksums in part order.
        self.meta_sha256 = hashlib.sha256("".join(checksums).encode()).hexdigest()
        self.max_token_id = max(int(m["max_token_id"]) for m in manifests)

    def documents(self, split: str) -> int:
        return sum(int(m["splits"][split]["documents"]) for m in self.manifests)

    def tokens(self, split: str) -> int:
        return sum(int(m["splits"][split]["tokens"]) for m in self.manifests)

    def shards(self, split: str) -> list[Shard]:
        """The split's shards in canonical order (part, then shard)."""
        return [
            Shard(self.path, info, self.fields)
            for m in self.manifests
            for info in m["splits"][split]["shards"]
        ]

    def tokenizer_dir(self) -> str:
        """The dataset's copy of its tokenizer ("" for bytes: `load_tokenizer("")`); for a URL,
        a local copy (in the temp directory, by content hash) checked against the manifest."""
        if not self.tokenizer["files"]:
            return ""
        if not is_url(self.path):
            return os.path.join(self.path, "tokenizer")
        import tempfile

        key = hashlib.sha256(canonical_json(self.tokenizer["files"])).hexdigest()[:16]
        local = os.path.join(tempfile.gettempdir(), f"bf16jax-tokenizer-{key}")
        os.makedirs(local, exist_ok=True)
        for name, digest in self.tokenizer["files"].items():
            target = os.path.join(local, name)
            if os.path.exists(target) and sha256_file(target) == digest:
                continue
            data = _read_bytes(f"{self.path}/tokenizer/{name}")
            if hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(
                    f"prepared dataset: {self.path}/tokenizer/{name} does not match its sha256 "
                    "in the manifest (damaged): prepare the dataset again."
                )
            _atomic_write(target, data)
        return local

    def record(self) -> dict:
        """What a run records about its data (config.json, manifests)."""
        return {
            "path": self.path,
            "meta_sha256": self.meta_sha256,
            "kind": self.kind,
            "tokenizer": {k: self.tokenizer[k] for k in ("kind", "files", "vocab_size")},
        }


def _load_manifest(path: str, name: str) -> tuple[dict, str]:
    where = os.path.join(path, name)
    fix = "rerun `python -m bf16jax.prepare` for this part into a new --out"
    if not _exists(where + ".sha256"):
        raise ValueError(f"prepared dataset: {where}.sha256 is missing (damaged; {fix}).")
    data = _read_bytes(where)
    want = _read_bytes(where + ".sha256").decode().strip()
    if hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"prepared dataset: {where} does not match its sha256 (damaged; {fix}).")
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"prepared dataset: {where} is not JSON ({e}; {fix}).") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"prepared dataset: {where} has format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; this bf16jax reads {FORMAT!r} version {VERSION}: "
            "prepare the corpus again with this version."
        )
    return manifest, want


def _open(path: str, full: bool) -> PreparedDataset:
    names = _list_parts(path)
    if not names:
        if not _exists(path):
            raise ValueError(
                f"data.path={path} does not exist: prepare it with `python -m bf16jax.prepare "
                f"INPUTS --out={path}`."
            )
        raise ValueError(
            f"data.path={path} holds no part-*-of-*.json manifest: not a prepared dataset, or "
            "`python -m bf16jax.prepare` has not finished there; (re)run it."
        )
    counts = {int(_PART.match(n).group(2)) for n in names}
    if len(counts) != 1:
        raise ValueError(
            f"prepared dataset {path} mixes parts of {sorted(counts)} parts: prepare it again "
            "into an empty --out."
        )
    count = counts.pop()
    missing = [i for i in range(count) if manifest_name(i, count) not in names]
    if missing:
        raise ValueError(
            f"prepared dataset {path} lacks part(s) {missing} of {count} (not prepared yet, or "
            f"interrupted): run `python -m bf16jax.prepare ... --num_parts={count} "
            f"--part_index={missing[0]}` into it."
        )
    loaded = [_load_manifest(path, manifest_name(i, count)) for i in range(count)]
    manifests = [m for m, _ in loaded]
    settings = {m["settings_sha256"] for m in manifests}
    if len(settings) != 1:
        raise ValueError(
            f"prepared dataset {path}: its parts were prepared with different settings "
            "(tokenizer, fields, split or input list): prepare every part with the same command."
        )
    fields = tuple(f for f, _ in FIELDS[manifests[0]["kind"]])
    for m in manifests:
        for split in m["splits"].values():
            for info in split["shards"]:
                need = {
                    f"{info['name']}.{f}.{ext}" for f in fields for ext in ("bin", "idx", "blk")
                }
                if not need <= set(info["files"]):
                    raise ValueError(
                        f"prepared dataset {path}: shard {info['name']} lists "
                        f"{sorted(info['files'])}, not {sorted(need)} (damaged or written by "
                        "another version): prepare it again."
                    )
                for fname, want in info["files"].items():
                    _check_file(
                        os.path.join(path, fname),
                        want,
                        "prepare this part again with the same command",
                        full=full or not fname.endswith(".bin"),
                    )
    return PreparedDataset(path, manifests, [c for _, c in loaded])


def open_dataset(path: str, *, full: bool = False) -> PreparedDataset:
    """The verified dataset at `path`: every manifest against its sha256, every file's size,
    the document offsets' sha256; the token files' sha256 too with `full` (a pass over the
    whole dataset), else each 1 MiB block's digest when it is first read.

    Raises:
      ValueError: one line naming what is missing, damaged or unreadable, and the fix.
    """
    if not path:
        raise ValueError(
            "config.data.path is empty: pass --config.data.path=DIR (a `python -m "
            "bf16jax.prepare` output) or --config.data.mixture=DIR=W,DIR=W."
        )
    path = path.rstrip("/") if is_url(path) else os.path.abspath(path)
    # Shard hashes are cached per (file, size, mtime): a second open in a process re-reads only
    # the manifests, and a rewritten shard is hashed again.
    return _open(path, full)
