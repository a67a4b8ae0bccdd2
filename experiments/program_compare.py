"""bf16jax's train step beside the plain-JAX peer's, compiled for one TPU chip on this CPU machine.

    make aot-tpu-compare   # = .venv-tpu/bin/python experiments/program_compare.py (`tpu` extra)
    .venv-tpu/bin/python experiments/program_compare.py --config=gpt2_124m --precision=bf16 \
        --layers=1,2 [--full_depth] [--chip=v5e]
    python experiments/program_compare.py --chip=local --dump_hlo   # on a GPU machine

Both steps (bf16jax's `Trainer` step and `experiments/peers/jax_gpt.py`'s, same shape: B, T, V,
D, H from the config) are lowered for ShapeDtypeStruct inputs and compiled by libtpu for one chip
at 1 and 2 layers; every figure is extrapolated linearly to the config's depth (A + L * B: the
layers are identical), or compiled at full depth with `--full_depth`. Per program it reads:
XLA's FLOPs and bytes accessed (`cost_analysis`), peak and temp HBM (`memory_analysis`), and
from the optimized HLO the copies outside fusions, reductions / converts inside fusions, fusions
and custom calls (`hlo_counts`). bf16jax runs twice: its defaults (splash attention, fused loss:
FLOPs corrected for what XLA cannot see, the Pallas kernels analytically and the loss's chunk
loop from a materialized-loss compile) and the variant XLA counts fully on both sides
(`attention_impl=xla`, `loss_impl=materialized`), which is where bytes compare like for like.
On a GPU (`--chip=local`, run by experiments/gpu/run_benchmark.sh) the same table says whether
the FP32-output -> BF16 casts fuse into the GEMM epilogues (`convert_only_fusions`,
`gemm_out_<dtype>`). Writes results/program_compare/results.{json,md} with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # aot_tpu.py beside this file
OUT_DIR = os.path.join(HERE, "results", "program_compare")
CHIPS = {"v5e": "v5e:1x1", "v5p": "v5p:1x1x1", "v4": "v4:1x1x1"}

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9_\-]*)\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_computations(text: str) -> dict[str, list[str]]:
    """The HLO text's computations by name: each one's lines, its header and closing brace
    included."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and "=" not in line.split("{")[0].split("(")[0]:
                current = header.group(1)
                bodies[current] = [line]
            continue
        bodies[current].append(line)
        if line.strip() == "}":
            current = None
    return bodies


def fusion_bodies(bodies: dict[str, list[str]]) -> set[str]:
    """The computations that some fusion instruction calls."""
    return {c for lines in bodies.values() for ln in lines if " fusion(" in ln
            for c in _CALLS.findall(ln)}  # fmt: skip


def hlo_counts(text: str) -> dict[str, int]:
    """Op counts of an optimized HLO module, split by where the op runs.

    `copies` counts copy ops outside fusion bodies (layout changes: each a separate pass over
    HBM), `async_copies` the copy-start ops (memory-space moves the TPU scheduler overlaps);
    `reductions`, `converts` count reduce / convert inside fusion bodies (fused work);
    `fusions` the fusion ops outside fusion bodies; `custom_calls` every custom-call (Pallas
    kernels, cuDNN, ...); `*_unfused` the converts / reductions that run as their own kernels;
    `convert_only_fusions` fusions that only cast (on a GPU: a FP32 GEMM output cast to BF16
    by a kernel of its own, not in the GEMM's epilogue); `gemm_out_<dtype>` GEMM library calls
    by output dtype.
    """
    bodies = {name: lines[1:-1] for name, lines in hlo_computations(text).items()}
    fused = fusion_bodies(bodies)
    counts: Counter = Counter()
    for name, lines in bodies.items():
        inside = name in fused
        ops = []
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            op = _OPCODE.search(" " + m.group(2))
            if not op:
                continue
            op = op.group(1)
            ops.append(op)
            if op == "custom-call":
                counts["custom_calls"] += 1
                if re.search(r'custom_call_target="[^"]*(gemm|matmul)', line, re.I):
                    # a GEMM library call (cuBLAS / cuBLASLt on a GPU): its output dtype says
                    # whether a FP32 result leaves the GEMM to be cast by a separate kernel
                    out = m.group(2).lstrip("(").split("[")[0]
                    counts[f"gemm_out_{out}"] += 1
            if inside:
                if op == "reduce":
                    counts["reductions"] += 1
                elif op == "convert":
                    counts["converts"] += 1
            else:
                if op == "copy":
                    counts["copies"] += 1
                elif op == "copy-start":
                    counts["async_copies"] += 1
                elif op == "fusion":
                    counts["fusions"] += 1
                elif op == "reduce":
                    counts["reductions_unfused"] += 1
                elif op == "convert":
                    counts["converts_unfused"] += 1
        if inside and [o for o in ops if o not in ("parameter", "bitcast")] == ["convert"]:
            counts["convert_only_fusions"] += 1  # a kernel that does nothing but cast
    keys = ("copies", "async_copies", "reductions", "converts", "fusions", "custom_calls")
    keys += ("reductions_unfused", "converts_unfused", "convert_only_fusions")
    gemms = sorted(k for k in counts if k.startswith("gemm_out_"))
    return {k: int(counts[k]) for k in (*keys, *gemms)}


HLO_DIR: str | None = None  # --dump_hlo: where each program's optimized HLO is written


def program_figures(compiled, name: str = "") -> dict[str, float]:
    """FLOPs, bytes accessed, peak / temp HBM and the HLO counts of one compiled program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return {
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "peak_bytes": float(peak),
        "temp_bytes": float(mem.temp_size_in_bytes),
        **hlo_counts(_dump(compiled.as_text(), name)),
    }


def _dump(text: str, name: str) -> str:
    if HLO_DIR and name:
        import gzip

        os.makedirs(HLO_DIR, exist_ok=True)
        with gzip.open(os.path.join(HLO_DIR, f"{name}.hlo.txt.gz"), "wt") as f:
            f.write(text)
    return text


def _aot_tpu():
    import aot_tpu  # experiments/aot_tpu.py: the Trainer compile and the Pallas FLOPs

    return aot_tpu


def chip_mesh(chip: str):
    """A one-chip ("data", "fsdp", "tensor") mesh over libtpu's compile-only device, or over
    this machine's first device for `local` (the GPU of a lent machine; the CPU for a dry run)."""
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh

    if chip == "local":
        import jax

        return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    topo = topologies.get_topology_desc(
        topology_name=CHIPS[chip], platform="tpu", chips_per_host_bounds=(1, 1, 1), num_slices=1
    )
    return Mesh(np.asarray(topo.devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def bf16jax_program(config, mesh, variant: str) -> dict[str, float]:
    """Figures of bf16jax's step: `default` (the config as is) or `xla` (XLA attention and the
    materialized loss: every FLOP and byte visible to XLA's cost analysis)."""
    aot = _aot_tpu()
    c = config.copy_and_resolve_references()
    c.train.grad_accum_steps = 1
    if variant == "xla":
        c.model.attention_impl = "xla"
        c.train.loss_impl = "materialized"
    _, _, compiled, _, compile_s = aot._compile(c, mesh)
    if isinstance(compiled, str):
        raise RuntimeError(f"bf16jax ({variant}) does not fit: {compiled}")
    name = f"bf16jax_{variant}_L{int(c.model.num_layers)}"
    row = program_figures(compiled, name) | {"compile_s": round(compile_s, 1)}
    if variant == "default":
        # What XLA cannot count: the Pallas kernels' FLOPs (analytic) and the fused loss's chunk
        # loop (a while loop's body counts once): take the head from a materialized-loss compile.
        platform = mesh.devices.flat[0].platform
        pallas = "pallas" in aot.attention_kernel(c, platform)
        row["kernel_flops"] = aot.pallas_attention_flops(c, mesh) if pallas else 0.0
        m = aot.materialized_loss(c)
        _, _, unlooped, _, _ = aot._compile(m, mesh)
        row["flops_visible"] = row["flops"]
        hidden_loss = max(aot._xla_flops(unlooped) - row["flops"], 0.0)
        row["flops"] = row["flops"] + row["kernel_flops"] + hidden_loss
    return row


def peer_program(config, mesh) -> dict[str, float]:
    """Figures of the plain-JAX peer's step (experiments/peers/jax_gpt.py) at the config's
    shape, BF16 compute, XLA attention (what `jax.nn.dot_product_attention` runs on TPU)."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    sys.path.insert(0, os.path.join(HERE, "peers"))
    import jax_gpt

    m, d = config.model, config.data
    V, D, L, H = int(m.vocab_size), int(m.embed_dim), int(m.num_layers), int(m.num_heads)
    T, B = int(d.seq_len), int(d.batch_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.adamw(3e-4, weight_decay=0.1)

    def loss_fn(params, tokens):
        logits = jax_gpt.forward(
            params, tokens[:, :-1], H=H, cdt=jnp.bfloat16, attn_impl=None, scan=False
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, tokens):
        loss, g = jax.value_and_grad(loss_fn)(params, tokens)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    def placed(tree):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree
        )

    params = jax.eval_shape(lambda: jax_gpt.init(jax.random.key(0), V, D, L, T))
    state = jax.eval_shape(opt.init, params)
    tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=replicated)
    start = time.perf_counter()
    compiled = step.lower(placed(params), placed(state), tokens).compile()
    name = f"peer_L{L}"
    return program_figures(compiled, name) | {"compile_s": round(time.perf_counter() - start, 1)}


def extrapolate(rows: dict[int, dict], depth: int) -> dict[str, float]:
    """Figures at `depth` from rows at depths a < b: A + L * B, B = (row(b) - row(a)) / (b - a)."""
    a, b = sorted(rows)
    out = {}
    for key, va in rows[a].items():
        if isinstance(va, (int, float)) and key != "compile_s":
            per_layer = (rows[b][key] - va) / (b - a)
            out[key] = va + (depth - a) * per_layer
            out[f"{key}_per_layer"] = per_layer
    return out


RATIO_ROWS = (
    ("flops", "FLOPs (hidden kernels added)"),
    ("bytes_accessed", "bytes accessed"),
    ("peak_bytes", "peak HBM"),
    ("temp_bytes", "temp HBM"),
    ("copies", "copies outside fusions"),
    ("async_copies", "async copies (copy-start)"),
    ("reductions", "reductions inside fusions"),
    ("converts", "converts inside fusions"),
    ("fusions", "fusions"),
    ("custom_calls", "custom calls"),
    ("converts_unfused", "unfused converts"),
    ("reductions_unfused", "unfused reductions"),
    ("convert_only_fusions", "convert-only fusions"),
)


def _fmt(x: float) -> str:
    if abs(x) >= 1e9:
        return f"{x / 1e9:.3g} G"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.3g} M"
    return f"{x:.4g}"


def to_markdown(result: dict) -> str:
    """The comparison table: per program the figure at full depth, and bf16jax / peer."""
    if set(result["programs"]) != set(PROGRAMS):
        return _plain_table(result)
    peer = result["programs"]["peer"]
    lines = [
        f"{result['config']} (B{result['shape']['B']} T{result['shape']['T']}, "
        f"{result['precision']}), one {result['chip']} chip, {result['depth']} layers "
        f"({result['method']}); jax {result['jax']}",
        "",
        "| figure | peer | bf16jax default | ratio | bf16jax xla+materialized | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    programs = result["programs"].values()
    gemms = sorted({k for p in programs for k in p if re.fullmatch(r"gemm_out_\w+", k)})
    rows = [*RATIO_ROWS, *((k, f"GEMM calls with {k[9:]} output") for k in gemms)]
    for key, label in rows:
        p = peer.get(key, 0)
        cells = [label, _fmt(p)]
        for variant in ("default", "xla"):
            v = result["programs"][variant].get(key, 0)
            cells += [_fmt(v), f"{v / p:.2f}" if p else ("=" if v == 0 else "inf")]
        lines.append("| " + " | ".join(cells) + " |")
    per = result["per_layer_bytes_ratio"]
    lines += ["", f"Bytes accessed per layer, xla+materialized / peer: {per:.3f}"]
    return "\n".join(lines) + "\n"


PROGRAMS = ("peer", "default", "xla")


def _plain_table(result: dict) -> str:
    """The figures of the programs compiled (`--programs` left some out): no ratios."""
    names = list(result["programs"])
    lines = [
        f"{result['config']} (B{result['shape']['B']} T{result['shape']['T']}, "
        f"{result['precision']}), one {result['chip']} chip, {result['depth']} layers "
        f"({result['method']}); jax {result['jax']}",
        "",
        "| figure | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for key, label in RATIO_ROWS:
        cells = [_fmt(result["programs"][n].get(key, 0)) for n in names]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def compare(
    config_name: str,
    precision: str,
    chip: str,
    layers: list[int],
    full_depth: bool,
    programs: tuple[str, ...] = PROGRAMS,
):
    import jax

    aot = _aot_tpu()
    config = aot.load_config(config_name)
    config.precision = precision
    depth = int(config.model.num_layers)
    mesh = chip_mesh(chip)
    depths = [depth] if full_depth else layers
    raw: dict[str, dict[int, dict]] = {k: {} for k in programs}
    for n in depths:
        c = config.copy_and_resolve_references()
        c.model.num_layers = n
        if "peer" in raw:
            raw["peer"][n] = peer_program(c, mesh)
        for variant in ("default", "xla"):
            if variant in raw:
                raw[variant][n] = bf16jax_program(c, mesh, variant)
        print(json.dumps({"layers": n, **{k: v[n] for k, v in raw.items()}}), flush=True)
    if full_depth:
        programs = {k: v[depth] for k, v in raw.items()}
        method = "compiled at full depth"
    else:
        programs = {k: extrapolate(v, depth) for k, v in raw.items()}
        method = f"extrapolated from {layers[0]} and {layers[1]} layers"
    if not {"xla", "peer"} <= set(programs):
        per_layer = None
    elif full_depth:
        per_layer = programs["xla"]["bytes_accessed"] / programs["peer"]["bytes_accessed"]
    else:
        per_layer = (
            programs["xla"]["bytes_accessed_per_layer"]
            / (programs["peer"]["bytes_accessed_per_layer"])
        )
    m = config.model
    return {
        "config": config_name,
        "precision": precision,
        "chip": mesh.devices.flat[0].device_kind if chip == "local" else chip,
        "depth": depth,
        "method": method,
        "shape": {
            "B": int(config.data.batch_size),
            "T": int(config.data.seq_len),
            "V": int(m.vocab_size),
            "D": int(m.embed_dim),
            "H": int(m.num_heads),
        },  # fmt: skip
        "jax": jax.__version__,
        "raw": {k: {str(n): r for n, r in v.items()} for k, v in raw.items()},
        "programs": programs,
        "per_layer_bytes_ratio": per_layer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="gpt2_124m", help="a GPT config name or file")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument(
        "--chip", default="v5e", choices=[*sorted(CHIPS), "local"],
        help="a TPU chip compiled through libtpu, or `local`: this machine's first device",
    )  # fmt: skip
    parser.add_argument("--layers", default="1,2", help="two depths to extrapolate from")
    parser.add_argument("--full_depth", action="store_true", help="compile the config's depth")
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--dump_hlo", action="store_true", help="write OUT/hlo/*.hlo.txt.gz")
    parser.add_argument(
        "--programs", default=",".join(PROGRAMS),
        help="which to compile: peer, default (bf16jax as configured), xla (bf16jax with XLA "
        "attention and the materialized loss); e.g. --programs=default for a quick look",
    )  # fmt: skip
    args = parser.parse_args()
    global HLO_DIR
    HLO_DIR = os.path.join(args.out, "hlo") if args.dump_hlo else None
    layers = [int(x) for x in args.layers.split(",")]
    if len(layers) != 2 or layers[0] >= layers[1]:
        parser.error(f"--layers={args.layers}: give two increasing depths, e.g. 1,2")
    programs = tuple(p for p in args.programs.split(",") if p)
    if not programs or set(programs) - set(PROGRAMS):
        parser.error(f"--programs={args.programs}: name some of {', '.join(PROGRAMS)}")
    result = compare(args.config, args.precision, args.chip, layers, args.full_depth, programs)
    result["command"] = "python experiments/program_compare.py " + shlex.join(sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = to_markdown(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("# Compiled programs: bf16jax vs the plain-JAX peer\n\n")
        f.write(f"Command: `{result['command']}`\n\n")
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
