"""experiments/precision_study.py --quick end to end: runs, tables, plots, agreement, resume."""

import json
import os
import subprocess
import sys

import pytest
from cli_runs import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "precision_study.py")


def _study(tmp_path, *extra):
    cmd = [sys.executable, SCRIPT, "--quick", f"--runs={tmp_path / 'runs'}"]
    cmd += [f"--out={tmp_path / 'out'}", *extra]
    # One device per run; this checkout's bf16jax (the script's own directory comes first).
    env = cli_env(devices=1, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.slow
def test_quick_study_writes_tables_plots_and_resumes(tmp_path):
    args = ("--models=vit_digits,gpt_tiny", "--policies=fp32,bf16;q=w8a8")
    proc = _study(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "accuracy_vs_memory.png",
        "loss_curves_gpt_tiny.png",
        "loss_curves_vit_digits.png",
        "reliability_gpt_tiny.png",
        "reliability_vit_digits.png",
        "robustness_vit_digits.png",
    ]
    assert all((out / p).stat().st_size > 5000 for p in pngs)
    results = json.loads((out / "results.json").read_text())
    assert "--quick" in results["command"]
    vit = results["table"]["vit_digits"]
    assert vit["fp32"]["clean/agreement"] == [1.0, 0.0]
    # Clean and shifted quality, the precision diagnostics over the last 40% of training
    # ("swamped/..."), and the adversarial accuracies ("robust/...").
    assert set(k.split("/")[0] for k in vit["fp32"] if "/" in k) == {
        "clean",
        "noise",
        "blur",
        "rotate",
        "swamped",
        "robust",
    }
    # Adversarial accuracy (quick: eps 0 and 0.1, 2 PGD steps): eps 0 is the clean accuracy;
    # the QAT model also as its int8 deployment, which predicts what fake-quant predicts.
    robust = vit["fp32"]["robust/policy"]
    assert set(robust) == {"fgsm", "pgd"} and set(robust["pgd"]) == {"0", "0.1"}
    assert robust["fgsm"]["0"][0] == pytest.approx(vit["fp32"]["clean/accuracy"][0])
    w8 = vit["bf16;q=w8a8"]
    assert w8["robust/int8"] == w8["robust/policy"] and "robust/int8" not in vit["fp32"]
    gpt = results["table"]["gpt_tiny"]
    assert gpt["fp32"]["train_bytes_per_param"][0] == pytest.approx(12.0, abs=0.01)  # p + m + v
    # int8 kernels deploy in 1 byte; embeddings and norms stay 2-byte (bf16 compute).
    assert 1.0 < gpt["bf16;q=w8a8"]["inference_bytes_per_param"][0] < 2.0
    assert 0.0 <= gpt["bf16;q=w8a8"]["clean/agreement"][0] <= 1.0
    md = (out / "results.md").read_text()
    assert "| `bf16;q=w8a8` | 1 |" in md and "![accuracy_vs_memory.png]" in md
    assert "| `bf16;q=w8a8` int8 |" in md and "adversarial accuracy" in md

    # Resume: a finished run is read back, a lost result is recomputed (from its checkpoint).
    os.remove(tmp_path / "runs" / "gpt_tiny" / "bf16_q-w8a8_seed0" / "result.json")
    again = _study(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    launched = [ln for ln in again.stdout.splitlines() if " seed 0: acc " in ln]
    assert len(launched) == 1 and launched[0].startswith("gpt_tiny   bf16;q=w8a8")
    rerun = json.loads((tmp_path / "out" / "results.json").read_text())["table"]["gpt_tiny"]
    assert rerun["bf16;q=w8a8"]["clean/loss"] == gpt["bf16;q=w8a8"]["clean/loss"]


def test_unknown_model_is_refused(tmp_path):
    proc = _study(tmp_path, "--models=vit_digits,resnet")
    assert proc.returncode == 2 and "unknown model(s) ['resnet']" in proc.stderr


def test_any_config_file_is_a_model_and_the_default_out_is_under_runs(tmp_path):
    """--models takes a config file (before: only four built-in names); without --out the
    tables go to RUNS/results, never over the committed experiments/results (before: there)."""
    cmd = [sys.executable, SCRIPT, "--collect_only", f"--runs={tmp_path / 'runs'}",
           "--models=configs/gpt_tiny.py,vit_digits", "--seeds=0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=cli_env(devices=1))
    assert proc.returncode == 1 and "No run finished" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "results").is_dir()
    missing = subprocess.run([*cmd[:-2], "--models=configs/nope.py"], capture_output=True,
                             text=True, cwd=ROOT, env=cli_env(devices=1))  # fmt: skip
    assert missing.returncode == 2 and "configs/nope.py" in missing.stderr


def test_replot_redraws_the_table_plots_from_results_json(tmp_path):
    """The committed results.json alone redraws accuracy vs memory, robustness and the tables."""
    import shutil

    src = os.path.join(ROOT, "experiments", "results", "precision_study", "results.json")
    shutil.copy(src, tmp_path / "results.json")
    cmd = [sys.executable, SCRIPT, f"--replot={tmp_path / 'results.json'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=cli_env(devices=1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "accuracy_vs_memory.png",
        "robustness_vit_digits.png",
    ]
    md = (tmp_path / "results.md").read_text()
    assert "| `fp32` | 3 |" in md and "--replot=" in md


@pytest.mark.slow
def test_study_on_a_prepared_dataset_names_it(tmp_path):
    """Any config file on the user's prepared data: each result and results.md say which data
    (its path and metadata hash), as evaluate / gate / export do."""
    from prepared_corpus import make_docs, run, write_jsonl

    from bf16jax.data import prepared as fmt

    write_jsonl(tmp_path / "a.jsonl", make_docs(300))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", eval_docs=30)
    meta = fmt.open_dataset(str(tmp_path / "ds")).meta_sha256
    data = ("--config.data.name=prepared", f"--config.data.path={tmp_path / 'ds'}")
    proc = _study(tmp_path, "--models=configs/gpt_tiny.py", "--policies=bf16", *data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_result,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run_result["data"]["sources"][0]["meta_sha256"] == meta
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"Data of gpt_tiny: prepared {tmp_path / 'ds'} (meta {meta[:12]}" in md
