"""Serving benchmark: continuous batching vs window batching on one artifact, Poisson arrivals.

    A=runs/bench_tiny/art
    python experiments/serving_bench.py --artifact=$A-bf16 \
        --eval_artifacts=fp32=$A-fp32,bf16=$A-bf16,int8=$A-int8 \
        --rates=1,2,4,8 --requests=40 --max_batch=8 --markdown=experiments/results/serving_bench.md

For each batching mode (`--modes`, default continuous and window) it starts `python -m
bf16jax.serve --artifact=...` on 127.0.0.1, waits for /healthz, sends `--warmup` requests (not
measured), then per request rate sends `--requests` streaming `/v1/completions` requests whose
arrivals form a Poisson process (exponential gaps, seeded): prompts cut from held-out KJV verses,
max_tokens uniform in [--min_tokens, --max_tokens], greedy. Per (mode, rate) it prints one JSON
line: p50 / p99 of TTFT (request sent -> first token received), TPOT ((e2e - TTFT) / (tokens -
1)), ITL (gaps between received chunks) and end-to-end latency; output tokens/s and requests/s
over the rate's wall time; goodput (requests/s meeting both SLOs, --slo_ttft_s and
--slo_tpot_s). Window batching answers when a batch's whole decode loop ends, so its TTFT is its
end-to-end latency. Then one line per --eval_artifacts entry (the manifest's eval accuracy and
agreement with FP32), and a summary line checking the target: at the lowest rate where window
batching's p99 TTFT passes 1 s, continuous batching's output tokens/s ratio and p99 TTFT.
Nothing leaves the machine; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
from load_test import free_port, wait_ready  # experiments/load_test.py, beside this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workload(n: int, rate: float, args, seed: int) -> list[tuple[float, str, int]]:
    """(arrival offset s, prompt, max_tokens) of n requests at `rate` per second.

    "uniform": prompt bytes uniform in [--min_prompt, --max_prompt], max_tokens uniform in
    [--min_tokens, --max_tokens]. "sharegpt": ShareGPT-shaped (heavy-tailed, wide) lengths
    scaled to the context: prompt and output lengths log-normal with medians --prompt_median /
    --output_median and log-sd --prompt_sigma / --output_sigma, the prompt clipped to
    [4, context / 2], max_tokens to [2, context - prompt].
    """
    from bf16jax.data import datasets as data

    verses = [text for _, text in data.kjv_verses("eval")]
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    out, at = [], 0.0
    for gap in gaps:
        at += gap
        if args.workload == "uniform":  # (the draws of the first benchmark, kept)
            verse = verses[int(rng.integers(len(verses)))]
            prompt = verse[: int(rng.integers(args.min_prompt, args.max_prompt + 1))]
            out.append((at, prompt, int(rng.integers(args.min_tokens, args.max_tokens + 1))))
            continue
        size = int(np.clip(rng.lognormal(np.log(args.prompt_median), args.prompt_sigma), 4,
                           args.context // 2))  # fmt: skip
        tokens = int(np.clip(rng.lognormal(np.log(args.output_median), args.output_sigma), 2,
                             args.context - size))  # fmt: skip
        first = int(rng.integers(len(verses)))
        text = verses[first]
        while len(text.encode()) < size:  # long prompts: the verses that follow
            first = (first + 1) % len(verses)
            text += " " + verses[first]
        out.append((at, text.encode()[:size].decode("utf-8", "ignore"), tokens))
    return out


async def _one(session, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": None, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}  # fmt: skip
    start = time.perf_counter()
    arrivals, tokens, error = [], 0, None
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            return {"error": f"{r.status} {(await r.text())[:200]}"}
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            data = json.loads(payload)
            if "error" in data:
                error = data["error"]["message"]
                continue
            arrivals.append(time.perf_counter() - start)
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    if error or not arrivals:
        return {"error": error or "no tokens"}
    e2e = arrivals[-1]
    return {"ttft": arrivals[0], "e2e": e2e, "tokens": tokens,
            "tpot": (e2e - arrivals[0]) / max(tokens - 1, 1),
            "itl": np.diff(arrivals).tolist(), "end": start + e2e}  # fmt: skip


def _pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 4) if len(values) else None


async def _rate(session, url: str, mode: str, rate: float, args) -> dict:
    work = _workload(args.requests, rate, args, seed=args.seed + int(rate * 1000))
    t0 = time.perf_counter()

    async def scheduled(at, prompt, max_tokens):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return await _one(session, url, prompt, max_tokens)

    rows = await asyncio.gather(*(scheduled(*w) for w in work))
    ok = [r for r in rows if "error" not in r]
    wall = max((r["end"] for r in ok), default=time.perf_counter()) - t0
    ttft, tpot = [r["ttft"] for r in ok], [r["tpot"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    good = [r for r in ok if r["ttft"] <= args.slo_ttft_s and r["tpot"] <= args.slo_tpot_s]
    out_tokens = sum(r["tokens"] for r in ok)
    return {
        "mode": mode, "rate": rate, "requests": len(rows), "errors": len(rows) - len(ok),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
        "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99),
        "e2e_p50_s": _pct([r["e2e"] for r in ok], 50),
        "e2e_p99_s": _pct([r["e2e"] for r in ok], 99),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "requests_per_s": round(len(ok) / wall, 3), "goodput_rps": round(len(good) / wall, 3),
        "wall_s": round(wall, 2),
        # what the clients asked for: max_tokens summed over the arrival span
        "offered_tokens_per_s": round(sum(w[2] for w in work) / work[-1][0], 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip


async def _bench_mode(mode: str, args) -> list[dict]:
    import aiohttp

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "bf16jax.serve", f"--artifact={args.artifact}", f"--port={port}",
           f"--max_batch={args.max_batch[mode]}", f"--batching={mode}",
           f"--max_queue={args.max_queue}", "--request_timeout_s=600",
           f"--max_wait_ms={args.max_wait_ms}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = []
    try:
        timeout = aiohttp.ClientTimeout(total=args.time_limit_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_ready(session, url, proc, time.time() + args.startup_s)
            warm = _workload(args.warmup, 100.0, args, seed=args.seed + 999_999)
            await asyncio.gather(*(_one(session, url, p, m) for _, p, m in warm))
            for rate in args.rates:
                row = await _rate(session, url, mode, rate, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def _accuracy(named: str) -> list[dict]:
    """The eval accuracy and FP32 agreement the export measured for each artifact."""
    out = []
    for item in filter(None, named.split(",")):
        name, directory = item.split("=", 1)
        with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
        metrics = m.get("metrics") or {}
        clean = metrics.get("clean", {})
        out.append({"artifact": name, "precision": m["precision"],
                    "accuracy": clean.get("accuracy"), "loss": clean.get("loss"),
                    "agreement_with_fp32": (metrics.get("agreement") or {}).get("clean", 1.0
                                            if m["precision"] == "fp32" else None),
                    "params_bytes": m["params"]["bytes"]})  # fmt: skip
    return out


def _target(rows: list[dict], slo_ttft_s: float = 1.0) -> dict:
    """The issue's target (at the lowest rate where window batching's p99 TTFT passes 1 s:
    continuous batching's tokens/s ratio and p99 TTFT), and each mode's SLO capacity: the
    output tokens/s at the highest swept rate where its p99 TTFT stays within the SLO
    (the rates below it too, no errors)."""
    by = {(r["mode"], r["rate"]): r for r in rows}
    rates = sorted({r["rate"] for r in rows})
    capacity = {}
    for mode in sorted({r["mode"] for r in rows}):
        held = None
        for x in rates:
            r = by.get((mode, x))
            if r is None or r["errors"] or (r["ttft_p99_s"] or 0) > slo_ttft_s:
                break
            held = r
        capacity[mode] = {"rate": held["rate"], "output_tokens_per_s": held["output_tokens_per_s"]
                          } if held else None  # fmt: skip
    out = {}
    c, w = capacity.get("continuous"), capacity.get("window")
    if c and w:
        out["slo_capacity"] = {**capacity, "tokens_per_s_ratio": round(
            c["output_tokens_per_s"] / max(w["output_tokens_per_s"], 1e-9), 2)}  # fmt: skip
    over = [x for x in rates if ((by.get(("window", x)) or {}).get("ttft_p99_s") or 0) > 1.0]
    if not over or ("continuous", over[0]) not in by:
        return {"target": "window batching's p99 TTFT stayed under 1 s: raise --rates", **out}
    w, c = by[("window", over[0])], by[("continuous", over[0])]
    ratio = c["output_tokens_per_s"] / max(w["output_tokens_per_s"], 1e-9)
    offered = c["offered_tokens_per_s"]
    return {"target_rate": over[0], "tokens_per_s_ratio": round(ratio, 2),
            "window_ttft_p99_s": w["ttft_p99_s"], "continuous_ttft_p99_s": c["ttft_p99_s"],
            "met": ratio >= 2.0 and c["ttft_p99_s"] < w["ttft_p99_s"],
            # no server can serve more than is offered: the ratio's ceiling at this rate
            "ratio_ceiling": round(offered / max(w["output_tokens_per_s"], 1e-9), 2),
            **out}  # fmt: skip


def _markdown(rows, accuracy, target, args) -> str:
    cols = ["mode", "rate", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "itl_p99_s", "e2e_p99_s",
            "output_tokens_per_s", "offered_tokens_per_s", "goodput_rps", "errors",
            "load_avg_1m"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "| artifact | precision | eval accuracy | agreement with fp32 | params bytes |",
              "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {a['artifact']} | {a['precision']} | {a['accuracy']} | "
              f"{a['agreement_with_fp32']} | {a['params_bytes']} |" for a in accuracy]  # fmt: skip
    lines += ["", f"Target: `{json.dumps(target)}`", "",
              f"SLOs: TTFT <= {args.slo_ttft_s} s, TPOT <= {args.slo_tpot_s} s."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="the artifact both modes serve")
    p.add_argument("--eval_artifacts", default="", help="name=DIR,... for the accuracy table")
    p.add_argument("--modes", default="continuous,window")
    p.add_argument("--rates", default="1,2,4,8", help="request rates (per second) to sweep")
    p.add_argument("--requests", type=int, default=40, help="requests per rate")
    p.add_argument("--warmup", type=int, default=8, help="requests before measuring")
    p.add_argument("--min_prompt", type=int, default=8)
    p.add_argument("--max_prompt", type=int, default=48)
    p.add_argument("--min_tokens", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument(
        "--max_batch",
        default="8",
        help="slots / largest batch: N for both modes, or continuous=N,window=M",
    )
    p.add_argument("--workload", default="uniform", choices=("uniform", "sharegpt"))
    p.add_argument("--context", type=int, default=128, help="sharegpt: the model's context")
    p.add_argument("--prompt_median", type=float, default=24)
    p.add_argument("--prompt_sigma", type=float, default=0.6)
    p.add_argument("--output_median", type=float, default=24)
    p.add_argument("--output_sigma", type=float, default=0.9)
    p.add_argument("--max_wait_ms", type=float, default=5.0)
    p.add_argument("--max_queue", type=int, default=1024)
    p.add_argument("--slo_ttft_s", type=float, default=1.0)
    p.add_argument("--slo_tpot_s", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup_s", type=float, default=300)
    p.add_argument("--time_limit_s", type=float, default=600)
    p.add_argument("--markdown", default="", help="write the tables here too")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    modes = args.modes.split(",")
    if "=" in args.max_batch:
        args.max_batch = {k: int(v) for k, v in (x.split("=") for x in args.max_batch.split(","))}
    else:
        args.max_batch = dict.fromkeys(modes, int(args.max_batch))
    import jax

    print(json.dumps({"artifact": os.path.abspath(args.artifact), "jax": jax.__version__,
                      "machine": platform.machine(), "cpus": os.cpu_count(),
                      "max_batch": args.max_batch, "requests_per_rate": args.requests,
                      "workload": args.workload, "load_avg": os.getloadavg(),
                      "max_tokens": [args.min_tokens, args.max_tokens]}), flush=True)  # fmt: skip
    rows = []
    for mode in modes:
        rows += asyncio.run(_bench_mode(mode, args))
    accuracy = _accuracy(args.eval_artifacts)
    for row in accuracy:
        print(json.dumps(row), flush=True)
    target = _target(rows, args.slo_ttft_s)
    print(json.dumps(target), flush=True)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(_markdown(rows, accuracy, target, args))


if __name__ == "__main__":
    main()
