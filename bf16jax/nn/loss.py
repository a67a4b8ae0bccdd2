"""The training loss: weighted softmax cross-entropy with optional z-loss, always in FP32.

Invariant: logits are promoted to FP32 before log-softmax, whatever the policy (an FP32 island:
log Z of a 50k-way softmax in BF16 is off by up to 2^-8 * |log Z|, which is larger than the
loss differences training chases). z-loss adds `z_loss * log(Z)^2` per token (PaLM,
arXiv:2204.02311), which keeps log Z near 0 and BF16 logits well-conditioned.

Masked targets (`target_mask`, shared by every loss and metric that gathers a target's logit):
a position with weight 0 contributes exactly 0 whatever its label (-100, the usual "ignore"
label, or any id outside [0, V)), never NaN; a label outside [0, V) with a positive weight is an
error: eagerly a ValueError, under jit a NaN loss *and* NaN gradients (so the train step is
skipped, not trained on a wrapped label: -1 is not V - 1) plus the count `invalid_targets`,
which the training loop turns into an error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bf16jax.parallel import sharding
from bf16jax.parallel.sharding import constrain_batch
from bf16jax.precision import Policy, matmul

__all__ = [
    "cross_entropy",
    "target_mask",
    "check_targets",
    "fused_cross_entropy",
    "head_logits",
    "fusable",
    "DEFAULT_CHUNK_TOKENS",
    "chunk_layout",
    "one_pass_reduction",
    "LossOptions",
    "loss_options",
    "model_loss",
    "materialize",
]

_F32 = jnp.float32


def target_mask(
    targets: jax.Array, weights: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(safe int32 targets, FP32 weights, bool `invalid`) for gathering target logits.

    `safe` holds 0 where a label is outside [0, num_classes), so a gather never reads out of
    bounds (JAX returns NaN there, and wraps -1 to the last class). `invalid` marks the
    out-of-range labels with a positive weight: errors, not padding.
    """
    targets = targets.astype(jnp.int32)
    in_range = (targets >= 0) & (targets < num_classes)
    weights = weights.astype(jnp.float32)
    return jnp.where(in_range, targets, 0), weights, (~in_range) & (weights > 0)


def check_targets(targets, weights, num_classes: int) -> None:
    """Raises ValueError for labels outside [0, num_classes) with a positive weight.

    Only for concrete (non-traced) arrays; under jit `cross_entropy` flags them instead.
    """
    t = np.asarray(targets)
    w = np.ones(t.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
    bad = ((t < 0) | (t >= num_classes)) & (w > 0)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} target(s) outside [0, {num_classes}) have a positive weight "
            f"(e.g. {sorted(set(t[bad].tolist()))[:5]}): labels must be class ids; give ignored "
            "positions weight 0 (e.g. label -100 with weight 0)."
        )


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy of integer `targets` under `logits`.

    Args:
      logits: [..., V] scores (any float dtype; computed in FP32).
      targets: [...] integer class ids in [0, V); any value where the weight is 0 (e.g. -100).
      weights: [...] non-negative per-position weights (e.g. 0 for padding); ones if None.
        Only their ratios matter: the loss is sum(w * nll) / sum(w), or 0 if all are 0.
      z_loss: coefficient of the log(Z)^2 auxiliary loss (0 disables it).

    Returns:
      (loss, aux): `loss` is the FP32 scalar to differentiate (mean NLL + z-loss over the
      weighted positions); `aux` holds FP32 scalars `nll`, `z_loss`, `accuracy`, `log_z` (mean
      |log Z|), `weight_sum` and `invalid_targets` (labels outside [0, V) with positive weight;
      if any, the loss and its gradients are NaN).

    Raises:
      ValueError: shapes or dtypes that do not fit; out-of-range labels with a positive weight
        when the inputs are concrete (not traced).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match: "
            "logits must be targets.shape + (num_classes,)."
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}.")
    num_classes = logits.shape[-1]
    if not _is_traced(targets, weights):
        check_targets(targets, weights, num_classes)
    # why: FP32 island; log-softmax and its gradient in low precision bias the loss.
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    safe, weights, invalid = target_mask(targets, weights, num_classes)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
    target_logit = jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
    # An invalid label poisons the loss and, through log Z, its gradient: the step is skipped.
    poison = jnp.where(invalid, jnp.nan, 0.0)
    nll = jnp.where(weights > 0, log_z - target_logit, 0.0) + poison * log_z
    weight_sum = jnp.sum(weights)
    # A true weighted mean for any positive total (fractional weights too); 0 if all weights are 0.
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
    mean_nll = jnp.sum(nll * weights) / denom
    mean_z = jnp.sum(jnp.square(log_z) * weights) / denom
    loss = mean_nll + jnp.float32(z_loss) * mean_z if z_loss else mean_nll
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    aux = {
        "nll": mean_nll,
        "z_loss": mean_z,
        "accuracy": jnp.sum(correct * weights) / denom,
        "log_z": jnp.sum(jnp.abs(log_z) * weights) / denom,
        "weight_sum": weight_sum,
        "invalid_targets": jnp.sum(invalid, dtype=jnp.float32),
    }
    return loss, aux


# ----------------------------------------------------------------------------- fused head + loss
DEFAULT_CHUNK_TOKENS = 1024  # tokens per device per chunk: [1024, V] FP32 logits live at once
# Model families with a token axis and a vocabulary: where the fused loss pays ("auto").
_FUSED_BY_DEFAULT = ("gpt", "t5")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """How the train step computes its loss (static; `loss_options` reads it from a config).

    Attributes:
      z_loss: coefficient of the log(Z)^2 auxiliary loss.
      fused: `fused_cross_entropy` on the model's `head_and_targets` (no [B, T, V] logits)
        instead of `cross_entropy` on its `logits_and_targets`.
      chunk_tokens: tokens per device per chunk of the fused loss.
    """

    z_loss: float = 0.0
    fused: bool = False
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS


def loss_options(config, head) -> LossOptions:
    """`config.train.loss_impl` resolved for a model whose output head is `head`: "auto" fuses
    GPT and T5 when `fusable(head)`; "fused" with a head that is not raises ValueError."""
    impl = config.train.get("loss_impl", "auto")
    why_not = fusable(head)
    if impl == "fused" and why_not is not None:
        raise ValueError(
            f"config.train.loss_impl='fused': {why_not}. Use loss_impl='materialized' (or "
            "'auto', which picks it for such heads)."
        )
    fused = impl == "fused" or (
        impl == "auto" and why_not is None and config.model.name in _FUSED_BY_DEFAULT
    )
    chunk = int(config.train.get("loss_chunk_tokens", DEFAULT_CHUNK_TOKENS))
    return LossOptions(z_loss=float(config.train.z_loss), fused=fused, chunk_tokens=chunk)


def model_loss(model, batch: dict, options: LossOptions, *, grad_scale=None, dropout_key=None):
    """(loss, aux) of a bf16jax model on `batch`, fused or materialised as `options` say.

    `grad_scale` is the loss scale the caller multiplies the loss by (see
    `fused_cross_entropy`); `dropout_key` turns the model's dropout on.
    """
    if not options.fused:
        logits, targets, weights = model.logits_and_targets(batch, dropout_key=dropout_key)
        return cross_entropy(logits, targets, weights, z_loss=options.z_loss)
    hidden, head, targets, weights = model.head_and_targets(batch, dropout_key=dropout_key)
    return fused_cross_entropy(
        hidden, head, targets, weights, z_loss=options.z_loss, grad_scale=grad_scale,
        chunk_tokens=options.chunk_tokens,
    )  # fmt: skip


def materialize(hidden, head, targets, weights) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A model's `head_and_targets` made `logits_and_targets`: the logits materialised (accum
    dtype, pinned to the batch sharding), targets and weights as they are."""
    return constrain_batch(head_logits(hidden, head)), targets, weights


def head_logits(hidden: jax.Array, head) -> jax.Array:
    """The materialised logits of `head` (a tied `layers.Embed` or a `layers.Linear`) in accum
    dtype: what `fused_cross_entropy` computes chunk by chunk without keeping."""
    from bf16jax.nn.layers import Embed

    return head.attend(hidden) if isinstance(head, Embed) else head.logits(hidden)


def fusable(head) -> str | None:
    """None if `fused_cross_entropy` can take `head`; else why not (a quantized head)."""
    from bf16jax.nn.layers import Embed, Linear

    if isinstance(head, Embed):
        return None
    if not isinstance(head, Linear):
        return f"the head is a {type(head).__name__}, not a layers.Linear or layers.Embed"
    if head.quant != "none" or head.int8:
        return f"the head is quantized (q={head.quant}): its logits come from quantized codes"
    return None


def fused_cross_entropy(
    hidden: jax.Array,
    head,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
    grad_scale: jax.Array | float | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`cross_entropy(head_logits(hidden, head), targets, weights)` without the [..., V] logits.

    The head GEMM runs chunk by chunk over the token axis (`lax.scan`): per chunk, logits in
    FP32 from compute-dtype operands, logsumexp, NLL, z-loss, accuracy and, when differentiated,
    the logits' gradient, consumed at once by the two backward GEMMs (compute-dtype operands,
    FP32 accumulation; dW accumulated over chunks in FP32). Only [chunk, V] values are ever
    alive, never [B, T, V] logits or their gradient. The gradients are computed in the forward
    pass (as Liger-Kernel's fused linear cross-entropy does: one V-wide GEMM fewer than
    recomputing the logits in the backward pass) and rescaled there by the real cotangent.

    Args:
      hidden: [..., D] the head's input (compute dtype), e.g. [B, T, D]; T5's tied head takes
        the rescaled decoder output.
      head: a tied `layers.Embed` (logits = hidden @ embedding.T) or an unquantized
        `layers.Linear` (hidden @ kernel + bias); its policy sets the compute / accum dtypes.
      targets: [...] integer ids in [0, V); any value where the weight is 0 (e.g. -100). Ids
        outside [0, V) with a positive weight: ValueError when concrete, else NaN loss and
        gradients and `aux["invalid_targets"]` > 0 (as `cross_entropy`).
      weights: [...] non-negative weights; ones if None (see `cross_entropy`). Differentiable:
        their gradient is the materialised loss's, (term_i - loss) / sum(weights).
      z_loss: coefficient of the mean log(Z)^2 term.
      grad_scale: the factor the caller multiplies the loss by before differentiating (the
        loss scale). The logits' gradient is scaled by it before it is cast to the compute
        dtype, so FP16 gradients sit where loss scaling puts them; the result is correct for
        any cotangent (it is rescaled by cotangent / grad_scale). Default 1.
      chunk_tokens: tokens per device per chunk: whole rows of the batch shard times an equal
        share of the sequence (`chunk_layout`; the last chunk padded with weight-0 tokens).

    Returns:
      (loss, aux) exactly as `cross_entropy` (FP32 scalars).

    Raises:
      ValueError: a quantized head (use the materialised loss), or mismatched shapes.
    """
    why = fusable(head)
    if why is not None:
        raise ValueError(f"fused_cross_entropy: {why}; use the materialised loss for it "
                         "(config.train.loss_impl='materialized').")  # fmt: skip
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}.")
    if hidden.shape[:-1] != targets.shape or targets.ndim == 0:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match: "
            "hidden must be targets.shape + (features,)."
        )
    from bf16jax.nn.layers import Embed

    transposed = isinstance(head, Embed)
    kernel = head.embedding[...] if transposed else head.kernel[...]
    if not _is_traced(targets, weights):
        check_targets(targets, weights, kernel.shape[0] if transposed else kernel.shape[1])
    bias = None if transposed or head.bias is None else head.bias[...]
    b = targets.shape[0]
    t = math.prod(targets.shape[1:])  # 1 for per-example targets (ViT)
    chunk, num_chunks = chunk_layout(t, max(b // sharding.batch_shards(), 1), chunk_tokens)
    weights = jnp.ones(targets.shape, _F32) if weights is None else weights.astype(_F32)
    scale = jnp.asarray(1.0 if grad_scale is None else grad_scale, _F32)
    static = _Static(head.policy, transposed, float(z_loss), num_chunks, one_pass_reduction())
    # The last chunk is padded with weight-0 tokens (no loss, no gradient); pad's VJP drops
    # their gradients.
    pad = ((0, 0), (0, chunk * num_chunks - t))
    return _fused(
        jnp.pad(hidden.reshape(b, t, hidden.shape[-1]), (*pad, (0, 0))),
        kernel,
        bias,
        jnp.pad(targets.reshape(b, t).astype(jnp.int32), pad),
        jnp.pad(weights.reshape(b, t), pad),
        scale,
        static,
    )


def chunk_layout(tokens: int, rows: int, chunk_tokens: int) -> tuple[int, int]:
    """(tokens per row per chunk, number of chunks) of the fused loss's scan over `tokens`
    positions of `rows` rows, at most `chunk_tokens` tokens per chunk (at least one per row).

    The chunks are as few as the budget allows and equal, so a length with no good divisor (a
    prime) pads its last chunk by fewer than `num_chunks` tokens per row instead of falling to
    one token per chunk: T = 1021 at 64 tokens per row is 16 chunks, the last padded by 3.
    """
    per_row = min(tokens, max(chunk_tokens // rows, 1))
    num_chunks = -(-tokens // per_row)
    return -(-tokens // num_chunks), num_chunks


class _Static(NamedTuple):
    policy: Policy
    transposed: bool  # kernel is [V, D] (a tied embedding table), else [D, V]
    z_loss: float
    num_chunks: int
    one_pass: bool  # log Z and argmax in one pass over the logits (`_logsumexp_argmax`)


def _chunks(x: jax.Array, n: int) -> jax.Array:
    """[B, T, ...] -> [n, B, T/n, ...]: chunks along the token axis, batch sharding kept."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n, t // n, *x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array) -> jax.Array:
    """[n, B, c, ...] -> [B, n * c, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _chunk_logits(h, kernel, bias, st: _Static):  # [B, c, D] -> [B, c, V] accum
    dims = (((2,), (1,)) if st.transposed else ((2,), (0,)), ((), ()))
    logits = matmul.dot_general(h, kernel, dims, st.policy)
    return logits if bias is None else logits + bias.astype(logits.dtype)


def one_pass_reduction() -> bool:
    """Whether the fused loss reduces each chunk's logits in one pass (`_logsumexp_argmax`): on
    a TPU, where it takes libtpu's estimated cycles of gpt2_124m's loss from 75M to 60M; on the
    CPU the two-pass `logsumexp` + `argmax` runs faster (XLA:CPU evaluates the combiner's two
    exponentials per element), and on a GPU it is unmeasured. Figures:
    experiments/results/fused_loss_schedule.md."""
    return sharding.target_platform() == "tpu"


def _online_max_sum_index(a, b):
    """Combines two (max, sum of exp(x - max), first index of max) triples (Milakov & Gimelshein,
    arXiv:1805.02867): the reduction behind `_logsumexp_argmax`."""
    (m1, s1, i1), (m2, s2, i2) = a, b
    m = jnp.maximum(m1, m2)

    def rescaled(s_i, m_i):  # s_i * exp(m_i - m)
        # why: m_i == m covers equal maxima and two -inf (exp(-inf - -inf) would be NaN).
        return s_i * jnp.exp(jnp.where(m_i == m, 0.0, m_i - m))

    s = rescaled(s1, m1) + rescaled(s2, m2)
    i = jnp.where(m1 > m2, i1, jnp.where(m2 > m1, i2, jnp.minimum(i1, i2)))
    return m, s, i


def _logsumexp_argmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logsumexp, argmax) over the last axis of FP32 `logits` in one pass over them (an online
    softmax reduction) instead of two (max and argmax, then the sum of exponentials); on a TPU
    each pass costs about as much as the chunk's head GEMM. argmax is the first index of the
    maximum, as `jnp.argmax`."""
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.int32(logits.shape[-1]))
    operands = (logits, jnp.ones_like(logits), index)
    m, s, best = jax.lax.reduce(operands, init, _online_max_sum_index, (logits.ndim - 1,))
    return m + jnp.log(s), best


def _fused_scan(h, kernel, bias, targets, weights, scale, st: _Static, grads: bool):
    """Sums (w*nll, w*log_z^2, w*correct, w*|log_z|) and, with `grads`, (dh, dW, db) of
    scale * loss (the loss normalised by the weight sum) accumulated chunk by chunk."""
    acc, compute = st.policy.accum_dtype, st.policy.compute_dtype
    weight_sum = jnp.sum(weights)
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
    vocab = kernel.shape[0] if st.transposed else kernel.shape[1]

    def body(carry, xs):
        sums, dw, db = carry
        h_c, t_c, w_c = constrain_batch(xs[0]), xs[1], xs[2]  # [B, c, D], [B, c], [B, c]
        # why: logits, logsumexp and the loss are the FP32 island (see `cross_entropy`).
        logits = constrain_batch(_chunk_logits(h_c, kernel, bias, st)).astype(_F32)
        if st.one_pass:
            log_z, best = _logsumexp_argmax(logits)  # [B, c] each
        else:
            log_z, best = jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1)
        ids, _, invalid = target_mask(t_c, w_c, vocab)  # as `cross_entropy`
        target_logit = jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]
        correct = (best == t_c).astype(_F32)
        # An invalid label poisons the loss and its gradients (the step is skipped).
        poison = jnp.where(invalid, jnp.nan, 0.0)
        nll = jnp.where(w_c > 0, log_z - target_logit, 0.0) + poison
        stats = (nll, jnp.square(log_z), correct, jnp.abs(log_z))
        weighted = tuple(s + jnp.sum(w_c * x) for s, x in zip(sums[:4], stats, strict=True))
        sums = (*weighted, sums[4] + jnp.sum(invalid, dtype=_F32))
        if not grads:
            return (sums, dw, db), None
        # Each token's term of the loss's numerator: d loss / d w_i needs it (`_fused_bwd`).
        term = nll + st.z_loss * jnp.square(log_z) if st.z_loss else nll  # [B, c]
        # d(scale * loss)/dlogits = scale * w / denom * (softmax * (1 + 2 z log_z) - onehot)
        probs = jnp.exp(logits - log_z[..., None])
        if st.z_loss:
            probs = probs * (1.0 + 2.0 * st.z_loss * log_z)[..., None]
        onehot = jax.nn.one_hot(ids, vocab, dtype=_F32)
        coef = (w_c * (scale / denom) + poison)[..., None]
        dlogits = coef * (probs - onehot)  # [B, c, V] FP32, this chunk only
        # why: the backward GEMMs take 16-bit operands and accumulate in FP32
        # (bf16jax.precision.matmul).
        g = dlogits.astype(compute)
        hc, kc = h_c.astype(compute), kernel.astype(compute)
        k_dims = (((2,), (0,)) if st.transposed else ((2,), (1,)), ((), ()))
        dh = matmul.accumulating_dot(g, kc, k_dims, acc).astype(h.dtype)  # [B, c, D]
        tok = (((0, 1), (0, 1)), ((), ()))
        if st.transposed:  # [V, D]
            dw = dw + matmul.accumulating_dot(g, hc, tok, acc)
        else:  # [D, V]
            dw = dw + matmul.accumulating_dot(hc, g, tok, acc)
        if db is not None:
            db = db + jnp.sum(dlogits, axis=(0, 1))
        return (sums, dw, db), (constrain_batch(dh), term)

    n = st.num_chunks
    zero = jnp.zeros([], _F32)
    dw0 = jnp.zeros(kernel.shape, acc) if grads else None
    db0 = jnp.zeros(bias.shape, _F32) if grads and bias is not None else None
    xs = (_chunks(h, n), _chunks(targets, n), _chunks(weights, n))
    (sums, dw, db), ys = jax.lax.scan(body, ((zero,) * 5, dw0, db0), xs)
    nll, z2, correct, abs_z = (s / denom for s in sums[:4])
    loss = nll + jnp.float32(st.z_loss) * z2 if st.z_loss else nll
    aux = {"nll": nll, "z_loss": z2, "accuracy": correct, "log_z": abs_z,
           "weight_sum": weight_sum, "invalid_targets": sums[4]}  # fmt: skip
    if ys is None:
        return (loss, aux), (None, dw, db, None)
    # loss = sum_i w_i term_i / W with W = sum_i w_i (when > 0, else 1, a constant):
    # d loss / d w_i = (term_i - loss [W > 0]) / W, as autodiff of `cross_entropy` gives.
    dweights = (_unchunk(ys[1]) - jnp.where(weight_sum > 0, loss, 0.0)) / denom  # [B, T]
    return (loss, aux), (_unchunk(ys[0]), dw, db, dweights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused(h, kernel, bias, targets, weights, scale, st: _Static):
    return _fused_scan(h, kernel, bias, targets, weights, scale, st, grads=False)[0]


def _fused_fwd(h, kernel, bias, targets, weights, scale, st: _Static):
    out, grads = _fused_scan(h, kernel, bias, targets, weights, scale, st, grads=True)
    like = (jnp.zeros((), kernel.dtype), None if bias is None else jnp.zeros((), bias.dtype))
    return out, (*grads, scale, like)


def _fused_bwd(st: _Static, res, cts):
    dh, dw, db, dweights, scale, (like_kernel, like_bias) = res
    # The gradients were taken for a cotangent of `scale` (the weights' for 1); the aux outputs
    # are not differentiable (their cotangents are ignored).
    ct = cts[0].astype(_F32)
    ratio = ct / scale
    dh = (dh.astype(_F32) * ratio).astype(dh.dtype)
    dw = (dw * ratio).astype(like_kernel.dtype)
    db = None if db is None else (db * ratio).astype(like_bias.dtype)
    return dh, dw, db, None, dweights * ct, None


_fused.defvjp(_fused_fwd, _fused_bwd)
