"""bf16jax.training.flops: the model FLOPs of a training step per family, checked against XLA's
count.

XLA's HLO cost analysis of the lowered train step (no compile) counts every FLOP the program
does: the model FLOPs, the masked half of causal attention (XLA computes the full score matrix
and masks it; the convention does not count it), plus the loss, softmax, norms and optimizer
(a few percent). Shapes are chosen so attention is a third or more of the model FLOPs: a wrong
attention term would move the ratio far out of range.
"""

import jax
import pytest
from tiny import make_mesh

from bf16jax.config import config_path, load_config
from bf16jax.data import datasets as data_lib
from bf16jax.training import flops, loop
from bf16jax.training import trainer as train

CASES = {
    "gpt_tiny": (
        "model.num_layers=2",
        "model.embed_dim=64",
        "model.mlp_dim=256",
        "model.max_len=512",
        "data.seq_len=512",
        "data.batch_size=2",
    ),
    "t5_small": (
        "model.num_encoder_layers=1",
        "model.num_decoder_layers=1",
        "model.embed_dim=64",
        "model.num_heads=2",
        "model.head_dim=32",
        "model.mlp_dim=128",
        "data.enc_len=512",
        "data.dec_len=128",
        "data.batch_size=2",
    ),
    "vit_digits": (
        "model.num_layers=2",
        "model.patch_size=1",
        "model.embed_dim=32",
        "model.mlp_dim=64",
        "data.batch_size=4",
    ),
}


def _attention(config) -> tuple[float, float]:
    """(attention model FLOPs, masked causal half XLA also counts) of one step, by hand."""
    m, d = config.model, config.data
    b = d.batch_size
    if m.name == "gpt":
        t, dim = d.seq_len, m.embed_dim
        return b * m.num_layers * 6.0 * t * t * dim, b * m.num_layers * 6.0 * t * t * dim
    if m.name == "t5":
        te, td, dim = d.enc_len, d.dec_len, m.num_heads * m.head_dim
        enc = m.num_encoder_layers * 12.0 * te * te * dim
        dec = m.num_decoder_layers * (6.0 * td * td + 12.0 * td * te) * dim
        return b * (enc + dec), b * m.num_decoder_layers * 6.0 * td * td * dim
    t = (m.image_size // m.patch_size) ** 2
    return b * m.num_layers * 12.0 * t * t * m.embed_dim, 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_model_flops_match_xla_count_of_the_step(name):
    config = load_config(config_path(name), ["train.diagnostics=false", *CASES[name]])
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = train.create_trainer(config, mesh=mesh)
    local = next(iter(data_lib.make_dataset(config.data, "train")))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), local)
    with jax.set_mesh(mesh):
        cost = trainer._step_fn.lower(trainer.abstract, batch).cost_analysis()
    xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    model = flops.train_cost(config, trainer.abstract.params)
    attention, masked = _attention(config)
    assert attention / model.flops_per_step > 0.3  # the attention terms matter here
    assert 1.0 < xla / (model.flops_per_step + masked) < 1.15, xla / model.flops_per_step


def test_units_and_the_gpt_figure_of_the_tpu_report():
    costs = {}
    for name in CASES:
        config = load_config(config_path(name), CASES[name])
        trainer = train.create_trainer(config, mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
        costs[name] = (config, trainer, flops.train_cost(config, trainer.abstract.params))
    assert [c.unit for _, _, c in costs.values()] == ["tokens", "tokens", "images"]
    assert costs["t5_small"][2].units_per_step == 2 * (512 + 128)
    assert costs["vit_digits"][2].units_per_step == 4
    config, trainer, cost = costs["gpt_tiny"]
    # experiments/aot_tpu.py's 6N + 6LTD (bf16jax.training.metrics) for GPT, the same number.
    per_token = loop.flops_per_token(config, trainer.n_params)
    assert cost.flops_per_step == pytest.approx(per_token * loop.tokens_per_step(config))
    assert cost.mfu(0.5, 100e12, 4) == pytest.approx(cost.flops_per_step / 0.5 / 400e12)
    assert cost.mfu(0.5, None, 4) is None
    assert cost.throughput(0.25) == 4 * cost.units_per_step
