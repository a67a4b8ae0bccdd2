"""Shared by the CLI tests: shrunk overrides of the real configs and a runner for bf16jax.main.

Each command runs in a fresh process on 8 fake CPU devices, from the repository root.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Tiny versions of configs/<name>.py: seconds per step on a CPU.
TINY_OVERRIDES = {
    "gpt_tiny": (
        "--config.model.num_layers=1",
        "--config.model.embed_dim=32",
        "--config.model.num_heads=2",
        "--config.model.mlp_dim=64",
        "--config.model.max_len=32",
        "--config.data.seq_len=32",
        "--config.data.batch_size=8",
        "--config.data.eval_batch_size=8",
    ),
    "t5_small": (
        "--config.model.embed_dim=32",
        "--config.model.num_heads=2",
        "--config.model.head_dim=16",
        "--config.model.mlp_dim=64",
        "--config.model.num_encoder_layers=1",
        "--config.model.num_decoder_layers=1",
        "--config.data.enc_len=32",
        "--config.data.dec_len=8",
        "--config.data.batch_size=8",
        "--config.data.eval_batch_size=8",
    ),
    "vit_digits": (
        "--config.model.num_layers=1",
        "--config.model.embed_dim=32",
        "--config.model.num_heads=2",
        "--config.model.mlp_dim=64",
        "--config.data.batch_size=16",
        "--config.data.eval_batch_size=40",
    ),
}


# XLA:CPU flags that change how fast a program compiles, not what it computes: the suite's time
# is compiling tiny programs (tests/conftest.py sets them; tests/test_compile_flags.py checks
# that they change no number).
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)


def cli_env(devices: int = 8, **extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: CPU with `devices` fake devices, plus the
    suite's other XLA flags and compilation cache (tests/conftest.py), so that a program
    compiled here and there is the same program (same code, same numerics, one cache entry)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def main_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bf16jax.main", *args]


def run_python(*args: str, env: dict | None = None, timeout: int = 300):
    """`python ARGS` from the repository root, in `env` (`cli_env()` by default), captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_python(*main_command(*args)[1:], timeout=timeout)


def final_metrics(stdout: str) -> dict:
    """The `{"final": {...}}` line bf16jax.main prints at the end."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith('{"final"'))
    return json.loads(line)["final"]


def printed_step(stdout: str) -> int:
    """The last step a CLI run printed: its progress line `step      3/30  loss ...` or its
    evaluation line `step     30  eval/loss ...`; 0 before the first."""
    found = re.findall(r"^step +(\d+)[/ ]", stdout, flags=re.M)
    return int(found[-1]) if found else 0
