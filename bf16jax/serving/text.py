"""An artifact's text: its tokenizer file, and incremental detokenization with stop strings.

`FileTokenizer` reads the BPE `tokenizer.json` or SentencePiece model an artifact carries;
`TextStream(decode, stops)` takes a request's generated token ids one at a time and releases
the completion text as it becomes final, with stop strings matched on the decoded text (vLLM /
TGI's way); `complete` replays a finished generation through one. Invariants:

- this module imports only the standard library (and `tokenizers` / `sentencepiece` for those
  files): export copies it into every artifact as `text.py`, which `loader.py` runs without
  bf16jax;
- text is released only when it is stable: the new ids are decoded together with the ids since
  the last release (a window that starts on a clean boundary), and text ending in U+FFFD (an
  incomplete UTF-8 / byte-fallback character) waits for the next id; so the released pieces,
  joined, equal `decode(all ids)` and no replacement character leaks mid-stream;
- a stop string may begin or end inside a token or span several; the first one to complete
  ends the completion, which is cut at its start (OpenAI: the stop string is not returned);
- held back is only the text that could still start a stop string (the longest tail of the
  text that is a proper prefix of one), so nothing released is ever taken back;
- `kept` counts the ids whose text starts before the cut (the ids of the returned text).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["FileTokenizer", "TextStream", "complete"]


class TextStream:
    """One request's text: `add(id)` -> (released text, stopped); `finish()` -> the rest.

    Args:
      decode: token ids -> text (the artifact's tokenizer; special ids decode to "").
      stops: stop strings (non-empty), matched on the decoded completion text.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # the stable text of the ids before `_read`
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text` (a clean window)
        self._read = 0
        self._starts: list[int] = []  # per id: len(text) when it was added
        self.sent = 0  # characters of `text` released
        self.cut: int | None = None  # where a stop string starts, once one matched

    @property
    def kept(self) -> int:
        """Ids whose text starts before the cut (all ids without a stop)."""
        if self.cut is None:
            return len(self.ids)
        return sum(start < self.cut for start in self._starts)

    def add(self, token: int) -> tuple[str, bool]:
        """Appends one generated id; returns (newly released text, whether a stop matched)."""
        if self.cut is not None:
            raise ValueError("TextStream.add after a stop string matched: the request is over.")
        self._starts.append(len(self.text))
        self.ids.append(int(token))
        before = len(self.text)
        self._settle(final=False)
        if self.stops and len(self.text) > before:
            cut = self._match(before)
            if cut is not None:
                self.cut = cut
                out, self.sent = self.text[self.sent : cut], cut
                return out, True
        hold = self._held() if self.stops else 0
        end = max(len(self.text) - hold, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out, False

    def finish(self) -> str:
        """The text still held (partial characters included, as `decode` gives them) when the
        request ends without a stop string; "" after one."""
        if self.cut is not None:
            return ""
        self._settle(final=True)
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def _settle(self, final: bool) -> None:
        """Moves the decoded text of ids[_read:] into `text` once it is stable (or `final`)."""
        if self._read == len(self.ids):
            return
        known = self.decode(self.ids[self._prefix : self._read]) if self._read else ""
        new = self.decode(self.ids[self._prefix :])
        if final or (len(new) > len(known) and not new.endswith("\ufffd")):
            # why: a window decode may differ from `known` only past its end (the same ids).
            self.text += new[len(known) :]
            self._prefix, self._read = self._read, len(self.ids)

    def _match(self, before: int) -> int | None:
        """Start of the first stop string completed by the text added after `before`."""
        best = None
        for s in self.stops:
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at >= 0:
                end = at + len(s)
                if best is None or end < best[0] or (end == best[0] and at < best[1]):
                    best = (end, at)
        return None if best is None else best[1]

    def _held(self) -> int:
        """Length of the longest tail of `text` (not yet released) that starts a stop string."""
        tail = self.text[self.sent :]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(tail)), hold, -1):
                if tail.endswith(s[:k]):
                    hold = k
                    break
        return hold


def complete(decode: Callable[[Sequence[int]], str], ids: Sequence[int], stops: Sequence[str],
             ) -> dict:  # fmt: skip
    """A finished generation's ids replayed through a `TextStream` (whole-batch generation,
    which samples past a stop string): {"pieces" (text released per id, up to the stop),
    "tail", "text", "stopped", "kept"}."""
    stream = TextStream(decode, stops)
    pieces = []
    for token in ids:
        piece, stopped = stream.add(token)
        pieces.append(piece)
        if stopped:
            break
    tail = stream.finish()
    return {"pieces": pieces, "tail": tail, "text": "".join(pieces) + tail,
            "stopped": stream.cut is not None, "kept": stream.kept}  # fmt: skip


class FileTokenizer:
    """A BPE `tokenizer.json` (GPT-2's conventions: nothing added on encode) or a SentencePiece
    model (T5's: `extra_ids` sentinels counted down from the top) as a manifest describes it
    (`info`) in `directory`, read as `bf16jax.data.tokenizer` reads them; needs `tokenizers` or
    `sentencepiece`."""

    def __init__(self, info: dict[str, Any], directory: str):
        self.kind, self.info = info.get("kind"), info
        if "file" not in info:
            raise ValueError(f"The manifest names a {self.kind} tokenizer but no file of it: "
                             "re-export, or pass token ids.")  # fmt: skip
        path = os.path.join(directory, info["file"])
        try:
            if self.kind == "BPETokenizer":
                import tokenizers

                self._tok = tokenizers.Tokenizer.from_file(path)
            elif self.kind == "SentencePieceTokenizer":
                import sentencepiece

                self._tok = sentencepiece.SentencePieceProcessor(model_file=path)
                self.pieces = self._tok.get_piece_size()
            else:
                raise ValueError(f"Unknown tokenizer kind {self.kind!r} in the manifest.")
        except ImportError as e:
            raise ValueError(f"This model's text needs the {e.name} package (pip install "
                             f"{e.name}), or pass token ids.") from None  # fmt: skip

    def encode(self, text: str) -> list[int]:
        if self.kind == "BPETokenizer":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self.kind == "BPETokenizer":
            return self._tok.decode(ids, skip_special_tokens=True)
        out, run, top = [], [], self.info["vocab_size"] - 1
        for i in ids:
            if i in (self.info["pad_id"], self.info["eos_id"]):
                continue
            if i >= self.pieces:  # a sentinel
                out += [self._tok.decode(run), f"<extra_id_{top - i}>"]
                run = []
            else:
                run.append(i)
        return "".join([*out, self._tok.decode(run)])
