"""Tests for bf16jax.training.optim: FP32 moment math, state dtypes, schedule, masks, update
rules."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from bf16jax.config import base_config
from bf16jax.precision import update_rules
from bf16jax.training import optim

BF16 = jnp.bfloat16
F32 = jnp.float32


def make_cfg(**changes):
    cfg = base_config().optim
    cfg.update(
        dict(
            learning_rate=1e-3,
            weight_decay=0.0,
            clip_norm=0.0,
            schedule="constant",
            warmup_steps=0,
        )
    )
    cfg.update(changes)
    return cfg


def run_steps(opt, params, grads_seq):
    """Applies opt for each grads in grads_seq (leading axis = step) under one jit + scan."""

    @jax.jit
    def run(params, state, grads_seq):
        def body(carry, g):
            return opt.update(g, carry[1], carry[0]), None

        return jax.lax.scan(body, (params, state), grads_seq)[0]

    return run(params, opt.init(params), grads_seq)


def nu_case_grads(dtype):
    # 100 steps of g = 1, then 1000 of g = 0.
    g = np.concatenate([np.ones((100, 4)), np.zeros((1000, 4))])
    return {"w": jnp.asarray(g, dtype)}


NU_EXACT = 0.001 * sum(0.999 ** (1099 - i) for i in range(100))  # 0.0350075


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_nu_is_an_average_for_any_param_dtype(dtype):
    opt = optim.make_optimizer(make_cfg(b2=0.999), total_steps=1100)
    params = {"w": jnp.zeros((4,), dtype)}
    new_params, state = run_steps(opt, params, nu_case_grads(dtype))
    nu = state.tx_state[0].nu["w"]
    assert nu.dtype == F32 and new_params["w"].dtype == dtype
    np.testing.assert_allclose(np.asarray(nu), NU_EXACT, rtol=1e-3)
    assert int(state.count) == 1100


def test_optax_adam_with_bf16_params_has_the_nu_bug_we_avoid():
    tx = optax.adam(1e-3, b2=0.999)
    params = {"w": jnp.zeros((4,), BF16)}
    grads = nu_case_grads(BF16)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
        st, _ = jax.lax.scan(
            lambda s, g: (tx.update(g, s, params)[1], None), tx.init(params), grads
        )
    nu = st[0].nu["w"]
    assert nu.dtype == BF16  # optax keeps nu in the param dtype, where bf16(0.999) == 1.0
    np.testing.assert_allclose(np.asarray(nu, F32), 0.098, rtol=0.02)
    assert abs(float(nu[0]) - NU_EXACT) > 0.05


def test_adamw_matches_optax_adamw_on_fp32():
    cfg = make_cfg(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, schedule="cosine", warmup_steps=2)
    opt = optim.make_optimizer(cfg, total_steps=6)
    ref = optax.adamw(
        opt.schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=optim.weight_decay_mask
    )
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"dense": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jnp.ones((4,))}}
    grads = jax.tree.map(lambda p: jax.random.normal(k2, (6, *p.shape)), params)
    ours = run_steps(opt, params, grads)[0]
    p, s = params, ref.init(params)
    with jax.numpy_dtype_promotion("standard"):
        for i in range(6):
            u, s = ref.update(jax.tree.map(lambda g, i=i: g[i], grads), s, p)
            p = optax.apply_updates(p, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, p)
    assert not np.allclose(ours["dense"]["kernel"], params["dense"]["kernel"])


def test_weight_decay_mask_excludes_vectors_scalars_norms_and_biases():
    params = {
        "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
        "ln": {"scale": jnp.ones((4,))},
        "scanned_ln": {"scale": jnp.ones((2, 4))},  # [layers, features]
        "scanned_kernel": jnp.ones((2, 3, 4)),
        "embed": {"embedding": jnp.ones((5, 4))},
        "gain": jnp.ones(()),
        # LSQ step sizes stacked by scan_layers: [layers, out] and [layers]. Before, the
        # ndim >= 2 rule decayed the first (pulling log step sizes towards s = 1).
        "scanned_q": {"w_log_scale": jnp.ones((2, 4)), "a_log_scale": jnp.ones((2,))},
        "bias_matrix": {"bias": jnp.ones((2, 4))},
    }
    mask = optim.weight_decay_mask(params)
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "ln": {"scale": False},
        "scanned_ln": {"scale": False},
        "scanned_kernel": True,
        "embed": {"embedding": True},
        "gain": False,
        "scanned_q": {"w_log_scale": False, "a_log_scale": False},
        "bias_matrix": {"bias": False},
    }
    # With zero grads only the decayed leaves move.
    opt = optim.make_optimizer(make_cfg(name="sgd", momentum=0.0, weight_decay=0.5), total_steps=1)
    grads = jax.tree.map(lambda p: jnp.zeros((1, *p.shape)), params)
    new = run_steps(opt, params, grads)[0]
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, params)
    assert moved == mask


def test_weight_decay_mask_on_nnx_state():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    mask = nnx.to_pure_dict(optim.weight_decay_mask(state))
    assert mask == {
        "layers": {
            0: {"kernel": True, "bias": False},
            1: {"scale": False, "bias": False},
        }
    }


def test_schedule_warmup_then_cosine_or_constant():
    cfg = make_cfg(learning_rate=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    sched = optim.make_schedule(cfg, total_steps=110)
    got = [float(sched(s)) for s in (0, 4, 9, 10, 60, 110, 500)]
    np.testing.assert_allclose(got, [0.1, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    assert sched(jnp.int32(3)).dtype == F32
    cfg.schedule = "constant"
    sched = optim.make_schedule(cfg, total_steps=110)
    got = [float(sched(s)) for s in (0, 9, 10, 500)]
    np.testing.assert_allclose(got, [0.1, 1, 1, 1], rtol=1e-6)  # optax's FP32 arithmetic
    cfg.warmup_steps = 0
    assert float(optim.make_schedule(cfg, total_steps=5)(0)) == 1.0


def test_global_norm_of_bf16_leaves_is_fp32_exact():
    # optax.tree.norm alone sums the squares in BF16 and returns BF16 (about 1e-3 off here).
    rng = np.random.default_rng(0)
    tree = {k: jnp.asarray(rng.normal(size=(256, 300)) * 1e-3, BF16) for k in "abc"}
    exact = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree.values()))
    norm = jax.jit(optim.global_norm)(tree)
    assert norm.dtype == F32
    assert abs(float(norm) - exact) / exact < 1e-6
    assert float(optim.global_norm({})) == 0.0


def test_learning_rate_follows_applied_updates():
    cfg = make_cfg(learning_rate=1.0, warmup_steps=4)
    opt = optim.make_optimizer(cfg, total_steps=8)
    params = {"w": jnp.zeros((2, 2))}
    state = opt.init(params)
    assert float(opt.learning_rate(state)) == 0.25
    _, state = opt.update({"w": jnp.ones((2, 2))}, state, params)
    assert float(opt.learning_rate(state)) == 0.5


def test_global_norm_clipping():
    cfg = make_cfg(name="sgd", momentum=0.0, learning_rate=1.0, clip_norm=1.0)
    opt = optim.make_optimizer(cfg, total_steps=1)
    params = {"a": jnp.zeros((1,)), "b": jnp.zeros((1,))}
    grads = {"a": jnp.array([[3.0]]), "b": jnp.array([[4.0]])}  # global norm 5
    new = run_steps(opt, params, grads)[0]
    np.testing.assert_allclose([new["a"][0], new["b"][0]], [-0.6, -0.8], rtol=1e-6)
    small = {"a": jnp.array([[0.3]]), "b": jnp.array([[0.4]])}  # below the norm: untouched
    new = run_steps(opt, params, small)[0]
    np.testing.assert_allclose([new["a"][0], new["b"][0]], [-0.3, -0.4], rtol=1e-6)


def test_state_dtypes_are_the_requested_ones():
    params = {"w": jnp.zeros((4, 4), BF16), "b": jnp.zeros((4,), BF16)}
    opt = optim.make_optimizer(make_cfg(mu_dtype="bf16", nu_dtype="f32"), total_steps=1)
    adam = opt.init(params).tx_state[0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {np.dtype(BF16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {np.dtype(F32)}
    params32, state = run_steps(
        opt, params, jax.tree.map(lambda p: jnp.ones((2, *p.shape)), params)
    )
    assert jax.tree.map(lambda x: x.dtype, state.tx_state[0].mu) == {"w": BF16, "b": BF16}
    assert params32["w"].dtype == BF16

    sgd = optim.make_optimizer(make_cfg(name="sgd", momentum=0.9), total_steps=1)
    trace = sgd.init(params).tx_state[0].trace
    assert {x.dtype for x in jax.tree.leaves(trace)} == {np.dtype(F32)}

    big = {"w": jnp.zeros((128, 256), BF16), "b": jnp.zeros((8,), BF16)}
    ada = optim.make_optimizer(make_cfg(name="adafactor"), total_steps=1).init(big).tx_state[0]
    assert ada.v_row["w"].shape == (128,) and ada.v_col["w"].shape == (256,)  # factored
    assert ada.v["b"].shape == (8,)
    floats = [x for x in jax.tree.leaves(ada) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {np.dtype(F32)}


def test_sgd_momentum_is_heavy_ball_in_fp32():
    cfg = make_cfg(name="sgd", momentum=0.9, learning_rate=1.0)
    opt = optim.make_optimizer(cfg, total_steps=3)
    params = {"w": jnp.zeros((2,), BF16)}
    new, state = run_steps(opt, params, {"w": jnp.ones((3, 2), BF16)})
    # m: 1, 1.9, 2.71 -> w = -(1 + 1.9 + 2.71) = -5.61 (BF16: -5.625)
    np.testing.assert_allclose(np.asarray(state.tx_state[0].trace["w"]), 2.71, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["w"], F32), np.float32(ml_dtypes.bfloat16(-5.61)))


@pytest.mark.parametrize("name", ["adafactor", "sgd", "adamw"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_optimizers_reduce_a_quadratic(name, dtype):
    lr = {"adafactor": 0.1, "sgd": 0.05, "adamw": 0.05}[name]
    cfg = make_cfg(name=name, learning_rate=lr, momentum=0.9, weight_decay=0.0)
    opt = optim.make_optimizer(cfg, total_steps=50)
    target = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    params = {"w": jnp.full((3, 4), 0.5, dtype)}

    def loss(p):
        return jnp.sum((p["w"].astype(F32) - target) ** 2)

    @jax.jit
    def train(params, state):
        def body(carry, _):
            p, s = carry
            return opt.update(jax.grad(loss)(p), s, p), None

        return jax.lax.scan(body, (params, state), None, length=50)[0]

    new, _ = train(params, opt.init(params))
    assert new["w"].dtype == dtype
    assert float(loss(new)) < 0.1 * float(loss(params))


def test_nearest_rule_rounds_the_fp32_sum_to_the_param_dtype():
    w = jnp.array([1.0, 1.0, 1.0, 256.0], BF16)
    u = jnp.array([2.0**-9, 3 * 2.0**-9, 1e-3, 0.75], F32)  # tie, above half ulp, below, tie
    new, state = optim.apply_updates({"w": w}, {"w": u})
    expected = (np.asarray(w, np.float32) + np.asarray(u)).astype(ml_dtypes.bfloat16)
    assert new["w"].dtype == BF16 and state == optax.EmptyState()
    np.testing.assert_array_equal(np.asarray(new["w"]), expected)
    np.testing.assert_array_equal(np.asarray(new["w"], F32), [1.0, 1.0078125, 1.0, 256.0])
    w32 = jnp.array([1.0], F32)
    new32, _ = optim.apply_updates({"w": w32}, {"w": jnp.array([1e-3], F32)})
    assert new32["w"].dtype == F32 and float(new32["w"][0]) == np.float32(1.0) + np.float32(1e-3)


@dataclasses.dataclass(frozen=True)
class CountingRule:
    """A stateful test rule: nearest rounding plus a per-param counter and the last key/step."""

    requires_key: bool = True

    def init(self, params):
        return {
            "n": jax.tree.map(lambda p: jnp.zeros([], jnp.int32), params),
            "step": jnp.zeros([], jnp.int32),
        }

    def apply(self, params, updates, rule_state, key, step):
        new, _ = optim.NearestRule().apply(params, updates, None, None, step)
        n = jax.tree.map(lambda c: c + 1, rule_state["n"])
        del key
        return new, {"n": n, "step": step}


def test_update_rule_registry_slots_in_stateful_rules(monkeypatch):
    monkeypatch.setitem(update_rules._UPDATE_RULES, "counting", CountingRule())
    assert "counting" in optim.update_rules()
    opt = optim.make_optimizer(make_cfg(update_rule="counting"), total_steps=3)
    params = {"w": jnp.zeros((2,), BF16)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        opt.update({"w": jnp.ones((2,), BF16)}, state, params)
    step = jax.jit(opt.update)
    for i in range(3):
        params, state = step({"w": jnp.ones((2,), BF16)}, state, params, key=jax.random.key(i))
    assert int(state.rule_state["n"]["w"]) == 3 and int(state.rule_state["step"]) == 2


def test_update_on_nnx_state_under_jit_keeps_param_dtypes():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0), param_dtype=BF16)
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optim.make_optimizer(make_cfg(weight_decay=0.1, clip_norm=1.0), total_steps=4)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    new_params, state = jax.jit(opt.update)(grads, state, params)
    assert jax.tree.map(lambda x: x.dtype, new_params) == jax.tree.map(lambda x: x.dtype, params)
    model = nnx.merge(graphdef, new_params)
    assert model.kernel[...].dtype == BF16
    assert not np.array_equal(
        np.asarray(model.kernel[...], F32), np.asarray(params["kernel"][...], F32)
    )


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(name="adam"), r"optim.name='adam'.*'adamw', 'adafactor', 'sgd'"),
        (dict(schedule="linear"), r"optim.schedule='linear'.*'cosine', 'constant'"),
        (dict(update_rule="stochastik"), r"update rule 'stochastik'.*'nearest'"),
        (dict(mu_dtype="f8"), r"optim.mu_dtype.*'f8'"),
        (dict(b2=1.0), r"optim.b2=1.0 is out of range"),
        (dict(learning_rate=-1.0), r"optim.learning_rate=-1.0"),
        (dict(min_lr_ratio=2.0), r"optim.min_lr_ratio=2.0"),
        (dict(clip_norm=-1.0), r"optim.clip_norm=-1.0"),
        (dict(eps=0.0), r"optim.eps=0.0"),
        (dict(nu_dtype="bf16", b2=0.999), r"nu_dtype=bfloat16 cannot hold an average.*b2"),
        (dict(name="adafactor", nu_dtype="bf16"), r"adafactor keeps its factored"),
    ],
)
def test_bad_config_raises_naming_the_key(changes, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(make_cfg(**changes), total_steps=10)


def test_bad_total_steps_and_accepted_bf16_nu_with_short_average():
    with pytest.raises(ValueError, match="total_steps=0"):
        optim.make_optimizer(make_cfg(), total_steps=0)
    opt = optim.make_optimizer(make_cfg(nu_dtype="bf16", b2=0.95), total_steps=1)
    assert opt.init({"w": jnp.zeros((2,))}).tx_state[0].nu["w"].dtype == BF16


def test_step_sizes_of_a_scanned_qat_model_are_never_decayed():
    from bf16jax.models import build_model

    cfg = base_config("gpt").model
    cfg.update(num_layers=2, embed_dim=16, num_heads=2, mlp_dim=32, max_len=8, scan_layers=True)
    model = nnx.eval_shape(lambda: build_model(cfg, "bf16; q=w4a8", rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(optim.weight_decay_mask(nnx.state(model, nnx.Param)))
    decayed = {"/".join(map(str, p)) for p, m in flat if m.get_value()}
    steps = [p for p, _ in flat if str(p[-1]).endswith("log_scale")]
    assert len(steps) == 12  # q, k, v, o, fc1, fc2: w_ and a_log_scale, stacked
    assert all("/".join(map(str, p)) not in decayed for p in steps)
    assert "blocks/mlp/fc1/kernel" in decayed and "embed/embedding" in decayed


def test_lost_weight_decay_is_diagnosed_and_warned():
    """bf16-pure, zero gradients, lr 1e-3, wd 0.1: w/w0 should be exp(-0.2) = 0.8187 after
    2,000 steps. Round-to-nearest leaves it at 1.0 (and said nothing); split follows FP32."""
    cfg = make_cfg(learning_rate=1e-3, weight_decay=0.1)
    params = {"dense": {"kernel": jnp.full((8, 8), 0.5, BF16)}}
    zeros = {"dense": {"kernel": jnp.zeros((8, 8), F32)}}
    with pytest.warns(UserWarning, match="Weight decay does nothing on bfloat16 params in 100%"):
        lost = optim.check_decay_precision(cfg, params, "nearest", total_steps=2000)
    assert lost == 1.0
    for rule in ("split", "kahan", "stochastic"):
        assert optim.check_decay_precision(cfg, params, rule, total_steps=2000) == 0.0
    fp32 = jax.tree.map(lambda p: p.astype(F32), params)
    assert optim.check_decay_precision(cfg, fp32, "nearest", total_steps=2000) == 0.0
    out = {}
    for rule in ("nearest", "split"):
        cfg.update_rule = rule
        opt = optim.make_optimizer(cfg, total_steps=2000)
        p, s = run_steps(opt, params, jax.tree.map(lambda z: jnp.zeros((2000, *z.shape)), zeros))
        w = float(jnp.mean(opt.master(p, s)["dense"]["kernel"])) / 0.5
        out[rule] = (w, float(opt.decay_swamped(params, opt.init(params))))
    assert out["nearest"] == (1.0, 1.0)
    assert out["split"][0] == pytest.approx(np.exp(-0.2), rel=1e-4) and out["split"][1] == 0.0
