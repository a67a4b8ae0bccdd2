"""Policy-aware layers and the FP32 loss: dtypes of params, outputs and grads per policy,
per-module overrides, FP32 accumulation where BF16 would be visibly wrong, attention masking and
agreement with references, T5 position buckets, cross-entropy against numpy, and input errors."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from bf16jax.models.t5 import RelativePositionBias, relative_position_bucket
from bf16jax.nn.layers import MLP, Attention, Embed, LayerNorm, Linear, RMSNorm, attention
from bf16jax.nn.loss import cross_entropy
from bf16jax.precision import get_policy

POLICIES = ("fp32", "bf16", "bf16-pure")
BF16 = ml_dtypes.bfloat16
D, H, T, S, V = 8, 2, 4, 5, 11  # embed dim, heads, query length, context length, vocab


@pytest.fixture(autouse=True)
def _logical_axes_only():
    # Params carry logical axis names ("embed", ...); NNX eager sharding would read them as mesh
    # axes. bf16jax.models and bf16jax.parallel.sharding build under this same switch.
    with nnx.use_eager_sharding(False):
        yield


# Test data comes from numpy: every new jax.random shape costs a second of XLA compile on CPU.
def normal(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def bf16_input(shape, seed=0):
    return normal(shape, seed, jnp.bfloat16)


def random_mask(shape, seed):
    """A boolean attention mask that always keeps key 0, so no row is fully masked."""
    mask = np.random.default_rng(seed).uniform(size=shape) < 0.6
    mask[..., 0] = True
    return jnp.asarray(mask)


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def param_dtypes(tree):
    """{'path/to/param': dtype} for every nnx.Param of a module (or of a State, e.g. grads)."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    return {"/".join(map(str, path)): var[...].dtype for path, var in nnx.to_flat_state(state)}


def randomize(module, seed=0):
    """Sets every param to N(0, 0.5^2) in its own dtype, so zero-init biases take part."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    new = [
        (path, var.replace(0.5 * normal(var.shape, seed + i, var.dtype)))
        for i, (path, var) in enumerate(flat)
    ]
    nnx.update(module, nnx.from_flat_state(new))
    return module


class BiasedAttention(nnx.Module):
    """Attention with T5 relative position bias and a key padding mask, as a T5 encoder uses it."""

    def __init__(self, policy, rngs):
        self.attn = Attention(D, H, policy=policy, name="attn", rngs=rngs)
        self.relpos = RelativePositionBias(
            H, policy=policy, name="relpos", rngs=rngs, num_buckets=8, max_distance=16
        )

    def __call__(self, x):  # [2, T, D]
        t = x.shape[1]
        mask = (jnp.arange(t) < jnp.array([[t], [t - 1]]))[:, None, None, :]  # [2, 1, 1, T]
        return self.attn(x, mask=mask, bias=self.relpos(t, t))


def make_case(name, policy):
    """(module, float inputs, apply(module, *inputs), output kind) for one layer."""
    rngs = nnx.Rngs(0)
    x = bf16_input((2, T, D))
    ids = jnp.array([[1, 4, 7, 10], [0, 2, 2, 9]], jnp.int32)
    if name == "linear":
        return Linear(D, D, policy=policy, name="fc", rngs=rngs), (x,), lambda m, x: m(x), "compute"
    if name == "embed":
        return Embed(V, D, policy=policy, name="embed", rngs=rngs), (), lambda m: m(ids), "compute"
    if name == "embed-attend":
        embed = Embed(V, D, policy=policy, name="embed", rngs=rngs)
        return embed, (x,), lambda m, x: m.attend(x), "accum"
    if name == "layernorm":
        return LayerNorm(D, policy=policy, name="ln", rngs=rngs), (x,), lambda m, x: m(x), "compute"
    if name == "rmsnorm":
        return RMSNorm(D, policy=policy, name="rms", rngs=rngs), (x,), lambda m, x: m(x), "compute"
    if name in ("attn-self", "attn-causal"):
        attn = Attention(D, H, policy=policy, name="attn", rngs=rngs, causal=name == "attn-causal")
        return attn, (x,), lambda m, x: m(x), "compute"
    if name == "attn-cross":
        attn = Attention(D, H, policy=policy, name="attn", rngs=rngs)
        return attn, (x, bf16_input((2, S, D), 1)), lambda m, x, c: m(x, c), "compute"
    if name == "attn-relpos-mask":
        return BiasedAttention(policy, rngs), (x,), lambda m, x: m(x), "compute"
    if name in ("mlp-gelu", "mlp-gated-gelu"):
        act = name.removeprefix("mlp-")
        mlp = MLP(D, 2 * D, policy=policy, name="mlp", rngs=rngs, activation=act)
        return mlp, (x,), lambda m, x: m(x), "compute"
    if name == "relpos":
        relpos = RelativePositionBias(H, policy=policy, name="relpos", rngs=rngs, num_buckets=8)
        return relpos, (), lambda m: m(T, S), "accum"
    raise AssertionError(name)


CASES = (
    "linear",
    "embed",
    "embed-attend",
    "layernorm",
    "rmsnorm",
    "attn-self",
    "attn-causal",
    "attn-cross",
    "attn-relpos-mask",
    "mlp-gelu",
    "mlp-gated-gelu",
    "relpos",
)


def output_and_grads(module, inputs, apply):
    """apply's output and the grads of a random projection of it w.r.t. params and inputs."""

    def probe(m, xs):
        out = apply(m, *xs)
        r = normal(out.shape, 42)
        return jnp.sum(out.astype(jnp.float32) * r), out

    # Eager on purpose: each op's kernel is compiled once and shared by every case, while
    # jitting each tiny case costs seconds of XLA compile time on CPU.
    (_, out), grads = nnx.value_and_grad(probe, argnums=(0, 1), has_aux=True)(module, inputs)
    return out, grads


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("name", CASES)
def test_dtypes_and_grads(name, policy_name):
    policy = get_policy(policy_name)
    module, inputs, apply, kind = make_case(name, policy)
    assert set(param_dtypes(module).values()) == {policy.param_dtype}
    out, (param_grads, input_grads) = output_and_grads(module, inputs, apply)
    want = policy.compute_dtype if kind == "compute" else policy.accum_dtype
    assert out.dtype == want
    assert bool(jnp.all(jnp.isfinite(out)))
    grads = param_dtypes(param_grads)
    assert grads == param_dtypes(module)
    for path, var in nnx.to_flat_state(param_grads):
        g = var[...].astype(jnp.float32)
        assert bool(jnp.all(jnp.isfinite(g))), path
        # A key bias adds q.b_k to a whole row of logits, which softmax ignores: its grad is 0.
        if path[-2:] != ("k", "bias"):
            assert float(jnp.max(jnp.abs(g))) > 0, path
    # JAX's dot_general transpose with preferred_element_type once returned the accum dtype;
    # grads w.r.t. BF16 activations must come back in BF16.
    for x, g in zip(inputs, input_grads, strict=True):
        assert g.dtype == x.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


# ----------------------------------------------------------------------------- overrides
def test_norm_override_keeps_fp32():
    policy = get_policy("bf16-pure; .*norm.*->fp32")
    norm = LayerNorm(D, policy=policy, name="blocks/0/norm1", rngs=nnx.Rngs(0))
    fc = Linear(D, D, policy=policy, name="blocks/0/mlp/fc1", rngs=nnx.Rngs(0))
    assert set(param_dtypes(norm).values()) == {np.dtype(jnp.float32)}
    assert set(param_dtypes(fc).values()) == {np.dtype(jnp.bfloat16)}
    x = bf16_input((2, T, D))
    assert norm(x).dtype == jnp.float32 and fc(x).dtype == jnp.bfloat16


def test_attention_projection_override():
    policy = get_policy("bf16-pure; attn/q->fp32")
    attn = Attention(D, H, policy=policy, name="attn", rngs=nnx.Rngs(0))
    dtypes = param_dtypes(attn)
    assert len(dtypes) == 8
    for path, dtype in dtypes.items():
        assert dtype == (jnp.float32 if path.startswith("q/") else jnp.bfloat16), path
    x = bf16_input((2, T, D))
    out, (grads, (gx,)) = output_and_grads(attn, (x,), lambda m, x: m(x))
    assert out.dtype == jnp.bfloat16 and gx.dtype == jnp.bfloat16
    assert param_dtypes(grads) == dtypes


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_fused_projections_match_separate_ones(cross):
    """One GEMM over the stacked q, k, v kernels (k, v for cross-attention) gives the three
    projections' outputs and gradients; the params stay separate."""
    attn = randomize(Attention(D, H, policy=get_policy("bf16"), name="attn", rngs=nnx.Rngs(0)))
    assert attn.projections_fusable and attn.fuse_projections is None  # auto: CPU -> separate
    attn.fuse_projections = True
    inputs = (bf16_input((2, T, D)),) + ((bf16_input((2, S, D), 1),) if cross else ())
    fused, fused_grads = output_and_grads(attn, inputs, lambda m, *xs: m(*xs))
    attn.fuse_projections = False
    separate, separate_grads = output_and_grads(attn, inputs, lambda m, *xs: m(*xs))
    np.testing.assert_allclose(f64(fused), f64(separate), rtol=2**-7, atol=1e-6)
    # The input's gradient sums the projections' contributions: separately each is rounded to
    # BF16 before the sum, fused they meet in the FP32 accumulator. Allow a BF16 ulp of the max.
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(separate_grads), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(f64(a), f64(b), rtol=2**-7, atol=2**-7 * np.abs(f64(b)).max())


@pytest.mark.parametrize("spec", ["bf16-pure; attn/q->fp32", "bf16; q=w8a8", "bf16; q=fp8"])
def test_projections_stay_separate_when_policies_differ(spec):
    attn = Attention(D, H, policy=get_policy(spec), name="attn", rngs=nnx.Rngs(0))
    assert not attn.projections_fusable


# ----------------------------------------------------------------------------- FP32 accumulation
def bf16_sequential_sum(values, axis=-1):
    """The sum as a BF16 accumulator would compute it: every partial sum rounded to BF16."""
    return np.add.accumulate(np.asarray(values, np.float64).astype(BF16), axis=axis).take(
        -1, axis=axis
    )


def assert_one_bf16_rounding(out, ref):
    """|out - ref| <= half a BF16 ulp of ref (relative 2^-8), plus FP32 noise."""
    err = np.abs(f64(out) - ref)
    bound = 2.0**-8 * np.abs(ref) + 1e-6
    assert np.all(err <= bound), np.max(err / bound)
    return bound


@pytest.mark.parametrize("policy_name", ("bf16", "bf16-pure"))
def test_linear_accumulates_in_fp32(policy_name):
    policy = get_policy(policy_name)
    k = 4096
    rng = np.random.default_rng(0)
    # Integers and eighths are exact in BF16, their products and all partial sums exact in FP32.
    x = rng.integers(1, 17, (3, k)).astype(np.float64)
    w = rng.integers(1, 9, (k, 2)) / 8.0
    dot = x @ w  # about 2e4: a BF16 accumulator's ulp there (128) dwarfs each product (<= 16)
    bias = -np.round(dot.mean() / 128) * 128  # exact in BF16; cancels most of the sum
    ref = dot + bias
    zeros = nnx.initializers.zeros_init()  # replaced below; skips a costly random init
    layer = Linear(k, 2, policy=policy, name="fc", rngs=nnx.Rngs(0), kernel_init=zeros)
    nnx.update(
        layer,
        nnx.State(
            {
                "kernel": nnx.Param(jnp.asarray(w, policy.param_dtype)),
                "bias": nnx.Param(jnp.full((2,), bias, policy.param_dtype)),
            }
        ),
    )
    out = layer(jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    bound = assert_one_bf16_rounding(out, ref)
    # Adding the bias after rounding the sum to BF16 would be off by up to 64; BF16
    # accumulation by thousands.
    naive = bf16_sequential_sum(x[:, :, None] * w[None], axis=1) + bias
    assert np.min(np.abs(naive - ref) / bound) > 100


@pytest.mark.parametrize("norm_cls", (LayerNorm, RMSNorm))
def test_norm_statistics_in_fp32(norm_cls):
    policy = get_policy("bf16-pure")
    d, eps = 1024, 1e-5
    rng = np.random.default_rng(0)
    # 256 + even noise: exact in BF16 (ulp 2 there), but the mean's low bits and the variance
    # (about 85 against a mean square of about 7e4) are lost in BF16 arithmetic.
    x = 256.0 + 2.0 * rng.integers(0, 16, (4, d))
    centered = x - x.mean(-1, keepdims=True) if norm_cls is LayerNorm else x
    ref = centered / np.sqrt(np.mean(centered**2, -1, keepdims=True) + eps)
    norm = norm_cls(d, policy=policy, name="norm", rngs=nnx.Rngs(0), eps=eps)
    out = norm(jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    bound = assert_one_bf16_rounding(out, ref)

    xb = x.astype(BF16)
    if norm_cls is LayerNorm:
        xb = xb - (bf16_sequential_sum(xb) / BF16(d)).astype(BF16)[:, None]
    var = (bf16_sequential_sum(xb * xb) / BF16(d)).astype(BF16)[:, None]
    naive = (xb / np.sqrt(var + BF16(eps))).astype(np.float64)
    assert np.max(np.abs(naive - ref) / bound) > 50


def test_attention_softmax_in_fp32():
    policy = get_policy("bf16-pure")
    s = 8
    # One query against 8 keys; logits (64*8 + 1*e_s) / sqrt(4) = 256 + s/8 are exact in FP32,
    # while BF16 (ulp 2 at 256) rounds all of them to 256 and makes the softmax uniform.
    q = np.zeros((1, 1, 1, 4))
    q[..., 0], q[..., 1] = 64.0, 1.0
    k = np.zeros((1, s, 1, 4))
    k[..., 0], k[0, :, 0, 1] = 8.0, 0.25 * np.arange(s)
    v = np.zeros((1, s, 1, 4))
    v[0, :, 0, 0] = np.arange(s)
    v[0, :, 0, 1] = 1.0

    def softmax_v(logits):
        p = np.exp(logits - logits.max())
        return (p / p.sum()) @ v[0, :, 0, :]

    logits = (q[0, 0, 0] @ k[0, :, 0, :].T) / 2.0
    assert np.array_equal(logits, 256 + np.arange(s) / 8)
    ref = softmax_v(logits)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    out = attention(*bf, policy)
    assert out.dtype == jnp.bfloat16
    # The probabilities are rounded to BF16 before the PV matmul: allow two roundings.
    err = np.abs(f64(out)[0, 0, 0] - ref)
    bound = 2.0**-7 * np.abs(ref) + 1e-6
    assert np.all(err <= bound), err
    naive = softmax_v(logits.astype(BF16).astype(np.float64))
    assert abs(naive[0] - ref[0]) > 10 * bound[0]


# ----------------------------------------------------------------------------- attention
def np_attention(attn, x, context=None, *, mask=None, bias=None):
    """float64 numpy reference of an `Attention` module's forward pass."""

    def proj(lin, y):
        return y @ f64(lin.kernel[...]) + f64(lin.bias[...])

    x = f64(x)
    kv = x if context is None else f64(context)
    (b, t, _), s = x.shape, kv.shape[1]

    def heads(y):
        return y.reshape(b, -1, attn.num_heads, attn.head_dim)

    q, k, v = heads(proj(attn.q, x)), heads(proj(attn.k, kv)), heads(proj(attn.v, kv))
    logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(attn.head_dim)
    if bias is not None:
        logits = logits + f64(bias)
    keep = np.ones((b, 1, t, s), bool)
    if attn.causal:
        keep = keep & np.tril(np.ones((t, s), bool), k=s - t)
    if mask is not None:
        keep = keep & np.asarray(mask)
    logits = np.where(keep, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, -1)
    return proj(attn.o, out)


@pytest.mark.parametrize("variant", ("self", "causal", "cross", "cross-mask-bias"))
def test_attention_matches_numpy(variant):
    policy = get_policy("fp32")
    attn = Attention(D, H, policy=policy, name="a", rngs=nnx.Rngs(0), causal=variant == "causal")
    randomize(attn)
    x = normal((2, T, D), 1)
    context, kw = None, {}
    if variant.startswith("cross"):
        context = normal((2, S, D), 2)
    if variant == "cross-mask-bias":
        kw["mask"] = random_mask((2, 1, T, S), 3)
        kw["bias"] = normal((1, H, T, S), 4)
    out = attn(x, context, **kw)
    assert out.shape == (2, T, D)
    np.testing.assert_allclose(f64(out), np_attention(attn, x, context, **kw), rtol=1e-5, atol=1e-5)


def test_causal_attention_ignores_future():
    attn = randomize(
        Attention(D, H, policy=get_policy("fp32"), name="a", rngs=nnx.Rngs(0), causal=True)
    )
    x = normal((2, 6, D), 1)
    a, b = attn(x), attn(x.at[:, 4].add(1.0))
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert float(jnp.min(jnp.max(jnp.abs(a[:, 4:] - b[:, 4:]), axis=-1))) > 1e-3


def test_key_mask_removes_keys():
    attn = randomize(Attention(D, H, policy=get_policy("fp32"), name="a", rngs=nnx.Rngs(0)))
    x = normal((2, T, D), 1)
    ctx = normal((2, S, D), 2)
    mask = jnp.array([[True] * S, [True] * 3 + [False] * (S - 3)])[:, None, None, :]
    out = attn(x, ctx, mask=mask)
    # Masked keys behave as if absent, and changing them changes nothing.
    np.testing.assert_allclose(out[1:], attn(x[1:], ctx[1:, :3]), atol=1e-6)
    np.testing.assert_allclose(out, attn(x, ctx.at[1, 3:].set(9.0), mask=mask), atol=1e-6)
    # Control: a change to an unmasked key does change the output.
    changed = attn(x, ctx.at[1, 2].add(1.0), mask=mask)
    assert float(jnp.max(jnp.abs(changed[1] - out[1]))) > 1e-3


@pytest.mark.parametrize("policy_name", ("fp32", "bf16"))
def test_auto_is_the_default_and_picks_xla_on_cpu(policy_name):
    policy = get_policy(policy_name)
    x = bf16_input((2, T, D))
    layers = [
        Attention(D, H, policy=policy, name="a", rngs=nnx.Rngs(0), **kw)
        for kw in ({}, {"implementation": "xla"})
    ]
    assert (layers[0].implementation, layers[0].fallback) == ("xla", True)
    assert (layers[1].implementation, layers[1].fallback) == ("xla", False)
    np.testing.assert_array_equal(f64(layers[0](x)), f64(layers[1](x)))


@pytest.mark.parametrize("causal", (False, True))
def test_attention_matches_jax_dot_product_attention(causal):
    q, k, v = (normal((2, T, H, 8), seed) for seed in range(3))
    bias = normal((1, H, T, T), 3)
    mask = random_mask((2, 1, T, T), 4)
    ours = attention(q, k, v, get_policy("fp32"), bias=bias, mask=mask, causal=causal)
    ref = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, is_causal=causal, implementation="xla"
    )
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_unknown_attention_implementation_raises():
    with pytest.raises(ValueError, match="'flash'"):
        Attention(
            D, H, policy=get_policy("fp32"), name="a", rngs=nnx.Rngs(0), implementation="flash"
        )
    q = jnp.zeros((1, T, H, 4))
    with pytest.raises(ValueError, match="'flash'"):
        attention(q, q, q, get_policy("fp32"), implementation="flash")


# ----------------------------------------------------------------------------- T5 position bias
def t5_bucket(rel, bidirectional, num_buckets, max_distance):
    """mesh_tensorflow's _relative_position_bucket for one key - query offset, in plain Python."""
    n, ret = -rel, 0
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(large, num_buckets - 1)


# By hand from the formula. Bidirectional, 32 buckets, max distance 128: 16 per direction, exact
# below 8, keys after the query in the upper half; log buckets 8 + int(log(n/8)/log(16) * 8).
# Causal: 32 buckets, exact below 16, future keys in bucket 0, 16 + int(log(n/16)/log(8) * 16).
HAND_BUCKETS = {
    True: {
        0: 0,
        -1: 1,
        -7: 7,
        -8: 8,
        -12: 9,
        -20: 10,
        -33: 12,
        -100: 15,
        -128: 15,
        -999: 15,
        1: 17,
        7: 23,
        8: 24,
        20: 26,
        200: 31,
    },
    False: {0: 0, 5: 0, -5: 5, -15: 15, -16: 16, -20: 17, -100: 30, -127: 31, -500: 31},
}


@pytest.mark.parametrize("bidirectional", (True, False))
def test_relative_position_buckets_match_t5(bidirectional):
    offsets = np.array(list(HAND_BUCKETS[bidirectional]))
    want = np.array(list(HAND_BUCKETS[bidirectional].values()))
    assert [t5_bucket(int(r), bidirectional, 32, 128) for r in offsets] == want.tolist()
    got = relative_position_bucket(
        offsets, bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    np.testing.assert_array_equal(got, want)
    for num_buckets, max_distance in ((32, 128), (8, 16), (6, 20)):
        rel = np.arange(-300, 301)
        got = relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
        want = [t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
        np.testing.assert_array_equal(got, want)


def test_relative_position_bias_layout():
    policy = get_policy("bf16-pure")
    relpos = RelativePositionBias(
        H, policy=policy, name="rp", rngs=nnx.Rngs(0), num_buckets=8, max_distance=16
    )
    out = relpos(T, S)
    assert out.shape == (1, H, T, S) and out.dtype == jnp.float32
    table = f64(relpos.embedding[...])
    for i in range(T):
        for j in range(S):
            np.testing.assert_array_equal(
                f64(out)[0, :, i, j], table[t5_bucket(j - i, True, 8, 16)]
            )


# ----------------------------------------------------------------------------- loss
def np_cross_entropy(logits, targets, weights):
    logits = f64(logits)
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return np.sum(nll * weights) / np.sum(weights), np.sum(log_z**2 * weights) / np.sum(weights)


def loss_batch(dtype=jnp.float32, vocab=1000):
    rng = np.random.default_rng(0)
    # Logits of scale ~10 over 1000 classes: log Z ~ 20, where BF16 (ulp 0.125) would show.
    logits = jnp.asarray(10 * rng.standard_normal((3, 5, vocab)), dtype)
    targets = rng.integers(0, vocab, (3, 5)).astype(np.int32)
    weights = rng.choice([0.0, 0.5, 1.0, 2.0], (3, 5)).astype(np.float32)
    return logits, targets, weights


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16))
def test_cross_entropy_matches_numpy(dtype):
    logits, targets, weights = loss_batch(dtype)
    loss, aux = cross_entropy(logits, targets, weights)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in aux.values())
    nll, _ = np_cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(loss, nll, rtol=1e-5)
    np.testing.assert_allclose(aux["weight_sum"], weights.sum(), rtol=1e-6)
    # Grads w.r.t. (possibly BF16) logits come back in the logits' dtype.
    g = jax.grad(lambda lg: cross_entropy(lg, targets, weights)[0])(logits)
    assert g.dtype == dtype


def test_zero_weights_exclude_positions():
    logits, targets, weights = loss_batch()
    keep = weights > 0
    assert 0 < keep.sum() < keep.size
    loss, _ = cross_entropy(logits, targets, weights)
    subset, _ = cross_entropy(logits[keep], targets[keep], weights[keep])
    np.testing.assert_allclose(loss, subset, rtol=1e-6)
    changed = jnp.where(jnp.asarray(keep)[..., None], logits, -logits)
    np.testing.assert_allclose(cross_entropy(changed, targets, weights)[0], loss, rtol=1e-6)
    assert float(cross_entropy(logits, targets, np.zeros_like(weights))[0]) == 0.0


def test_loss_depends_only_on_weight_ratios():
    logits, targets, weights = loss_batch()
    loss, _ = cross_entropy(logits, targets, weights)
    # A total weight below 1 (e.g. weights normalized per batch) is still a weighted mean.
    small = weights * np.float32(0.01)
    assert 0 < small.sum() < 1
    np.testing.assert_allclose(cross_entropy(logits, targets, small)[0], loss, rtol=1e-5)


def test_z_loss_adds_mean_log_z_squared():
    logits, targets, weights = loss_batch()
    z = 1e-3
    base, _ = cross_entropy(logits, targets, weights)
    loss, aux = cross_entropy(logits, targets, weights, z_loss=z)
    nll, mean_z2 = np_cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(aux["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(aux["z_loss"], mean_z2, rtol=1e-5)
    np.testing.assert_allclose(loss - base, z * mean_z2, rtol=1e-3)
    assert float(loss - base) > 0.1


def test_cross_entropy_bad_inputs():
    logits, targets, _ = loss_batch()
    with pytest.raises(ValueError, match=r"logits \(3, 5, 1000\) and targets \(3, 4\)"):
        cross_entropy(logits, targets[:, :4])
    with pytest.raises(ValueError, match="integer class ids"):
        cross_entropy(logits, targets.astype(np.float32))


# ----------------------------------------------------------------------------- bad inputs
def test_layer_input_errors():
    policy = get_policy("fp32")
    linear = Linear(D, 4, policy=policy, name="fc", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"inputs \[\.\.\., 8\], got shape \(2, 7\)"):
        linear(jnp.zeros((2, 7)))
    embed = Embed(V, D, policy=policy, name="embed", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="integer ids, got dtype float32"):
        embed(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="'swish'"):
        MLP(D, 16, policy=policy, name="mlp", rngs=nnx.Rngs(0), activation="swish")
    with pytest.raises(ValueError, match="embed_dim=8 is not divisible by num_heads=3"):
        Attention(D, 3, policy=policy, name="a", rngs=nnx.Rngs(0))
