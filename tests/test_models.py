"""Model families on tiny sizes: dtypes per policy, FP32 logits, BF16-vs-FP32 agreement, GPT
causality, T5 encoder padding, GPT scan == unrolled, remat == no remat, config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bf16jax.models import build_model, param_count
from bf16jax.nn.loss import cross_entropy
from bf16jax.precision import get_policy

POLICIES = ("fp32", "bf16", "bf16-pure")
FAMILIES = ("gpt", "t5", "vit")
TINY = {
    "gpt": dict(
        vocab_size=40,
        num_layers=2,
        num_heads=2,
        embed_dim=16,
        mlp_dim=32,
        max_len=12,
        scan_layers=False,
        remat="none",
        attention_impl="auto",
    ),
    "t5": dict(
        vocab_size=40,
        embed_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=24,
        num_encoder_layers=2,
        num_decoder_layers=2,
        tie_embeddings=False,
        relpos_buckets=8,
        relpos_max_distance=16,
        attention_impl="auto",
    ),
    "vit": dict(
        image_size=8,
        patch_size=4,
        channels=1,
        num_classes=10,
        embed_dim=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
        attention_impl="auto",
    ),
}


def tiny_config(name, **changes):
    cfg = ml_collections.ConfigDict(dict(name=name, **TINY[name]))
    cfg.update(changes)
    cfg.lock()
    return cfg


def make_model(name, policy, seed=0, **changes):
    return build_model(tiny_config(name, **changes), get_policy(policy), rngs=nnx.Rngs(seed))


def make_batch(name, seed=0):
    rng = np.random.default_rng(seed)
    if name == "gpt":
        tokens = rng.integers(2, 40, (2, 11), dtype=np.int32)
        return dict(
            inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=np.ones((2, 10), np.float32)
        )
    if name == "t5":
        enc = rng.integers(2, 40, (2, 9), dtype=np.int32)
        enc[1, 6:] = 0  # padding
        dec = rng.integers(2, 40, (2, 6), dtype=np.int32)
        weights = np.ones((2, 6), np.float32)
        weights[1, 4:] = 0.0
        return dict(encoder_inputs=enc, decoder_inputs=dec, targets=dec, weights=weights)
    return dict(
        image=rng.uniform(0, 1, (3, 8, 8, 1)).astype(np.float32),
        label=np.array([0, 3, 9], np.int32),
    )


def features(model, batch):
    if "inputs" in batch:
        return model.features(batch["inputs"])
    if "image" in batch:
        return model.features(batch["image"])
    return model.features(batch["encoder_inputs"], batch["decoder_inputs"])


@nnx.jit
def logits_fn(model, batch):
    return model.logits_and_targets(batch)


@nnx.jit
def run_all(model, batch):
    """features, (logits, targets, weights), loss and grads in one compiled call."""

    def loss_fn(m):
        logits, targets, weights = m.logits_and_targets(batch)
        return cross_entropy(logits, targets, weights)[0], (logits, targets, weights)

    (loss, outs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return features(model, batch), outs, loss, grads


@nnx.jit
def forward(model, *inputs):
    return model(*inputs)


def param_dtypes(tree):
    """{'path/to/param': dtype} for every nnx.Param of a model (or of a State, e.g. grads)."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    flat = nnx.to_flat_state(state)
    return {"/".join(map(str, path)): var[...].dtype for path, var in flat}


def copy_params(src, dst, policy):
    """Loads `src`'s params into `dst`, cast to `policy`'s param dtype."""
    nnx.update(dst, get_policy(policy).cast_to_param(nnx.state(src, nnx.Param)))


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_dtypes_logits_and_grads(name, policy_name):
    policy = get_policy(policy_name)
    model = make_model(name, policy_name)
    batch = make_batch(name)
    assert set(param_dtypes(model).values()) == {policy.param_dtype}
    feats, (logits, targets, weights), loss, grads = run_all(model, batch)
    assert feats.dtype == policy.output_dtype
    assert logits.dtype == jnp.float32 and targets.dtype == jnp.int32
    assert weights.dtype == jnp.float32 and weights.shape == targets.shape
    assert logits.shape == targets.shape + (10 if name == "vit" else 40,)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    # At init every class is about equally likely: the loss is near log(num_classes).
    assert abs(float(loss) - np.log(logits.shape[-1])) < 1.0
    grad_leaves = jax.tree.leaves(grads)
    assert {g.dtype for g in grad_leaves} == {policy.param_dtype}
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad_leaves)
    assert (
        sum(float(jnp.sum(jnp.abs(g.astype(jnp.float32)))) > 0 for g in grad_leaves)
        > len(grad_leaves) // 2
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_overrides_respected(name):
    spec = "bf16-pure; .*norm.*->fp32; head->fp32"
    model = make_model(name, spec)
    dtypes = param_dtypes(model)
    norms = {p for p in dtypes if "norm" in p}
    heads = {p for p in dtypes if p.startswith("head/")}
    assert norms and (heads or name == "gpt")
    for path, dtype in dtypes.items():
        want = jnp.float32 if path in norms | heads else jnp.bfloat16
        assert dtype == want, (path, dtype)
    batch = make_batch(name)
    feats, (logits, _, _), _, grads = run_all(model, batch)
    assert feats.dtype == jnp.bfloat16  # output dtype of the base policy
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert param_dtypes(grads) == dtypes


@pytest.mark.parametrize("policy_name", ("bf16", "bf16-pure"))
@pytest.mark.parametrize("name", FAMILIES)
def test_low_precision_matches_fp32(name, policy_name):
    ref_model = make_model(name, "fp32")
    model = make_model(name, policy_name, seed=1)
    copy_params(ref_model, model, policy_name)
    batch = make_batch(name)
    ref = np.asarray(logits_fn(ref_model, batch)[0])
    out = np.asarray(logits_fn(model, batch)[0])
    err = np.max(np.abs(out - ref)) / np.std(ref)
    # BF16 has 8 significant bits (rel. 2^-8 = 0.4%); a few layers of rounding stay well below
    # 10% of the logits' spread, while a wrong cast, scale or mask moves them by O(1).
    assert 0 < err < 0.1, err


def test_gpt_is_causal():
    model = make_model("gpt", "fp32")
    tokens = make_batch("gpt")["inputs"]
    changed = tokens.copy()
    changed[:, 6] = (changed[:, 6] + 1) % 40
    a, b = (np.asarray(forward(model, jnp.asarray(t))) for t in (tokens, changed))
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.max(np.abs(a[:, 6:] - b[:, 6:])) > 1e-3


def test_t5_encoder_padding_is_masked():
    model = make_model("t5", "fp32")
    batch = make_batch("t5")
    enc, dec = batch["encoder_inputs"], batch["decoder_inputs"]
    full = np.asarray(forward(model, jnp.asarray(enc), jnp.asarray(dec)))
    # Row 1 has 6 real tokens then padding: without the padding its outputs must not change.
    short = np.asarray(forward(model, jnp.asarray(enc[1:, :6]), jnp.asarray(dec[1:])))
    np.testing.assert_allclose(full[1:], short, atol=1e-5)
    # Control: a real token in the padded slot does change the outputs.
    unpadded = enc.copy()
    unpadded[1, 6] = 5
    other = np.asarray(forward(model, jnp.asarray(unpadded), jnp.asarray(dec)))
    np.testing.assert_allclose(full[0], other[0], atol=1e-5)
    assert np.max(np.abs(full[1] - other[1])) > 1e-3


def test_t5_tied_embeddings():
    model = make_model("t5", "bf16", tie_embeddings=True)
    assert not any(p.startswith("head/") for p in param_dtypes(model))
    logits, _, _ = logits_fn(model, make_batch("t5"))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    # embed_dim**-0.5 scaling keeps tied logits O(1) at init.
    assert float(jnp.std(logits)) < 3.0


def _unstacked(stacked, like):
    """`stacked` (a scanned GPT's params or grads, blocks [L, ...]) in the layout of `like`."""
    flat = {path: var[...] for path, var in nnx.to_flat_state(stacked)}
    out = []
    for path, var in nnx.to_flat_state(like):
        if path[0] == "blocks":  # ("blocks", i, *rest) <- ("blocks", *rest)[i]
            value = flat[("blocks",) + tuple(path[2:])][path[1]]
        else:
            value = flat[path]
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


@pytest.mark.parametrize("remat", ("save_dots", "full"))
def test_gpt_scan_and_remat_match_unrolled(remat):
    """Scanned + rematerialized blocks give the unrolled model's logits and grads."""
    scanned = make_model("gpt", "fp32", scan_layers=True, remat=remat)
    unrolled = make_model("gpt", "fp32", seed=1)
    kernel = scanned.blocks.attn.q.kernel
    assert kernel.shape[0] == 2 and kernel.get_metadata()["out_sharding"][0] == "layers"
    assert param_count(scanned) == param_count(unrolled)
    nnx.update(unrolled, _unstacked(nnx.state(scanned, nnx.Param), nnx.state(unrolled, nnx.Param)))
    batch = make_batch("gpt")
    _, (logits_s, _, _), loss_s, grads_s = run_all(scanned, batch)
    _, (logits_u, _, _), loss_u, grads_u = run_all(unrolled, batch)
    np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        _unstacked(grads_s, grads_u),
        grads_u,
    )


@pytest.mark.parametrize("remat", ("save_dots", "full"))
def test_remat_gives_same_grads(remat):
    batch = make_batch("gpt")
    _, _, loss_a, grads_a = run_all(make_model("gpt", "fp32"), batch)
    _, _, loss_b, grads_b = run_all(make_model("gpt", "fp32", remat=remat), batch)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_a, grads_b
    )


def test_param_count_gpt():
    d, m, v, t, layers = 16, 32, 40, 12, 2
    # Per block: 2 LayerNorms (scale+bias), q/k/v/o with biases, MLP with biases.
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
    expected = v * d + t * d + layers * block + 2 * d
    assert param_count(make_model("gpt", "fp32")) == expected


@pytest.mark.parametrize(
    "name, changes, match",
    [
        ("bert", {}, "Unknown model.name='bert': use one of 'gpt', 't5', 'vit'"),
        ("gpt", dict(embed_dim=18, num_heads=4), "embed_dim=18 is not divisible by"),
        ("gpt", dict(num_layers=0), "num_layers=0 must be a positive integer"),
        ("gpt", dict(max_len=None), "needs model.max_len"),
        ("gpt", dict(attention_impl="flash"), "model.attention_impl: Unknown attention impl"),
        ("gpt", dict(attention_impl="cudnn"), "attention_impl='cudnn' needs a GPU"),
        ("gpt", dict(remat="dots"), "model.remat='dots' is not valid: use one of 'none'"),
        ("vit", dict(patch_size=3), "image_size=8 is not divisible by model.patch_size=3"),
        ("t5", dict(head_dim=0, embed_dim=18, num_heads=4), "embed_dim=18 is not divisible"),
    ],
)
def test_build_model_errors(name, changes, match):
    cfg = ml_collections.ConfigDict(dict(name=name, **TINY.get(name, TINY["gpt"])))
    cfg.update(changes)
    with pytest.raises(ValueError, match=match):
        build_model(cfg, get_policy("fp32"), rngs=nnx.Rngs(0))


def test_sequence_longer_than_max_len_raises():
    model = make_model("gpt", "fp32")
    with pytest.raises(ValueError, match="exceeds model.max_len=12"):
        model(jnp.ones((1, 13), jnp.int32))


@pytest.mark.parametrize("scan", (False, True))
def test_remat_policies_recompute_what_they_say(scan):
    """Counts the matmuls in the lowered gradient program (nothing compiled): "save_dots"
    recomputes only the 2 attention einsums per block (batch dims b, h: not saved), "full" all 7
    forward matmuls a block's backward needs (q, k, v, scores, PV, o, fc1; fc2's output is not
    needed). A scanned model's loop body holds one block."""
    batch = make_batch("gpt")

    def dots(remat):
        model = make_model("gpt", "bf16", scan_layers=scan, remat=remat)
        graphdef, params = nnx.split(model)

        def loss(params):
            logits, targets, weights = nnx.merge(graphdef, params).logits_and_targets(batch)
            return cross_entropy(logits, targets, weights)[0]

        return jax.jit(jax.grad(loss)).lower(params).as_text().count("stablehlo.dot_general")

    blocks = 1 if scan else TINY["gpt"]["num_layers"]
    none, save_dots, full = dots("none"), dots("save_dots"), dots("full")
    assert save_dots - none == 2 * blocks
    assert full - none == 7 * blocks


# ----------------------------------------------------------------------------- issue 13
def test_per_layer_override_under_scan_is_refused_and_uniform_ones_apply():
    """Before: under scan_layers=True `blocks/1/.*->fp32` built no FP32 param and said nothing."""
    with pytest.raises(ValueError, match=r"'blocks/1/\.\*' treats 'blocks/1/.*scan_layers=True"):
        make_model("gpt", "bf16-pure; blocks/1/.*->fp32", scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers=False"):
        make_model("gpt", "bf16; blocks/0/mlp/.*->q=w8a8", scan_layers=True)
    # A rule that treats every layer alike works under scan, per stacked param.
    model = make_model("gpt", "bf16-pure; blocks/.*/mlp/.*->fp32", scan_layers=True)
    dtypes = param_dtypes(model)
    assert dtypes["blocks/mlp/fc1/kernel"] == jnp.float32
    assert dtypes["blocks/attn/q/kernel"] == jnp.bfloat16
    assert model.blocks.mlp.fc1.kernel.shape[0] == 2  # stacked over both layers
    logits, _, _ = logits_fn(model, make_batch("gpt"))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_rules_that_match_nothing_warn_and_hits_are_reported(caplog):
    from bf16jax.precision import record_paths
    from bf16jax.precision.overrides import describe_rule_hits

    with pytest.warns(UserWarning, match=r"'blockz/\.\*' matches no module"):
        make_model("gpt", "bf16; blockz/.*->fp32")
    with pytest.warns(UserWarning, match="'head' matches no module"):  # GPT ties its logits
        make_model("gpt", "bf16; head->fp32")
    policy = get_policy("bf16; .*norm.*->fp32; blocks/1/attn/.*->p=bf16")
    with record_paths() as paths:
        make_model("gpt", policy)
    text = describe_rule_hits(policy, paths)
    assert ".*norm.* -> p=f32,c=f32,o=f32: 5 module(s)" in text  # 2x2 + norm_f
    assert "blocks/1/attn/.* -> p=bf16,c=bf16,o=bf16: 4 module(s)" in text


def test_fp32_residual_stream():
    """`r=f32` keeps the sum of sub-layer outputs in FP32: the blocks' outputs are FP32 and a
    deep BF16 model's logits move closer to FP32's (issue #13: 12 layers, 1.04e-2 -> 6.96e-3)."""
    cfg = dict(num_layers=12, embed_dim=32, mlp_dim=64, vocab_size=40)
    ref_model = make_model("gpt", "fp32", **cfg)
    batch = make_batch("gpt")
    ref = np.asarray(logits_fn(ref_model, batch)[0], np.float64)
    errs = {}
    for policy in ("bf16", "bf16; r=f32"):
        model = make_model("gpt", policy, **cfg)
        block_out = jax.eval_shape(model.blocks[0], jnp.zeros((1, 4, 32), jnp.bfloat16))
        assert block_out.dtype == (jnp.float32 if "r=" in policy else jnp.bfloat16)
        out = np.asarray(logits_fn(model, batch)[0], np.float64)
        errs[policy] = np.mean(np.abs(out - ref)) / np.mean(np.abs(ref))
    assert errs["bf16; r=f32"] < 0.85 * errs["bf16"], errs
    for name in ("vit", "t5"):
        _, (logits, _, _), _, _ = run_all(make_model(name, "bf16; r=f32"), make_batch(name))
        assert bool(jnp.all(jnp.isfinite(logits)))
