"""Byte-level tokenizer with T5-style sentinels: no vocabulary file, nothing to download.

Ids: PAD=0, EOS=1, UTF-8 byte b -> b + 2 (2..257), sentinel i -> 258 + i for i < 100 (258..357);
358..383 are reserved so that VOCAB_SIZE=384 is a multiple of 128 (friendly to TPU/GPU matmul
tiles). `decode(encode(s)) == s` for every str; `decode` drops PAD and EOS and writes sentinel i
as `<extra_id_i>` (T5's spelling, arXiv:1910.10683), which is how span-corruption examples are
read back. Invalid UTF-8 (a model's samples) decodes with U+FFFD instead of raising.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "PAD_ID",
    "EOS_ID",
    "BYTE_OFFSET",
    "SENTINEL_OFFSET",
    "NUM_SENTINELS",
    "VOCAB_SIZE",
    "encode",
    "decode",
    "sentinel_id",
]

PAD_ID = 0
EOS_ID = 1
BYTE_OFFSET = 2
SENTINEL_OFFSET = BYTE_OFFSET + 256  # 258
NUM_SENTINELS = 100
VOCAB_SIZE = 384


def sentinel_id(i: int) -> int:
    """Returns the id of sentinel `<extra_id_i>` (258 + i)."""
    if not 0 <= i < NUM_SENTINELS:
        raise ValueError(
            f"Sentinel index {i} is out of range: use 0..{NUM_SENTINELS - 1} (there are "
            f"{NUM_SENTINELS} sentinels)."
        )
    return SENTINEL_OFFSET + i


def encode(text: str, *, add_eos: bool = False) -> np.ndarray:
    """Encodes `text` as UTF-8 bytes shifted by 2.

    Args:
      text: any Python string.
      add_eos: append EOS_ID (1).

    Returns:
      int32 array of shape [len(text.encode("utf-8")) + add_eos].
    """
    if not isinstance(text, str):
        raise ValueError(f"encode expects a str, got {type(text).__name__}: decode bytes first.")
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
    if add_eos:
        ids = np.append(ids, np.int32(EOS_ID))
    return ids


def decode(ids: ArrayLike) -> str:
    """Decodes ids back to text: bytes as UTF-8, sentinels as `<extra_id_i>`, PAD/EOS dropped.

    Args:
      ids: a 1-D sequence of ints in [0, VOCAB_SIZE).

    Returns:
      The text. Reserved ids (358..383) decode to U+FFFD.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}.")
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(
            f"decode got ids in [{ids.min()}, {ids.max()}]: ids must lie in [0, {VOCAB_SIZE})."
        )
    pieces: list[str] = []
    run: list[int] = []  # consecutive byte ids, decoded together so multi-byte UTF-8 survives

    def flush():
        if run:
            pieces.append(bytes(run).decode("utf-8", errors="replace"))
            run.clear()

    for i in ids.tolist():
        if BYTE_OFFSET <= i < SENTINEL_OFFSET:
            run.append(i - BYTE_OFFSET)
            continue
        flush()
        if SENTINEL_OFFSET <= i < SENTINEL_OFFSET + NUM_SENTINELS:
            pieces.append(f"<extra_id_{i - SENTINEL_OFFSET}>")
        elif i >= SENTINEL_OFFSET + NUM_SENTINELS:
            pieces.append("\ufffd")
    flush()
    return "".join(pieces)
