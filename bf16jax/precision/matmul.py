"""Policy-aware matmuls: 16-bit operands and FP32 accumulation in the forward *and* backward pass.

Every matmul of a bf16jax model (Linear, attention scores and values, tied and untied output
heads, LSQ code dots) goes through `dot_general` here. Invariants it owns:

- forward: operands cast to the policy's `compute_dtype`, accumulated and returned in
  `accum_dtype` (`preferred_element_type`), exactly as a plain `lax.dot_general` would;
- backward (a `jax.custom_vjp`): the cotangent is cast to `compute_dtype` and both backward GEMMs
  take compute-dtype operands with an `accum_dtype` accumulator. JAX's own transpose of a dot
  with `preferred_element_type=f32` multiplies the FP32 cotangent by the up-cast 16-bit operand,
  i.e. runs every backward GEMM in FP32 (TF32 / multi-pass on accelerators); FlashAttention and
  PyTorch autocast run them on 16-bit operands, as this does;
- each operand's gradient leaves in that operand's own dtype, straight from the FP32
  accumulator: an FP32 master weight gets an FP32 gradient that was never rounded to 16 bits;
- when `compute_dtype == accum_dtype` (fp32, or an `->fp32` override) it is the plain dot.

A `custom_vjp` supports reverse mode (grad, vjp) only: forward-mode `jax.jvp` / `jacfwd` through
a 16-bit model raises; use an fp32 policy for those.

FP16: the cotangent cast to float16 is where gradients can underflow (below 2^-24) or overflow
(above 65504). Loss scaling (`bf16jax.precision.loss_scale`) exists for exactly this cast: it
scales the
cotangent up before it, and an overflow becomes a non-finite gradient, so the step is skipped and
a dynamic scale backs off. `dot_dtypes` reads the operand dtypes of every dot in a lowered
program: the structural check that the backward pass really is 16-bit.
"""

from __future__ import annotations

import functools
import itertools
import re

import jax
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from bf16jax.precision import Policy

__all__ = ["dot_general", "dot", "einsum", "accumulating_dot", "dot_dtypes"]

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]


def _normalize(dims) -> DimensionNumbers:
    (xc, yc), (xb, yb) = dims
    return (tuple(map(int, xc)), tuple(map(int, yc))), (tuple(map(int, xb)), tuple(map(int, yb)))


def dot_general(x: jax.Array, y: jax.Array, dimension_numbers, policy: Policy) -> jax.Array:
    """`lax.dot_general(x, y, dimension_numbers)` on `policy.compute_dtype` operands.

    The result is in `policy.accum_dtype` (FP32 accumulation). Its VJP runs both backward GEMMs
    on compute-dtype operands with `accum_dtype` accumulation, and returns each operand's
    gradient in that operand's dtype (see the module docstring).

    Args:
      x, y: operands of any float dtypes (cast to the compute dtype here).
      dimension_numbers: `((x_contract, y_contract), (x_batch, y_batch))` as in lax.dot_general.
      policy: the calling module's resolved policy.

    Returns:
      The product in accum dtype; dims are batch, x's free dims, y's free dims.
    """
    dims = _normalize(dimension_numbers)
    compute, accum = np.dtype(policy.compute_dtype), np.dtype(policy.accum_dtype)
    if compute == accum:  # FP32 (or another single dtype): nothing to keep in 16 bits
        return lax.dot_general(x.astype(compute), y.astype(compute), dims,
                               preferred_element_type=accum)  # fmt: skip
    return _dot16(x, y, dims, compute, accum)


def dot(x: jax.Array, w: jax.Array, policy: Policy, contract: int = 1) -> jax.Array:
    """x[..., K] @ w[K, ...] with operands in compute dtype and the result in accum dtype.

    `contract` is the number of trailing dims of `x` (leading dims of `w`) contracted.
    """
    dims = (tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract)))
    return dot_general(x, w, (dims, ((), ())), policy)


def einsum(spec: str, x: jax.Array, y: jax.Array, policy: Policy) -> jax.Array:
    """Two-operand `jnp.einsum(spec, x, y)` through `dot_general` (result in accum dtype).

    `spec` is `"xs,ys->out"` with single-letter axes, no ellipsis and no repeated letter in an
    operand; a letter in both operands and the output is a batch axis, in both operands only a
    contracted axis, in one operand and the output a free axis (e.g. "bthd,bshd->bhts").
    """
    dims, names = _einsum_dims(spec, x.ndim, y.ndim)
    out_names = spec.split("->")[1].strip()
    out = dot_general(x, y, dims, policy)
    if names != out_names:
        out = lax.transpose(out, tuple(names.index(c) for c in out_names))
    return out


@functools.lru_cache(maxsize=64)
def _einsum_dims(spec: str, x_ndim: int, y_ndim: int) -> tuple[DimensionNumbers, str]:
    """(dimension numbers, letters of the dot_general output) for a two-operand einsum."""
    try:
        ins, out = spec.replace(" ", "").split("->")
        xs, ys = ins.split(",")
    except ValueError:
        raise ValueError(f"einsum spec {spec!r} must look like 'ab,bc->ac'.") from None
    bad = [s for s in (xs, ys, out) if len(set(s)) != len(s) or not s.isalpha()]
    if bad or (len(xs), len(ys)) != (x_ndim, y_ndim):
        raise ValueError(
            f"einsum spec {spec!r} does not fit operands of rank {x_ndim} and {y_ndim}: give "
            "one distinct letter per axis (no '...', no repeated letters)."
        )
    batch = [c for c in xs if c in ys and c in out]
    contract = [c for c in xs if c in ys and c not in out]
    x_free = [c for c in xs if c not in ys]
    y_free = [c for c in ys if c not in xs]
    if set(x_free + y_free) - set(out) or set(out) - set(xs + ys):
        raise ValueError(
            f"einsum spec {spec!r}: every axis of one operand only must be in the output, and "
            "every output axis in an operand (sum single-operand axes before the dot)."
        )
    dims = (
        (tuple(xs.index(c) for c in contract), tuple(ys.index(c) for c in contract)),
        (tuple(xs.index(c) for c in batch), tuple(ys.index(c) for c in batch)),
    )
    return dims, "".join(batch + x_free + y_free)


# ----------------------------------------------------------------------------- the custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dot16(x, y, dims, compute, accum):
    return lax.dot_general(x.astype(compute), y.astype(compute), dims,
                           preferred_element_type=accum)  # fmt: skip


def _dot16_fwd(x, y, dims, compute, accum):
    # symbolic_zeros: x, y arrive as CustomVJPPrimal; `perturbed` is False for an operand
    # nobody differentiates (e.g. ViT's input patches), whose backward GEMM is then skipped.
    out = _dot16(x.value, y.value, dims, compute, accum)
    # Residuals are the operands as given: an FP32 master weight is alive anyway, and a 16-bit
    # activation is its own compute-dtype copy; the casts are redone in the backward pass.
    return out, (x.value, y.value, x.perturbed, y.perturbed)


def _dot16_bwd(dims, compute, accum, res, ct):
    x, y, x_perturbed, y_perturbed = res
    if isinstance(ct, SymbolicZero):
        return None, None
    # why: the cotangent is FP32 (the accumulator's dtype); the backward GEMMs take it in the
    # compute dtype like the forward operands, and accumulate in FP32 like the forward.
    g = ct.astype(compute)
    xc, yc = x.astype(compute), y.astype(compute)
    dx = _lhs_cotangent(g, yc, dims, x.ndim, accum).astype(x.dtype) if x_perturbed else None
    dy = _rhs_cotangent(g, xc, dims, y.ndim, accum).astype(y.dtype) if y_perturbed else None
    return dx, dy


_dot16.defvjp(_dot16_fwd, _dot16_bwd, symbolic_zeros=True)


def _ranges_like(*xs):
    start = 0
    for x in xs:
        yield tuple(range(start, start + len(x)))
        start += len(x)


def _remaining(original, *removed):
    gone = set(itertools.chain(*removed))
    return tuple(i for i in original if i not in gone)


def accumulating_dot(a: jax.Array, b: jax.Array, dimension_numbers, accum) -> jax.Array:
    """`lax.dot_general(a, b, dims, preferred_element_type=accum)` with the operands first laid
    out as a GEMM wants them: `a` as (batch, free, contracted), `b` as (batch, contracted, free).

    Same result and output axis order. Why: XLA:CPU cannot run some BF16 x BF16 -> F32 dots
    that contract non-minor axes, e.g. the key gradient of attention scores ("Unsupported
    element type for DotThunk"); in this layout it can. GPU and TPU compilers fold such
    transposes into the GEMM. For backward GEMMs of 16-bit operands.
    """
    (ac, bc), (ab, bb) = _normalize(dimension_numbers)
    a_free = _remaining(range(a.ndim), ac, ab)
    b_free = _remaining(range(b.ndim), bc, bb)
    a_perm, b_perm = ab + a_free + ac, bb + bc + b_free
    if a_perm != tuple(range(a.ndim)):
        a = lax.transpose(a, a_perm)
    if b_perm != tuple(range(b.ndim)):
        b = lax.transpose(b, b_perm)
    nb, nc = len(ab), len(ac)
    contract = (tuple(range(a.ndim - nc, a.ndim)), tuple(range(nb, nb + nc)))
    batch = (tuple(range(nb)), tuple(range(nb)))
    return lax.dot_general(a, b, (contract, batch), preferred_element_type=accum)


def _lhs_cotangent(g, y, dims, x_ndim, accum, swap_ans=False):
    """d(x . y)/dx applied to `g`: the transpose rule of lax.dot_general (jax/_src/lax/lax.py,
    `_dot_general_transpose_lhs`) with our accumulator dtype.

    Of the two operand orders, dot(g, y) and dot(y, g), the one whose output is already in x's
    axis order is used (e.g. a Linear's dW = x^T g): XLA:CPU rewrites transpose(dot(a, b)) as a
    dot it cannot run on BF16 operands with an F32 result ("Unsupported element type for
    DotThunk"), and everywhere else a GEMM that writes its result in place is no worse.
    """
    (x_contract, y_contract), (x_batch, y_batch) = dims
    x_kept = _remaining(range(x_ndim), x_contract, x_batch)
    y_kept = _remaining(range(y.ndim), y_contract, y_batch)
    if swap_ans:
        ans_batch, ans_y, _ = _ranges_like(x_batch, y_kept, x_kept)
    else:
        ans_batch, _, ans_y = _ranges_like(x_batch, x_kept, y_kept)
    x_contract_sorted_by_y = tuple(np.take(x_contract, np.argsort(y_contract)).tolist())
    # dot(g, y): out axes are x's (batch, kept, contract sorted by y) ...
    g_first = np.argsort(x_batch + x_kept + x_contract_sorted_by_y)
    # ... dot(y, g): x's (batch, contract sorted by y, kept).
    y_first = np.argsort(x_batch + x_contract_sorted_by_y + x_kept)
    if not np.array_equal(g_first, np.arange(x_ndim)) and np.array_equal(
        y_first, np.arange(x_ndim)
    ):
        return accumulating_dot(y, g, ((y_kept, ans_y), (y_batch, ans_batch)), accum)
    out = accumulating_dot(g, y, ((ans_y, y_kept), (ans_batch, y_batch)), accum)
    return lax.transpose(out, tuple(int(a) for a in g_first))


def _rhs_cotangent(g, x, dims, y_ndim, accum):
    (x_contract, y_contract), (x_batch, y_batch) = dims
    swapped = ((y_contract, x_contract), (y_batch, x_batch))
    return _lhs_cotangent(g, x, swapped, y_ndim, accum, swap_ans=True)


# ----------------------------------------------------------------------------- inspection
_DOT_RE = re.compile(
    r"stablehlo\.dot_general\b.*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)"
)


def _element_type(tensor_type: str) -> str:
    return tensor_type[len("tensor<") : -1].split("x")[-1]


def dot_dtypes(lowered_text: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types ("bf16", "f32", "f8E4M3FN", ...) of every
    `stablehlo.dot_general` in a lowered program (`jax.jit(f).lower(...).as_text()`).

    This is the program XLA receives: a dot with an "f32" operand runs as an FP32 GEMM.
    """
    return [tuple(_element_type(t) for t in m.groups()) for m in _DOT_RE.finditer(lowered_text)]
