"""The program XLA receives for the real train step (lowered, never run) of shrunk gpt_tiny,
t5_small and vit_digits: every dot takes 16-bit operands under bf16 / fp16 unless the policy
asks for FP32, the fused loss keeps no [B, T, V] logits, the non-logging step holds none of the
diagnostic reductions, clipping reuses the step's one gradient norm, and q / k / v share a GEMM.
"""

import functools
import re

import jax
import pytest

from bf16jax import config as config_lib
from bf16jax.nn import layers
from bf16jax.parallel import sharding
from bf16jax.precision import numerics
from bf16jax.precision.matmul import dot_dtypes
from bf16jax.training import trainer as train

# Fewer layers and shorter sequences: the dots per layer, and their dtypes, are the same.
SHRINK = {
    "gpt_tiny": ["model.num_layers=2", "data.batch_size=8"],
    "t5_small": [
        "model.num_encoder_layers=1",
        "model.num_decoder_layers=1",
        "data.enc_len=32",
        "data.dec_len=16",
        "data.batch_size=8",
    ],
    "vit_digits": ["model.num_layers=2", "data.batch_size=8"],
}
# Dots per layer (forward + dx + dW each): GPT / ViT block q·k·v fused (1) + scores + values + o
# + fc1 + fc2 = 6 forward, 12 backward; T5 encoder layer: qkv, scores, values, o, wi_0, wi_1,
# wo = 7 (+14); decoder layer: + cross-attention q, kv, scores, values, o = 12 (+24).
EXPECTED_DOTS = {
    # 2 blocks + tied head through the fused loss (chunk logits, dh, dW)
    "gpt_tiny": 2 * 18 + 3,
    # encoder + decoder layer + separate head (fused: 3)
    "t5_small": 21 + 36 + 3,
    # patch_embed (forward + dW: its input is not differentiated) + 2 blocks + head (3)
    "vit_digits": 2 + 2 * 18 + 3,
}


def _trainer(name: str, policy: str, *overrides: str):
    """The Trainer of shrunk `name` under `policy` on one device."""
    path = config_lib.config_path(name)
    config = config_lib.load_config(
        path, [f"precision={policy}", "mesh.data=1", *SHRINK[name], *overrides]
    )
    return train.create_trainer(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:1]))


@functools.cache
def lowered(
    name: str, policy: str, *overrides: str, diagnostics: bool = False, fuse_qkv: bool = True
) -> str:
    """The StableHLO text (with op locations) of the Trainer's jitted step, or of its logging
    variant with `diagnostics`; `fuse_qkv=False` traces q, k, v as three GEMMs."""
    trainer = _trainer(name, policy, *overrides)
    default = layers.Attention.fuse_projections
    layers.Attention.fuse_projections = fuse_qkv  # the GPU / TPU choice; CPU's is separate
    try:
        return trainer.lower(diagnostics=diagnostics).as_text(debug_info=True)
    finally:
        layers.Attention.fuse_projections = default


@pytest.mark.parametrize("policy,dtype", [("bf16", "bf16"), ("fp16", "f16")])
@pytest.mark.parametrize("name", ["gpt_tiny", "t5_small", "vit_digits"])
def test_every_gemm_takes_16_bit_operands(name, policy, dtype):
    dots = dot_dtypes(lowered(name, policy))
    assert len(dots) == EXPECTED_DOTS[name]
    assert set(dots) == {(dtype, dtype, "f32")}  # 16-bit operands, FP32 accumulator


def test_fp32_override_keeps_exactly_its_dots_fp32():
    """`embed->fp32` makes the tied head FP32: its three GEMMs (fused loss), no other."""
    dots = dot_dtypes(lowered("gpt_tiny", "bf16; embed->fp32"))
    assert dots.count(("f32", "f32", "f32")) == 3
    assert dots.count(("bf16", "bf16", "f32")) == EXPECTED_DOTS["gpt_tiny"] - 3


def _tensor(*dims: int) -> str:
    return f"tensor<{'x'.join(map(str, dims))}xf32>"


def test_fused_loss_never_holds_the_logits():
    """B=8, T=128, V=384: the fused loss works on [8, 32, 384] chunks (32 * 8 tokens)."""
    fused = lowered("gpt_tiny", "bf16", "train.loss_chunk_tokens=256")
    materialized = lowered("gpt_tiny", "bf16", "train.loss_impl=materialized")
    assert _tensor(8, 128, 384) in materialized and _tensor(8, 128, 384) not in fused
    assert _tensor(8, 32, 384) in fused


def _reductions(text: str) -> int:
    return len(re.findall(r"stablehlo\.reduce[ (]", text))


def test_non_logging_step_has_no_diagnostic_reductions():
    plain = lowered("gpt_tiny", "bf16")
    logging = lowered("gpt_tiny", "bf16", diagnostics=True)
    assert train.DIAGNOSTICS_SCOPE in logging and train.DIAGNOSTICS_SCOPE not in plain
    # swamping (stuck, moved) + gradient health (zero, subnormal, non-finite): 5 per param;
    # lost weight decay (`swamped/decay`: stuck, nonzero): 2 per decayed param.
    num_params = 2 + 2 * 16 + 2  # token + position embeddings, 2 blocks of 16, final norm
    decayed = 2 + 2 * 6  # the embeddings and each block's q, k, v, o, fc1, fc2 kernels
    # The param norm (logging steps only): a reduction per large leaf, one for the small ones.
    sizes = [x.size for x in jax.tree.leaves(_trainer("gpt_tiny", "bf16").abstract.params)]
    assert len(sizes) == num_params
    norm = sum(n >= numerics.SMALL_LEAF for n in sizes) + any(
        n < numerics.SMALL_LEAF for n in sizes
    )
    diagnostic = 5 * num_params + 2 * decayed
    assert _reductions(logging) - _reductions(plain) == diagnostic + norm


def test_clipping_reuses_the_gradient_norm():
    """Clipping on or off: the same reductions (the step's one norm serves both)."""
    clipped = lowered("gpt_tiny", "bf16")
    unclipped = lowered("gpt_tiny", "bf16", "optim.clip_norm=0.0")
    assert _reductions(clipped) == _reductions(unclipped)


def test_qkv_share_one_gemm():
    separate = dot_dtypes(lowered("gpt_tiny", "bf16", fuse_qkv=False))
    assert len(separate) == EXPECTED_DOTS["gpt_tiny"] + 2 * 6  # 2 more GEMMs x 3 per layer


def test_the_skip_is_one_conditional_on_a_predicate_computed_once():
    """A skipped step keeps the old params and moments through one `lax.cond` on one scalar
    predicate: no select per leaf (which keeps the old and new state live together), and no
    `and` of one flag per leaf re-derived inside each consumer (leaves^2 `and`s: the full
    vit_digits step once held 62,335 and compiled in 11 s on a CPU instead of 2)."""
    step = _trainer("vit_digits", "fp32").lower(diagnostics=False)
    leaves = len(jax.tree.leaves(step.args_info))
    hlo = step.compile().as_text()
    assert len(re.findall(r" conditional\(", hlo)) == 1
    assert len(re.findall(r"= pred\[\]\S* and\(", hlo)) <= 8 < leaves


def test_the_plain_step_checks_and_measures_each_large_leaf_once():
    """Outside the model, the step that does not log reduces each large leaf twice (the
    gradient's sum of squares: norm, clipping and finite check; the new param's finite check)
    and the small leaves (biases, norm gains) in one concatenation each; no param norm. Before:
    six reductions per leaf (finite counts of the gradients, new params, mu and nu; the
    gradient and param norms): 216 here."""
    text = lowered("gpt_tiny", "bf16")
    names = dict(re.findall(r'^(#loc\d+) = loc\("([^"]*)"', text, re.M))
    locs = [
        re.search(r"loc\((#loc\d+)\)", line)
        for line in text.splitlines()
        if re.search(r"stablehlo\.reduce[ (]", line)
    ]
    outside = [m for m in locs if m and names.get(m[1]) == "jit(train_step)/reduce_sum"]
    sizes = [x.size for x in jax.tree.leaves(_trainer("gpt_tiny", "bf16").abstract.params)]
    large = sum(n >= numerics.SMALL_LEAF for n in sizes)
    assert 0 < large < len(sizes) == 36
    assert len(outside) == 2 * (large + 1)
