"""Packed rows (issue #25, model side): segment ids keep documents apart in GPT and T5.

A token's logits do not change when another document of its row changes (FP32 and BF16, bit
for bit: masked keys contribute exact zeros); each document of a packed row gets the logits it
gets alone (positions restarting); an unpacked batch runs a program without segment masks;
padding changes no loss (materialised or fused); the cuDNN path warns once and uses XLA; a
packed batch flows through the sharded, micro-batched train step.
"""

import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu
from tiny import tiny_gpt_config

from bf16jax.models import build_model
from bf16jax.nn import attention as attn_lib
from bf16jax.nn.loss import LossOptions, cross_entropy, model_loss
from bf16jax.parallel import sharding
from bf16jax.precision import get_policy
from bf16jax.training import trainer as train

T, E, D = 16, 12, 8  # GPT row; T5 encoder and decoder rows
GPT = dict(
    name="gpt",
    vocab_size=40,
    num_layers=2,
    num_heads=2,
    embed_dim=16,
    mlp_dim=32,
    max_len=T,
    scan_layers=False,
    remat="none",
    attention_impl="auto",
)
T5 = dict(
    name="t5",
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
)


def build(base, policy="fp32", platform=None, **changes):
    cfg = ml_collections.ConfigDict({**base, **changes})
    return build_model(cfg, get_policy(policy), rngs=nnx.Rngs(0), platform=platform)


def tokens(n, seed):
    return np.random.default_rng(seed).integers(2, 40, n).astype(np.int32)


def pack(docs, length):
    """(ids, segment ids, positions) [length] of `docs` packed in order, 0-padded."""
    ids, seg, pos = (np.zeros(length, np.int32) for _ in range(3))
    start = 0
    for k, doc in enumerate(docs, 1):
        end = start + len(doc)
        ids[start:end], seg[start:end], pos[start:end] = doc, k, np.arange(len(doc))
        start = end
    return ids, seg, pos


def gpt_batch(docs):
    ids, seg, pos = (jnp.asarray(x[None]) for x in pack(docs, T))
    return ids, {"segment_ids": seg, "positions": pos}


def shifted(target):
    """The decoder input of one example: its target shifted right, start token PAD (0)."""
    return np.concatenate([[0], target[:-1]]).astype(np.int32)


def t5_batch(examples):
    """Packed T5 inputs of [(encoder tokens, target tokens), ...]: (enc, dec, packing)."""
    enc, enc_seg, enc_pos = pack([e for e, _ in examples], E)
    dec, dec_seg, dec_pos = pack([shifted(t) for _, t in examples], D)
    j = lambda x: jnp.asarray(x[None])  # noqa: E731
    packing = dict(
        encoder_segment_ids=j(enc_seg),
        encoder_positions=j(enc_pos),
        decoder_segment_ids=j(dec_seg),
        decoder_positions=j(dec_pos),
    )
    return j(enc), j(dec), packing


GPT_DOCS = [tokens(6, 1), tokens(7, 2)]  # 13 tokens + 3 padding
T5_EXAMPLES = [(tokens(5, 3), tokens(3, 4)), (tokens(4, 5), tokens(4, 6))]


# ----------------------------------------------------------------------------- GPT
@pytest.mark.parametrize("policy", ["fp32", "bf16"])
def test_gpt_token_logits_ignore_the_other_documents_of_its_row(policy):
    model = nnx.jit(lambda m, x, p: m(x, **p))
    gpt = build(GPT, policy)
    a, b = GPT_DOCS
    ref = model(gpt, *gpt_batch([a, b]))
    # The first document changed (every token): the second's logits stay bit-equal ...
    out = model(gpt, *gpt_batch([tokens(6, 9), b]))
    np.testing.assert_array_equal(out[0, 6:13], ref[0, 6:13])
    assert np.max(np.abs(out[0, :6] - ref[0, :6])) > 1e-3
    # ... and the second changed: the first's (causality alone gives this one).
    out = model(gpt, *gpt_batch([a, tokens(7, 9)]))
    np.testing.assert_array_equal(out[0, :6], ref[0, :6])
    # Control: as one segment the same change reaches the second document.
    one = lambda docs: (gpt_batch(docs)[0], {"segment_ids": jnp.ones((1, T), jnp.int32)})  # noqa: E731
    leak = model(gpt, *one([tokens(6, 9), b])) - model(gpt, *one([a, b]))
    assert np.max(np.abs(leak[0, 6:13])) > 1e-3


@pytest.mark.parametrize("scan", [False, True])
def test_gpt_packed_documents_get_the_logits_they_get_alone(scan):
    """Positions restart per document: the packed row equals each document run by itself."""
    gpt = build(GPT, scan_layers=scan, remat="save_dots" if scan else "none")
    ids, packing = gpt_batch(GPT_DOCS)
    packed = gpt(ids, **packing)
    start = 0
    for doc in GPT_DOCS:
        alone = gpt(jnp.asarray(doc[None]))
        np.testing.assert_allclose(packed[0, start : start + len(doc)], alone[0], atol=1e-5)
        start += len(doc)
    assert bool(jnp.all(jnp.isfinite(packed)))  # padding (segment 0) included


def test_gpt_unpacked_program_has_no_segment_mask_and_ones_change_nothing():
    """An unpacked batch lowers to a program without a [B, 1, T, T] segment comparison; one
    segment per row with positions 0..T-1 gives the unpacked logits bit for bit."""
    gpt = build(GPT)
    ids = jnp.asarray(tokens(T, 7)[None])
    graphdef, params = nnx.split(gpt)

    def logits(params, packing):
        return nnx.merge(graphdef, params)(ids, **packing)

    ones = {
        "segment_ids": jnp.ones((1, T), jnp.int32),
        "positions": jnp.arange(T, dtype=jnp.int32)[None],
    }
    segment_compare = re.compile(r"compare\s+EQ.*tensor<1x1x16x16xi32>")
    assert not segment_compare.search(jax.jit(logits).lower(params, {}).as_text())
    assert segment_compare.search(jax.jit(logits).lower(params, ones).as_text())
    np.testing.assert_array_equal(jax.jit(logits)(params, ones), jax.jit(logits)(params, {}))


def packed_lm_batches(name):
    """(batch, the batch with other tokens and targets at its padding) of a packed row."""
    if name == "gpt":
        ids, packing = gpt_batch(GPT_DOCS)
        seg = packing["segment_ids"]
        targets = jnp.where(seg > 0, jnp.roll(ids, -1, axis=1), 0)
        batch = {"inputs": ids, "targets": targets, "weights": (seg > 0).astype(jnp.float32)}
        pad = seg == 0
        junk = {"inputs": jnp.where(pad, 33, ids), "targets": jnp.where(pad, 7, targets)}
        return batch | packing, batch | packing | junk
    enc, dec, packing = t5_batch(T5_EXAMPLES)
    targets = pack([t for _, t in T5_EXAMPLES], D)[0][None]
    seg, enc_pad = packing["decoder_segment_ids"], packing["encoder_segment_ids"] == 0
    batch = dict(encoder_inputs=enc, decoder_inputs=dec, targets=jnp.asarray(targets))
    batch |= packing | {"weights": (seg > 0).astype(jnp.float32)}
    junk = dict(
        encoder_inputs=jnp.where(enc_pad, 33, enc),
        decoder_inputs=jnp.where(seg == 0, 21, dec),
        targets=jnp.where(seg == 0, 7, batch["targets"]),
    )
    return batch, batch | junk


@pytest.mark.parametrize("name", ["gpt", "t5"])
def test_padding_changes_no_loss_and_fused_matches_materialized(name):
    model = build(GPT if name == "gpt" else T5)
    batch, junk = packed_lm_batches(name)

    def jitted(fused):
        options = LossOptions(fused=fused, chunk_tokens=8)
        return nnx.jit(lambda m, b: model_loss(m, b, options)[0])

    fns = {fused: jitted(fused) for fused in (False, True)}

    def loss(batch, fused):
        return fns[fused](model, batch)

    materialized = loss(batch, False)
    assert float(loss(junk, False)) == float(materialized)
    np.testing.assert_allclose(loss(batch, True), materialized, rtol=1e-6)
    np.testing.assert_allclose(loss(junk, True), materialized, rtol=1e-6)


# ----------------------------------------------------------------------------- T5
@pytest.mark.parametrize("policy", ["fp32", "bf16"])
def test_t5_token_logits_ignore_the_other_examples_of_its_row(policy):
    model = nnx.jit(lambda m, enc, dec, p: m(enc, dec, **p))
    t5 = build(T5, policy)
    (e1, t1), (e2, t2) = T5_EXAMPLES
    ref = model(t5, *t5_batch(T5_EXAMPLES))
    # Example 1's encoder and decoder tokens changed: example 2's logits stay bit-equal ...
    out = model(t5, *t5_batch([(tokens(5, 10), tokens(3, 11)), (e2, t2)]))
    np.testing.assert_array_equal(out[0, 3:7], ref[0, 3:7])
    assert np.max(np.abs(out[0, :3] - ref[0, :3])) > 1e-3
    # ... and example 2 changed (a bidirectional encoder would see it): example 1's too.
    out = model(t5, *t5_batch([(e1, t1), (tokens(4, 12), tokens(4, 13))]))
    np.testing.assert_array_equal(out[0, :3], ref[0, :3])
    # Control: as one segment (positions kept) the change reaches example 1.
    enc, dec, packing = t5_batch([(e1, t1), (tokens(4, 12), tokens(4, 13))])
    one = {k: jnp.minimum(v, 1) if "segment" in k else v for k, v in packing.items()}
    assert np.max(np.abs(model(t5, enc, dec, one)[0, :3] - ref[0, :3])) > 1e-3


def test_t5_packed_examples_get_the_logits_they_get_alone():
    """Relative positions from per-example positions, decoder shift restarting per example,
    cross-attention only to the example's own encoder tokens."""
    run = nnx.jit(lambda m, enc, dec, p: m(enc, dec, **p))
    t5 = build(T5)
    packed = run(t5, *t5_batch(T5_EXAMPLES))
    start = 0
    for enc, target in T5_EXAMPLES:  # alone: the example in its own (PAD-padded) row
        alone_enc = jnp.asarray(pack([enc], E)[0][None])
        alone_dec = jnp.asarray(pack([shifted(target)], D)[0][None])
        alone = run(t5, alone_enc, alone_dec, {})
        np.testing.assert_allclose(
            packed[0, start : start + len(target)], alone[0, : len(target)], atol=1e-5
        )
        start += len(target)
    assert bool(jnp.all(jnp.isfinite(packed)))


def test_t5_decoder_padding_over_a_full_encoder_row_stays_finite():
    """Decoder padding (segment 0) finds no encoder key when the encoder row has no padding:
    its cross-attention row is fully masked, yet logits, loss and gradients stay finite."""
    t5 = build(T5)
    examples = [(tokens(7, 3), tokens(3, 4)), (tokens(5, 5), tokens(4, 6))]  # 12 = E tokens
    enc, dec, packing = t5_batch(examples)
    assert int(jnp.min(packing["encoder_segment_ids"])) == 1
    assert int(jnp.min(packing["decoder_segment_ids"])) == 0
    targets = jnp.asarray(pack([t for _, t in examples], D)[0][None])
    batch = dict(encoder_inputs=enc, decoder_inputs=dec, targets=targets, **packing)
    batch["weights"] = (packing["decoder_segment_ids"] > 0).astype(jnp.float32)

    def loss(m):
        return cross_entropy(*m.logits_and_targets(batch))[0]

    value, grads = nnx.jit(nnx.value_and_grad(loss))(t5)
    assert bool(jnp.isfinite(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_t5_relative_bias_from_positions_equals_the_static_bias():
    t5 = build(T5)
    for relpos, length in ((t5.encoder.relpos, E), (t5.decoder.relpos, D)):
        pos = jnp.arange(length, dtype=jnp.int32)[None]
        np.testing.assert_array_equal(relpos.from_positions(pos, pos), relpos(length, length))


def test_packing_arrays_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"GPT segment_ids must be integers shaped like inputs"):
        build(GPT)(jnp.ones((1, 8), jnp.int32), segment_ids=jnp.ones((1, 7), jnp.int32))
    enc, dec, packing = t5_batch(T5_EXAMPLES)
    with pytest.raises(ValueError, match="T5 packed rows need segment ids on both sides"):
        build(T5)(enc, dec, encoder_segment_ids=packing["encoder_segment_ids"])
    with pytest.raises(ValueError, match="Unknown T5 packing arrays"):
        build(T5)(enc, dec, segment_ids=packing["encoder_segment_ids"])


# ----------------------------------------------------------------------------- kernels
def test_cudnn_falls_back_to_xla_with_one_warning(caplog):
    """A model built for a GPU (auto -> cuDNN) gets a packed batch: jax's cuDNN attention takes
    no segment ids, so every layer uses the XLA path, with one warning naming why."""
    on_gpu = build(GPT, "bf16", platform="gpu")
    assert {m.implementation for _, m in nnx.iter_modules(on_gpu) if hasattr(m, "fallback")} == {
        "cudnn"
    }
    ids, packing = gpt_batch(GPT_DOCS)
    attn_lib._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="bf16jax.nn.attention"):
        out = on_gpu(ids, **packing)
        on_gpu(ids, **packing)
    warnings = [r for r in caplog.records if "cudnn kernel not used" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # 2 layers, 2 calls
    assert "takes no segment ids" in warnings[0].getMessage()
    np.testing.assert_array_equal(out, build(GPT, "bf16")(ids, **packing))
    forced = build(GPT, "bf16", platform="gpu", attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run .* no segment ids"):
        forced(ids, **packing)


def test_packed_models_built_for_a_tpu_match_xla():
    """GPT (splash, causal) and T5 (flash with the per-example relative bias) built for a TPU
    run packed rows in Pallas interpret mode with the XLA model's logits."""
    n = 128  # the Pallas TPU kernels tile by 128
    docs = [tokens(50, 1), tokens(60, 2)]
    ids, seg, pos = (jnp.asarray(x[None]) for x in pack(docs, n))
    examples = [(tokens(50, 3), tokens(40, 4)), (tokens(45, 5), tokens(60, 6))]
    enc, enc_seg, enc_pos = (jnp.asarray(x[None]) for x in pack([e for e, _ in examples], n))
    dec, dec_seg, dec_pos = (
        jnp.asarray(x[None]) for x in pack([shifted(t) for _, t in examples], n)
    )
    t5_packing = dict(
        encoder_segment_ids=enc_seg,
        encoder_positions=enc_pos,
        decoder_segment_ids=dec_seg,
        decoder_positions=dec_pos,
    )
    for base, args, packing in (
        (GPT, (ids,), {"segment_ids": seg, "positions": pos}),
        (T5, (enc, dec), t5_packing),
    ):
        changes = {"max_len": n} if base is GPT else {}
        on_tpu = build(base, platform="tpu", **changes)
        kernels = {m.implementation for _, m in nnx.iter_modules(on_tpu) if hasattr(m, "fallback")}
        assert kernels == {"pallas"}
        run = nnx.jit(lambda m, p, *a: m(*a, **p))
        with attn_lib.pallas_interpret(), pltpu.force_tpu_interpret_mode():
            out = run(on_tpu, packing, *args)
        ref = run(build(base, **changes), packing, *args)
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- training
def test_packed_batch_flows_through_the_sharded_micro_batched_step():
    """8 devices (data 2 x fsdp 4 by default), 2 micro-batches: the step's loss is the packed
    model's loss, not the unpacked one (the extra keys reach the model, split like the rest)."""
    config = tiny_gpt_config("fp32", grad_accum_steps=2)
    trainer = train.create_trainer(config)
    rows = [
        pack([tokens(n, 20 + i), tokens(31 - n, 40 + i)], 32) for i, n in enumerate(range(1, 17))
    ]
    ids, seg, pos = (np.stack(x) for x in zip(*rows, strict=True))
    targets = np.where(seg > 0, np.roll(ids, -1, axis=1), 0).astype(np.int32)
    local = dict(inputs=ids, targets=targets, weights=(seg > 0).astype(np.float32))
    local |= dict(segment_ids=seg, positions=pos)
    state = trainer.init_state()
    model = trainer.host_model(state)
    ref = float(cross_entropy(*model.logits_and_targets(local))[0])
    unpacked = {k: local[k] for k in ("inputs", "targets", "weights")}
    assert abs(float(cross_entropy(*model.logits_and_targets(unpacked))[0]) - ref) > 1e-3
    batch = trainer.global_batch(local)
    assert batch["segment_ids"].sharding == sharding.batch_sharding(trainer.mesh)
    _, metrics = trainer.step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), ref, rtol=1e-5)
