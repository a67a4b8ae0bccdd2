"""Ahead-of-time compiles bf16jax's sharded train step for TPU pod topologies on a CPU machine.

    make aot-tpu   # = .venv-tpu/bin/python experiments/aot_tpu.py (needs the `tpu` extra):
                   # gpt2_124m on v5e-8 / v5p-8, gpt_1b and t5_base on v5e-64 / v5p-128 / v4-32
    .venv-tpu/bin/python experiments/aot_tpu.py --configs=gpt_1b --topologies=v5e-64 \
        --policies=bf16,bf16-pure --remats=none,save_dots,full

Owns the topology table (slice name -> libtpu topology, HBM per chip) and `aot_compile(config,
mesh)`: the real `create_trainer(config, mesh)` step compiled for ShapeDtypeStruct inputs and
reported per device: memory from `compiled.memory_analysis()` (peak = argument + output - alias
+ temp + code), FLOPs from `compiled.cost_analysis()` (a while loop's body counts once: loops
are recompiled unrolled at 1 and 2 layers and extrapolated), the 6N + 6LTD model FLOPs, and
Pallas attention FLOPs added analytically (XLA sees none inside a Pallas call). A setting that
does not fit doubles grad accumulation until one does (same global batch); `--remats` names per
case the fitting remat policy with the fewest FLOPs. Writes results/aot_tpu/results.{json,md},
merged over runs (a rerun of a case replaces its rows), each row with its command and git
revision.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # aot_results.py beside this file
from aot_results import (  # noqa: E402, F401 (tests read them here)
    GIB,
    OUT_DIR,
    _key,
    _remat_name,
    choose_remat,
    to_markdown,
    write_results,
)

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu names it; `hbm_gib` is the datasheet HBM per chip."""

    name: str  # libtpu topology, e.g. "v5e:8x8"
    hbm_gib: float
    megacore: bool  # v4 / v5p: one JAX device per chip (both TensorCores), as on a real pod


# Slice names count chips for v5e and TensorCores (2 per chip) for v4 / v5p.
TOPOLOGIES = {
    "v5e-8": Topology("v5e:2x4", 16, megacore=False),
    "v5e-64": Topology("v5e:8x8", 16, megacore=False),
    "v5p-8": Topology("v5p:2x2x1", 95, megacore=True),
    "v5p-128": Topology("v5p:4x4x4", 95, megacore=True),
    "v4-32": Topology("v4:2x2x4", 32, megacore=True),
}


# The slices each config is compiled for when --topologies is not given (gpt2_124m's batch of
# 16 does not split over 64 chips; it is a one-host model).
DEFAULT_TOPOLOGIES = {
    "gpt2_124m": ("v5e-8", "v5p-8"),
    "gpt_1b": ("v5e-64", "v5p-128", "v4-32"),
    "t5_base": ("v5e-64", "v5p-128", "v4-32"),
}


def tpu_devices(slice_name: str) -> list:
    """Compile-only devices of a TPU slice (needs libtpu: the `tpu` extra)."""
    from jax.experimental import topologies

    topo = TOPOLOGIES[slice_name]
    kwargs = dict(chips_per_host_bounds=(2, 2, 1), num_slices=1)
    if topo.megacore:
        kwargs["chip_config_name"] = "megacore"
    return topologies.get_topology_desc(topology_name=topo.name, platform="tpu", **kwargs).devices


def load_config(name_or_path: str):
    """`gpt_1b` or `configs/gpt_1b.py` -> its (unlocked) config."""
    path = name_or_path
    if not path.endswith(".py"):
        path = os.path.join(HERE, os.pardir, "configs", f"{name_or_path}.py")
    spec = importlib.util.spec_from_file_location("aot_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize
    return total


def global_bytes(tree: Any) -> int:
    """Bytes of a tree of arrays / ShapeDtypeStructs, unsharded."""
    import jax
    import numpy as np

    return sum(
        int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def abstract_batch(config, mesh) -> dict:
    """The global batch as sharded ShapeDtypeStructs (what `Trainer.global_batch` would make)."""
    import jax

    from bf16jax.data import datasets as data
    from bf16jax.parallel import sharding

    b, sh = int(config.data.batch_size), sharding.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct((b, *shape), dtype, sharding=sh)
        for k, (shape, dtype) in data.example_spec(config.data).items()
    }


def _oom_message(err: Exception) -> str | None:
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    lines = [ln for ln in text.splitlines() if "memory" in ln.lower() or "hbm" in ln.lower()]
    return (lines[0] if lines else text.splitlines()[0]).strip()[:400]


# XLA backend (LLVM) options that halve CPU compile time and leave the optimized HLO, which
# memory_analysis() and cost_analysis() read, as it is: for tests on CPU devices.
FAST_CPU_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _compile(config, mesh, compiler_options: dict | None = None):
    """(trainer, batch, compiled or OOM message, lower seconds, compile seconds)."""
    import jax

    from bf16jax.training import trainer as train

    trainer = train.create_trainer(config, mesh=mesh)
    batch = abstract_batch(config, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        # The jitted step with the Trainer's in/out shardings and donation: what a pod runs.
        lowered = trainer._step_fn.lower(trainer.abstract, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options)
    except Exception as e:  # libtpu reports "does not fit" as a compile error
        if (msg := _oom_message(e)) is None:
            raise
        compiled = msg
    return trainer, batch, compiled, lower_s, time.perf_counter() - start


def _git_revision() -> str | None:
    """The library's commit (`-dirty` with uncommitted changes): which code a row measured."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def materialized_loss(config):
    """`config` with the materialised loss: the fused loss's GEMMs without its chunk loop."""
    c = config.copy_and_resolve_references()
    c.train.loss_impl = "materialized"
    return c


def _attention_calls(config) -> list[tuple[int, int, bool, int]]:
    """(query length, key length, causal, layers) of each kind of attention in the model."""
    from bf16jax.data import datasets as data

    m = config.model
    if m.name == "gpt":
        t = int(config.data.seq_len)
        return [(t, t, True, int(m.num_layers))]
    if m.name == "t5":
        spec = data.example_spec(config.data)
        te, td = spec["encoder_inputs"][0][0], spec["decoder_inputs"][0][0]
        enc, dec = int(m.num_encoder_layers), int(m.num_decoder_layers)
        return [(te, te, False, enc), (td, td, True, dec), (td, te, False, dec)]
    return []  # ViT: its patch sequence is no multiple of 128 (XLA)


def attention_kernel(config, platform: str) -> str:
    """The attention a config's layers use on `platform` (bf16jax.nn.attention): "pallas", "xla",
    or "pallas/xla" when "auto" falls back for some (lengths the kernels do not tile)."""
    from bf16jax.nn import attention
    from bf16jax.precision import get_policy

    policy = get_policy(config.precision)
    kernel, _ = attention.resolve_implementation(
        config.model.get("attention_impl", "auto"),
        compute_dtype=policy.compute_dtype,
        platform=platform,
    )
    if kernel != "pallas":
        return kernel
    kinds = {
        "pallas" if attention.pallas_block(t) and attention.pallas_block(s) else "xla"
        for t, s, _, _ in _attention_calls(config)
    }
    return "/".join(sorted(kinds)) or "xla"


def pallas_attention_flops(config, mesh) -> float:
    """Per-device FLOPs per step of the attention inside Pallas kernels (splash, or flash with
    T5's bias), which XLA's cost analysis does not see (a Pallas call counts ~0).

    Per layer and sequence, with M = T * S * heads * head_dim: forward 2 matmuls (q k^T, p v),
    backward 7 (dq kernel: q k^T, do v^T, ds k; dkv kernel: q k^T, p^T do, do v^T, ds^T q), and
    the forward again in the backward pass under remat ("save_dots" / "full" recompute the
    kernel's output), each 2M FLOPs; causal: times the fraction of (block x block) tiles at or
    below the diagonal, (n + 1) / 2n for n = T / block, the only ones the kernels run.
    """
    from bf16jax.nn import attention

    m = config.model
    width = int(m.num_heads) * int(m.get("head_dim") or m.embed_dim // m.num_heads)
    matmuls = 2 + 7 + (2 if _remat_name(m.get("remat", "none")) != "none" else 0)
    per_sequence = 0.0
    for t, s, causal, layers in _attention_calls(config):
        if not (attention.pallas_block(t) and attention.pallas_block(s)):
            continue  # this attention runs on the XLA path: XLA counts it
        n = t // attention.pallas_block(t)
        frac = (n + 1) / (2 * n) if causal else 1.0
        per_sequence += 2 * matmuls * t * s * width * frac * layers
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sequences = int(config.data.batch_size) / shards  # per device, all micro-batches
    return per_sequence * sequences / mesh.shape["tensor"]


def unrolled_flops(config, mesh, compiler_options: dict | None = None) -> dict[str, float]:
    """Per-device XLA FLOPs of the GPT step at full depth, from unrolled 1- and 2-layer compiles.

    XLA's cost analysis counts a while loop's body once, so a scanned model's figure misses
    L - 1 layers; the step's FLOPs are A + L * B, exactly linear in L for identical layers. The
    gradient-accumulation loop and the fused loss's chunk loop are such loops too: the compiles
    take the whole batch in one micro-batch (the same FLOPs; 1-2 layers fit at any batch) and
    the materialised loss, which runs the same head GEMMs.
    """
    flops = []
    for layers in (1, 2):
        c = materialized_loss(config)
        c.model.update(num_layers=layers, scan_layers=False)
        c.train.grad_accum_steps = 1
        _, _, compiled, _, _ = _compile(c, mesh, compiler_options)
        if isinstance(compiled, str):
            raise RuntimeError(f"{layers}-layer FLOPs compile ran out of memory: {compiled}")
        flops.append(_xla_flops(compiled))
    per_layer = flops[1] - flops[0]
    return {
        "per_layer": per_layer,
        "total": flops[0] + (int(config.model.num_layers) - 1) * per_layer,
    }


def aot_compile(
    config,
    mesh,
    hbm_bytes: float | None = None,
    *,
    full_depth_flops: bool = True,
    compiler_options: dict | None = None,
) -> dict:
    """Lowers and compiles `config`'s train step on `mesh` and reports per-device memory and FLOPs.

    Args:
      config: a bf16jax config (its mesh section is ignored: `mesh` is used).
      mesh: a ("data", "fsdp", "tensor") mesh, e.g. `sharding.make_mesh(config.mesh, devices)`
        over a TPU topology's compile-only devices, or over CPU devices.
      hbm_bytes: the chip's HBM, for `fits` and `hbm_used`; None on CPU.
      full_depth_flops: for a scanned GPT, also compile it unrolled at 1 and 2 layers to count
        the FLOPs of all layers (`unrolled_flops`), and for a fused loss once with the
        materialised loss; otherwise the full-depth figure of such a model is None.
      compiler_options: XLA options for every compile, e.g. FAST_CPU_COMPILE in tests.

    Returns:
      A JSON-able dict. Memory keys are bytes per device; `fits` is False when the compiler
      refused the program (`oom` holds its message) or the peak exceeds `hbm_bytes`.
    """
    import jax

    from bf16jax.training import loop, metrics

    n_dev = mesh.devices.size
    trainer, batch, compiled, lower_s, compile_s = _compile(config, mesh, compiler_options)
    shards = int(mesh.shape["data"] * mesh.shape["fsdp"])
    row = {
        "policy": config.precision,
        "device_kind": mesh.devices.flat[0].device_kind,
        "n_devices": int(n_dev),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "params": int(trainer.n_params),
        "global_batch": int(config.data.batch_size),
        "grad_accum_steps": int(config.train.grad_accum_steps),
        "micro_batch_per_device": int(config.data.batch_size)
        // shards
        // int(config.train.grad_accum_steps),
        "remat": _remat_name(config.model.get("remat", "none")),
        "state_bytes_global": global_bytes(trainer.abstract),
        "state_bytes_per_device": shard_bytes(trainer.abstract),
        "batch_bytes_per_device": shard_bytes(batch),
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "hbm_bytes": hbm_bytes,
        "git": _git_revision(),
    }
    if isinstance(compiled, str):
        return row | {"fits": False, "oom": compiled}
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    row |= {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "code_bytes": int(mem.generated_code_size_in_bytes),
        "peak_bytes": int(peak),
        "fits": hbm_bytes is None or peak <= hbm_bytes,
        "hbm_used": None if hbm_bytes is None else round(peak / hbm_bytes, 4),
        "xla_flops_per_device": _xla_flops(compiled),
    }
    full = row["xla_flops_per_device"]
    loops = config.model.get("scan_layers", False) or int(config.train.grad_accum_steps) > 1
    scanned = loops and config.model.name == "gpt"
    if scanned or trainer.loss.fused:  # while loops, whose body XLA's cost analysis counts once
        full = None
        if full_depth_flops and scanned:
            full = unrolled_flops(config, mesh, compiler_options)["total"]
        elif full_depth_flops:
            c = materialized_loss(config)
            c.train.grad_accum_steps = 1
            _, _, unlooped, _, _ = _compile(c, mesh, compiler_options)
            full = None if isinstance(unlooped, str) else _xla_flops(unlooped)
    per_token = loop.flops_per_token(config, trainer.n_params)
    peak_flops = metrics.device_peak_flops(mesh.devices.flat[0])
    kernel = attention_kernel(config, mesh.devices.flat[0].platform)
    kernel_flops = pallas_attention_flops(config, mesh) if "pallas" in kernel else 0.0
    total = None if full is None else full + (kernel_flops or 0.0)
    row |= {
        "attention": kernel,
        "xla_flops_per_device_full_depth": full,
        # Attention FLOPs inside Pallas kernels (analytic: XLA does not count them).
        "kernel_flops_per_device": kernel_flops,
        "flops_per_device": total,
        "xla_flops_per_step": None if total is None else total * n_dev,
        "model_flops_per_step": (
            None if per_token is None else per_token * loop.tokens_per_step(config)
        ),
        # The step time at 100% of the chip's dense BF16 peak, from XLA's + the kernels' FLOPs.
        "step_s_at_peak": total / peak_flops if (total and peak_flops) else None,
    }
    row["jax"] = jax.__version__
    return row


def _with(config, **train):
    c = config.copy_and_resolve_references()
    c.train.update(train)
    return c


def run_case(
    config_name: str,
    slice_name: str,
    policy: str,
    max_accum: int,
    full_depth_flops: bool = True,
    remat: str | None = None,
) -> list[dict]:
    """Rows for one case: the config as is (or with `remat`) and, if it does not fit, the first
    grad accumulation (same global batch, smaller per-device micro-batch) that does."""
    from bf16jax.parallel import sharding

    topo = TOPOLOGIES[slice_name]
    config = load_config(config_name)
    config.precision = policy
    if remat:
        config.model.remat = remat
    mesh = sharding.make_mesh(config.mesh, devices=tpu_devices(slice_name))
    base = {"config": config_name, "topology": slice_name, "libtpu_topology": topo.name}
    rows, accum = [], int(config.train.grad_accum_steps)
    while True:
        c = _with(config, grad_accum_steps=accum)
        row = base | {"variant": "as configured" if not rows else f"grad_accum={accum}"}
        row |= aot_compile(c, mesh, hbm_bytes=topo.hbm_gib * GIB, full_depth_flops=full_depth_flops)
        rows.append(row)
        print(json.dumps(row), flush=True)
        accum *= 2
        if row["fits"] or row["micro_batch_per_device"] <= 1 or accum > max_accum:
            return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_TOPOLOGIES))
    parser.add_argument(
        "--topologies", default="", help="comma-separated slices; default: per config"
    )
    parser.add_argument("--policies", default="bf16,bf16-pure")
    parser.add_argument("--max_accum", type=int, default=16, help="largest grad accumulation")
    parser.add_argument(
        "--remats",
        default="",
        help="comma-separated model.remat policies to compile (none,save_dots,full); "
        "default: as configured",
    )
    parser.add_argument(
        "--skip_full_depth_flops",
        action="store_true",
        help="skip the 1- and 2-layer unrolled compiles of scanned models (FLOPs only)",
    )
    parser.add_argument("--out", default=OUT_DIR)
    args = parser.parse_args()
    for name in args.topologies.split(",") if args.topologies else []:
        if name not in TOPOLOGIES:
            raise SystemExit(f"Unknown topology {name!r}: use one of {', '.join(TOPOLOGIES)}.")
    script = os.path.relpath(__file__, os.path.join(HERE, os.pardir))
    command = shlex.join(["python", script, *sys.argv[1:]])
    for config_name in args.configs.split(","):
        slices = args.topologies.split(",") if args.topologies else None
        slices = slices or DEFAULT_TOPOLOGIES.get(config_name, tuple(TOPOLOGIES))
        for slice_name in slices:
            for policy in args.policies.split(","):
                for remat in args.remats.split(",") if args.remats else [None]:
                    rows = run_case(
                        config_name,
                        slice_name,
                        policy,
                        args.max_accum,
                        full_depth_flops=not args.skip_full_depth_flops,
                        remat=remat,
                    )
                    write_results(rows, command, args.out)  # after each case: resumable
    print(f"wrote {os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    main()
