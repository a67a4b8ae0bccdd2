"""Attention, chosen per backend: one entry point over bf16jax's XLA path and fused kernels.

`attention(q, k, v, policy, ...)` computes softmax(q k^T * scale + bias, masked) v over
[B, T, H, Dh] inputs (scale 1/sqrt(Dh) by default; T5 passes 1.0) with one of these
implementations (`model.attention_impl`):

- "xla": bf16jax's own XLA path. Logits, bias and softmax in accum dtype (FP32 island), the
  probabilities cast to the compute dtype for the PV matmul; both einsums go through
  `bf16jax.precision.matmul` (16-bit operands forward and backward, FP32 accumulation). Masks
  (causal
  included) are applied to the full [B, H, T, S] score matrix: nothing is skipped. Runs
  everywhere.
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`
  (GPU, 16-bit compute only): FP32 softmax on chip, `is_causal` skips the masked half, boolean
  masks and bias supported (cuDNN takes the bias in the compute dtype).
- "pallas": Pallas TPU kernels from `jax.experimental.pallas.ops.tpu`. Without a bias: splash
  attention (causal = block-sparse `CausalMask`, so blocks above the diagonal are never computed;
  key-padding masks as segment ids). With a bias (T5's relative positions): the Pallas flash
  attention kernel, which adds the FP32 bias inside (`ab`) and also skips causal blocks. Both
  keep the running max / sum in FP32. Run under `shard_map` over the batch (and head) mesh axes.
- "auto" (the default): cuDNN on a GPU when compute is 16-bit, Pallas on a TPU (bf16/fp32
  compute), XLA otherwise. A call the chosen kernel cannot take (T5's bias on a GPU, where cuDNN
  would round it to 16 bits; a general [B, H, T, S] mask; lengths that are not multiples of 128
  on a TPU; attention-probability dropout, which only the XLA path has) falls back to the XLA
  path, with a warning naming the reason.

Segment ids (packed rows: several documents per row, `segment_ids` [B, T] for the queries and
`kv_segment_ids` [B, S] for the keys, 0 = padding) restrict attention to keys of the query's own
segment, on top of the causal / boolean masks: the XLA path ANDs them into its mask, splash and
flash take them as their `SegmentIds`; cuDNN falls back to the XLA path (jax's
`dot_product_attention` takes no segment ids). Padding (id 0) attends to padding; a query with
no key left (cross-attention from decoder padding to a row without encoder padding) gets a
finite output that the loss weighs 0.

Forcing "cudnn" or "pallas" where they cannot run is an error when the model is built
(`resolve_implementation`), and a call the forced kernel cannot take is an error when the step
is traced (compile time), never a failure mid-training.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from bf16jax.nn.dropout import dropout
from bf16jax.parallel.sharding import BATCH_AXES
from bf16jax.precision import Policy, matmul

__all__ = [
    "IMPLEMENTATIONS",
    "KERNELS",
    "normalize_implementation",
    "resolve_implementation",
    "attention",
    "xla_attention",
    "segment_mask",
    "pallas_interpret",
    "pallas_block",
]

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
KERNELS = ("xla", "cudnn", "pallas")  # what "auto" resolves to
_16BIT = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
_PALLAS_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))
_LANES = 128  # TPU vector lanes: Pallas TPU attention blocks are multiples of this
_BLOCKS = (512, 256, 128)  # splash / flash tile sizes, largest that divides the length

log = logging.getLogger(__name__)


_interpret = contextvars.ContextVar("bf16jax_pallas_interpret", default=False)


@contextlib.contextmanager
def pallas_interpret():
    """Traces the splash attention kernels in Pallas's interpret mode (runs on CPU): for tests.

    The flash kernel (calls with a bias) takes no interpret flag, and its backward is traced
    outside this call: trace the whole gradient under
    `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` for it instead (that TPU
    simulator cannot run splash's backward kernels in jax 0.10.2, hence two switches).
    """
    token = _interpret.set(True)
    try:
        yield
    finally:
        _interpret.reset(token)


def normalize_implementation(implementation: str | None) -> str:
    """ "auto" for None / ""; the name itself if known; else ValueError naming the choices."""
    if implementation in (None, ""):
        return "auto"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}: use one of "
            f"{', '.join(map(repr, IMPLEMENTATIONS))}."
        )
    return implementation


def resolve_implementation(
    implementation: str | None, *, compute_dtype, platform: str | None = None
) -> tuple[str, bool]:
    """The kernel an `Attention` layer will use on `platform` with this compute dtype.

    Args:
      implementation: "auto" (or None / ""), "xla", "cudnn" or "pallas".
      compute_dtype: the layer's compute dtype (q, k, v dtype).
      platform: "cpu", "gpu" or "tpu": where the step will run (the mesh's devices); defaults
        to `jax.default_backend()`.

    Returns:
      (kernel, fallback): the kernel ("xla", "cudnn" or "pallas") and whether "auto" chose it
      (then calls the kernel cannot take use the XLA path instead of raising).

    Raises:
      ValueError: an unknown name, or a forced kernel that cannot run on `platform` / in
        `compute_dtype` (cuDNN needs a GPU and bf16/fp16; Pallas TPU kernels need a TPU).
    """
    impl = normalize_implementation(implementation)
    platform = platform or jax.default_backend()
    dtype = np.dtype(compute_dtype)
    if impl == "auto":
        if platform == "gpu" and dtype in _16BIT:
            return "cudnn", True
        if platform == "tpu" and dtype in _PALLAS_DTYPES:
            return "pallas", True
        return "xla", True
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a GPU, but this run's devices are {platform!r}: use "
            "attention_impl='auto' (picks the backend's best) or 'xla'."
        )
    if impl == "cudnn" and dtype not in _16BIT:
        raise ValueError(
            f"attention_impl='cudnn' needs bf16/fp16 compute, but this layer computes in "
            f"{dtype.name}: use attention_impl='auto' or 'xla', or a 16-bit policy."
        )
    if impl == "pallas" and platform != "tpu":
        raise ValueError(
            f"attention_impl='pallas' runs the Pallas TPU kernels, but this run's devices are "
            f"{platform!r}: use attention_impl='auto' (picks the backend's best) or 'xla'."
        )
    if impl == "pallas" and dtype not in _PALLAS_DTYPES:
        raise ValueError(
            f"attention_impl='pallas' takes bf16 or fp32 compute, not {dtype.name}: use "
            "attention_impl='auto' or 'xla'."
        )
    return impl, False


# ----------------------------------------------------------------------------- XLA path
def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    policy: Policy,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = False,
    return_logit_max: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """bf16jax's XLA attention: FP32 logits + softmax over the full [B, H, T, S] scores.

    (JAX's own `jax.nn.dot_product_attention(implementation="xla")` also computes its logits in
    FP32 in jax 0.10; this path additionally adds the bias in FP32 and reports max |logit|.)
    `dropout_rate` drops attention probabilities when `dropout_key` is given; segment ids (see
    `attention`) are ANDed into the mask.
    """
    segments = _segment_ids(q, k, segment_ids, kv_segment_ids)
    q, k, v = policy.cast_to_compute((q, k, v))
    acc = policy.accum_dtype
    logits = _scores(q, k, policy, bias, scale)
    logit_max = jnp.max(jnp.abs(logits)) if return_logit_max else None
    t, s = logits.shape[-2:]
    if causal:
        keep = jnp.tril(jnp.ones((t, s), jnp.bool_), k=s - t)
        mask = keep if mask is None else jnp.logical_and(mask, keep)
    if segments is not None:
        same = segment_mask(*segments)
        mask = same if mask is None else jnp.logical_and(mask, same)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(jnp.finfo(acc).min, acc))
    probs = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, dropout_key)
    out = matmul.einsum("bhts,bshd->bthd", policy.cast_to_compute(probs), v, policy)
    out = policy.cast_to_compute(out)
    return (out, logit_max) if return_logit_max else out


def segment_mask(segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, S] boolean, True where query t and key s carry the same segment id."""
    return segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


def _segment_ids(q, k, segment_ids, kv_segment_ids) -> tuple[jax.Array, jax.Array] | None:
    """(query ids [B, T], key ids [B, S]) as int32, or None; ValueError for bad shapes."""
    if segment_ids is None:
        if kv_segment_ids is not None:
            raise ValueError(
                "attention got kv_segment_ids without segment_ids: pass the queries' segment ids "
                "too (for self-attention, segment_ids alone)."
            )
        return None
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    for name, ids, x in (("segment_ids", segment_ids, q), ("kv_segment_ids", kv_segment_ids, k)):
        if tuple(ids.shape) != tuple(x.shape[:2]) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"attention {name} must be integers of shape {tuple(x.shape[:2])} (batch, "
                f"length), got {ids.dtype} {tuple(ids.shape)}: pass one id per token "
                "(kv_segment_ids for cross-attention keys)."
            )
    return segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)


def _scale(q, scale: float | None) -> float:
    """The logit scale: 1/sqrt(head_dim) unless given (T5: 1.0)."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _scores(q, k, policy: Policy, bias, scale: float | None = None):
    # why: logits and softmax are an FP32 island; exp() of BF16 logits loses the small ones.
    acc = policy.accum_dtype
    scale = jnp.asarray(_scale(q, scale), acc)
    logits = matmul.einsum("bthd,bshd->bhts", q, k, policy) * scale
    return logits if bias is None else logits + policy.cast_to_accum(bias)


# ----------------------------------------------------------------------------- dispatch
class _Unsupported(Exception):
    """A call the chosen kernel cannot take (the message says why)."""


_WARNED: set[tuple[str, str]] = set()


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    policy: Policy,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = False,
    implementation: str | None = "auto",
    fallback: bool | None = None,
    return_logit_max: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    heads_first: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """softmax(q k^T * scale + bias, masked) v over [B, T, H, Dh] inputs -> [B, T, H, Dh].

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, H, Dh]. Cast to the policy's compute dtype.
      policy: the layer's policy (compute dtype for q, k, v and the output; accum dtype for
        logits and softmax on the XLA path).
      bias: additive, broadcastable to [B, H, T, S] (e.g. T5 relative positions [1, H, T, S]).
      mask: boolean, broadcastable to [B, H, T, S], True = attend.
      causal: query t attends keys s <= t + (S - T).
      implementation: "xla", "cudnn" or "pallas" (a kernel, as `resolve_implementation`
        returns), or "auto" / None: resolved here for `jax.default_backend()`.
      fallback: a call the kernel cannot take uses the XLA path (True) or raises ValueError
        (False). Default: True for "auto", False for a kernel named here.
      return_logit_max: also return max |logit| (scaled, biased, before masking) in accum
        dtype; fused kernels never form the logits, so it is recomputed with XLA (diagnostics).
      scale: the logit scale; default 1/sqrt(Dh) (GPT-2, ViT); T5 passes 1.0 (it folds the
        factor into q's initialisation).
      dropout_rate, dropout_key: attention-probability dropout, active when a key is given
        (training); only the XLA path has it.
      segment_ids: int [B, T], the queries' segment (document) ids in a packed row; query t
        attends only keys of its own segment (ANDed with `mask` and `causal`). 0 marks
        padding, which attends to padding (finite outputs, weight 0 in the loss).
      kv_segment_ids: int [B, S], the keys' segment ids (cross-attention); defaults to
        `segment_ids` (self-attention).
      heads_first: q, k, v and the output are [B, H, T, Dh] instead: the Pallas kernels'
        layout, so that a layer producing it pays no layout copy around them (every other
        path swaps to [B, T, H, Dh] and back).

    Returns:
      The output in compute dtype (and the logit max).
    """
    if normalize_implementation(implementation) == "auto":
        implementation, auto = resolve_implementation(None, compute_dtype=policy.compute_dtype)
        fallback = auto if fallback is None else fallback
    fallback = bool(fallback)
    if heads_first:
        return _heads_first(q, k, v, policy, implementation, fallback, bias=bias, mask=mask,
                            causal=causal, return_logit_max=return_logit_max, scale=scale,
                            dropout_rate=dropout_rate, dropout_key=dropout_key,
                            segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)  # fmt: skip
    segments = _segment_ids(q, k, segment_ids, kv_segment_ids)
    xla = functools.partial(
        xla_attention,
        bias=bias,
        mask=mask,
        causal=causal,
        return_logit_max=return_logit_max,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_key=dropout_key,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    if implementation == "xla":
        return xla(q, k, v, policy)
    q, k, v = policy.cast_to_compute((q, k, v))
    kernel = _cudnn if implementation == "cudnn" else _pallas
    try:
        if dropout_key is not None and dropout_rate > 0.0:
            raise _Unsupported(
                "it has no attention-probability dropout (set model.attention_dropout_rate=0)"
            )
        out = kernel(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            causal=causal,
            scale=_scale(q, scale),
            auto=fallback,
            segments=segments,
        )
    except _Unsupported as e:
        if not fallback:
            raise ValueError(
                f"attention_impl={implementation!r} cannot run this attention call: {e} "
                "Use attention_impl='auto' (falls back to XLA for such calls) or 'xla'."
            ) from None
        if (implementation, str(e)) not in _WARNED:  # once per reason, not once per layer
            _WARNED.add((implementation, str(e)))
            log.warning(
                "attention: %s kernel not used (%s); using the XLA path.", implementation, e
            )
        return xla(q, k, v, policy)
    out = policy.cast_to_compute(out)
    if return_logit_max:  # diagnostics only: the kernel kept the scores on chip
        return out, jnp.max(jnp.abs(_scores(q, k, policy, bias, scale)))
    return out


# ----------------------------------------------------------------------------- heads first
def _heads_first(q, k, v, policy, implementation, fallback, **kw):
    """`attention` on [B, H, T, Dh]: the Pallas kernels run on it as it is; any other path
    (or a call the kernels cannot take) swaps to [B, T, H, Dh] and back."""

    def swap(x):
        return jnp.swapaxes(x, 1, 2)

    def token_major():
        out = attention(*map(swap, (q, k, v)), policy, implementation=implementation,
                        fallback=fallback, **kw)  # fmt: skip
        return (swap(out[0]), out[1]) if kw["return_logit_max"] else swap(out)

    dropout = kw["dropout_key"] is not None and kw["dropout_rate"] > 0.0
    if implementation != "pallas" or dropout or kw["return_logit_max"]:
        return token_major()
    segments = _segment_ids(swap(q), swap(k), kw["segment_ids"], kw["kv_segment_ids"])
    try:
        out = _pallas(*policy.cast_to_compute((q, k, v)), bias=kw["bias"], mask=kw["mask"],
                      causal=kw["causal"], scale=_scale(q, kw["scale"]), auto=fallback,
                      segments=segments, heads_first=True)  # fmt: skip
    except _Unsupported:
        return token_major()  # which warns (or raises) as the [B, T, H, Dh] call does
    return policy.cast_to_compute(out)


# ----------------------------------------------------------------------------- cuDNN
def _cudnn(q, k, v, *, bias, mask, causal, scale, auto, segments):
    if segments is not None:
        # jax 0.10's dot_product_attention has no segment ids; its query_seq_lengths /
        # key_value_seq_lengths are one trailing-padding length per row, not several documents.
        raise _Unsupported(
            "jax.nn.dot_product_attention(implementation='cudnn') takes no segment ids (its "
            "seq_lengths are one padding length per row)"
        )
    if bias is not None and auto:
        # cuDNN takes the bias in the compute dtype (and adds the mask to it): T5's FP32
        # relative-position bias would be rounded to 16 bits.
        raise _Unsupported("it would round the additive bias to 16 bits")
    if q.shape[1] != k.shape[1] and causal:
        raise _Unsupported("causal attention with T != S")
    if mask is not None:
        # jax turns the mask into a bias whose last two dims must be (T, S) exactly (its
        # check_layout): a key-padding mask [B, 1, 1, S] is broadcast over the queries.
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], q.shape[1], k.shape[1]))
    try:
        # Inputs are all in the compute dtype; the standard promotion only guards JAX's own
        # internals under a strict-promotion setting (the tests'), as for the flash kernel.
        with jax.numpy_dtype_promotion("standard"):
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                bias=None if bias is None else bias.astype(q.dtype),
                mask=mask,
                is_causal=causal,
                scale=scale,
                implementation="cudnn",
            )
    except (NotImplementedError, RuntimeError, ValueError) as e:  # what cuDNN rejects
        raise _Unsupported(f"cuDNN refused it ({e})") from e


# ----------------------------------------------------------------------------- Pallas (TPU)
def pallas_block(length: int) -> int | None:
    """The Pallas TPU attention tile for a sequence of `length`: the largest of 512, 256, 128
    that divides it, or None when none does (the kernels then cannot take it)."""
    return next((b for b in _BLOCKS if length % b == 0), None)


def _key_padding(mask, batch: int, kv_len: int):
    """A [B|1, 1, 1, S] boolean mask as int32 segment ids [B, S] (1 = attend, 0 = padding)."""
    if mask is None:
        return None
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise _Unsupported(
            f"the mask of shape {tuple(mask.shape)} is not a key-padding mask [B, 1, 1, S]"
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len)).astype(jnp.int32)


def _pallas(q, k, v, *, bias, mask, causal, scale, auto, segments, heads_first=False):
    del auto
    seq = 2 if heads_first else 1
    b, t, s = q.shape[0], q.shape[seq], k.shape[seq]
    if np.dtype(q.dtype) not in _PALLAS_DTYPES:
        raise _Unsupported(f"dtype {q.dtype} (the kernels take bf16 or fp32)")
    if pallas_block(t) is None or pallas_block(s) is None:
        raise _Unsupported(f"lengths T={t}, S={s} are not multiples of {_LANES}")
    if causal and t != s:
        raise _Unsupported("causal attention with T != S")
    q_ids, kv_ids = _kernel_segment_ids(_key_padding(mask, b, s), segments)
    if bias is not None and (bias.ndim != 4 or bias.shape[-2:] != (t, s)):
        raise _Unsupported(f"the bias of shape {tuple(bias.shape)} is not [B|1, H|1, T, S]")
    # Kernels take [B, H, T, Dh].
    if not heads_first:
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    if bias is None:
        local = functools.partial(
            _splash_local, causal=causal, scale=scale, interpret=_interpret.get()
        )
    else:
        local = functools.partial(_flash_local, causal=causal, scale=scale)
    extra = tuple(x for x in (q_ids, kv_ids, bias) if x is not None)

    def fn(q, k, v, *extra):  # shard_map takes arrays only: None args are re-inserted here
        rest = iter(extra)
        ids = [next(rest) if x is not None else None for x in (q_ids, kv_ids)]
        return local(q, k, v, *ids, *rest)

    out = _over_mesh(fn, (q, k, v, *extra))
    return out if heads_first else jnp.swapaxes(out, 1, 2)


def _kernel_segment_ids(keep, segments):
    """(q ids [B, T] or None, kv ids [B, S] or None), int32, for the kernels' `SegmentIds`.

    A key-padding mask alone is kv = keep (1 / 0), q = None (all 1, made per device); with
    segment ids, a masked-out key gets id -1, which no query carries.
    """
    if segments is None:
        return None, keep
    q_ids, kv_ids = segments
    return q_ids, (kv_ids if keep is None else jnp.where(keep == 1, kv_ids, -1))


def _local_q_ids(q_ids, batch: int, q_len: int):
    """The queries' ids on one device's shard: all 1 for a key-padding mask alone."""
    return jnp.ones((batch, q_len), jnp.int32) if q_ids is None else q_ids


def _splash_local(q, k, v, q_ids, kv_ids, *, causal: bool, scale: float, interpret: bool):
    """Splash attention on one device's shard: q [b, h, T, Dh], k/v [b, h, S, Dh]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    h, t, s = q.shape[1], q.shape[2], k.shape[2]
    one = masks.CausalMask((t, s)) if causal else masks.FullMask((t, s))
    bq, bkv = pallas_block(t), pallas_block(s)
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([one] * h),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    # Splash does not scale the logits: scale q (exact for Dh = 4^n, e.g. 64, and T5's 1.0;
    # otherwise one rounding of q in the compute dtype). The logits and softmax inside are FP32.
    if scale != 1.0:
        q = (q.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
    if kv_ids is None:
        return jax.vmap(kernel)(q, k, v)
    ids = splash.SegmentIds(q=_local_q_ids(q_ids, q.shape[0], t), kv=kv_ids)
    return jax.vmap(kernel)(q, k, v, ids)


def _flash_local(q, k, v, q_ids, kv_ids, bias, *, causal: bool, scale: float):
    """Pallas flash attention with an additive FP32 bias on one device's shard."""
    from jax.experimental.pallas.ops.tpu import flash_attention as flash

    b, h, t, _ = q.shape
    s = k.shape[2]
    # flash computes (q k^T + ab) * sm_scale: pass bias / scale (FP32) so the result is
    # q k^T * scale + bias without rounding q.
    ab = jnp.broadcast_to(bias.astype(jnp.float32) / jnp.float32(scale), (b, h, t, s))
    bq, bk = pallas_block(t), pallas_block(s)
    blocks = flash.BlockSizes(
        block_q=bq,
        block_k_major=bk,
        block_k=bk,
        block_b=1,
        block_q_major_dkv=bq,
        block_k_major_dkv=bk,
        block_k_dkv=bk,
        block_q_dkv=bq,
        block_k_major_dq=bk,
        block_k_dq=bk,
        block_q_dq=bq,
    )
    ids = None
    if kv_ids is not None:
        ids = flash.SegmentIds(q=_local_q_ids(q_ids, b, t), kv=kv_ids)
    # The kernel's cost estimate traces its reference, which adds the FP32 `ab` to 16-bit
    # logits by implicit promotion: allow it under strict promotion (the tests' setting).
    with jax.numpy_dtype_promotion("standard"):
        return flash.flash_attention(
            q, k, v, ab, ids, causal=causal, sm_scale=scale, block_sizes=blocks
        )


def _over_mesh(fn: Callable, args: tuple):
    """Runs `fn` per device under `shard_map` when a bf16jax mesh is set (batch over the
    ("data", "fsdp") axes, heads over "tensor" when they divide); else calls it directly.

    A Pallas call is opaque to the SPMD partitioner, which would otherwise gather its inputs.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return fn(*args)
    q = args[0]  # [B, H, T, Dh]
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    batch = BATCH_AXES if q.shape[0] % shards == 0 else None
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[1] % tensor == 0 else None
    if batch is None and heads is None:
        return fn(*args)

    def spec(x):
        if x.ndim == 2:  # segment ids [B, T] / [B, S]
            return P(batch, None)
        return P(batch if x.shape[0] > 1 else None, heads if x.shape[1] > 1 else None)

    return jax.shard_map(
        fn,
        in_specs=tuple(spec(x) for x in args),
        out_specs=P(batch, heads),
        check_vma=False,
    )(*args)
