"""Quantization math: LSQ fake-quant with learned step sizes, int8 dots, FP8 delayed scaling.

LSQ (Esser et al. 2020, arXiv:1902.08153): a tensor x is fake-quantized with a learned step size
s as q = round(clip(x / s, Qn, Qp)) * s, with Qn, Qp = -2^(b-1), 2^(b-1) - 1 (signed) or 0,
2^b - 1 (unsigned). Straight-through gradients: dq/dx = 1 for Qn < x/s < Qp, else 0; dq/ds =
round(x/s) - x/s inside, Qn or Qp outside; the gradient of s is multiplied by g = 1/sqrt(N Qp)
(N = elements per step size). Init s = 2 mean|x| / sqrt(Qp). Invariants owned here:

- codes (`lsq_codes`) are exact integers held in FP32, so a dot of codes in any float compute
  dtype with an FP32 accumulator equals the int8 x int8 -> int32 dot whenever partial sums stay
  below 2^24: fake-quant and real-int8 evaluation agree (`quantized_dot`);
- step sizes are learned in the log domain, s = exp(theta): FP32 nnx.Params `w_log_scale` (per
  output channel) and `a_log_scale` (per tensor) of `layers.Linear`, trained with the model,
  never weight-decayed, sharded like the kernel's output axis, checkpointed. LSQ's gradient
  scale was designed for SGD; Adam normalises it away and moves a raw s by ~lr per step, which
  at lr 3e-3 against s0 ~ 0.07 drove step sizes through zero (saturated codes, 0/0 at w = 0).
  In the log domain s stays positive and Adam's steps are relative (~lr of s);
- an activation bounded below (GELU's output >= -0.17, ReLU's >= 0) is quantized with an
  unsigned range offset by that bound (`a_offset`), so all 2^b codes are in use instead of half
  (LSQ+, Bhalgat et al. 2020, arXiv:2004.09576, with a fixed offset); the int8 dot then runs on
  codes shifted by 2^(b-1) plus a per-channel correction, still bit-exact with fake-quant;
- what works on a whole model (find its quantized layers, switch them to int8, replace kernels
  by their int8 / E4M3 codes, export and load int8 weights) is `bf16jax.nn.quant_model`: this
  module never imports the layers that use it;
- FP8 delayed scaling (Micikevicius et al. 2022, arXiv:2209.05433; E4M3 forward, E5M2 gradients):
  `fp8_dot` runs x @ w on E4M3 operands and quantizes the incoming gradient to E5M2, each with
  the per-tensor scale of the previous steps' amaxes. The scales [3] and amax histories [3, H]
  (rows x, w, grad) are `FP8Meta` variables of `layers.Linear`, not params: the optimizer never
  sees them. Their update leaves the pure train step as their "gradient" (Flax Linen's
  overwrite-with-gradient trick, `flax/linen/fp8_ops.py`): `fp8_dot`'s VJP returns the new
  scales and histories as the cotangents of the old ones, and `train.train_step` stores them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bf16jax.precision import FP8_DEFAULTS, Policy, fp8_options, matmul, quant_bits

__all__ = [
    "quant_range",
    "scale_grad",
    "lsq_codes",
    "fake_quant",
    "init_step_size",
    "init_log_step_size",
    "activation_step_size",
    "step_size",
    "GELU_MIN",
    "GELU_MEAN",
    "quantized_dot",
    "FP8_FORWARD",
    "FP8_BACKWARD",
    "FP8_HISTORY_LENGTH",
    "FP8_GRAD_DTYPES",
    "fp8_config",
    "FP8Meta",
    "fp8_meta_init",
    "fp8_quantize",
    "fp8_dot",
    "fp8_qdq",
    "update_amax_history",
    "scale_from_history",
]

_F32 = jnp.float32
# Data-independent activation step-size init: LSQ's 2 mean|x| / sqrt(Qp) for inputs of unit
# RMS (LayerNorm outputs; E|x| = sqrt(2/pi) for a unit Gaussian). The step size then learns.
_UNIT_MEAN_ABS = math.sqrt(2.0 / math.pi)


def _gelu_stats() -> tuple[float, float]:
    # jax.nn.gelu's default (tanh) form in float64 numpy: its minimum (about -0.17 at x = -0.75)
    # and its mean over a unit Gaussian input (about 0.28), the init of an offset step size.
    z = np.linspace(-8.0, 8.0, 160_001)
    g = 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    density = np.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
    return float(g.min()), float(np.sum(g * density) * (z[1] - z[0]))


_GELU_MIN_EXACT, GELU_MEAN = _gelu_stats()
# A lower bound of GELU's output with room for its BF16 rounding (ulp 2^-10 near 0.17).
GELU_MIN = math.floor(_GELU_MIN_EXACT * 512.0) / 512.0  # -0.171875


def quant_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """(Qn, Qp): [-2^(b-1), 2^(b-1) - 1] if `signed`, else [0, 2^b - 1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported: use 2..8 (int8 holds the codes).")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_grad(x: jax.Array, g: float) -> jax.Array:
    """Identity forward; multiplies the gradient by `g` (LSQ's step-size gradient scale)."""
    return x


def _scale_grad_fwd(x, g):
    return x, None


def _scale_grad_bwd(g, _, ct):
    return (ct * jnp.asarray(g, ct.dtype),)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums the broadcast dims of `x` away so that it has `shape` (right-aligned broadcast)."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def lsq_codes(x: jax.Array, s: jax.Array, qn: int, qp: int) -> jax.Array:
    """round(clip(x / s, qn, qp)) as exact integers in FP32; `s` broadcasts against `x`.

    The VJP is that of the STE, written so that `lsq_codes(x, s) * s` has LSQ's gradients:
    d codes/dx = 1/s and d codes/ds = -x/s^2 inside (Qn < x/s < Qp), 0 outside. Rounding is
    half-to-even (`jnp.round`).
    """
    return jnp.round(jnp.clip(x.astype(_F32) / s, qn, qp))


def _codes_fwd(x, s, qn, qp):
    v = x.astype(_F32) / s
    return jnp.round(jnp.clip(v, qn, qp)), (v, s, jnp.zeros((), x.dtype))  # dtype carrier


def _codes_bwd(qn, qp, res, ct):
    v, s, like_x = res
    inside = (v > qn) & (v < qp)
    gx = jnp.where(inside, ct / s, 0.0).astype(like_x.dtype)
    gs = _sum_to_shape(jnp.where(inside, -ct * v / s, 0.0), s.shape)
    return gx, gs.astype(s.dtype)


lsq_codes.defvjp(_codes_fwd, _codes_bwd)


def fake_quant(
    x: jax.Array,
    s: jax.Array,
    *,
    bits: int,
    signed: bool = True,
    num_elements: int | None = None,
) -> jax.Array:
    """LSQ fake quantization q = round(clip(x/s, Qn, Qp)) * s in FP32, with LSQ gradients.

    Args:
      x: the tensor.
      s: FP32 step size(s), broadcastable to `x` (scalar per tensor, [out] per channel).
      bits: 2..8.
      signed: signed range, or unsigned [0, 2^b - 1] for non-negative inputs.
      num_elements: N in the gradient scale 1/sqrt(N Qp); default x.size / s.size.

    Returns:
      q in FP32, the shape of `x`.
    """
    qn, qp = quant_range(bits, signed)
    n = num_elements or max(x.size // max(s.size, 1), 1)
    s = scale_grad(s, 1.0 / math.sqrt(n * qp))
    return lsq_codes(x, s, qn, qp) * s


def init_step_size(w: jax.Array, bits: int, axis: int | tuple[int, ...] | None = None):
    """LSQ init 2 mean|w| / sqrt(Qp) in FP32, reducing over `axis` (None: all elements)."""
    _, qp = quant_range(bits)
    mean_abs = jnp.mean(jnp.abs(w.astype(_F32)), axis=axis)
    return 2.0 * jnp.maximum(mean_abs, 1e-8) / math.sqrt(qp)


def init_log_step_size(w: jax.Array, bits: int, axis: int | tuple[int, ...] | None = None):
    """log of `init_step_size`: the initial value of a log-domain step size parameter."""
    return jnp.log(init_step_size(w, bits, axis))


def step_size(log_s: jax.Array) -> jax.Array:
    """s = exp(log_s): a log-domain step size parameter as the (always positive) step size."""
    return jnp.exp(log_s.astype(_F32))


def activation_step_size(bits: int, offset: float | None = None, mean: float | None = None):
    """Data-independent LSQ init 2 E|x - offset| / sqrt(Qp) for an activation.

    Without `offset`: a signed range and an input of unit RMS (E|x| = sqrt(2/pi)). With
    `offset` (a lower bound of the input, e.g. `GELU_MIN`): the unsigned range [0, 2^b - 1]
    and E|x - offset| = `mean` - offset, `mean` being the input's mean (`GELU_MEAN` for GELU
    of a unit Gaussian; 0 if not given).
    """
    if offset is None:
        return 2.0 * _UNIT_MEAN_ABS / math.sqrt(quant_range(bits)[1])
    return 2.0 * ((mean or 0.0) - offset) / math.sqrt(quant_range(bits, signed=False)[1])


def quantized_dot(
    x: jax.Array,
    w: jax.Array,
    w_log_scale: jax.Array,
    a_log_scale: jax.Array | None,
    *,
    quant: str,
    policy: Policy,
    int8: bool = False,
    a_offset: float | None = None,
) -> jax.Array:
    """x[..., K] @ w[K, N] with LSQ weights (per output channel) and activations (per tensor).

    Step sizes are exp of the log-domain params `w_log_scale` [N] and `a_log_scale` [].
    Fake-quant: codes of x and w in compute dtype (exact: |codes| <= 128), accumulated in accum
    dtype, then times s_a * s_w. `int8`: the same codes as int8 operands, int32 accumulation
    (`preferred_element_type=int32`), then times s_a * s_w; `w` may then already hold int8 codes
    (an exported model). Weight-only settings (`w8`) dot x with the weight codes in compute dtype.
    `a_offset` (a lower bound of x): x is quantized as offset + s_a * k with unsigned codes k in
    [0, 2^b - 1]; the dot runs on k - 2^(b-1) (int8) and adds (offset + 2^(b-1) s_a) s_w
    sum_K(w codes), which is the same product x_q @ w_q, in both modes alike.

    Returns:
      [..., N] in accum dtype.
    """
    w_bits, a_bits = quant_bits(quant)
    acc = policy.accum_dtype
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    wn, wp = quant_range(w_bits)
    sw = scale_grad(step_size(w_log_scale), 1.0 / math.sqrt(w.shape[0] * wp))
    kw = w if jnp.issubdtype(w.dtype, jnp.integer) else lsq_codes(w, sw, wn, wp)  # [K, N]
    if a_bits is None:
        return matmul.dot_general(x, kw, dims, policy) * sw.astype(acc)
    an, ap = quant_range(a_bits, signed=a_offset is None)
    per_example = x.size // x.shape[0] if x.ndim > 1 else x.size  # LSQ's N_F
    sa = scale_grad(step_size(a_log_scale), 1.0 / math.sqrt(per_example * ap))
    if a_offset is None:
        kx, shift = lsq_codes(x, sa, an, ap), 0  # [..., K]
    else:
        kx = lsq_codes(x.astype(_F32) - a_offset, sa, an, ap)  # [..., K] in [0, 2^b - 1]
        shift = 2 ** (a_bits - 1)
        kx = kx - shift  # signed: fits int8
    if int8:
        y = jax.lax.dot_general(
            kx.astype(jnp.int8), kw.astype(jnp.int8), dims, preferred_element_type=jnp.int32
        ).astype(acc)
    else:
        # Codes are small integers: exact in bf16/f16, and the FP32 accumulator is exact too.
        # The backward GEMMs run on compute-dtype operands as well (`bf16jax.precision.matmul`).
        y = matmul.dot_general(kx, kw, dims, policy)
    y = y * (sa * sw).astype(acc)
    if a_offset is not None:
        col = jnp.sum(kw.astype(_F32), axis=0)  # [N] exact integers
        y = y + ((a_offset + shift * sa) * sw * col).astype(acc)
    return y


# ----------------------------------------------------------------------------- FP8 (delayed)
FP8_FORWARD = jnp.float8_e4m3fn  # activations and weights: more mantissa, max 448
FP8_BACKWARD = jnp.float8_e5m2  # gradients: more range, max 57344


def fp8_qdq(x: jax.Array, scale: jax.Array, dtype=FP8_FORWARD) -> jax.Array:
    """Quantize-dequantize through an FP8 `dtype`: cast(clip(x / scale)) * scale, in FP32.

    `scale` (FP32, scalar) maps the representable range: x / scale is clipped to +-max(dtype)
    so that an amax above the history's saturates instead of becoming inf/nan.
    """
    fmax = float(jnp.finfo(dtype).max)
    y = jnp.clip(x.astype(_F32) / scale, -fmax, fmax).astype(dtype)
    return y.astype(_F32) * scale


def update_amax_history(history: jax.Array, x: jax.Array) -> jax.Array:
    """Rolls the FP32 amax history [H] by one and puts max|x| in slot 0 (newest first)."""
    amax = jnp.max(jnp.abs(x.astype(_F32)))
    return jnp.roll(history, 1).at[0].set(amax)


def scale_from_history(
    history: jax.Array, previous: jax.Array, dtype=FP8_FORWARD, margin: int = 0
) -> jax.Array:
    """Delayed scaling: scale = max(history) * 2^margin / max(dtype) (FP32 scalar).

    The scale used at step t comes from amaxes of steps < t. A zero or non-finite amax keeps
    the `previous` scale.
    """
    amax = jnp.max(history)
    scale = amax * (2.0**margin) / float(jnp.finfo(dtype).max)
    ok = (amax > 0) & jnp.isfinite(amax)
    return jnp.where(ok, scale, previous).astype(_F32)


# ----------------------------------------------------------------------------- FP8 in the layers
FP8_HISTORY_LENGTH = FP8_DEFAULTS["history"]  # steps of amax per tensor (as TE and Flax)
# Gradient dtype per `q=fp8:<format>`: "hybrid" (the default, E5M2's range for gradients, as
# Micikevicius et al. and Transformer Engine) or "e4m3" (E4M3's precision everywhere).
FP8_GRAD_DTYPES = {"hybrid": FP8_BACKWARD, "e4m3": FP8_FORWARD}


def fp8_config(quant: str) -> tuple[int, int, str]:
    """(amax history length, margin, format) of an FP8 quant setting such as "fp8:h16:m1"."""
    opts = fp8_options(quant)
    return opts["history"], opts["margin"], opts["format"]


class FP8Meta(nnx.Variable):
    """FP8 delayed-scaling state of a Linear (scales [3], amax histories [3, H]); not a param.

    Replicated (no logical axis names: a few floats), checkpointed with the train state, and
    updated by the train step from `fp8_dot`'s VJP, never by the optimizer.
    """


def fp8_meta_init(history_length: int = FP8_HISTORY_LENGTH) -> tuple[jax.Array, jax.Array]:
    """(scales [3] = 1, amax histories [3, H] = 0) in FP32 for the rows x, w, gradient."""
    return jnp.ones([3], _F32), jnp.zeros([3, history_length], _F32)


def fp8_quantize(x: jax.Array, scale: jax.Array, dtype=FP8_FORWARD) -> jax.Array:
    """cast(clip(x / scale, +-max(dtype))) as `dtype`: the FP8 codes (see `fp8_qdq`)."""
    fmax = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(_F32) / scale, -fmax, fmax).astype(dtype)


def _fp8_new_meta(scale, history, amaxes, margin, fmt):
    """Rolls each row's history, records its amax, and takes the delayed scales from it."""
    dtypes = (FP8_FORWARD, FP8_FORWARD, FP8_GRAD_DTYPES[fmt])  # rows: x, w, gradient
    rows = [update_amax_history(history[i], amaxes[i]) for i in range(3)]
    scales = [scale_from_history(rows[i], scale[i], dt, margin) for i, dt in enumerate(dtypes)]
    return jnp.stack(scales), jnp.stack(rows)


def _fp8_forward(x, w, scale, acc):
    xq = fp8_quantize(x, scale[0])  # [..., K] e4m3
    # An exported model (`to_fp8`) holds the kernel's E4M3 codes already.
    wq = w if w.dtype == FP8_FORWARD else fp8_quantize(w, scale[1])  # [K, N] e4m3
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    y = jax.lax.dot_general(xq, wq, dims, preferred_element_type=_F32)  # [..., N]
    return (y * (scale[0] * scale[1])).astype(acc), xq, wq


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fp8_dot(
    x: jax.Array,
    w: jax.Array,
    scale: jax.Array,
    history: jax.Array,
    acc=_F32,
    margin: int = 0,
    fmt: str = "hybrid",
):
    """x[..., K] @ w[K, N] on E4M3 operands with delayed per-tensor scaling; result in `acc`.

    Forward: x and w are quantized to E4M3 with `scale[0]`, `scale[1]` (from earlier steps'
    amaxes), dotted with an FP32 accumulator (an FP8 GEMM on Hopper) and rescaled. Backward:
    the cotangent is quantized to E5M2 (`fmt="hybrid"`) or E4M3 (`fmt="e4m3"`) with
    `scale[2]`; dx and dw are dots of FP8 operands
    (straight-through: the quantizer's gradient is the identity). The cotangents returned for
    `scale` and `history` are NOT derivatives: they are the new scales and histories after
    recording max|x|, max|w| and max|dy| of this step (overwrite-with-gradient).

    Args:
      x: activations, any float dtype.
      w: kernel [K, N].
      scale: FP32 [3], the scales of x, w and the gradient.
      history: FP32 [3, H], their amax histories (newest first).
      acc: the result's dtype (the policy's accum dtype).
      margin: scales are max(history) * 2^margin / max(dtype) (headroom for growing amaxes).
      fmt: "hybrid" or "e4m3", the gradient's FP8 format.
    """
    return _fp8_forward(x, w, scale, acc)[0]


def _fp8_dot_fwd(x, w, scale, history, acc, margin, fmt):
    y, xq, wq = _fp8_forward(x, w, scale, acc)
    amax_x = jnp.max(jnp.abs(x.astype(_F32)))
    amax_w = jnp.max(jnp.abs(w.astype(_F32)))
    carriers = (jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))  # dtype carriers
    return y, (xq, wq, scale, history, amax_x, amax_w, carriers)


def _fp8_dot_bwd(acc, margin, fmt, res, ct):
    xq, wq, scale, history, amax_x, amax_w, (like_x, like_w) = res
    gq = fp8_quantize(ct, scale[2], FP8_GRAD_DTYPES[fmt])  # [..., N] e5m2 (hybrid) or e4m3
    lead = tuple(range(ct.ndim - 1))
    dx = jax.lax.dot_general(gq, wq, (((ct.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=_F32)  # fmt: skip
    dw = jax.lax.dot_general(xq, gq, ((lead, lead), ((), ())), preferred_element_type=_F32)
    dx = (dx * (scale[2] * scale[1])).astype(like_x.dtype)  # [..., K]
    dw = (dw * (scale[0] * scale[2])).astype(like_w.dtype)  # [K, N]
    amax_g = jnp.max(jnp.abs(ct.astype(_F32)))
    amaxes = (amax_x, amax_w, amax_g)
    new_scale, new_history = _fp8_new_meta(scale, history, amaxes, margin, fmt)
    return dx, dw, new_scale, new_history


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)
