"""Attention's projections as single GEMMs: q, k, v stacked at use time, and heads first.

`fused_projection` runs q, k, v (or k, v) as one GEMM over their kernels stacked at use time;
`fused_heads` gives each result [B, H, L, Dh], the Pallas kernels' layout, straight from that
GEMM, and `heads_output` projects [B, H, T, Dh] back to [B, T, D]: no layout copy around the
kernel (experiments/results/program_compare/). The params stay separate `Linear`s; every
output is in compute dtype, named `MATMUL_OUTPUT` for the remat policies, as `Linear`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bf16jax.precision import matmul
from bf16jax.precision.matmul import dot

MATMUL_OUTPUT = "matmul_output"  # checkpoint name of every Linear's output (remat policies)
Linear = Any  # bf16jax.nn.layers.Linear (not imported: layers imports this module)


def fused_heads(
    x: jax.Array, linears: Sequence[Linear], heads: int, head_dim: int, q_scale: float = 1.0
):
    """`fused_projection` with each result [B, H, L, Dh] (heads first) straight from the GEMM;
    the first (q) times `q_scale` before the cast to compute dtype."""
    first = linears[0]
    if x.shape[-1] != first.in_features:
        raise ValueError(
            f"Linear expects inputs [..., {first.in_features}], got shape {tuple(x.shape)}."
        )
    n = len(linears)
    kernel = jnp.stack([lin.kernel[...] for lin in linears], axis=1)  # [D, n, H*Dh]
    kernel = kernel.reshape(first.in_features, n, heads, head_dim)
    y = matmul.einsum("btd,dnhk->nbhtk", x, kernel, first.policy)  # accum
    if first.bias is not None:
        b = jnp.stack([lin.bias[...] for lin in linears]).reshape(n, 1, heads, 1, head_dim)
        y = y + first.policy.cast_to_accum(b)
    if q_scale != 1.0:
        y = y * jnp.asarray([q_scale] + [1.0] * (n - 1), y.dtype).reshape(n, 1, 1, 1, 1)
    y = checkpoint_name(first.policy.cast_to_compute(y), MATMUL_OUTPUT)  # as Linear's output
    return tuple(y[i] for i in range(n))


def heads_output(out: jax.Array, o: Linear) -> jax.Array:
    """The output projection of heads-first attention: [B, H, T, Dh] -> [B, T, D], as `o(...)`
    of the [B, T, H*Dh] reshape."""
    heads, head_dim = out.shape[1], out.shape[3]
    kernel = o.kernel[...].reshape(heads, head_dim, o.kernel.shape[-1])
    y = matmul.einsum("bhtk,hkd->btd", out, kernel, o.policy)  # accum
    if o.bias is not None:
        y = y + o.policy.cast_to_accum(o.bias[...])
    return checkpoint_name(o.policy.cast_to_compute(y), MATMUL_OUTPUT)


def same_plain_projection(linears: Sequence[Linear]) -> bool:
    """True when `linears` can share one GEMM: same shapes, same resolved policy, no bias on
    some only, and no quantization (LSQ step sizes and FP8 scales are per projection)."""
    first = linears[0]
    return all(
        lin.quant == "none"
        and not lin.int8
        and lin.policy == first.policy
        and lin.in_features == first.in_features
        and lin.kernel.shape == first.kernel.shape
        and (lin.bias is None) == (first.bias is None)
        for lin in linears
    )


def fused_projection(x: jax.Array, linears: Sequence[Linear]) -> tuple[jax.Array, ...]:
    """(x @ w_i + b_i for each Linear) as one GEMM over the kernels stacked at use time."""
    first = linears[0]
    if x.shape[-1] != first.in_features:
        raise ValueError(
            f"Linear expects inputs [..., {first.in_features}], got shape {tuple(x.shape)}."
        )
    kernel = jnp.stack([lin.kernel[...] for lin in linears], axis=1)  # [D, n, F]
    y = dot(x, kernel, first.policy)  # [..., n, F] accum
    if first.bias is not None:
        y = y + first.policy.cast_to_accum(jnp.stack([lin.bias[...] for lin in linears]))
    y = checkpoint_name(first.policy.cast_to_compute(y), MATMUL_OUTPUT)  # as Linear's output
    return tuple(y[..., i, :] for i in range(len(linears)))
