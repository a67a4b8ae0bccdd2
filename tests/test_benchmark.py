"""experiments/benchmark.py at tiny shapes, in this process: bf16jax and the plain-JAX peer train
a step each (the torch peer too where torch is installed; else its row says it was skipped),
their parameter counts match the architectures, MFU follows both conventions, and the results
files hold the table, hardware, versions and command."""

import importlib.util
import json
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "benchmark.py")
_spec = importlib.util.spec_from_file_location("benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["benchmark"] = benchmark
_spec.loader.exec_module(benchmark)

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--tiny", "--inprocess", "--models=gpt2_124m", "--steps=1", "--warmup=0"]
    argv += ["--peak_tflops=1", f"--out={out}"]
    return benchmark.main(argv), out


def test_participants_train_and_report(run):
    rows, _ = run
    s = benchmark.TINY_SHAPES["gpt2_124m"]
    v, d, layers, t = s["V"], s["D"], s["L"], s["T"]
    by = {r["participant"]: r for r in rows}
    assert set(by) == {"bf16jax", "jax", "torch"}
    # Parameters without position embeddings: tied embedding, final norm, blocks. The peers
    # have no biases (12 D^2 + 4 D per block); bf16jax's q/k/v/o and MLP carry biases (+9 D).
    assert by["jax"]["n_params"] == v * d + 2 * d + layers * (12 * d * d + 4 * d)
    assert by["bf16jax"]["n_params"] == v * d + 2 * d + layers * (12 * d * d + 13 * d)
    assert by["bf16jax"]["setup"].startswith("bf16, attention xla")  # auto on a CPU
    for name in ("bf16jax", "jax"):
        r = by[name]
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_memory_bytes"] > 0
        assert r["tokens_per_s"] * r["step_ms"] / 1e3 == pytest.approx(s["B"] * t)
        # Both MFU conventions against the stated 1 TFLOP/s: they differ by the 6LTD term.
        n, tps = r["n_params"], r["tokens_per_s"]
        assert r["mfu_6LTD"] == pytest.approx(tps * (6 * n + 6 * layers * t * d) / 1e12)
        assert r["mfu_12LTD"] - r["mfu_6LTD"] == pytest.approx(tps * 6 * layers * t * d / 1e12)
    if HAS_TORCH:
        assert by["torch"]["vs_torch"] == 1.0
        assert by["jax"]["vs_torch"] == pytest.approx(
            by["jax"]["tokens_per_s"] / by["torch"]["tokens_per_s"]
        )
    else:
        assert "torch is not installed" in by["torch"]["skipped"]
        assert by["jax"]["vs_torch"] is None


def test_results_files_hold_table_and_provenance(run):
    rows, out = run
    text = (out / "results.md").read_text()
    assert "(tiny shapes)" in text and "--tiny --inprocess" in text
    assert "peak used for MFU: 1 TFLOP/s" in text and "jax 0.10.2" in text
    assert "| gpt2_124m | bf16jax (bf16) |" in text and "| gpt2_124m | jax |" in text
    # A rerun of the same rows replaces them (one section), another device's run stays.
    other = [dict(r, device="NVIDIA H200") for r in rows]
    benchmark.write_results(
        rows,
        {
            "device": "cpu",
            "tiny": True,
            "date": "d",
            "hardware": "h",
            "versions": "v",
            "peak_flops": None,
            "command": "again",
        },
        str(out),
    )
    benchmark.write_results(
        other,
        {
            "device": "NVIDIA H200",
            "tiny": False,
            "date": "d",
            "hardware": "h",
            "versions": "v",
            "peak_flops": 989.4e12,
            "command": "gpu",
        },
        str(out),
    )
    data = json.loads((out / "results.json").read_text())
    assert [run["command"] for run in data["runs"]] == ["again", "gpu"]
    text = (out / "results.md").read_text()
    assert text.count("## ") == 2 and "peak used for MFU: 989.4 TFLOP/s" in text
