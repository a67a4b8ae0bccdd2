"""Benchmark of prepared data: `python -m bf16jax.prepare` throughput and the loaders' speed.

    python experiments/data_bench.py [--size_mb=1024] [--bpe_mb=256] [--work=/tmp/data_bench]
        [--bpe_encoders=auto,tokenizers] [--loaders_only]

Generates a corpus of jsonl files (documents of 1-40 consecutive King James verses, so real
English, repeated up to --size_mb), trains a 32k byte-level BPE tokenizer on the KJV (GPT-2's own
file cannot be downloaded here; same algorithm and byte-level pre-tokenizer), then prints one JSON
line per measurement:
  prepare: MB/s and tokens/s in total and per worker, peak RSS of the process tree (psutil, all
           workers together), for the byte tokenizer on the whole corpus and BPE on --bpe_mb
           with each --bpe_encoders (auto = tiktoken where exact; tokenizers = the peer);
  loader:  tokens/s of one host's grain pipeline (data.num_workers=0), time to first batch and
           peak RSS, for GPT windows (seq_len 1024) and T5 packed span corruption (enc_len 512,
           dec_len 114; tokens = encoder row tokens), on the whole corpus and on one file of it
           (the RSS should not grow with the corpus). T5 runs twice: "cold" builds its packing
           plan (DATASET/plans/ deleted first), "warm" reads it back.
Each measurement runs in a fresh process and records the load average when it ends. Not a
test: tests check behaviour only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOADER = r"""
import json, resource, sys, time
from bf16jax.config import base_config
from bf16jax.data import datasets
model, path, packing, seconds = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
c = base_config(model)
c.data.update(name="prepared", path=path, packing=packing, batch_size=32, seq_len=1024,
              enc_len=512, dec_len=114)
t0 = time.perf_counter()
it = iter(datasets.make_dataset(c.data, "train", model=model))
batch = next(it)
first = time.perf_counter() - t0
key = "inputs" if model == "gpt" else "encoder_inputs"
per_batch = batch[key].size
n, t1 = 0, time.perf_counter()
while time.perf_counter() - t1 < seconds:
    next(it)
    n += 1
dt = time.perf_counter() - t1
print(json.dumps({"first_batch_s": first, "tokens_per_s": n * per_batch / dt, "batches": n,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(corpus: str, size_mb: int, files: int) -> None:
    from bf16jax.data.datasets import kjv_verses

    verses = [t for _, t in kjv_verses("train")]
    os.makedirs(corpus, exist_ok=True)
    rng = random.Random(0)
    per_file = size_mb * (1 << 20) // files
    for k in range(files):
        path = os.path.join(corpus, f"part-{k:03d}.jsonl")
        if os.path.exists(path) and os.path.getsize(path) >= per_file:
            continue
        written, lines = 0, []
        with open(path + ".tmp", "w") as f:
            while written < per_file:
                i = rng.randrange(len(verses) - 40)
                line = json.dumps({"text": " ".join(verses[i : i + rng.randint(1, 40)])}) + "\n"
                lines.append(line)
                written += len(line)
                if len(lines) >= 4096:
                    f.write("".join(lines))
                    lines = []
            f.write("".join(lines))
        os.replace(path + ".tmp", path)


def train_bpe(out: str) -> str:
    import tokenizers

    from bf16jax.data.datasets import kjv_verses

    if not os.path.exists(os.path.join(out, "tokenizer.json")):
        tok = tokenizers.ByteLevelBPETokenizer()
        texts = [t for _, t in kjv_verses("train")]
        tok.train_from_iterator(texts, vocab_size=32768, special_tokens=["<|endoftext|>"])
        os.makedirs(out, exist_ok=True)
        tok.save(os.path.join(out, "tokenizer.json"))
    return out


def tree_peak_rss(proc: subprocess.Popen) -> float:
    """Peak of the summed RSS of `proc` and its children (MB), sampled every 50 ms."""
    import psutil

    peak, p = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    return peak / (1 << 20)


def prepare(inputs: list[str], out: str, tokenizer: str, workers: int, encoder="auto") -> dict:
    cmd = [sys.executable, "-m", "bf16jax.prepare", *inputs, f"--out={out}",
           f"--tokenizer={tokenizer}", f"--workers={workers}", "--eval_fraction=0.001",
           "--no_progress", f"--bpe_encoder={encoder}"]  # fmt: skip
    subprocess.run(["rm", "-rf", out], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = tree_peak_rss(proc)
    stdout, stderr = proc.communicate()
    dt = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(stderr.decode()[-2000:])
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    tokens = sum(summary["tokens"].values())
    with open(os.path.join(out, "part-00000-of-00001.json")) as f:
        used = json.load(f)["tokenizer"].get("encoder", {}).get("name", "bytes")
    mb = sum(os.path.getsize(p) for p in inputs) / (1 << 20)
    return {
        "bench": "prepare",
        "tokenizer": "bpe32k" if tokenizer else "bytes",
        "encoder": used,
        "workers": workers,
        "input_mb": round(mb, 1),
        "tokens": tokens,
        "seconds": round(dt, 2),
        "mb_per_s": round(mb / dt, 2),
        "tokens_per_s": round(tokens / dt),
        "tokens_per_s_per_worker": round(tokens / dt / workers),
        "peak_rss_mb": round(peak, 1),
        "dtype": summary["dtype"],
        "load_avg": round(os.getloadavg()[0], 2),
    }


def loader(model: str, path: str, packing: bool, seconds: float, corpus_mb: float) -> dict:
    cmd = [sys.executable, "-c", LOADER, model, path, "1" if packing else "0", str(seconds)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    name = "gpt_windows" if model == "gpt" else "t5_packed_span"
    row["load_avg"] = round(os.getloadavg()[0], 2)
    return {"bench": "loader", "task": name, "corpus_mb": round(corpus_mb, 1), **row}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size_mb", type=int, default=1024, help="generated corpus size")
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--bpe_mb", type=int, default=256, help="BPE prepare on this many MB")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--bpe_encoders", default="auto,tokenizers", help="prepare's --bpe_encoder")
    p.add_argument("--loader_seconds", type=float, default=10.0)
    p.add_argument("--work", default="/tmp/bf16jax_data_bench")
    p.add_argument("--loaders_only", action="store_true", help="reuse the prepared datasets")
    args = p.parse_args()
    sys.path.insert(0, REPO)
    corpus = os.path.join(args.work, "corpus")
    generate(corpus, args.size_mb, args.files)
    files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus) if f.endswith(".jsonl"))
    total_mb = sum(os.path.getsize(f) for f in files) / (1 << 20)
    bpe = train_bpe(os.path.join(args.work, "bpe"))
    workers = [int(w) for w in args.workers.split(",")]
    per_file = total_mb / len(files)
    bpe_files = files[: max(1, round(args.bpe_mb / per_file))]
    small = os.path.join(args.work, "bytes_small")
    if not args.loaders_only:
        for w in workers:
            row = prepare(files, os.path.join(args.work, "bytes"), "", w)
            print(json.dumps(row), flush=True)
        for encoder in args.bpe_encoders.split(","):
            for w in workers:
                row = prepare(bpe_files, os.path.join(args.work, "bpe_ds"), bpe, w, encoder)
                print(json.dumps(row), flush=True)
        prepare(files[:1], small, "", 1)
    for model, packing in (("gpt", False), ("gpt", True), ("t5", True)):
        for path, mb in ((os.path.join(args.work, "bytes"), total_mb), (small, per_file)):
            runs = ("cold", "warm") if model == "t5" else ("",)
            for run in runs:
                if run == "cold":
                    subprocess.run(["rm", "-rf", os.path.join(path, "plans")], check=True)
                row = loader(model, path, packing, args.loader_seconds, mb)
                print(json.dumps(dict(row, packing=packing, plan=run or None)), flush=True)


if __name__ == "__main__":
    main()
