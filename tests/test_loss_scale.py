"""Tests for bf16jax.precision.loss_scale: dynamic scaling under jit, static config, FP16
underflow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bf16jax.config import base_config
from bf16jax.precision import loss_scale as ls
from bf16jax.training import optim

F16 = jnp.float16
F32 = jnp.float32
BF16 = jnp.bfloat16


@jax.jit
def adjust_for(state, grads):
    return ls.adjust(state, ls.all_finite(grads))


FINITE = {"w": jnp.ones((3,), F16)}
INF = {"w": jnp.array([1.0, jnp.inf, 0.0], F16)}


def test_dynamic_halves_on_inf_then_grows_after_period_under_jit():
    state = ls.create_loss_scale("dynamic", init_scale=2.0**10, period=3, min_scale=1.0)
    state = adjust_for(state, FINITE)
    assert int(state.counter) == 1 and float(state.scale) == 2.0**10
    state = adjust_for(state, INF)
    assert float(state.scale) == 2.0**9 and int(state.counter) == 0
    assert state.scale.dtype == F32 and state.counter.dtype == jnp.int32
    for expected_counter in (1, 2):
        state = adjust_for(state, FINITE)
        assert float(state.scale) == 2.0**9 and int(state.counter) == expected_counter
    state = adjust_for(state, FINITE)  # the period-th finite step
    assert float(state.scale) == 2.0**10 and int(state.counter) == 0
    nan = {"w": jnp.array([jnp.nan], F32)}
    assert float(adjust_for(state, nan).scale) == 2.0**9


def test_min_scale_floor_survives_jit():
    state = ls.create_loss_scale("dynamic", init_scale=4.0, period=3, min_scale=2.0)
    state = adjust_for(state, INF)
    assert float(state.scale) == 2.0
    state = adjust_for(state, INF)  # at the floor: halving stays at min_scale
    assert float(state.scale) == 2.0 and state.min_scale == 2.0
    odd = ls.create_loss_scale("dynamic", init_scale=3.0, period=3, min_scale=2.0)
    assert float(adjust_for(odd, INF).scale) == 2.0


def test_scale_never_grows_to_inf():
    state = ls.create_loss_scale("dynamic", init_scale=2.0**127, period=1)
    state = adjust_for(state, FINITE)
    assert float(state.scale) == 2.0**127


def test_static_config_survives_jit_and_is_not_a_leaf():
    state = ls.create_loss_scale("dynamic", init_scale=8.0, period=7, factor=4.0, min_scale=0.5)
    assert len(jax.tree.leaves(state)) == 2
    out = jax.jit(lambda s: s)(state)
    assert (out.kind, out.period, out.factor, out.min_scale) == ("dynamic", 7, 4.0, 0.5)
    out = adjust_for(state, INF)
    assert (out.kind, out.period, out.factor, out.min_scale) == ("dynamic", 7, 4.0, 0.5)
    assert float(out.scale) == 2.0  # 8 / factor 4


@pytest.mark.parametrize("kind", ["static", "none"])
def test_static_and_none_never_change(kind):
    state = ls.create_loss_scale(kind, init_scale=2.0**8, period=1)
    for grads in (INF, FINITE, FINITE):
        state = adjust_for(state, grads)
    assert float(state.scale) == (2.0**8 if kind == "static" else 1.0)
    assert int(state.counter) == 0
    loss = jnp.float32(1.5)
    assert float(ls.scale_loss(state, loss)) == float(state.scale) * 1.5


def test_unscale_is_fp32_and_exact():
    state = ls.create_loss_scale("static", init_scale=2.0**15)
    values = np.array([1e-7, 3e-5, -0.123, 2.0], np.float32)
    scaled = {"w": jnp.asarray(values * 2.0**15, F32), "n": jnp.arange(3)}
    out = jax.jit(ls.unscale_grads)(state, scaled)
    assert out["w"].dtype == F32 and out["n"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out["w"]), values)
    scaled16 = np.asarray(values[:3] * 2.0**15, np.float16)  # FP16 grads of a scaled loss
    half = ls.unscale_grads(state, {"w": jnp.asarray(scaled16)})["w"]
    assert (
        half.dtype == F32
    )  # 1e-7 is below FP16's smallest normal: unscaling in FP16 would lose it
    np.testing.assert_array_equal(half, scaled16.astype(np.float32) / np.float32(2.0**15))
    np.testing.assert_allclose(half, values[:3], rtol=1e-3)
    none = ls.create_loss_scale("none")
    assert ls.unscale_grads(none, {"w": jnp.ones(2, BF16)})["w"].dtype == F32


def test_scaling_rescues_fp16_grads_that_underflow():
    x = jnp.full((1000,), 1e-5, F16)  # tiny FP16 activations
    w = jnp.ones((1000,), F16)

    def loss(w):
        return jnp.mean((w * x).astype(F32))  # FP32 loss; the backward pass runs in FP16

    state = ls.create_loss_scale("dynamic", init_scale=2.0**15)
    plain = jax.jit(jax.grad(loss))(w)
    scaled = jax.jit(jax.grad(lambda w: ls.scale_loss(state, loss(w))))(w)
    grads = ls.unscale_grads(state, scaled)
    assert plain.dtype == F16 and not np.any(np.asarray(plain))  # 1e-8 flushes to 0 in FP16
    assert bool(ls.all_finite(grads)) and np.all(np.asarray(grads) != 0)
    np.testing.assert_allclose(grads, np.float32(np.float16(1e-5)) / 1000, rtol=2e-3)


def test_all_finite():
    assert bool(ls.all_finite({"a": jnp.ones(3), "b": jnp.ones(2, BF16), "i": jnp.arange(2)}))
    assert not bool(ls.all_finite({"a": jnp.ones(3), "b": jnp.array([jnp.nan], BF16)}))
    assert not bool(jax.jit(ls.all_finite)({"a": jnp.array([-jnp.inf])}))
    assert bool(ls.all_finite({})) and ls.all_finite({}).dtype == jnp.bool_


def test_non_finite_step_is_skipped_with_select_tree():
    cfg = base_config().optim
    opt = optim.make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.ones((2, 2), BF16), "b": jnp.zeros((2,), BF16)}
    key = jax.random.key(0)

    @jax.jit
    def step(params, opt_state, key, grads):
        new_params, new_opt = opt.update(grads, opt_state, params)
        finite = ls.all_finite(grads)
        new_key = jax.random.fold_in(key, 1)
        new = (new_params, new_opt, new_key)
        return ls.select_tree(finite, new, (params, opt_state, key))

    state0 = opt.init(params)
    bad = {"w": jnp.array([[1.0, jnp.inf], [0.0, 0.0]], BF16), "b": jnp.ones(2, BF16)}
    p, s, k = step(params, state0, key, bad)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((params, state0)), strict=True):
        np.testing.assert_array_equal(np.asarray(a, F32), np.asarray(b, F32))
    assert jax.random.key_data(k).tolist() == jax.random.key_data(key).tolist()
    good = jax.tree.map(jnp.ones_like, params)
    p, s, k = step(params, state0, key, good)
    assert int(s.count) == 1 and p["w"].dtype == BF16
    # b starts at 0, so the tiny first (warmup) step shows even in BF16.
    assert not np.array_equal(np.asarray(p["b"], F32), np.asarray(params["b"], F32))
    assert not np.array_equal(s.tx_state[1].mu["w"], state0.tx_state[1].mu["w"])


def test_make_loss_scale_from_config_and_errors():
    train = base_config().train
    train.update(loss_scale="dynamic", loss_scale_init=2.0**12, loss_scale_period=5)
    state = ls.make_loss_scale(train)
    assert (state.kind, state.period, float(state.scale), state.min_scale) == (
        "dynamic",
        5,
        2.0**12,
        1.0,
    )
    with pytest.raises(ValueError, match=r"Unknown loss scale 'dyn'.*'none', 'static', 'dynamic'"):
        ls.create_loss_scale("dyn")
    with pytest.raises(ValueError, match="loss_scale_period=0"):
        ls.create_loss_scale("dynamic", period=0)
    with pytest.raises(ValueError, match="loss_scale_init=0.5 is below loss_scale_min=1.0"):
        ls.create_loss_scale("dynamic", init_scale=0.5)
    with pytest.raises(ValueError, match="loss_scale_min=0.0"):
        ls.create_loss_scale("static", min_scale=0.0)
