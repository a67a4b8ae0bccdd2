"""Tests for FP8 training with delayed scaling (`q=fp8`): numerics, bookkeeping, resume, CLI.

On CPU, XLA runs the FP8 dots by upcasting the E4M3/E5M2 operands (the quantization is real, the
GEMM is not); a real FP8 GEMM needs a Hopper GPU, which these tests do not have. What is checked
here: the lowered HLO feeds f8E4M3FN operands to the forward dot (f8E5M2 in the backward), the
output is within E4M3's 3-mantissa-bit error of BF16, the amax histories roll and the scales follow
them exactly as a numpy re-implementation of delayed scaling, and an FP8 run resumes bit for bit.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import TINY_OVERRIDES, final_metrics, run_main
from flax import nnx
from jax.sharding import PartitionSpec as P
from tiny import tiny_gpt_config

from bf16jax.checkpoint.manager import Checkpointer
from bf16jax.data import datasets as data_lib
from bf16jax.nn import quant, quant_model
from bf16jax.nn.layers import Linear
from bf16jax.parallel import sharding
from bf16jax.precision import get_policy
from bf16jax.training import trainer as train

E4M3_MAX, E5M2_MAX = 448.0, 57344.0
FMAX = np.asarray([E4M3_MAX, E4M3_MAX, E5M2_MAX], np.float32)  # rows x, w, gradient


def rel_rms(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))


def numpy_delayed_scaling(scale, history, amaxes):
    """Reference: roll each row, put this step's amax first, scale = max(row) / fmax (or keep)."""
    history = np.roll(np.asarray(history, np.float32), 1, axis=1)
    history[:, 0] = amaxes
    amax = history.max(axis=1)
    ok = (amax > 0) & np.isfinite(amax)
    return np.where(ok, amax / FMAX, scale).astype(np.float32), history


def fp8_linear(policy="bf16; q=fp8", din=64, dout=48):
    return Linear(din, dout, policy=get_policy(policy), name="fc", rngs=nnx.Rngs(0), use_bias=False)


# ----------------------------------------------------------------------------- the layer
def test_fp8_policy_and_layer_state():
    policy = get_policy("bf16; q=fp8; head->q=none")
    assert str(get_policy(str(policy))) == str(policy) and "q=fp8" in str(policy)
    assert policy.quant_for("blocks/0/mlp/fc1") == "fp8"
    assert policy.quant_for("head") == "none"  # override
    assert policy.quant_for("patch_embed", edge=True) == "none"  # edge layers stay BF16
    layer = fp8_linear()
    params, meta = nnx.state(layer, nnx.Param), nnx.state(layer, quant.FP8Meta)
    assert set(dict(nnx.to_flat_state(params))) == {("kernel",)}  # meta is not a param
    assert meta["fp8_scale"][...].dtype == jnp.float32 and meta["fp8_scale"][...].shape == (3,)
    assert meta["fp8_history"][...].shape == (3, quant.FP8_HISTORY_LENGTH)
    assert quant_model.quantized_layers(layer) == []  # LSQ-only helpers (int8 export) skip it


def test_fp8_matmul_is_close_to_bf16_within_e4m3_error():
    layer, ref = fp8_linear(), fp8_linear("bf16")
    np.testing.assert_array_equal(layer.kernel[...], ref.kernel[...])  # same init
    x = jax.random.normal(jax.random.key(1), (32, 64)).astype(jnp.bfloat16)
    w = layer.kernel[...]
    amax = [jnp.max(jnp.abs(x.astype(jnp.float32))), jnp.max(jnp.abs(w)), 1.0]
    layer.fp8_scale[...] = jnp.asarray(amax, jnp.float32) / jnp.asarray(FMAX)
    got, want = np.asarray(layer(x), np.float32), np.asarray(ref(x), np.float32)
    assert got.dtype == want.dtype
    # Each E4M3 operand has relative error <= 2^-4 (3 mantissa bits, normal range): a product
    # is off by <= 2^-3 + 2^-8 of |x||w|; the RMS error of a sum of many is ~2^-4 / sqrt(3) * 1.4.
    bound = (2.0**-3 + 2.0**-7) * (np.abs(np.asarray(x, np.float32)) @ np.abs(np.asarray(w)))
    assert np.all(np.abs(got - want) <= bound + 1e-2)
    err = rel_rms(got, want)
    assert 1e-3 < err < 0.06, err  # quantized (not a BF16 pass-through), but only by E4M3
    # The result is the dot of the E4M3 codes, rescaled: exactly what fp8_qdq predicts.
    xq = quant.fp8_qdq(x, layer.fp8_scale[...][0])
    wq = quant.fp8_qdq(w, layer.fp8_scale[...][1])
    np.testing.assert_allclose(got, np.asarray(xq @ wq), rtol=1e-2, atol=1e-2)


def test_fp8_gradients_are_close_and_meta_gradient_is_the_new_state():
    layer, ref = fp8_linear(), fp8_linear("bf16")
    x = jax.random.normal(jax.random.key(1), (32, 64)).astype(jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(2), (32, 48))
    graphdef, params, meta = nnx.split(layer, nnx.Param, quant.FP8Meta)
    ref_graphdef, ref_params = nnx.split(ref, nnx.Param)

    def loss(p, m, xx):  # d loss / d y = cot exactly
        return jnp.sum(nnx.merge(graphdef, p, m)(xx).astype(jnp.float32) * cot)

    def ref_loss(p, xx):
        return jnp.sum(nnx.merge(ref_graphdef, p)(xx).astype(jnp.float32) * cot)

    amax_x = float(jnp.max(jnp.abs(x.astype(jnp.float32))))
    amax_w = float(jnp.max(jnp.abs(layer.kernel[...])))
    meta["fp8_scale"][...] = jnp.asarray([amax_x / E4M3_MAX, amax_w / E4M3_MAX, 4.0 / E5M2_MAX])
    gp, gm, gx = jax.grad(loss, argnums=(0, 1, 2))(params, meta, x)
    rp, rx = jax.grad(ref_loss, argnums=(0, 1))(ref_params, x)
    assert gx.dtype == jnp.bfloat16 and gp["kernel"][...].dtype == jnp.float32
    # E5M2 (2 mantissa bits) on the gradient dominates: relative RMS ~2^-3 / sqrt(3).
    for got, want in ((gx, rx), (gp["kernel"][...], rp["kernel"][...])):
        err = rel_rms(got, want)
        assert 1e-3 < err < 0.12, err
    # Overwrite-with-gradient: the meta's "gradient" is the rolled history and its scales.
    # The layer's output is cast to BF16 (compute dtype): the cotangent arrives BF16-rounded.
    amax_g = float(np.max(np.abs(np.asarray(cot.astype(jnp.bfloat16), np.float32))))
    want_scale, want_hist = numpy_delayed_scaling(
        np.asarray(meta["fp8_scale"][...]), meta["fp8_history"][...], [amax_x, amax_w, amax_g]
    )
    np.testing.assert_allclose(gm["fp8_history"][...], want_hist, rtol=1e-6)
    np.testing.assert_allclose(gm["fp8_scale"][...], want_scale, rtol=1e-6)


def test_hlo_of_the_fp8_linear_has_fp8_operands():
    """The lowered forward dots f8E4M3FN operands; the backward quantizes the gradient to E5M2.

    This is the program XLA gets. On CPU, XLA may upcast the FP8 operands inside its dot; only
    a Hopper GPU runs a real FP8 GEMM (not available in this test run).
    """
    layer = fp8_linear()
    graphdef, params, meta = nnx.split(layer, nnx.Param, quant.FP8Meta)
    x = jnp.ones((8, 64), jnp.bfloat16)

    def forward(p, m, xx):
        return nnx.merge(graphdef, p, m)(xx)

    text = jax.jit(forward).lower(params, meta, x).as_text()
    dots = [ln for ln in text.splitlines() if "dot_general" in ln]
    assert dots and all(re.search(r"tensor<\d+x\d+xf8E4M3FN>, tensor<\d+x\d+xf8E4M3FN>", d)
                        for d in dots), dots  # fmt: skip
    ref = jax.jit(lambda m, xx: m(xx)).lower(fp8_linear("bf16"), x)
    assert "f8E4M3FN" not in ref.as_text()  # the BF16 layer: no FP8 anywhere

    def loss(p, m, xx):
        return jnp.sum(forward(p, m, xx).astype(jnp.float32))

    grad_text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(params, meta, x).as_text()
    grad_dots = [ln for ln in grad_text.splitlines() if "dot_general" in ln]
    assert sum("f8E5M2" in d for d in grad_dots) == 2, grad_dots  # dx and dw


def test_fp8_history_margin_and_format_are_configurable():
    """Before: a 16-step history, margin 0 and E4M3/E5M2 were fixed. Now the default history
    is 1024 steps (as Transformer Engine and Flax), and `q=fp8:h<N>:m<M>:e4m3` sets them."""
    assert fp8_linear().fp8_history[...].shape == (3, 1024)
    layer = fp8_linear("bf16; q=fp8:h4:m1:e4m3")
    assert layer.fp8_history[...].shape == (3, 4) and layer.fp8_margin == 1
    graphdef, params, meta = nnx.split(layer, nnx.Param, quant.FP8Meta)
    x = jax.random.normal(jax.random.key(1), (8, 64)).astype(jnp.bfloat16)

    def loss(p, m, xx):
        return jnp.sum(nnx.merge(graphdef, p, m)(xx).astype(jnp.float32))

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    grad_dots = [ln for ln in grad_fn.lower(params, meta, x).as_text().splitlines()
                 if "dot_general" in ln]  # fmt: skip
    assert grad_dots and not any("f8E5M2" in d for d in grad_dots)  # E4M3 gradients
    assert sum("f8E4M3FN" in d for d in grad_dots) >= 2
    _, gm, _ = grad_fn(params, meta, x)
    amax_x = float(jnp.max(jnp.abs(x.astype(jnp.float32))))
    hist = np.asarray(gm["fp8_history"][...])
    assert hist.shape == (3, 4) and hist[0, 0] == pytest.approx(amax_x)
    # margin 1: scale = max(history) * 2 / max(E4M3), the gradient row in E4M3 too.
    want = hist.max(axis=1) * 2.0 / E4M3_MAX
    np.testing.assert_allclose(np.asarray(gm["fp8_scale"][...]), want, rtol=1e-6)


def test_amax_history_rolls_and_scale_follows_it_over_steps():
    """Five SGD steps of a lone FP8 Linear against a numpy re-implementation of delayed scaling."""
    layer = fp8_linear()
    graphdef, params, meta = nnx.split(layer, nnx.Param, quant.FP8Meta)
    keys = jax.random.split(jax.random.key(5), 5)

    @jax.jit
    def step(p, m, key):
        kx, kc = jax.random.split(key)
        xx = (3.0 * jax.random.normal(kx, (16, 64))).astype(jnp.bfloat16)
        cot = jax.random.uniform(kc, (16, 48), minval=-2.0, maxval=2.0)

        def loss(p, m):
            return jnp.sum(nnx.merge(graphdef, p, m)(xx).astype(jnp.float32) * cot)

        gp, new_m = jax.grad(loss, argnums=(0, 1))(p, m)
        seen = (xx, p["kernel"][...], cot.astype(jnp.bfloat16))  # the output is cast to BF16
        amaxes = [jnp.max(jnp.abs(a.astype(jnp.float32))) for a in seen]
        return jax.tree.map(lambda a, g: a - 1e-2 * g, p, gp), new_m, jnp.stack(amaxes)

    scale = np.ones(3, np.float32)
    history = np.zeros((3, quant.FP8_HISTORY_LENGTH), np.float32)
    for t, key in enumerate(keys):
        params, meta, amaxes = step(params, meta, key)
        scale, history = numpy_delayed_scaling(scale, history, np.asarray(amaxes))
        np.testing.assert_allclose(meta["fp8_history"][...], history, rtol=1e-6)
        np.testing.assert_allclose(meta["fp8_scale"][...], scale, rtol=1e-6)
        assert np.count_nonzero(history[0]) == t + 1  # one entry per step, newest first
    assert not np.allclose(history[0, 0], history[0, 1])  # batches differ: the history moves


# ----------------------------------------------------------------------------- the train step
FP8 = "bf16; q=fp8"


def host(tree):
    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return jax.tree.map(leaf, jax.device_get(tree))


def snapshot(state):
    def copy(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jnp.copy(jax.random.key_data(x)))
        return jnp.copy(x)

    return jax.tree.map(copy, state)


def metas(state) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """{layer path: (scales [3], histories [3, H])} of every FP8 Linear."""
    flat = dict(nnx.to_flat_state(state.fp8_meta))
    names = ("fp8_scale", "fp8_history")
    return {k[:-1]: tuple(np.asarray(flat[(*k[:-1], n)][...]) for n in names) for k in flat}


def one_device_mesh():
    axes = dict(zip(sharding.MESH_AXES, (1, 1, 1), strict=True))
    return sharding.make_mesh(axes, jax.devices()[:1])


@pytest.fixture(scope="module")
def fp8_run():
    """4 steps of a 1-layer GPT under `bf16; q=fp8` on one device; states at steps 0, 2, 4."""
    config = tiny_gpt_config(FP8)
    mesh = one_device_mesh()
    trainer = train.create_trainer(config, mesh)
    it = iter(data_lib.make_dataset(config.data, "train"))
    batches = [next(it) for _ in range(4)]
    state = trainer.init_state()
    states, losses = {0: host(state)}, []
    for i, local in enumerate(batches, start=1):
        state, m = trainer.step(state, trainer.global_batch(local))
        losses.append(float(m["loss"]))
        states[i] = host(state)
        if i == 2:
            at_2 = snapshot(state)
    return trainer, batches, states, at_2, losses


def test_train_step_updates_fp8_meta_by_delayed_scaling(fp8_run):
    trainer, _, states, _, losses = fp8_run
    assert all(math.isfinite(x) for x in losses)
    layers = metas(states[0])
    # q, k, v, o, fc1, fc2 quantize; the tied logits (Embed.attend) never do.
    assert len(layers) == 6 and all("blocks" in p for p in layers), sorted(layers)
    assert not any("fp8" in str(k) for k in dict(nnx.to_flat_state(states[0].params)))
    assert all(
        str(s.spec) == str(P()) for s in jax.tree.leaves(trainer.state_shardings.fp8_meta)
    )  # replicated
    for t in range(1, 5):
        before, after = metas(states[t - 1]), metas(states[t])
        params_before = dict(nnx.to_flat_state(states[t - 1].params))
        for path, (scale, hist) in after.items():
            old_scale, old_hist = before[path]
            np.testing.assert_array_equal(hist[:, 1:], old_hist[:, :-1])  # rolled by one
            assert np.all(hist[:, 0] > 0), path  # x, w and gradient amaxes recorded
            amax_w = np.max(np.abs(params_before[(*path, "kernel")][...]))  # what the step saw
            np.testing.assert_allclose(hist[1, 0], amax_w, rtol=1e-6)
            want_scale, want_hist = numpy_delayed_scaling(old_scale, old_hist, hist[:, 0])
            np.testing.assert_array_equal(hist, want_hist)
            np.testing.assert_allclose(scale, want_scale, rtol=1e-6, err_msg=path)
    # The optimizer holds no state for the meta (moments mirror the params only).
    n_params = len(jax.tree.leaves(states[0].params))
    assert len(jax.tree.leaves(states[4].opt_state)) <= 3 * n_params + 2
    assert trainer.evaluate(states[4].params, fp8_meta=states[4].fp8_meta)["loss"] < 10


def test_fp8_resume_is_bit_exact(fp8_run, tmp_path):
    """Steps 3-4 from a checkpoint of step 2 equal the straight run's step 4, meta included."""
    trainer, batches, states, at_2, _ = fp8_run
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, at_2, force=True)
        ckpt.wait()
        state = ckpt.restore(2, trainer.abstract)
    assert jax.tree.leaves(state.fp8_meta)
    for local in batches[2:4]:
        state, _ = trainer.step(state, trainer.global_batch(local))
    got, want = host(state), states[4]
    for part in ("params", "fp8_meta", "opt_state"):
        equal = jax.tree.map(np.array_equal, getattr(got, part), getattr(want, part))
        assert all(jax.tree.leaves(equal)), part


def test_grad_accumulation_takes_the_max_amax_over_micro_batches(fp8_run):
    """k = 2 micro-batches record the whole batch's x and w amaxes (max over micro-batches)."""
    _, batches, states, _, _ = fp8_run
    config = tiny_gpt_config(FP8, grad_accum_steps=2)
    mesh = one_device_mesh()
    trainer = train.create_trainer(config, mesh)
    state, _ = trainer.step(trainer.init_state(), trainer.global_batch(batches[0]))
    got, want = metas(host(state)), metas(states[1])
    assert got.keys() == want.keys()
    for path, (scale, hist) in got.items():
        np.testing.assert_array_equal(hist[1], want[path][1][1])  # w: the same weights
        np.testing.assert_allclose(hist[0], want[path][1][0], rtol=1e-2, err_msg=str(path))
        assert np.all(hist[:, 0] > 0) and np.all(hist[:, 1:] == 0)
        want_scale, _ = numpy_delayed_scaling(
            np.ones(3, np.float32), np.zeros_like(hist), hist[:, 0]
        )
        np.testing.assert_allclose(scale, want_scale, rtol=1e-6)


@pytest.mark.slow
def test_fp8_from_the_cli(tmp_path):
    """Two `q=fp8` steps of a tiny GPT through `python -m bf16jax.main`."""
    args = (
        "--config=configs/gpt_tiny.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.precision=bf16; q=fp8",
        *TINY_OVERRIDES["gpt_tiny"],
        "--config.train.steps=2",
        "--config.train.log_every=1",
        "--config.train.eval_every=2",
        "--config.train.eval_steps=1",
        "--config.train.sample_tokens=8",
        "--config.train.diagnostics=False",
        "--config.checkpoint.every_steps=2",
    )
    proc = run_main(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = final_metrics(proc.stdout)
    assert final["step"] == 2 and math.isfinite(final["eval_loss"])
    assert "q=fp8" in proc.stderr  # the logged policy names it
    assert (tmp_path / "run" / "checkpoints" / "2" / "state").exists()
