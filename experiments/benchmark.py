"""One benchmark, peers beside us: bf16jax's GPT training step against a plain-JAX and a PyTorch
(torch.compile + autocast + fused AdamW) peer, same shapes, same device, one run.

    python experiments/benchmark.py                         # gpt2_124m and the 1.3B GPT
    python experiments/benchmark.py --models=gpt2_124m --policies=bf16,bf16-pure-kahan
    python experiments/benchmark.py --tiny                  # tiny shapes: the CPU smoke run
    python experiments/benchmark.py --models=configs/gpt_tiny.py --participants=bf16jax \
        --policies=fp32,bf16,bf16-pure                      # any GPT config, its own shape

Models (the shapes of `../shared/bench/`, where the peers were first measured on an H100):
gpt2_124m (V 50304, D 768, L 12, H 12, T 1024, B 16; bf16jax: configs/gpt2_124m.py) and
gpt_1p3b (D 2048, L 24, H 16, T 2048, B 8; configs/gpt_1b.py on one device, `model.remat=none`
like the peers, which keep every activation). Participants, each in its own process (peak memory
does not mix): `bf16jax` once per `--policies` entry (the config's defaults otherwise, e.g.
`attention_impl="auto"`), `jax` (experiments/peers/jax_gpt.py) and `torch`
(experiments/peers/torch_gpt.py; skipped, and said so, where torch is not installed: the `bench`
extra). All train on random tokens (bf16jax: `data.name=synthetic_tokens`).

Per participant: tokens/s, step time, compile time, peak memory (the device allocator's peak on a
GPU/TPU, else the process's max RSS), MFU under both conventions against the chip's dense BF16
peak (`bf16jax.training.metrics`; `--peak_tflops` to state one, e.g. for a CPU): 6N + 6LTD per token
(causal attention counted once: bf16jax's metrics) and 6N + 12LTD (PaLM's, used by the shared
peers' table), N = that participant's parameters without position embeddings; and tokens/s as a
ratio to the torch peer of the same model. Writes results/benchmark/results.{json,md} (merged
over runs, keyed by device, model, participant and shape) with hardware, versions and command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT_DIR = os.path.join(HERE, "results", "benchmark")
PEERS = {"jax": "jax_gpt.py", "torch": "torch_gpt.py"}

# name -> bf16jax config, peer shape, bf16jax overrides for one device.
MODELS = {
    "gpt2_124m": dict(
        config="configs/gpt2_124m.py",
        shape=dict(V=50304, D=768, L=12, H=12, T=1024, B=16),
        overrides=[],
    ),
    "gpt_1p3b": dict(
        config="configs/gpt_1b.py",
        shape=dict(V=50304, D=2048, L=24, H=16, T=2048, B=8),
        overrides=["model.remat=none"],
    ),
}
# --tiny: the same code paths at sizes a CPU runs in seconds (T a multiple of 128).
TINY_SHAPES = {
    "gpt2_124m": dict(V=512, D=64, L=2, H=2, T=128, B=4),
    "gpt_1p3b": dict(V=512, D=128, L=2, H=4, T=256, B=2),
}


# ----------------------------------------------------------------------------- participants
def _peak_memory(device) -> tuple[int, str]:
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS"


def model_spec(name: str) -> dict:
    """A `MODELS` entry, or for a GPT config path (`configs/gpt_tiny.py`) one with that
    config's own shape (the peers then build the same sizes with a 4·D MLP)."""
    if name in MODELS:
        return MODELS[name]
    if not name.endswith(".py"):
        raise SystemExit(f"Unknown model {name!r}: use {', '.join(MODELS)} or a GPT config path.")
    from bf16jax import config as config_lib

    c = config_lib.load_config(os.path.join(ROOT, name))
    if c.model.name != "gpt":
        raise SystemExit(f"{name} is a {c.model.name} config: the benchmark's peers are GPTs.")
    m = c.model
    shape = dict(V=m.vocab_size, D=m.embed_dim, L=m.num_layers, H=m.num_heads)
    shape |= dict(T=c.data.seq_len, B=c.data.batch_size)
    return dict(config=name, shape=shape, overrides=[])


def bf16jax_overrides(model: str, shape: dict, policy: str, steps: int) -> list[str]:
    """Config overrides that give bf16jax the peers' shape on one device."""
    s = shape
    sizes = [
        f"model.vocab_size={s['V']}",
        f"model.num_layers={s['L']}",
        f"model.embed_dim={s['D']}",
        f"model.num_heads={s['H']}",
        f"model.mlp_dim={4 * s['D']}",
        f"model.max_len={s['T']}",
    ]
    return [
        f"precision={policy}",
        f"train.steps={steps}",
        "data.name=synthetic_tokens",
        f"data.seq_len={s['T']}",
        f"data.batch_size={s['B']}",
        *(sizes if model in MODELS else []),  # a config path keeps its own model sizes
        "mesh.data=1",
        "mesh.fsdp=1",
        "mesh.tensor=1",
        *model_spec(model)["overrides"],
    ]


def run_bf16jax(model: str, shape: dict, policy: str, steps: int, warmup: int, extra=()) -> dict:
    """bf16jax's Trainer step on the first device, synthetic tokens, `steps` timed steps."""
    import flax
    import jax
    import numpy as np

    from bf16jax import config as config_lib
    from bf16jax.data import datasets as data
    from bf16jax.parallel import sharding
    from bf16jax.training import loop
    from bf16jax.training import trainer as train

    overrides = bf16jax_overrides(model, shape, policy, steps + warmup) + list(extra)
    config = config_lib.load_config(os.path.join(ROOT, model_spec(model)["config"]), overrides)
    device = jax.devices()[0]
    trainer = train.create_trainer(config, mesh=sharding.make_mesh(config.mesh, [device]))
    it = iter(data.make_dataset(config.data, "train"))
    state = trainer.init_state()
    batches = [trainer.global_batch(next(it)) for _ in range(2)]
    compile_s = trainer.compile(state, batches[0])
    for i in range(warmup):
        state, m = trainer.step(state, batches[i % 2])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state, m = trainer.step(state, batches[i % 2])
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - start) / steps
    mem, kind = _peak_memory(device)
    pos = int(config.model.max_len) * int(config.model.embed_dim)
    attn = {str(m.implementation) for m in _attention_layers(trainer)}
    return {
        "impl": "bf16jax",
        "setup": f"{policy}, attention {'/'.join(sorted(attn))}, "
        f"remat {config.model.remat}, scan {config.model.scan_layers}",
        "device": device.device_kind,
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
        "n_params": int(trainer.n_params) - pos,
        "shape": dict(shape),
        "step_ms": step_s * 1e3,
        "tokens_per_s": loop.tokens_per_step(config) / step_s,
        "compile_s": compile_s,
        "peak_memory_bytes": mem,
        "peak_memory_kind": kind,
        "final_loss": float(np.asarray(m["loss"])),
        "overrides": overrides,
    }


def _attention_layers(trainer):
    from flax import nnx

    from bf16jax.nn.layers import Attention

    model = nnx.merge(trainer.graphdef, trainer.abstract.params, trainer.abstract.fp8_meta)
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Attention)]


def load_peer(name: str):
    """The peer module experiments/peers/<name>_gpt.py."""
    path = os.path.join(HERE, "peers", PEERS[name])
    spec = importlib.util.spec_from_file_location(f"peer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_participant(job: dict, steps: int, warmup: int, extra=()) -> dict:
    """Runs one participant in this process: {"participant", "model", "shape"[, "policy"]}."""
    if job["participant"] == "bf16jax":
        return run_bf16jax(job["model"], job["shape"], job["policy"], steps, warmup, extra)
    peer = load_peer(job["participant"])
    if job["participant"] == "jax":
        import jax

        # Plain user code assumes JAX's default promotion (jax.nn.dot_product_attention's XLA
        # path needs it), also inside a strict-promotion test process.
        with jax.numpy_dtype_promotion("standard"):
            return peer.run(job["shape"], steps=steps, warmup=warmup)
    return peer.run(job["shape"], steps=steps, warmup=warmup)


def torch_available(python: str) -> bool:
    out = subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=300)
    return out.returncode == 0


def run_subprocess(job: dict, args) -> dict:
    """Runs one participant in its own process (its peak memory alone); errors become rows."""
    python = args.torch_python if job["participant"] == "torch" else sys.executable
    cmd = [python, os.path.abspath(__file__), "--run_one", json.dumps(job)]
    cmd += [f"--steps={args.steps}", f"--warmup={args.warmup}"]
    if job["participant"] == "bf16jax":  # the peers' python may lack bf16jax's dependencies
        cmd += [f"--config.{kv}" for kv in args.overrides]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    )
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        return {"error": " | ".join(out.stderr.strip().splitlines()[-3:])[-600:]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- figures
def add_figures(row: dict, peak_flops: float | None) -> dict:
    """MFU under both conventions; `peak_flops` per device (None: unknown, no MFU)."""
    if "tokens_per_s" not in row:
        return row
    s, n, tps = row["shape"], row["n_params"], row["tokens_per_s"]
    attention = s["L"] * s["T"] * s["D"]  # L * T * D
    row["flops_per_token_6LTD"] = (
        6.0 * n + 6.0 * attention
    )  # causal half (bf16jax.training.metrics)
    row["flops_per_token_12LTD"] = 6.0 * n + 12.0 * attention  # PaLM's, the shared peers'
    row["peak_flops"] = peak_flops
    for conv in ("6LTD", "12LTD"):
        flops = row[f"flops_per_token_{conv}"]
        row[f"mfu_{conv}"] = None if not peak_flops else tps * flops / peak_flops
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """tokens/s over the torch peer's for the same model and shape (None without one)."""
    torch_tps = {
        (r["model"], json.dumps(r["shape"], sort_keys=True)): r["tokens_per_s"]
        for r in rows
        if r["participant"] == "torch" and "tokens_per_s" in r
    }
    for r in rows:
        ref = torch_tps.get((r["model"], json.dumps(r["shape"], sort_keys=True)))
        r["vs_torch"] = r["tokens_per_s"] / ref if ref and "tokens_per_s" in r else None
    return rows


def _fmt(x, spec, scale=1.0, none="—"):
    return none if x is None else format(x * scale, spec)


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| model | participant | setup | B×T | tokens/s | step ms | MFU 6N+6LTD | MFU 6N+12LTD "
        "| peak memory GB | vs torch | compile s |\n"
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        name = r["participant"] + (f" ({r['policy']})" if r.get("policy") else "")
        shape = f"{r['shape']['B']}×{r['shape']['T']}"
        if "error" in r or "skipped" in r:
            why = r.get("error") or r.get("skipped")
            lines.append(f"| {r['model']} | {name} | not run: {why} | {shape} |" + " — |" * 7)
            continue
        mem = f"{r['peak_memory_bytes'] / 1e9:.2f}"
        if r["peak_memory_kind"] == "host max RSS":
            mem += " (RSS)"
        lines.append(
            f"| {r['model']} | {name} | {r['setup']} | {shape} | {r['tokens_per_s']:,.0f} | "
            f"{r['step_ms']:.1f} | {_fmt(r['mfu_6LTD'], '.1%')} | {_fmt(r['mfu_12LTD'], '.1%')} "
            f"| {mem} | {_fmt(r['vs_torch'], '.2f', none='—')} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def _key(row: dict) -> str:
    return json.dumps(
        [row["device"], row["model"], row["participant"], row.get("policy"), row["shape"]],
        sort_keys=True,
    )


def write_results(rows: list[dict], run_info: dict, out_dir: str) -> str:
    """Merges this run into out_dir/results.json (a rerun replaces its rows) and rewrites
    results.md: one table per (device, run) with its hardware, versions and command."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)["runs"]
    keys = {_key(r) for r in rows}
    for run in runs:
        run["rows"] = [r for r in run["rows"] if _key(r) not in keys]
    runs = [run for run in runs if run["rows"]] + [run_info | {"rows": rows}]
    with open(path, "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    parts = [
        "# Training-step benchmark: bf16jax beside its peers (experiments/benchmark.py)\n\n"
        "Generated; each section is one run of the script on one device. MFU = tokens/s × "
        "FLOPs per token / the device's dense BF16 peak (stated per run); FLOPs per token = "
        "6N + 6LTD (causal attention counted once, bf16jax.training.metrics) or 6N + 12LTD (PaLM, "
        "as "
        "in the shared peers' H100 table), N = the participant's parameters without position "
        "embeddings. vs torch = tokens/s ÷ the PyTorch peer's in the same run. Peak memory: "
        "the device allocator's peak, or (RSS) the process's max resident memory on a CPU, "
        "which includes the framework itself.\n"
    ]
    for run in runs:
        peak = run.get("peak_flops")
        peak_text = f"{peak / 1e12:g} TFLOP/s" if peak else "none known (no MFU)"
        parts.append(
            f"\n## {run['device']} × 1, {run['date']}{' (tiny shapes)' if run['tiny'] else ''}\n\n"
            f"- hardware: {run['hardware']}\n- versions: {run['versions']}\n"
            f"- peak used for MFU: {peak_text}\n- command: `{run['command']}`\n\n"
            + to_markdown(run["rows"])
            + "\n"
        )
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("".join(parts))
    return os.path.join(out_dir, "results.md")


def _versions(rows: list[dict]) -> str:
    seen = {"python": platform.python_version()}
    for r in rows:
        seen.update(r.get("versions", {}))
    return ", ".join(f"{k} {v}" for k, v in seen.items())


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPU threads, {platform.system()} {platform.release()}"


# ----------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    from bf16jax.cli import script_parser

    parser = script_parser(__doc__, "every bf16jax run's config (--config_help lists the keys)")
    add = parser.add_argument
    add("--models", default=",".join(MODELS), help="model names or configs/*.py of GPTs")
    add("--participants", default="bf16jax,jax,torch", help="who runs, comma-separated")
    add("--policies", default="bf16", help="bf16jax policies, comma-separated")
    add("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    add("--steps", type=int, default=20, help="timed steps per participant")
    add("--warmup", type=int, default=3, help="untimed steps first (compile included)")
    add("--batch", type=int, default=0, help="override every model's batch (0: its own)")
    add("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: known chips)")
    add("--timeout", type=int, default=900, help="seconds per participant")
    add("--torch_python", default=sys.executable, help="python with torch")
    add("--inprocess", action="store_true", help="all in this process (tests)")
    add("--out", default=OUT_DIR, help="results directory")
    add("--config_help", action="store_true", help="list each model's config keys and exit")
    add("--run_one", help=argparse.SUPPRESS)  # child process: one job
    return parser


def _check_overrides(models: list[str], overrides: list[str], show: bool) -> None:
    """Every model's config takes the overrides (else exit 2 naming the key); `show`: list
    each config's keys after them (`--config_help`)."""
    from bf16jax import config as config_lib

    for model in models:
        path = os.path.join(ROOT, model_spec(model)["config"])
        try:
            config = config_lib.load_config(path, overrides)
        except ValueError as e:
            print(f"error: {model}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if show:
            print(f"# {model} ({model_spec(model)['config']}); the benchmark sets the shape too")
            print(config_lib.config_help(config))


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    from bf16jax.cli import split_config_overrides

    rest, overrides = split_config_overrides(argv)
    args = _parser().parse_args(rest)
    args.overrides = overrides
    if args.run_one:
        job = json.loads(args.run_one)
        print(json.dumps(run_participant(job, args.steps, args.warmup, args.overrides)))
        return []
    if overrides or args.config_help:
        _check_overrides(args.models.split(","), overrides, args.config_help)
        if args.config_help:
            return []
    models = args.models.split(",")
    participants = args.participants.split(",")
    bad = [p for p in participants if p not in ("bf16jax", *PEERS)]
    if bad:
        raise SystemExit(f"Unknown participants {bad}: use some of bf16jax, {', '.join(PEERS)}.")
    if args.tiny and any(m not in MODELS for m in models):
        raise SystemExit(f"--tiny shrinks the named models ({', '.join(MODELS)}), not configs.")
    torch_ok = False
    if "torch" in participants:
        if args.inprocess:
            torch_ok = importlib.util.find_spec("torch") is not None
        else:
            torch_ok = torch_available(args.torch_python)
    rows = []
    for model in models:
        shape = dict(TINY_SHAPES[model] if args.tiny else model_spec(model)["shape"])
        if args.batch:
            shape["B"] = args.batch
        jobs = []
        for p in participants:
            if p == "bf16jax":
                jobs += [
                    {"participant": p, "model": model, "shape": shape, "policy": pol}
                    for pol in args.policies.split(",")
                ]
            else:
                jobs.append({"participant": p, "model": model, "shape": shape})
        for job in jobs:
            if job["participant"] == "torch" and not torch_ok:
                row = {"skipped": "torch is not installed (pip install -e '.[bench]')"}
            elif args.inprocess:
                row = run_participant(job, args.steps, args.warmup, args.overrides)
            else:
                row = run_subprocess(job, args)
            row = {"device": row.get("device", "?")} | job | row
            rows.append(row)
            print(json.dumps(row), flush=True)
            # After every participant: a run stopped by a time limit keeps what it measured.
            path = _finish(rows, args, argv)
    print(to_markdown(rows))
    print(f"wrote {path}")
    return rows


def _finish(rows: list[dict], args, argv) -> str:
    """Adds MFU and ratios to `rows` (in place) and writes the results files."""
    from bf16jax.training import metrics

    device = next((r["device"] for r in rows if "tokens_per_s" in r), "?")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else metrics.peak_flops_of_kind(device)
    add_ratios([add_figures(r, peak) for r in rows])
    for r in rows:
        r["device"] = device if r["device"] == "?" else r["device"]
    run_info = {
        "device": device,
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d"),
        "hardware": _hardware(),
        "versions": _versions(rows),
        "peak_flops": peak,
        "command": shlex.join(["python", "experiments/benchmark.py", *(argv or sys.argv[1:])]),
    }
    return write_results(rows, run_info, args.out)


if __name__ == "__main__":
    main()
