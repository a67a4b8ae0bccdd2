"""Reading a bf16jax run's results from disk with Orbax and NumPy alone (not bf16jax), so the
fault harness can judge any checkout: committed steps, saves in flight, every state leaf of a
checkpoint, data positions, metrics rows and TensorBoard events, tracebacks in a log."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

_TIMING = ("train/step_time_s", "train/tokens_per_s", "train/images_per_s", "train/mfu")
_TMP = re.compile(r"^(\d+)\..*orbax-checkpoint-tmp")


def committed_steps(workdir: Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in ckpts.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").exists()
    )


def saving_now(workdir: Path) -> list[str]:
    """Names of Orbax temporaries (saves in flight) in the workdir's checkpoint directory."""
    ckpts = workdir / "checkpoints"
    try:
        return [n for n in os.listdir(ckpts) if _TMP.match(n)]
    except FileNotFoundError:
        return []


def saved_state(step_dir: Path) -> dict[str, np.ndarray]:
    """{leaf path: NumPy array} of a checkpoint's `state` item, read by Orbax alone."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckpt:
        meta = ckpt.metadata(step_dir / "state")
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out = ckpt.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=args))
    return leaves_by_name(out)


def leaves_by_name(tree) -> dict[str, np.ndarray]:
    """{"opt_state/tx_state/1/mu/...": array}: the same names for a restored dict tree and for
    the dataclass / NamedTuple it was saved from (PRNG keys as their key data)."""
    import jax

    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in p): host(x) for p, x in flat}


def data_position(step_dir: Path) -> dict:
    files = sorted((step_dir / "data").glob("process_*.json"))
    return {f.name: json.loads(f.read_text()) for f in files}


def differing_leaves(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Leaves whose bits differ (or that only one side has)."""
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            bad.append(key)
    return bad


def metric_rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def duplicate_rows(rows: list[dict]) -> int:
    """Rows whose (step, kind) appeared earlier in the file: each step must be logged once."""
    seen, dups = set(), 0
    for row in rows:
        kind = "eval" if any(k.startswith("eval/") for k in row) else "train"
        key = (row["step"], kind)
        dups += key in seen
        seen.add(key)
    return dups


def tensorboard_duplicates(workdir: Path) -> int:
    """(tag, step) scalar events written more than once across the workdir's event files."""
    from tensorboardX.proto import event_pb2

    seen, dups = set(), 0
    for path in sorted((workdir / "tb").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = np.frombuffer(data[pos : pos + 8], "<u8")
            record = data[pos + 12 : pos + 12 + int(length)]
            pos += 12 + int(length) + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                key = (value.tag, event.step)
                dups += key in seen
                seen.add(key)
    return dups


def train_rows(rows: list[dict]) -> dict[int, dict]:
    return {
        r["step"]: {k: v for k, v in r.items() if k not in _TIMING}
        for r in rows
        if "train/loss" in r
    }


def started_at(stderr: str) -> int | None:
    found = re.findall(r"starting at step (\d+)", stderr)
    return int(found[-1]) if found else None


def traceback_lines(stderr: str) -> int:
    """Lines from the first "Traceback" to the end (0 if there is none)."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            return len(lines) - i
    return 0
