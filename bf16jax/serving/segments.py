"""Scoring packed rows with programs that take no segment ids: one document per row.

A packed batch (`segment_ids` / `positions` for GPT, `encoder_segment_ids` /
`decoder_segment_ids` for T5: 1, 2, ... per document, 0 = padding) holds several documents per
row; the serving programs (`inference.Programs.score`) attend over the whole row. Each segment is
moved to a row of its own (positions then restart at 0, as the packed positions do), scored, and
its logits put back where the segment was, so every token's logits are the ones the model
computes for its document alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["unpacked_logits"]


def _segments(seg: np.ndarray) -> list[tuple[int, int]]:
    """(row, segment id) of every non-padding segment of `seg` [B, T], in row order."""
    return [(b, int(k)) for b in range(seg.shape[0]) for k in np.unique(seg[b]) if k > 0]


def _rows(x: np.ndarray, seg: np.ndarray, pieces: list[tuple[int, int]]) -> np.ndarray:
    """[len(pieces), T]: segment k of row b of `x`, left-aligned, zero padded."""
    out = np.zeros((len(pieces), x.shape[1]), np.int32)
    for r, (b, k) in enumerate(pieces):
        idx = np.flatnonzero(seg[b] == k)
        out[r, : len(idx)] = x[b, idx]
    return out


def unpacked_logits(fn: Callable[..., np.ndarray], batch: dict, t: int) -> np.ndarray:
    """Logits [B, t, V] of a packed `batch`, each segment scored alone.

    Args:
      fn: GPT `fn(inputs [n, T]) -> [n, T, V]`, or T5 `fn(encoder_inputs, decoder_inputs)`.
      batch: the packed batch (the keys above; T5's decoder inputs restart per segment).
      t: the width of the logits to return (the batch's target width).
    """
    gpt = "segment_ids" in batch
    out_seg = np.asarray(batch["segment_ids" if gpt else "decoder_segment_ids"])
    pieces = _segments(out_seg)
    if gpt:
        args = [_rows(np.asarray(batch["inputs"]), out_seg, pieces)]
    else:
        enc_seg = np.asarray(batch["encoder_segment_ids"])
        args = [
            _rows(np.asarray(batch["encoder_inputs"]), enc_seg, pieces),
            _rows(np.asarray(batch["decoder_inputs"]), out_seg, pieces),
        ]
    # Calls of the batch's own size: a jitted program compiles once, whatever the packing.
    size = out_seg.shape[0]
    parts = []
    for lo in range(0, len(pieces), size):
        chunk = [a[lo : lo + size] for a in args]
        n = len(chunk[0])
        chunk = [np.pad(a, ((0, size - n), (0, 0))) for a in chunk]
        parts.append(np.asarray(fn(*chunk))[:n])
    logits = np.concatenate(parts) if parts else np.zeros((0, t, 1), np.float32)
    full = np.zeros((out_seg.shape[0], t, logits.shape[-1]), logits.dtype)
    for r, (b, k) in enumerate(pieces):
        idx = np.flatnonzero(out_seg[b, :t] == k)
        full[b, idx] = logits[r, : len(idx)]
    return full
