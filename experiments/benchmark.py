"""Training-step benchmark: one JSON line per policy with step time, tokens/s, MFU, compile time
and peak memory, on synthetic tokens (no data loading in the timed loop).

    python experiments/benchmark.py --config=configs/gpt2_124m.py --policies=fp32,bf16 \
        --steps=30 --set model.attention_impl=cudnn

MFU convention: bf16jax.metrics (6N + 6LTD per token against the chip's dense BF16 peak; none on
CPU). Peak memory: the device allocator's peak on GPU/TPU (`memory_stats()['peak_bytes_in_use']`),
the process's max RSS on CPU. Each policy runs in its own process, so peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_one(args) -> dict:
    import jax
    import numpy as np

    from bf16jax import config as config_lib
    from bf16jax import data, loop, metrics, train

    base = config_lib.load_config(args.config)
    overrides = [f"precision={args.policy}", f"train.steps={args.steps + args.warmup}"]
    if base.model.name == "gpt":
        overrides.append("data.name=synthetic_tokens")
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    config = config_lib.load_config(args.config, [*overrides, *args.set])
    trainer = train.create_trainer(config)
    it = iter(data.make_dataset(config.data, "train"))
    state = trainer.init_state()
    batches = [trainer.global_batch(next(it)) for _ in range(2)]
    compile_s = trainer.compile(state, batches[0])
    for i in range(args.warmup):
        state, m = trainer.step(state, batches[i % 2])
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(args.steps):
        state, m = trainer.step(state, batches[i % 2])
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - start) / args.steps
    tokens = loop.tokens_per_step(config)
    tps = tokens / step_s
    flops_token = loop.flops_per_token(config, trainer.n_params)
    peak = metrics.device_peak_flops()
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats:
        peak_mem = stats.get("peak_bytes_in_use")
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "config": os.path.basename(args.config),
        "policy": args.policy,
        "device": device.device_kind,
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "params": trainer.n_params,
        "batch_size": int(config.data.batch_size),
        "tokens_per_step": tokens,
        "compile_s": round(compile_s, 2),
        "step_ms": round(step_s * 1e3, 3),
        "tokens_per_s": round(tps, 1),
        "mfu": None if flops_token is None else metrics.mfu(tps, flops_token, peak, 1),
        "mfu_convention": "6N+6LTD vs dense bf16 peak",
        "peak_memory_bytes": int(peak_mem) if peak_mem else None,
        "final_loss": float(np.asarray(m["loss"])),
        "extra": args.set,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gpt_tiny.py")
    parser.add_argument("--policies", default="fp32,bf16")
    parser.add_argument("--policy", help=argparse.SUPPRESS)  # child process: one policy
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args()
    if args.policy:
        print(json.dumps(run_one(args)), flush=True)
        return
    for policy in args.policies.split(","):
        cmd = [sys.executable, __file__, "--policy", policy] + [
            a for a in sys.argv[1:] if not a.startswith("--policies")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            err = out.stderr.strip().splitlines()[-5:]
            print(json.dumps({"policy": policy, "error": err}), flush=True)
            continue
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
