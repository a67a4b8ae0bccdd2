"""The results of experiments/aot_tpu.py: which remat fits, and the merged JSON / Markdown tables.

Rows are merged over runs (a rerun of a case replaces its rows), each with its command and git
revision; `write_results` writes results/aot_tpu/results.{json,md}.
"""

from __future__ import annotations

import json
import os

GIB = 1024**3
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "aot_tpu")


def _remat_name(value) -> str:
    """model.remat as a policy name (rows from before the policies recorded a bool)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return value


def _key(row: dict) -> tuple:
    """(config, topology, policy, remat, variant); the first four are a case."""
    remat = _remat_name(row.get("remat", "none"))
    return (row["config"], row["topology"], row["policy"], remat, row["variant"])


def choose_remat(rows: list[dict]) -> dict[tuple, dict]:
    """Per (config, topology, policy): the fitting row with the least gradient accumulation,
    then the shortest step at peak (fewest FLOPs), then the smaller peak. That remat policy is
    the one that spends the chip's free HBM on keeping activations instead of recomputing them.
    Accumulation comes first because every extra micro-batch repeats FSDP's weight all-gathers,
    a cost the FLOPs lower bound does not show."""

    def score(r):
        return (r["grad_accum_steps"], r["step_s_at_peak"], r["peak_bytes"])

    best: dict[tuple, dict] = {}
    for r in rows:
        if not r.get("fits") or not r.get("step_s_at_peak"):
            continue
        case = _key(r)[:3]
        if case not in best or score(r) < score(best[case]):
            best[case] = r
    return best


def _gb(x) -> str:
    return "—" if x is None else f"{x / 1e9:.2f}"


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| config | topology (chip, HBM) | policy | remat | attention | setting | µbatch/dev "
        "| state GB/dev (global) | args GB | temp GB | code GB | peak GB/dev | fits | HBM used "
        "| TFLOP/dev (full depth) | step / model FLOPs | step at peak (ms) | compile s |\n"
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- "
        "| ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        chip = (
            f"{r['topology']} ({r['n_devices']}× {r['device_kind']}, {r['hbm_bytes'] / GIB:g} GiB)"
        )
        state = f"{_gb(r['state_bytes_per_device'])} ({_gb(r['state_bytes_global'])})"
        compile_s = f"{r['lower_s'] + r['compile_s']:.0f}"
        # Rows from before the attention choice ran bf16jax's XLA attention.
        lead = (
            f"| {r['config']} | {chip} | {r['policy']} | {_remat_name(r.get('remat', 'none'))} "
            f"| {r.get('attention') or 'xla'} | {r['variant']} | "
        )
        if not r.get("argument_bytes"):
            fits = f"**no**: {r['oom']}"
            lines.append(
                f"{lead}{r['micro_batch_per_device']} | {state} | — | — | — | — | {fits} | — "
                f"| — | — | — | {compile_s} |"
            )
            continue
        model, xla, full = r["model_flops_per_step"], r["xla_flops_per_step"], None
        ratio = "—" if not (model and xla) else f"{xla / model:.2f}"
        total = r.get("flops_per_device", r["xla_flops_per_device_full_depth"])
        if total is not None:
            full = f"{total / 1e12:.3g}"
        at_peak = r["step_s_at_peak"]
        lines.append(
            f"{lead}"
            f"{r['micro_batch_per_device']} | {state} | {_gb(r['argument_bytes'])} | "
            f"{_gb(r['temp_bytes'])} | {_gb(r['code_bytes'])} | {_gb(r['peak_bytes'])} | "
            f"{'yes' if r['fits'] else '**no**'} | {100 * r['hbm_used']:.1f}% | "
            f"{full or '—'} | {ratio} | "
            f"{'—' if at_peak is None else f'{1e3 * at_peak:.3g}'} | {compile_s} |"
        )
    return "\n".join(lines)


def write_results(rows: list[dict], command: str, out_dir: str = OUT_DIR) -> None:
    """Merges `rows` into out_dir/results.json, replacing every earlier row of their cases
    (config, topology, policy, remat), and rewrites results.md."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = {_key(r): r for r in json.load(f)["rows"]}
    # A case's rows replace all its earlier ones: a rerun that fits as configured must not
    # leave the grad-accumulation fallbacks of an older run behind as if current.
    cases = {_key(r)[:4] for r in rows}
    merged = {k: r for k, r in merged.items() if k[:4] not in cases}
    for r in rows:
        merged[_key(r)] = r | {"command": command}
    ordered = sorted(merged.values(), key=_key)
    commands = sorted({r["command"] for r in ordered})
    with open(path, "w") as f:
        json.dump({"commands": commands, "rows": ordered}, f, indent=1)
    notes = (
        "# Ahead-of-time compiled train steps on TPU pod topologies (CPU machine, libtpu)\n\n"
        "Produced by:\n\n" + "\n".join(f"    {c}" for c in commands) + "\n\n"
        "Per device. peak = argument + output − alias (donated state) + temp + generated code, "
        "from `compiled.memory_analysis()`; HBM = the datasheet figure per chip (libtpu refuses "
        "programs above its usable HBM, e.g. 15.75 GB on v5e, at compile time: `fits` = no). "
        "TFLOP/dev: XLA FLOPs from `compiled.cost_analysis()` per device; for scanned GPT "
        "models extrapolated to full depth from unrolled 1- and 2-layer compiles (XLA counts a "
        "loop body once; — where skipped with --skip_full_depth_flops); plus, where attention "
        "runs in the Pallas splash kernel (`attention` = pallas), the kernel's FLOPs counted "
        "analytically (`pallas_attention_flops`: XLA sees none inside a Pallas call). Model "
        "FLOPs: 6N + 6LTD per token (bf16jax.training.metrics; GPT only), so the ratio shows "
        "remat's "
        "recompute, the kernels' backward recompute and the FP32 loss / optimizer work. Step at "
        "peak: FLOPs / dense BF16 peak of the chip, in ms (a lower bound on step time). remat: "
        "`model.remat` (none / save_dots / full). Compile s = lower + compile of the main step "
        "on a shared 2-core CPU (the FLOPs compiles not included). Rows without an attention "
        "column value predate the per-backend choice (XLA attention). results.json gives each "
        "row's command, jax version and git revision.\n\n"
    )
    best = choose_remat(ordered)
    chosen = ""
    if best:
        chosen = (
            "\n## Remat policy per case: the fitting setting with the fewest FLOPs\n\n"
            "| config | topology | policy | remat | setting | peak GB/dev | HBM used "
            "| step at peak (ms) |\n| --- | --- | --- | --- | --- | ---: | ---: | ---: |\n"
        )
        for case, r in sorted(best.items()):
            chosen += (
                f"| {case[0]} | {case[1]} | {case[2]} | {_remat_name(r['remat'])} | "
                f"{r['variant']} | {_gb(r['peak_bytes'])} | {100 * r['hbm_used']:.1f}% | "
                f"{1e3 * r['step_s_at_peak']:.3g} |\n"
            )
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(notes + to_markdown(ordered) + "\n" + chosen)
