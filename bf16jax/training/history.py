"""One history per run directory: after a resume or rollback to step S, each step is logged once.

A run killed after its last checkpoint S logged steps S+1.. that the resumed run logs again.
`truncate_history(workdir, S)` removes those rows from `metrics.jsonl` (rewritten atomically; the
removed rows, and a line cut short by a kill, are appended to `metrics.orphaned.jsonl`, so
nothing is lost) and those events from the TensorBoard files under `tb/` (tensorboardX cannot
delete events, and TensorBoard's own purge-on-restart is not honoured by every reader: each
file is rewritten without the records of steps > S, the kept records copied byte for byte with
their CRCs). Readers of either then see every step exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import struct

__all__ = ["truncate_history", "truncate_lines", "ORPHANED"]

log = logging.getLogger(__name__)

ORPHANED = "metrics.orphaned.jsonl"


def _step_of(line: str) -> int | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None  # cut short by a kill mid-write
    return row.get("step") if isinstance(row, dict) else None


def truncate_lines(lines: list[str], step: int) -> tuple[list[str], list[str]]:
    """(kept, dropped) JSON lines: kept are whole rows with "step" <= `step`; with step 0 (a
    fresh start: no checkpoint wrote them) none is kept."""
    kept, dropped = [], []
    for line in lines:
        if not line.strip():
            continue
        s = _step_of(line)
        (kept if s is not None and s <= step and step > 0 else dropped).append(line)
    return kept, dropped


def _truncate_jsonl(workdir: str, step: int) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    kept, dropped = truncate_lines(lines, step)
    if not dropped:
        return 0
    with open(os.path.join(workdir, ORPHANED), "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in dropped)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(dropped)


def _records(data: bytes):
    """(start, end, payload) of each whole TFRecord in an event file's bytes."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            return  # a record cut short by a kill
        yield pos, end, data[pos + 12 : pos + 12 + length]
        pos = end


def _truncate_events(path: str, step: int) -> int:
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        data = f.read()
    kept, dropped, covered = [], 0, 0
    for start, end, payload in _records(data):
        covered = end
        event = event_pb2.Event.FromString(payload)
        if event.HasField("summary") and (event.step > step or step == 0):
            dropped += 1
        else:
            kept.append(data[start:end])
    if covered < len(data):
        dropped += 1  # a partial record
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(kept))
        os.replace(tmp, path)
    return dropped


def truncate_history(workdir: str, step: int) -> None:
    """Drops what `workdir`'s metrics hold beyond `step` (see the module docstring); local
    workdirs only (a gs:// workdir's metrics.jsonl is truncated by MetricWriter)."""
    rows = _truncate_jsonl(workdir, step)
    events = 0
    tb = os.path.join(workdir, "tb")
    if os.path.isdir(tb):
        for name in sorted(os.listdir(tb)):
            if name.startswith("events.out.tfevents."):
                events += _truncate_events(os.path.join(tb, name), step)
    if rows or events:
        log.warning(
            "Resuming at step %d: removed %d metrics.jsonl rows (kept in %s) and %d TensorBoard "
            "events logged after it by the run that stopped, so each step is logged once.",
            step,
            rows,
            ORPHANED,
            events,
        )
