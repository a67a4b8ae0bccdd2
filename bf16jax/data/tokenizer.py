"""Tokenizers: bytes with T5-style sentinels (the default), and pretrained models' own files.

`load_tokenizer(spec)` gives an object with `encode(text, add_eos=...)`, `decode(ids)`,
`vocab_size`, `pad_id`, `eos_id`: `ByteTokenizer` for "", `SentencePieceTokenizer` for a T5
`spiece.model` (ids as Hugging Face's T5Tokenizer: pieces, then 100 sentinels counted down),
`BPETokenizer` for a GPT-2 byte-level BPE `tokenizer.json`; files are read from a directory
(e.g. one `bf16jax.interop.convert` wrote), never downloaded.

The byte tokenizer needs no vocabulary file.

Ids: PAD=0, EOS=1, UTF-8 byte b -> b + 2 (2..257), sentinel i -> 258 + i for i < 100 (258..357);
358..383 are reserved so that VOCAB_SIZE=384 is a multiple of 128 (friendly to TPU/GPU matmul
tiles). `decode(encode(s)) == s` for every str; `decode` drops PAD and EOS and writes sentinel i
as `<extra_id_i>` (T5's spelling, arXiv:1910.10683), which is how span-corruption examples are
read back. Invalid UTF-8 (a model's samples) decodes with U+FFFD instead of raising.
"""

from __future__ import annotations

import json
import os

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
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "BPETokenizer",
    "load_tokenizer",
    "encode_batch",
    "sentinel_ids",
    "tokenizer_files",
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


# ----------------------------------------------------------------------------- pretrained
class ByteTokenizer:
    """The byte tokenizer above as an object (the default of every bundled dataset)."""

    pad_id = PAD_ID
    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, add_eos: bool = False) -> np.ndarray:
        return encode(text, add_eos=add_eos)

    def decode(self, ids: ArrayLike) -> str:
        return decode(ids)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A T5 / FLAN-T5 `spiece.model` (the `sentencepiece` package), with T5's conventions.

    Ids: the model's pieces (pad 0, eos 1, unk 2 in T5's models), then `extra_ids` sentinels
    counted down from the top as Hugging Face's T5Tokenizer does (`<extra_id_0>` is
    piece_size + extra_ids - 1). `encode(text, add_eos=True)` gives T5Tokenizer's ids.
    """

    def __init__(self, path: str, extra_ids: int = 100):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model {path} not found.")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model ({e}).") from None
        self.path = path
        self.pieces = self._sp.get_piece_size()
        self.extra_ids = extra_ids
        self.vocab_size = self.pieces + extra_ids
        self.pad_id = max(self._sp.pad_id(), 0)
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{path} defines no EOS piece: T5 models need one (eos_id=1).")

    def sentinel_id(self, i: int) -> int:
        """The id of `<extra_id_i>` (T5: 32099 for i = 0 with 32000 pieces)."""
        if not 0 <= i < self.extra_ids:
            raise ValueError(f"Sentinel {i} out of range: this tokenizer has {self.extra_ids}.")
        return self.vocab_size - 1 - i

    def encode(self, text: str, *, add_eos: bool = False) -> np.ndarray:
        ids = self._sp.encode(text) + ([self.eos_id] if add_eos else [])
        return np.asarray(ids, np.int32)

    def decode(self, ids: ArrayLike) -> str:
        out, run = [], []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i in (self.pad_id, self.eos_id):
                continue
            if i >= self.pieces:
                out.append(self._sp.decode(run))
                run = []
                out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, extra_ids={self.extra_ids})"


class BPETokenizer:
    """A byte-level BPE `tokenizer.json` (GPT-2's; the `tokenizers` package). No special tokens
    are added on encode (as GPT2TokenizerFast); EOS is `<|endoftext|>` when the file has it."""

    def __init__(self, path: str):
        import tokenizers

        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer file {path} not found.")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{path} is not a tokenizers JSON file ({e}).") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eot = self._tok.token_to_id("<|endoftext|>")
        self.eos_id = eot
        self.pad_id = eot  # GPT-2 has no pad token; padded positions carry weight 0

    def encode(self, text: str, *, add_eos: bool = False) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_eos:
            if self.eos_id is None:
                raise ValueError(f"{self.path} has no <|endoftext|> token to end a text with.")
            ids.append(self.eos_id)
        return np.asarray(ids, np.int32)

    def decode(self, ids: ArrayLike) -> str:
        return self._tok.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"BPETokenizer({self.path!r})"


Tokenizer = ByteTokenizer | SentencePieceTokenizer | BPETokenizer


def load_tokenizer(spec: str = "") -> Tokenizer:
    """The tokenizer `spec` names (`config.data.tokenizer`).

    Args:
      spec: "" for bytes; a directory holding `spiece.model` (SentencePiece, preferred, as T5)
        or `tokenizer.json` (byte-level BPE, as GPT-2), e.g. a `bf16jax.interop.convert` directory;
        or
        the path of such a file.

    Raises:
      FileNotFoundError: naming what was looked for.
    """
    if not spec:
        return ByteTokenizer()
    if "://" not in spec and not os.path.exists(spec):
        raise FileNotFoundError(
            f"config.data.tokenizer={spec} does not exist: pass a directory holding spiece.model "
            "or tokenizer.json (e.g. a `bf16jax.convert import` output), or leave it empty for "
            "bytes."
        )
    if os.path.isdir(spec):
        for name, make in (("spiece.model", _sentencepiece), ("tokenizer.json", BPETokenizer)):
            path = os.path.join(spec, name)
            if os.path.isfile(path):
                return make(path)
        raise FileNotFoundError(
            f"{spec} has no spiece.model (SentencePiece) or tokenizer.json (BPE): copy the "
            "model's tokenizer files there, or leave data.tokenizer empty for bytes."
        )
    if spec.endswith(".model"):
        return _sentencepiece(spec)
    if spec.endswith(".json"):
        return BPETokenizer(spec)
    raise FileNotFoundError(
        f"data.tokenizer={spec!r} is neither a directory nor a .model / .json tokenizer file."
    )


def encode_batch(tok: Tokenizer, texts: list[str], *, add_eos: bool = False) -> list[np.ndarray]:
    """`[tok.encode(t, add_eos=add_eos) for t in texts]`, batched where the library batches
    (the `tokenizers` package's Rust `encode_batch`, SentencePiece's list encode)."""
    if isinstance(tok, BPETokenizer):
        if add_eos and tok.eos_id is None:
            raise ValueError(f"{tok.path} has no <|endoftext|> token to end a text with.")
        encs = tok._tok.encode_batch_fast(texts, add_special_tokens=False)
        tail = [tok.eos_id] if add_eos else []
        return [np.asarray(e.ids + tail, np.int32) for e in encs]
    if isinstance(tok, SentencePieceTokenizer):
        tail = [tok.eos_id] if add_eos else []
        return [np.asarray(ids + tail, np.int32) for ids in tok._sp.encode(texts)]
    return [encode(t, add_eos=add_eos) for t in texts]


def sentinel_ids(tok: Tokenizer) -> np.ndarray:
    """The ids of `<extra_id_0>`, `<extra_id_1>`, ... of `tok` (int32 [n]; empty for a BPE
    tokenizer, which has none): bytes 258 + i, SentencePiece vocab_size - 1 - i (T5: 32099
    counting down)."""
    if isinstance(tok, SentencePieceTokenizer):
        return np.asarray([tok.sentinel_id(i) for i in range(tok.extra_ids)], np.int32)
    if isinstance(tok, ByteTokenizer):
        return np.arange(SENTINEL_OFFSET, SENTINEL_OFFSET + NUM_SENTINELS, dtype=np.int32)
    return np.zeros(0, np.int32)


def tokenizer_files(spec: str) -> list[str]:
    """The files `load_tokenizer(spec)` reads (for hashing and copying); [] for bytes."""
    if not spec:
        return []
    tok = load_tokenizer(spec)
    files = [tok.path]
    config = os.path.join(os.path.dirname(tok.path), "tokenizer_config.json")
    if isinstance(tok, SentencePieceTokenizer) and os.path.isfile(config):
        files.append(config)
    return files


def _sentencepiece(path: str) -> SentencePieceTokenizer:
    """With `extra_ids` from a tokenizer_config.json beside it (T5 default 100)."""
    extra = 100
    config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            extra = int(json.load(f).get("extra_ids", extra))
    return SentencePieceTokenizer(path, extra_ids=extra)
