"""End-to-end tests of the CLI, `python -m bf16jax.main`, each in a fresh process.

Tiny overrides of the real configs train for 3 steps on 8 fake CPU devices; bad input must exit
non-zero with a message that names the problem, never a traceback.
"""

import json
import math
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
from cli_runs import REPO, TINY_OVERRIDES, cli_env, final_metrics, main_command, run_main

STEPS = 3

# Shrunk models; every run logs each step, evaluates at step 2 and 3, checkpoints at 2 and 3.
COMMON = (
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.train.eval_steps=1",
    "--config.checkpoint.every_steps=2",
)
RUNS = {
    name: overrides + (("--config.train.sample_tokens=8",) if name == "gpt_tiny" else ())
    for name, overrides in TINY_OVERRIDES.items()
}


class Finished(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    workdir: Path


def run_concurrently(runs: dict[str, tuple[str, ...]], root: Path) -> dict[str, Finished]:
    """Starts every run at once (each compiles mostly on one core), then waits for all."""
    started = {}
    for name, args in runs.items():
        (root / name).mkdir()
        with open(root / name / "stdout", "w") as out, open(root / name / "stderr", "w") as err:
            proc = subprocess.Popen(
                main_command(*args), cwd=REPO, env=cli_env(), stdout=out, stderr=err
            )
        started[name] = proc
    finished = {}
    for name, proc in started.items():
        try:
            returncode = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        stdout, stderr = (root / name / "stdout").read_text(), (root / name / "stderr").read_text()
        finished[name] = Finished(returncode, stdout, stderr, root / name / "run")
    return finished


def check_run(name: str, run: Finished) -> None:
    assert run.returncode == 0, f"{name}: {run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, name

    final = final_metrics(run.stdout)
    assert final["step"] == STEPS, name
    assert math.isfinite(final["loss"]) and math.isfinite(final["eval_loss"]), name
    assert final["skipped"] == 0 and final["finite"] == 1.0, name
    if name == "gpt_tiny":
        assert "--- sample ---\nAnd " in run.stdout  # the prompt, then 8 sampled bytes

    rows = [json.loads(ln) for ln in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    eval_steps = [r["step"] for r in rows if "eval/loss" in r]
    assert train_steps == [1, 2, 3] and eval_steps == [2, 3], name
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r), name
    assert rows[-1]["step"] == STEPS, name

    checkpoints = run.workdir / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["2", "3"], name
    for item in ("commit_success.txt", "state", "data"):
        assert (checkpoints / str(STEPS) / item).exists(), (name, item)


# One test for the three runs: `make test` uses pytest-xdist, which would start a fixture shared
# by several tests once per worker.
@pytest.mark.slow
def test_cli_trains_evaluates_and_checkpoints(tmp_path):
    runs = {
        name: (f"--config=configs/{name}.py", f"--workdir={tmp_path / name / 'run'}")
        + COMMON
        + overrides
        for name, overrides in RUNS.items()
    }
    for name, run in run_concurrently(runs, tmp_path).items():
        check_run(name, run)


TINY = "--config=configs/gpt_tiny.py"


@pytest.mark.parametrize(
    "args, expected",
    [
        ((TINY, "--config.train.stepz=3"), ["config.train.stepz", "did you mean 'steps'"]),
        ((TINY, "--config.precision=bf61"), ["config.precision", "'bf61'"]),
        (
            ("--config=configs/nope.py", "--config.train.steps=3"),
            ["configs/nope.py", "no such file"],
        ),
    ],
    ids=["unknown-key", "bad-policy", "missing-config-file"],
)
def test_cli_rejects_bad_config(args, expected, tmp_path):
    workdir = tmp_path / "run"
    proc = run_main(*args, f"--workdir={workdir}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]
    assert not workdir.exists()  # nothing is written before the config is known to be good


def test_cli_rejects_a_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    proc = run_main(TINY, f"--workdir={path}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--workdir={path} is a file" in proc.stderr
    assert path.read_text() == "keep me"


def test_load_config_applies_typed_overrides():
    from bf16jax.config import load_config

    c = load_config(
        str(REPO / "configs" / "gpt_tiny.py"),
        ["train.steps=7", "optim.learning_rate=1", "train.diagnostics=false", "precision=fp32"],
    )
    assert c.train.steps == 7 and c.optim.learning_rate == 1.0
    assert c.train.diagnostics is False and c.precision == "fp32"
    with pytest.raises(AttributeError):
        c.new_key = 1  # locked


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.stepz=3", "no key 'train.stepz'"),
        ("train.steps", "not KEY=VALUE"),
        ("train.steps=many", "train.steps='many': train.steps takes an int value"),
        ("train.diagnostics=maybe", "takes a bool value"),
    ],
)
def test_load_config_names_a_bad_override(override, match):
    from bf16jax.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config(str(REPO / "configs" / "gpt_tiny.py"), [override])


def test_load_config_of_a_missing_file():
    from bf16jax.config import load_config

    with pytest.raises(FileNotFoundError, match="configs/nope.py"):
        load_config("configs/nope.py")


def test_config_path_finds_the_repository_configs(monkeypatch, tmp_path):
    from bf16jax import config as config_lib

    assert config_lib.config_path("gpt_tiny") == str(REPO / "configs" / "gpt_tiny.py")
    with pytest.raises(FileNotFoundError, match="No config 'gpt_huge'.*'vit_digits'"):
        config_lib.config_path("gpt_huge")
    monkeypatch.setattr(config_lib, "CONFIG_DIR", str(tmp_path / "site-packages" / "configs"))
    with pytest.raises(FileNotFoundError, match="clone it"):
        config_lib.config_path("gpt_tiny")
