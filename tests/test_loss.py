"""The cross-entropy: the fused chunked loss against the materialised one (loss, aux metrics and
gradients for tied / untied / biased heads under fp32, bf16 and bf16-pure, chunking, z-loss,
weights, masked labels, per-example targets, any cotangent; the trainer's choice of loss), and
masked / out-of-range targets in both (issue #13, defect 6: before, a label outside [0, V) gave
a NaN loss even at weight 0 (-100, the usual ignore label, or >= V), with finite gradients, so
the step was not skipped; -1 silently wrapped to V - 1)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bf16jax.evaluation import calibration as metrics
from bf16jax.nn import loss as loss_lib
from bf16jax.nn.layers import Embed, Linear
from bf16jax.precision import get_policy

B, T, D, V = 4, 12, 16, 37
# Stated tolerance: loss and aux within 1e-5 relative, every gradient within 1e-4 of its
# largest entry (measured: ~5e-7, FP32 summation order; the 16-bit backward GEMMs see the same
# BF16 operands in both paths).
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def make_head(kind, policy):
    with nnx.use_eager_sharding(False):
        if kind == "tied":
            return Embed(V, D, policy=policy, name="embed", rngs=nnx.Rngs(0), stddev=0.5)
        return Linear(D, V, policy=policy, name="head", rngs=nnx.Rngs(1), use_bias=kind == "bias")


def data(shape=(B, T), seed=0, policy=None):
    rng = np.random.default_rng(seed)
    hidden = normal((*shape, D), seed, policy.compute_dtype if policy else jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, shape), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=shape) > 0.3, jnp.float32)
    return hidden, targets, weights


def both(head, hidden, targets, weights, *, z_loss=0.0, chunk_tokens=8, grad_scale=None):
    """((loss, aux), grads w.r.t. (head params, hidden)) materialised and fused, jitted."""
    graphdef, params = nnx.split(head)

    def materialized(p, h):
        logits = loss_lib.head_logits(h, nnx.merge(graphdef, p))
        return loss_lib.cross_entropy(logits, targets, weights, z_loss=z_loss)

    def fused(p, h):
        return loss_lib.fused_cross_entropy(
            h, nnx.merge(graphdef, p), targets, weights, z_loss=z_loss,
            chunk_tokens=chunk_tokens, grad_scale=grad_scale,
        )  # fmt: skip

    @jax.jit
    def run(p, h):
        grad = [jax.value_and_grad(f, (0, 1), has_aux=True)(p, h) for f in (materialized, fused)]
        return tuple(grad)

    return run(params, hidden)


def assert_close(ref, got):
    (l0, a0), g0 = ref
    (l1, a1), g1 = got
    np.testing.assert_allclose(l1, l0, rtol=LOSS_RTOL)
    for key in a0:
        np.testing.assert_allclose(a1[key], a0[key], rtol=LOSS_RTOL, atol=1e-7, err_msg=key)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(y, x, atol=GRAD_RTOL * np.abs(x).max())


@pytest.mark.parametrize(
    "kind,policy", [("tied", "bf16"), ("bias", "bf16"), ("plain", "fp32"), ("tied", "bf16-pure")]
)
def test_fused_matches_materialized(kind, policy):
    """Several chunks (T=12 in chunks of 2), z-loss, zero weights, a loss scale of 2^10."""
    policy = get_policy(policy)
    head = make_head(kind, policy)
    hidden, targets, weights = data(policy=policy)
    best = jnp.argmax(loss_lib.head_logits(hidden, head), -1).astype(jnp.int32)
    targets = jnp.where(jnp.arange(T) % 2 == 0, best, targets)  # about half right
    ref, got = both(head, hidden, targets, weights, z_loss=1e-2, chunk_tokens=8, grad_scale=1024.0)
    assert_close(ref, got)
    (_, aux), (param_grads, _) = got
    assert 0 < float(aux["accuracy"]) < 1 and float(aux["weight_sum"]) == float(weights.sum())
    # FP32 master weights get FP32 gradients; bf16-pure's BF16 params get BF16 ones.
    for g in jax.tree.leaves(param_grads):
        assert g.dtype == policy.param_dtype


def test_chunking_does_not_change_the_result():
    policy = get_policy("bf16")
    head = make_head("tied", policy)
    hidden, targets, weights = data(policy=policy)
    one = both(head, hidden, targets, weights, chunk_tokens=10_000)[1]
    many = both(head, hidden, targets, weights, chunk_tokens=4)[1]  # 12 chunks of one token
    assert_close(one, many)


def _scan_lengths(fn, *args) -> list[int]:
    """Lengths of the scans in `fn`'s jaxpr (the fused loss's chunk loop)."""
    text = str(jax.make_jaxpr(fn)(*args))
    return [int(n) for n in re.findall(r"length=(\d+)", text)]


def test_a_prime_length_pads_its_last_chunk():
    """T = 13 (prime) in chunks of <= 8 tokens over 4 rows: 7 chunks of 2 tokens, the last
    padded by one, not 13 chunks of one token; the loss and gradients are the materialised."""
    assert loss_lib.chunk_layout(13, 4, 8) == (2, 7)
    assert loss_lib.chunk_layout(1021, 16, 1024) == (64, 16)  # gpt2_124m's batch at T = 1021
    assert loss_lib.chunk_layout(1024, 16, 1024) == (64, 16)  # a divisor: no padding
    assert loss_lib.chunk_layout(5, 1, 1024) == (5, 1)
    policy = get_policy("bf16")
    head = make_head("tied", policy)
    hidden, targets, weights = data(shape=(B, 13), policy=policy)
    ref, got = both(head, hidden, targets, weights, z_loss=1e-2, chunk_tokens=8)
    assert_close(ref, got)
    assert float(got[0][1]["weight_sum"]) == float(weights.sum())

    def fused(h):
        return loss_lib.fused_cross_entropy(h, head, targets, weights, chunk_tokens=8)[0]

    assert _scan_lengths(jax.grad(fused), hidden) == [7]


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_one_pass_reduction_matches_the_materialised_loss(z_loss, monkeypatch):
    """The TPU's one-pass log Z and argmax (forced on here): loss, aux and gradients as the
    materialised loss, with tied maxima (zero hidden rows: every logit 0, argmax the first
    class) and an ignored label."""
    monkeypatch.setattr(loss_lib, "one_pass_reduction", lambda: True)
    policy = get_policy("bf16")
    head = make_head("tied", policy)
    hidden, targets, weights = data(policy=policy)
    hidden = hidden.at[:, :3].set(0)
    targets = targets.at[:, 0].set(0).at[:, 1].set(1).at[0, 5].set(-100)
    weights = weights.at[:, :2].set(1.0).at[0, 5].set(0.0)
    ref, got = both(head, hidden, targets, weights, z_loss=z_loss, chunk_tokens=8)
    assert_close(ref, got)
    assert float(got[0][1]["accuracy"]) > 0
    # the one-pass reduction is in the program (a reduce of three operands), else not
    text = str(
        jax.make_jaxpr(lambda h: loss_lib.fused_cross_entropy(h, head, targets, weights)[0])(hidden)
    )
    monkeypatch.setattr(loss_lib, "one_pass_reduction", lambda: False)
    two = str(
        jax.make_jaxpr(lambda h: loss_lib.fused_cross_entropy(h, head, targets, weights)[0])(hidden)
    )
    assert "reduce[" in text and "reduce[" not in two


def test_one_pass_reduction_with_the_vocabulary_sharded(monkeypatch):
    """The one-pass reduction on a data=2, fsdp=2, tensor=2 mesh, the tied table's vocabulary
    split over "tensor" (GSPMD partitions the three-operand reduce): the materialised loss."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bf16jax.parallel import sharding

    monkeypatch.setattr(loss_lib, "one_pass_reduction", lambda: True)
    policy = get_policy("bf16")
    with nnx.use_eager_sharding(False):  # 40 classes: two vocabulary shards of 20
        head = Embed(40, D, policy=policy, name="embed", rngs=nnx.Rngs(0), stddev=0.5)
    hidden, targets, weights = data(shape=(8, T), policy=policy)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        graphdef, params = nnx.split(head)
        nnx.update(head, jax.device_put(params, NamedSharding(mesh, P("tensor", "fsdp"))))
        hidden = jax.device_put(hidden, NamedSharding(mesh, P(("data", "fsdp"))))
        assert_close(*both(head, hidden, targets, weights, z_loss=1e-2, chunk_tokens=16))


def test_masked_labels_with_zero_weight_are_ignored():
    """Issue 13's convention: out-of-range labels (e.g. -100) with weight 0 drop out."""
    policy = get_policy("bf16")
    head = make_head("tied", policy)
    hidden, targets, weights = data(policy=policy)
    masked = jnp.where(weights > 0, targets, -100)
    (loss, aux), grads = both(head, hidden, masked, weights)[1]
    (ref_loss, ref_aux), ref_grads = both(head, hidden, targets, weights)[1]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(aux["accuracy"], ref_aux["accuracy"], rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=1e-7)


def test_per_example_targets_and_any_cotangent():
    """ViT: hidden [B, D], targets [B]; and d(3 * loss) = 3 * d(loss) whatever grad_scale says."""
    policy = get_policy("bf16")
    head = make_head("bias", policy)
    hidden, targets, weights = data(shape=(B,), policy=policy)
    assert_close(*both(head, hidden, targets, weights))
    graphdef, params = nnx.split(head)

    def tripled(p):
        fused = loss_lib.fused_cross_entropy(hidden, nnx.merge(graphdef, p), targets, weights)
        return 3.0 * fused[0]

    def plain(p):
        logits = loss_lib.head_logits(hidden, nnx.merge(graphdef, p))
        return loss_lib.cross_entropy(logits, targets, weights)[0]

    g3, g1 = jax.grad(tripled)(params), jax.grad(plain)(params)
    for a, b in zip(jax.tree.leaves(g3), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, 3 * b, rtol=1e-5, atol=1e-7)


def test_bad_heads_and_shapes():
    policy = get_policy("bf16; q=w8a8; head->q=w8a8")
    quantized = make_head("plain", policy)
    hidden, targets, _ = data(policy=policy)
    with pytest.raises(ValueError, match="quantized.*loss_impl='materialized'"):
        loss_lib.fused_cross_entropy(hidden, quantized, targets)
    head = make_head("tied", get_policy("bf16"))
    with pytest.raises(ValueError, match="do not match"):
        loss_lib.fused_cross_entropy(hidden[:, :5], head, targets)
    with pytest.raises(ValueError, match="integer class ids"):
        loss_lib.fused_cross_entropy(hidden, head, targets.astype(jnp.float32))


def test_trainer_chooses_the_loss():
    from tiny import tiny_gpt_config

    from bf16jax import config as config_lib
    from bf16jax.training import trainer as train

    def loss_of(config):
        return train.create_trainer(config, mesh=_one_device_mesh()).loss

    assert loss_of(tiny_gpt_config("bf16")).fused  # auto: a language model
    assert not loss_of(tiny_gpt_config("bf16", loss_impl="materialized")).fused
    untied = tiny_gpt_config("bf16; head->q=w8a8")
    untied.unlock()
    untied.model.tie_embeddings = False
    assert not loss_of(untied).fused  # auto: a quantized head is not fusable
    untied.train.loss_impl = "fused"
    with pytest.raises(ValueError, match="loss_impl='fused'.*quantized"):
        loss_of(untied)
    vit = config_lib.base_config("vit")
    vit.model.update(num_layers=1)
    assert not loss_of(vit).fused  # auto: 10 classes, nothing to save
    vit.train.loss_impl = "fused"
    assert loss_of(vit).fused
    vit.train.loss_impl = "chunked"
    with pytest.raises(ValueError, match="train.loss_impl='chunked'"):
        config_lib.validate(vit)


def _one_device_mesh():
    from tiny import make_mesh

    return make_mesh((1, 1, 1), jax.devices()[:1])


# ----------------------------------------------------------------------------- masked targets
C = 7  # classes


def _logits_batch():
    logits = jax.random.normal(jax.random.key(0), (2, 4, C)) * 3
    targets = jnp.array([[1, 2, 3, 4], [5, 6, 0, 1]], jnp.int32)
    weights = jnp.ones((2, 4), jnp.float32)
    return logits, targets, weights


@pytest.mark.parametrize("label", [-100, -1, C, 10_000])
def test_ignored_positions_with_weight_zero_give_the_loss_without_them(label):
    logits, targets, weights = _logits_batch()
    weights = weights.at[1, 2].set(0.0)
    want, _ = loss_lib.cross_entropy(logits, targets, weights)
    bad = targets.at[1, 2].set(label)
    for fn in (loss_lib.cross_entropy, jax.jit(loss_lib.cross_entropy)):
        loss, aux = fn(logits, bad, weights)
        assert float(loss) == pytest.approx(float(want), rel=1e-6) and np.isfinite(float(loss))
        assert float(aux["invalid_targets"]) == 0.0
    grads = jax.jit(jax.grad(lambda x: loss_lib.cross_entropy(x, bad, weights)[0]))(logits)
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads[1, 2]).max()) == 0.0
    stats = jax.jit(metrics.prediction_stats)(logits, bad, weights)
    assert np.all(np.isfinite(np.asarray(stats["nll"]))) and float(stats["nll"][6]) == 0.0


@pytest.mark.parametrize("label", [-1, C])
def test_out_of_range_labels_with_positive_weight_are_errors(label):
    logits, targets, weights = _logits_batch()
    bad = targets.at[0, 1].set(label)
    with pytest.raises(ValueError, match=rf"1 target\(s\) outside \[0, {C}\).*\[{label}\]"):
        loss_lib.cross_entropy(logits, bad, weights)  # eager: a clear error
    # Under jit: the loss is NaN, the gradients too (so the train step is skipped, not trained
    # on a wrapped label), and the count says why.
    loss, aux = jax.jit(loss_lib.cross_entropy)(logits, bad, weights)
    assert np.isnan(float(loss)) and float(aux["invalid_targets"]) == 1.0
    grads = jax.jit(jax.grad(lambda x, t, w: loss_lib.cross_entropy(x, t, w)[0]))(
        logits, bad, weights
    )
    assert bool(jnp.any(jnp.isnan(grads)))
    wrapped, _ = jax.jit(loss_lib.cross_entropy)(logits, targets.at[0, 1].set(C - 1), weights)
    assert np.isfinite(float(wrapped))  # what -1 used to be read as


def test_fused_loss_treats_out_of_range_labels_as_the_materialised_one():
    """Positive-weight labels outside [0, V): ValueError eagerly; under jit (labels traced, as
    in the train step) a NaN loss, NaN gradients (the step is skipped) and `invalid_targets`
    counting them, as `cross_entropy`."""
    policy = get_policy("bf16")
    head = make_head("tied", policy)
    hidden, targets, weights = data(policy=policy)
    bad = targets.at[0, 3].set(-1).at[1, 5].set(V)
    weights = weights.at[0, 3].set(1.0).at[1, 5].set(1.0)
    with pytest.raises(ValueError, match=rf"2 target\(s\) outside \[0, {V}\)"):
        loss_lib.fused_cross_entropy(hidden, head, bad, weights)
    graphdef, params = nnx.split(head)

    def fused(p, h, t, w):
        return loss_lib.fused_cross_entropy(h, nnx.merge(graphdef, p), t, w, chunk_tokens=8)

    grad_fn = jax.jit(jax.value_and_grad(fused, (0, 1), has_aux=True))
    (loss, aux), (param_grads, hidden_grad) = grad_fn(params, hidden, bad, weights)
    assert np.isnan(float(loss)) and float(aux["invalid_targets"]) == 2.0
    assert bool(jnp.any(jnp.isnan(hidden_grad)))
    assert all(bool(jnp.any(jnp.isnan(g))) for g in jax.tree.leaves(param_grads))
    (loss, aux), _ = grad_fn(params, hidden, targets, weights)  # the same labels in range
    assert np.isfinite(float(loss)) and float(aux["invalid_targets"]) == 0.0


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fused_gradient_of_the_weights_is_the_materialised_one(z_loss):
    """d loss / d weights (e.g. a learned per-token weighting): the fused loss returned zeros."""
    policy = get_policy("bf16")
    head = make_head("tied", policy)
    hidden, targets, weights = data(policy=policy)
    weights = weights * jnp.linspace(0.5, 2.0, T)  # fractional, some 0

    def materialized(w):
        return loss_lib.cross_entropy(loss_lib.head_logits(hidden, head), targets, w,
                                      z_loss=z_loss)[0]  # fmt: skip

    def fused(w):
        return loss_lib.fused_cross_entropy(hidden, head, targets, w, z_loss=z_loss,
                                            chunk_tokens=8, grad_scale=1024.0)[0]  # fmt: skip

    ref, got = jax.jit(jax.grad(materialized))(weights), jax.jit(jax.grad(fused))(weights)
    assert float(jnp.abs(ref).max()) > 1e-3  # a real gradient, not zeros
    np.testing.assert_allclose(got, ref, atol=GRAD_RTOL * float(jnp.abs(ref).max()))
    # All weights 0: the loss is 0 and its gradient each token's term (the denominator is 1).
    zeros = jnp.zeros_like(weights)
    np.testing.assert_allclose(jax.grad(fused)(zeros), jax.grad(materialized)(zeros),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
