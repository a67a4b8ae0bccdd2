"""Bounded load test of `python -m bf16jax.serve` on loopback: latency and throughput per artifact.

For each artifact it starts the server on 127.0.0.1 (a free port), waits for /healthz, warms
it up, then sends `--requests` /generate requests from `--concurrency` concurrent clients
(greedy, `--max_tokens` tokens, prompts cut from the held-out KJV books) and stops the server.
Bounded in count and time (`--time_limit_s` per artifact); nothing leaves the machine.

    python experiments/load_test.py --artifacts=fp32=A,bf16=B,int8=C --requests=200 \
        --concurrency=8 --max_tokens=32 --out=experiments/results/serving

Prints one JSON line per artifact (p50 / p99 / mean latency, requests/s, generated tokens/s,
mean batch size from the server's metrics: requests per decode step under --batching=continuous,
per batch under window; artifact bytes) and writes results.json and a
markdown table to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int, seed: int = 0) -> list[str]:
    from bf16jax.data import datasets as data

    verses = [text for _, text in data.kjv_verses("eval")]
    rng = np.random.default_rng(seed)
    return [verses[i][: int(rng.integers(8, 24))] for i in rng.integers(0, len(verses), n)]


async def wait_ready(session, url: str, proc, deadline: float) -> dict:
    """Polls `url`/healthz until the server answers 200 (its JSON), exits, or `deadline`."""
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            async with session.get(f"{url}/healthz") as r:
                if r.status == 200:
                    return await r.json()
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError("the server did not become ready")


async def _drive(url: str, proc, prompts, args) -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=args.time_limit_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        health = await wait_ready(session, url, proc, time.time() + args.startup_s)
        body = {"max_tokens": args.max_tokens, "temperature": 0.0}
        for p in prompts[: args.concurrency]:  # warm-up, not timed
            async with session.post(f"{url}/generate", json={**body, "prompt": p}) as r:
                assert r.status == 200, await r.text()
        queue = list(prompts)
        latencies, tokens, errors = [], 0, 0
        stop_at = time.time() + args.time_limit_s

        async def client():
            nonlocal tokens, errors
            while queue and time.time() < stop_at:
                prompt = queue.pop()
                start = time.perf_counter()
                async with session.post(f"{url}/generate", json={**body, "prompt": prompt}) as r:
                    out = await r.json()
                if r.status != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                tokens += len(out["tokens"])

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
        async with session.get(f"{url}/metrics") as r:
            metrics = await r.text()
    lat = np.asarray(latencies)
    if args.batching == "window":  # requests per batch
        batches = _metric(metrics, "bf16jax_batch_size_count", 'endpoint="generate"')
        rows = _metric(metrics, "bf16jax_batch_size_sum", 'endpoint="generate"')
    else:  # requests per decode step
        batches = _metric(metrics, "bf16jax_decode_step_rows_count", "version=")
        rows = _metric(metrics, "bf16jax_decode_step_rows_sum", "version=")
    return {
        "version": health["version"],
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 1),
        "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 1),
        "mean_ms": round(1e3 * float(lat.mean()), 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_batch": round(rows / batches, 2) if batches else None,
    }


def _metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run_one(name: str, directory: str, args) -> dict:
    from bf16jax.serving import artifact

    manifest = artifact.verify(directory)
    port = free_port()
    cmd = [sys.executable, "-m", "bf16jax.serve", f"--artifact={directory}", f"--port={port}",
           f"--max_batch={args.max_batch}", f"--max_wait_ms={args.max_wait_ms}",
           f"--batching={args.batching}",
           f"--warmup={str(args.warmup).lower()}"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    log = tempfile.TemporaryFile("w+")  # the server's stderr, shown if it fails
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        result = asyncio.run(_drive(f"http://127.0.0.1:{port}", proc,
                                    _prompts(args.requests, args.seed), args))  # fmt: skip
    except Exception:
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    files = manifest["files"]
    return {
        "artifact": name,
        "precision": manifest["precision"],
        "params_bytes": manifest["params"]["bytes"],
        "artifact_bytes": sum(e["bytes"] for e in files.values()),
        "param_elements": manifest["params"]["elements"],
        **result,
    }


def _table(rows: list[dict], args) -> str:
    head = ("| artifact | params MB | artifact MB | p50 ms | p99 ms | requests/s | tokens/s | "
            "mean batch |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    lines = [
        f"| {r['artifact']} | {r['params_bytes'] / 1e6:.3f} | {r['artifact_bytes'] / 1e6:.3f} | "
        f"{r['p50_ms']} | {r['p99_ms']} | {r['requests_per_s']} | {r['tokens_per_s']} | "
        f"{r['mean_batch']} |"
        for r in rows
    ]
    setup = (f"{args.requests} requests, {args.concurrency} concurrent clients, greedy, "
             f"{args.max_tokens} new tokens, max_batch {args.max_batch}")  # fmt: skip
    return "\n".join([head, *lines, "", setup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True, help="name=DIR,name=DIR,...")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch", type=int, default=8)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--batching", default="continuous", choices=["continuous", "window"])
    parser.add_argument("--time_limit_s", type=float, default=300.0)
    parser.add_argument("--startup_s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="1: the server compiles every "
        "batch size before serving; 0: on first use (quicker start)",
    )
    parser.add_argument("--out", default=None, help="directory for results.json + table.md")
    args = parser.parse_args()
    pairs = [p.split("=", 1) for p in args.artifacts.split(",") if p]
    if not pairs or any(len(p) != 2 for p in pairs):
        parser.error("--artifacts takes name=DIR pairs separated by commas")
    rows = []
    for name, directory in pairs:
        row = run_one(name, directory, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        import jax

        os.makedirs(args.out, exist_ok=True)
        meta = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "jax": jax.__version__, "command": " ".join(sys.argv),
                "settings": {k: v for k, v in vars(args).items() if k != "out"}}  # fmt: skip
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(_table(rows, args) + "\n")
        print(_table(rows, args))


if __name__ == "__main__":
    sys.exit(main())
