"""Pure-BF16 study: train one config under fp32, bf16, bf16-pure, bf16-pure-sr, bf16-pure-kahan
and bf16-pure-split (same seeds, same steps) and compare final eval loss, swamping and FP32 drift.

    python experiments/pure_bf16_study.py --config=configs/gpt_tiny.py --seeds=0,1,2 \
        --out=experiments/results/pure_bf16 [--config.KEY=VALUE ...]

Each run is a `bf16jax.main` process with its own workdir under --runs, so the sweep is resumable:
a run whose `result.json` exists is not repeated, and an interrupted run resumes from its
checkpoint. `--config.KEY=VALUE` overrides (as on `bf16jax.main`; `--config_help` lists the
keys) go to every run. Writes `results.json` and `results.md` (mean +- std over seeds) to --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from bf16jax import cli

POLICIES = ("fp32", "bf16", "bf16-pure", "bf16-pure-sr", "bf16-pure-kahan", "bf16-pure-split")
KEYS = ("eval_loss", "eval_accuracy", "drift_rel_gap", "swamped/norm_gains", "swamped/all")


def run(config: str, policy: str, seed: int, runs: str, extra: list[str]) -> dict:
    workdir = os.path.join(runs, f"{policy}_seed{seed}")
    result_path = os.path.join(workdir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    cmd = [
        sys.executable,
        "-m",
        "bf16jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.precision={policy}",
        f"--config.seed={seed}",
        f"--config.data.seed={seed}",
        "--config.train.sample_tokens=0",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"final"')]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    final = json.loads(lines[-1])["final"]
    # Swamping is logged with the train metrics; read the last logged row.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f if '"train/loss"' in ln]
    for key in ("swamped/norm_gains", "swamped/all"):
        final[key] = rows[-1].get(f"train/{key}")
    final.update(policy=policy, seed=seed)
    with open(result_path, "w") as f:
        json.dump(final, f, indent=1)
    return final


def summarize(results: list[dict]) -> tuple[dict, str]:
    table: dict[str, dict] = {}
    for policy in POLICIES:
        rows = [r for r in results if r["policy"] == policy]
        if not rows:
            continue
        table[policy] = {"seeds": len(rows)}
        for key in KEYS:
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                table[policy][key] = (float(np.mean(vals)), float(np.std(vals)))
    ref = table.get("fp32", {}).get("eval_loss", (None,))[0]
    lines = [
        "| policy | seeds | eval loss (nats/byte) | vs fp32 | eval acc | FP32 drift | "
        "swamped norm gains | swamped all |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def fmt(entry, key, pct=False):
        if key not in entry:
            return "–"
        m, s = entry[key]
        return f"{100 * m:.1f}% ± {100 * s:.1f}" if pct else f"{m:.4f} ± {s:.4f}"

    for policy, entry in table.items():
        loss = entry.get("eval_loss", (None,))[0]
        rel = f"{100 * (loss / ref - 1):+.2f}%" if ref and loss else "–"
        lines.append(
            f"| {policy} | {entry['seeds']} | {fmt(entry, 'eval_loss')} | {rel} | "
            f"{fmt(entry, 'eval_accuracy', True)} | {fmt(entry, 'drift_rel_gap', True)} | "
            f"{fmt(entry, 'swamped/norm_gains', True)} | {fmt(entry, 'swamped/all', True)} |"
        )
    return table, "\n".join(lines)


def define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "The config every run trains, e.g. configs/gpt_tiny.py (with its "
        "--config.KEY=VALUE overrides).", lock_config=True,
    )  # fmt: skip
    cli.define_config_help_flag()
    flags.DEFINE_list("policies", list(POLICIES), "Policies to train, in this order.")
    flags.DEFINE_list("seeds", ["0"], "Seeds (model init and data order) per policy.")
    flags.DEFINE_string("out", "experiments/results/pure_bf16", "Where results.{md,json} go.")
    flags.DEFINE_string("runs", "runs/pure_bf16", "Workdirs of the runs (checkpoints, metrics).")


FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    config_file = FLAGS["config"].config_filename
    extra = cli.config_override_args()  # checked by config_flags already
    results = []
    for seed in [int(s) for s in FLAGS.seeds]:
        for policy in FLAGS.policies:
            r = run(config_file, policy, seed, FLAGS.runs, extra)
            print(json.dumps({k: r.get(k) for k in ("policy", "seed", *KEYS)}), flush=True)
            results.append(r)
    table, md = summarize(results)
    command = " ".join(["python", *sys.argv])
    with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
        json.dump({"command": command, "table": table, "runs": results}, f, indent=1)
    with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
        f.write(f"Produced by `{command}`\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    define_flags()
    cli.run(main, require_config=True)
