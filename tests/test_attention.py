"""bf16jax.nn.attention: what "auto" picks on each backend, start-up errors for forced kernels a
backend lacks, and the Pallas TPU kernels (run in interpret mode on CPU) against the XLA path:
outputs and gradients, causal / key-padding masks / T5 bias, under a sharded mesh, in a GPT.
The cuDNN comparison needs a GPU (`@pytest.mark.gpu`)."""

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu
from tiny import make_mesh, tiny_gpt_config

from bf16jax import config as config_lib
from bf16jax.models import build_model
from bf16jax.nn import attention as attn_lib
from bf16jax.nn.loss import cross_entropy
from bf16jax.precision import get_policy
from bf16jax.training import trainer as train

B, T, HEADS, DH = 2, 128, 2, 16  # the Pallas TPU kernels tile sequences by multiples of 128
F32, BF16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16)


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def qkv(dtype=jnp.float32, t=T, s=T):
    return normal((B, t, HEADS, DH), 0, dtype), *(
        normal((B, s, HEADS, DH), i, dtype) for i in (1, 2)
    )


def key_padding(s=T):
    """[B, 1, 1, S]: example 0 attends every key, example 1 only the first 37."""
    keep = np.ones((B, s), bool)
    keep[1, 37:] = False
    return jnp.asarray(keep)[:, None, None, :]


# ----------------------------------------------------------------------------- choice
@pytest.mark.parametrize(
    "platform, dtype, expected",
    [
        ("cpu", BF16, "xla"),
        ("cpu", F32, "xla"),
        ("gpu", BF16, "cudnn"),
        ("gpu", np.dtype(jnp.float16), "cudnn"),
        ("gpu", F32, "xla"),  # cuDNN attention is 16-bit only
        ("tpu", BF16, "pallas"),
        ("tpu", F32, "pallas"),
        ("tpu", np.dtype(jnp.float16), "xla"),
    ],
)
def test_auto_picks_the_backends_kernel(platform, dtype, expected):
    got = attn_lib.resolve_implementation("auto", compute_dtype=dtype, platform=platform)
    assert got == (expected, True)
    # A named kernel is forced (no silent fallback) where it can run.
    if expected != "xla":
        forced = attn_lib.resolve_implementation(expected, compute_dtype=dtype, platform=platform)
        assert forced == (expected, False)


def test_auto_on_this_cpu_is_xla_in_every_model_layer():
    assert jax.default_backend() == "cpu"
    cfg = tiny_gpt_config("bf16").model
    for platform, kernel in ((None, "xla"), ("tpu", "pallas"), ("gpu", "cudnn")):
        model = build_model(cfg, "bf16", rngs=nnx.Rngs(0), platform=platform)
        kernels = {m.implementation for _, m in nnx.iter_modules(model) if hasattr(m, "fallback")}
        assert kernels == {kernel}
    # A per-module FP32 override turns cuDNN off for that layer only.
    model = build_model(cfg, "bf16; blocks/0/attn->fp32", rngs=nnx.Rngs(0), platform="gpu")
    assert model.blocks[0].attn.implementation == "xla"


@pytest.mark.parametrize(
    "impl, policy, match",
    [
        ("cudnn", "bf16", "attention_impl='cudnn' needs a GPU, but this run's devices are 'cpu'"),
        ("pallas", "bf16", "attention_impl='pallas' runs the Pallas TPU kernels, but this run's"),
        ("flash", "bf16", "config.model.attention_impl: Unknown attention implementation 'flash'"),
    ],
)
def test_forcing_a_kernel_the_backend_lacks_fails_at_start_up(impl, policy, match):
    config = config_lib.load_config(
        config_lib.config_path("gpt_tiny"), [f"model.attention_impl={impl}", f"precision={policy}"]
    )
    with pytest.raises(ValueError, match=match):
        train.create_trainer(config)  # builds the model; nothing traced or compiled yet


def test_cudnn_needs_16_bit_compute():
    with pytest.raises(ValueError, match="needs bf16/fp16 compute, but this layer computes in"):
        attn_lib.resolve_implementation("cudnn", compute_dtype=F32, platform="gpu")


# ----------------------------------------------------------------------------- Pallas kernels
def _outputs_and_grads(impl, q, k, v, policy, **kw):
    """attention(...) and d(sum(out * w))/d(q, k, v[, bias]) under `impl` (jitted)."""
    bias = kw.pop("bias", None)
    w = normal(q.shape, 7)

    def loss(q, k, v, bias):
        out = attn_lib.attention(
            q, k, v, policy, bias=bias, implementation=impl, fallback=False, **kw
        )
        return jnp.sum(out.astype(jnp.float32) * w), out

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    # splash (no bias) in the HLO interpreter; flash (bias) in the TPU simulator.
    simulate = pltpu.force_tpu_interpret_mode() if bias is not None else contextlib.nullcontext()
    with attn_lib.pallas_interpret(), simulate:
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, bias)
    return out, grads


def _rel(a, b):
    a, b = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize(
    "case",
    ["full", "causal", "key-padding", "t5-bias+padding", "t5-bias+causal", "cross+padding"],
)
def test_pallas_kernels_match_xla_in_fp32(case):
    """splash (no bias) and flash (T5 bias) in interpret mode vs bf16jax's XLA path."""
    s = 256 if case.startswith("cross") else T
    q, k, v = qkv(t=T, s=s)
    kw = {"causal": case.endswith("causal")}
    if "padding" in case:
        kw["mask"] = key_padding(s)
    if "bias" in case:  # T5: relative-position bias, logits not scaled (q's init carries it)
        kw["bias"] = normal((1, HEADS, T, s), 5)
        kw["scale"] = 1.0
    policy = get_policy("fp32")
    out, grads = _outputs_and_grads("pallas", q, k, v, policy, **dict(kw))
    ref_out, ref_grads = _outputs_and_grads("xla", q, k, v, policy, **dict(kw))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    for g, r in zip(grads, ref_grads, strict=True):  # dq, dk, dv (and the bias gradient)
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    if "padding" in case:  # the padded keys of example 1 get no gradient
        assert float(jnp.max(jnp.abs(grads[1][1, 37:]))) == 0.0


def segment_ids(length, seed):
    """[B, length] int32: per row, documents 1, 2, ... of random lengths, then padding 0."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, length), np.int32)
    for row in ids:
        cuts = np.sort(rng.choice(np.arange(8, length - 8), 3, replace=False))
        for k, (a, b) in enumerate(zip([0, *cuts[:-1]], cuts, strict=True), 1):
            row[a:b] = k  # cuts[-1]: onwards is padding
    return jnp.asarray(ids)


@pytest.mark.parametrize(
    "case", ["causal", "full", "cross", "t5-bias+causal", "padding", "sharded+causal"]
)
def test_pallas_kernels_take_segment_ids(case):
    """Packed rows: splash (no bias) and flash (T5 bias) get the segment ids as their
    `SegmentIds` and match the XLA path's same-segment mask, outputs and gradients (FP32)."""
    s = 256 if case == "cross" else T
    q, k, v = qkv(t=T, s=s)
    kw = {"causal": case.endswith("causal"), "segment_ids": segment_ids(T, 0)}
    if case == "cross":  # the keys' own ids, in the same numbering
        kw["kv_segment_ids"] = jnp.concatenate([kw["segment_ids"]] * 2, axis=1)
    if case == "padding":  # a key-padding mask too: it keeps a key of every segment
        keep = np.ones((B, s), bool)
        keep[:, 3:5] = False
        kw["mask"] = jnp.asarray(keep)[:, None, None, :]
    if "bias" in case:
        kw["bias"], kw["scale"] = normal((1, HEADS, T, s), 5), 1.0
    policy = get_policy("fp32")
    ref, ref_grads = _outputs_and_grads("xla", q, k, v, policy, **dict(kw))
    mesh = make_mesh((1, 2, 2), jax.devices()[:4]) if case.startswith("sharded") else None
    with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
        out, grads = _outputs_and_grads("pallas", q, k, v, policy, **dict(kw))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    # The mask matters: without the segment ids the outputs differ.
    kw.pop("kv_segment_ids", None), kw.pop("segment_ids")
    assert _rel(_outputs_and_grads("xla", q, k, v, policy, **kw)[0], ref) > 1e-2


def test_pallas_kernels_in_bf16_within_rounding_of_xla():
    """BF16 inputs: both paths round the probabilities to BF16 before the PV matmul, so they
    agree to a few BF16 ulps; the FP32 reference of the same inputs bounds both."""
    q, k, v = qkv(jnp.bfloat16)
    bias = normal((1, HEADS, T, T), 5)
    policy = get_policy("bf16")
    for kw in ({"causal": True}, {"bias": bias, "mask": key_padding()}):
        out, grads = _outputs_and_grads("pallas", q, k, v, policy, **dict(kw))
        ref, ref_grads = _outputs_and_grads("xla", q, k, v, policy, **dict(kw))
        exact, _ = _outputs_and_grads(
            "xla", *(x.astype(jnp.float32) for x in (q, k, v)), get_policy("fp32"), **dict(kw)
        )
        assert out.dtype == jnp.bfloat16
        assert _rel(out, ref) < 1e-2 and _rel(out, exact) < 1e-2
        for g, r in zip(grads, ref_grads, strict=True):
            assert _rel(g, r) < 2e-2, _rel(g, r)


def test_pallas_under_a_sharded_mesh_matches_xla():
    """Batch over fsdp and heads over tensor: the kernels run per device under shard_map."""
    q, k, v = qkv()
    kw = {"causal": True, "mask": key_padding()}
    policy = get_policy("fp32")
    ref, ref_grads = _outputs_and_grads("xla", q, k, v, policy, **dict(kw))
    mesh = make_mesh((1, 2, 2), jax.devices()[:4])
    with jax.set_mesh(mesh):
        out, grads = _outputs_and_grads("pallas", q, k, v, policy, **dict(kw))
        with attn_lib.pallas_interpret():
            text = (
                jax.jit(
                    lambda q: attn_lib.attention(q, k, v, policy, implementation="pallas", **kw)
                )
                .lower(q)
                .as_text()
            )
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_unsupported_call_falls_back_under_auto_and_raises_when_forced(caplog):
    q, k, v = qkv(t=96, s=96)  # not a multiple of 128
    policy = get_policy("fp32")
    ref = attn_lib.xla_attention(q, k, v, policy, causal=True)
    attn_lib._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="bf16jax.nn.attention"):
        out = attn_lib.attention(
            q, k, v, policy, causal=True, implementation="pallas", fallback=True
        )
    np.testing.assert_array_equal(out, ref)
    assert "pallas kernel not used (lengths T=96, S=96 are not multiples of 128)" in caplog.text
    with pytest.raises(ValueError, match="attention_impl='pallas' cannot run this attention"):
        attn_lib.attention(q, k, v, policy, causal=True, implementation="pallas")
    # A general (per-query) mask is not a key-padding mask either.
    q, k, v = qkv()
    with pytest.raises(ValueError, match="is not a key-padding mask"):
        attn_lib.attention(
            q, k, v, policy, mask=jnp.ones((B, 1, T, T), bool), implementation="pallas"
        )


def test_attention_dropout_runs_on_the_xla_path():
    """Only the XLA path drops attention probabilities: "auto" falls back to it (the same
    output as XLA with the same key), a forced kernel says how to turn dropout off."""
    q, k, v = qkv(t=T, s=T)
    policy = get_policy("fp32")
    key = jax.random.key(3)
    kw = dict(causal=True, dropout_rate=0.5, dropout_key=key)
    ref = attn_lib.xla_attention(q, k, v, policy, **kw)
    assert not np.allclose(ref, attn_lib.xla_attention(q, k, v, policy, causal=True))
    out = attn_lib.attention(q, k, v, policy, implementation="pallas", fallback=True, **kw)
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="no attention-probability dropout .*attention_dropout"):
        attn_lib.attention(q, k, v, policy, implementation="pallas", **kw)


def test_gpt_with_pallas_attention_matches_xla():
    """A whole GPT built for a TPU (splash attention, causal) gives the XLA model's loss and
    gradients: the kernel is wired into the model, masks and all."""
    cfg = tiny_gpt_config("fp32").model.copy_and_resolve_references()
    cfg.update(max_len=T)
    tokens = np.random.default_rng(0).integers(0, 384, (2, T + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss_and_grads(platform):
        model = build_model(cfg, "fp32", rngs=nnx.Rngs(0), platform=platform)

        def loss(m):
            return cross_entropy(*m.logits_and_targets(batch))[0]

        with attn_lib.pallas_interpret():
            return nnx.jit(nnx.value_and_grad(loss))(model)

    (loss_p, grads_p), (loss_x, grads_x) = loss_and_grads("tpu"), loss_and_grads("cpu")
    np.testing.assert_allclose(loss_p, loss_x, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_p, grads_x
    )


@pytest.mark.parametrize("policy,t", [("fp32", T), ("bf16", T), ("fp32", 96)],
                         ids=["fp32", "bf16", "untiled-fallback"])  # fmt: skip
def test_heads_first_projections_equal_the_token_major_path(policy, t):
    """A Pallas layer with fused projections runs q, k, v and o heads first ([B, H, T, Dh],
    the kernel's layout, q pre-scaled by the power-of-two 1/sqrt(Dh)): outputs and gradients
    equal the [B, T, H, Dh] path's, and a length the kernel cannot tile (96) falls back to XLA
    with the same result."""
    from bf16jax.nn import layers

    attn = layers.Attention(HEADS * DH, HEADS, policy=get_policy(policy), name="attn",
                            rngs=nnx.Rngs(0), causal=True, platform="tpu")  # fmt: skip
    assert attn.implementation == "pallas" and attn._heads_first_ok()
    x = jax.random.normal(jax.random.key(1), (B, t, HEADS * DH), jnp.float32)

    def run(fuse):
        attn.fuse_projections = fuse
        graphdef, params = nnx.split(attn)

        def loss(p, x):
            out = nnx.merge(graphdef, p)(x)
            return jnp.sum(out.astype(jnp.float32) * jnp.cos(x)), out

        with attn_lib.pallas_interpret():
            (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
        return out, grads

    (out_h, grads_h), (out_t, grads_t) = run(True), run(False)
    assert out_h.dtype == out_t.dtype
    tol = dict(rtol=1e-5, atol=1e-5) if policy == "fp32" else dict(rtol=2**-7, atol=2**-7)
    np.testing.assert_allclose(np.asarray(out_h, np.float64), np.asarray(out_t, np.float64), **tol)
    # Absolute tolerance on the scale of all gradients: the k bias's gradient is zero up to
    # rounding noise (softmax ignores a shift shared by every key), so its own scale is noise.
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads_t)]
    scale = max(np.abs(x).max() for x in leaves)
    for a, b in zip(jax.tree.leaves(grads_h), leaves, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol["rtol"],
                                   atol=tol["atol"] * scale)  # fmt: skip


def test_default_gpt_on_a_tpu_target_runs_attention_heads_first(monkeypatch):
    """The default config (attention_impl "auto", fused projections left to the platform), built
    for a TPU and traced under a TPU mesh as an AOT compile on a CPU host sees it (an
    AbstractMesh whose devices say "tpu"), takes the heads-first path: q, k, v from one GEMM as
    [B, H, T, Dh] into the kernel, no [B, T, H, Dh] swaps (experiments/results/program_compare/).
    Before target_platform read an AbstractMesh's device (791997c) it said "cpu" here, the
    projections were not fused and the measured TPU step ran the token-major path."""
    from jax._src.mesh import AbstractDevice  # no public constructor in jax 0.10.2

    from bf16jax.nn import layers
    from bf16jax.parallel import sharding

    cfg = tiny_gpt_config("bf16").model.copy_and_resolve_references()
    cfg.update(max_len=T)
    assert cfg.attention_impl in ("auto", None, "")
    model = build_model(cfg, "bf16", rngs=nnx.Rngs(0), platform="tpu")
    calls = []
    fused_heads = layers.fused_heads
    monkeypatch.setattr(
        layers, "fused_heads", lambda *a, **k: calls.append(1) or fused_heads(*a, **k)
    )
    axes = sharding.MESH_AXES
    mesh = jax.sharding.AbstractMesh(
        (1,) * len(axes), axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
        abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"),
    )  # fmt: skip
    tokens = jax.ShapeDtypeStruct((2, T), jnp.int32)
    with jax.sharding.use_abstract_mesh(mesh):
        assert sharding.target_platform() == "tpu"
        jax.eval_shape(lambda t: model(t), tokens)
    assert calls == [1] * cfg.num_layers


# ----------------------------------------------------------------------------- cuDNN (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal", "key-padding", "t5-bias"])
def test_cudnn_matches_xla_on_gpu(case):
    q, k, v = qkv(jnp.bfloat16)
    kw = {"causal": case == "causal"}
    if case == "key-padding":
        kw["mask"] = key_padding()
    if case == "t5-bias":
        kw["bias"] = normal((1, HEADS, T, T), 5)
    policy = get_policy("bf16")
    out, grads = _outputs_and_grads("cudnn", q, k, v, policy, **dict(kw))
    ref, ref_grads = _outputs_and_grads("xla", q, k, v, policy, **dict(kw))
    assert out.dtype == jnp.bfloat16
    assert _rel(out, ref) < 1e-2, _rel(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        assert _rel(g, r) < 2e-2, _rel(g, r)
    # auto on a GPU: cuDNN for this call, except with a bias (kept FP32 on the XLA path).
    impl, auto = attn_lib.resolve_implementation("auto", compute_dtype=BF16)
    assert (impl, auto) == ("cudnn", True)
