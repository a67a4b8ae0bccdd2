"""Policy-aware Flax NNX layers: Linear, Embed, norms, Attention, MLP.

Every layer takes the root `Policy` and its own path (`name`, e.g. "blocks/3/attn/q") and uses
`policy.for_module(name)`, so per-module overrides apply. Invariants each layer keeps:

- params are created in `param_dtype` and cast to `compute_dtype` at use;
- every matmul goes through `bf16jax.precision.matmul` (16-bit operands forward and backward) and
  accumulates in `accum_dtype` (`preferred_element_type`), then the result is cast
  to `compute_dtype`; biases are added before that cast, in `accum_dtype`;
- norm statistics, attention logits + softmax and output logits are FP32 islands (`accum_dtype`);
  `Attention` runs `bf16jax.nn.attention.attention` with the kernel chosen for the backend;
- with a quantizing policy (`q=w8a8`, ...) `Linear` keeps LSQ step sizes (`bf16jax.nn.quant`) as
  FP32 log-domain params beside its kernel and dots integer codes (an input bounded below, such
  as GELU's output, gets an unsigned offset range); with `q=fp8` it dots E4M3 operands and
  keeps delayed-scaling state (`quant.FP8Meta`, not a param); edge layers (`edge=True`) stay
  float;
- `Attention.decode` / `attend` / `kv` are the KV-cache path of the same attention (generation:
  keys and values written once into a fixed-size cache, queries attend to the written prefix);
- GELU is evaluated in accum dtype (one rounding of its result, not one per tanh-form op);
- params carry logical axis names (`embed`, `mlp`, `heads`, `joined_kv`, `vocab`, ...) that
  `bf16jax.parallel.sharding` maps to mesh axes;
- dropout (attention probabilities, MLP hidden, residual) is active only when a PRNG key is passed
  (`dropout_key`, from the train step's key); without one every layer is deterministic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from bf16jax.nn import quant as quant_lib
from bf16jax.nn.attention import attention, resolve_implementation
from bf16jax.nn.dropout import dropout, dropout_keys
from bf16jax.nn.kv_cache import CachedAttention, KVCache
from bf16jax.nn.projections import (
    MATMUL_OUTPUT,
    fused_heads,
    fused_projection,
    heads_output,
    same_plain_projection,
)
from bf16jax.parallel import sharding
from bf16jax.precision import Policy, is_fp8, matmul, quant_bits
from bf16jax.precision.matmul import dot

__all__ = [
    "Linear",
    "Embed",
    "LayerNorm",
    "RMSNorm",
    "Attention",
    "MLP",
    "logical_param",
    "KVCache",
    "dot",
    "attention",
    "dropout",
    "dropout_keys",
    "MLP_ACTIVATIONS",
    "MATMUL_OUTPUT",
]

Axes = Sequence[str | None]
Initializer = Callable[..., jax.Array]


def logical_param(init: Initializer, shape: tuple[int, ...], axes: Axes, dtype, rngs: nnx.Rngs):
    """An nnx.Param of `shape` in `dtype` whose logical axis names are `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"Logical axes {tuple(axes)} do not match param shape {shape}.")
    init = nnx.with_partitioning(init, tuple(axes))
    # The names are logical ("embed"), mapped to mesh axes by bf16jax.parallel.sharding; NNX's eager
    # sharding would read them as mesh axes and fail outside a matching mesh.
    with nnx.use_eager_sharding(False):
        return nnx.Param(init(rngs.params(), shape, dtype))


def _fixed_param(value: jax.Array, axes: Axes) -> nnx.Param:
    """An nnx.Param holding `value` (no RNG drawn) with logical axis names `axes`."""
    if not axes:
        # A scalar is replicated: no axis names. (An empty name tuple breaks nnx.scan over
        # stacked layers: flax adds no "layers" axis to () but then tries to remove one.)
        return nnx.Param(value)
    init = nnx.with_partitioning(lambda *_: value, tuple(axes))
    with nnx.use_eager_sharding(False):
        return nnx.Param(init(None, value.shape, value.dtype))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias): FP32-accumulated, output in compute dtype.

    With quantization (`policy.quant_for(name, edge=edge)` not "none") the layer also holds
    FP32 LSQ step sizes in the log domain (s = exp(param), so they stay positive and Adam moves
    them by a relative amount): `w_log_scale` [out] (per output channel, LSQ init from the
    kernel, logical axis of the kernel's output dim) and, when activations are quantized,
    `a_log_scale` [] (per tensor, data-independent init `quant.activation_step_size`; an
    unsigned range offset by `input_min` when the input is bounded below). `int8 = True` (set by
    `quant_model.set_int8_mode`) runs real int8 x int8 -> int32 dots with the same codes. With
    `fp8[:...]` the layer holds `fp8_scale` [3] and `fp8_history` [3, H] (`quant.FP8Meta`, rows
    x, w, gradient; H from the policy, default 1024) and runs `quant.fp8_dot`.

    Args:
      in_features, out_features: sizes.
      policy: the root policy; this layer uses `policy.for_module(name)`.
      name: the module path used to resolve per-module overrides.
      rngs: parameter RNGs.
      use_bias: add a bias (zeros at init).
      kernel_axes: logical names of the kernel's two dims (bias gets the last one).
      kernel_init: defaults to LeCun normal (variance 1/in_features).
      edge: the model's first layer or output logits: unquantized unless an override names it.
      input_min: a lower bound of every input value (e.g. `quant.GELU_MIN` after GELU, 0 after
        ReLU): activation quantization then uses all 2^b codes from this offset up.
      input_mean: the input's expected mean for that offset step-size init (`quant.GELU_MEAN`).
    """

    int8: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        policy: Policy,
        name: str,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        kernel_axes: Axes = ("embed", "mlp"),
        kernel_init: Initializer | None = None,
        edge: bool = False,
        input_min: float | None = None,
        input_mean: float | None = None,
    ):
        self.policy = policy.for_module(name)
        self.in_features = in_features
        init = kernel_init or nnx.initializers.lecun_normal()
        dtype = self.policy.param_dtype
        self.kernel = logical_param(init, (in_features, out_features), kernel_axes, dtype, rngs)
        self.bias = (
            logical_param(
                nnx.initializers.zeros_init(), (out_features,), kernel_axes[-1:], dtype, rngs
            )
            if use_bias
            else None
        )
        self.quant = policy.quant_for(name, edge=edge)
        self.input_min = None if input_min is None else float(input_min)
        bits = quant_bits(self.quant)
        if bits is not None:
            # why: step sizes are FP32 whatever the param dtype; a BF16 step size has 8 bits.
            # Deterministic inits that draw no RNG: quantizing keeps the float init unchanged.
            w_init = quant_lib.init_log_step_size(self.kernel[...], bits[0], axis=0)  # [out]
            self.w_log_scale = _fixed_param(w_init, kernel_axes[-1:])
        if bits is not None and bits[1] is not None:
            a_init = quant_lib.activation_step_size(bits[1], self.input_min, input_mean)
            self.a_log_scale = _fixed_param(jnp.log(jnp.asarray(a_init, jnp.float32)), ())
        if is_fp8(self.quant):
            history_length, self.fp8_margin, self.fp8_format = quant_lib.fp8_config(self.quant)
            scale, history = quant_lib.fp8_meta_init(history_length)
            self.fp8_scale = quant_lib.FP8Meta(scale)
            self.fp8_history = quant_lib.FP8Meta(history)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out] compute
        # Named for the "save_dots" remat policy: the output is kept in compute dtype (half the
        # bytes of the FP32 accumulator), so the backward pass need not recompute this matmul.
        return checkpoint_name(self.policy.cast_to_compute(self.logits(x)), MATMUL_OUTPUT)

    def logits(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out] accum
        """x @ kernel (+ bias) left in accum dtype, not cast to compute: for output heads,
        whose logits are an FP32 island (`__call__` is this, cast to compute dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear expects inputs [..., {self.in_features}], got shape {tuple(x.shape)}."
            )
        if self.quant == "none":
            y = dot(x, self.kernel[...], self.policy)  # accum dtype
        elif is_fp8(self.quant):
            y = quant_lib.fp8_dot(
                x,
                self.kernel[...],
                self.fp8_scale[...],
                self.fp8_history[...],
                self.policy.accum_dtype,
                self.fp8_margin,
                self.fp8_format,
            )
        else:
            a_log_scale = self.a_log_scale[...] if hasattr(self, "a_log_scale") else None
            y = quant_lib.quantized_dot(
                x,
                self.kernel[...],
                self.w_log_scale[...],
                a_log_scale,
                quant=self.quant,
                policy=self.policy,
                int8=self.int8,
                a_offset=self.input_min,
            )
        if self.bias is not None:
            y = y + self.policy.cast_to_accum(self.bias[...])
        return y


class Embed(nnx.Module):
    """Token (or position) embedding table [num_embeddings, features]; `attend` gives logits.

    `__call__(ids)` gathers rows in compute dtype. `attend(h)` is the tied output projection
    h @ table.T, accumulated and returned in accum dtype (FP32 logits island).
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        policy: Policy,
        name: str,
        rngs: nnx.Rngs,
        axes: Axes = ("vocab", "embed"),
        stddev: float = 0.02,
    ):
        self.policy = policy.for_module(name)
        self.num_embeddings = num_embeddings
        self.features = features
        init = nnx.initializers.normal(stddev)
        self.embedding = logical_param(
            init, (num_embeddings, features), axes, self.policy.param_dtype, rngs
        )

    def __call__(self, ids: jax.Array) -> jax.Array:  # [...] int -> [..., D] compute
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"Embed expects integer ids, got dtype {ids.dtype}.")
        # Gather in param dtype, then cast: casting the whole table first would cost V*D.
        return self.policy.cast_to_compute(jnp.take(self.embedding[...], ids, axis=0))

    def attend(self, h: jax.Array) -> jax.Array:  # [..., D] -> [..., V] accum
        # why: logits feed softmax + loss; they stay FP32 (accum dtype) from the accumulator on.
        dims = (((h.ndim - 1,), (1,)), ((), ()))
        return matmul.dot_general(h, self.embedding[...], dims, self.policy)


class _Norm(nnx.Module):
    """Shared body of LayerNorm / RMSNorm: statistics in accum dtype, output in compute dtype."""

    center: bool = True

    def __init__(
        self,
        features: int,
        *,
        policy: Policy,
        name: str,
        rngs: nnx.Rngs,
        eps: float = 1e-5,
        use_bias: bool = True,
        axes: Axes = ("embed",),
    ):
        self.policy = policy.for_module(name)
        self.eps = eps
        dtype = self.policy.param_dtype
        self.scale = logical_param(nnx.initializers.ones_init(), (features,), axes, dtype, rngs)
        self.bias = (
            logical_param(nnx.initializers.zeros_init(), (features,), axes, dtype, rngs)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        # why: mean/variance of BF16 activations summed in BF16 lose low bits; FP32 island.
        p = self.policy
        x = p.cast_to_accum(x)
        if self.center:
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(var + jnp.asarray(self.eps, p.accum_dtype))
        y = y * p.cast_to_accum(self.scale[...])
        if self.bias is not None:
            y = y + p.cast_to_accum(self.bias[...])
        return p.cast_to_compute(y)


class LayerNorm(_Norm):
    """LayerNorm (Ba et al. 2016, arXiv:1607.06450): (x - mean) / std * scale + bias."""

    center = True


class RMSNorm(_Norm):
    """RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) as in T5: x / rms * scale, no bias."""

    center = False

    def __init__(self, features: int, *, policy, name, rngs, eps: float = 1e-6, **kw):
        kw.setdefault("use_bias", False)
        super().__init__(features, policy=policy, name=name, rngs=rngs, eps=eps, **kw)


def _scaled_lecun(factor: float) -> Initializer:
    """LeCun normal (truncated) with its variance multiplied by `factor`."""
    return nnx.initializers.variance_scaling(factor, "fan_in", "truncated_normal")


def _sublayer(parent: str, sub: str, din: int, dout: int, axes: Axes, **kw) -> Linear:
    """The Linear `parent/sub`: its own path, so a policy override can target it alone."""
    return Linear(din, dout, name=f"{parent}/{sub}", kernel_axes=axes, **kw)


class Attention(CachedAttention, nnx.Module):
    """Multi-head attention: self-attention, or cross-attention when `context` is given.

    Projections q, k, v ([D, H*Dh], logical ("embed", "joined_kv")) and o ([H*Dh, D]) are
    `Linear`s, so each can be overridden by path (".../attn/q"). Optional additive `bias`
    (e.g. T5 relative positions, [1|B, H, T, S]), boolean `mask` (True = attend) and segment
    ids (packed documents: `bf16jax.nn.attention.attention`). With `track_logits = True` each
    call sows max |attention logit| as an `nnx.Intermediate` ("logit_max"); bf16jax's drift
    diagnostic turns it on in a copy of the model.

    `scale_logits=False` is T5 / Mesh TensorFlow: scores are not multiplied by 1/sqrt(head_dim);
    q's initialisation is scaled by head_dim**-0.5 instead (the same function at init, and a
    T5 checkpoint's q loads unchanged). `dropout_rate` drops attention probabilities in training.
    `decode`, `attend` and `kv` are the KV-cache path used for generation (see there).

    Fused projections: when q, k, v share a policy and none is quantized
    (`projections_fusable`), self-attention runs one GEMM x @ [D, 3, H*Dh] over the kernels
    stacked at use time (cross-attention: k and v); params and checkpoints keep separate
    kernels, and the unsharded stacked axis keeps tensor parallelism's "joined_kv" split.
    `fuse_projections`: None (default) fuses on GPU / TPU, not on CPU, where it measured
    1.3-1.6x slower (fwd + bwd at GPT-2 width, B8 T256); True / False force it.

    `implementation` ("auto", "xla", "cudnn", "pallas"; see `bf16jax.nn.attention`) is resolved
    for `platform` (the devices the step runs on; default `jax.default_backend()`) and this
    layer's compute dtype when the layer is built: a forced kernel the platform lacks raises
    ValueError here.
    """

    track_logits: bool = False
    fuse_projections: bool | None = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        policy: Policy,
        name: str,
        rngs: nnx.Rngs,
        head_dim: int | None = None,
        causal: bool = False,
        use_bias: bool = True,
        implementation: str | None = "auto",
        platform: str | None = None,
        scale_logits: bool = True,
        dropout_rate: float = 0.0,
    ):
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}: "
                    "pick a multiple or pass head_dim."
                )
            head_dim = embed_dim // num_heads
        self.policy = policy.for_module(name)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.causal = causal
        # The kernel for this layer's compute dtype on `platform`; forced kernels that cannot
        # run there fail here, when the model is built.
        self.implementation, self.fallback = resolve_implementation(
            implementation, compute_dtype=self.policy.compute_dtype, platform=platform
        )
        self.scale_logits = scale_logits
        self.dropout_rate = dropout_rate
        inner = num_heads * head_dim

        proj = functools.partial(_sublayer, name, policy=policy, rngs=rngs, use_bias=use_bias)

        # T5: LeCun normal times head_dim**-0.5, i.e. stddev (d_model * d_kv)**-0.5 as in Mesh TF.
        q_init = None if scale_logits else _scaled_lecun(1.0 / head_dim)
        self.q = proj("q", embed_dim, inner, ("embed", "joined_kv"), kernel_init=q_init)
        self.k = proj("k", embed_dim, inner, ("embed", "joined_kv"))
        self.v = proj("v", embed_dim, inner, ("embed", "joined_kv"))
        self.o = proj("o", inner, embed_dim, ("joined_kv", "embed"))
        self.projections_fusable = same_plain_projection((self.q, self.k, self.v))

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
    ) -> jax.Array:  # x [B, T, D], context [B, S, D] -> [B, T, D] compute
        """Attention of x's queries over x (or `context`); `segment_ids` [B, T] (and, for
        cross-attention, the context's `kv_segment_ids` [B, S]) keep packed documents apart."""
        fuse = self.fuse_projections
        fuse = sharding.target_platform() != "cpu" if fuse is None else fuse
        q = None
        if fuse and context is None and self._heads_first_ok():
            # The Pallas kernels' own layout [B, H, T, Dh] straight from the GEMMs: no layout
            # copies around the kernel (experiments/results/program_compare/).
            scale = 1.0 / math.sqrt(self.head_dim) if self.scale_logits else 1.0
            # why: a power-of-two scale applied to q's FP32 GEMM result before the cast is the
            # same number as q * scale in any dtype (barring underflow), and costs no pass.
            fold = math.frexp(scale)[0] == 0.5
            q, k, v = fused_heads(x, (self.q, self.k, self.v), self.num_heads, self.head_dim,
                                   q_scale=scale if fold else 1.0)  # fmt: skip
            out = attention(q, k, v, self.policy, bias=bias, mask=mask, causal=self.causal,
                            implementation=self.implementation, fallback=self.fallback,
                            scale=1.0 if fold else scale,
                            dropout_rate=self.dropout_rate, dropout_key=dropout_key,
                            segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                            heads_first=True)  # fmt: skip
            return heads_output(out, self.o)
        if fuse and self.projections_fusable and context is None:
            q, k, v = map(self._heads, fused_projection(x, (self.q, self.k, self.v)))
            kv = (k, v)
        elif fuse and self.projections_fusable:
            kv = tuple(map(self._heads, fused_projection(context, (self.k, self.v))))
        else:
            kv = self.kv(x if context is None else context)
        return self._attend(x, kv, q=q, mask=mask, bias=bias, causal=self.causal,
                            implementation=self.implementation, dropout_key=dropout_key,
                            segment_ids=segment_ids,
                            kv_segment_ids=kv_segment_ids)  # fmt: skip

    def _heads_first_ok(self) -> bool:
        """Whether q, k, v and o can run heads-first: a Pallas layer whose projections are
        plain GEMMs (no quantization) and that sows no logits."""
        o = self.o
        return (
            self.implementation == "pallas"
            and self.projections_fusable
            and o.quant == "none"
            and not o.int8
            and not self.track_logits
        )

    def _heads(self, y: jax.Array) -> jax.Array:  # [B, L, H*Dh] -> [B, L, H, Dh]
        return y.reshape(*y.shape[:-1], self.num_heads, self.head_dim)

    def _attend(
        self,
        x,
        kv: KVCache,
        *,
        mask,
        bias,
        causal,
        implementation,
        dropout_key=None,
        q=None,
        segment_ids=None,
        kv_segment_ids=None,
    ) -> jax.Array:
        """Attention of x's queries (or the given `q` [B, T, H, Dh]) over kv, projected by o."""
        k, v = kv
        q = self._heads(self.q(x)) if q is None else q
        out = attention(
            q,
            k,
            v,
            self.policy,
            bias=bias,
            mask=mask,
            causal=causal,
            implementation=implementation,
            fallback=self.fallback if implementation == self.implementation else None,
            return_logit_max=self.track_logits,
            scale=None if self.scale_logits else 1.0,
            dropout_rate=self.dropout_rate,
            dropout_key=dropout_key,
            segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
        )
        if self.track_logits:
            out, logit_max = out
            self.sow(nnx.Intermediate, "logit_max", logit_max)
        return self.o(out.reshape(*out.shape[:-2], self.num_heads * self.head_dim))


# "gelu" is GPT-2's tanh approximation (HF "gelu_new"); "gated-*" multiplies act(wi_0 x) by
# wi_1 x (Shazeer 2020, arXiv:2002.05202): T5 v1.1 / FLAN-T5 use "gated-gelu", T5 v1.0 "relu".
MLP_ACTIVATIONS = ("gelu", "relu", "gated-gelu", "gated-relu")
_ACTIVATION_FNS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
# (lower bound, mean over a unit Gaussian input) of each activation's output: the offset range
# (and its step-size init) of the layer that reads it.
_ACTIVATION_BOUNDS = {
    "gelu": (quant_lib.GELU_MIN, quant_lib.GELU_MEAN),
    "relu": (0.0, 1.0 / math.sqrt(2.0 * math.pi)),
}


class MLP(nnx.Module):
    """Position-wise MLP: act(x fc1) fc2 (GPT-2, ViT, T5 v1.0) or gated act(x wi_0) * (x wi_1) wo
    (T5 v1.1). `dropout_rate` drops the hidden activations in training (T5's DenseReluDense)."""

    def __init__(
        self,
        embed_dim: int,
        mlp_dim: int,
        *,
        policy: Policy,
        name: str,
        rngs: nnx.Rngs,
        activation: str = "gelu",
        use_bias: bool = True,
        dropout_rate: float = 0.0,
    ):
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"Unknown MLP activation {activation!r}: use one of {', '.join(MLP_ACTIVATIONS)}."
            )
        self.policy = policy.for_module(name)
        self.activation = activation
        self.gated = activation.startswith("gated-")
        self.dropout_rate = dropout_rate

        proj = functools.partial(_sublayer, name, policy=policy, rngs=rngs, use_bias=use_bias)

        if not self.gated:
            self.fc1 = proj("fc1", embed_dim, mlp_dim, ("embed", "mlp"))
            # fc2's input is act's output, bounded below (GELU >= -0.17, ReLU >= 0): quantized
            # with an offset range. Inverted dropout scales it by 1 / (1 - rate).
            low, mean = _ACTIVATION_BOUNDS[activation]
            bound = dict(input_min=low / (1.0 - dropout_rate), input_mean=mean)
            self.fc2 = proj("fc2", mlp_dim, embed_dim, ("mlp", "embed"), **bound)
        else:
            self.wi_0 = proj("wi_0", embed_dim, mlp_dim, ("embed", "mlp"))
            self.wi_1 = proj("wi_1", embed_dim, mlp_dim, ("embed", "mlp"))
            self.wo = proj("wo", mlp_dim, embed_dim, ("mlp", "embed"))

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        c = self.policy.cast_to_compute  # [..., D] -> [..., D] compute
        act = _ACTIVATION_FNS[self.activation.removeprefix("gated-")]

        def activate(h):
            # why: GELU's tanh form in BF16 rounds after each of its ~8 ops; in FP32, once.
            return c(act(self.policy.cast_to_accum(h)))

        if not self.gated:
            h = dropout(activate(self.fc1(x)), self.dropout_rate, dropout_key)
            return c(self.fc2(h))
        h = activate(self.wi_0(x)) * c(self.wi_1(x))
        return c(self.wo(dropout(h, self.dropout_rate, dropout_key)))
