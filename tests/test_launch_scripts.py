"""The TPU-pod and SLURM launch scripts: they parse, refuse missing settings, and send workers a
valid bash script that runs bf16jax.main on a config that exists. `gcloud` is a stub that records
its arguments; nothing reaches Google Cloud.
"""

import base64
import os
import re
import shutil
import stat
import subprocess

import pytest
from cli_runs import REPO

LAUNCH = REPO / "experiments" / "tpu" / "launch.sh"
SLURM = REPO / "experiments" / "gpu" / "slurm.sbatch"
SCRIPTS = (LAUNCH, SLURM)

FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_GCLOUD_LOG"
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "set -euo pipefail" in script.read_text()
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


def test_documented_configs_exist():
    paths = set()
    for doc in (*SCRIPTS, LAUNCH.with_name("README.md")):
        paths |= set(re.findall(r"configs/\w+\.py", doc.read_text()))
    assert "configs/gpt_1b.py" in paths
    assert [p for p in sorted(paths) if not (REPO / p).is_file()] == []


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
    """A `gcloud` on PATH that writes its arguments, one a line, to the returned file."""
    stub = tmp_path / "bin" / "gcloud"
    stub.parent.mkdir()
    stub.write_text(FAKE_GCLOUD)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "gcloud_args"
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "WORKDIR")}
    env.update(PATH=f"{stub.parent}{os.pathsep}{env['PATH']}", FAKE_GCLOUD_LOG=str(log))
    return env, log


def _launch(env: dict, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LAUNCH), *args], cwd=REPO, env={**env, **extra}, capture_output=True, text=True
    )


def test_missing_settings_are_named(gcloud):
    env, log = gcloud
    out = _launch(env, "run", ZONE="us-central2-b", WORKDIR="gs://b/r")
    assert out.returncode == 2 and "set TPU_NAME" in out.stderr
    out = _launch(env, "run", TPU_NAME="t", ZONE="z")
    assert out.returncode == 2 and "set WORKDIR" in out.stderr
    out = _launch(env, "create", TPU_NAME="t", ZONE="z", ACCELERATOR="v9x-8")
    assert out.returncode == 2 and "set RUNTIME" in out.stderr
    out = _launch(env, "run", TPU_NAME="t", ZONE="z", WORKDIR="gs://b/r", CONFIG="configs/x.py")
    assert out.returncode == 2 and "CONFIG=configs/x.py is not a file" in out.stderr
    out = _launch(env, "frobnicate")
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr
    assert not log.exists()  # gcloud was never called


@pytest.mark.parametrize(
    "accelerator, runtime",
    [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-64", "v2-alpha-tpuv5-lite")],
)
def test_create_picks_the_runtime(gcloud, accelerator, runtime):
    env, log = gcloud
    out = _launch(env, "create", TPU_NAME="t", ZONE="z", ACCELERATOR=accelerator)
    assert out.returncode == 0, out.stderr
    args = log.read_text().splitlines()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "create", "t"]
    assert {f"--accelerator-type={accelerator}", f"--version={runtime}", "--zone=z"} <= set(args)


def test_run_sends_every_worker_the_same_valid_script(gcloud):
    env, log = gcloud
    extra = "--config.train.steps=20 --config.precision=bf16-pure"
    out = _launch(env, "run", TPU_NAME="t", ZONE="z", WORKDIR="gs://b/my run", EXTRA_ARGS=extra)
    assert out.returncode == 0, out.stderr
    args = log.read_text().splitlines()
    assert args[:6] == ["compute", "tpus", "tpu-vm", "ssh", "t", "--worker=all"]
    command = next(a for a in args if a.startswith("--command="))
    encoded = re.fullmatch(r"--command=echo (\S+) \| base64 -d \| bash", command).group(1)
    script = base64.b64decode(encoded).decode()
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    line = next(ln for ln in script.splitlines() if "bf16jax.main" in ln)
    assert "--config=configs/gpt_1b.py" in line and "--config.mesh.distributed=yes" in line
    assert r"--workdir=gs://b/my\ run" in line and extra in line
