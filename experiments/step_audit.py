"""Structural audit of the real train step: what XLA receives, read without running it.

For each config x policy it lowers the Trainer's jitted step (the one `bf16jax.main` runs, with
its shardings and donation) on ShapeDtypeStructs and prints one JSON line: the number of dots,
how many take an FP32 operand (each is an FP32 GEMM: TF32 / multi-pass on accelerators), the
operand-dtype histogram, the reductions of the diagnostic variant (`train.diagnostics`, run on
logging steps only) and, with --compile, the compiled step's per-device memory from
`compiled.memory_analysis()` (temp bytes: activations, logits, gradients in flight).

    python experiments/step_audit.py --configs=gpt_tiny,t5_small,vit_digits --policies=bf16,fp16
    python experiments/step_audit.py --configs=gpt2_124m --policies=bf16 --compile \
        --config.train.loss_impl=materialized
    python experiments/step_audit.py --fuse_qkv=on   # the GPU / TPU program (q, k, v fused)
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time


def _lower(config, diagnostics: bool):
    import jax

    from bf16jax.parallel import sharding
    from bf16jax.training import trainer as train

    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    trainer = train.create_trainer(config, mesh=mesh)
    return trainer, trainer.lower(diagnostics=diagnostics)


def _reductions(text: str) -> int:
    return len(re.findall(r"stablehlo\.reduce[ (]", text))


def audit(name: str, policy: str, extra: list[str], compile_step: bool) -> dict:
    from bf16jax import config as config_lib
    from bf16jax.nn import layers
    from bf16jax.precision.matmul import dot_dtypes

    overrides = [f"precision={policy}", "mesh.data=1", *extra]
    config = config_lib.load_config(config_lib.config_path(name), overrides)
    start = time.perf_counter()
    trainer, lowered = _lower(config, diagnostics=False)
    text = lowered.as_text()
    lower_s = time.perf_counter() - start
    dots = dot_dtypes(text)
    row = {
        "config": name,
        "policy": policy,
        "set": extra,
        "loss": "fused" if trainer.loss.fused else "materialized",
        "fuse_qkv": {None: "auto"}.get(
            layers.Attention.fuse_projections, layers.Attention.fuse_projections
        ),  # fmt: skip
        "dots": len(dots),
        "dots_with_f32_operand": sum("f32" in d[:2] for d in dots),
        "dot_dtypes": {"x".join(k): v for k, v in collections.Counter(dots).items()},
        "reductions": _reductions(text),
        "lower_s": round(lower_s, 1),
    }
    if config.train.diagnostics:
        diag_text = _lower(config, diagnostics=True)[1].as_text()
        row["reductions_diagnostic_step"] = _reductions(diag_text)
    if compile_step:
        start = time.perf_counter()
        mem = lowered.compile().memory_analysis()
        row["compile_s"] = round(time.perf_counter() - start, 1)
        row["temp_bytes"] = int(mem.temp_size_in_bytes)
        row["argument_bytes"] = int(mem.argument_size_in_bytes)
        row["output_bytes"] = int(mem.output_size_in_bytes)
    return row


def main() -> None:
    from bf16jax.cli import script_parser, split_config_overrides

    p = script_parser(__doc__)
    p.add_argument("--configs", default="gpt_tiny,t5_small,vit_digits", help="configs/ names")
    p.add_argument("--policies", default="bf16,fp16", help="policies, comma-separated")
    p.add_argument("--compile", action="store_true", help="also compile: memory_analysis()")
    p.add_argument(
        "--fuse_qkv",
        choices=("auto", "on", "off"),
        default="auto",
        help="q/k/v as one GEMM: auto = the platform's choice (separate on CPU, fused elsewhere)",
    )
    rest, overrides = split_config_overrides(sys.argv[1:])
    args = p.parse_args(rest)
    from bf16jax.nn import layers

    layers.Attention.fuse_projections = {"auto": None, "on": True, "off": False}[args.fuse_qkv]
    for name in args.configs.split(","):
        for policy in args.policies.split(","):
            print(json.dumps(audit(name, policy, overrides, args.compile)), flush=True)


if __name__ == "__main__":
    main()
