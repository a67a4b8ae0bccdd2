"""Policy: presets, jmp/Levanter strings, round-trips, overrides, casts and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bf16jax
from bf16jax.precision import PRESETS, Policy, get_policy, parse_dtype

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)


def dtypes(p: Policy):
    return (p.param_dtype, p.compute_dtype, p.output_dtype, p.accum_dtype)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fp32", (F32, F32, F32, F32)),
        ("bf16", (F32, BF16, F32, F32)),
        ("bf16-pure", (BF16, BF16, BF16, F32)),
        ("fp16", (F32, F16, F32, F32)),
        ("BF16-Pure", (BF16, BF16, BF16, F32)),
    ],
)
def test_presets(name, expected):
    assert dtypes(get_policy(name)) == expected
    assert bf16jax.get_policy is get_policy


@pytest.mark.parametrize(
    "text, expected",
    [
        # jmp's documented examples: compute follows params, output follows compute.
        ("c=f16", (F32, F16, F16, F32)),
        ("p=f16,c=f16", (F16, F16, F16, F32)),
        ("p=f16,c=bf16", (F16, BF16, BF16, F32)),
        ("p=f32,c=bf16,o=f32", (F32, BF16, F32, F32)),
        ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32, F32)),
        ("p=full,c=bfloat16,o=full", (F32, BF16, F32, F32)),
        ("p=bf16", (BF16, BF16, BF16, F32)),
        ("p=f32,c=bf16,a=bf16", (F32, BF16, BF16, BF16)),
        ("accum=f32, compute=bf16", (F32, BF16, BF16, F32)),
        ("float16", (F16, F16, F16, F32)),
        ("bfloat16", (BF16, BF16, BF16, F32)),
        ("f32", (F32, F32, F32, F32)),
    ],
)
def test_jmp_strings(text, expected):
    assert dtypes(get_policy(text)) == expected


def test_half_follows_jmp_platform_rule():
    # jmp: "half" is bfloat16 on TPU and float16 elsewhere.
    expected = BF16 if jax.default_backend() == "tpu" else F16
    assert get_policy("c=half").compute_dtype == expected


@pytest.mark.parametrize(
    "text",
    list(PRESETS)
    + ["c=f16", "p=bf16,c=bf16,o=f32", "bf16-pure; .*norm.*->fp32; .*head.*->p=f32,c=bf16"],
)
def test_str_round_trips(text):
    policy = get_policy(text)
    again = get_policy(str(policy))
    assert again == policy
    assert hash(again) == hash(policy)
    assert repr(policy).startswith("Policy(")


def test_hashable_static_jit_argument():
    policy = get_policy("bf16")
    calls = []

    def f(x, policy):
        calls.append(1)
        return policy.cast_to_compute(x)

    jitted = jax.jit(f, static_argnums=1)
    assert jitted(jnp.ones(3), policy).dtype == BF16
    jitted(jnp.ones(3), get_policy("bf16"))  # equal policy: no retrace
    assert len(calls) == 1
    assert jitted(jnp.ones(3), get_policy("fp32")).dtype == F32
    assert len(calls) == 2


def test_overrides_first_match_and_ancestors():
    policy = get_policy("bf16-pure; .*norm.*->fp32; decoder/layers_3->bf16; .*->fp16")
    assert dtypes(policy.for_module("decoder/layers_3/norm1/scale"))[:3] == (F32, F32, F32)
    # An ancestor path matching applies to everything below it.
    assert policy.for_module("decoder/layers_3/attn/q").param_dtype == F32
    assert policy.for_module("decoder/layers_3/attn/q").compute_dtype == BF16
    # Rules are tried in order: ".*" catches what earlier rules missed.
    assert policy.for_module("decoder/layers_4/attn/q").compute_dtype == F16


def test_no_override_returns_self_and_resolution_is_idempotent():
    policy = get_policy("bf16-pure; .*head.*->fp32")
    assert policy.for_module("blocks/0/attn/q") is policy
    head = policy.for_module("head")
    assert head.param_dtype == F32 and head.overrides == policy.overrides
    assert head.for_module("head") == head
    # Fullmatch: "head" does not match "heads_extra" unless the regex says so.
    assert get_policy("bf16-pure; head->fp32").for_module("heads_extra").param_dtype == BF16


def test_overrides_from_python():
    policy = Policy("f32", "bf16", "f32", overrides=((".*norm.*", "fp32"),))
    assert policy.overrides[0][1] == PRESETS["fp32"]
    assert policy.for_module("ln_f/norm").compute_dtype == F32


def test_casts_touch_only_floating_leaves():
    policy = get_policy("bf16")
    key = jax.random.key(0)
    raw_key = jax.random.PRNGKey(1)
    tree = {
        "w": jnp.ones((2, 2), jnp.float32),
        "np": np.ones(3, np.float32),
        "step": jnp.array(3, jnp.int32),
        "key": key,
        "raw_key": raw_key,
        "flag": jnp.array(True),
        "py": 1.5,
    }
    out = policy.cast_to_compute(tree)
    assert out["w"].dtype == BF16 and out["np"].dtype == BF16
    assert out["step"].dtype == jnp.int32 and out["flag"].dtype == jnp.bool_
    assert out["key"] is key and out["raw_key"] is raw_key
    assert out["py"] == 1.5
    assert policy.cast_to_param(out)["w"].dtype == F32
    assert policy.cast_to_output(out)["w"].dtype == F32
    assert get_policy("bf16-pure").cast_to_output(tree)["w"].dtype == BF16
    assert policy.cast_to_accum(out)["np"].dtype == F32


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("p=bf61", "Unknown dtype 'bf61'"),
        ("p=f32,c=bf61", "use one of f32, bf16"),
        ("x=f32", "Unknown key 'x'"),
        ("p=f32,x=bf16", "should be 'params', 'compute' or 'output' \\(p, c, o\\), or"),
        ("p=f32,,c=bf16", "Malformed part"),
        ("p=f32,p=bf16", "given twice"),
        ("bogus", "Unknown dtype 'bogus' in policy 'bogus': use a preset \\(fp32, bf16"),
        ("p=f64", "float64 is not a policy dtype"),
        ("", "Empty policy"),
        ("bf16; [->fp32", "Bad override regex '['"),
        ("bf16; .*norm.*", "Malformed override"),
        ("bf16; .*norm.*->p=zz", "Unknown dtype 'zz'"),
    ],
)
def test_bad_input_names_the_problem(text, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(".*", r"\.\*")):
        get_policy(text)


def test_bad_python_construction():
    with pytest.raises(ValueError, match="not a float dtype"):
        Policy(param_dtype=jnp.int32)
    with pytest.raises(ValueError, match="may not carry overrides"):
        Policy(overrides=(("a", get_policy("bf16; b->fp32")),))
    with pytest.raises(ValueError, match="string or Policy"):
        get_policy(3)
    with pytest.raises(ValueError, match="Unknown dtype"):
        parse_dtype("int8")


# ----------------------------------------------------------------------------- issue 13 keys
def test_residual_dtype_key_and_amending_segments():
    p = get_policy("bf16; r=f32")
    assert p.residual_dtype == F32 and p.residual == F32 and p.compute_dtype == BF16
    assert str(p) == "p=f32,c=bf16,o=f32,r=f32"  # a= only when not f32 (jmp's form)
    assert get_policy(str(p)) == p
    assert get_policy("bf16").residual == BF16  # unset: the residual follows compute
    assert get_policy("bf16-pure; u=split") == get_policy("bf16-pure-split")
    assert get_policy("bf16-pure-split").update_rule == "split"
    with pytest.raises(ValueError, match="given twice"):
        get_policy("bf16-pure-sr; u=split")
    with pytest.raises(ValueError, match="given twice"):
        get_policy("p=f32,r=f32; r=bf16")
    with pytest.raises(ValueError, match="amend the base with q=QUANT, r=DTYPE or u=RULE"):
        get_policy("bf16; c=f32")


@pytest.mark.parametrize("rule", ["sr", "kahan", "split"])
def test_fp16_params_with_bit_pattern_rules_are_refused(rule):
    """SR fell back to nearest and Kahan flushed FP16 subnormals: refused with the fix."""
    with pytest.raises(ValueError, match="needs bfloat16 .* p=f16"):
        get_policy(f"p=f16,c=f16,u={rule}")
    with pytest.raises(ValueError, match=r"override '\.\*norm\.\*'"):
        get_policy(f"bf16-pure; u={rule}; .*norm.*->p=f16")
    assert get_policy(f"p=f32,c=f16,u={rule}").update_rule in ("stochastic", rule)  # FP32 params


@pytest.mark.parametrize(
    "text, canonical, options",
    [
        ("fp8", "fp8", (1024, 0, "hybrid")),
        ("FP8:h16", "fp8:h16", (16, 0, "hybrid")),
        ("fp8:e4m3:m2:h32", "fp8:h32:m2:e4m3", (32, 2, "e4m3")),
        ("fp8:h1024:hybrid", "fp8", (1024, 0, "hybrid")),
    ],
)
def test_fp8_options_parse_and_round_trip(text, canonical, options):
    from bf16jax.nn import quant

    policy = get_policy(f"bf16; q={text}")
    assert policy.quant == canonical and get_policy(str(policy)) == policy
    assert quant.fp8_config(policy.quant) == options


@pytest.mark.parametrize("text", ["fp8:h0", "fp8:x3", "fp8:h16:h32", "fp8:e5m2"])
def test_bad_fp8_options(text):
    with pytest.raises(ValueError, match="FP8"):
        get_policy(f"bf16; q={text}")


# ----------------------------------------------------------------- jmp drop-in, jmp as oracle
# jmp's own policy tests run unchanged in tests/jmp/; here the installed jmp (test extra) is the
# oracle for what its grammar means, what its errors say and what its casts do.
JMP_SPECS = [
    "f32",
    "full",
    "half",
    "bfloat16",
    "float16",
    "f16",
    "c=f16",
    "c=half,o=full",
    "p=f16,c=f16",
    "p=f16,c=bf16",
    "p=f32,c=bf16,o=f32",
    "params=float32,compute=bfloat16,output=float32",
    "p=bf16",
]


@pytest.mark.parametrize("spec", JMP_SPECS)
def test_get_policy_agrees_with_jmp(spec):
    jmp = pytest.importorskip("jmp")
    ours, theirs = get_policy(spec), jmp.get_policy(spec)
    jmp_dtypes = tuple(np.dtype(d) for d in (theirs.param_dtype, theirs.compute_dtype))
    assert (ours.param_dtype, ours.compute_dtype) == jmp_dtypes
    assert ours.output_dtype == np.dtype(theirs.output_dtype) and ours.accum_dtype == F32
    # str() is jmp's p=..,c=..,o=.. form, parsed alike by both libraries.
    assert str(ours).count(",") == 2
    assert get_policy(str(theirs)) == ours
    back = jmp.get_policy(str(ours))
    assert np.dtype(back.output_dtype) == ours.output_dtype
    assert np.dtype(back.compute_dtype) == ours.compute_dtype


def test_bf16_is_the_one_divergence_from_jmp():
    # "bf16" is bf16jax's mixed-precision preset (FP32 params); to jmp it is a bare dtype (all
    # BF16). The migration note says so; jmp's meaning is "bfloat16" or "p=bf16" in both.
    jmp = pytest.importorskip("jmp")
    assert np.dtype(jmp.get_policy("bf16").param_dtype) == BF16
    assert dtypes(get_policy("bf16")) == (F32, BF16, F32, F32)
    for spec in ("bfloat16", "p=bf16"):
        assert np.dtype(jmp.get_policy(spec).param_dtype) == get_policy(spec).param_dtype == BF16


@pytest.mark.parametrize(
    "spec, shared",
    [
        # The part of jmp's message bf16jax repeats word for word (bf16jax then adds the fix).
        ("compute_float16", "Unknown dtype 'compute_float16'"),
        ("c=bf61", "Unknown dtype 'bf61'"),
        ("x=f16", "Unknown key 'x' in 'x=f16' should be 'params', 'compute' or 'output'"),
        ("p=f32,zz=f16", "Unknown key 'zz' in 'p=f32,zz=f16' should be 'params', 'compute'"),
    ],
)
def test_errors_worded_as_jmp(spec, shared):
    jmp = pytest.importorskip("jmp")
    with pytest.raises(ValueError) as theirs:
        jmp.get_policy(spec)
    with pytest.raises(ValueError) as ours:
        get_policy(spec)
    assert str(theirs.value).startswith(shared)
    assert str(ours.value).startswith(shared)


def test_jmp_public_policy_api_by_import_swap():
    jmp = pytest.importorskip("jmp")
    names = ("Policy", "get_policy", "half_dtype", "cast_to_full", "cast_to_half")
    assert all(hasattr(jmp, n) and hasattr(bf16jax, n) for n in names)
    tree = {"w": np.ones(2, np.float32), "h": jnp.ones(2, F16), "i": jnp.ones(2, jnp.int8)}
    for lib in (jmp, bf16jax):
        policy = lib.Policy(jnp.float32, jnp.bfloat16, jnp.float32).with_output_dtype(jnp.float16)
        assert np.dtype(policy.output_dtype) == F16 and np.dtype(policy.compute_dtype) == BF16
    ours = bf16jax.Policy(jnp.float32, jnp.bfloat16, jnp.float16)
    theirs = jmp.Policy(jnp.float32, jnp.bfloat16, jnp.float16)
    for cast in ("cast_to_param", "cast_to_compute", "cast_to_output"):
        got, want = getattr(ours, cast)(tree), getattr(theirs, cast)(tree)
        assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, want)
    for cast in ("cast_to_full", "cast_to_half"):
        got, want = getattr(bf16jax, cast)(tree), getattr(jmp, cast)(tree)
        assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, want)
    assert bf16jax.half_dtype() == np.dtype(jmp.half_dtype())


def test_with_output_dtype_keeps_the_rest():
    policy = get_policy("bf16-pure-kahan; q=w8a8; .*norm.*->fp32")
    out = policy.with_output_dtype("f32")
    assert out.output_dtype == F32 and out.param_dtype == BF16
    assert (out.update_rule, out.quant, out.overrides) == ("kahan", "w8a8", policy.overrides)
    assert str(get_policy("p=f32,c=bf16,a=bf16")) == "p=f32,c=bf16,o=bf16,a=bf16"
