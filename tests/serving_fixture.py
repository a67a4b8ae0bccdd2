"""Shared by the serving tests: one trained tiny GPT and its fp32, bf16 and int8 artifacts.

Built once per test session; pytest-xdist workers share one copy through a file lock (the
first builds it, the others wait and reuse it). The model is a 1-layer byte GPT with LSQ w8a8
(so it has an int8 export) and an untied head (so a test can plant an int4 head), trained 150
steps on KJV: enough to predict bytes (eval loss ~2.4 nats) so that quality drifts show.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bf16jax import config as config_lib

STEPS = 150
PRECISIONS = ("fp32", "bf16", "int8")


def serving_config():
    c = config_lib.base_config("gpt")
    c.precision = "bf16; q=w8a8"
    c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_len=32,
                   tie_embeddings=False)  # fmt: skip
    c.data.update(seq_len=32, batch_size=16, eval_batch_size=16)
    c.optim.update(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    c.train.update(steps=STEPS, log_every=STEPS, eval_every=STEPS, eval_steps=2,
                   diagnostics=False, drift_every=-1)  # fmt: skip
    c.checkpoint.update(every_steps=STEPS)
    c.lock()
    return c


@dataclasses.dataclass
class Served:
    config: object
    workdir: str
    step: int
    artifacts: dict[str, str]  # precision -> directory


def _build(root: Path) -> None:
    """Trains and exports in a fresh process: a pytest worker that already ran other tests
    (thread pools, compiled programs on 8 fake devices) once aborted inside XLA here."""
    from cli_runs import REPO, cli_env

    code = (
        "import sys; sys.path.insert(0, 'tests'); import serving_fixture; "
        "serving_fixture.build(sys.argv[1])"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"building the serving fixture failed:\n{proc.stderr[-4000:]}")


def build(root: str) -> None:
    """Trains the fixture's run under `root` and exports it (run by `_build` in a subprocess)."""
    from bf16jax.serving import export, inference
    from bf16jax.training import loop

    root = Path(root)

    config = serving_config()
    workdir = str(root / "run")
    loop.train_and_evaluate(config, workdir)
    params, meta, step = inference.restore_params(config, workdir)
    source = {"workdir": workdir, "step": step}
    for precision in PRECISIONS:
        # The manifest's metrics are exercised on the bf16 export (it has a reference).
        export.export_artifact(config, params, meta, str(root / precision), precision=precision,
                               source=source, platforms=("cpu",),
                               eval_batches=1 if precision == "bf16" else 0)  # fmt: skip
    (root / "done.json").write_text(json.dumps({"step": step}))


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this run
    root = base / "serving"
    root.mkdir(exist_ok=True)
    with open(base / "serving.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / "done.json").exists():
                _build(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    step = json.loads((root / "done.json").read_text())["step"]
    return Served(serving_config(), str(root / "run"), step,
                  {p: str(root / p) for p in PRECISIONS})  # fmt: skip
