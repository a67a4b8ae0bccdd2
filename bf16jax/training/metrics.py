"""Training metrics: FLOPs and MFU (with the convention stated), device peaks, metric writers.

MFU convention (PaLM, arXiv:2204.02311, appendix B; causal attention halved): training FLOPs per
token = 6 * N + 6 * L * T * D, where N counts every parameter except position embeddings, L is
the number of attention layers, T the sequence length and D the attention width (heads *
head_dim). The causal attention term is 6LTD, half of PaLM's 12LTD, because a causal mask
skips half the score matrix. MFU = achieved FLOP/s / the device's dense BF16 peak, whatever the
policy (an FP32 run is judged against the same peak). Unknown devices (CPU) report no MFU.
Writers: one JSON object per line (`metrics.jsonl`) and TensorBoard event files (tensorboardX).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bf16jax.training import history

__all__ = [
    "PEAK_BF16_FLOPS",
    "device_peak_flops",
    "peak_flops_of_kind",
    "flops_per_token",
    "mfu",
    "MetricWriter",
    "bytes_per_param",
]

# Dense BF16 peak FLOP/s per chip (vendor datasheets; no sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989.4e12,  # SXM; the PCIe card is 756e12 (matched first, below)
    "H200": 989.4e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
_SPECIAL = {"H100 PCIe": 756e12}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """The dense BF16 peak of `device` (default: the first device), or None if unknown (CPU)."""
    device = device or jax.devices()[0]
    return peak_flops_of_kind(getattr(device, "device_kind", ""))


def peak_flops_of_kind(kind: str) -> float | None:
    """The dense BF16 peak of a device named `kind` ("NVIDIA H200", "TPU v5 lite"), or None."""
    for name, peak in _SPECIAL.items():
        if name in kind:
            return peak
    # Longest name first: "TPU v5 lite" before "TPU v5".
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_BF16_FLOPS[name]
    return None


def flops_per_token(n_params: int, *, num_layers: int, seq_len: int, attn_dim: int) -> float:
    """Training FLOPs per token: 6N + 6 * L * T * D (see the module docstring)."""
    return 6.0 * n_params + 6.0 * num_layers * seq_len * attn_dim


def mfu(tokens_per_second: float, flops_token: float, peak: float | None, n_devices: int):
    """Model FLOPs utilization in [0, 1], or None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_second * flops_token / (peak * n_devices)


def _scalar(value: Any) -> Any:
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _is_url(path: str) -> bool:
    return "://" in str(path)


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tb`.

    Only process 0 writes (the others get a writer that does nothing). JSON lines are appended,
    so a resumed run continues the same file; `resume_step=S` (or `truncate(S)`) first drops
    what was logged after step S (`bf16jax.training.history`), so each step is logged once. A URL
    workdir
    (gs://..., as on TPU pods) goes through etils.epath: object stores cannot append, so the
    file is rewritten whole on each write (metrics are small).
    """

    def __init__(
        self, workdir: str | None, *, tensorboard: bool = True, resume_step: int | None = None
    ):
        self.enabled = workdir is not None and jax.process_index() == 0
        self.workdir = workdir
        self._tensorboard = tensorboard
        self._jsonl = None
        self._remote: tuple[Any, list[str]] | None = None
        self._tb = None
        if self.enabled:
            self._open(resume_step)

    def _open(self, resume_step: int | None) -> None:
        workdir = self.workdir
        if _is_url(workdir):
            from etils import epath  # comes with orbax-checkpoint

            path = epath.Path(workdir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            if resume_step is not None:
                lines, _ = history.truncate_lines(lines, resume_step)
                path.write_text("".join(lines))
            self._remote = (path, lines)
        else:
            if resume_step is not None:
                history.truncate_history(workdir, resume_step)
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        if self._tensorboard:
            from tensorboardX import SummaryWriter  # optional at import time: heavy

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def truncate(self, step: int) -> None:
        """Drops every row and event logged after `step` (a rollback); keeps writing."""
        if not self.enabled:
            return
        self.close()
        self._open(step)

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Writes `metrics` (arrays become Python numbers) at `step`; returns the converted dict."""
        row = {f"{prefix}{k}": _scalar(v) for k, v in metrics.items()}
        if not self.enabled:
            return row
        line = json.dumps({"step": int(step), **row}) + "\n"
        if self._remote is not None:
            path, lines = self._remote
            lines.append(line)
            path.write_text("".join(lines))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()
        return row

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def bytes_per_param(tree, n_params: int) -> float:
    """Bytes of every array in `tree` (arrays or ShapeDtypeStructs) divided by `n_params`."""
    total = sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "shape") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )
    return total / max(n_params, 1)
