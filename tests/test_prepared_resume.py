"""Bit-exact resume on prepared data through the real entry point: `python -m bf16jax.prepare`
then `python -m bf16jax.main` (gpt_tiny shrunk) stopped after 2 steps and resumed to 4 equals
4 steps straight, metric for metric and parameter for parameter; a changed dataset is refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runs import TINY_OVERRIDES, run_main, run_python
from prepared_corpus import make_docs, write_jsonl

_TIMING = ("train/step_time_s", "train/tokens_per_s", "train/mfu")


def _rows(workdir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: {k: v for k, v in r.items() if k not in _TIMING}
        for r in rows
        if "train/loss" in r
    }


@pytest.mark.slow
def test_resume_on_prepared_data_is_bit_exact(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(400))
    write_jsonl(tmp_path / "b.jsonl", make_docs(300, seed=5))
    proc = run_python(
        "-m", "bf16jax.prepare", str(tmp_path), f"--out={tmp_path / 'ds'}",
        "--eval_fraction=0.1", "--workers=2", "--no_progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    common = (
        "--config=configs/gpt_tiny.py",
        *TINY_OVERRIDES["gpt_tiny"],
        "--config.data.name=prepared",
        f"--config.data.path={tmp_path / 'ds'}",
        "--config.train.log_every=1",
        "--config.train.eval_every=100",
        "--config.train.eval_steps=1",
        "--config.train.sample_tokens=0",
        "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=false",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for workdir, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
        proc = run_main(*common, f"--workdir={workdir}", f"--config.train.steps={steps}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting at step 2" in proc.stderr
    a, b = _rows(straight), _rows(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[3] == b[3] and a[4] == b[4]  # every logged metric, bit for bit
    saved = json.loads((resumed / "config.json").read_text())
    assert saved["dataset"][0]["path"] == str(tmp_path / "ds")
    # The same path holding another corpus: refused before anything is written.
    shutil.rmtree(tmp_path / "ds")
    write_jsonl(tmp_path / "b.jsonl", make_docs(301, seed=5))
    run_python("-m", "bf16jax.prepare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
               f"--out={tmp_path / 'ds'}", "--eval_fraction=0.1", "--no_progress")  # fmt: skip
    proc = run_main(*common, f"--workdir={resumed}", "--config.train.steps=6")
    assert proc.returncode == 2 and "prepared dataset that changed" in proc.stderr
    assert np.isfinite(a[4]["train/loss"])
