"""Starting a run from a converted checkpoint (config.init_from), dropout, and T5 as T5 is."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bf16jax.config import config_path, load_config
from bf16jax.interop import convert
from bf16jax.models import build_model
from bf16jax.nn.layers import Attention
from bf16jax.precision import get_policy
from bf16jax.training.loop import train_and_evaluate

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(scope="module")
def flan_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("flan") / "c"
    convert.import_hf(os.path.join(GOLDEN, "t5_v1_1"), str(out), precision="fp32")
    return str(out)


@pytest.mark.slow  # converts and fine-tunes a tiny FLAN-T5 through the CLI
def test_finetune_config_starts_from_the_checkpoint(flan_dir, tmp_path):
    """configs/flan_t5_small_ft.py under bf16-pure-kahan: the pretrained architecture and
    params at step 0 (eval of the imported model logged), and the loss falls."""
    config = load_config(
        config_path("flan_t5_small_ft"),
        [
            f"init_from={flan_dir}",
            "precision=bf16-pure-kahan",
            "train.steps=8",
            "train.log_every=8",
            "train.eval_every=8",
            "train.eval_steps=1",
            "data.enc_len=32",
            "data.dec_len=32",
            "data.batch_size=8",
            "data.eval_batch_size=8",
            "optim.learning_rate=1e-2",
        ],
    )
    result = train_and_evaluate(config, str(tmp_path / "run"))
    trainer = result["trainer"]
    assert trainer.config.model.embed_dim == 32  # the checkpoint's, not FLAN-T5-small's 512
    assert trainer.config.data.tokenizer == flan_dir
    assert trainer.state_shardings.params  # built
    # The state at step 0 holds the imported params, in bf16, with a fresh optimizer state.
    state0 = trainer.init_state_from(flan_dir)
    assert int(state0.step) == 0
    flat = convert._flat(state0.params)
    ref = convert._flat(
        convert.restore_params(
            flan_dir, convert._placed(convert.abstract_params(trainer.config.model))
        )
    )
    assert flat["embed/embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(flat["head/kernel"], ref["head/kernel"].astype(jnp.bfloat16))
    assert all(
        not np.any(np.asarray(x, np.float32))
        for x in jax.tree.leaves(state0.opt_state)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    )
    assert math.isfinite(result["init_eval_loss"])
    assert result["eval_loss"] < result["init_eval_loss"]
    assert result["step"] == 8


def test_init_from_needs_a_converted_directory(tmp_path):
    config = load_config(config_path("flan_t5_small_ft"), [f"init_from={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="bf16jax.json not found"):
        train_and_evaluate(config, str(tmp_path / "run"))
    config = load_config(config_path("flan_t5_small_ft"))
    with pytest.raises(ValueError, match="tokenizer='init_from' .* config.init_from"):
        train_and_evaluate(config, str(tmp_path / "run2"))


def test_init_from_refuses_another_family(flan_dir, tmp_path):
    config = load_config(config_path("gpt_tiny"), [f"init_from={flan_dir}"])
    with pytest.raises(ValueError, match="holds a 't5' model but config.model.name='gpt'"):
        train_and_evaluate(config, str(tmp_path / "run"))


# ----------------------------------------------------------------------------- dropout
def _tiny(name, **kw):
    base = dict(
        gpt=dict(vocab_size=64, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, max_len=8),
        t5=dict(
            vocab_size=64,
            embed_dim=16,
            num_heads=2,
            mlp_dim=32,
            num_encoder_layers=1,
            num_decoder_layers=1,
        ),
    )[name]
    return dict(name=name, **{**base, **kw})


@pytest.mark.parametrize("name", ["gpt", "t5"])
def test_dropout_only_with_a_key(name):
    rates = dict(dropout_rate=0.3, attention_dropout_rate=0.3, mlp_dropout_rate=0.3)
    model = build_model(_tiny(name, **rates), "fp32", rngs=nnx.Rngs(0))
    plain = build_model(_tiny(name), "fp32", rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, (2, 8)), jnp.int32)
    args = (ids,) if name == "gpt" else (ids, ids)
    eval_out = model(*args)
    np.testing.assert_array_equal(eval_out, plain(*args))  # no key: deterministic, no dropout
    a = model(*args, dropout_key=jax.random.key(1))
    b = model(*args, dropout_key=jax.random.key(2))
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, model(*args, dropout_key=jax.random.key(1)))
    # A key with all rates 0 changes nothing.
    np.testing.assert_array_equal(plain(*args, dropout_key=jax.random.key(1)), eval_out)


def test_gpt_dropout_same_with_scan_layers():
    rates = dict(dropout_rate=0.2, attention_dropout_rate=0.2)
    loop = build_model(_tiny("gpt", **rates), "fp32", rngs=nnx.Rngs(0))
    scan = build_model(_tiny("gpt", scan_layers=True, **rates), "fp32", rngs=nnx.Rngs(0))
    stacked = nnx.state(scan, nnx.Param)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(loop, nnx.Param))}
    for path, var in nnx.to_flat_state(stacked):
        key = "/".join(map(str, path))
        if key.startswith("blocks/"):
            rest = key.removeprefix("blocks/")
            var.set_value(jnp.stack([flat[f"blocks/{i}/{rest}"][...] for i in range(2)]))
    nnx.update(scan, stacked)
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    key = jax.random.key(3)
    np.testing.assert_allclose(scan(ids, dropout_key=key), loop(ids, dropout_key=key), atol=1e-5)


# ----------------------------------------------------------------------------- T5 attention
def test_t5_attention_unscaled_with_q_init_scaled():
    d, h, dh = 64, 2, 16
    policy = get_policy("fp32")
    t5 = Attention(d, h, policy=policy, name="a", rngs=nnx.Rngs(0), head_dim=dh, scale_logits=False)
    gpt = Attention(d, h, policy=policy, name="a", rngs=nnx.Rngs(0), head_dim=dh)
    q_std, k_std = float(jnp.std(t5.q.kernel[...])), float(jnp.std(t5.k.kernel[...]))
    assert q_std / k_std == pytest.approx(dh**-0.5, rel=0.1)  # Mesh TF: (d_model * d_kv)**-0.5
    # Same params except q: T5 with q / sqrt(dh) folded in computes GPT's scaled attention.
    t5.q.kernel[...] = gpt.q.kernel[...] / math.sqrt(dh)
    for name in "kvo":
        getattr(t5, name).kernel[...] = getattr(gpt, name).kernel[...]
        getattr(t5, name).bias[...] = getattr(gpt, name).bias[...]
    t5.q.bias[...] = gpt.q.bias[...] / math.sqrt(dh)
    x = jax.random.normal(jax.random.key(0), (2, 5, d))
    np.testing.assert_allclose(t5(x), gpt(x), rtol=1e-5, atol=1e-6)


def test_gpt2_vocabulary_50257_builds_and_shards():
    """GPT-2's exact vocabulary: not a multiple of the tensor axis, so its dim is replicated."""
    from tiny import make_mesh

    from bf16jax.parallel import sharding

    cfg = _tiny("gpt", vocab_size=50257)
    mesh = make_mesh((4, 1, 2))
    abstract = sharding.abstract_state(
        lambda: nnx.state(build_model(cfg, "bf16", rngs=nnx.Rngs(0)), nnx.Param), mesh
    )
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    table = {convert._leaf_path(p): x for p, x in leaves}["embed/embedding"]
    assert table.shape == (50257, 16) and table.sharding.spec[0] is None
    logits = jax.eval_shape(
        lambda: build_model(cfg, "bf16", rngs=nnx.Rngs(0))(jnp.zeros((1, 8), jnp.int32))
    )
    assert logits.shape == (1, 8, 50257) and logits.dtype == jnp.float32
