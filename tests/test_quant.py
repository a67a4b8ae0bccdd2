"""Quantization-aware training: LSQ gradients, policy syntax, layers, int8 agreement, export, CLI.

The LSQ gradients are checked against the closed form of Esser et al. (arXiv:1902.08153) in both
clip regions and at rounding ties. A tiny ViT trained with w4a8 QAT on digits serves the
training, int8-agreement, export, resume and sharding tests (compiles dominate the runtime).
"""

import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import REPO, TINY_OVERRIDES, cli_env, final_metrics, main_command
from flax import nnx
from tiny import make_mesh

from bf16jax import config as config_lib
from bf16jax.checkpoint.manager import Checkpointer
from bf16jax.data import datasets as data_lib
from bf16jax.evaluation import calibration
from bf16jax.models import build_model
from bf16jax.nn import quant, quant_model
from bf16jax.nn.layers import Linear
from bf16jax.precision import get_policy
from bf16jax.training import trainer as train


# ----------------------------------------------------------------------------- LSQ numerics
def closed_form(x, s, r, bits, n):
    """LSQ's d(sum r * q)/dx and /ds for q = round(clip(x/s)) * s (per-channel s on axis -1)."""
    qn, qp = quant.quant_range(bits)
    v = x / s
    inside = (v > qn) & (v < qp)
    dq_ds = np.where(v <= qn, qn, np.where(v >= qp, qp, np.round(v) - v))
    g = 1.0 / math.sqrt(n * qp)
    return r * inside, g * np.sum(r * dq_ds, axis=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_lsq_gradients_match_the_closed_form(bits):
    qn, qp = quant.quant_range(bits)
    s = np.array([0.5, 0.25, 2.0], np.float32)  # per channel (last axis)
    # x/s per column: inside, below Qn, above Qp, ties (k + 0.5: half-to-even), exact codes.
    v = np.array(
        [
            [0.3, -1.2, 2.7],
            [qn - 3.0, qn - 0.5, qn - 10.0],
            [qp + 2.0, qp + 0.75, qp + 40.0],
            [2.5, -1.5, 0.5],
            [3.0, -2.0, 1.0],
        ],
        np.float32,
    )
    x = v * s
    r = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)

    def f(x, s):
        return jnp.sum(quant.fake_quant(x, s, bits=bits) * r)

    gx, gs = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(s))
    want_x, want_s = closed_form(x, s, r, bits, n=x.shape[0])
    np.testing.assert_allclose(gx, want_x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gs, want_s, rtol=1e-5, atol=1e-7)
    # Ties round half to even, in the forward pass and hence in round(v) - v.
    q = np.asarray(quant.fake_quant(jnp.asarray(x), jnp.asarray(s), bits=bits))
    np.testing.assert_array_equal(q[3] / s, [2.0, -2.0, 0.0])
    assert np.all(q[1] / s == qn) and np.all(q[2] / s == qp)


def test_quantize_dequantize_is_idempotent_and_codes_are_integers():
    x = jax.random.normal(jax.random.key(0), (64, 16)) * 3.0
    s = quant.init_step_size(x, 4, axis=0)
    assert s.shape == (16,) and s.dtype == jnp.float32
    q = quant.fake_quant(x, s, bits=4)
    np.testing.assert_array_equal(quant.fake_quant(q, s, bits=4), q)
    codes = quant.lsq_codes(x, s, -8, 7)
    np.testing.assert_array_equal(codes, np.round(codes))
    assert codes.min() >= -8 and codes.max() <= 7
    np.testing.assert_allclose(
        quant.init_step_size(x, 8), 2 * jnp.mean(jnp.abs(x)) / math.sqrt(127)
    )


def test_scale_grad_is_identity_forward():
    x = jnp.asarray([1.5, -2.0])
    np.testing.assert_array_equal(quant.scale_grad(x, 0.1), x)
    g = jax.grad(lambda x: jnp.sum(quant.scale_grad(x, 0.1) * 3.0))(x)
    np.testing.assert_allclose(g, [0.3, 0.3], rtol=1e-6)


# ----------------------------------------------------------------------------- policy
@pytest.mark.parametrize(
    "text",
    [
        "fp32; q=w8a8",
        "bf16; q=w4a8; head->q=none",
        "bf16; q=w4a8; head->q=w8a8; .*norm.*->fp32",
        "p=f32,c=bf16,q=w8",
        "bf16-pure-kahan; quant=W4A8",
    ],
)
def test_quant_policy_round_trips(text):
    policy = get_policy(text)
    assert get_policy(str(policy)) == policy


def test_quant_policy_resolution():
    p = get_policy("bf16; q=w4a8; head->q=w8a8; blocks/0/.*->q=none; .*norm.*->fp32")
    assert p.quant == "w4a8"
    assert p.quant_for("blocks/1/mlp/fc1") == "w4a8"
    assert p.quant_for("blocks/0/mlp/fc1") == "none"
    assert p.quant_for("head", edge=True) == "w8a8"  # an override names the edge layer
    assert p.quant_for("patch_embed", edge=True) == "none"  # edge default: unquantized
    assert p.quant_for("blocks/1/norm1") == "w4a8"  # a dtype override keeps the quant
    # `REGEX->q=...` keeps the base dtypes.
    assert p.for_module("head").compute_dtype == jnp.bfloat16
    assert get_policy("bf16").quant == "none"


@pytest.mark.parametrize(
    "text, message",
    [
        ("bf16; q=w9a8", "Unknown quantization 'w9a8'"),
        ("bf16; q=int8", "Unknown quantization 'int8'"),
        ("bf16; q=w8a8; q=w4a8", "given twice"),
        ("bf16; x=w8a8", "Malformed override"),
        ("bf16,q=w8a8", "'bf16; q=w8a8'"),
    ],
)
def test_bad_quant_policies(text, message):
    with pytest.raises(ValueError, match=message):
        get_policy(text)


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("policy", ["fp32; q=w8a8", "bf16; q=w4a8", "bf16-pure; q=w8a8"])
def test_linear_step_sizes_are_fp32_named_params(policy):
    layer = Linear(16, 8, policy=get_policy(policy), name="fc", rngs=nnx.Rngs(0))
    w_log, a_log = layer.w_log_scale[...], layer.a_log_scale[...]
    assert w_log.shape == (8,) and w_log.dtype == jnp.float32
    assert a_log.shape == () and a_log.dtype == jnp.float32
    assert layer.w_log_scale.get_metadata()["out_sharding"] == ("mlp",)  # kernel's output axis
    # Log step sizes: exp gives LSQ's init.
    want = quant.init_step_size(layer.kernel[...], int(policy.split("w")[1][0]), axis=0)
    np.testing.assert_allclose(np.exp(w_log), want, rtol=1e-6)
    y = layer(jnp.ones((2, 16), get_policy(policy).compute_dtype))
    assert y.dtype == get_policy(policy).compute_dtype
    # The float init is unchanged by quantization (no RNG drawn for step sizes).
    plain = Linear(16, 8, policy=get_policy(policy.split(";")[0]), name="fc", rngs=nnx.Rngs(0))
    assert plain.quant == "none" and not hasattr(plain, "w_log_scale")
    np.testing.assert_array_equal(layer.kernel[...], plain.kernel[...])


def test_edge_layers_stay_float_unless_asked():
    cfg = config_lib.base_config("vit").model
    cfg.update(embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32)
    vit = build_model(cfg, "fp32; q=w8a8", rngs=nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in quant_model.quantized_layers(vit)}
    assert "head" not in names and "patch_embed" not in names
    assert {"blocks/0/attn/q", "blocks/0/mlp/fc2"} <= names
    vit = build_model(cfg, "fp32; q=w8a8; head->q=w8a8", rngs=nnx.Rngs(0))
    assert "head" in {"/".join(map(str, p)) for p, _ in quant_model.quantized_layers(vit)}


@pytest.mark.parametrize(
    "policy, input_min", [("fp32; q=w8a8", None), ("bf16; q=w4a8", None), ("bf16; q=w8a8", -0.2)]
)
def test_int8_dot_equals_fake_quant_exactly(policy, input_min):
    layer = Linear(64, 32, policy=get_policy(policy), name="fc", rngs=nnx.Rngs(1),
                   input_min=input_min, input_mean=0.3)  # fmt: skip
    x = jax.random.normal(jax.random.key(2), (4, 64))
    if input_min is not None:  # an input bounded below, like GELU's output
        x = jnp.maximum(x, input_min)
    x = x.astype(get_policy(policy).compute_dtype)
    fake = layer(x)
    real = quant_model.set_int8_mode(layer)(x)
    np.testing.assert_array_equal(np.asarray(fake, np.float32), np.asarray(real, np.float32))
    hlo = jax.jit(lambda x: layer(x)).lower(x).as_text()
    assert "xi8>" in hlo and "-> tensor<4x32xi32>" in hlo  # int8 operands, int32 accumulator


def test_offset_activation_range_uses_every_code_after_gelu():
    """fc2's input is GELU's output (>= -0.17). A signed range left 127 of 256 int8 codes
    unused below round(-0.17 / s); the offset range starts at GELU's minimum."""
    policy = get_policy("fp32; q=w8a8")
    signed = Linear(16, 4, policy=policy, name="fc", rngs=nnx.Rngs(0))
    offset = Linear(16, 4, policy=policy, name="fc", rngs=nnx.Rngs(0),
                    input_min=quant.GELU_MIN, input_mean=quant.GELU_MEAN)  # fmt: skip
    assert quant.GELU_MIN <= -0.1699 and quant.GELU_MIN > -0.18
    assert quant.GELU_MEAN == pytest.approx(1 / (2 * math.sqrt(math.pi)), abs=2e-3)
    x = jax.nn.gelu(jnp.linspace(-6.0, 16.0, 20_001))  # past the range: every code in use
    s_signed = float(np.exp(signed.a_log_scale[...]))
    s_offset = float(np.exp(offset.a_log_scale[...]))
    signed_codes = np.unique(np.asarray(quant.lsq_codes(x, s_signed, -128, 127)))
    offset_codes = np.unique(np.asarray(quant.lsq_codes(x - quant.GELU_MIN, s_offset, 0, 255)))
    assert signed_codes.min() > -128 + 120  # most negative codes unreachable
    assert offset_codes.size == 256  # every code in use
    # On GELU of a unit Gaussian (fc1's output at init) the offset range quantizes finer.
    g = jax.nn.gelu(jax.random.normal(jax.random.key(0), (100_000,)))
    err_signed = jnp.mean(jnp.abs(quant.lsq_codes(g, s_signed, -128, 127) * s_signed - g))
    q_offset = quant.lsq_codes(g - quant.GELU_MIN, s_offset, 0, 255) * s_offset + quant.GELU_MIN
    assert float(jnp.mean(jnp.abs(q_offset - g))) < 0.6 * float(err_signed)


def test_log_step_sizes_stay_positive_under_adamw():
    """Before: Adam moved a raw step size by ~lr per step whatever its size, so at lr 3e-3
    against s0 ~ 0.07 it crossed zero (10 of 896 in gpt_tiny w4a8 within 80 steps). A loss
    that asks every s to shrink, 80 AdamW steps at lr 3e-3: in the log domain s only shrinks
    by a factor ~exp(-lr) per step."""
    from bf16jax.training import optim

    layer = Linear(32, 16, policy=get_policy("fp32; q=w4a8"), name="fc", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (64, 32))
    cfg = config_lib.base_config().optim
    cfg.update(learning_rate=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.1)
    opt = optim.make_optimizer(cfg, total_steps=80)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x).astype(jnp.float32)))

    @jax.jit
    def run(p):
        def body(_, c):
            return opt.update(jax.grad(loss)(c[0]), c[1], c[0])

        return jax.lax.fori_loop(0, 80, body, (p, opt.init(p)))[0]

    s0 = np.exp(np.asarray(params["w_log_scale"][...]))
    s = np.exp(np.asarray(run(params)["w_log_scale"][...]))
    assert np.all(s > 0) and np.all(s < s0)  # every step size shrank, none crossed zero
    assert np.min(s / s0) > np.exp(-80 * 3e-3 * 1.5)  # relative steps of about lr
    # What the same Adam steps do to a raw step size (the old parameterisation):
    assert np.min(s0 - 80 * 3e-3) < 0


# ----------------------------------------------------------------------------- training
STEPS = 60


def tiny_vit(policy: str = "fp32; q=w4a8", **train_overrides):
    """A locked ViT config (1 block, width 32) on digits that compiles in seconds."""
    c = config_lib.base_config("vit")
    c.precision = policy
    c.model.update(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.data.update(batch_size=32, eval_batch_size=120)
    c.optim.update(learning_rate=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0)
    c.train.update(steps=STEPS, eval_steps=3, diagnostics=False)
    c.train.update(train_overrides)
    c.lock()
    return c


def host(params):
    return jax.tree.map(np.asarray, jax.device_get(params))


def snapshot(state: train.TrainState) -> train.TrainState:
    """A device copy of `state` that survives its donation (typed keys copied as key data)."""

    def copy(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jnp.copy(jax.random.key_data(x)))
        return jnp.copy(x)

    return jax.tree.map(copy, state)


def scales(params) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(params)
    return {
        "/".join(map(str, k)): np.asarray(v[...]) for k, v in flat if str(k[-1]).endswith("_scale")
    }


@pytest.fixture(scope="module")
def qat_run():
    """60 w4a8 QAT steps of the tiny ViT on one device; states kept at steps 0, 2 and 60."""
    config = tiny_vit()
    trainer = train.create_trainer(config, make_mesh((1, 1, 1), jax.devices()[:1]))
    it = iter(data_lib.make_dataset(config.data, "train"))
    batches = [next(it) for _ in range(STEPS)]
    state = trainer.init_state()
    snapshots, losses = {0: snapshot(state)}, []
    for i, local in enumerate(batches, start=1):
        state, m = trainer.step(state, trainer.global_batch(local))
        losses.append(float(m["loss"]))
        if i in (2, 4):
            snapshots[i] = snapshot(state)
    return trainer, batches, snapshots, losses, state


def test_qat_trains_its_step_sizes_and_the_loss_drops(qat_run):
    trainer, _, snapshots, losses, state = qat_run
    before, after = scales(host(snapshots[0].params)), scales(host(state.params))
    assert len(before) == 6 * 2  # q, k, v, o, fc1, fc2: w_log_scale + a_log_scale each
    moves = []
    for name, value in before.items():
        assert value.dtype == np.float32, name
        assert not np.array_equal(after[name], value), f"{name} did not move"
        moves.append(np.mean(np.abs(after[name] - value)))  # |d log s|: relative change of s
    # Adam moves log s by up to ~lr (3e-3) per step: 60 steps move it by a few percent.
    assert 0.005 < np.mean(moves) < 60 * 3e-3, moves
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses
    assert trainer.evaluate(state.params)["accuracy"] > 0.5


def test_real_int8_and_exported_int8_agree_with_fake_quant(qat_run, tmp_path):
    trainer, _, _, _, state = qat_run
    model = nnx.merge(trainer.graphdef, jax.device_get(state.params))
    images, labels = [], []
    for i, batch in enumerate(data_lib.make_dataset(trainer.config.data, "eval")):
        if i >= 3:
            break
        images.append(batch["image"])
        labels.append(batch["label"])
    images = jnp.asarray(np.concatenate(images))
    fake = jax.jit(lambda m, x: m(x))(model, images)
    int8_model = quant_model.set_int8_mode(nnx.clone(model))
    real = jax.jit(lambda m, x: m(x))(int8_model, images)
    assert calibration.prediction_agreement(fake, real) >= 0.995
    np.testing.assert_allclose(real, fake, rtol=1e-5, atol=1e-5)

    quant_model.export_int8(model, tmp_path / "int8")
    config = trainer.config
    loaded = quant_model.load_int8(
        tmp_path / "int8", lambda: build_model(config.model, config.precision, rngs=nnx.Rngs(0))
    )
    kernels = [layer.kernel[...] for _, layer in quant_model.quantized_layers(loaded)]
    assert kernels and all(k.dtype == jnp.int8 for k in kernels)
    assert loaded.head.kernel[...].dtype == jnp.float32  # edge layer kept in float
    exported = jax.jit(lambda m, x: m(x))(loaded, images)
    np.testing.assert_array_equal(exported, real)


def test_qat_resume_is_exact(qat_run, tmp_path):
    """Steps 3-4 from a checkpoint of step 2 give the straight run's step 4, bit for bit."""
    trainer, batches, snapshots, _, _ = qat_run
    state = snapshots[2]
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, state, force=True)
        ckpt.wait()
        state = ckpt.restore(2, trainer.abstract)
    for local in batches[2:4]:
        state, _ = trainer.step(state, trainer.global_batch(local))
    want = host(snapshots[4].params)
    equal = jax.tree.map(np.array_equal, host(state.params), want)
    assert all(jax.tree.leaves(equal))
    assert scales(host(state.params)).keys() == scales(want).keys()


def test_sharded_qat_equals_unsharded(qat_run):
    trainer, batches, snapshots, _, _ = qat_run
    config = trainer.config
    sharded = train.create_trainer(config, make_mesh((2, 2, 2)))
    specs = {str(s.spec) for s in jax.tree.leaves(sharded.state_shardings.params)}
    assert any("tensor" in s or "fsdp" in s for s in specs)  # the step sizes too:
    w_log_scale = sharded.state_shardings.params["blocks"][0]["mlp"]["fc1"]["w_log_scale"]
    assert "tensor" in str(w_log_scale.spec)  # the kernel's output axis ("mlp")
    state = sharded.init_state()
    for local in batches[:2]:
        state, _ = sharded.step(state, sharded.global_batch(local))
    got_leaves = jax.tree.leaves_with_path(host(state.params))
    want_leaves = jax.tree.leaves(host(snapshots[2].params))
    for (path, got), want in zip(got_leaves, want_leaves, strict=True):
        if "'k']['bias'" in jax.tree_util.keystr(path):
            continue  # zero gradient in exact arithmetic: Adam amplifies reduction-order noise
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(path))


# ----------------------------------------------------------------------------- CLI
CLI_RUNS = {
    name: (f"--config.precision={precision}", *TINY_OVERRIDES[name])
    for name, precision in (
        ("gpt_tiny", "fp32; q=w8a8"),
        ("t5_small", "bf16; q=w4a8; .*head->q=w8a8"),
        ("vit_digits", "bf16; q=w8a8"),
    )
}


@pytest.mark.slow
def test_qat_from_the_cli_on_every_model_family(tmp_path):
    """Two QAT steps of each family through `python -m bf16jax.main`, run side by side."""
    common = (
        "--config.train.steps=2",
        "--config.train.log_every=1",
        "--config.train.eval_every=2",
        "--config.train.eval_steps=1",
        "--config.train.diagnostics=False",
        "--config.checkpoint.every_steps=2",
    )
    procs = {}
    for name, overrides in CLI_RUNS.items():
        args = (f"--config=configs/{name}.py", f"--workdir={tmp_path / name}", *common, *overrides)
        procs[name] = subprocess.Popen(
            main_command(*args),
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        final = final_metrics(stdout)
        assert final["step"] == 2 and math.isfinite(final["eval_loss"]), name
        assert "q=w" in stderr  # the logged policy names the quantization
        assert (tmp_path / name / "checkpoints" / "2" / "state").exists()


# ----------------------------------------------------------------------------- FP8 bookkeeping
@pytest.mark.parametrize("dtype, fmax", [(quant.FP8_FORWARD, 448.0), (quant.FP8_BACKWARD, 57344.0)])
def test_fp8_quantize_dequantize(dtype, fmax):
    x = jax.random.normal(jax.random.key(3), (256,)) * 5.0
    history = quant.update_amax_history(jnp.zeros(4, jnp.float32), x)
    scale = quant.scale_from_history(history, jnp.ones([], jnp.float32), dtype)
    np.testing.assert_allclose(scale, jnp.max(jnp.abs(x)) / fmax, rtol=1e-6)
    y = quant.fp8_qdq(x, scale, dtype)
    np.testing.assert_array_equal(quant.fp8_qdq(y, scale, dtype), y)  # idempotent
    mantissa = 3 if dtype == quant.FP8_FORWARD else 2
    rel = np.abs(np.asarray(y - x)) / np.maximum(np.abs(np.asarray(x)), 1e-3)
    assert rel[np.abs(np.asarray(x)) > 0.1].max() <= 2.0 ** -(mantissa + 1) + 1e-6
    # An amax above the delayed scale's saturates at max(dtype) * scale: no inf or nan.
    big = quant.fp8_qdq(jnp.asarray([1e6, -1e6]), scale, dtype)
    np.testing.assert_allclose(big, [fmax * scale, -fmax * scale], rtol=1e-6)


def test_amax_history_and_delayed_scale_bookkeeping():
    h = jnp.zeros(3, jnp.float32)
    for amax in (2.0, 8.0, 1.0, 0.5):
        h = quant.update_amax_history(h, jnp.asarray([amax, -amax / 2]))
    np.testing.assert_array_equal(h, [0.5, 1.0, 8.0])  # newest first; 2.0 rolled out
    prev = jnp.asarray(0.25, jnp.float32)
    np.testing.assert_allclose(quant.scale_from_history(h, prev), 8.0 / 448.0, rtol=1e-6)
    np.testing.assert_allclose(quant.scale_from_history(h, prev, margin=1), 16.0 / 448.0)
    assert quant.scale_from_history(jnp.zeros(3), prev) == prev  # no amax yet: keep the scale
    nan = jnp.asarray([jnp.nan, 1.0])
    assert quant.scale_from_history(nan, prev) == prev
