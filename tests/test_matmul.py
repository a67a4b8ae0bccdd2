"""bf16jax.precision.matmul: the custom VJP is the transpose rule of lax.dot_general (exact in
FP32), its
backward GEMMs take 16-bit operands with FP32 accumulation, FP32 master weights get unrounded FP32
gradients, FP16 cotangents need (and get) loss scaling, and a whole model's gradients stay within
a stated tolerance of plain autodiff's."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from bf16jax.config import base_config
from bf16jax.models import build_model
from bf16jax.nn.loss import cross_entropy, fused_cross_entropy
from bf16jax.precision import get_policy, matmul
from bf16jax.precision import loss_scale as ls

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)
# (x shape, y shape, dimension numbers): Linear, attention scores and values, tied head, a
# double contraction with permuted axes.
DOTS = (
    ((3, 4, 5), (5, 6), (((2,), (0,)), ((), ()))),
    ((2, 4, 3, 8), (2, 5, 3, 8), (((3,), (3,)), ((0, 2), (0, 2)))),
    ((2, 3, 4, 5), (2, 5, 3, 8), (((3,), (1,)), ((0, 1), (0, 2)))),
    ((7, 5), (11, 5), (((1,), (1,)), ((), ()))),
    ((7, 6, 5), (4, 5, 6), (((1, 2), (2, 1)), ((), ()))),
)


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@contextlib.contextmanager
def plain_autodiff():
    """Traces matmuls as plain lax.dot_general (JAX's own VJP: FP32 backward GEMMs): the
    behaviour before bf16jax.precision.matmul, used as the oracle."""
    saved = matmul._dot16
    matmul._dot16 = lambda x, y, dims, c, a: lax.dot_general(
        x.astype(c), y.astype(c), dims, preferred_element_type=a
    )
    try:
        yield
    finally:
        matmul._dot16 = saved


@pytest.mark.parametrize("xs,ys,dims", DOTS)
def test_vjp_is_the_dot_general_transpose(xs, ys, dims):
    """With FP32 operands the custom VJP computes what JAX's transpose rule computes (the
    operand order and layout differ, so allow FP32 summation-order noise)."""
    x, y = normal(xs, 1), normal(ys, 2)
    r = normal(lax.dot_general(x, y, dims).shape, 3)

    def loss(dot_fn):
        return lambda x, y: jnp.sum(jnp.sin(dot_fn(x, y)) * r)

    ref = jax.grad(loss(lambda x, y: lax.dot_general(x, y, dims)), (0, 1))(x, y)
    ours = jax.grad(loss(lambda x, y: matmul._dot16(x, y, dims, F32, F32)), (0, 1))(x, y)
    for a, b in zip(ref, ours, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_backward_gemms_are_16_bit_and_master_grads_fp32():
    policy = get_policy("bf16")
    x = normal((4, 8, 16), 0, jnp.bfloat16)
    w = normal((16, 32), 1)  # an FP32 master weight

    def loss(x, w):
        return jnp.sum(matmul.dot(x, w, policy) ** 2)

    text = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
    assert matmul.dot_dtypes(text) == [("bf16", "bf16", "f32")] * 3  # forward, dx, dw
    with plain_autodiff():
        text = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
    assert ("f32", "f32", "f32") in matmul.dot_dtypes(text)  # what JAX's own VJP does
    gx, gw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    assert gx.dtype == BF16 and gw.dtype == F32
    # dW straight from the FP32 accumulator of bf16 operands, never rounded to BF16.
    y = lax.dot_general(x, w.astype(BF16), (((2,), (0,)), ((), ())), preferred_element_type=F32)
    ct = (2 * y).astype(BF16).astype(F32)
    want = np.einsum("btk,btn->kn", np.asarray(x, np.float64), np.asarray(ct, np.float64))
    np.testing.assert_allclose(gw, want, rtol=1e-5, atol=1e-4)
    assert not np.array_equal(np.asarray(gw), np.asarray(gw.astype(BF16).astype(F32)))
    # compute == accum (fp32): the plain dot, no custom VJP.
    for name, custom in (("bf16", True), ("fp32", False), ("p=f32,c=f32,a=f32", False)):
        policy = get_policy(name)
        jaxpr = jax.make_jaxpr(lambda x, w, p=policy: matmul.dot(x, w, p))(x, w)
        assert ("custom_vjp_call" in str(jaxpr)) == custom, name


def test_unperturbed_operand_gets_no_backward_gemm():
    """ViT's input patches are not differentiated: no dx GEMM is even traced."""
    policy = get_policy("bf16")
    x, w = normal((4, 16), 0), normal((16, 8), 1)

    def loss(x, w):
        return jnp.sum(matmul.dot(x, w, policy) ** 2)

    both = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
    only_w = jax.jit(jax.grad(loss, 1)).lower(x, w).as_text()
    assert len(matmul.dot_dtypes(both)) == 3 and len(matmul.dot_dtypes(only_w)) == 2


def test_fp16_cotangent_needs_the_loss_scale():
    """The cotangent cast to FP16 is where small gradients vanish; loss scaling recovers them
    exactly (powers of two), and an overflow there is a non-finite gradient (a skipped step)."""
    policy = get_policy("fp16")
    x = jnp.ones((8, 16), F16)
    w = jnp.ones((16, 4), F32)

    def loss(w, scale):
        return jnp.sum(matmul.dot(x, w, policy)) * 1e-8 * scale  # dL/dy = 1e-8: FP16 flushes it

    grad = jax.jit(jax.grad(loss))
    assert not np.any(np.asarray(grad(w, 1.0)))
    state = ls.create_loss_scale("static", init_scale=2.0**15)
    scaled = ls.unscale_grads(state, grad(w, state.scale))
    np.testing.assert_allclose(scaled, np.full((16, 4), 8e-8, np.float32), rtol=1e-3)
    assert not bool(ls.all_finite(grad(w, 1e13)))  # 1e5 > FP16 max: inf, the step is skipped


def test_einsum_specs():
    policy = get_policy("bf16")
    q, k = normal((2, 3, 4, 5), 0), normal((2, 6, 4, 5), 1)
    out = matmul.einsum("bthd,bshd->bhts", q, k, policy)
    assert out.shape == (2, 4, 3, 6) and out.dtype == F32
    ref = jnp.einsum("bthd,bshd->bhts", q.astype(BF16), k.astype(BF16), preferred_element_type=F32)
    np.testing.assert_array_equal(out, ref)
    for bad in ("bthd,bshd", "bth,bshd->bhts", "...d,sd->...s", "btt,bs->bts", "bt,bs->b"):
        with pytest.raises(ValueError, match="einsum spec"):
            matmul.einsum(bad, q, k, policy)


def test_backward_gemms_run_in_bf16_on_cpu():
    """XLA:CPU cannot run some BF16 x BF16 -> F32 dots ("Unsupported element type for DotThunk"):
    JAX's transpose-rule layout for a Linear's dW (dot(g, x), then transpose) and for the key
    gradient of attention scores are two. The layouts matmul emits run, with the right values."""
    g, x = normal((4, 8, 32), 0, BF16), normal((4, 8, 16), 1, BF16)

    def jax_layout(g, x):  # what _dot_general_transpose_rhs emits for y = x @ w
        return lax.dot_general(g, x, (((0, 1), (0, 1)), ((), ())), preferred_element_type=F32).T

    with pytest.raises(Exception, match="DotThunk"):
        jax.block_until_ready(jax.jit(jax_layout)(g, x))
    linear = (((2,), (0,)), ((), ()))
    dw = jax.jit(lambda g, x: matmul._rhs_cotangent(g, x, linear, 2, F32))(g, x)
    want = np.einsum("btn,btk->kn", np.asarray(g, np.float64), np.asarray(x, np.float64))
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-4)
    q, gs = normal((2, 8, 4, 16), 2, BF16), normal((2, 4, 8, 8), 3, BF16)  # [b,t,h,d], [b,h,t,s]
    scores = (((3,), (3,)), ((0, 2), (0, 2)))
    dk = jax.jit(lambda gs, q: matmul._rhs_cotangent(gs, q, scores, 4, F32))(gs, q)
    want = np.einsum("bhts,bthd->bshd", np.asarray(gs, np.float64), np.asarray(q, np.float64))
    np.testing.assert_allclose(dk, want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- a whole model
def _gpt(policy):
    c = base_config("gpt").model
    c.update(num_layers=2, num_heads=4, embed_dim=64, mlp_dim=128, max_len=64)
    with nnx.use_eager_sharding(False):
        return build_model(c, policy, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model_grads():
    """GPT gradients of one loss four ways, in one compiled program: bf16 with plain autodiff
    (before bf16jax.precision.matmul), bf16 with 16-bit backward GEMMs, bf16 with the fused loss,
    and the
    fp32 policy (the yardstick: what BF16 compute itself changes)."""
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, 384, (8, 64)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, 384, (8, 64)), jnp.int32),
    }
    graphdef, params = nnx.split(_gpt(get_policy("bf16")))
    graphdef32, _ = nnx.split(_gpt(get_policy("fp32")))

    def materialized(gd):
        def loss(p):
            logits, targets, weights = nnx.merge(gd, p).logits_and_targets(batch)
            return cross_entropy(logits, targets, weights)[0]

        return loss

    def fused(p):
        hidden, head, targets, weights = nnx.merge(graphdef, p).head_and_targets(batch)
        return fused_cross_entropy(hidden, head, targets, weights, chunk_tokens=128)[0]

    @jax.jit
    def all_grads(p):
        with plain_autodiff():
            before = jax.grad(materialized(graphdef))(p)
        return {
            "before": before,
            "ours": jax.grad(materialized(graphdef))(p),
            "fused": jax.grad(fused)(p),
            "fp32": jax.grad(materialized(graphdef32))(p),
        }

    return jax.tree.map(lambda g: np.asarray(g, np.float64), all_grads(params))


def _rel_errors(a, b):
    """Per parameter: ||a - b|| / ||b||, for the parameters whose gradient is not zero in exact
    arithmetic (a key bias shifts every logit of a row equally: softmax ignores it)."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    errs = [np.linalg.norm(x - y) / np.linalg.norm(y) for x, y in pairs]
    norms = np.array([np.linalg.norm(y) for y in jax.tree.leaves(b)])
    return np.array(errs)[norms > 1e-3 * np.median(norms)]


# Stated tolerance: every parameter's gradient within 2% (relative L2) of plain autodiff's, 1% on
# average. Measured on this model: max 1.0%, mean 0.6% (rounding the cotangents to BF16); the
# BF16 forward itself moves them as much (fp32 vs bf16 policy: max 1.5%, mean 1.0%).
GRAD_RTOL, GRAD_MEAN_RTOL = 2e-2, 1e-2


@pytest.mark.parametrize("variant", ["ours", "fused"])
def test_gradients_match_plain_autodiff(model_grads, variant):
    err = _rel_errors(model_grads[variant], model_grads["before"])
    assert len(err) == 34  # 36 params less the two key biases
    assert err.max() < GRAD_RTOL and err.mean() < GRAD_MEAN_RTOL, err
    yardstick = _rel_errors(model_grads["fp32"], model_grads["before"])
    assert err.mean() < yardstick.mean()
