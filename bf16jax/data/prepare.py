"""Raw text -> a prepared dataset directory (the format of `bf16jax.data.prepared`), once.

Two stages. (1) Each input file is one task, run by `workers` processes: its records are read
(`bf16jax.data.sources`), tokenized in batches, checked, and streamed to per-input uint16 / uint32
files under OUT/.work-PART-<settings>/ with a stats file written last; a finished input is not read
again, so an interrupted run resumes where it stopped. (2) One pass in input order decides each
document's split and streams the tokens into shards of the final dtype (uint16 when every id
of the part fits, else uint32), hashing as it writes, then writes the manifest. Whatever the
number of workers, the output bytes are the same: stage 2 sees the inputs in sorted order.

Held-out split: document d of input f goes to "eval" when its key u(f, d) = splitmix64(sha256(f's
name), d, split_seed) / 2**64 is below `eval_fraction`, or (`eval_docs` = N) ranks among the N
smallest keys of the part; a document is in exactly one split, and no other input changes it.
Memory: one batch of records per worker, one block of documents in stage 2, 8 bytes per
document for the split keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import time
from collections import Counter
from typing import Any

import numpy as np

from bf16jax.data import fast_bpe, sources
from bf16jax.data import prepared as fmt
from bf16jax.data.tokenizer import (
    BPETokenizer,
    SentencePieceTokenizer,
    encode_batch,
    load_tokenizer,
    sentinel_ids,
    tokenizer_files,
)

__all__ = ["Options", "TooManyRejects", "prepare", "input_names"]

_BATCH = 512  # records tokenized together
_BLOCK_TOKENS = 1 << 22  # stage 2 gathers at most this many tokens at a time (+ one document)
_MAX_EXAMPLES = 10  # rejects shown with file:line


class TooManyRejects(ValueError):
    """More bad records than --max_bad_fraction allows (exit 2)."""


@dataclasses.dataclass
class Options:
    inputs: list[str]
    out: str
    tokenizer: str = ""
    kind: str = "text"
    text_field: str = "text"
    input_field: str = "input"
    target_field: str = "target"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    txt_unit: str = "paragraph"
    eval_fraction: float = 0.0
    eval_docs: int = 0
    split_seed: int = 0
    workers: int = 1
    num_parts: int = 1
    part_index: int = 0
    shard_tokens: int = 1 << 27
    max_bad_fraction: float = 0.01
    bpe_encoder: str = "auto"
    progress: bool = True


def input_names(opts: Options) -> tuple[str, ...]:
    """The raw field names read for each stored field, in `prepared.FIELDS` order."""
    return {
        "text": (opts.text_field,),
        "text2text": (opts.input_field, opts.target_field),
        "prompt_completion": (opts.prompt_field, opts.completion_field),
    }[opts.kind]


def _check_options(opts: Options) -> None:
    if opts.kind not in fmt.KINDS:
        raise ValueError(f"--kind={opts.kind!r}: use one of {', '.join(fmt.KINDS)}.")
    if opts.txt_unit not in sources.TXT_UNITS:
        raise ValueError(
            f"--txt_unit={opts.txt_unit!r}: use one of {', '.join(sources.TXT_UNITS)}."
        )
    if not 0.0 <= opts.eval_fraction < 1.0:
        raise ValueError(f"--eval_fraction={opts.eval_fraction} must lie in [0, 1).")
    if opts.eval_docs < 0 or (opts.eval_docs and opts.eval_fraction):
        raise ValueError("--eval_docs must be >= 0, and only one of --eval_docs / --eval_fraction.")
    if opts.workers < 1:
        raise ValueError(f"--workers={opts.workers} must be >= 1.")
    if not 0 <= opts.part_index < opts.num_parts:
        raise ValueError(
            f"--part_index={opts.part_index} must lie in [0, --num_parts={opts.num_parts})."
        )
    if opts.shard_tokens < 1:
        raise ValueError(f"--shard_tokens={opts.shard_tokens} must be >= 1.")
    if opts.bpe_encoder not in fast_bpe.ENCODERS:
        raise ValueError(
            f"--bpe_encoder={opts.bpe_encoder!r}: use one of {', '.join(fast_bpe.ENCODERS)}."
        )
    if not 0.0 <= opts.max_bad_fraction <= 1.0:
        raise ValueError(f"--max_bad_fraction={opts.max_bad_fraction} must lie in [0, 1].")
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        raise ValueError(f"--out={opts.out} is a file: pass a directory (it is created).")


def _tokenizer_info(spec: str) -> dict:
    tok = load_tokenizer(spec)
    kind = (
        "sentencepiece"
        if isinstance(tok, SentencePieceTokenizer)
        else "bpe"
        if isinstance(tok, BPETokenizer)
        else "bytes"
    )
    files = {os.path.basename(p): fmt.sha256_file(p) for p in tokenizer_files(spec)}
    sentinels = sentinel_ids(tok)
    return {
        "kind": kind,
        "spec": spec,
        "files": files,
        "vocab_size": int(tok.vocab_size),
        "pad_id": None if tok.pad_id is None else int(tok.pad_id),
        "eos_id": None if tok.eos_id is None else int(tok.eos_id),
        "sentinels": [int(s) for s in sentinels[:2]] + [len(sentinels)] if len(sentinels) else [],
    }


# ----------------------------------------------------------------------------- stage 1
_WORKER: dict[str, Any] = {}
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _worker_init(
    spec: str, progress_queue, encoder: str = "", threads: int = 1, pool: bool = False
) -> None:
    if pool:  # a worker process: `threads` cores' worth each, so workers do not oversubscribe
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if threads > 1 else "false")
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    tok = load_tokenizer(spec)
    _WORKER.update(tok=tok, queue=progress_queue, encoder=encoder or None, n=threads)
    _WORKER["fast"] = fast_bpe.from_tokenizer_json(tok.path) if encoder == "tiktoken" else None


def _encode(texts: list[str], add_eos: bool) -> list[np.ndarray]:
    fast, tok = _WORKER["fast"], _WORKER["tok"]
    if fast is None:
        return encode_batch(tok, texts, add_eos=add_eos)
    tail = [tok.eos_id] if add_eos else []
    return [np.asarray(x + tail, np.int32) for x in fast_bpe.encode(fast, texts, _WORKER["n"])]


def _tokenize_input(task: dict) -> dict:
    """Stage 1 for one input: writes WORK/tokens.FIELD.bin (uint16 for a vocabulary of at most
    2**16, else uint32: ids >= vocab are rejected), lengths.FIELD.u32, lines.u64 and
    stats.json (last: its presence marks the input done)."""
    tok = _WORKER["tok"]
    report_queue = _WORKER.get("queue")
    path, work, names, eos = task["path"], task["work"], task["names"], task["eos"]
    os.makedirs(work, exist_ok=True)
    vocab = int(tok.vocab_size)
    fields = list(range(len(names)))
    files = {
        "tokens": [open(os.path.join(work, f"tokens.{i}.bin"), "wb") for i in fields],
        "lengths": [open(os.path.join(work, f"lengths.{i}.u32"), "wb") for i in fields],
        "lines": open(os.path.join(work, "lines.u64"), "wb"),
    }
    reasons: Counter = Counter()
    examples: list[str] = []
    stats = {"records": 0, "documents": 0, "tokens": 0, "max_id": 0}
    pending = {"bytes": 0}

    def report(nbytes: int) -> None:
        pending["bytes"] += nbytes

    def reject(line: int, reason: str) -> None:
        reasons[reason] += 1
        if len(examples) < _MAX_EXAMPLES:
            examples.append(f"{path}:{line}: {reason}")

    def flush(batch: list) -> None:
        if not batch:
            return
        encoded = [_encode([fields_[names[i]] for _, fields_ in batch], eos[i]) for i in fields]
        keep = []
        for j, (line, _) in enumerate(batch):
            top = max(int(encoded[i][j].max()) if len(encoded[i][j]) else -1 for i in fields)
            if top >= vocab:
                reject(line, f"token id {top} >= vocab size {vocab}")
                continue
            keep.append(j)
            stats["max_id"] = max(stats["max_id"], top)
        for i in fields:
            arrays = [encoded[i][j] for j in keep]
            if arrays:
                flat = np.concatenate(arrays).astype(task["dtype"])
                files["tokens"][i].write(flat.tobytes())
                files["lengths"][i].write(np.asarray([len(a) for a in arrays], np.uint32).tobytes())
                stats["tokens"] += len(flat)
        files["lines"].write(np.asarray([batch[j][0] for j in keep], np.uint64).tobytes())
        stats["documents"] += len(keep)
        if report_queue is not None:
            report_queue.put((pending["bytes"], len(keep), sum(len(encoded[0][j]) for j in keep)))
            pending["bytes"] = 0

    batch: list = []
    try:
        for rec in sources.read_records(path, names, txt_unit=task["txt_unit"], report=report):
            stats["records"] += 1
            if rec.reason is not None:
                reject(rec.line, rec.reason)
                continue
            batch.append((rec.line, rec.fields))
            if len(batch) >= _BATCH:
                flush(batch)
                batch = []
        flush(batch)
    finally:
        for f in [*files["tokens"], *files["lengths"], files["lines"]]:
            f.close()
    stats.update(
        encoder=_WORKER["encoder"],
        name=path,
        bytes=os.path.getsize(path),
        sha256=fmt.sha256_file(path),
        rejected=dict(sorted(reasons.items())),
        examples=examples,
    )
    tmp = os.path.join(work, "stats.json.tmp")
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, os.path.join(work, "stats.json"))
    return stats


class _DirectQueue:
    """The progress queue of an in-process run: `put` updates the bar at once."""

    def __init__(self, update):
        self.put = update


def _start_method() -> str:
    """fork (workers start at once) unless JAX's runtime threads already run in this process
    (a notebook, a test): forking those can deadlock, so spawn."""
    import sys

    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return "spawn"
    return "fork"


def _run_stage1(tasks: list[dict], opts: Options, total_bytes: int, encoder: str) -> None:
    todo = [t for t in tasks if not os.path.exists(os.path.join(t["work"], "stats.json"))]
    bar = None
    if opts.progress:
        from tqdm import tqdm

        done = sum(t["bytes"] for t in tasks if t not in todo)
        bar = tqdm(total=total_bytes, initial=done, unit="B", unit_scale=True, desc="prepare")
    docs, tokens, start = 0, 0, time.perf_counter()

    def update(item) -> None:
        nonlocal docs, tokens
        nbytes, d, t = item
        docs, tokens = docs + d, tokens + t
        if bar is not None:
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{docs:,} docs, {rate / 1e6:.2f}M tokens/s", refresh=False)
            bar.update(nbytes)

    try:
        if opts.workers == 1 or len(todo) <= 1:
            # In this process, the bar moving as it reads; the library's own threads.
            _worker_init(opts.tokenizer, _DirectQueue(update), encoder, (_CORES or 1))
            for t in todo:
                _tokenize_input(t)
            return
        ctx = mp.get_context(_start_method())
        q = ctx.Queue()
        workers = min(opts.workers, len(todo))
        threads = max(1, (_CORES or 1) // workers)
        init = (opts.tokenizer, q, encoder, threads, True)
        with ctx.Pool(workers, initializer=_worker_init, initargs=init) as pool:
            results = [pool.apply_async(_tokenize_input, (t,)) for t in todo]
            while results:
                try:
                    update(q.get(timeout=0.2))
                except queue.Empty:
                    pass
                for r in [r for r in results if r.ready()]:
                    r.get()  # re-raises a worker's error
                    results.remove(r)
            while not q.empty():
                update(q.get())
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------- stage 2
_M64 = (1 << 64) - 1


def _split_keys(name: str, count: int, seed: int) -> np.ndarray:
    """uint64 [count]: splitmix64 of (name hash + seed, document index)."""
    base = int.from_bytes(hashlib.sha256(f"{name}\0{seed}".encode()).digest()[:8], "little")
    with np.errstate(over="ignore"):
        z = np.uint64(base) + np.arange(count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class _ShardWriter:
    """Streams one split's documents into shards of about `shard_tokens` tokens."""

    def __init__(self, out: str, split: str, part: int, fields, dtype, shard_tokens: int):
        self.out, self.split, self.part, self.fields = out, split, part, fields
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self.files: dict | None = None

    def _open(self) -> None:
        prefix = fmt.shard_prefix(self.split, self.part, len(self.shards))
        self.files = {"prefix": prefix, "docs": 0, "tokens": 0, "streams": {}}
        for field in self.fields:
            for ext in ("bin", "idx"):
                name = f"{prefix}.{field}.{ext}"
                f = open(os.path.join(self.out, name), "wb")
                self.files["streams"][name] = [f, hashlib.sha256(), 0, fmt.BlockHasher()]
            self._write(f"{prefix}.{field}.idx", np.zeros(1, "<i8"))
        self.files["ends"] = dict.fromkeys(self.fields, 0)

    def _write(self, name: str, array: np.ndarray) -> None:
        entry = self.files["streams"][name]
        data = array.tobytes()
        entry[0].write(data)
        entry[1].update(data)
        entry[2] += len(data)
        entry[3].update(data)

    def add(self, tokens: dict[str, np.ndarray], lengths: dict[str, np.ndarray]) -> None:
        """Appends documents: per field, their concatenated tokens and their lengths. A shard
        closes after the document that brings it to `shard_tokens` (all fields), so the shards
        do not depend on how the documents arrive."""
        n = len(lengths[self.fields[0]])
        while n:
            if self.files is None:
                self._open()
            f = self.files
            per_doc = sum(np.asarray(lengths[k], np.int64) for k in self.fields)
            room = self.shard_tokens - f["tokens"]
            take = min(int(np.searchsorted(np.cumsum(per_doc), room, "left")) + 1, n)
            for field in self.fields:
                cut = int(np.sum(lengths[field][:take], dtype=np.int64))
                self._write(
                    f"{f['prefix']}.{field}.bin",
                    tokens[field][:cut].astype(self.dtype.newbyteorder("<")),
                )
                ends = f["ends"][field] + np.cumsum(lengths[field][:take], dtype=np.int64)
                self._write(f"{f['prefix']}.{field}.idx", ends.astype("<i8"))
                f["ends"][field] = int(ends[-1])
                tokens[field], lengths[field] = tokens[field][cut:], lengths[field][take:]
            f["docs"] += take
            f["tokens"] = sum(f["ends"].values())
            if f["tokens"] >= self.shard_tokens:
                self.close_shard()
            n -= take

    def close_shard(self) -> None:
        f, self.files = self.files, None
        if f is None:
            return
        files = {}
        for name, (handle, h, size, blocks) in f["streams"].items():
            handle.close()
            files[name] = {"bytes": size, "sha256": h.hexdigest()}
            if name.endswith(".bin"):  # its block digests, for checking as it is read
                digests = blocks.digests()
                blk = name[: -len(".bin")] + ".blk"
                with open(os.path.join(self.out, blk), "wb") as out:
                    out.write(digests)
                files[blk] = {"bytes": len(digests), "sha256": hashlib.sha256(digests).hexdigest()}
        self.shards.append(
            {
                "name": f["prefix"],
                "documents": f["docs"],
                "tokens": dict(f["ends"]),
                "dtype": self.dtype.name,
                "files": files,
            }
        )


def _assemble(tasks: list[dict], stats: list[dict], opts: Options, fields, dtype) -> dict:
    keys = [_split_keys(s["name"], s["documents"], opts.split_seed) for s in stats]
    threshold = np.uint64(0)
    if opts.eval_fraction:
        threshold = np.uint64(min(int(opts.eval_fraction * 2.0**64), _M64))
    elif opts.eval_docs:
        every = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        if opts.eval_docs >= len(every):
            raise ValueError(
                f"--eval_docs={opts.eval_docs} leaves no training document of the "
                f"{len(every)} documents: lower it."
            )
        threshold = np.partition(every, opts.eval_docs)[opts.eval_docs]  # N keys lie below it
    writers = {
        split: _ShardWriter(opts.out, split, opts.part_index, fields, dtype, opts.shard_tokens)
        for split in ("train", "eval")
    }
    for task, stat, key in zip(tasks, stats, keys, strict=True):
        n = stat["documents"]
        maps = [
            (
                np.memmap(os.path.join(task["work"], f"tokens.{i}.bin"), task["dtype"], "r")
                if os.path.getsize(os.path.join(task["work"], f"tokens.{i}.bin"))
                else np.zeros(0, task["dtype"]),
                np.fromfile(os.path.join(task["work"], f"lengths.{i}.u32"), np.uint32),
            )
            for i in range(len(fields))
        ]
        starts = [np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]) for _, lens in maps]
        # Blocks of documents holding about _BLOCK_TOKENS tokens (all fields): bounded memory
        # whatever the documents' sizes.
        total = sum(st[1:] for st in starts)
        cuts = np.searchsorted(
            total, np.arange(_BLOCK_TOKENS, int(total[-1]) if n else 0, _BLOCK_TOKENS), "right"
        )
        bounds = np.unique(np.concatenate([[0], cuts, [n]])).tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            is_eval = key[lo:hi] < threshold
            for split, mask in (("train", ~is_eval), ("eval", is_eval)):
                docs = np.flatnonzero(mask) + lo
                if not len(docs):
                    continue
                toks, lens = {}, {}
                for i, field in enumerate(fields):
                    tokens, lengths = maps[i]
                    lens[field] = lengths[docs]
                    idx = _gather_index(starts[i][docs], lens[field])
                    toks[field] = np.asarray(tokens[idx])
                writers[split].add(toks, lens)
    splits = {}
    for split, w in writers.items():
        w.close_shard()
        splits[split] = {
            "documents": sum(s["documents"] for s in w.shards),
            "tokens": sum(sum(s["tokens"].values()) for s in w.shards),
            "shards": w.shards,
        }
    return splits


def _gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the tokens of documents starting at `starts` with `lengths`, in order."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths, dtype=np.int64)
    shift = np.repeat(starts - (ends - lengths), lengths.astype(np.int64))
    return np.arange(total, dtype=np.int64) + shift


# ----------------------------------------------------------------------------- the command
def prepare(opts: Options) -> dict:
    """Prepares `opts.inputs` into `opts.out` (this part of `num_parts`); returns the manifest.

    Raises:
      ValueError: bad options or inputs (before anything is written).
      TooManyRejects: more bad records than `max_bad_fraction` (nothing but work files written).
    """
    _check_options(opts)
    every_input = sources.expand_inputs(opts.inputs)
    names = input_names(opts)
    if opts.kind != "text":
        txt = [p for p in every_input if sources.input_format(p)[0] == ".txt"]
        if txt:
            raise ValueError(
                f"--kind={opts.kind} reads named fields: {txt[0]} is .txt; use .jsonl / .parquet."
            )
    tokenizer = _tokenizer_info(opts.tokenizer)
    fields = tuple(f for f, _ in fmt.FIELDS[opts.kind])
    eos = tuple(e for _, e in fmt.FIELDS[opts.kind])
    if any(eos) and tokenizer["eos_id"] is None:
        raise ValueError(f"--tokenizer={opts.tokenizer} has no EOS token to end documents with.")
    settings = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "kind": opts.kind,
        "source_fields": list(names),
        "txt_unit": opts.txt_unit,
        "eval_fraction": opts.eval_fraction,
        "eval_docs": opts.eval_docs,
        "split_seed": opts.split_seed,
        "num_parts": opts.num_parts,
        "tokenizer": {k: tokenizer[k] for k in ("kind", "files", "vocab_size")},
        "inputs": [[p, os.path.getsize(p)] for p in every_input],
    }
    settings_sha = hashlib.sha256(fmt.canonical_json(settings)).hexdigest()
    manifest_path = os.path.join(opts.out, fmt.manifest_name(opts.part_index, opts.num_parts))
    if os.path.exists(manifest_path):
        with open(manifest_path, "rb") as f:
            old = json.loads(f.read())
        if old.get("settings_sha256") == settings_sha:
            return old  # done before: nothing to do
        raise ValueError(
            f"--out={opts.out} already holds {os.path.basename(manifest_path)} prepared with other "
            "settings or inputs: pass a new --out, or delete that directory."
        )
    mine = every_input[opts.part_index :: opts.num_parts]
    work_root = os.path.join(opts.out, f".work-{opts.part_index:05d}-{settings_sha[:16]}")
    tasks = [
        {
            "path": p,
            "work": os.path.join(work_root, f"in-{every_input.index(p):06d}"),
            "names": names,
            "eos": eos,
            "txt_unit": opts.txt_unit,
            "bytes": os.path.getsize(p),
            "dtype": "uint16" if tokenizer["vocab_size"] <= (1 << 16) else "uint32",
        }
        for p in mine
    ]
    encoder = None
    if tokenizer["kind"] == "bpe":
        encoder = fast_bpe.choose_encoder(
            load_tokenizer(opts.tokenizer),
            opts.bpe_encoder,
            lambda n: sources.first_texts(mine, names, opts.txt_unit, n),
        )
    os.makedirs(work_root, exist_ok=True)
    _run_stage1(tasks, opts, sum(t["bytes"] for t in tasks), encoder["name"] if encoder else "")
    stats = []
    for t in tasks:
        with open(os.path.join(t["work"], "stats.json")) as f:
            stats.append(json.load(f))
    records = sum(s["records"] for s in stats)
    reasons: Counter = Counter()
    for s in stats:
        reasons.update(s["rejected"])
    bad = sum(reasons.values())
    examples = [e for s in stats for e in s["examples"]][:_MAX_EXAMPLES]
    if records and bad / records > opts.max_bad_fraction:
        top = ", ".join(f"{n} {r}" for r, n in reasons.most_common(3))
        raise TooManyRejects(
            f"{bad} of {records} records are bad ({top}; first: {examples[0]}), above "
            f"--max_bad_fraction={opts.max_bad_fraction}: fix the inputs or raise the fraction."
        )
    if not sum(s["documents"] for s in stats):
        raise ValueError(f"no document in {len(mine)} input file(s) of part {opts.part_index}.")
    if encoder is not None:  # a resumed run may have used the other encoder for some inputs
        encoder["name"] = "+".join(sorted({s.get("encoder") or "tokenizers" for s in stats}))
        tokenizer["encoder"] = encoder
    max_id = max(s["max_id"] for s in stats)
    dtype = np.uint16 if max_id < (1 << 16) else np.uint32  # the largest id actually seen
    splits = _assemble(tasks, stats, opts, fields, dtype)
    if tokenizer["files"]:
        tok_dir = os.path.join(opts.out, "tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        for p in tokenizer_files(opts.tokenizer):
            shutil.copyfile(p, os.path.join(tok_dir, os.path.basename(p)))
    manifest = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "kind": opts.kind,
        "part": {"index": opts.part_index, "count": opts.num_parts},
        "settings": settings,
        "settings_sha256": settings_sha,
        "tokenizer": tokenizer,
        "dtype": np.dtype(dtype).name,
        "max_token_id": max_id,
        "records": records,
        "inputs": [
            {k: s[k] for k in ("name", "bytes", "sha256", "records", "documents", "tokens")}
            | {"rejected": sum(s["rejected"].values())}
            for s in stats
        ],
        "rejects": {"total": bad, "by_reason": dict(sorted(reasons.items())), "first": examples},
        "splits": splits,
    }
    fmt.write_manifest(opts.out, manifest)
    shutil.rmtree(work_root, ignore_errors=True)
    return manifest
