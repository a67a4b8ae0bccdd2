"""End-to-end tests of the CLI, `python -m bf16jax.main`, each in a fresh process.

Tiny overrides of the real configs train for 3 steps on 8 fake CPU devices; bad input must exit
non-zero with a message that names the problem, never a traceback.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from cli_runs import REPO, TINY_OVERRIDES, cli_env, final_metrics, main_command

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
    # Per-family units: tokens/s for the language models, images/s for ViT; perplexity only
    # for language models.
    unit, other = ("images", "tokens") if name == "vit_digits" else ("tokens", "images")
    logged = [r for r in rows if "train/loss" in r]
    assert all(f"train/{unit}_per_s" in r and f"train/{other}_per_s" not in r for r in logged)
    assert any("eval/perplexity" in r for r in rows) == (name != "vit_digits"), name
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
# Bad configs and workdirs on the command line: tests/test_bad_input.py (in this process).


def _cli(argv: list[str], capsys) -> tuple[object, str]:
    """Runs `bf16jax.main.run` here; (exit code, stdout)."""
    from bf16jax import main

    sys.modules.pop("config_config", None)  # ml_collections' module of the last --config
    with pytest.raises(SystemExit) as exit_info:
        main.run(["bf16jax.main", *argv])
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().out


def test_config_help_lists_every_key_without_a_workdir(capsys):
    from bf16jax.config import config_help, load_config

    code, out = _cli([TINY, "--config.train.steps=7", "--config_help"], capsys)
    assert code in (0, None)
    expected = config_help(load_config("configs/gpt_tiny.py", ["train.steps=7"]))
    assert out.strip() == expected
    assert "--config.train.steps=7  " in out and "(int)" in out


def test_help_works_without_config_and_helpfull_lists_the_config_keys(capsys):
    code, out = _cli(["--help"], capsys)
    assert code == 1 and "--config_help" in out  # absl exits 1 after printing help
    code, out = _cli([TINY, "--helpfull"], capsys)
    assert code == 1 and "--[no]config_help" in out
    keys = out.split("Every key of configs/gpt_tiny.py (override with --config.KEY=VALUE):")[1]
    assert "--config.optim.learning_rate=" in keys and "(float)" in keys
    assert len(keys.strip().splitlines()) > 50


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
