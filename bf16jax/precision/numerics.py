"""16-bit numerics: stochastic rounding, Kahan-compensated updates, and precision diagnostics.

- `stochastic_round(x, key)`: unbiased FP32 -> BF16 rounding done on the bit pattern (add 16
  uniform random low bits, truncate), so E[SR(x)] = x and XLA cannot optimize it away (on GPU it
  deletes `x.astype(bf16).astype(f32)` round trips inside jit). Exact BF16 values are fixed
  points; +-0, +-Inf and NaN pass through; finite inputs never round to Inf (saturate at the
  largest BF16). Croci et al. 2022 (arXiv:2207.10321) survey SR; Zamirai et al. 2020
  (arXiv:2010.06192) show pure-BF16 training with SR or Kahan matches FP32.
- `kahan_add(w, u, c)`: w + u with a compensation buffer c (Kahan 1965), kept in FP32: a 16-bit
  buffer stalls once |c| > 2^8 |u| (u is then below half an ulp of c), long before it can move w;
  the rounding of the sum is forced with `lax.reduce_precision`, for the same XLA reason.
- `split_master` / `join_master` / `split_add`: an FP32 master weight stored as two 16-bit
  halves, the BF16 param (round-to-nearest of the master, what the forward reads) and the int16
  difference of the two bit patterns. The FP32 master is rebuilt bit for bit, so w + u is the
  FP32 sum, exactly as with an FP32 master copy, at 2 + 2 bytes per param (XLA's FP32 add
  flushes subnormal operands and sums to zero, for both).
- `sum_over_leaves(fn, tree)`: one FP32 sum over a whole pytree in few reductions (the step's
  gradient norm and finiteness checks).
- Diagnostics that catch silent precision loss: update swamping (nonzero update, unchanged
  weight) per parameter group, weight decay below half an ulp, gradient zero / subnormal /
  non-finite fractions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "stochastic_round",
    "round_nearest",
    "kahan_add",
    "split_master",
    "join_master",
    "split_add",
    "leaf_keys",
    "SMALL_LEAF",
    "sum_over_leaves",
    "PARAM_KINDS",
    "PARAM_GROUPS",
    "param_kind",
    "param_group",
    "swamping_fractions",
    "decay_swamped_fraction",
    "gradient_health",
    "GRADIENT_HEALTH_KEYS",
]

_F32 = np.dtype(jnp.float32)
_BF16 = np.dtype(jnp.bfloat16)
_BF16_MAX_BITS = 0x7F7F0000  # largest finite bfloat16, as the high half of an FP32 pattern


def stochastic_round(x: jax.Array, key: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Rounds FP32 `x` to BF16 up or down with probability proportional to proximity.

    Args:
      x: an array (cast to FP32 first).
      key: a PRNG key; the same key gives the same rounding.
      dtype: the target dtype; only bfloat16 (whose values are the top 16 bits of an FP32) is
        supported, FP32 returns `x` unchanged.

    Returns:
      `x` in `dtype`: each element is one of the two BF16 neighbours of x (x itself if exact).
    """
    dtype = np.dtype(dtype)
    x = jnp.asarray(x).astype(_F32)
    if dtype == _F32:
        return x
    if dtype != _BF16:
        raise ValueError(f"stochastic_round supports bfloat16 (or float32), not {dtype}.")
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16  # uniform in [0, 2^16)
    # Adding to the magnitude bits and truncating rounds |x| up with probability equal to the
    # dropped fraction: unbiased for either sign, and subnormals are handled the same way.
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    magnitude = bits & jnp.uint32(0x7FFFFFFF)
    # A finite value must not carry into the Inf pattern: saturate at the largest BF16.
    overflow = (magnitude <= jnp.uint32(0x7F7FFFFF)) & (
        (rounded & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(_BF16_MAX_BITS)
    )
    rounded = jnp.where(overflow, (bits & jnp.uint32(0x80000000)) | _BF16_MAX_BITS, rounded)
    # NaN, Inf: keep the input (truncating a NaN payload could make it Inf).
    special = magnitude >= jnp.uint32(0x7F800000)
    out = jnp.where(special, bits, rounded)
    # The low 16 bits are zero (except NaN payloads), so the cast to bf16 is exact.
    return jax.lax.bitcast_convert_type(out, _F32).astype(dtype)


def round_nearest(x: jax.Array, dtype) -> jax.Array:
    """Round-to-nearest-even of FP32 `x` to `dtype`, forced even where XLA elides casts."""
    dtype = np.dtype(dtype)
    x = jnp.asarray(x).astype(_F32)
    if dtype == _F32:
        return x
    info = jnp.finfo(dtype)
    # why: on GPU, XLA removed a bare astype(bf16).astype(f32) round trip; reduce_precision stays.
    r = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return r.astype(dtype)


def kahan_add(w: jax.Array, u: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Compensated w + u for w stored in a 16-bit dtype: returns (new w, new compensation).

    y = u + c; s = round(w + y); c' = y - (s - w). The part of the update the stored weight
    could not take is carried in c' and added to the next update, so updates far below half an
    ulp of w still accumulate. Keep `c` in FP32 (`optim.KahanRule` does): in a 16-bit `c`,
    y = u + c rounds back to c once |c| > 2^8 |u|, and the buffer stalls below the half ulp of w
    it must reach (w = 1, u = 1e-6: c stops at ~2.6e-4 < 2^-8).
    """
    dtype = w.dtype
    w32 = w.astype(_F32)
    y = u.astype(_F32) + c.astype(_F32)
    s = round_nearest(w32 + y, dtype)
    # s - w is exact in FP32 (both 16-bit, close); the residual is what rounding dropped.
    residual = y - (s.astype(_F32) - w32)
    return s, round_nearest(residual, c.dtype)


# ----------------------------------------------------------------------------- split master
# An FP32 master m is kept as hi = BF16 round-to-nearest(m) (ties away from zero) and
# lo = bits(m) - bits(hi) as int16. Rounding moves the bit pattern by at most half a BF16 ulp,
# 0x8000 units of the low half: with ties away from zero lo is in [-0x8000, 0x7FFF], which int16
# holds exactly. Both patterns have m's sign, so the integer difference is exact (a carry into
# the exponent included) and m = bits(hi) + lo is rebuilt bit for bit.
_HALF_ULP = 0x8000
_LOW_MASK = 0xFFFF0000


def split_master(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An FP32 master `m` as (BF16 round-to-nearest of m, int16 low part); `join_master` inverts.

    Ties round away from zero (so the low part fits int16). A finite m beyond the largest BF16
    (3.39e38) becomes +-Inf in the BF16 half, as a cast would; NaN and Inf pass through.
    """
    bits = jax.lax.bitcast_convert_type(m.astype(_F32), jnp.uint32)
    hi = (bits + jnp.uint32(_HALF_ULP)) & jnp.uint32(_LOW_MASK)  # round |m| half away from zero
    magnitude = bits & jnp.uint32(0x7FFFFFFF)
    special = magnitude >= jnp.uint32(0x7F800000)
    # NaN stays NaN (its payload may live in the low half: set the quiet bit); Inf stays Inf.
    quiet = jnp.where(magnitude > jnp.uint32(0x7F800000), jnp.uint32(0x00400000), jnp.uint32(0))
    hi = jnp.where(special, (bits & jnp.uint32(_LOW_MASK)) | quiet, hi)
    lo = jnp.where(special, 0, bits.astype(jnp.int32) - hi.astype(jnp.int32)).astype(jnp.int16)
    w = jax.lax.bitcast_convert_type(hi, _F32).astype(jnp.bfloat16)  # exact: low half is zero
    return w, lo


def join_master(w: jax.Array, lo: jax.Array) -> jax.Array:
    """The FP32 master from its BF16 half `w` and int16 low part `lo` (`split_master`)."""
    hi = jax.lax.bitcast_convert_type(w.astype(_F32), jnp.uint32).astype(jnp.int32)
    return jax.lax.bitcast_convert_type((hi + lo.astype(jnp.int32)).astype(jnp.uint32), _F32)


def split_add(w: jax.Array, u: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(w, lo) + u with FP32 master arithmetic: split(join(w, lo) + u), exactly an FP32 master
    copy updated under XLA: the result is the FP32 round-to-nearest of master + u whatever the
    size of u, for normal FP32 values (|x| >= 2^-126 ~ 1.18e-38) and zeros. Subnormals are
    flushed to zero, as XLA's FP32 add flushes them on CPU (1e-40 + 1e-41 -> 0, where numpy
    gives 1.1e-40; tests/test_update_rules.py), so "bit for bit against numpy" holds for
    normal values only."""
    return split_master(join_master(w, lo) + u.astype(_F32))


def leaf_keys(key: jax.Array, tree) -> list[jax.Array]:
    """One key per leaf of `tree`, `fold_in(key, leaf_index)`: identical on every replica."""
    return [jax.random.fold_in(key, i) for i in range(len(jax.tree.leaves(tree)))]


# ----------------------------------------------------------------------------- diagnostics
# What a parameter is, from its name in the tree (bf16jax's layers name every param):
PARAM_KINDS = {
    "kernel": "kernel",  # Linear weights
    "embedding": "embedding",  # Embed tables, T5 relative position tables
    "bias": "bias",
    "scale": "norm_gain",  # LayerNorm / RMSNorm gains
    "w_log_scale": "step_size",  # LSQ step sizes (log domain), bf16jax.nn.quant
    "a_log_scale": "step_size",
}
PARAM_GROUPS = ("norm_gains", "biases", "embeddings", "matrices", "step_sizes")
_GROUP_OF_KIND = {
    "norm_gain": "norm_gains",
    "bias": "biases",
    "embedding": "embeddings",
    "step_size": "step_sizes",
}


# Leaves below this many elements (biases, norm gains) share one reduction in `sum_over_leaves`.
SMALL_LEAF = 1 << 16


def sum_over_leaves(fn, tree) -> jax.Array:
    """sum(fn(x)) over every element x of every floating leaf of `tree`, read as FP32: an FP32
    scalar (0 for a tree without floating leaves).

    Each leaf of `SMALL_LEAF` elements or more gets its own reduction, which XLA fuses into the
    pass that reads (or produces) the leaf; the small leaves are raveled and concatenated into
    one reduction: a copy of a few KB instead of a reduction per bias and norm gain. A single
    concatenation of every leaf would be one reduction, but XLA:TPU materializes it (a copy of
    the whole tree: `experiments/results/program_compare/results.md`).
    """
    leaves = [
        jnp.asarray(x).astype(_F32)
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]
    small = [jnp.ravel(x) for x in leaves if x.size < SMALL_LEAF]
    sums = [jnp.sum(fn(x)) for x in leaves if x.size >= SMALL_LEAF]
    if small:
        sums.append(jnp.sum(fn(jnp.concatenate(small))))
    total = jnp.zeros([], _F32)
    for part in sums:
        total = total + part
    return total


def _leaf_name(path: tuple) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    names = [n for n in names if n != "value"]
    return names[-1] if names else ""


def param_kind(path: tuple) -> str:
    """The kind of a parameter from its tree path: one of `PARAM_KINDS`' values, or "other"
    for a name bf16jax's layers do not use. By name, not shape: scanned layers stack a norm
    gain into [layers, features] and a step size into [layers, out]."""
    return PARAM_KINDS.get(_leaf_name(path), "other")


def param_group(path: tuple) -> str:
    """The diagnostic group of a parameter from its tree path (names, not values)."""
    return _GROUP_OF_KIND.get(param_kind(path), "matrices")


def swamping_fractions(old_params, new_params, updates) -> dict[str, jax.Array]:
    """Per group: fraction of elements whose update was nonzero but whose stored value did not
    change (the update was swamped by rounding), among elements with a nonzero update.

    Returns FP32 scalars `swamped/<group>` (0 when a group had no nonzero update) and
    `swamped/all`.
    """
    flat_old = jax.tree_util.tree_flatten_with_path(old_params)[0]
    new_leaves = jax.tree.leaves(new_params)
    upd_leaves = jax.tree.leaves(updates)
    counts = {g: [jnp.zeros([], _F32), jnp.zeros([], _F32)] for g in PARAM_GROUPS}
    for (path, w), w_new, u in zip(flat_old, new_leaves, upd_leaves, strict=True):
        moved = u != 0
        stuck = moved & (w_new == w)
        c = counts[param_group(path)]
        c[0] = c[0] + jnp.sum(stuck, dtype=_F32)
        c[1] = c[1] + jnp.sum(moved, dtype=_F32)
    out = {f"swamped/{g}": s / jnp.maximum(n, 1.0) for g, (s, n) in counts.items()}
    total_s = sum(s for s, _ in counts.values())
    total_n = sum(n for _, n in counts.values())
    out["swamped/all"] = total_s / jnp.maximum(total_n, 1.0)
    return out


def decay_swamped_fraction(params, decay_step: jax.Array, mask) -> jax.Array:
    """Among weight-decayed elements, the fraction whose decay alone would leave the stored
    value unchanged under round-to-nearest: round(w - decay_step * w) == w, w != 0.

    Decoupled weight decay shrinks w by lr * wd * w per step, a *relative* change; in BF16 it
    is lost whenever lr * wd < 2^-9 (half an ulp is 2^-9..2^-8 of |w|): at lr 1e-3, wd 0.1 the
    weights never decay. Under SR / Kahan / split the decay is carried, not lost; FP32 params
    read ~0. Returns an FP32 scalar (0 with nothing decayed).
    """
    stuck = total = jnp.zeros([], _F32)
    for w, decayed in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        if not decayed:
            continue
        w32 = w.astype(_F32)
        shrunk = round_nearest(w32 - decay_step.astype(_F32) * w32, w.dtype).astype(_F32)
        nonzero = w32 != 0
        stuck = stuck + jnp.sum(nonzero & (shrunk == w32), dtype=_F32)
        total = total + jnp.sum(nonzero, dtype=_F32)
    return stuck / jnp.maximum(total, 1.0)


GRADIENT_HEALTH_KEYS = ("grad/zero", "grad/subnormal", "grad/nonfinite")


def gradient_health(grads, compute_dtype) -> dict[str, jax.Array]:
    """Fractions of gradient entries that are exactly zero, subnormal in `compute_dtype` (nonzero
    but below its smallest normal: flushed or imprecise there), and non-finite.

    Pass the gradients as the backward pass produced them, *before* loss-scale unscaling
    (`bf16jax.training.trainer` does): a param used in `compute_dtype` gets its gradient as a
    16-bit value
    of the scaled loss, which is what can underflow; unscaled FP32 values misreport it by the
    loss scale."""
    tiny = float(jnp.finfo(compute_dtype).tiny)
    zero = sub = bad = total = jnp.zeros([], _F32)
    for g in jax.tree.leaves(grads):
        g = g.astype(_F32)
        a = jnp.abs(g)
        zero = zero + jnp.sum(g == 0, dtype=_F32)
        sub = sub + jnp.sum((a > 0) & (a < tiny), dtype=_F32)
        bad = bad + jnp.sum(~jnp.isfinite(g), dtype=_F32)
        total = total + jnp.float32(g.size)
    total = jnp.maximum(total, 1.0)
    return {"grad/zero": zero / total, "grad/subnormal": sub / total, "grad/nonfinite": bad / total}
