"""Export, artifact loading, evaluation, the regression gate and the registry (one trained model).

The `served` fixture (tests/serving_fixture.py) trains a tiny LSQ-w8a8 GPT once and exports
it at fp32, bf16 and int8; every test here reuses it.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from cli_runs import REPO, cli_env, run_python
from flax import nnx
from serving_fixture import served  # noqa: F401 (the fixture)

from bf16jax.serving import artifact, export, gate, inference, registry
from bf16jax.serving import scoring as evaluate
from bf16jax.serving.runners import runner_from_workdir

PROMPTS = ["And the LORD", "In the beginning"]


@functools.cache
def _artifact(directory: str) -> artifact.Artifact:
    return artifact.Artifact(directory)


@functools.cache
def _restored(workdir: str):
    from serving_fixture import serving_config

    return inference.restore_params(serving_config(), workdir)


def _export_variant(served, out, *, precision="bf16", policy=None, planted=None):  # noqa: F811
    """An artifact of the fixture's run with a planted regression or another serving policy."""
    params, meta, step = _restored(served.workdir)
    params = nnx.to_pure_dict(params)
    if planted is not None:
        params = gate.plant(params, planted)
    export.export_artifact(served.config, params, meta, str(out), precision=precision,
                           policy=policy, source={"workdir": served.workdir, "step": step,
                                                  "planted": True},
                           platforms=("cpu",), eval_batches=0)  # fmt: skip
    return str(out)


# ----------------------------------------------------------------------------- export
def test_manifest_names_everything_and_hashes_every_file(served):  # noqa: F811
    sizes = {}
    for precision, directory in served.artifacts.items():
        m = artifact.verify(directory)
        assert m["precision"] == precision and m["family"] == "gpt"
        assert m["source"] == {"workdir": served.workdir, "step": served.step}
        assert m["config"]["model"]["num_layers"] == 1 and m["train_policy"].endswith("q=w8a8")
        assert m["git_revision"] != "unknown" and m["versions"]["jax"] == jax.__version__
        assert m["limits"]["prefill_buckets"] == [16, 32]
        assert set(m["programs"]) == {"score", "prefill", "decode_step", "generate", "insert",
                                      "step", "prefill_16", "prefill_32",
                                      "step_32x4"}  # fmt: skip
        assert set(m["files"]) == {"params.safetensors", "loader.py", "text.py"} | {
            f"{p}.jaxexport" for p in m["programs"]
        }
        assert os.path.isfile(os.path.join(directory, "manifest.sha256"))
        for name, entry in m["files"].items():
            assert artifact.sha256_file(os.path.join(directory, name)) == entry["sha256"]
        sizes[precision] = m["params"]["bytes"]
        kernel = m["params"]["dtypes"]
        assert {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}[precision] in kernel
    assert sizes["int8"] < sizes["bf16"] < sizes["fp32"]
    assert "c=bf16" in artifact.verify(served.artifacts["bf16"])["serving_policy"]
    metrics = artifact.verify(served.artifacts["bf16"])["metrics"]
    assert set(metrics["shifted"]) == {"chars5", "chars15"}
    assert metrics["agreement"]["clean"] > 0.95 and metrics["reference"]["precision"] == "fp32"


def test_altered_or_missing_files_are_refused(served, tmp_path):  # noqa: F811
    copy = tmp_path / "art"
    shutil.copytree(served.artifacts["bf16"], copy)
    params = copy / "params.safetensors"
    blob = bytearray(params.read_bytes())
    blob[-3] ^= 0x01  # one bit of one weight
    params.write_bytes(bytes(blob))
    with pytest.raises(artifact.IntegrityError, match="params.safetensors: sha256"):
        artifact.Artifact(str(copy))
    shutil.copy(os.path.join(served.artifacts["bf16"], "params.safetensors"), params)
    (copy / "score.jaxexport").unlink()
    with pytest.raises(artifact.IntegrityError, match="score.jaxexport is missing"):
        artifact.Artifact(str(copy))
    with pytest.raises(artifact.IntegrityError, match="not the manifest that was registered"):
        artifact.verify(served.artifacts["bf16"], manifest_sha256="0" * 64)
    with pytest.raises(ValueError, match="exists: pass a new --out"):
        _export_variant(served, served.artifacts["bf16"])


def test_a_changed_or_broken_manifest_is_refused_by_every_loader(served, tmp_path):  # noqa: F811
    """manifest.json is covered by manifest.sha256 (the digest of its canonical JSON): an edited
    value, a broken JSON or a missing digest stops serve, generate, evaluate and loader.py with
    a message naming the file (issue #23 item 3: byte_offset 2 -> 3 once loaded silently)."""
    import asyncio

    from bf16jax.serving.engine import Engine

    copy = tmp_path / "art"
    shutil.copytree(served.artifacts["bf16"], copy)
    manifest = copy / "manifest.json"
    good = manifest.read_text()
    assert '"byte_offset": 2' in good
    manifest.write_text(good.replace('"byte_offset": 2', '"byte_offset": 3'))
    with pytest.raises(artifact.IntegrityError, match=r"manifest.json: its content .* differs"):
        artifact.Artifact(str(copy))
    with pytest.raises(artifact.IntegrityError, match="manifest.json"):  # serve
        asyncio.run(Engine(artifact=str(copy), warmup=False).start())
    commands = {
        "loader.py": [str(copy / "loader.py"), str(copy), "--prompt=a", "--max_tokens=2"],
        "generate": ["-m", "bf16jax.generate", f"--artifact={copy}", "--prompt=a"],
        "evaluate": ["-m", "bf16jax.evaluate", f"--artifact={copy}"],
    }
    for name, args in commands.items():
        proc = run_python(*args)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert "manifest.json" in proc.stderr and "Traceback" not in proc.stderr, name
    manifest.write_text(good[:-40])  # a truncated file: broken JSON
    with pytest.raises(artifact.IntegrityError, match=r"manifest.json is not valid JSON"):
        artifact.Artifact(str(copy))
    manifest.write_text(json.dumps(json.loads(good)))  # reformatted, same content: accepted
    assert artifact.verify(str(copy))["tokenizer"]["byte_offset"] == 2
    (copy / "manifest.sha256").unlink()
    with pytest.raises(artifact.IntegrityError, match="manifest.sha256 is missing"):
        artifact.Artifact(str(copy))


_NO_TRAINING_CODE = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"bf16jax", "flax", "optax", "orbax", "grain", "ml_collections"}:
            raise ImportError(f"{name} must not be needed to load an artifact")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import loader
art = loader.Artifact(sys.argv[1])
out = art.generate(json.loads(sys.argv[2]), max_tokens=12, stop=[["\n"], []])
print(json.dumps({"generate": out, "score": art.score(["And the LORD"])[0]["logprob"]}))
"""


def test_artifact_loads_with_jax_alone(served):  # noqa: F811
    directory = served.artifacts["int8"]
    proc = subprocess.run([sys.executable, "-c", _NO_TRAINING_CODE, directory,
                           json.dumps(PROMPTS)], env=cli_env(), capture_output=True, text=True,
                          timeout=300, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = json.loads(proc.stdout.strip().splitlines()[-1])
    art = _artifact(directory)
    assert alone["generate"] == art.generate(PROMPTS, max_tokens=12, stop=[["\n"], []])
    assert alone["score"] == pytest.approx(art.score(["And the LORD"])[0]["logprob"], abs=1e-6)
    # loader.py as a command: max_tokens defaults to min(64, the 32-position context).
    loader = os.path.join(directory, "loader.py")
    proc = subprocess.run([sys.executable, loader, directory, "--prompt=And"], env=cli_env(),
                          capture_output=True, text=True, timeout=300, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == art.generate(["And"])[0]
    bad = [sys.executable, loader, directory, "--prompt=And", "--temperature=-1"]
    proc = subprocess.run(bad, env=cli_env(), capture_output=True, text=True, timeout=300,
                          cwd="/")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: temperature"), proc.stderr


def test_artifact_runs_the_programs_of_the_run(served):  # noqa: F811
    art = _artifact(served.artifacts["bf16"])
    run = runner_from_workdir(served.config, served.workdir, "bf16")
    rows = art.generate(PROMPTS, max_tokens=16)
    assert rows == run.generate(PROMPTS, max_tokens=16)
    assert all(r["finish_reason"] == "length" and len(r["tokens"]) == 16 for r in rows)
    np.testing.assert_array_equal(
        art.score_ids([art.encode("And God said")])[0]["token_logprobs"],
        run.score_ids([art.encode("And God said")])[0]["token_logprobs"],
    )
    # The exported prefill + decode_step, looped on the host, give the generate program's tokens.
    ids = art.encode(PROMPTS[0])
    prompt = np.zeros((1, art.limits["prompt_len"]), np.int32)
    prompt[0, : len(ids)] = ids
    logits, cache, start = art.call("prefill", prompt, np.asarray([len(ids)], np.int32))
    tokens = []
    for i in range(16):
        tokens.append(int(np.argmax(logits[0])))
        token = np.asarray([[tokens[-1]]], np.int32)
        logits, cache = art.call("decode_step", cache, token, np.asarray(start) + i)
    assert tokens == rows[0]["tokens"]
    sampled = art.generate(PROMPTS, max_tokens=16, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert sampled == art.generate(PROMPTS, max_tokens=16, temperature=1.0, top_k=20,
                                   top_p=0.9, seed=3)  # fmt: skip
    assert sampled != rows
    with pytest.raises(ValueError, match="prompt is 40 tokens"):
        art.generate(["x" * 40])
    with pytest.raises(ValueError, match="top_p must lie"):
        art.generate(PROMPTS, top_p=0.0)


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_artifact_equals_run_at_the_same_precision(served):  # noqa: F811
    scorer = evaluate.Scorer.from_artifact(served.artifacts["bf16"])
    params, meta, step = _restored(served.workdir)
    source = {"workdir": served.workdir, "step": step}
    reference = evaluate.Scorer.from_params(served.config, params, meta, "fp32", source)
    report, _ = evaluate.evaluate(scorer, reference, num_batches=1)
    same = evaluate.Scorer.from_params(served.config, params, meta, "bf16", source)
    again, _ = evaluate.evaluate(same, None, num_batches=1)
    assert report["clean"] == again["clean"] and report["shifted"] == again["shifted"]
    assert report["examples"] == 16 * 32
    for cond in ("clean", "chars5", "chars15"):
        assert 0.95 < report["agreement"][cond] <= 1.0
    assert report["shifted"]["chars15"]["accuracy"] < report["clean"]["accuracy"]
    fp32 = evaluate.Scorer.from_artifact(served.artifacts["fp32"])
    self_report, _ = evaluate.evaluate(fp32, reference, num_batches=1)
    assert self_report["agreement"] == {"clean": 1.0, "chars5": 1.0, "chars15": 1.0}
    assert self_report["clean"]["loss"] != report["clean"]["loss"]  # bf16 is another model


# ----------------------------------------------------------------------------- gate
# Batches of 16 x 32 tokens the gate tests score. One batch is too few for the ECE check: two
# trainings of the fixture that differ only in the XLA:CPU flags they compiled with gave the
# honest bf16 export an ECE increase of 0.011 (over the 0.01 limit) and 0.000 on 1 batch, 0.0081
# and 0.0009 on 2, 0.0018 and 0.0022 on 4.
GATE_BATCHES = 4


def test_gate_passes_honest_exports_and_catches_planted_regressions(served, tmp_path):  # noqa: F811
    reference = evaluate.Scorer.from_artifact(served.artifacts["fp32"])
    results = {}
    planted = {
        "int4_head": dict(planted="int4_head"),
        "stale_int8_scales": dict(precision="int8", planted="stale_int8_scales"),
        "softmax_bf16": dict(policy=gate.softmax_bf16_policy(served.config.precision)),
    }
    candidates = {p: served.artifacts[p] for p in ("bf16", "int8")}
    for name, kw in planted.items():
        candidates[name] = _export_variant(served, tmp_path / name, **kw)
    for name, directory in candidates.items():
        report = gate.gate(
            evaluate.Scorer.from_artifact(directory), reference, num_batches=GATE_BATCHES
        )
        results[name] = report
        print(name, report["passed"], {c["check"]: round(c["value"], 5) for c in report["checks"]})
    assert results["bf16"]["passed"] and results["int8"]["passed"]
    failed = {n: {c["check"] for c in r["checks"] if not c["passed"]} for n, r in results.items()}
    assert {"agreement", "nll_drift"} <= failed["int4_head"]
    assert "nll_drift" in failed["stale_int8_scales"]
    drift = {n: next(c["value"] for c in r["checks"] if c["check"] == "nll_drift")
             for n, r in results.items()}  # fmt: skip
    # A bf16 softmax in this 1-layer model moves NLL no more than honest bf16 serving does
    # (the model barely uses its attention): not a regression here, and the gate says so.
    assert results["softmax_bf16"]["passed"]
    assert drift["softmax_bf16"] < 1.2 * drift["bf16"] < drift["int4_head"] / 5


def test_gate_cli_exit_codes(served, tmp_path):  # noqa: F811
    planted = _export_variant(served, tmp_path / "int4", planted="int4_head")
    base = [sys.executable, "-m", "bf16jax.gate", f"--reference={served.artifacts['fp32']}",
            "--num_batches=1"]  # fmt: skip
    failed = subprocess.run(
        [*base, f"--candidate={planted}", f"--out={tmp_path}/r.json"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 1, failed.stderr[-2000:]
    # The verdict first, a few lines; the JSON report in the file (--json prints it too).
    lines = failed.stdout.splitlines()
    assert lines[0].split()[0] in ("ok", "FAIL") and "FAIL agreement" in failed.stdout
    assert lines[-2].startswith("gate: FAILED (") and "agreement" in lines[-2]
    assert lines[-1] == f"report: {tmp_path}/r.json" and len(lines) <= 8
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    bad = subprocess.run([*base, "--candidate=/nonexistent"], cwd=REPO, env=cli_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: /nonexistent has no manifest")


# ----------------------------------------------------------------------------- registry
@functools.cache
def _scorer(directory: str) -> evaluate.Scorer:
    return evaluate.Scorer.from_artifact(directory)


def _gate_dirs(candidate, reference, **kw):
    return gate.gate(_scorer(candidate), _scorer(reference), num_batches=GATE_BATCHES, **kw)


def test_registry_promotes_through_the_gate_and_rolls_back(served, tmp_path):  # noqa: F811
    reg = registry.Registry(str(tmp_path / "reg"))
    with pytest.raises(ValueError, match="must be an fp32 export"):
        reg.init(served.artifacts["bf16"])
    reg.init(served.artifacts["fp32"])
    v1, _ = reg.promote(served.artifacts["bf16"], _gate_dirs)
    planted = _export_variant(served, tmp_path / "int4", planted="int4_head")
    with pytest.raises(registry.GateFailed, match="agreement="):
        reg.promote(planted, _gate_dirs)
    assert reg.active()[0] == v1 and len(reg.state()["rejected"]) == 1
    # A copy that fails half way leaves no version behind and the state unchanged.
    real_rename = os.rename

    def crash(src, dst):
        if "versions" in dst:
            raise OSError("disk full")
        return real_rename(src, dst)

    before = reg.state()
    os.rename = crash
    try:
        with pytest.raises(OSError, match="disk full"):
            reg.promote(served.artifacts["int8"], _gate_dirs)
    finally:
        os.rename = real_rename
    assert reg.state() == before
    assert sorted(os.listdir(tmp_path / "reg" / "versions")) == [v1]
    v2, report = reg.promote(served.artifacts["int8"], _gate_dirs)
    assert (v1, v2) == ("v0001", "v0002") and report["passed"]
    rows = {r["version"]: r for r in reg.listing()}
    assert rows[v2]["active"] and rows[v2]["precision"] == "int8"
    assert rows[v2]["source"]["workdir"] == served.workdir
    assert rows[v2]["from"] == served.artifacts["int8"]
    assert reg.rollback() == v1 and reg.active()[0] == v1
    assert reg.rollback(to=v2) == v2
    with pytest.raises(ValueError, match="Unknown version 'v0009'"):
        reg.rollback(to="v0009")
    # Versions are verified copies: the registered manifest digest is checked on load.
    directory, digest = reg.resolve(v2)
    assert artifact.Artifact(directory, manifest_sha256=digest).family == "gpt"


def test_concurrent_registry_writers_serialize(served, tmp_path):  # noqa: F811
    reg = registry.Registry(str(tmp_path / "reg"))
    reg.init(served.artifacts["fp32"])

    def passing(candidate, reference, **kw):
        return {"passed": True, "checks": [{"check": "agreement", "value": 1.0,
                                            "passed": True}]}  # fmt: skip

    names = []
    threads = [threading.Thread(target=lambda: names.append(
        reg.promote(served.artifacts["bf16"], passing)[0])) for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == ["v0001", "v0002", "v0003", "v0004"]
    assert reg.state()["history"] == sorted(names)


# ----------------------------------------------------------------------------- CLIs
def test_export_generate_evaluate_commands(served, tmp_path):  # noqa: F811
    cfg = served.config
    overrides = [
        f"--config.{k}={v}"
        for k, v in (
            ("precision", cfg.precision),
            ("model.num_layers", 1),
            ("model.embed_dim", 32),
            ("model.num_heads", 2),
            ("model.mlp_dim", 64),
            ("model.max_len", 32),
            ("model.tie_embeddings", False),
            ("data.seq_len", 32),
            ("data.eval_batch_size", 16),
        )
    ]
    config = [f"--config={REPO}/configs/gpt_tiny.py", *overrides, f"--workdir={served.workdir}"]

    def run(module, *args):
        proc = subprocess.run(
            [sys.executable, "-m", f"bf16jax.{module}", *args],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = tmp_path / "cli-fp32"
    summary = json.loads(
        run(
            "export",
            *config,
            f"--out={out}",
            "--precision=fp32",
            "--platforms=cpu",
            "--eval_batches=0",
        ).splitlines()[-1]
    )
    assert summary["step"] == served.step and summary["precision"] == "fp32"
    manifest = artifact.verify(str(out))
    assert manifest["source"]["config_file"].endswith("configs/gpt_tiny.py")
    assert "--config.precision=bf16; q=w8a8" in manifest["source"]["argv"]
    # max_tokens defaults to min(64, the context): 32 positions here.
    lines = run("generate", f"--artifact={out}", "--prompt=And the")
    row = json.loads(lines.splitlines()[-1])
    art = _artifact(served.artifacts["fp32"])
    assert row["tokens"] == art.generate(["And the"], max_tokens=32)[0]["tokens"]
    report = json.loads(run("evaluate", *config, "--precision=int8", "--num_batches=1"))
    assert report["model"]["precision"] == "int8" and "chars15" in report["agreement"]
