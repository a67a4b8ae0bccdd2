"""The OpenAI-compatible API, continuous batching, streaming, readiness and access control
(bf16jax.serving.openai_api, batching, engine, http), through the real `openai` client and
aiohttp's test server. Uses the trained fixture's artifacts (tests/serving_fixture.py)."""

import asyncio
import functools
import json
import threading
import time

import numpy as np
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from serving_fixture import served  # noqa: F401 (the fixture)

from bf16jax.serving import artifact
from bf16jax.serving import http as serve
from bf16jax.serving.batching import ContinuousBatcher
from bf16jax.serving.engine import Engine

KEY = "sk-test-0123456789"
PROMPTS = ["And he said unto Moses", "In the beginning", "And the LORD", "Ruth"]


@functools.cache
def _artifact(directory: str) -> artifact.Artifact:
    return artifact.Artifact(directory)


def _run(scenario, *, api_key=None, wait_ready=True, **engine_kw):
    async def main():
        engine = Engine(**engine_kw)
        async with TestClient(TestServer(serve.make_app(engine, api_key=api_key))) as client:
            for _ in range(600 if wait_ready else 0):
                if (await client.get("/healthz")).status == 200:
                    break
                await asyncio.sleep(0.1)
            return await scenario(client, engine)

    return asyncio.run(main())


def _slow_steps(engine, seconds: float) -> None:
    """Each decode step of the active version's batcher takes `seconds` longer."""
    batcher = engine.active.batcher
    step = batcher._step
    batcher._step = lambda: (time.sleep(seconds), step())


def test_continuous_batching_equals_the_generate_program(served):  # noqa: F811
    """Greedy and seeded sampling through decode slots give the whole-batch program's tokens,
    whatever the neighbours; a short request finishes while a long one still runs."""
    art = _artifact(served.artifacts["int8"])
    greedy = art.generate(PROMPTS, max_tokens=8)
    sampled = art.generate(PROMPTS, max_tokens=8, temperature=1.0, top_k=40, top_p=0.9, seed=5,
                           stop=[["e"]] * len(PROMPTS))  # fmt: skip

    async def scenario(client, engine):
        async def gen(prompt, **kw):
            r = await client.post("/generate", json={"prompt": prompt, **kw})
            assert r.status == 200, await r.text()
            return await r.json()

        got = await asyncio.gather(*(gen(p, max_tokens=8) for p in PROMPTS))
        got_sampled = await asyncio.gather(*(gen(p, max_tokens=8, temperature=1.0, top_k=40,
                                                 top_p=0.9, seed=5, stop="e")
                                             for p in PROMPTS))  # fmt: skip
        _slow_steps(engine, 0.02)
        t0 = time.perf_counter()
        done = {}

        async def timed(name, **kw):
            await gen("And", **kw)
            done[name] = time.perf_counter() - t0

        await asyncio.gather(timed("long", max_tokens=25), timed("short", max_tokens=2))
        await asyncio.sleep(0.3)  # the host loop sets the gauges after its turn
        return got, got_sampled, done, engine.metrics_text().decode()

    got, got_sampled, done, metrics = _run(scenario, artifact=served.artifacts["int8"],
                                           reference=served.artifacts["fp32"], shadow_rate=1.0,
                                           max_batch=2, warmup=False)  # fmt: skip
    assert [g["tokens"] for g in got] == [r["tokens"] for r in greedy]
    assert [g["finish_reason"] for g in got] == [r["finish_reason"] for r in greedy]
    assert [(g["tokens"], g["finish_reason"]) for g in got_sampled] == [
        (r["tokens"], r["finish_reason"]) for r in sampled
    ]
    assert done["short"] < done["long"] / 3  # it did not wait for the long one
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency",
                 "queue_time"):  # fmt: skip
        assert f'bf16jax_{name}_seconds_count{{precision="int8",version="int8"}}' in metrics
    assert 'bf16jax_slot_use{precision="int8",version="int8"} 0.0' in metrics
    shadowed = [ln for ln in metrics.splitlines() if ln.startswith("bf16jax_shadow_requests_total")]
    assert float(shadowed[0].split()[-1]) >= 8  # shadow mode compares continuous requests too
    agreement = [
        ln for ln in metrics.splitlines() if ln.startswith("bf16jax_shadow_agreement_mean")
    ]
    assert 0.9 < float(agreement[0].split()[-1]) <= 1.0


def test_openai_client_completions_streaming_models_and_errors(served):  # noqa: F811
    art = _artifact(served.artifacts["int8"])
    expected = art.generate([PROMPTS[0]], max_tokens=6)[0]

    async def scenario(client, engine):
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=KEY,
                                 max_retries=0)  # fmt: skip
        models = await api.models.list()
        card = models.data[0].model_dump()
        done = await api.completions.create(model="int8", prompt=PROMPTS[0], max_tokens=6,
                                            temperature=0, logprobs=2)  # fmt: skip
        ids = await api.completions.create(model="int8", prompt=art.encode(PROMPTS[0]).tolist(),
                                           max_tokens=6, temperature=0, echo=True)  # fmt: skip
        batch = await api.completions.create(model="int8", prompt=PROMPTS[:2], max_tokens=3,
                                             temperature=0)  # fmt: skip
        chunks = [c async for c in await api.completions.create(
            model="int8", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)]  # fmt: skip
        errors = {}
        for name, kw in {
            "context": dict(prompt=PROMPTS[0], max_tokens=20),
            "model": dict(model="v9", prompt="a"),
            "n": dict(prompt="a", n=2),
            "prompt": dict(prompt={"a": 1}),
        }.items():
            with pytest.raises(openai.APIStatusError) as e:
                await api.completions.create(**{"model": "int8", **kw})
            errors[name] = (e.value.status_code, e.value.body)
        unauthorized = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="wrong",
                                          max_retries=0)  # fmt: skip
        with pytest.raises(openai.AuthenticationError):
            await unauthorized.models.list()
        open_routes = [(await client.get(p)).status for p in ("/healthz", "/metrics")]
        closed = (await client.post("/generate", json={"prompt": "a"})).status
        return card, done, ids, batch, chunks, errors, open_routes, closed

    card, done, ids, batch, chunks, errors, open_routes, closed = _run(
        scenario, api_key=KEY, artifact=served.artifacts["int8"], max_batch=4, warmup=False
    )
    assert card["id"] == "int8" and card["precision"] == "int8"
    assert card["context_length"] == 32
    choice = done.choices[0]
    assert choice.text == expected["text"] and choice.finish_reason == "length"
    assert done.usage.prompt_tokens == 22 and done.usage.completion_tokens == 6
    lp = choice.logprobs
    assert len(lp.tokens) == 6 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0])  # greedy
    assert ids.choices[0].text == PROMPTS[0] + expected["text"]  # token ids in, echo
    assert [c.index for c in batch.choices] == [0, 1]
    assert len(chunks) >= 6 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == expected["text"]
    assert chunks[-1].usage.completion_tokens == 6
    assert errors["context"][0] == 400
    message = errors["context"][1]["message"]
    assert "22 tokens" in message and "20" in message and "32" in message
    assert errors["context"][1]["param"] == "max_tokens"
    assert errors["model"][0] == 404 and errors["model"][1]["code"] == "model_not_found"
    assert errors["n"][0] == 400 and errors["n"][1]["param"] == "n"
    assert errors["prompt"][0] == 400 and errors["prompt"][1]["type"] == "invalid_request_error"
    assert open_routes == [200, 200] and closed == 401


def test_disconnect_frees_the_slot_and_timeouts_and_full_queue(served):  # noqa: F811
    async def scenario(client, engine):
        _slow_steps(engine, 0.05)
        batcher = engine.active.batcher
        body = {"model": "int8", "prompt": "And", "max_tokens": 25, "stream": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        first = await r.content.readline()
        assert first.startswith(b"data: {")
        running = batcher.running
        r.close()  # the client leaves after the first token
        t0 = time.perf_counter()
        while batcher.running and time.perf_counter() - t0 < 5:
            await asyncio.sleep(0.02)
        freed_after, freed = time.perf_counter() - t0, batcher.running
        engine.request_timeout_s = 0.2
        slow = await client.post("/generate", json={"prompt": "And", "max_tokens": 25})
        streamed = await (await client.post("/v1/completions", json=body)).text()
        engine.request_timeout_s = 60
        engine.max_queue = 0
        full = await client.post("/generate", json={"prompt": "And", "max_tokens": 2})
        return (running, freed, freed_after, slow.status, (await slow.json()),
                streamed, full.status, full.headers.get("Retry-After"))  # fmt: skip

    running, after, freed_after, slow, slow_body, streamed, full, retry = _run(
        scenario, artifact=served.artifacts["int8"], max_batch=2, warmup=False
    )
    assert running == 1 and after == 0 and freed_after < 0.6  # 25 steps would take 1.25 s
    assert slow == 504 and "limit" in slow_body["error"]["message"]
    assert '"error"' in streamed and streamed.rstrip().endswith("data: [DONE]")
    assert full == 429 and retry == "1"


def test_healthz_is_503_until_every_program_is_warm(served, monkeypatch):  # noqa: F811
    gate = threading.Event()
    warm = ContinuousBatcher.warm
    monkeypatch.setattr(ContinuousBatcher, "warm", lambda self: (gate.wait(60), warm(self)))

    async def scenario(client, engine):
        before = await client.get("/healthz")
        gen = await client.post("/generate", json={"prompt": "a", "max_tokens": 1})
        gate.set()
        for _ in range(600):
            after = await client.get("/healthz")
            if after.status == 200:
                break
            await asyncio.sleep(0.1)
        return (before.status, await before.json(), gen.status, after.status,
                await after.json())  # fmt: skip

    before, before_body, gen, after, after_body = _run(
        scenario, wait_ready=False, artifact=served.artifacts["int8"], max_batch=2, warmup=False
    )
    assert before == 503 and before_body == {"status": "loading", "version": "int8"}
    assert gen == 503
    assert after == 200 and after_body == {"status": "ok", "version": "int8"}


def test_continuous_batching_runs_the_whole_context(served):  # noqa: F811
    """A prompt + max_tokens that exactly fill the context finish with every token."""
    art = _artifact(served.artifacts["bf16"])
    prompt = "And he said unto Moses, I"  # 25 bytes + 7 tokens = 32
    expected = art.generate([prompt], max_tokens=7)[0]

    async def scenario(client, engine):
        r = await client.post("/generate", json={"prompt": prompt, "max_tokens": 7})
        return await r.json()

    got = _run(scenario, artifact=served.artifacts["bf16"], max_batch=1, warmup=False)
    assert got["tokens"] == expected["tokens"] and len(got["tokens"]) == 7
    assert np.all(np.asarray(got["tokens"]) >= 0)


@pytest.mark.slow
def test_serving_bench_runs_both_modes(served, tmp_path):  # noqa: F811
    """experiments/serving_bench.py end to end, tiny: one rate, both batching modes."""
    from cli_runs import run_python

    art = served.artifacts["int8"]
    md = tmp_path / "bench.md"
    proc = run_python("experiments/serving_bench.py", f"--artifact={art}",
                      f"--eval_artifacts=bf16={served.artifacts['bf16']},int8={art}",
                      "--rates=20", "--requests=6", "--warmup=2", "--min_tokens=2",
                      "--max_tokens=6", "--max_prompt=16", "--max_batch=2",
                      f"--markdown={md}", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    modes = {r["mode"]: r for r in rows if "mode" in r}
    assert set(modes) == {"continuous", "window"}
    for r in modes.values():
        assert r["requests"] == 6 and r["errors"] == 0 and r["output_tokens_per_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["e2e_p99_s"] + 1e-9
    # window batching answers at the end of a batch: its first token is its last
    assert modes["window"]["ttft_p99_s"] == pytest.approx(modes["window"]["e2e_p99_s"], abs=0.05)
    accuracy = [r for r in rows if "accuracy" in r]
    assert [a["precision"] for a in accuracy] == ["bf16", "int8"]
    assert accuracy[0]["accuracy"] > 0.2 and accuracy[1]["accuracy"] is None  # no eval: None
    assert "| continuous | 20.0 |" in md.read_text() and (
        "target" in rows[-1] or "target_rate" in rows[-1]
    )


def test_one_turn_prefills_a_bucket_in_one_call(served):  # noqa: F811
    """Requests admitted in the same turn share a prefill call per prompt bucket (padded to a
    power of two) and still get the whole-batch program's tokens; a turn's events reach the
    event loop in one call per turn."""
    from bf16jax.serving.batching import GenRequest

    art = _artifact(served.artifacts["int8"])
    prompts = [*PROMPTS, "And God", "Ruth said"]  # buckets 32 (one) and 16 (five: 4 + 1)
    expected = art.generate(prompts, max_tokens=6)
    batcher = ContinuousBatcher(art, 8)
    batcher.warm()
    calls, call = [], art.call

    def counted(name, *a):
        calls.append((name, a[0].shape[0] if name.startswith("prefill_") else 0))
        return call(name, *a)

    art.call = counted
    woken = []

    async def main():
        loop = asyncio.get_running_loop()
        wake = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (woken.append(1), wake(*a))[1]
        requests = [GenRequest(art.encode(p), 6, queue=asyncio.Queue(), loop=loop)
                    for p in prompts]  # fmt: skip
        for r in requests:  # all waiting before the loop's first turn
            batcher.submit(r)
        batcher.start()
        out = []
        for r in requests:
            events = []
            while not events or events[-1][0] not in ("done", "error"):
                events.append(await r.queue.get())
            out.append([int(e[1]) for e in events if e[0] == "token"])
        return out

    try:
        got = asyncio.run(main())
    finally:
        batcher.stop()
        del art.call
    assert got == [r["tokens"] for r in expected]
    prefills = sorted(n for name, n in calls if name.startswith("prefill_"))
    assert prefills == [1, 1, 4]  # 5 prompts of bucket 16: 4 + 1; 1 of bucket 32
    steps = sum(name == "step" for name, _ in calls)
    assert len(woken) <= steps + 2  # not one wake-up per token (6 requests x 6 tokens)
