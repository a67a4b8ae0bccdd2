"""The HTTP server (bf16jax.serving.http + bf16jax.serving.engine), in process through aiohttp's
test client,
plus one real loopback run of the load test. Uses the trained fixture's artifacts."""

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cli_runs import REPO, cli_env
from serving_fixture import served  # noqa: F401 (the fixture)

from bf16jax.serving import artifact, registry
from bf16jax.serving import http as serve
from bf16jax.serving.engine import Engine


def _passing(candidate, reference, **kw):  # the gate itself is tested in test_serving.py
    return {"passed": True, "checks": [{"check": "agreement", "value": 1.0, "passed": True}]}


@pytest.fixture(scope="module")
def reg_dir(served, tmp_path_factory):  # noqa: F811
    reg = registry.Registry(str(tmp_path_factory.mktemp("serve") / "reg"))
    reg.init(served.artifacts["fp32"])
    reg.promote(served.artifacts["bf16"], _passing)  # v0001
    reg.promote(served.artifacts["int8"], _passing)  # v0002, active
    return reg.directory


def _run(scenario, api_key=None, **engine_kw):
    async def main():
        engine = Engine(**engine_kw)
        app = serve.make_app(engine, api_key=api_key) if api_key else serve.make_app(engine)
        async with TestClient(TestServer(app)) as client:
            for _ in range(600):  # /healthz is 503 until the programs are compiled
                if (await client.get("/healthz")).status == 200:
                    break
                await asyncio.sleep(0.1)
            return await scenario(client, engine)

    return asyncio.run(main())


def _metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_generate_batches_versions_shadow_and_metrics(served, reg_dir):  # noqa: F811
    int8 = artifact.Artifact(served.artifacts["int8"])
    prompts = [f"And he said unto {name}" for name in ("Moses", "Aaron", "them", "me", "Ruth")]
    expected = int8.generate(prompts, max_tokens=10)

    async def scenario(client, engine):
        health = await (await client.get("/healthz")).json()
        assert health == {"status": "ok", "version": "v0002"}
        replies = await asyncio.gather(
            *(client.post("/generate", json={"prompt": p, "max_tokens": 10}) for p in prompts)
        )
        bodies = [await r.json() for r in replies]
        assert [r.status for r in replies] == [200] * 5
        assert [b["tokens"] for b in bodies] == [e["tokens"] for e in expected]
        assert {b["version"] for b in bodies} == {"v0002"}
        pinned = await client.post("/generate", json={"prompt": prompts[0], "max_tokens": 10,
                                                      "version": "v0001"})  # fmt: skip
        assert (await pinned.json())["version"] == "v0001"
        score = await (await client.post("/score", json={"text": "And God said"})).json()
        assert score["tokens"] == 11 and score["logprob"] == pytest.approx(
            int8.score(["And God said"])[0]["logprob"], abs=1e-5
        )
        sampled = {"prompt": prompts[0], "max_tokens": 10, "temperature": 1.0, "top_k": 50,
                   "top_p": 0.95, "seed": 11, "stop": ["\n", " the"]}  # fmt: skip
        a = await (await client.post("/generate", json=sampled)).json()
        b = await (await client.post("/generate", json=sampled)).json()
        assert a == b and a["finish_reason"] in ("length", "stop")
        for _ in range(50):  # shadow comparisons run after the replies
            await asyncio.sleep(0.1)
            if not engine._tasks:
                break
        return await (await client.get("/metrics")).text()

    metrics = _run(scenario, registry=reg_dir, max_batch=4, max_wait_ms=50, shadow_rate=1.0,
                   warmup=False, batching="window")  # fmt: skip
    # 5 concurrent generate requests ran in fewer than 5 batches.
    assert _metric(metrics, "bf16jax_batch_size_count", endpoint="generate") < 5 + 3
    assert _metric(metrics, "bf16jax_batch_size_sum", endpoint="generate") == 5 + 3
    assert _metric(metrics, "bf16jax_active_version", version="v0002", precision="int8") == 1
    assert _metric(metrics, "bf16jax_request_seconds_count", endpoint="generate",
                   version="v0002") == 7  # fmt: skip
    assert _metric(metrics, "bf16jax_generated_tokens_total", version="v0002") >= 50
    assert _metric(metrics, "bf16jax_tokens_per_second") > 0
    assert _metric(metrics, "bf16jax_shadow_requests_total") >= 8
    assert 0.9 < _metric(metrics, "bf16jax_shadow_agreement_mean") <= 1.0
    assert 0.0 < _metric(metrics, "bf16jax_shadow_logprob_drift_mean") < 0.1
    assert _metric(metrics, "bf16jax_requests_total", endpoint="generate", status="200") == 8


def test_bad_requests_get_4xx_with_a_message_and_the_server_survives(served, reg_dir):  # noqa: F811
    async def scenario(client, engine):
        async def post(path, data=None, **kw):
            r = await client.post(path, data=data, **kw)
            return r.status, (await r.json())["error"]["message"] if r.status != 200 else None

        cases = {
            "malformed": (await post("/generate", data=b'{"prompt": "a",'), 400, "malformed JSON"),
            "array": (await post("/generate", json=["a"]), 400, "JSON object"),
            "type": (
                await post("/generate", json={"prompt": "a", "max_tokens": "5"}),
                400,
                "'max_tokens' must be an int",
            ),
            "bool": (
                await post("/generate", json={"prompt": "a", "max_tokens": True}),
                400,
                "must be an int",
            ),
            "range": (await post("/generate", json={"prompt": "a", "top_p": 0}), 400, "top_p"),
            "nan": (
                await post("/generate", data=b'{"prompt": "a", "temperature": NaN}'),
                400,
                "finite",
            ),
            "missing": (
                await post("/generate", json={"max_tokens": 3}),
                400,
                "'prompt' is required",
            ),
            "unknown": (
                await post("/generate", json={"prompt": "a", "temp": 1}),
                400,
                "Unknown field(s) ['temp']",
            ),
            "long": (await post("/generate", json={"prompt": "x" * 33}), 413, "at most 32"),
            "stop": (await post("/generate", json={"prompt": "a", "stop": [1]}), 400, "stop"),
            "stop_ids": (
                await post("/generate", json={"prompt": "a", "stop": [[1, 999]]}),
                400,
                "token-id stop sequence must be 1..16 ids in [0, 384)",
            ),
            "stop_empty": (
                await post("/generate", json={"prompt": "a", "stop": ""}),
                400,
                "1..256 characters",
            ),
            "version": (
                await post("/generate", json={"prompt": "a", "version": "v0099"}),
                404,
                "Unknown version 'v0099'",
            ),
            "family": (await post("/classify", json={"image": [[0]]}), 404, "image model"),
            "score": (await post("/score", json={"text": "a"}), 400, "at least 2 tokens"),
            "body": (await post("/score", data=b"x" * (serve.MAX_BODY_BYTES + 10)), 413, ""),
            "route": ((await client.get("/nope")).status, 404, None),
            "ids": (await post("/generate", json={"prompt": [1, 999]}), 400, "[0, 384)"),
            "ids_type": (await post("/generate", json={"prompt": [1, True]}), 400, "token ids"),
            "context": (
                await post("/generate", json={"prompt": "x" * 30, "max_tokens": 5}),
                400,
                "(30 tokens) + max_tokens (5) = 35 exceeds the model's context of 32",
            ),
        }
        v1 = "/v1/completions"
        streamed = {"prompt": "a", "stream": True}
        cases.update({
            "v1_stream": (await post(v1, json={**streamed, "stream": "yes"}), 400, "'stream'"),
            "v1_logprobs": (await post(v1, json={"prompt": "a", "logprobs": 6}), 400, "logprobs"),
            "v1_echo": (await post(v1, json={"prompt": "a", "logprobs": 1, "echo": True}), 400,
                        "'echo' with 'logprobs'"),
            "v1_n": (await post(v1, json={"prompt": "a", "n": 3}), 400, "'n' must be 1"),
            "v1_prompt": (await post(v1, json={"prompt": [[1], "a", 3]}), 400, "'prompt'"),
            "v1_prompt_bool": (await post(v1, json={"prompt": True}), 400, "'prompt'"),
            "v1_prompt_empty": (await post(v1, json={"prompt": []}), 400, "'prompt'"),
            "v1_prompts": (await post(v1, json={**streamed, "prompt": ["a", "b"]}), 400,
                           "one prompt"),
            "v1_options": (await post(v1, json={**streamed, "stream_options": {"x": 1}}), 400,
                           "stream_options"),
            "v1_penalty": (await post(v1, json={"prompt": "a", "presence_penalty": 1}), 400,
                           "presence_penalty"),
            "v1_model": (await post(v1, json={"prompt": "a", "model": 3}), 400, "'model'"),
            "v1_unknown": (await post(v1, json={**streamed, "temp": 1}), 400, "'temp'"),
            "v1_stop": (await post(v1, json={**streamed, "stop": ["a"] * 5}), 400, "at most 4"),
            "v1_long": (await post(v1, json={**streamed, "prompt": "x" * 40}), 413, "at most 32"),
            "v1_context": (await post(v1, json={**streamed, "prompt": "x" * 30,
                                                "max_tokens": 9}), 400, "= 39 exceeds"),
            "v1_temperature": (await post(v1, json={**streamed, "temperature": -1}), 400,
                               "temperature"),
            "v1_deep": (await post(v1, data=b"[" * 3000), 400, "nested too deeply"),
            "v1_get": ((await client.get(v1)).status, 405, None),
        })  # fmt: skip
        for name, (got, status, message) in cases.items():
            code, error = got if isinstance(got, tuple) else (got, None)
            assert code == status, (name, code, error)
            if message:
                assert message in error, (name, error)
        # Window batching streams too: every token at the end of its batch, then [DONE].
        ok = {"prompt": "And God said", "max_tokens": 6, "temperature": 0}
        whole = await (await client.post(v1, json=ok)).json()
        events = (await (await client.post(v1, json={**ok, "stream": True})).text()).split("\n\n")
        chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        assert events[-2] == "data: [DONE]" and chunks[-1]["usage"]["completion_tokens"] == 6
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        # An unexpected failure inside a batch: 500 with the reason; the server keeps serving.
        engine._compute_batch = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
        code, error = await post("/score", json={"text": "ab"})
        assert code == 500 and "boom" in error
        return (await client.get("/healthz")).status

    assert _run(scenario, registry=reg_dir, max_batch=4, warmup=False, batching="window") == 200


def test_hostile_requests_get_bounded_400s_labels_and_healthz(served, reg_dir):  # noqa: F811
    """Issue #23 item 5: deeply nested JSON is a 400 (was a 500 RecursionError), the metrics'
    endpoint label takes known routes only (was the raw path), error messages cap what they
    echo (a 10,000-character version, 20,000 field names), /healthz says status and version
    only (was the training command line and workdir)."""

    async def scenario(client, engine):
        out = {}
        for name, raw in {"list": b"[" * 5000, "dict": b'{"a":' * 30000}.items():
            r = await client.post("/generate", data=raw)
            out[name] = (r.status, await r.text())
        for path in ("/../../etc/passwd", "/x" * 50):
            await client.get(path)
        r = await client.post("/generate", json={"prompt": "a", "version": "v" * 10000})
        out["version"] = (r.status, await r.text())
        r = await client.post(
            "/generate", json={"prompt": "a", **{f"f{i}": 0 for i in range(20000)}}
        )
        out["fields"] = (r.status, await r.text())
        out["healthz"] = await (await client.get("/healthz")).json()
        out["metrics"] = await (await client.get("/metrics")).text()
        return out

    out = _run(scenario, registry=reg_dir, max_batch=2, warmup=False)
    for name in ("list", "dict"):
        assert out[name][0] == 400 and "nested too deeply" in out[name][1], out[name]
    assert out["version"][0] == 404 and len(out["version"][1]) < 1000
    assert out["fields"][0] == 400 and len(out["fields"][1]) < 1000
    assert out["healthz"] == {"status": "ok", "version": "v0002"}
    endpoints = {line.split('endpoint="')[1].split('"')[0]
                 for line in out["metrics"].splitlines() if 'endpoint="' in line}  # fmt: skip
    assert endpoints <= {"generate", "score", "classify", "healthz", "metrics", "other",
                         "v1/completions", "v1/models"}, endpoints  # fmt: skip


def test_promote_and_rollback_switch_without_dropping_requests(served, reg_dir):  # noqa: F811
    reg = registry.Registry(reg_dir)

    async def scenario(client, engine):
        async def one(i):
            r = await client.post("/generate", json={"prompt": f"And {i}", "max_tokens": 8})
            return r.status, (await r.json()).get("version")

        first = asyncio.gather(*(one(i) for i in range(12)))
        await asyncio.sleep(0.05)
        reg.rollback()  # v0002 -> v0001 while requests are in flight
        results = await first
        for _ in range(100):
            if engine.active.name == "v0001":
                break
            await asyncio.sleep(0.1)
        later = await asyncio.gather(*(one(i) for i in range(4)))
        # Read both before the registry goes back to v0002: the poll (every 0.05 s) may switch
        # to it before a later read, and count a second switch.
        active = engine.active.name
        metrics = await (await client.get("/metrics")).text()
        reg.rollback(to="v0002")  # as the other tests of this module expect the registry
        return results, later, active, metrics

    results, later, active, metrics = _run(scenario, registry=reg_dir, max_batch=4,
                                           poll_s=0.05, warmup=False)  # fmt: skip
    assert [s for s, _ in results + later] == [200] * 16
    assert {v for _, v in later} == {"v0001"} and active == "v0001"
    assert _metric(metrics, "bf16jax_version_switches_total") == 1
    assert _metric(metrics, "bf16jax_active_version", version="v0001", precision="bf16") == 1


def test_load_test_on_loopback(served, tmp_path):  # noqa: F811
    cmd = [sys.executable, "experiments/load_test.py",
           f"--artifacts=int8={served.artifacts['int8']}", "--requests=12", "--concurrency=4",
           "--max_tokens=8", "--max_batch=4", "--warmup=0", f"--out={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["requests"] == 12 and row["errors"] == 0 and row["precision"] == "int8"
    assert 0 < row["p50_ms"] <= row["p99_ms"] and row["tokens_per_s"] > 0
    assert row["mean_batch"] > 1  # concurrent clients were batched
    assert "| int8 |" in (tmp_path / "table.md").read_text()
    assert np.isfinite(json.loads((tmp_path / "results.json").read_text())["rows"][0]["wall_s"])
