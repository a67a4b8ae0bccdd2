"""The `q=` grammar of policy strings: quantization settings and FP8 options.

A setting is "none", w<bits>[a<bits>] with 2..8 bits each (LSQ, `bf16jax.nn.quant`), or
`fp8[:h<N>][:m<N>][:<format>]` (FP8 delayed scaling). `parse_quant` turns what a user wrote into
the canonical setting every layer compares against; `quant_bits`, `is_fp8` and `fp8_options`
read a canonical setting. `bf16jax.precision` re-exports them.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "FP8",
    "FP8_FORMATS",
    "FP8_DEFAULTS",
    "is_fp8",
    "fp8_options",
    "parse_quant",
    "quant_bits",
]

# Quantization settings (bf16jax.nn.quant): "none", w<bits>[a<bits>] with 2..8 bits each
# (LSQ; weights per output channel, input activations per tensor; no "a" = weights only), or
# "fp8[:h<N>][:m<N>][:<format>]" (delayed scaling from amax histories of N steps, default 1024
# as Transformer Engine and Flax; margin m; format hybrid = E4M3 operands and E5M2 gradients,
# or e4m3 everywhere).
_QUANT_RE = re.compile(r"w([2-8])(?:a([2-8]))?")
_QUANT_NONE = ("none", "off", "fp", "")
FP8 = "fp8"
FP8_FORMATS = ("hybrid", "e4m3")
FP8_DEFAULTS = {"history": 1024, "margin": 0, "format": "hybrid"}
_FP8_OPTION_RE = re.compile(r"(?:h(\d+)|m(\d+)|(hybrid|e4m3))")


def is_fp8(quant: str | None) -> bool:
    """True for an FP8 quant setting ("fp8" or "fp8:..." with options)."""
    return quant is not None and (quant == FP8 or quant.startswith(FP8 + ":"))


def fp8_options(quant: str) -> dict[str, Any]:
    """{"history": int, "margin": int, "format": "hybrid" | "e4m3"} of an FP8 quant setting."""
    if not is_fp8(quant):
        raise ValueError(f"{quant!r} is not an FP8 quant setting (fp8[:h<N>][:m<N>][:format]).")
    return _parse_fp8(quant, quant)


def _parse_fp8(key: str, context: str) -> dict[str, Any]:
    opts = dict(FP8_DEFAULTS)
    seen = set()
    for part in key.split(":")[1:]:
        m = _FP8_OPTION_RE.fullmatch(part)
        name = None if m is None else ("history", "margin", "format")[m.lastindex - 1]
        if m is None or name in seen:
            raise ValueError(
                f"Bad FP8 option {part!r} in policy {context!r}: write q=fp8[:h<steps>][:m<margin>]"
                f"[:{'|'.join(FP8_FORMATS)}], each at most once (e.g. q=fp8:h16:m1:e4m3)."
            )
        seen.add(name)
        opts[name] = m.group(m.lastindex) if name == "format" else int(m.group(m.lastindex))
    if opts["history"] < 1:
        raise ValueError(
            f"FP8 amax history h{opts['history']} in policy {context!r}: use h1 or more."
        )
    return opts


def _fp8_canonical(opts: dict[str, Any]) -> str:
    parts = [FP8]
    if opts["history"] != FP8_DEFAULTS["history"]:
        parts.append(f"h{opts['history']}")
    if opts["margin"] != FP8_DEFAULTS["margin"]:
        parts.append(f"m{opts['margin']}")
    if opts["format"] != FP8_DEFAULTS["format"]:
        parts.append(opts["format"])
    return ":".join(parts)


def parse_quant(text: str, context: str | None = None) -> str:
    """Canonical quant setting ("none", "w8a8", "w4a8", "w8", "fp8", "fp8:h16", ...) for `text`.

    Raises:
      ValueError: naming the bad value and the accepted forms.
    """
    key = str(text).strip().lower()
    if key in _QUANT_NONE:
        return "none"
    if is_fp8(key):
        return _fp8_canonical(_parse_fp8(key, context or text))
    if not _QUANT_RE.fullmatch(key):
        raise ValueError(
            f"Unknown quantization {text!r} in policy {context or text!r}: use none, "
            "fp8[:h<N>][:m<N>][:hybrid|e4m3], or w<bits>a<bits> / w<bits> with 2..8 bits "
            "(e.g. q=w8a8, q=w4a8, q=w8, q=fp8, q=fp8:h16)."
        )
    return key


def quant_bits(quant: str) -> tuple[int, int | None] | None:
    """(weight_bits, activation_bits or None) of an LSQ quant setting; None for "none"/"fp8"."""
    m = _QUANT_RE.fullmatch(quant)
    if m is None:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)
