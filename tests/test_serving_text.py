"""Text in and out for every tokenizer: artifacts carry their BPE / SentencePiece files (covered
by the manifest's hashes), loader.py encodes text without bf16jax, a prompt may be token ids,
and continuous batching serves T5 (the encoder input as the prompt) and BPE GPTs."""

import asyncio
import json
import shutil
import subprocess
import sys

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cli_runs import cli_env
from flax import nnx
from test_tokenizers import bpe_dir, spm_dir  # noqa: F401 (fixtures)

from bf16jax import config as config_lib
from bf16jax.data.tokenizer import load_tokenizer
from bf16jax.models import build_model
from bf16jax.serving import artifact, export
from bf16jax.serving import http as serve
from bf16jax.serving.engine import Engine

PROMPT = "And God said, Let there be light"

_LOADER_ALONE = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"bf16jax", "flax", "optax", "orbax", "grain", "ml_collections"}:
            raise ImportError(f"{name} must not be needed to load an artifact")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import loader
art = loader.Artifact(sys.argv[1])
print(json.dumps(art.generate([sys.argv[2]], **json.loads(sys.argv[3]))[0]))
"""


def _loader_alone(directory, prompt: str, **kwargs) -> dict:
    """`loader.Artifact(directory).generate([prompt], **kwargs)[0]` in a fresh process where
    bf16jax (and flax, optax, ...) cannot be imported."""
    proc = subprocess.run([sys.executable, "-c", _LOADER_ALONE, str(directory), prompt,
                           json.dumps(kwargs)], env=cli_env(), capture_output=True, text=True,
                          timeout=300, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _export(config, out) -> artifact.Artifact:
    config.lock()
    model = build_model(config.model, config.precision, rngs=nnx.Rngs(0))
    export.export_artifact(config, nnx.state(model, nnx.Param), None, str(out), precision="fp32",
                           source={"random_init": True}, platforms=("cpu",),
                           eval_batches=0)  # fmt: skip
    return artifact.Artifact(str(out))


@pytest.fixture(scope="module")
def bpe_gpt(bpe_dir, tmp_path_factory):  # noqa: F811
    c = config_lib.base_config("gpt")
    c.precision = "fp32"
    c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_len=32,
                   vocab_size=300)  # fmt: skip
    c.data.update(seq_len=32, tokenizer=str(bpe_dir))
    return _export(c, tmp_path_factory.mktemp("bpe_art") / "gpt")


@pytest.fixture(scope="module")
def spm_t5(spm_dir, tmp_path_factory):  # noqa: F811
    c = config_lib.base_config("t5")
    c.precision = "fp32"
    c.model.update(embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
                   num_decoder_layers=1, vocab_size=250)  # fmt: skip
    c.data.update(enc_len=16, dec_len=8, tokenizer=str(spm_dir))
    return _export(c, tmp_path_factory.mktemp("spm_art") / "t5")


def test_bpe_artifact_carries_its_tokenizer_and_takes_text_or_ids(bpe_gpt, bpe_dir, tmp_path):  # noqa: F811
    art, tok = bpe_gpt, load_tokenizer(str(bpe_dir))
    m = art.manifest
    assert m["tokenizer"]["kind"] == "BPETokenizer" and m["tokenizer"]["file"] == "tokenizer.json"
    assert "path" not in m["tokenizer"] and "tokenizer.json" in m["files"]
    row = art.generate([PROMPT], max_tokens=6)[0]
    assert row["text"] == tok.decode(row["tokens"]) and len(row["tokens"]) == 6
    ids = tok.encode(PROMPT).tolist()
    assert art.generate([ids], max_tokens=6)[0] == row  # token ids give the same answer
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        art.encode([5, 300])
    # The artifact moves without its source tokenizer directory and still speaks text.
    moved = tmp_path / "moved"
    shutil.copytree(art.directory, moved)
    assert _loader_alone(moved, PROMPT, max_tokens=6) == row
    (moved / "tokenizer.json").write_text((moved / "tokenizer.json").read_text() + " ")
    with pytest.raises(artifact.IntegrityError, match="tokenizer.json has"):
        artifact.Artifact(str(moved))


def test_sentencepiece_t5_text_through_the_loader_and_the_server(spm_t5, spm_dir):  # noqa: F811
    art, tok = spm_t5, load_tokenizer(str(spm_dir))
    assert art.manifest["tokenizer"]["file"] == "spiece.model"
    assert art.manifest["tokenizer"]["extra_ids"] == 100
    rows = art.generate([PROMPT, "In the beginning"], max_tokens=5)
    assert rows[0]["text"] == tok.decode(rows[0]["tokens"])
    assert art.encode(PROMPT).tolist() == tok.encode(PROMPT).tolist()
    assert art.decode([*tok.encode("In"), tok.sentinel_id(0)]) == "In<extra_id_0>"

    async def scenario():
        engine = Engine(artifact=art.directory, max_batch=2, warmup=False)
        async with TestClient(TestServer(serve.make_app(engine))) as client:
            while (await client.get("/healthz")).status != 200:
                await asyncio.sleep(0.1)
            replies = await asyncio.gather(*(
                client.post("/generate", json={"prompt": p, "max_tokens": 5})
                for p in (PROMPT, "In the beginning")))  # fmt: skip
            served = [await r.json() for r in replies]
            r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 9,
                                                           "temperature": 0})  # fmt: skip
            return served, r.status, await r.json()

    served, status, too_long = asyncio.run(scenario())
    assert [(s["tokens"], s["text"]) for s in served] == [(r["tokens"], r["text"]) for r in rows]
    assert status == 400 and "max_tokens=9 exceeds the decoder's 8" in too_long["error"]["message"]


def test_continuous_batching_with_scanned_layers():
    """A scan_layers GPT stacks its KV cache [L, B, ...]: `insert` writes batch axis 1 (run
    jitted in process here; `test_scanned_layers_export` exports one)."""
    import numpy as np

    from bf16jax.serving import inference
    from bf16jax.serving.batching import ContinuousBatcher, GenRequest
    from bf16jax.serving.runners import ProgramRunner

    c = config_lib.base_config("gpt")
    c.precision = "fp32"
    c.model.update(num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64, max_len=32,
                   scan_layers=True)  # fmt: skip
    c.data.update(seq_len=32)
    c.lock()
    model = build_model(c.model, "fp32", rngs=nnx.Rngs(0))
    runner = ProgramRunner(inference.Programs(model, c), {})
    prompts, lengths = ["And God said", "In", "And the LORD spake"], [5, 9, 3]

    def greedy(prompt, n):  # prefill + decode_step on the host, one row
        ids = runner.encode(prompt)
        buf = np.zeros((1, 32), np.int32)
        buf[0, : ids.size] = ids
        logits, cache, start = runner.call("prefill", buf, np.asarray([ids.size], np.int32))
        out = []
        for i in range(n):
            out.append(int(np.argmax(logits[0])))
            token = np.asarray([[out[-1]]], np.int32)
            logits, cache = runner.call("decode_step", cache, token, np.asarray(start) + i)
        return out

    async def batched():
        batcher = ContinuousBatcher(runner, 2)
        batcher.start()
        loop, requests = asyncio.get_running_loop(), []
        for p, n in zip(prompts, lengths, strict=True):
            requests.append(GenRequest(runner.encode(p), n, queue=asyncio.Queue(), loop=loop))
            batcher.submit(requests[-1])
        out = []
        for r in requests:
            tokens = []
            while (event := await r.queue.get())[0] == "token":
                tokens.append(int(event[1]))
            out.append(tokens)
        batcher.stop()
        return out

    got = asyncio.run(batched())
    assert got == [greedy(p, n) for p, n in zip(prompts, lengths, strict=True)]


def test_scanned_layers_export(tmp_path):
    """A GPT trained with scan_layers exports (its whole-batch `generate` traces: the module is
    built inside the decode loop's trace) and generates what its step programs generate."""
    import numpy as np

    c = config_lib.base_config("gpt")
    c.precision = "fp32"
    c.model.update(num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64, max_len=32,
                   scan_layers=True)  # fmt: skip
    c.data.update(seq_len=32)
    art = _export(c, tmp_path / "scanned")
    got = art.generate([PROMPT[:12]], max_tokens=6)[0]
    ids = art.encode(PROMPT[:12])
    buf = np.zeros((1, 32), np.int32)
    buf[0, : ids.size] = ids
    logits, cache, start = art.call("prefill", buf, np.asarray([ids.size], np.int32))
    expected = []
    for i in range(6):  # greedy through prefill + decode_step, one token per call
        expected.append(int(np.argmax(logits[0])))
        token = np.asarray([[expected[-1]]], np.int32)
        logits, cache = art.call("decode_step", cache, token, np.asarray(start) + i)
    eos = art.tokenizer["eos_id"]
    reason = "eos" if eos in expected else "length"
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert got["tokens"] == expected and got["finish_reason"] == reason


def _stop_at(art, tokens, ends, lo, hi, first, last) -> str | None:
    """text[lo:hi] as a stop string if it is printable, first found at lo, and starts in token
    `first` and ends in token `last` (ends[i]: characters before token i), else None."""
    full = art.decode(tokens)
    stop = full[lo:hi]
    whole = all(full.startswith(art.decode(tokens[:i])) for i in range(first, last + 2))
    return stop if (whole and stop.isprintable() and stop.strip() == stop
                    and "\ufffd" not in stop and full.find(stop) == lo
                    and ends[first] <= lo < ends[first + 1]
                    and ends[last] < hi <= ends[last + 1]) else None  # fmt: skip


def _stop_cases(art):
    """(prompt, seed, tokens, stops) of a sampled BPE completion: stop strings whose first
    occurrence in its text (a) lies inside one token, (b) spans two tokens, (c) spans three."""
    for seed in range(200):
        tokens = art.generate(["In"], max_tokens=24, temperature=1.0, seed=seed)[0]["tokens"]
        ends = [len(art.decode(tokens[:i])) for i in range(len(tokens) + 1)]
        kinds = [[], [], []]
        for i in range(2, len(tokens) - 2):
            found = (
                _stop_at(art, tokens, ends, ends[i] + 1, ends[i + 1], i, i),  # (a)
                _stop_at(art, tokens, ends, ends[i + 1] - 1, ends[i + 1] + 1, i, i + 1),
                _stop_at(art, tokens, ends, ends[i + 1] - 1, ends[i + 2] + 1, i, i + 2),
            )
            for kind, stop in zip(kinds, found, strict=True):  # fmt: skip
                if stop:
                    kind.append(stop)
        if all(kinds):
            return "In", seed, tokens, [k[0] for k in kinds]
    raise AssertionError("no sampled completion has the three kinds of stop string")


def test_stop_strings_match_the_decoded_text_in_both_batching_modes(bpe_gpt):
    """A BPE stop string inside a token, across two or across three tokens ends the completion
    at its start (not returned), finish_reason "stop", in continuous and window batching, on
    /v1/completions (streamed and not) and /generate; the streamed chunks joined equal the
    non-streamed text and are never taken back; usage counts the tokens up to the stop's end."""
    art = bpe_gpt
    prompt, seed, tokens, stops = _stop_cases(art)
    full = art.decode(tokens)
    ends = [len(art.decode(tokens[: i + 1])) for i in range(len(tokens))]
    expected = []
    for stop in stops:
        cut = full.find(stop)
        used = next(i + 1 for i, e in enumerate(ends) if e >= cut + len(stop))
        expected.append((full[:cut], used))
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 1.0, "seed": seed}

    async def scenario(batching):
        engine = Engine(artifact=art.directory, max_batch=2, warmup=False, batching=batching)
        async with TestClient(TestServer(serve.make_app(engine))) as client:
            while (await client.get("/healthz")).status != 200:
                await asyncio.sleep(0.1)
            out = []
            for stop in stops:
                plain = await (await client.post("/v1/completions",
                                                 json={**body, "stop": stop})).json()  # fmt: skip
                raw = await (
                    await client.post(
                        "/v1/completions", json={**body, "stop": [stop], "stream": True}
                    )
                ).text()
                events = [json.loads(line[6:]) for line in raw.splitlines()
                          if line.startswith("data: {")]  # fmt: skip
                legacy = await (await client.post("/generate", json={**body, "stop": stop})).json()
                out.append((plain, events, legacy))
            ids = await client.post("/generate", json={**body, "stop": [[tokens[6]]]})
            return out, await ids.json()

    for batching in ("continuous", "window"):
        got, by_id = asyncio.run(scenario(batching))
        first = tokens.index(tokens[6])  # a token-id stop still matches ids
        assert (by_id["tokens"], by_id["finish_reason"]) == (tokens[:first], "stop")
        for stop, (text, used), (plain, events, legacy) in zip(stops, expected, got, strict=True):
            where = f"{batching}, stop {stop!r}"
            choice = plain["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == (text, "stop"), where
            assert plain["usage"]["completion_tokens"] == used, where
            chunks = [e["choices"][0]["text"] for e in events]
            assert "".join(chunks) == text and events[-1]["choices"][0]["finish_reason"] == "stop"
            assert events[-1]["usage"]["completion_tokens"] == used, where
            assert stop not in "".join(chunks) and len([c for c in chunks if c]) > 1, where
            assert (legacy["text"], legacy["finish_reason"]) == (text, "stop"), where
            assert art.decode(legacy["tokens"]).startswith(text), where
            assert len(legacy["tokens"]) <= used, where  # the tokens of the text only


def test_text_stream_holds_partial_characters_and_stop_prefixes_only():
    from bf16jax.serving.text import TextStream, complete

    def decode(ids):  # a byte tokenizer: one id per UTF-8 byte
        return bytes(ids).decode("utf-8", errors="replace")

    data = list("hé 日本 ok the end".encode())
    out = complete(decode, data, [])
    assert out["text"] == decode(data) and "\ufffd" not in "".join(out["pieces"])
    assert out["pieces"][1:3] == ["", "é"]  # the first byte of é waits for the second
    stopped = complete(decode, data, ["the", "ok t"])  # "ok t" completes first
    assert (stopped["text"], stopped["stopped"], stopped["kept"]) == ("hé 日本 ", True, 11)
    stream = TextStream(decode, ["xyz"])
    assert [stream.add(b) for b in b"axy"] == [("a", False), ("", False), ("", False)]
    assert stream.add(ord("q")) == ("xyq", False)  # "xy" could start "xyz" until "q" came
    assert stream.add(0xE3) == ("", False) and stream.finish() == "\ufffd"  # a partial at the end


def test_stop_strings_on_text_in_offline_generation(bpe_gpt, tmp_path):
    """`Artifact.generate` (and so `python -m bf16jax.generate` and the standalone loader.py,
    which imports no bf16jax) match stop strings on the decoded text as the server does: a BPE
    stop inside a token, across two or across three cuts the text where it starts, with
    finish_reason "stop" and the ids of the returned text; a token-id stop still matches ids.
    On ids alone the stop inside one token never matched (finish_reason "length")."""
    art = bpe_gpt
    prompt, seed, tokens, stops = _stop_cases(art)
    full = art.decode(tokens)
    ends = [len(art.decode(tokens[: i + 1])) for i in range(len(tokens))]
    settings = {"max_tokens": 24, "temperature": 1.0, "seed": seed}
    for stop in stops:
        cut = full.find(stop)
        used = next(i + 1 for i, e in enumerate(ends) if e >= cut + len(stop))
        row = art.generate([prompt], stop=[[stop]], **settings)[0]
        assert (row["text"], row["finish_reason"]) == (full[:cut], "stop"), stop
        n = len(row["tokens"])  # the ids of the returned text: none past the stop's end
        assert row["tokens"] == tokens[:n] and n <= used and full[:cut] in art.decode(tokens[:n])
    # One row with a stop string, one with a token-id stop, one with none: each its own.
    rows = art.generate([prompt] * 3, stop=[[stops[0]], [[tokens[6]]], []], **settings)
    assert rows[0] == art.generate([prompt], stop=[[stops[0]]], **settings)[0]
    assert rows[1]["tokens"] == tokens[: tokens.index(tokens[6])]
    assert rows[1]["finish_reason"] == "stop"
    assert rows[2] == {"tokens": tokens, "finish_reason": "length", "text": full}
    # The artifact's own text.py, hashed in the manifest, runs where bf16jax is absent.
    assert art.manifest["files"]["text.py"]["sha256"] == artifact.sha256_file(
        f"{art.directory}/text.py"
    )
    alone = _loader_alone(art.directory, prompt, stop=[[stops[1]]], **settings)
    assert alone == art.generate([prompt], stop=[[stops[1]]], **settings)[0]
    assert alone["finish_reason"] == "stop"
    with pytest.raises(ValueError, match="a list of stops"):
        art.generate([prompt], stop=[stops[0]], **settings)
    with pytest.raises(ValueError, match="must not be empty"):
        art.generate([prompt], stop=[[""]], **settings)
    # text.py changed after export: refused before it runs.
    moved = tmp_path / "moved"
    shutil.copytree(art.directory, moved)
    loaded = artifact.Artifact(str(moved))
    (moved / "text.py").write_text((moved / "text.py").read_text() + "\n")
    with pytest.raises(artifact.IntegrityError, match="text.py is missing or changed"):
        loaded.generate([prompt], stop=[[stops[0]]], **settings)
