"""Compiles bf16jax's TPU attention kernels with segment ids (packed rows) for a TPU topology on a
CPU machine: splash (causal, no bias) and flash (T5's FP32 bias), forward and backward, sharded
over the batch axes. Proves the Mosaic lowering of the `SegmentIds` wiring without a TPU.

    .venv-tpu/bin/python experiments/aot_segments.py   # needs the `tpu` extra (make aot-tpu)
    .venv-tpu/bin/python experiments/aot_segments.py --topology=v5p:2x2x1 --seq_len=2048

Prints one JSON line per kernel: topology, shapes, the number of Pallas TPU custom calls in the
lowered program and the compiled program's per-device temp bytes (`memory_analysis()`).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bf16jax.nn import attention as attn_lib
from bf16jax.parallel.sharding import BATCH_AXES
from bf16jax.precision import get_policy


def compile_kernel(mesh: Mesh, *, batch: int, seq_len: int, heads: int, head_dim: int, bias: bool):
    """(lowered text, compiled) of value_and_grad of a packed causal attention call."""
    policy = get_policy("bf16")
    sharded = NamedSharding(mesh, P(BATCH_AXES))
    x = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), jnp.bfloat16, sharding=sharded)
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sharded)
    args = [x, x, x, ids]
    if bias:  # T5: a per-example relative-position bias from per-segment positions
        shape = (batch, heads, seq_len, seq_len)
        args.append(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharded))

    def loss(q, k, v, segment_ids, bias=None):
        out = attn_lib.attention(
            q,
            k,
            v,
            policy,
            bias=bias,
            causal=True,
            implementation="pallas",
            fallback=False,  # a call the kernels cannot take is an error, not XLA
            segment_ids=segment_ids,
            scale=None if bias is None else 1.0,
        )
        return jnp.sum(out.astype(jnp.float32))

    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args)
        return lowered.as_text(), lowered.compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5e:2x2", help="libtpu topology name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    args = parser.parse_args()
    topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    devices = np.array(topo.devices).reshape(1, -1, 1)
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = Mesh(devices, ("data", "fsdp", "tensor"), axis_types=auto)
    for kernel, bias in (("splash", False), ("flash+bias", True)):
        text, compiled = compile_kernel(
            mesh,
            batch=args.batch,
            seq_len=args.seq_len,
            heads=args.heads,
            head_dim=args.head_dim,
            bias=bias,
        )
        row = {
            "kernel": kernel,
            "topology": args.topology,
            "devices": devices.size,
            "shape": [args.batch, args.seq_len, args.heads, args.head_dim],
            "segment_ids": True,
            "pallas_calls": text.count("tpu_custom_call"),
            "temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
            "jax": jax.__version__,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
