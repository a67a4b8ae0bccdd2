"""KV-cache generation (models' decode_step, bf16jax.serving.sampling, inference.Programs.generate).

The oracle is recomputation without a cache: the cached logits must equal the full forward's,
and greedy tokens must equal `gpt.generate` (which recomputes the whole window per token) and
a T5 loop that reruns the decoder on the whole prefix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_gpt_config

from bf16jax import config as config_lib
from bf16jax.data.tokenizer import EOS_ID, PAD_ID
from bf16jax.models import build_model
from bf16jax.models.gpt import generate as generate_no_cache
from bf16jax.serving import inference, sampling


def _gpt(policy="fp32", **changes):
    cfg = tiny_gpt_config(policy)
    model_cfg = dict(cfg.model, num_layers=2, **changes)
    return cfg, build_model(model_cfg, policy, rngs=nnx.Rngs(0))


def _jitted(model):
    """(state, forward, decode_step, init_cache) of `model`, each jit-compiled (eager nnx
    dispatches op by op: tens of seconds per test)."""
    graphdef, state = nnx.split(model)

    def call(method):
        return jax.jit(lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a),
                       static_argnums=(2,) if method == "init_cache" else ())  # fmt: skip

    return state, call("__call__"), call("decode_step"), call("init_cache")


def _t5_config(policy="fp32"):
    c = config_lib.base_config("t5")
    c.precision = policy
    c.model.update(embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
                   num_decoder_layers=2)  # fmt: skip
    c.data.update(enc_len=16, dec_len=8)
    return c


@pytest.mark.parametrize("policy,scan", [("fp32", False), ("fp32", True), ("bf16; q=w8a8", False)])
def test_gpt_cached_logits_equal_full_forward(policy, scan):
    _, model = _gpt(policy, scan_layers=scan)
    state, forward, step, _ = _jitted(model)
    b, t = 3, 32
    tokens = jnp.asarray(np.random.RandomState(0).randint(2, 300, (b, t)), jnp.int32)
    reference = forward(state, tokens)
    cache = model.init_cache(b)
    assert jax.tree.leaves(cache)[0].dtype == jnp.dtype(model.policy.compute_dtype)
    logits, cache = step(state, tokens[:, :10], cache, jnp.zeros([b], jnp.int32))
    parts = [logits]
    for i in range(10, t):
        logits, cache = step(state, tokens[:, i : i + 1], cache, jnp.full([b], i, jnp.int32))
        parts.append(logits)
    got = jnp.concatenate(parts, axis=1)
    assert got.dtype == jnp.float32
    tol = 1e-5 if policy == "fp32" else 2e-2
    np.testing.assert_allclose(got, reference, atol=tol * float(jnp.max(jnp.abs(reference))))


def test_gpt_rows_at_different_positions():
    _, model = _gpt()
    state, forward, step, _ = _jitted(model)
    tokens = jnp.asarray(np.random.RandomState(1).randint(2, 300, (2, 32)), jnp.int32)
    full = forward(state, tokens)
    cache = model.init_cache(2)
    # Row 0 prefilled with 5 tokens, row 1 with 9: decode one token each at its own position.
    prompt = tokens.at[0, 5:].set(PAD_ID).at[1, 9:].set(PAD_ID)
    _, cache = step(state, prompt, cache, jnp.zeros([2], jnp.int32))
    new = jnp.stack([tokens[0, 5], tokens[1, 9]])[:, None]
    logits, _ = step(state, new, cache, jnp.asarray([5, 9], jnp.int32))
    np.testing.assert_allclose(logits[0, 0], full[0, 5], atol=1e-5)
    np.testing.assert_allclose(logits[1, 0], full[1, 9], atol=1e-5)


@pytest.mark.parametrize("policy", ["fp32"])
def test_t5_cached_decoder_equals_full_forward(policy):
    model = build_model(_t5_config(policy).model, policy, rngs=nnx.Rngs(0))
    rs = np.random.RandomState(1)
    enc = rs.randint(2, 300, (2, 12))
    enc[0, 9:] = PAD_ID  # padding is masked in cross-attention too
    dec = rs.randint(2, 300, (2, 8))
    dec[:, 0] = PAD_ID
    enc, dec = jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32)
    state, forward, step, init_cache = _jitted(model)
    reference = forward(state, enc, dec)
    cache = init_cache(state, enc, 8)
    parts = []
    for i in range(8):
        logits, cache = step(state, dec[:, i : i + 1], cache, jnp.full([2], i, jnp.int32))
        parts.append(logits)
    got = jnp.concatenate(parts, axis=1)
    tol = 1e-5 if policy == "fp32" else 2e-2
    np.testing.assert_allclose(got, reference, atol=tol * float(jnp.max(jnp.abs(reference))))


# ----------------------------------------------------------------------------- sampling
def test_filters_top_k_top_p_temperature():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4, jnp.float32))
    temperature = jnp.asarray([1.0, 1.0, 1.0, 2.0])
    top_k = jnp.asarray([2, 0, 0, 0], jnp.int32)
    top_p = jnp.asarray([1.0, 0.75, 0.81, 1.0])
    out = np.asarray(sampling.filter_logits(logits, temperature, top_k, top_p))
    kept = np.isfinite(out)
    np.testing.assert_array_equal(kept[0], [1, 1, 0, 0])  # top-2
    np.testing.assert_array_equal(kept[1], [1, 1, 0, 0])  # 0.5 + 0.3 >= 0.75
    np.testing.assert_array_equal(kept[2], [1, 1, 1, 0])  # 0.8 < 0.81: one more
    np.testing.assert_allclose(out[3], np.asarray(logits[3]) / 2.0, rtol=1e-6)
    keys = jax.vmap(jax.random.key)(jnp.arange(4000, dtype=jnp.uint32))
    draw = jax.jit(jax.vmap(lambda k: sampling.sample(logits[:1], k[None], temperature[:1],
                                                      top_k[:1], top_p[:1])))  # fmt: skip
    draws = draw(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
    greedy = sampling.sample(logits, keys[:4], jnp.zeros(4), top_k, top_p)
    np.testing.assert_array_equal(greedy, [0, 0, 0, 0])


def _stop(rows, n=2, width=4):
    out = np.full((len(rows), n, width), sampling.STOP_PAD, np.int32)
    for i, seqs in enumerate(rows):
        for j, s in enumerate(seqs):
            out[i, j, width - len(s) :] = s
    return jnp.asarray(out)


def test_decode_loop_stops_eos_stop_sequence_length_and_context():
    # A fake "model" whose next token is (previous + 1) mod 10 + 2: fully predictable.
    def step(tokens, state, index):
        nxt = (tokens[:, 0] - 2 + 1) % 10 + 2
        return jax.nn.one_hot(nxt, 12)[:, None] * 10.0, state

    first = jax.nn.one_hot(jnp.asarray([2, 2, 2, 2]), 12) * 10.0  # rows start at token 2
    eos_row_logits = first.at[3].set(jax.nn.one_hot(EOS_ID, 12) * 10.0)
    out = sampling.decode_loop(
        step, None, eos_row_logits, start=jnp.asarray([1, 1, 2, 6]), cache_len=8, num_steps=8,
        seeds=jnp.zeros(4, jnp.uint32), temperature=jnp.zeros(4), top_k=jnp.zeros(4, jnp.int32),
        top_p=jnp.ones(4), max_tokens=jnp.asarray([3, 8, 8, 8]),
        stop=_stop([[], [[5, 6]], [], []]), eos_id=EOS_ID,
    )  # fmt: skip
    tokens, length = np.asarray(out["tokens"]), np.asarray(out["length"])
    reasons = [sampling.FINISH_REASONS[int(r)] for r in out["finish_reason"]]
    assert reasons == ["length", "stop", "context", "eos"]
    np.testing.assert_array_equal(length, [3, 3, 7, 0])
    np.testing.assert_array_equal(tokens[0, :4], [2, 3, 4, PAD_ID])
    np.testing.assert_array_equal(tokens[1, :5], [2, 3, 4, PAD_ID, PAD_ID])  # stop 5, 6 cut
    np.testing.assert_array_equal(tokens[2], [2, 3, 4, 5, 6, 7, 8, PAD_ID])  # 6 fed + 1


# ----------------------------------------------------------------------------- programs
def _programs(policy="fp32", family="gpt"):
    if family == "gpt":
        cfg, model = _gpt(policy)
    else:
        cfg = _t5_config(policy)
        model = build_model(cfg.model, policy, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    serving = inference.serving_model(cfg, params, None, "fp32")
    return serving, inference.Programs(serving, cfg)


def _settings(n, max_tokens, temperature=0.0, seed=0):
    return (jnp.full([n], seed, jnp.uint32), jnp.full([n], temperature), jnp.zeros([n], jnp.int32),
            jnp.ones([n]), jnp.asarray(max_tokens, jnp.int32),
            jnp.full([n, inference.MAX_STOP_SEQUENCES, inference.MAX_STOP_LENGTH], -1))  # fmt: skip


def test_gpt_generate_program_equals_no_cache_greedy_and_rows_are_independent():
    model, programs = _programs()
    width = programs.limits["prompt_len"]
    rs = np.random.RandomState(2)
    prompts = [rs.randint(2, 300, n) for n in (4, 9, 1)]  # row 1 runs out of context
    batch = np.zeros((3, width), np.int32)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    generate = jax.jit(programs.generate)
    out = generate(programs.params, batch, lengths, *_settings(3, [20, width, width]))
    for i, p in enumerate(prompts):
        n = int(out["length"][i])
        reference = generate_no_cache(model, p, n, key=jax.random.key(0), temperature=0.0)
        np.testing.assert_array_equal(np.asarray(out["tokens"][i, :n]), reference[len(p) :])
    # Row 1: 9 prompt tokens + 24 = max_len + 1 (the last is predicted, never fed).
    assert [int(x) for x in out["length"]] == [20, width - 9 + 1, width]
    reasons = [sampling.FINISH_REASONS[int(r)] for r in out["finish_reason"]]
    assert reasons == ["length", "context", "length"]
    # Sampled: a row's tokens depend on its seed only, not on the rest of the batch.
    sampled = generate(programs.params, batch, lengths, *_settings(3, [12] * 3, 1.0, seed=7))
    alone = generate(programs.params, batch[1:2], lengths[1:2], *_settings(1, [12], 1.0, seed=7))
    np.testing.assert_array_equal(sampled["tokens"][1], alone["tokens"][0])
    other = generate(programs.params, batch[1:2], lengths[1:2], *_settings(1, [12], 1.0, seed=8))
    assert not np.array_equal(other["tokens"][0], alone["tokens"][0])


def test_t5_generate_program_equals_recomputed_greedy():
    model, programs = _programs(family="t5")
    enc = np.zeros((2, programs.limits["prompt_len"]), np.int32)
    enc[0, :6] = [40, 50, 60, 70, 80, EOS_ID]
    enc[1, :3] = [90, 100, EOS_ID]
    n = programs.limits["cache_len"]
    out = jax.jit(programs.generate)(programs.params, enc, jnp.asarray([6, 3]),
                                     *_settings(2, [n, n]))  # fmt: skip
    state, forward, _, _ = _jitted(model)
    for row in range(2):
        dec = np.zeros((1, n), np.int32)  # PAD start, then the greedy tokens so far
        expected = []
        for i in range(int(out["length"][row])):
            logits = forward(state, jnp.asarray(enc[row : row + 1]), jnp.asarray(dec))
            expected.append(int(jnp.argmax(logits[0, i])))
            if i + 1 < n:
                dec[0, i + 1] = expected[-1]
        np.testing.assert_array_equal(out["tokens"][row, : len(expected)], expected)


def test_t5_and_vit_artifacts_round_trip(tmp_path):
    from bf16jax.serving import artifact, export
    from bf16jax.serving.runners import ProgramRunner

    t5_cfg = _t5_config("bf16")
    t5_cfg.lock()
    t5 = build_model(t5_cfg.model, "bf16", rngs=nnx.Rngs(0))
    export.export_artifact(t5_cfg, nnx.state(t5, nnx.Param), None, str(tmp_path / "t5"),
                           precision="bf16", source={"random_init": True}, platforms=("cpu",),
                           eval_batches=0)  # fmt: skip
    art = artifact.Artifact(str(tmp_path / "t5"))
    serving = inference.serving_model(t5_cfg, nnx.state(t5, nnx.Param), None, "bf16")
    local = ProgramRunner(inference.Programs(serving, t5_cfg), {})
    prompts = ["In the", "And"]
    assert art.generate(prompts, max_tokens=5) == local.generate(prompts, max_tokens=5)
    rows = art.score(["In the start"], ["God"])
    assert rows[0]["tokens"] == 4 and rows[0]["logprob"] < 0  # "God" + EOS
    with pytest.raises(ValueError, match="T5 scoring needs one target"):
        art.score(["x"])
    vit_cfg = config_lib.base_config("vit")
    vit_cfg.precision = "fp32"
    vit_cfg.model.update(embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32)
    vit_cfg.lock()
    vit = build_model(vit_cfg.model, "fp32", rngs=nnx.Rngs(0))
    export.export_artifact(vit_cfg, nnx.state(vit, nnx.Param), None, str(tmp_path / "vit"),
                           precision="fp32", source={"random_init": True}, platforms=("cpu",),
                           eval_batches=0)  # fmt: skip
    art = artifact.Artifact(str(tmp_path / "vit"))
    assert art.programs == ("score",)
    images = np.random.RandomState(0).rand(3, 8, 8, 1).astype(np.float32)
    probs = np.asarray([r["probs"] for r in art.classify(images)])
    np.testing.assert_allclose(probs, jax.nn.softmax(vit(jnp.asarray(images)), -1), atol=1e-5)
    with pytest.raises(ValueError, match="images must be"):
        art.classify(images[:, :4])


def test_fp8_artifact_holds_e4m3_codes_and_computes_the_fp8_forward(tmp_path):
    from bf16jax.nn.quant import FP8Meta
    from bf16jax.serving import artifact, export

    cfg, model = _gpt("bf16; q=fp8")
    params, meta = nnx.state(model, nnx.Param), nnx.state(model, FP8Meta)
    with pytest.raises(ValueError, match="fp8 serving needs the delayed FP8 scales"):
        inference.serving_policy("bf16; q=w8a8", "fp8")
    export.export_artifact(cfg, params, meta, str(tmp_path / "fp8"), precision="fp8",
                           source={"random_init": True}, platforms=("cpu",),
                           eval_batches=0)  # fmt: skip
    art = artifact.Artifact(str(tmp_path / "fp8"))
    assert "float8_e4m3fn" in art.manifest["params"]["dtypes"]
    assert art.params["blocks/0/mlp/fc1/kernel"].dtype == jnp.float8_e4m3fn
    tokens = np.random.RandomState(3).randint(2, 300, (2, 32)).astype(np.int32)
    # The training model's forward (its fp8_dot quantizes the float kernel on the fly).
    trained = inference.Programs(inference.serving_model(cfg, params, meta, "train"), cfg)
    reference = jax.jit(trained.score)(trained.params, tokens)
    np.testing.assert_allclose(art.call("score", tokens), reference,
                               atol=0.05 * float(jnp.max(jnp.abs(reference))))  # fmt: skip
