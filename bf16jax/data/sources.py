"""Readers of raw text inputs for `bf16jax.data.prepare`: .txt, .jsonl (+ .gz / .zst), .parquet.

`expand_inputs` turns files, directories (searched recursively) and globs into one sorted list
of input files; `read_records` streams one file's records as `Record(line, fields, reason)`:
`fields` maps each requested field name to its text, or `reason` says why the record is bad
(invalid JSON, a missing or non-string field, empty or non-UTF-8 text). Nothing is held in
memory beyond one record (a .txt read with `txt_unit="file"` is one record, read whole; a
.parquet file is read a row batch at a time). `line` is the 1-based line (.txt, .jsonl) or row
(.parquet) where the record starts, for error messages.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

__all__ = [
    "INPUT_SUFFIXES",
    "TXT_UNITS",
    "Record",
    "expand_inputs",
    "first_texts",
    "input_format",
    "read_records",
]

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")
TXT_UNITS = ("line", "paragraph", "file")
_PARQUET_BATCH = 1024


class Record(NamedTuple):
    line: int
    fields: dict[str, str] | None
    reason: str | None


def input_format(path: str) -> tuple[str, str]:
    """(".txt" | ".jsonl" | ".parquet", "" | ".gz" | ".zst") of `path`; ValueError otherwise."""
    name = path.lower()
    for comp in (".gz", ".zst"):
        if name.endswith(comp):
            name, compression = name[: -len(comp)], comp
            break
    else:
        compression = ""
    for suffix in INPUT_SUFFIXES:
        if name.endswith(suffix) and not (suffix == ".parquet" and compression):
            return suffix, compression
    raise ValueError(
        f"input {path}: unknown format; use .txt, .jsonl (optionally .gz / .zst) or .parquet."
    )


def _is_input(path: str) -> bool:
    try:
        input_format(path)
    except ValueError:
        return False
    return True


def expand_inputs(patterns: list[str]) -> list[str]:
    """Sorted, de-duplicated input files named by `patterns` (files, directories, globs).

    Raises:
      ValueError: a pattern that matches nothing, or a named file of an unknown format.
    """
    found: set[str] = set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            hits = [
                os.path.join(root, f)
                for root, _, files in os.walk(pattern)
                for f in files
                if _is_input(f)
            ]
            if not hits:
                raise ValueError(
                    f"input directory {pattern} holds no .txt, .jsonl(.gz/.zst) or .parquet file."
                )
        elif os.path.isfile(pattern):
            input_format(pattern)  # raises for an unknown format
            hits = [pattern]
        else:
            hits = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            hits = [p for p in hits if _is_input(p)]
            if not hits:
                raise ValueError(f"input {pattern}: no such file, and no input file matches it.")
        found.update(os.path.normpath(p) for p in hits)
    return sorted(found)


def _open_binary(path: str, compression: str, raw: io.BufferedReader) -> io.BufferedIOBase:
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _check_text(fields: dict[str, str], surrogates: bool = True) -> str | None:
    """Why `fields` is no document (empty text, a lone surrogate), or None."""
    for name, text in fields.items():
        if not text.strip():
            return f"empty {name}"
        if surrogates:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return f"{name} is not UTF-8 (a lone surrogate)"
    return None


def _jsonl_record(line_no: int, data: bytes, names: tuple[str, ...]) -> Record:
    text = _decode(data)
    if text is None:
        return Record(line_no, None, "not UTF-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Record(line_no, None, f"invalid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return Record(line_no, None, "invalid JSON (not an object)")
    fields = {}
    for name in names:
        value = obj.get(name)
        if value is None:
            return Record(line_no, None, f"missing field {name!r}")
        if not isinstance(value, str):
            return Record(line_no, None, f"field {name!r} is not a string")
        fields[name] = value
    # Only a JSON escape can make a lone surrogate: skip the encode check without one.
    reason = _check_text(fields, surrogates="\\ud" in text.lower())
    return Record(line_no, None if reason else fields, reason)


def _txt_records(stream, unit: str, name: str) -> Iterator[Record]:
    def record(line_no: int, data: bytes) -> Record:
        text = _decode(data)
        if text is None:
            return Record(line_no, None, "not UTF-8")
        if not text.strip():
            return Record(line_no, None, f"empty {name}")
        return Record(line_no, {name: text}, None)

    if unit == "file":
        yield record(1, stream.read())
        return
    if unit == "line":
        for i, data in enumerate(stream, 1):
            data = data.rstrip(b"\r\n")
            if data.strip():  # blank lines separate nothing: not records, not rejects
                yield record(i, data)
        return
    start, buf = 0, []
    for i, data in enumerate(stream, 1):
        if data.strip():
            if not buf:
                start = i
            buf.append(data)
        elif buf:
            yield record(start, b"".join(buf).rstrip(b"\r\n"))
            buf = []
    if buf:
        yield record(start, b"".join(buf).rstrip(b"\r\n"))


def _parquet_records(path: str, names: tuple[str, ...], report) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = set(pf.schema_arrow.names)
    missing = [n for n in names if n not in columns]
    rows = pf.metadata.num_rows
    size = os.path.getsize(path)
    if missing:
        for i in range(rows):
            yield Record(i + 1, None, f"missing field {missing[0]!r}")
        report(size)
        return
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=list(names)):
        cols = [batch.column(n).to_pylist() for n in names]
        for values in zip(*cols, strict=True):
            row += 1
            fields = {}
            reason = None
            for n, v in zip(names, values, strict=True):
                if v is None:
                    reason = f"missing field {n!r}"
                    break
                if isinstance(v, bytes):
                    v = _decode(v)
                    if v is None:
                        reason = "not UTF-8"
                        break
                if not isinstance(v, str):
                    reason = f"field {n!r} is not a string"
                    break
                fields[n] = v
            reason = reason or _check_text(fields)
            yield Record(row, None if reason else fields, reason)
        report(size * batch.num_rows // max(rows, 1))


def read_records(
    path: str,
    names: tuple[str, ...],
    *,
    txt_unit: str = "paragraph",
    report: Callable[[int], None] = lambda n: None,
) -> Iterator[Record]:
    """Streams the records of one input file.

    Args:
      path: a .txt, .jsonl(.gz/.zst) or .parquet file.
      names: the fields to read (a .txt file has one, its text, under `names[0]`).
      txt_unit: what one .txt record is: a "line", a "paragraph" (lines up to a blank line),
        or the whole "file".
      report: called with the number of (compressed) input bytes consumed since its last call.
    """
    suffix, compression = input_format(path)
    if suffix == ".parquet":
        yield from _parquet_records(path, names, report)
        return
    if suffix == ".txt" and len(names) != 1:
        raise ValueError(
            f"input {path}: a .txt file holds one text per record; text-to-text and "
            "prompt/completion sets need .jsonl or .parquet with named fields."
        )
    with open(path, "rb") as raw:
        stream = _open_binary(path, compression, raw)
        last = 0

        def progress():
            nonlocal last
            pos = raw.tell()
            if pos != last:
                report(pos - last)
                last = pos

        if suffix == ".txt":
            for n, rec in enumerate(_txt_records(stream, txt_unit, names[0])):
                yield rec
                if n % 256 == 0:
                    progress()
        else:
            for i, data in enumerate(stream, 1):
                if not data.strip():
                    continue  # a blank line is no record
                yield _jsonl_record(i, data, names)
                if i % 256 == 0:
                    progress()
        progress()


def first_texts(paths: list[str], names: tuple[str, ...], txt_unit: str, n: int) -> list[str]:
    """The texts (every field of `names`) of the first `n` good records of `paths`."""
    texts: list[str] = []
    for path in paths:
        for rec in read_records(path, names, txt_unit=txt_unit):
            if rec.fields is not None:
                texts.extend(rec.fields[k] for k in names)
            if len(texts) >= n * len(names):
                return texts
    return texts
